"""Token classification: a frozen encoder with named adapters and a per-token linear head per adapter.

`TokenAdapterModel` is an `AdapterModel` whose heads classify every token of the last hidden state, as
`BertForTokenClassification`'s `classifier` does, instead of the mean-pooled row; the injection, fake
quantization, merge and switching are `AdapterModel`'s own. `train_token_adapter` trains one adapter with the
shared loop (`train.run_loop`) and keeps the epoch with the best held-out entity F1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgelora.config import AdapterConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.heads import PER_TOKEN
from edgelora.model import AdapterModel, max_positions
from edgelora.runtime.bundle import TOKEN_CLASSIFICATION
from edgelora.runtime.entities import entity_f1
from edgelora.token_data import IGNORE_INDEX, TokenDataset, encode_tagged


class TokenAdapterModel(AdapterModel):
    """Frozen encoder + adapters + a per-token head each; `forward` returns (logits [batch, seq, labels], pooled).

    Example:
        >>> model = TokenAdapterModel(load_base("minilm")[0])
        >>> model.add_adapter("slots", LoraConfig(r=8), labels=["O", "B-room", "I-room"])
    """

    task = TOKEN_CLASSIFICATION

    def add_adapter(self, name: str, config: AdapterConfig, labels: list[str], quant: QuantConfig | None = None,
                    head: str = PER_TOKEN) -> None:
        """Inject adapter `name` with a fresh per-token head over `labels` (`AdapterModel.add_adapter`)."""
        if head != PER_TOKEN:
            raise EdgeloraError(f"adapter {name!r}: a token-classification model takes head {PER_TOKEN!r}, not {head!r}")
        super().add_adapter(name, config, labels, quant=quant, head=head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(logits, pooled); with `labels` [batch, seq] (IGNORE_INDEX where no loss), (loss, logits, pooled)."""
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)  # (batch, seq, hidden)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (batch, hidden): the embeddings output
        if self.active is None:
            logits = hidden.new_zeros(*hidden.shape[:2], 0)
        else:
            logits = self.heads[self.active](hidden)  # (batch, seq, labels)
        if labels is None:
            return logits, pooled
        if self.active is None:
            raise EdgeloraError("labels were given but no adapter is active; call set_adapter(name) first")
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.to(logits.device).long().flatten(),
                               ignore_index=IGNORE_INDEX)
        return loss, logits, pooled


def _feeds(tokenizer, ds: TokenDataset, rows, device: torch.device):
    feeds, labels, firsts = encode_tagged(tokenizer, [ds.texts[i] for i in rows], [ds.spans[i] for i in rows],
                                          [ds.tags[i] for i in rows])
    return {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}, torch.from_numpy(labels).to(device), firsts


@torch.no_grad()
def predict_tags(model: TokenAdapterModel, tokenizer, ds: TokenDataset, batch_size: int = 64) -> list[list[str]]:
    """Each example's word tags from its words' first sub-tokens ("O" for a word truncation dropped)."""
    model.eval()
    device = next(model.parameters()).device
    names = model.labels[model.active]
    out: list[list[str]] = []
    for start in range(0, len(ds), batch_size):
        rows = range(start, min(start + batch_size, len(ds)))
        feeds, _, firsts = _feeds(tokenizer, ds, rows, device)
        best = model(**feeds)[0].float().argmax(-1).cpu().numpy()  # (batch, seq)
        out += [[names[best[r, t]] if t >= 0 else "O" for t in first] for r, first in enumerate(firsts)]
    return out


def evaluate_f1(model: TokenAdapterModel, tokenizer, ds: TokenDataset) -> dict[str, float]:
    """Entity-level precision, recall and F1 of the active adapter on `ds` (`runtime.entities.entity_f1`)."""
    return entity_f1([ds.tag_names(i) for i in range(len(ds))], predict_tags(model, tokenizer, ds))


def train_token_adapter(model: TokenAdapterModel, name: str, tokenizer, train: TokenDataset, eval: TokenDataset,
                        config=None, progress: Callable[[str], None] | None = None, checkpoint=None):
    """Train adapter `name` and its per-token head on `train`, keeping the epoch with the best entity F1 on `eval`.

    Example:
        >>> train_ds, eval_ds = load_token_splits("builtin:slots:400")
        >>> train_token_adapter(model, "slots", tok, train_ds, eval_ds)  # doctest: +SKIP
    """
    import hashlib
    import json

    from edgelora.train import LoopTask, TrainConfig, _signature, run_loop

    config = config or TrainConfig()
    if len(train) == 0:
        raise EdgeloraError("the training set is empty")
    model.set_adapter(name)
    if tuple(model.labels[name]) != tuple(train.label_names):
        raise EdgeloraError(f"adapter {name!r} has labels {model.labels[name]} but the data's tags are "
                            f"{list(train.label_names)}; add the adapter with the data's label_names")
    if eval.label_names != train.label_names:
        raise EdgeloraError("the evaluation set has other tags than the training set; load it with the training "
                            "set's label_names")
    limit = max_positions(model.base)
    truncation = getattr(tokenizer, "truncation", None) or {}
    if limit is not None and truncation.get("max_length", 0) > limit:
        raise EdgeloraError(f"the tokenizer truncates at {truncation['max_length']} tokens but the base has {limit} "
                            f"positions; use max_length <= {limit}")

    def batch_loss(step_model: torch.nn.Module, rows: np.ndarray, device: torch.device):
        feeds, labels, _ = _feeds(tokenizer, train, rows, device)
        logits = step_model(**feeds)[0]
        summed = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum")
        return summed, (labels != IGNORE_INDEX).sum().to(summed.dtype)

    def evaluate() -> tuple[dict[str, float], float]:
        scores = evaluate_f1(model, tokenizer, eval)
        return {"eval_f1": scores["f1"], "eval_precision": scores["precision"], "eval_recall": scores["recall"]}, \
            scores["f1"]

    def signature(world: int) -> dict:
        data = json.dumps([train.texts, train.spans, train.tags, eval.texts, eval.spans, eval.tags])
        sig = _signature(model, name, tokenizer, [], [], [], [], config, world)
        return {**sig, "task": TOKEN_CLASSIFICATION, "data": hashlib.sha256(data.encode()).hexdigest()}

    task = LoopTask(size=len(train), batch_loss=batch_loss, evaluate=evaluate if len(eval) else None,
                    empty_metrics={"eval_f1": float("nan")}, signature=signature,
                    head_params=list(model.heads[name].parameters()))
    return run_loop(model, name, task, config, progress=progress, checkpoint=checkpoint)


def word_tags(model: TokenAdapterModel, tokenizer, texts: Sequence[str]) -> list[list[str]]:
    """Tags of the words of raw texts (words as `runtime.entities.words` cuts them), with the active adapter."""
    from edgelora.runtime.entities import words

    spans = [tuple(words(t)) for t in texts]
    ds = TokenDataset(tuple(texts), tuple(spans), tuple(tuple(0 for _ in s) for s in spans),
                      tuple(model.labels[model.active]))
    return predict_tags(model, tokenizer, ds)
