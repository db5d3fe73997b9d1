"""Training-side tokenization with the base's own `tokenizer.json` (the same file a bundle ships)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgelora.errors import EdgeloraError

DEFAULT_MAX_LENGTH = 128


def load_tokenizer(model_dir: str | Path, max_length: int = DEFAULT_MAX_LENGTH) -> Tokenizer:
    """The fast tokenizer of a model directory, truncating to `max_length` and padding to the longest row."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise EdgeloraError(f"{path}: missing; edgelora needs the model's fast tokenizer file (save it with save_pretrained)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a corrupt file
        raise EdgeloraError(f"{path}: cannot read tokenizer ({str(exc).splitlines()[0]})") from exc
    configure(tok, max_length)
    return tok


def configure(tok: Tokenizer, max_length: int) -> None:
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    pad_token = "[PAD]"
    if pad_id is None:
        pad_token = "<pad>" if tok.token_to_id("<pad>") is not None else "<|endoftext|>"
        pad_id = tok.token_to_id(pad_token) or 0
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)


def encode(tok: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """int64 feeds [batch, seq]: input_ids, attention_mask, token_type_ids (zeros: single sentences)."""
    encodings = tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
