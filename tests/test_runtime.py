"""Runtime against numpy references on tiny hand-built bundles (tests/tiny_bundle.py), and every bad
bundle's one-line error."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tiny_bundle import (ATOL, HIDDEN, MAX_LENGTH, TEXTS, Tiny, make_bundle, reference, write_adapter,
                         write_manifest)

from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime, detect_isa
from edgelora.runtime.bundle import FORMAT_VERSION


@pytest.fixture
def merged(tmp_path: Path) -> Tiny:
    return make_bundle(tmp_path, "merged")


@pytest.fixture
def switchable(tmp_path: Path) -> Tiny:
    return make_bundle(tmp_path, "switchable")


def edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


# -- results --------------------------------------------------------------------------------------


def test_merged_run_matches_numpy_reference(merged: Tiny) -> None:
    rt = Runtime(merged.path, intra_op_threads=1)
    out = rt.run(TEXTS)
    logits, pooled = reference(merged, TEXTS, None)
    np.testing.assert_allclose(out["logits"], logits, atol=ATOL)
    np.testing.assert_allclose(out["embeddings"], pooled, atol=ATOL)
    np.testing.assert_allclose(rt.run(TEXTS, adapter="sentiment")["logits"], logits, atol=ATOL)
    assert rt.adapters == ("sentiment",) and rt.labels() == ("neg", "pos")


def test_tokenize_truncates_and_pads_to_longest(merged: Tiny) -> None:
    rt = Runtime(merged.path, intra_op_threads=1)
    short = rt.tokenize(["good", "a film"])
    assert short["input_ids"].shape == (2, 2) and short["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(short["attention_mask"], [[1, 0], [1, 1]])
    assert rt.tokenize(TEXTS)["input_ids"].shape == (3, MAX_LENGTH)


def test_feeds_give_the_same_result_as_texts(merged: Tiny) -> None:
    rt = Runtime(merged.path, intra_op_threads=1)
    feeds = rt.tokenize(TEXTS)
    np.testing.assert_array_equal(rt.run(feeds)["logits"], rt.run(TEXTS)["logits"])
    no_mask = {"input_ids": feeds["input_ids"][1:2].astype(np.int32)}  # the unpadded row; mask defaults to ones
    np.testing.assert_allclose(rt.run(no_mask)["logits"], rt.run(TEXTS[1:2])["logits"], atol=ATOL)


def test_predict_gives_softmax_over_labels(merged: Tiny) -> None:
    preds = Runtime(merged.path, intra_op_threads=1).predict(TEXTS)
    logits, _ = reference(merged, TEXTS, None)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for pred, row in zip(preds, p):
        assert pred["label"] == ["neg", "pos"][row.argmax()]
        assert pred["score"] == pytest.approx(row.max(), abs=ATOL)
        assert set(pred["scores"]) == {"neg", "pos"}


def test_switchable_without_adapter_is_the_plain_base(switchable: Tiny) -> None:
    rt = Runtime(switchable.path, intra_op_threads=1)
    out = rt.run(TEXTS)
    assert out["logits"].shape == (len(TEXTS), 0)
    np.testing.assert_allclose(out["embeddings"], reference(switchable, TEXTS, None)[1], atol=ATOL)
    assert rt.labels() == ()


def test_switchable_each_adapter_matches_its_reference(switchable: Tiny) -> None:
    rt = Runtime(switchable.path, intra_op_threads=1)
    assert rt.adapters == ("sentiment", "topic")
    for name in rt.adapters:
        np.testing.assert_allclose(rt.run(TEXTS, adapter=name)["logits"],
                                   reference(switchable, TEXTS, name)[0], atol=ATOL)
    assert rt.labels("topic") == ("art", "sport", "news")


def test_switching_back_and_forth_is_consistent(switchable: Tiny) -> None:
    rt = Runtime(switchable.path, intra_op_threads=1)
    first = {a: rt.run(TEXTS, adapter=a)["logits"] for a in (None, "sentiment", "topic")}
    for a in ["topic", None, "sentiment", "topic", "sentiment", None] * 2:
        np.testing.assert_array_equal(rt.run(TEXTS, adapter=a)["logits"], first[a])


def test_predict_with_one_adapter_per_row(switchable: Tiny) -> None:
    rt = Runtime(switchable.path, intra_op_threads=1)
    preds = rt.predict(TEXTS, adapters=["topic", "sentiment", "topic"], batch_size=1)
    assert [set(p["scores"]) for p in preds] == [{"art", "sport", "news"}, {"neg", "pos"}, {"art", "sport", "news"}]
    assert preds[1] == rt.predict(TEXTS[1], adapter="sentiment")[0]


def test_optimized_graph_is_cached_and_reused(switchable: Tiny) -> None:
    first = Runtime(switchable.path, intra_op_threads=1).run(TEXTS, adapter="topic")["logits"]
    cached = list((switchable.path / ".cache").glob("*.opt.onnx"))
    assert len(cached) == 1 and ort.__version__ in cached[0].name
    os.utime(cached[0], (1e10, 1e10))  # mark it; a reload must not rewrite it
    again = Runtime(switchable.path, intra_op_threads=1)
    assert cached[0].stat().st_mtime == 1e10
    np.testing.assert_array_equal(again.run(TEXTS, adapter="topic")["logits"], first)
    assert again.run(TEXTS)["logits"].shape == (len(TEXTS), 0)


def test_cache_of_a_replaced_model_is_dropped(merged: Tiny) -> None:
    Runtime(merged.path, intra_op_threads=1)
    (old,) = (merged.path / ".cache").glob("*.opt.onnx")
    other = make_bundle(merged.path.parent / "other", "merged", seed=1).path
    (other / "model.onnx").replace(merged.path / "model.onnx")
    write_manifest(merged.path, json.loads((merged.path / "manifest.json").read_text()))
    Runtime(merged.path, intra_op_threads=1)
    (new,) = (merged.path / ".cache").glob("*.opt.onnx")
    assert new.name != old.name


def test_damaged_cache_is_rebuilt(merged: Tiny) -> None:
    Runtime(merged.path, intra_op_threads=1)
    (cache,) = (merged.path / ".cache").glob("*.opt.onnx")
    cache.write_bytes(b"not a model")
    os.utime(cache, (1e10, 1e10))
    np.testing.assert_allclose(Runtime(merged.path, intra_op_threads=1).run(TEXTS)["logits"],
                               reference(merged, TEXTS, None)[0], atol=ATOL)
    assert cache.read_bytes() != b"not a model"


def test_read_only_bundle_runs_without_a_cache(merged: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr("edgelora.runtime.session.tempfile.mkstemp", refuse)  # chmod does not stop root
    np.testing.assert_allclose(Runtime(merged.path, intra_op_threads=1).run(TEXTS)["logits"],
                               reference(merged, TEXTS, None)[0], atol=ATOL)
    assert not list((merged.path / ".cache").glob("*"))


def test_no_cache_when_turned_off(merged: Tiny) -> None:
    Runtime(merged.path, intra_op_threads=1, optimized_cache=False)
    assert not (merged.path / ".cache").exists()


@pytest.mark.parametrize(("flags", "warns"), [("avx2", True), ("avx2 avx512f avx512bw avx512_vnni", False)])
def test_full_range_int8_on_a_saturating_cpu_warns(merged: Tiny, monkeypatch, flags: str, warns: bool) -> None:
    edit_manifest(merged.path, precision="int8", quantization={"weight_bits": 8, "scheme": "qdq", "isa": "amx"})
    fake = detect_isa(f"flags : {flags}\n", machine="x86_64")
    monkeypatch.setattr("edgelora.runtime.runtime.detect_isa", lambda: fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Runtime(merged.path, intra_op_threads=1)
    assert any("saturates" in str(w.message) for w in caught) is warns


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_adapter_lists_the_available_ones(switchable: Tiny, merged: Tiny) -> None:
    rt = Runtime(switchable.path, intra_op_threads=1)
    with pytest.raises(EdgeloraError, match=r"no adapter 'nope'; available: sentiment, topic"):
        rt.run(TEXTS, adapter="nope")
    with pytest.raises(EdgeloraError, match=r"available: sentiment, topic"):
        rt.labels("nope")
    with pytest.raises(EdgeloraError, match=r"merged bundle has adapter sentiment baked in, not 'topic'"):
        Runtime(merged.path, intra_op_threads=1).run(TEXTS, adapter="topic")


def test_missing_bundle_dir(tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"nowhere: bundle directory not found"):
        Runtime(tmp_path / "nowhere")


def test_missing_manifest(merged: Tiny) -> None:
    (merged.path / "manifest.json").unlink()
    with pytest.raises(EdgeloraError, match=r"manifest\.json: missing; this is not an edgelora bundle"):
        Runtime(merged.path)


def test_manifest_not_json(merged: Tiny) -> None:
    (merged.path / "manifest.json").write_text("{oops")
    with pytest.raises(EdgeloraError, match=r"manifest\.json: not valid JSON"):
        Runtime(merged.path)


def test_foreign_format(merged: Tiny) -> None:
    edit_manifest(merged.path, format="something-else")
    with pytest.raises(EdgeloraError, match=r"manifest\.json: format is 'something-else', not 'edgelora-bundle'"):
        Runtime(merged.path)


def test_newer_format_version(merged: Tiny) -> None:
    edit_manifest(merged.path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(EdgeloraError, match=r"manifest\.json: written by a newer edgelora .*; upgrade edgelora"):
        Runtime(merged.path)


def test_tampered_file_is_refused(switchable: Tiny) -> None:
    path = switchable.path / "adapters" / "topic.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EdgeloraError, match=r"topic\.onnx_adapter: sha256 does not match manifest\.json"):
        Runtime(switchable.path)


def test_missing_listed_file(merged: Tiny) -> None:
    (merged.path / "tokenizer.json").unlink()
    with pytest.raises(EdgeloraError, match=r"tokenizer\.json: missing \(listed in manifest\.json\)"):
        Runtime(merged.path)


def test_corrupt_model_is_refused_with_one_line(merged: Tiny) -> None:
    (merged.path / "model.onnx").write_bytes(b"\x08\x01garbage" * 10)
    write_manifest(merged.path, json.loads((merged.path / "manifest.json").read_text()))  # sha now agrees
    with pytest.raises(EdgeloraError, match=r"model\.onnx: onnxruntime cannot load it \(.*\); re-export") as info:
        Runtime(merged.path)
    assert "\n" not in str(info.value)


def test_adapter_for_another_head_is_refused(switchable: Tiny) -> None:
    write_adapter(switchable.path / "adapters" / "topic.onnx_adapter",
                   np.zeros((HIDDEN + 1, 3), np.float32), np.zeros(3, np.float32))
    write_manifest(switchable.path, json.loads((switchable.path / "manifest.json").read_text()))
    with pytest.raises(EdgeloraError, match=r"topic\.onnx_adapter: parameter 'head\.weight' is .*expects"):
        Runtime(switchable.path)


def test_bad_feeds(merged: Tiny) -> None:
    rt = Runtime(merged.path, intra_op_threads=1)
    with pytest.raises(EdgeloraError, match=r"feeds \['pixels'\] are not inputs"):
        rt.run({"pixels": np.zeros((1, 2))})
    with pytest.raises(EdgeloraError, match=r"feeds lack inputs \['input_ids'\]"):
        rt.run({"attention_mask": np.ones((1, 2), np.int64)})
