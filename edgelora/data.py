"""Text-classification datasets for adapter training: `Dataset`, JSONL/CSV loaders, splits, and the
`builtin:TASK[:N]` sources, whose synthetic examples come from `edgelora.synthetic_classification`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelora import synthetic_classification as synthetic
from edgelora.errors import EdgeloraError

BUILTIN_TASKS = synthetic.TASKS  # the `builtin:TASK` names
DEFAULT_BUILTIN_SIZE = 2000  # examples in `builtin:<task>` when no `:N` count is given
_EXTENSIONS = (".jsonl", ".csv")


@dataclass(frozen=True)
class Dataset:
    """Texts with integer labels; `label_names[i]` names class i."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise EdgeloraError(f"Dataset has {len(self.texts)} texts but {len(self.labels)} labels; they must pair up")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise EdgeloraError(f"Dataset label {bad[0]} is out of range for {len(self.label_names)} label names")

    def __len__(self) -> int:
        return len(self.texts)


def make_task(name: str, n: int, seed: int) -> Dataset:
    """Generate `n` distinct training examples of a builtin synthetic task (see BUILTIN_TASKS), the same for the
    same seed.

    Example: `make_task("intent", 2000, seed=0)`.
    """
    return Dataset(*synthetic.generate(name, n, seed))


def make_splits(name: str, n_train: int, n_eval: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train and held-out sets of a builtin task. The held-out set comes from its own seed stream, adds
    paraphrases the train set never uses, and shares no text with the train set."""
    train = make_task(name, n_train, seed)
    return train, Dataset(*synthetic.generate(name, n_eval, seed, "heldout", exclude=set(train.texts)))


def split_dataset(ds: Dataset, eval_fraction: float, seed: int, *, source: str = "dataset") -> tuple[Dataset, Dataset]:
    """Seeded stratified split; every class with 2+ examples lands in both halves, and an eval text that also
    occurs in train (a duplicate in the file) moves to train so the halves never share a text."""
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    rng = random.Random(f"edgelora/split/{seed}")
    eval_idx: set[int] = set()
    for c in range(len(ds.label_names)):
        idx = [i for i, y in enumerate(ds.labels) if y == c]
        rng.shuffle(idx)
        if len(idx) >= 2:
            eval_idx.update(idx[: min(len(idx) - 1, max(1, round(len(idx) * eval_fraction)))])
    train_texts = {ds.texts[i] for i in range(len(ds)) if i not in eval_idx}
    eval_idx = {i for i in eval_idx if ds.texts[i] not in train_texts}
    if not eval_idx:
        raise EdgeloraError(f"{source}: {len(ds)} examples are too few to hold out {eval_fraction:.0%}; add examples "
                            "or pass an eval file")
    order = list(range(len(ds)))
    rng.shuffle(order)
    return _subset(ds, [i for i in order if i not in eval_idx]), _subset(ds, [i for i in order if i in eval_idx])


def _subset(ds: Dataset, idx: Sequence[int]) -> Dataset:
    return Dataset(tuple(ds.texts[i] for i in idx), tuple(ds.labels[i] for i in idx), ds.label_names)


# --- loaders ---------------------------------------------------------------------------------------------
def parse_builtin_source(source: str, tasks: Sequence[str], kind: str = "") -> tuple[str, int | None]:
    """`builtin:TASK` or `builtin:TASK:N` -> (TASK, N or None), TASK one of `tasks`; `kind` ("generation ")
    names the family in the error."""
    parts = source.split(":")
    if len(parts) not in (2, 3) or parts[1] not in tasks:
        raise EdgeloraError(f"{source}: unknown builtin {kind}task; write builtin:TASK or builtin:TASK:N with TASK "
                            f"one of {', '.join(tasks)}")
    if len(parts) == 3 and not (parts[2].isdigit() and int(parts[2]) > 0):
        raise EdgeloraError(f"{source}: count {parts[2]!r} is not a positive integer; write e.g. builtin:{parts[1]}:2000")
    return parts[1], int(parts[2]) if len(parts) == 3 else None


def _parse_builtin(source: str) -> tuple[str, int | None]:
    """`builtin:intent` or `builtin:intent:N` -> (task, N or None)."""
    return parse_builtin_source(source, BUILTIN_TASKS)


def _read_rows(path: Path, text_field: str, label_field: str) -> list[tuple[str, Any, str]]:
    """(text, raw label, "path, line N") per example, checked for shape."""
    rows: list[tuple[str, Any, str]] = []
    fields = (text_field, label_field)
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for name in fields:
                if header and name not in header:
                    raise EdgeloraError(f"{path}, line 1: no column {name!r} in the header (columns: "
                                        f"{', '.join(map(str, header))}); rename the column or pass the field name")
            records = ((reader.line_num, row) for row in reader)
        else:
            records = ((i, _json_object(path, i, line)) for i, line in enumerate(f, 1) if line.strip())
        for line, record in records:
            where = f"{path}, line {line}"
            for name in fields:
                if record.get(name) is None:
                    raise EdgeloraError(f"{where}: missing field {name!r}; every example needs {text_field!r} and "
                                        f"{label_field!r} (or pass the field names the file uses)")
            text = record[text_field]
            if not isinstance(text, str):
                raise EdgeloraError(f"{where}: field {text_field!r} is {type(text).__name__}, not text; make it a string")
            if not text.strip():
                raise EdgeloraError(f"{where}: empty text in field {text_field!r}; fill it in or remove the line")
            rows.append((text.strip(), record[label_field], where))
    if not rows:
        raise EdgeloraError(f"{path}: file is empty (no examples); add one example per "
                            f"{'row below a header' if path.suffix.lower() == '.csv' else 'line'}")
    return rows


def _json_object(path: Path, line: int, raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EdgeloraError(f"{path}, line {line}: malformed JSON ({e.msg}, column {e.colno}); write one JSON object "
                            'per line, e.g. {"text": "...", "label": "..."}') from None
    if not isinstance(obj, dict):
        raise EdgeloraError(f"{path}, line {line}: expected a JSON object, got {type(obj).__name__}; write "
                            '{"text": "...", "label": "..."}')
    return obj


def _label_name(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise EdgeloraError(f"{where}: label {raw!r} is a {type(raw).__name__}; use a string or an integer")
    name = str(raw).strip()
    if not name:
        raise EdgeloraError(f"{where}: empty label; give every example a label")
    return name


def _sorted_names(names: Collection[str]) -> tuple[str, ...]:
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))  # "2" before "10"
    return tuple(sorted(names))


def _to_dataset(source: str, pairs: Sequence[tuple[str, str, str]], label_names: Sequence[str] | None) -> Dataset:
    """Map (text, label name, where) triples onto label indices, checking names against `label_names`."""
    if label_names is None:
        names = _sorted_names({n for _, n, _ in pairs})
        if len(names) < 2:
            raise EdgeloraError(f"{source}: only one class ({names[0]!r}) found; a classifier needs examples "
                                "of at least 2 labels")
    else:
        names = tuple(str(n) for n in label_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise EdgeloraError(f"{source}: label_names {list(names)} must be at least 2 distinct names")
    index = {n: i for i, n in enumerate(names)}
    for _, n, where in pairs:
        if n not in index:
            raise EdgeloraError(f"{where}: label {n!r} is not one of the training labels ({', '.join(names)}); "
                                "fix the label or add examples of it to the training data")
    return Dataset(tuple(t for t, _, _ in pairs), tuple(index[n] for _, n, _ in pairs), names)


def load_dataset(source: str | Path, *, text_field: str = "text", label_field: str = "label",
                 label_names: Sequence[str] | None = None, seed: int = 0) -> Dataset:
    """Load a `.jsonl` file (one object per line), a `.csv` file (header row) or `builtin:TASK[:N]`.

    Labels may be strings or integers (an integer reads as its decimal name, so 1 in JSONL and "1" in CSV are
    one class). Names sort alphabetically, or numerically when all are integers; pass the train split's
    `label_names` to load an eval split against them, which rejects unseen labels. `builtin:TASK:N` generates
    N examples (default DEFAULT_BUILTIN_SIZE) of a synthetic task with `seed`.

    Example: `load_dataset("reviews.csv", text_field="review", label_field="stars")`.
    """
    if isinstance(source, str) and source.startswith("builtin:"):
        name, n = _parse_builtin(source)
        ds = make_task(name, n or DEFAULT_BUILTIN_SIZE, seed)
        return ds if label_names is None else _to_dataset(source, _named(ds, source), label_names)
    path = Path(source)
    if not path.exists():
        raise EdgeloraError(f"{path}: no such file; check the path (or use builtin:{'/builtin:'.join(BUILTIN_TASKS)})")
    if path.is_dir():
        raise EdgeloraError(f"{path}: is a directory; pass a .jsonl or .csv file")
    if path.suffix.lower() not in _EXTENSIONS:
        raise EdgeloraError(f"{path}: unknown extension {path.suffix or '(none)'!r}; use .jsonl (one JSON object per "
                            "line) or .csv (with a header row)")
    try:
        rows = _read_rows(path, text_field, label_field)
    except UnicodeDecodeError as e:
        raise EdgeloraError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except csv.Error as e:
        raise EdgeloraError(f"{path}: malformed CSV ({e}); check the quoting") from None
    except OSError as e:
        raise EdgeloraError(f"{path}: cannot read the file ({e.strerror}); check its permissions") from None
    return _to_dataset(str(path), [(t, _label_name(y, w), w) for t, y, w in rows], label_names)


def _named(ds: Dataset, source: str) -> list[tuple[str, str, str]]:
    return [(t, ds.label_names[y], f"{source}, example {i + 1}") for i, (t, y) in enumerate(zip(ds.texts, ds.labels))]


def load_splits(train: str | Path, eval: str | Path | None = None, seed: int = 0, eval_fraction: float = 0.2, *,
                text_field: str = "text", label_field: str = "label") -> tuple[Dataset, Dataset]:
    """Train and eval datasets, with the eval labels checked against the train labels.

    `builtin:TASK:N` with no eval source generates N examples in all, `eval_fraction` of them held out from a
    separate seed stream; a file with no eval source gets a seeded stratified split; an eval source that is a
    builtin generates held-out texts absent from the train set.

    Example: `train_ds, eval_ds = load_splits("builtin:intent:2500", seed=0)`.
    """
    fields = {"text_field": text_field, "label_field": label_field}
    if not 0.0 < eval_fraction < 1.0:
        raise EdgeloraError(f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.2")
    if isinstance(train, str) and train.startswith("builtin:") and eval is None:
        name, n = _parse_builtin(train)
        total = n or DEFAULT_BUILTIN_SIZE
        n_eval = max(1, round(total * eval_fraction))
        if total - n_eval < 1:
            raise EdgeloraError(f"{train}: {total} examples leave none to train on; ask for more")
        return make_splits(name, total - n_eval, n_eval, seed)
    train_ds = load_dataset(train, seed=seed, **fields)
    if eval is None:
        return split_dataset(train_ds, eval_fraction, seed, source=str(train))
    if isinstance(eval, str) and eval.startswith("builtin:"):
        name, n = _parse_builtin(eval)
        heldout = Dataset(*synthetic.generate(name, n or round(DEFAULT_BUILTIN_SIZE * eval_fraction), seed, "heldout",
                                              exclude=set(train_ds.texts)))
        return train_ds, _to_dataset(eval, _named(heldout, eval), train_ds.label_names)
    return train_ds, load_dataset(eval, label_names=train_ds.label_names, **fields)


def save_dataset(ds: Dataset, path: str | Path) -> None:
    """Write `ds` as `.jsonl` or `.csv` with string labels (via a temporary file, so a failure keeps the old file)."""
    path = Path(path)
    if path.suffix.lower() not in _EXTENSIONS:
        raise EdgeloraError(f"{path}: unknown extension {path.suffix or '(none)'!r}; save as .jsonl or .csv")
    if not path.parent.is_dir():
        raise EdgeloraError(f"{path}: folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if path.suffix.lower() == ".csv":
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows((t, ds.label_names[y]) for t, y in zip(ds.texts, ds.labels))
            else:
                f.writelines(json.dumps({"text": t, "label": ds.label_names[y]}) + "\n"
                             for t, y in zip(ds.texts, ds.labels))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
