"""Classification heads: how an adapter turns the base's last hidden state into logits.

Our own adapters mean-pool the real tokens into one linear layer ("mean-pooled"). An adapter trained with
PEFT on a `...ForSequenceClassification` model carries that architecture's head, and it must be applied
as transformers applies it, or the bundle would not give PEFT's outputs. Every head here is the same
three steps — pick one vector per row (mean, first token, last real token), an optional dense layer with
an activation, a linear classifier — so one description per kind serves the model, the exporter and
the adapter files. The kind travels in the adapter's JSON and in the bundle manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgelora.errors import EdgeloraError
from edgelora.runtime.manifest import MEAN_POOLED, PER_TOKEN  # the kinds' names are the manifest's HEADS


@dataclass(frozen=True)
class HeadKind:
    """One head's computation, and where PEFT (`modules_to_save`) keeps its weights.

    Args:
        token: the vector each row is classified from: "mean" (over real tokens), "first" ([CLS] / <s>),
            or "last" (the last real token, for decoders that attend left to right); "each" classifies
            every token (token classification: logits batch x tokens x labels).
        activation: applied after the dense layer ("tanh", "relu"); None when the head has no dense layer.
        bias: whether the classifier has a bias (GPT-2's and Llama's `score` has none).
        dense_key / out_key: the modules' names in the architecture's ...ForSequenceClassification, as
            PEFT saves them after `base_model.model.`; None for our own head, saved under `edgelora_head.`.
        dense_from_base: the dense layer is the base model's own (BERT's pooler), not part of the head.
    """

    token: str
    activation: str | None
    bias: bool
    dense_key: str | None
    out_key: str | None
    dense_from_base: bool = False


HEAD_KINDS: dict[str, HeadKind] = {
    MEAN_POOLED: HeadKind("mean", None, True, None, None),
    # BertForSequenceClassification: classifier(tanh(pooler.dense(h[:, 0]))); the pooler belongs to the base.
    "bert-pooler": HeadKind("first", "tanh", True, "bert.pooler.dense", "classifier", dense_from_base=True),
    # RobertaClassificationHead: out_proj(tanh(dense(h[:, 0]))); PEFT saves the whole `classifier`.
    "roberta": HeadKind("first", "tanh", True, "classifier.dense", "classifier.out_proj"),
    # DistilBertForSequenceClassification: classifier(relu(pre_classifier(h[:, 0]))).
    "distilbert": HeadKind("first", "relu", True, "pre_classifier", "classifier"),
    # GPT2/Llama/Qwen2ForSequenceClassification: score(h[last non-padding token]), no bias.
    "last-token": HeadKind("last", None, False, None, "score"),
    # ...ForTokenClassification: classifier(h) at every position (PEFT TOKEN_CLS saves `classifier`).
    PER_TOKEN: HeadKind("each", None, True, None, "classifier"),
}

# The head each architecture's ...ForSequenceClassification applies (model_type -> head kind).
ARCH_HEADS = {
    "bert": "bert-pooler",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "distilbert": "distilbert",
    "gpt2": "last-token",
    "llama": "last-token",
    "mistral": "last-token",
    "qwen2": "last-token",
}

# Llama-style ...ForTokenClassification name their per-token linear `score`, the others `classifier`.
_TOKEN_SCORE = ("llama", "mistral", "qwen2")

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


def architecture_head(model_type: str | None) -> str:
    """The head kind of the architecture's ...ForSequenceClassification (`ARCH_HEADS`), for training an adapter
    that PEFT loads on AutoModelForSequenceClassification; EdgeloraError for an architecture without one here."""
    if model_type not in ARCH_HEADS:
        raise EdgeloraError(f"head 'architecture': edgelora knows the sequence-classification heads of "
                            f"{', '.join(sorted(ARCH_HEADS))}, not {model_type or 'this base'}'s; use head 'mean-pooled'")
    return ARCH_HEADS[model_type]


def head_kind(name: str) -> HeadKind:
    """The `HeadKind` called `name`; EdgeloraError for an unknown one."""
    if name not in HEAD_KINDS:
        raise EdgeloraError(f"head {name!r} is not one of {', '.join(HEAD_KINDS)}")
    return HEAD_KINDS[name]


def out_key(kind_name: str, model_type: str | None) -> str | None:
    """Where the architecture's task model keeps the classifier of head `kind_name` (PEFT's key after
    `base_model.model.`); None for our own head."""
    if kind_name == PER_TOKEN and model_type in _TOKEN_SCORE:
        return "score"
    return head_kind(kind_name).out_key


def pool(hidden: torch.Tensor, mask: torch.Tensor, token: str) -> torch.Tensor:
    """One vector per row of `hidden` (batch, seq, hidden): the mean over real tokens, the first token, or the
    last real token (the rightmost position whose mask is 1, so left and right padding both work); "each"
    keeps every token (batch, seq, hidden)."""
    if token == "each":
        return hidden
    if token == "first":
        return hidden[:, 0]
    m = mask.to(hidden.dtype)  # (batch, seq)
    if token == "mean":
        return (hidden * m.unsqueeze(-1)).sum(1) / m.unsqueeze(-1).sum(1).clamp(min=1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device, dtype=hidden.dtype) * m  # (batch, seq)
    last = positions.argmax(-1)  # (batch,)
    index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # (batch, 1, hidden)
    return hidden.gather(1, index).squeeze(1)


def activation(name: str | None):
    """The activation function of a dense layer (identity for None)."""
    return _ACTIVATIONS[name] if name is not None else (lambda x: x)
