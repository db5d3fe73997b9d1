"""A fully fine-tuned model's directory as `edgelora extract` reads it: its weight files and its task head.

The head (`classifier.*` or `score.*`, labels from config.json's id2label) becomes the extracted adapter's head
where it is one linear layer over the hidden size; otherwise the adapter gets a placeholder head and a note
says why. Torch and safetensors load inside the functions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

HEAD_KEYS = (("classifier.weight", "classifier.bias"), ("score.weight", "score.bias"))
PLACEHOLDER_LABELS = ["0", "1"]


@dataclass(frozen=True)
class Head:
    """The tuned model's task head as the extracted adapter takes it, with where it came from."""

    weight: Tensor | None  # (labels, hidden); None: no usable head, use a placeholder
    bias: Tensor | None
    labels: list[str]
    source: str
    note: str | None = None


def _read_tensors(model_dir: Path, keys: set[str]) -> dict[str, Tensor]:
    """Those of `keys` that the model directory's weight files hold (safetensors, sharded or not, or .bin)."""
    import torch
    from safetensors import safe_open

    found: dict[str, Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in keys & set(f.keys()):
                found[key] = f.get_tensor(key)
    if not files and (model_dir / "pytorch_model.bin").is_file():
        state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        found = {k: v for k, v in state.items() if k in keys}
    return found


def _all_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys += list(f.keys())
    return keys


def read_head(model_dir: str | Path, hidden: int) -> Head:
    """The tuned model's classification head (`classifier.*` or `score.*`, labels from id2label), else a
    placeholder with labels ["0", "1"] and a note saying why."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    for w_key, b_key in HEAD_KEYS:
        tensors = _read_tensors(model_dir, {w_key, b_key})
        weight = tensors.get(w_key)
        if weight is None:
            continue
        if weight.ndim != 2 or weight.shape[1] != hidden or weight.shape[0] < 2:
            return Head(None, None, PLACEHOLDER_LABELS, "placeholder",
                        f"the tuned model's {w_key} has shape {tuple(weight.shape)}, not (labels >= 2, {hidden}); "
                        f"the adapter gets a placeholder head with labels {PLACEHOLDER_LABELS} (all-zero weights)")
        id2label = config.get("id2label") or {}
        try:
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            labels = []
        if len(labels) != weight.shape[0]:
            labels = [str(i) for i in range(weight.shape[0])]
        note = None
        seq_cls = [a for a in archs if a.endswith("ForSequenceClassification")]
        if seq_cls:
            note = (f"copied the head {w_key} ({len(labels)} labels); {seq_cls[0]} applied it to its own pooled "
                    "vector (the [CLS] pooler or the last token), edgelora applies it to the mean-pooled embedding, "
                    "so check the adapter's accuracy before relying on the head")
        return Head(weight.float(), None if tensors.get(b_key) is None else tensors[b_key].float(), labels, w_key, note)
    heads = [k for k in _all_keys(model_dir) if k.split(".")[0] in ("classifier", "pre_classifier", "score")]
    why = (f"its head ({', '.join(heads[:3])}) is not one linear layer" if heads
           else "the tuned model has no classification head")
    return Head(None, None, PLACEHOLDER_LABELS, "placeholder",
                f"{why}; the adapter gets a placeholder head with labels {PLACEHOLDER_LABELS} (all-zero weights: "
                "every text scores 0), use its embeddings output or train a head")


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
