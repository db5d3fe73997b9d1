"""Generation data for causal-LM adapters: JSONL rows, chat formatting, and the loss mask.

A row is `{"prompt": ..., "completion": ...}` or `{"messages": [{"role": ..., "content": ...}, ...]}`. With a
base whose tokenizer has a chat template (an instruct model such as SmolLM2), both forms are rendered with that
template: a prompt/completion row becomes one user turn and one assistant turn, because the runtime renders the
same template around a prompt at inference, and a model must be trained on what it will be shown. A base
without a chat template takes prompt/completion rows as plain text, prompt + completion + end-of-sequence
token. Only the assistant turns (the completion) and the end-of-turn token after each carry a loss, so the
model learns to answer and then to stop; every other token is labelled IGNORE_INDEX.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelora import generation_tasks
from edgelora.causal_lm import IGNORE_INDEX
from edgelora.errors import EdgeloraError

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_LENGTH = 256  # tokens per training row; longer rows are cut at the end and counted


@dataclass(frozen=True)
class ChatExample:
    """One conversation: (role, content) turns, the last one the assistant's answer to score at evaluation."""

    messages: tuple[tuple[str, str], ...]

    @classmethod
    def from_prompt(cls, prompt: str, completion: str) -> ChatExample:
        return cls((("user", prompt), ("assistant", completion)))

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The turns before the final answer, as the runtime's `generate(messages)` takes them."""
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    @property
    def reference(self) -> str:
        """The final assistant turn: the answer generation is scored against."""
        return self.messages[-1][1]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def parse_row(row: Any, where: str) -> ChatExample:
    """One JSONL row as a `ChatExample`; `where` ("file:line") starts every error."""
    if not isinstance(row, dict):
        raise EdgeloraError(f"{where}: expected a JSON object with \"prompt\"/\"completion\" or \"messages\", "
                            f"got {type(row).__name__}")
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise EdgeloraError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise EdgeloraError(f"{where}: messages[{i}] must be an object with a string \"content\"")
            if turn.get("role") not in ROLES:
                raise EdgeloraError(f"{where}: messages[{i}] has role {turn.get('role')!r}; use one of {', '.join(ROLES)}")
            messages.append((turn["role"], turn["content"]))
        if messages[-1][0] != "assistant" or not messages[-1][1].strip():
            raise EdgeloraError(f"{where}: the last message must be a non-empty assistant turn (the answer to learn)")
        return ChatExample(tuple(messages))
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise EdgeloraError(f"{where}: \"prompt\" and \"completion\" must both be strings")
        if not completion.strip():
            raise EdgeloraError(f"{where}: \"completion\" is empty; there is nothing to learn from this row")
        return ChatExample.from_prompt(prompt, completion)
    raise EdgeloraError(f"{where}: row has neither \"messages\" nor \"prompt\"/\"completion\" (keys: "
                        f"{', '.join(sorted(row)) or 'none'})")


def read_jsonl(path: str | Path) -> list[ChatExample]:
    """All rows of a JSONL file (blank lines skipped), each error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"{path}: no such file; give a JSONL file of prompt/completion or messages rows, "
                            "or builtin:home-json:N / builtin:meeting:N")
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise EdgeloraError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EdgeloraError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(parse_row(row, f"{path}:{number}"))
    if not examples:
        raise EdgeloraError(f"{path}: no rows; write one JSON object per line")
    return examples


def load_splits(train: str | Path, eval: str | Path | None = None, seed: int = 0, eval_fraction: float = 0.2
                ) -> tuple[list[ChatExample], list[ChatExample]]:
    """Training and held-out rows from JSONL files or `builtin:TASK[:N]` (`edgelora.generation_tasks`).

    A builtin train source with no eval source makes N rows in all, `eval_fraction` of them held out and drawn
    from the task's held-out stream (new phrasings, no prompt shared with the train rows). A file with no eval
    source keeps a seeded `eval_fraction` of its rows for evaluation.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    if _is_builtin(train):
        name, n = generation_tasks.parse_builtin(train)
        if eval is None:
            n_eval = max(1, round(n * eval_fraction))
            if n - n_eval < 1:
                raise EdgeloraError(f"{train}: {n} rows leave none to train on after holding out {n_eval}; ask for more")
            n, eval_n = n - n_eval, n_eval
        pairs = generation_tasks.make_pairs(name, n, seed, "train")
        train_rows = [ChatExample.from_prompt(p, c) for p, c in pairs]
        if eval is None:
            held = generation_tasks.make_pairs(name, eval_n, seed, "eval", exclude={p for p, _ in pairs})
            return train_rows, [ChatExample.from_prompt(p, c) for p, c in held]
    else:
        train_rows = read_jsonl(train)
        if eval is None:
            if len(train_rows) < 2:
                raise EdgeloraError(f"{train}: {len(train_rows)} row cannot be split into train and held-out; "
                                    "give more rows or an eval file")
            order = random.Random(f"edgelora/causal-split/{seed}").sample(range(len(train_rows)), len(train_rows))
            n_eval = min(len(train_rows) - 1, max(1, round(len(train_rows) * eval_fraction)))
            held = set(order[:n_eval])
            return ([r for i, r in enumerate(train_rows) if i not in held],
                    [r for i, r in enumerate(train_rows) if i in held])
    if _is_builtin(eval):
        name, n = generation_tasks.parse_builtin(eval)
        seen = {r.messages[0][1] for r in train_rows if len(r.messages) == 2}
        held = generation_tasks.make_pairs(name, n, seed, "eval", exclude=seen)
        return train_rows, [ChatExample.from_prompt(p, c) for p, c in held]
    return train_rows, read_jsonl(eval)


def _is_builtin(source: str | Path | None) -> bool:
    return isinstance(source, str) and source.startswith("builtin:")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class TokenizedRows:
    """Token ids and labels (IGNORE_INDEX outside the answers) of each row, after truncation.

    Args:
        truncated: rows cut at `max_length` (their tail is lost, labels included).
        dropped: rows left with no labelled token after the cut; they are not in `input_ids`.
    """

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[tuple[int, ...], ...]
    truncated: int
    dropped: int
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def render(tokenizer, example: ChatExample) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, character spans of the answers, special tokens included in the text): what the model reads.

    With a chat template each assistant turn's span runs from its content to the end of the turn's text before
    the next turn; the end-of-turn token is the first token after the content, which `encode_example` labels.
    """
    if has_chat_template(tokenizer):
        spans = []
        turns = example.as_dicts()
        for i, (role, content) in enumerate(example.messages):
            if role != "assistant":
                continue
            before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
            start = upto.find(content, len(before)) if before and upto.startswith(before) else -1
            if start < 0:
                raise EdgeloraError("the tokenizer's chat template does not render an assistant turn after the prompt "
                                    "(it is not a prefix of the whole chat); give the base a standard chat template")
            spans.append((start, start + len(content)))
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        return text, spans, True
    if [role for role, _ in example.messages] != ["user", "assistant"]:
        raise EdgeloraError("this base's tokenizer has no chat template, so only prompt/completion rows (one user turn "
                            "and one answer) can be rendered; give a chat model or prompt/completion rows")
    if tokenizer.eos_token is None:
        raise EdgeloraError("this base's tokenizer has no end-of-sequence token to end a completion with; "
                            "give a tokenizer with eos_token")
    prompt, completion = example.messages[0][1], example.messages[-1][1]
    text = prompt + completion + tokenizer.eos_token
    return text, [(len(prompt), len(prompt) + len(completion))], False


def encode_example(tokenizer, example: ChatExample) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row, untruncated: labels are the ids inside the answers, plus the first token
    after each answer (the end-of-turn token), and IGNORE_INDEX everywhere else."""
    text, spans, templated = render(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not inside:
            continue
        for i in inside:
            labels[i] = ids[i]
        stop = inside[-1] + 1  # the end-of-turn (or end-of-sequence) token
        if stop < len(ids):
            labels[stop] = ids[stop]
    return ids, labels


def tokenize_examples(tokenizer, examples: Sequence[ChatExample], max_length: int = DEFAULT_MAX_LENGTH) -> TokenizedRows:
    """Encode every row and cut it at `max_length` tokens, counting the rows cut and those left with no answer."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise EdgeloraError(f"max_length={max_length!r} must be an integer >= 2 (tokens per training row)")
    all_ids, all_labels, truncated, dropped = [], [], 0, 0
    for example in examples:
        ids, labels = encode_example(tokenizer, example)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(y == IGNORE_INDEX for y in labels[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        all_ids.append(tuple(ids))
        all_labels.append(tuple(labels))
    return TokenizedRows(tuple(all_ids), tuple(all_labels), truncated, dropped, max_length)


def pad_id(tokenizer) -> int:
    """The id padding uses (never seen by the loss or attention): pad, else eos, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def collate(rows: TokenizedRows, index: Sequence[int], pad: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A right-padded batch of rows `index`: input_ids, attention_mask, labels (IGNORE_INDEX on padding)."""
    longest = max(len(rows.input_ids[i]) for i in index)
    ids = np.full((len(index), longest), pad, dtype=np.int64)
    labels = np.full((len(index), longest), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(index), longest), dtype=np.int64)
    for b, i in enumerate(index):
        n = len(rows.input_ids[i])
        ids[b, :n], labels[b, :n], mask[b, :n] = rows.input_ids[i], rows.labels[i], 1
    return {k: torch.from_numpy(v).to(device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}
