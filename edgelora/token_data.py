"""Token-classification datasets: JSONL of words and tags, or of texts with labelled character spans, and the
seeded `builtin:slots` task (room, device and temperature in smart-home commands).

Every example becomes a text, its words' character spans and one tag per word (`TokenDataset`). Spans become
BIO tags on the words they cover (`runtime/entities.py` says what a word is); word tags become sub-token labels
in `encode_tagged`: the first sub-token of each word carries its word's tag, the others -100 (no loss).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.runtime.entities import OUTSIDE, first_subtokens, tag_type, words

IGNORE_INDEX = -100  # label of a sub-token the loss skips: every one but the first of a word, specials, padding
BUILTIN_TASKS = ("slots",)
DEFAULT_BUILTIN_SIZE = 1000


@dataclass(frozen=True)
class TokenDataset:
    """Texts with the character spans of their words and a tag index per word; `label_names[i]` names tag i."""

    texts: tuple[str, ...]
    spans: tuple[tuple[tuple[int, int], ...], ...]
    tags: tuple[tuple[int, ...], ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def tag_names(self, i: int) -> list[str]:
        return [self.label_names[t] for t in self.tags[i]]


# --- the builtin task ------------------------------------------------------------------------------------
_ROOMS = ("kitchen", "living room", "bedroom", "bathroom", "hallway", "office", "garage", "nursery", "dining room",
          "basement", "study", "guest room", "attic", "laundry room", "porch", "~sunroom", "~pantry")
_DEVICES = ("lights", "lamp", "heater", "fan", "ceiling fan", "air conditioner", "thermostat", "tv", "radio",
            "blinds", "speaker", "radiator", "desk lamp", "dehumidifier", "~space heater", "~floor lamp")
_TEMPS = tuple(f"{t}{frac}" for t in range(16, 29) for frac in ("", ".5"))
# {room}, {device}, {temp} are the entities; a leading "~" marks a held-out paraphrase (held-out stream only).
_TEMPLATES = (
    "turn on the {device} in the {room}", "switch off the {room} {device}", "set the {room} to {temp} degrees",
    "set the {device} in the {room} to {temp}", "please turn the {device} off", "dim the {device} in the {room}",
    "make the {room} {temp} degrees", "heat the {room} to {temp} degrees please", "is the {device} on in the {room}",
    "turn the {room} {device} up to {temp}", "I want {temp} degrees in the {room}", "start the {device}",
    "can you switch on the {device}", "keep the {room} at {temp} degrees tonight", "stop the {device} in the {room}",
    "~warm up the {room} to {temp} degrees", "~could you shut the {device} in the {room}",
    "~the {room} should be {temp} degrees",
)
_ENTITY_SLOTS = {"room": ("room", _ROOMS), "device": ("device", _DEVICES), "temp": ("temperature", _TEMPS)}
SLOT_TAGS = (OUTSIDE, *(f"{p}-{label}" for label, _ in _ENTITY_SLOTS.values() for p in "BI"))  # builtin's labels


def generate_slots(n: int, seed: int, split: str = "train", exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`n` distinct smart-home commands as {"text", "spans": [{"start", "end", "label"}]}, the same for the same
    seed and split; "heldout" draws its own stream plus the paraphrases and values the train split never uses."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EdgeloraError(f"builtin:slots: n={n!r} examples requested; ask for a positive integer")
    rng = random.Random(f"edgelora/slots/{seed}/{split}")
    held = split == "heldout"

    def usable(options: Sequence[str]) -> list[str]:
        return [o.lstrip("~") for o in options if held or not o.startswith("~")]

    templates = usable(_TEMPLATES)
    seen, out = set(exclude), []
    for _ in range(n):
        for _attempt in range(200):
            template = rng.choice(templates)
            text, spans = "", []
            for piece in template.replace("}", "{").split("{"):
                if piece in _ENTITY_SLOTS:
                    label, options = _ENTITY_SLOTS[piece]
                    value = rng.choice(usable(options))
                    spans.append({"start": len(text), "end": len(text) + len(value), "label": label})
                    text += value
                else:
                    text += piece
            if text not in seen:
                break
        else:
            raise EdgeloraError(f"builtin:slots: ran out of distinct texts after {len(out)}; ask for fewer examples")
        seen.add(text)
        out.append({"text": text, "spans": spans})
    return out


# --- reading ---------------------------------------------------------------------------------------------
def _tokens_example(record: dict, where: str) -> tuple[str, list[tuple[int, int]], list[str]]:
    tokens, tags = record["tokens"], record.get("tags")
    if tags is None:
        raise EdgeloraError(f"{where}: 'tokens' without 'tags'; give one tag per token")
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t.strip() for t in tokens) or not tokens:
        raise EdgeloraError(f"{where}: 'tokens' must be a non-empty list of non-empty strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise EdgeloraError(f"{where}: 'tags' must be a list of strings such as \"B-room\", \"I-room\", \"O\"")
    if len(tokens) != len(tags):
        raise EdgeloraError(f"{where}: {len(tokens)} tokens but {len(tags)} tags; give one tag per token")
    spans, text = [], ""
    for token in tokens:
        text += " " if text else ""
        spans.append((len(text), len(text) + len(token)))
        text += token
    return text, spans, [_check_tag(t, where) for t in tags]


def _check_tag(tag: str, where: str) -> str:
    prefix, kind = tag_type(tag)
    if tag in ("B-", "I-") or (kind is not None and (not kind.strip() or kind != kind.strip())):
        raise EdgeloraError(f"{where}: tag {tag!r} has no entity type; write e.g. \"B-room\", \"room\" or \"O\"")
    return tag


def spans_to_tags(text: str, word_spans: Sequence[tuple[int, int]], spans: Any, where: str) -> list[str]:
    """BIO tags of the words covered by labelled character spans: B- on the first word a span touches, I- on
    the others, O elsewhere. Spans must lie in the text and must not overlap."""
    if not isinstance(spans, list):
        raise EdgeloraError(f"{where}: 'spans' must be a list of {{\"start\", \"end\", \"label\"}}")
    tags = [OUTSIDE] * len(word_spans)
    taken: list[tuple[int, int, int]] = []
    for i, span in enumerate(spans):
        if not isinstance(span, dict) or not {"start", "end", "label"} <= set(span):
            raise EdgeloraError(f"{where}: spans[{i}] must be an object with start, end and label")
        start, end, label = span["start"], span["end"], span["label"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise EdgeloraError(f"{where}: spans[{i}] start and end must be integers (character offsets)")
        if not 0 <= start < end <= len(text):
            raise EdgeloraError(f"{where}: spans[{i}] [{start}, {end}) lies outside the text of {len(text)} "
                                "characters (or is empty); fix its start and end")
        if not isinstance(label, str) or not label.strip() or label == OUTSIDE or tag_type(label)[0] != "":
            raise EdgeloraError(f"{where}: spans[{i}] label {label!r} must be an entity type such as \"room\" "
                                "(no B-/I- prefix, not \"O\")")
        for j, a, b in taken:
            if start < b and a < end:
                raise EdgeloraError(f"{where}: spans[{i}] overlaps spans[{j}]; entities must not overlap")
        taken.append((i, start, end))
        covered = [w for w, (a, b) in enumerate(word_spans) if a < end and start < b]
        if not covered:
            raise EdgeloraError(f"{where}: spans[{i}] covers no word of the text; fix its start and end")
        for k, w in enumerate(covered):
            if tags[w] != OUTSIDE:
                raise EdgeloraError(f"{where}: spans[{i}] shares a word with another span; entities must not overlap")
            tags[w] = ("B-" if k == 0 else "I-") + label
    return tags


def _example(record: Any, where: str) -> tuple[str, list[tuple[int, int]], list[str]]:
    if not isinstance(record, dict):
        raise EdgeloraError(f"{where}: expected a JSON object with tokens and tags, or text and spans")
    if "tokens" in record:
        return _tokens_example(record, where)
    if "text" not in record or "spans" not in record:
        raise EdgeloraError(f"{where}: missing fields; write {{\"tokens\": [...], \"tags\": [...]}} or "
                            "{\"text\": \"...\", \"spans\": [{\"start\", \"end\", \"label\"}]}")
    text = record["text"]
    if not isinstance(text, str) or not text.strip():
        raise EdgeloraError(f"{where}: 'text' must be a non-empty string")
    spans = words(text)
    return text, spans, spans_to_tags(text, spans, record["spans"], where)


def _read_jsonl(path: Path) -> list[tuple[str, list[tuple[int, int]], list[str], str]]:
    if not path.exists():
        raise EdgeloraError(f"{path}: no such file; check the path (or use builtin:slots)")
    if path.suffix.lower() != ".jsonl":
        raise EdgeloraError(f"{path}: token classification reads .jsonl (one JSON object per line), "
                            f"not {path.suffix or 'a file without extension'}")
    rows = []
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}, line {line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EdgeloraError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); write one JSON "
                                        "object per line") from None
                rows.append((*_example(record, where), where))
    except UnicodeDecodeError as e:
        raise EdgeloraError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    if not rows:
        raise EdgeloraError(f"{path}: file is empty (no examples); add one example per line")
    return rows


def _to_dataset(source: str, rows, label_names: Sequence[str] | None) -> TokenDataset:
    if label_names is None:
        found = {t for _, _, tags, _ in rows for t in tags}
        names = (OUTSIDE,) * (OUTSIDE in found) + tuple(sorted(found - {OUTSIDE}))
        if not found - {OUTSIDE}:
            raise EdgeloraError(f"{source}: no entity tags found (every word is O); tag some words")
        if len(names) < 2:
            names = (OUTSIDE, *names)
    else:
        names = tuple(label_names)
    index = {n: i for i, n in enumerate(names)}
    for _, _, tags, where in rows:
        for t in tags:
            if t not in index:
                raise EdgeloraError(f"{where}: tag {t!r} is not one of the training tags ({', '.join(names)}); "
                                    "fix the tag or add examples of it to the training data")
    return TokenDataset(tuple(r[0] for r in rows), tuple(tuple(r[1]) for r in rows),
                        tuple(tuple(index[t] for t in r[2]) for r in rows), names)


def _builtin(source: str) -> tuple[str, int | None]:
    from edgelora.data import parse_builtin_source

    return parse_builtin_source(source, BUILTIN_TASKS, "token-classification ")


def _generated(source: str, records: list[dict]) -> list:
    rows = []
    for i, record in enumerate(records):
        rows.append((*_example(record, f"{source}, example {i + 1}"), f"{source}, example {i + 1}"))
    return rows


def load_token_dataset(source: str | Path, *, label_names: Sequence[str] | None = None,
                       seed: int = 0) -> TokenDataset:
    """A `.jsonl` file of {"tokens", "tags"} or {"text", "spans"} lines, or `builtin:slots[:N]`.

    Pass the training set's `label_names` to load an evaluation set against them (an unseen tag is refused).
    Example: `load_token_dataset("ner.jsonl")`.
    """
    if isinstance(source, str) and source.startswith("builtin:"):
        _, n = _builtin(source)
        return _to_dataset(source, _generated(source, generate_slots(n or DEFAULT_BUILTIN_SIZE, seed)),
                           label_names or SLOT_TAGS)
    path = Path(source)
    return _to_dataset(str(path), _read_jsonl(path), label_names)


def load_token_splits(train: str | Path, eval: str | Path | None = None, seed: int = 0,
                      eval_fraction: float = 0.2) -> tuple[TokenDataset, TokenDataset]:
    """Train and eval sets: `builtin:slots:N` holds `eval_fraction` of N out from its held-out stream, a file
    without `eval` gets a seeded random split; eval tags are checked against the train tags."""
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    if isinstance(train, str) and train.startswith("builtin:") and eval is None:
        _, n = _builtin(train)
        total = n or DEFAULT_BUILTIN_SIZE
        n_eval = max(1, round(total * eval_fraction))
        if total - n_eval < 1:
            raise EdgeloraError(f"{train}: {total} examples leave none to train on; ask for more")
        records = generate_slots(total - n_eval, seed)
        held = generate_slots(n_eval, seed, "heldout", exclude=[r["text"] for r in records])
        train_ds = _to_dataset(train, _generated(train, records), SLOT_TAGS)
        return train_ds, _to_dataset(train, _generated(train, held), train_ds.label_names)
    train_ds = load_token_dataset(train, seed=seed)
    if eval is not None:
        return train_ds, load_token_dataset(eval, label_names=train_ds.label_names, seed=seed + 1)
    order = list(range(len(train_ds)))
    random.Random(f"edgelora/token-split/{seed}").shuffle(order)
    n_eval = round(len(order) * eval_fraction)
    if n_eval < 1 or n_eval >= len(order):
        raise EdgeloraError(f"{train}: {len(order)} examples are too few to hold out {eval_fraction:.0%}; add "
                            "examples or pass an eval file")
    return _subset(train_ds, order[n_eval:]), _subset(train_ds, order[:n_eval])


def _subset(ds: TokenDataset, idx: Sequence[int]) -> TokenDataset:
    return TokenDataset(tuple(ds.texts[i] for i in idx), tuple(ds.spans[i] for i in idx),
                        tuple(ds.tags[i] for i in idx), ds.label_names)


# --- to sub-tokens ---------------------------------------------------------------------------------------
def encode_tagged(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]],
                  tags: Sequence[Sequence[int]] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, list[list[int]]]:
    """(int64 feeds [batch, seq], sub-token labels [batch, seq], each word's first sub-token or -1).

    Labels: a word's tag on its first sub-token, IGNORE_INDEX elsewhere (or everywhere without `tags`).
    """
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    firsts = []
    for row, enc in enumerate(encodings):
        first = first_subtokens(enc.offsets, enc.special_tokens_mask, spans[row])
        firsts.append(first)
        if tags is not None:
            for word, token in enumerate(first):
                if token >= 0:
                    labels[row, token] = tags[row][word]
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return feeds, labels, firsts
