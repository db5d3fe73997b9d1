"""Token classification's words and entities, shared by training and the runtime (no torch).

A text is cut into words (`words`: runs of letters and digits, joined across inner '.', ',', ':', apostrophes
and hyphens so "21.5" and "living-room" stay one word, or a single other symbol). A model predicts one tag per
word from the word's first sub-token (`first_subtokens`); tags are BIO ("B-room", "I-room", "O") or plain
("room", "O"), and `entity_spans` merges them into labelled character spans. `entity_f1` scores predicted
tags against gold ones by exact span match, as seqeval's default mode does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OUTSIDE = "O"
WORD = re.compile(r"\w+(?:[.,:'\u2019-]\w+)*|[^\w\s]")


def words(text: str) -> list[tuple[int, int]]:
    """The character spans [start, end) of the words of `text`, in order."""
    return [m.span() for m in WORD.finditer(text)]


def tag_type(tag: str) -> tuple[str, str | None]:
    """("B" | "I" | "" , entity type) of a tag; ("O", None) outside. A plain tag ("room") is ("", "room")."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    return "", tag


def chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each entity in a tag sequence.

    B-X starts an entity; I-X or plain X continues the entity before it when that is an X, else starts one
    (seqeval's default reading of a stray I-X); O ends it.
    """
    out: list[tuple[str, int, int]] = []
    current: list = []  # [type, start] of the open entity
    for i, tag in enumerate(tags):
        prefix, kind = tag_type(tag)
        if kind is not None and prefix != "B" and current and current[0] == kind:
            continue
        if current:
            out.append((current[0], current[1], i))
            current = []
        if kind is not None:
            current = [kind, i]
    if current:
        out.append((current[0], current[1], len(tags)))
    return out


def first_subtokens(offsets: Sequence[tuple[int, int]], special: Sequence[int],
                    spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each word span, the index of its first sub-token (-1 when truncation dropped the word).

    A sub-token belongs to the word containing its first character; special tokens and padding (offsets
    (0, 0)) belong to none.
    """
    first = [-1] * len(spans)
    w = 0
    for i, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special or end <= start:
            continue
        while w < len(spans) and spans[w][1] <= start:
            w += 1
        if w == len(spans):
            break
        if spans[w][0] <= start < spans[w][1] and first[w] < 0:
            first[w] = i
    return first


def entity_spans(text: str, spans: Sequence[tuple[int, int]], tags: Sequence[str],
                 scores: Sequence[float] | None = None) -> list[dict]:
    """Entities of one text from its words' tags: {"label", "start", "end", "text", "score"} with character
    offsets into `text`; the score is the mean of its words' tag probabilities (1.0 without `scores`)."""
    out = []
    for kind, a, b in chunks(tags):
        start, end = spans[a][0], spans[b - 1][1]
        score = 1.0 if scores is None else float(sum(scores[a:b]) / (b - a))
        out.append({"label": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return out


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (micro over all entities): an entity counts as found only when
    a predicted one has the same type and the same first and last word. Empty predictions and no gold: 0."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted")
    n_gold = n_pred = correct = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sequence {i}: {len(g)} gold tags but {len(p)} predicted")
        g_set, p_set = set(chunks(g)), set(chunks(p))
        n_gold, n_pred, correct = n_gold + len(g_set), n_pred + len(p_set), correct + len(g_set & p_set)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold": n_gold, "predicted": n_pred,
            "correct": correct}
