"""Datasets: the synthetic tasks are seeded, balanced, held out cleanly and not keyword-trivial; the loaders
round-trip JSONL/CSV and stop every user mistake with one EdgeloraError line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgelora.data import (
    BUILTIN_TASKS,
    Dataset,
    load_dataset,
    load_splits,
    make_splits,
    make_task,
    save_dataset,
    split_dataset,
)
from edgelora.errors import EdgeloraError
from edgelora.synthetic_classification import MAX_WORDS, MIN_WORDS

# A keyword model at or above this would mean the task is solvable without reading word order or negation.
KEYWORD_CEILING = 0.97
# Above chance by this margin, so the labels carry signal a model can learn.
CHANCE_MARGIN = 0.1


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def naive_bayes_accuracy(train: Dataset, test: Dataset) -> float:
    """Multinomial Naive Bayes on bags of words (add-one smoothing): the keyword baseline."""
    vocab = {w: i for i, w in enumerate(sorted({w for t in train.texts for w in _tokens(t)}))}
    counts = np.ones((len(train.label_names), len(vocab)))
    for text, y in zip(train.texts, train.labels):
        for w in _tokens(text):
            counts[y, vocab[w]] += 1
    log_word = np.log(counts / counts.sum(axis=1, keepdims=True))
    log_prior = np.log(np.bincount(train.labels, minlength=len(train.label_names)) / len(train))
    hits = 0
    for text, y in zip(test.texts, test.labels):
        idx = [vocab[w] for w in _tokens(text) if w in vocab]
        hits += int(np.argmax(log_prior + log_word[:, idx].sum(axis=1)) == y)
    return hits / len(test)


# --- synthetic tasks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_generator_is_deterministic_per_seed_and_differs_across_seeds(name: str) -> None:
    assert make_task(name, 300, seed=0) == make_task(name, 300, seed=0)
    assert make_task(name, 300, seed=0).texts != make_task(name, 300, seed=1).texts


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_every_label_present_balanced_and_texts_well_formed(name: str) -> None:
    ds = make_task(name, 400, seed=3)
    counts = np.bincount(ds.labels, minlength=len(ds.label_names))
    assert len(ds) == 400 and counts.min() >= 400 // len(ds.label_names)
    assert len(set(ds.texts)) == len(ds)
    for text in ds.texts:
        assert MIN_WORDS <= len(text.split()) <= MAX_WORDS, text
        assert "{" not in text and "~" not in text and "^" not in text, text


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_heldout_is_disjoint_from_train_and_deterministic(name: str) -> None:
    train, heldout = make_splits(name, 1000, 300, seed=0)
    assert (len(train), len(heldout)) == (1000, 300)
    assert not set(train.texts) & set(heldout.texts)
    assert train.label_names == heldout.label_names
    assert set(heldout.labels) == set(range(len(heldout.label_names)))
    assert make_splits(name, 1000, 300, seed=0) == (train, heldout)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_heldout_adds_wording_train_never_shows(name: str) -> None:
    train, heldout = make_splits(name, 3000, 500, seed=0)
    train_vocab = {w for t in train.texts for w in _tokens(t)}
    unseen = [t for t in heldout.texts if set(_tokens(t)) - train_vocab]
    assert 0.05 * len(heldout) < len(unseen) < 0.8 * len(heldout)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_keyword_baseline_is_not_enough(name: str) -> None:
    train, heldout = make_splits(name, 2000, 500, seed=0)
    accuracy = naive_bayes_accuracy(train, heldout)
    chance = 1 / len(train.label_names)
    assert chance + CHANCE_MARGIN < accuracy < KEYWORD_CEILING, f"{name}: bag-of-words accuracy {accuracy:.3f}"


def test_hard_cases_carry_the_meaning() -> None:
    # Spot checks of the constructions that defeat keywords: a correction keeps its last command, and a review
    # whose only rating word is negated takes the opposite label.
    intent = make_task("intent", 3000, seed=0)
    label = dict(zip(intent.texts, (intent.label_names[y] for y in intent.labels)))
    for pattern, expected in ((r" off, no wait, on$", "lights_on"), (r" on, no wait, off$", "lights_off")):
        corrected = [t for t in label if re.search(pattern, t)]
        assert corrected and all(label[t] == expected for t in corrected)
    sentiment = make_task("sentiment", 3000, seed=0)
    names = dict(zip(sentiment.texts, (sentiment.label_names[y] for y in sentiment.labels)))
    negated = [t for t in names if re.search(r"is not (terrible|awful|horrible) at all$", t)]
    assert negated and all(names[t] == "positive" for t in negated)


def test_make_task_rejects_bad_arguments() -> None:
    with pytest.raises(EdgeloraError, match="unknown builtin task 'weather'"):
        make_task("weather", 10, seed=0)
    with pytest.raises(EdgeloraError, match="positive integer"):
        make_task("intent", 0, seed=0)


# --- loaders ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    ds = make_task("sentiment", 50, seed=0)
    ds = Dataset(ds.texts[:-1] + ('a "quoted", comma text', ), ds.labels, ds.label_names)
    save_dataset(ds, tmp_path / f"reviews{suffix}")
    assert load_dataset(tmp_path / f"reviews{suffix}") == ds
    assert [p.name for p in tmp_path.iterdir()] == [f"reviews{suffix}"]  # no temporary file left behind


def test_integer_labels_and_custom_fields(tmp_path: Path) -> None:
    rows = [{"review": "fine", "stars": 10}, {"review": "bad", "stars": 2}, {"review": "okay", "stars": 2}]
    path = tmp_path / "stars.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_dataset(path, text_field="review", label_field="stars")
    assert ds.label_names == ("2", "10")  # integer names sort numerically
    assert ds.labels == (1, 0, 0)
    csv_path = tmp_path / "stars.csv"
    csv_path.write_text("review,stars\nfine,10\nbad,2\nokay,2\n")
    assert load_dataset(csv_path, text_field="review", label_field="stars") == ds


def test_label_names_fix_the_order(tmp_path: Path) -> None:
    path = tmp_path / "eval.csv"
    path.write_text("text,label\ngreat,positive\nawful,negative\n")
    ds = load_dataset(path, label_names=["positive", "negative", "neutral"])
    assert ds.labels == (0, 1) and ds.label_names == ("positive", "negative", "neutral")


def test_builtin_source(tmp_path: Path) -> None:
    assert load_dataset("builtin:intent:40", seed=2) == make_task("intent", 40, seed=2)
    assert len(load_dataset("builtin:sentiment")) == 2000


def test_load_splits_builtin() -> None:
    train, heldout = load_splits("builtin:intent:500", None, seed=1)
    assert (len(train), len(heldout)) == (400, 100)
    assert not set(train.texts) & set(heldout.texts)
    train2, heldout2 = load_splits("builtin:intent:500", "builtin:intent:80", seed=1)
    assert len(train2) == 500 and len(heldout2) == 80 and not set(train2.texts) & set(heldout2.texts)


def test_load_splits_file_is_stratified_and_disjoint(tmp_path: Path) -> None:
    ds = make_task("intent", 200, seed=0)
    path = tmp_path / "train.jsonl"
    save_dataset(ds, path)
    train, heldout = load_splits(str(path), None, seed=0, eval_fraction=0.2)
    assert (len(train), len(heldout)) == (160, 40)
    assert not set(train.texts) & set(heldout.texts)
    assert set(heldout.labels) == set(train.labels) == set(range(len(ds.label_names)))
    assert load_splits(str(path), None, seed=0, eval_fraction=0.2) == (train, heldout)
    assert load_splits(str(path), None, seed=1, eval_fraction=0.2)[1] != heldout


def test_load_splits_with_eval_file_uses_train_labels(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nyes,b\nno,a\nmaybe,c\n")
    (tmp_path / "eval.csv").write_text("text,label\nsure,c\n")
    train, heldout = load_splits(str(tmp_path / "train.csv"), str(tmp_path / "eval.csv"))
    assert heldout.label_names == train.label_names == ("a", "b", "c") and heldout.labels == (2,)


def test_split_keeps_duplicates_on_one_side() -> None:
    ds = Dataset(("same",) * 6 + ("x", "y", "z", "w"), (0,) * 6 + (1, 1, 1, 1), ("a", "b"))
    train, heldout = split_dataset(ds, 0.5, seed=0)
    assert "same" not in heldout.texts and len(train) + len(heldout) == len(ds)


# --- errors: one line naming the file, the problem and the fix ------------------------------------------
ERROR_CASES = {
    "missing.jsonl": (None, r"missing\.jsonl: no such file"),
    "data.txt": ("text,label\n", r"data\.txt: unknown extension '\.txt'; use \.jsonl"),
    "empty.jsonl": ("\n\n", r"empty\.jsonl: file is empty"),
    "empty.csv": ("", r"empty\.csv: file is empty"),
    "header_only.csv": ("text,label\n", r"header_only\.csv: file is empty"),
    "broken.jsonl": ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', r"broken\.jsonl, line 2: malformed JSON"),
    "list.jsonl": ('["a", "x"]\n', r"list\.jsonl, line 1: expected a JSON object"),
    "no_text.jsonl": ('{"text": "a", "label": "x"}\n\n{"txt": "b", "label": "y"}\n',
                      r"no_text\.jsonl, line 3: missing field 'text'"),
    "no_label.jsonl": ('{"text": "a"}\n', r"no_label\.jsonl, line 1: missing field 'label'"),
    "no_column.csv": ("sentence,label\na,x\n", r"no_column\.csv, line 1: no column 'text' in the header \(columns: "
                                               r"sentence, label\)"),
    "short_row.csv": ("text,label\na,x\nb\n", r"short_row\.csv, line 3: missing field 'label'"),
    "empty_text.csv": ("text,label\na,x\n  ,y\n", r"empty_text\.csv, line 3: empty text in field 'text'"),
    "number_text.jsonl": ('{"text": 5, "label": "x"}\n', r"line 1: field 'text' is int, not text"),
    "float_label.jsonl": ('{"text": "a", "label": 0.5}\n', r"line 1: label 0\.5 is a float; use a string or an integer"),
    "one_class.csv": ("text,label\na,x\nb,x\n", r"one_class\.csv: only one class \('x'\) found; .* at least 2 labels"),
    "latin1.csv": (b"text,label\ncaf\xe9,x\n", r"latin1\.csv: not UTF-8 text"),
}


@pytest.mark.parametrize("filename", ERROR_CASES)
def test_bad_file_raises_one_line(tmp_path: Path, filename: str) -> None:
    content, pattern = ERROR_CASES[filename]
    path = tmp_path / filename
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(EdgeloraError, match=pattern) as err:
        load_dataset(path)
    assert "\n" not in str(err.value)


def test_directory_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match="is a directory"):
        load_dataset(tmp_path)


def test_save_rejects_bad_paths(tmp_path: Path) -> None:
    ds = make_task("intent", 10, seed=0)
    with pytest.raises(EdgeloraError, match=r"data\.txt: unknown extension"):
        save_dataset(ds, tmp_path / "data.txt")
    with pytest.raises(EdgeloraError, match=r"folder .*nowhere does not exist"):
        save_dataset(ds, tmp_path / "nowhere" / "data.jsonl")


def test_eval_label_unseen_in_train(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "eval.jsonl").write_text('{"text": "c", "label": "y"}\n{"text": "d", "label": "z"}\n')
    with pytest.raises(EdgeloraError, match=r"eval\.jsonl, line 2: label 'z' is not one of the training labels \(x, y\)"):
        load_splits(str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl"))
    with pytest.raises(EdgeloraError, match=r"builtin:intent:20, example \d+: label '\w+' is not one of the training"):
        load_splits(str(tmp_path / "train.jsonl"), "builtin:intent:20")


@pytest.mark.parametrize(
    ("source", "pattern"),
    [("builtin:weather", r"builtin:weather: unknown builtin task"),
     ("builtin:intent:many", r"builtin:intent:many: count 'many' is not a positive integer"),
     ("builtin:intent:0", r"count '0' is not a positive integer")],
)
def test_bad_builtin_source(source: str, pattern: str) -> None:
    with pytest.raises(EdgeloraError, match=pattern):
        load_dataset(source)


def test_bad_eval_fraction_and_too_few_examples(tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"eval_fraction=1\.5 must lie strictly between 0 and 1"):
        load_splits("builtin:intent:100", None, eval_fraction=1.5)
    (tmp_path / "tiny.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(EdgeloraError, match=r"tiny\.csv: 2 examples are too few to hold out"):
        load_splits(str(tmp_path / "tiny.csv"), None)
