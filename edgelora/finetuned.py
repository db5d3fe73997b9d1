"""A fully fine-tuned model's directory as `edgelora extract` reads it: its weight files and its task head.

A head comes across only where edgelora applies it as the tuned model did: a ...ForSequenceClassification's
architecture head (`edgelora.heads.ARCH_HEADS`: its pooling, dense layer and classifier), a
...ForTokenClassification's per-token classifier, or no head for a model saved without one (an embeddings
adapter). Anything else is refused in one line naming the directory and why. Torch loads inside the functions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgelora.errors import EdgeloraError

if TYPE_CHECKING:
    from torch import Tensor, nn

# The classifier of a ...ForTokenClassification: `classifier` (BERT, RoBERTa, DistilBERT, GPT-2) or `score`
# (Llama, Qwen2); either is one linear layer applied at every token.
TOKEN_OUT_KEYS = ("classifier", "score")
# problem_type values whose outputs are not one-of-n class scores: the runtime's softmax label would misread them.
NOT_SINGLE_LABEL = {"regression": "its outputs are values, not class scores",
                    "multi_label_classification": "its labels are independent sigmoid scores, and an edgelora "
                                                  "classifier picks one label by softmax"}


@dataclass(frozen=True)
class Head:
    """The tuned model's task head as the extracted adapter takes it, with where it came from."""

    kind: str | None  # an `edgelora.heads.HEAD_KINDS` name; None: the tuned model has no head
    labels: list[str]  # empty without a head
    weight: Tensor | None  # (labels, hidden)
    bias: Tensor | None  # (labels,); None for a classifier without one (GPT-2's score)
    dense: tuple[Tensor, Tensor] | None  # the layer before the classifier: (hidden, hidden) weight, (hidden,) bias
    source: str  # e.g. "BertForSequenceClassification: bert.pooler.dense, classifier"


def _checkpoint(model_dir: Path) -> dict[str, Tensor] | list[Path]:
    """The weight files (safetensors, sharded or not), or the loaded state of a pytorch_model.bin."""
    import torch

    files = sorted(model_dir.glob("*.safetensors"))
    if not files and (model_dir / "pytorch_model.bin").is_file():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return files


def _all_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    found = _checkpoint(model_dir)
    if isinstance(found, dict):
        return list(found)
    keys: list[str] = []
    for path in found:
        with safe_open(str(path), framework="pt") as f:
            keys += list(f.keys())
    return keys


def _read_tensors(model_dir: Path, keys: set[str]) -> dict[str, Tensor]:
    """Those of `keys` that the model directory's weight files hold, as float32."""
    from safetensors import safe_open

    found = _checkpoint(model_dir)
    if isinstance(found, dict):
        return {k: v.float() for k, v in found.items() if k in keys}
    out: dict[str, Tensor] = {}
    for path in found:
        with safe_open(str(path), framework="pt") as f:
            for key in keys & set(f.keys()):
                out[key] = f.get_tensor(key).float()
    return out


def _head_keys(keys: list[str], backbone: nn.Module) -> list[str]:
    """Checkpoint keys outside the backbone that AutoModel loaded (under its `base_model_prefix` or not)."""
    prefix = getattr(backbone, "base_model_prefix", "") or ""
    children = {n for n, _ in backbone.named_children()}
    return [k for k in keys
            if k.removeprefix(f"{prefix}.").split(".")[0] not in children]


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def read_head(model_dir: str | Path, backbone: nn.Module, hidden: int) -> Head:
    """The tuned model's head, decided by its config.json (`architectures`, `model_type`, `id2label`,
    `problem_type`) and checkpoint keys; EdgeloraError, in one line, for a head edgelora cannot apply exactly.

    Args:
        model_dir: the tuned model's directory.
        backbone: the tuned model as `load_base` loaded it (AutoModel): what is not in it is the head.
        hidden: the base's hidden size, which the head must read.
    """
    from edgelora.heads import ARCH_HEADS, HEAD_KINDS, PER_TOKEN
    from edgelora.peft_format import config_labels

    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EdgeloraError(f"{model_dir / 'config.json'}: unreadable ({exc}); re-save the tuned model with "
                            "save_pretrained") from exc
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    seq = next((a for a in archs if a.endswith("ForSequenceClassification")), None)
    tok = next((a for a in archs if a.endswith("ForTokenClassification")), None)
    if seq is None and tok is None:
        extra = _head_keys(_all_keys(model_dir), backbone)
        plain = type(backbone).__name__
        if extra or any(a != plain for a in archs):
            what = f"a {archs[0]}" if archs else "a model whose config.json names no architecture"
            held = f" (its checkpoint holds {_shown(extra)})" if extra else ""
            raise EdgeloraError(f"{model_dir}: {what}{held}, whose head edgelora does not apply; extract takes a "
                                "...ForSequenceClassification, a ...ForTokenClassification or a model saved "
                                "without a head (AutoModel)")
        return Head(None, [], None, None, None, f"none: {archs[0] if archs else 'the checkpoint'} has no task head")
    arch = seq or tok
    problem = config.get("problem_type")
    if problem in NOT_SINGLE_LABEL:
        raise EdgeloraError(f"{model_dir}: a {arch} of problem_type {problem!r}: {NOT_SINGLE_LABEL[problem]}; "
                            "extract takes single-label classifiers")
    if seq is not None:
        model_type = config.get("model_type")
        if model_type not in ARCH_HEADS:
            raise EdgeloraError(f"{model_dir}: a {arch}, whose head edgelora does not know how to apply; it knows "
                                f"the sequence-classification heads of {', '.join(sorted(ARCH_HEADS))}")
        kind_name = ARCH_HEADS[model_type]
        out_key = HEAD_KINDS[kind_name].out_key
    else:
        kind_name = PER_TOKEN
        keys = set(_all_keys(model_dir))
        out_key = next((k for k in TOKEN_OUT_KEYS if f"{k}.weight" in keys), TOKEN_OUT_KEYS[0])
    kind = HEAD_KINDS[kind_name]
    dense_keys = {f"{kind.dense_key}.{p}" for p in ("weight", "bias")} if kind.dense_key else set()
    tensors = _read_tensors(model_dir, {f"{out_key}.weight", f"{out_key}.bias"} | dense_keys)
    weight, bias = tensors.get(f"{out_key}.weight"), tensors.get(f"{out_key}.bias")
    if weight is None:
        raise EdgeloraError(f"{model_dir}: a {arch} whose checkpoint holds no {out_key}.weight; re-save the tuned "
                            "model with save_pretrained")
    if weight.ndim != 2 or weight.shape[1] != hidden:
        raise EdgeloraError(f"{model_dir}: {out_key}.weight has shape {tuple(weight.shape)}, but the base needs "
                            f"(labels, {hidden}); tuned must be a full fine-tune of base")
    if weight.shape[0] < 2:
        raise EdgeloraError(f"{model_dir}: {out_key} has {weight.shape[0]} output (a regression head); extract "
                            "takes classifiers of at least 2 labels")
    if (bias is not None) != kind.bias:
        raise EdgeloraError(f"{model_dir}: {out_key} {'has' if bias is not None else 'lacks'} a bias, which "
                            f"{arch}'s head {'does not have' if bias is not None else 'needs'}; re-save the tuned "
                            "model with save_pretrained")
    dense = None
    if kind.dense_key is not None:
        dw, db = tensors.get(f"{kind.dense_key}.weight"), tensors.get(f"{kind.dense_key}.bias")
        if dw is None or db is None:
            raise EdgeloraError(f"{model_dir}: {arch}'s head reads {kind.dense_key}, which its checkpoint does not "
                                "hold; re-save the tuned model with save_pretrained")
        if tuple(dw.shape) != (hidden, hidden) or tuple(db.shape) != (hidden,):
            raise EdgeloraError(f"{model_dir}: {kind.dense_key}.weight has shape {tuple(dw.shape)}, but the base "
                                f"needs ({hidden}, {hidden}); tuned must be a full fine-tune of base")
        dense = (dw, db)
    labels = config_labels(config.get("id2label"), weight.shape[0])
    source = f"{arch}: " + ", ".join(k for k in (kind.dense_key, out_key) if k)
    return Head(kind_name, labels, weight, bias, dense, source)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """A head-bearing checkpoint loaded as a bare model makes transformers log 'weights not used': expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
