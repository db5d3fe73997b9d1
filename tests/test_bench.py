"""The benchmark harness on tiny bundles: interleaving, statistics, speed-ups, fidelity, JSON, PNG, table, CLI glue."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelora.cli import run as cli_run
from edgelora.cli.common import write_json
from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime, bench, fidelity, report
from tiny_bundle import ATOL, TEXTS, WORDS, make_bundle, reference, write_manifest

ROUNDS = 3
BATCHES, SEQS = (1, 2), (4, 8)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bench")
    # same base and mode, precisions fp32 and int8: the harness must pair them for a speed-up
    return [make_bundle(root, "merged", "fp32").path, make_bundle(root, "merged", "int8").path]


@pytest.fixture(scope="module")
def result(bundles: list[Path]) -> dict:
    seen: list[tuple[int, int]] = []
    out = bench.run_benchmark([str(b) for b in bundles], batches=BATCHES, seqs=SEQS, rounds=ROUNDS, warmup=1,
                              threads=1, settle_ms=0, progress=lambda done, total, msg: seen.append((done, total)))
    out["_progress"] = seen
    return out


def test_runs_alternate_between_bundles(result: dict) -> None:
    order = [s["bundle"] for s in result["schedule"]]
    assert len(order) == 2 * ROUNDS * len(BATCHES) * len(SEQS)
    assert order == [0, 1] * (len(order) // 2)
    shapes = [(s["batch"], s["seq"]) for s in result["schedule"]]
    assert shapes[0::2] == shapes[1::2]  # each pair is one round of one shape
    assert result["_progress"][-1] == (len(order), len(order))


def test_rows_hold_percentiles_throughput_size_and_memory(result: dict) -> None:
    assert len(result["rows"]) == 2 * len(BATCHES) * len(SEQS)
    for r in result["rows"]:
        assert r["n"] == ROUNDS == len(r["samples_ms"])
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput_seq_s"] == pytest.approx(r["batch"] * 1e3 / r["p50_ms"])
        path = Path(result["bundles"][r["bundle"]]["path"])  # merged bundles: the graph is all the weights
        assert r["size_bytes"] == (path / "model.onnx").stat().st_size
        assert r["rss_peak_bytes"] >= r["rss_load_bytes"] > 0
    s = result["settings"]
    assert s["threads"] == 1 and s["rounds"] == ROUNDS and s["spinning"] is False  # the default: no trap


def test_int8_over_fp32_speedup_per_shape(result: dict) -> None:
    sp = [s for s in result["speedups"] if s["kind"] == "int8/fp32"]
    assert [(s["baseline"], s["candidate"]) for s in sp] == [(0, 1)] * len(BATCHES) * len(SEQS)
    rows = {(r["bundle"], r["batch"], r["seq"]): r for r in result["rows"]}
    for s in sp:  # the speed-up is the ratio of the two bundles' medians; the paired one, the median of round ratios
        base, cand = rows[(0, s["batch"], s["seq"])], rows[(1, s["batch"], s["seq"])]
        assert s["speedup"] == pytest.approx(base["p50_ms"] / cand["p50_ms"], rel=1e-12)
        ratios = np.asarray(base["samples_ms"]) / np.asarray(cand["samples_ms"])
        assert s["speedup_paired"] == pytest.approx(float(np.median(ratios)), rel=1e-12)


def test_json_is_written_atomically_and_reads_back(result: dict, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    write_json(result, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_a_failed_write_leaves_the_previous_file_whole(result: dict, tmp_path: Path) -> None:
    """Benchmark outputs go through edgelora.atomic: a write that fails half-way keeps the old file."""
    from edgelora.atomic import write_text_atomic

    path = tmp_path / "table.md"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new \ud800")  # a lone surrogate fails while the temp file is written
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_plot_writes_a_png(result: dict, tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    report.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # written beside it, then renamed


def test_table_mentions_every_bundle(result: dict) -> None:
    table = report.format_table(result)
    for b in result["bundles"]:
        assert b["label"] in table
    assert "int8/fp32" in table


def test_switchable_adapter_syntax_and_unknown_adapter(tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "switchable").path
    out = bench.run_benchmark([f"{path}@topic", str(path)], batches=(1,), seqs=(4,), rounds=2, warmup=0,
                              threads=1, settle_ms=0)
    assert [b["adapter"] for b in out["bundles"]] == ["topic", None]
    with pytest.raises(EdgeloraError, match=r"no adapter 'nope'; available: sentiment, topic"):
        bench.run_benchmark([f"{path}@nope"], batches=(1,), seqs=(4,), rounds=1, warmup=0, threads=1)


def test_bad_arguments_are_refused(bundles: list[Path], tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"bundle directory not found"):
        bench.run_benchmark([str(tmp_path / "nowhere")])
    with pytest.raises(EdgeloraError, match=r"seq sizes \[0\] must be positive"):
        bench.run_benchmark([str(bundles[0])], seqs=(0,))


def test_bench_command_prints_table_and_writes_files(bundles: list[Path], tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli_run.add_bench_arguments(parser)
    args = parser.parse_args([*map(str, bundles), "--batch", "1", "--seq", "4", "--rounds", "2", "--warmup", "0",
                              "--threads", "1", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert cli_run.bench_command(args) == 0
    assert bundles[0].name in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["seqs"] == [4]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_run_command_prints_predictions(bundles: list[Path], tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli_run.add_run_arguments(parser)
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXTS[1]}\n\n{TEXTS[2]}\n")
    args = parser.parse_args([str(bundles[0]), "--text", TEXTS[0], "--file", str(texts), "--threads", "1"])
    assert cli_run.run_command(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["text"] for o in out] == TEXTS
    logits, _ = reference(make_bundle(tmp_path / "ref", "merged", "fp32"), TEXTS, "sentiment")  # bundles[0]'s weights
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert [o["label"] for o in out] == [("neg", "pos")[i] for i in logits.argmax(1)]
    for o, p in zip(out, probs):
        assert o["scores"] == pytest.approx({"neg": p[0], "pos": p[1]}, abs=ATOL)
    with pytest.raises(EdgeloraError, match=r"nothing to classify"):
        cli_run.run_command(parser.parse_args([str(bundles[0])]))


# -- fidelity beside speed --------------------------------------------------------------------------

# Two workers running the same fp32 graph on the same inputs produce bitwise-equal outputs; only the
# float64 cosine of identical rows can round below 1 (by a few ulp).
SAME_GRAPH_COS_TOL = 1e-12
# The harness's figures against ours recomputed here from the same ORT graphs and inputs, one thread:
# the outputs are bitwise equal, so only float64 summation order may differ.
RECOMPUTE_TOL = 1e-9


def test_fp32_graph_against_itself_has_cosine_one_and_diff_zero(result: dict) -> None:
    # bundles[1] holds the same fp32 graph as bundles[0] under an "int8" label, in another process
    for r in result["rows"]:
        f = r["fidelity"]
        assert f["reference"] == 0 and f["inputs"] == "texts" and f["rows"] == len(bench.FIDELITY_TEXTS)
        assert f["output"] == "logits" and set(f["outputs"]) == {"logits", "embeddings"}
        assert f["worst_cosine"] == pytest.approx(1.0, abs=SAME_GRAPH_COS_TOL) and f["max_abs_diff"] == 0.0
        assert f["accuracy"] is None  # no labelled data given


def test_compare_outputs_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    ref = {"embeddings": rng.standard_normal((5, 8)), "logits": rng.standard_normal((5, 3))}
    cand = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in ref.items()}
    cand["embeddings"][2] = 0.0  # zero on one side only: orthogonal
    out = fidelity.compare_outputs(cand, ref)
    for name in ("embeddings", "logits"):
        a, b = cand[name], ref[name]
        cos = [x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) if np.linalg.norm(x) else 0.0 for x, y in zip(a, b)]
        assert out[name]["worst_cosine"] == pytest.approx(min(cos), abs=RECOMPUTE_TOL)
        assert out[name]["worst_row"] == int(np.argmin(cos))
        assert out[name]["max_abs_diff"] == pytest.approx(np.abs(a - b).max(), abs=RECOMPUTE_TOL)
    assert out["embeddings"]["worst_cosine"] == 0.0
    both_zero = fidelity.compare_outputs({"logits": np.zeros((2, 3))}, {"logits": np.zeros((2, 3))})
    assert both_zero["logits"]["worst_cosine"] == 1.0
    assert fidelity.compare_outputs({"logits": np.zeros((2, 0))}, {"logits": np.zeros((2, 0))}) == {}


@pytest.fixture(scope="module")
def int8_pair(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT with a random LoRA, exported merged in fp32 and in real int8."""
    from conftest import randomize_adapters

    from edgelora.config import LoraConfig
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    root = tmp_path_factory.mktemp("bench_int8")
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["neg", "pos"])
    randomize_adapters(model)
    adapter = save_adapter(model, "lo", root / "lo")
    for precision in ("fp32", "int8"):
        export_bundle(str(tiny_bert_dir), {"lo": adapter}, mode="merged", precision=precision, out=root / precision)
    return root / "fp32", root / "int8"


def _numpy_fidelity(fp32: Path, int8: Path, batch: int) -> dict[str, tuple[float, float]]:
    """(worst cosine, max abs diff) per output, recomputed in this process from the two bundles."""
    from edgelora.runtime import Runtime

    outs = []
    for path in (fp32, int8):
        rt = Runtime(path, intra_op_threads=1, optimized_cache=False)
        texts = list(bench.FIDELITY_TEXTS)
        parts = [rt.run(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        outs.append({k: np.concatenate([p[k] for p in parts]).astype(np.float64) for k in ("logits", "embeddings")})
    figures = {}
    for name in ("logits", "embeddings"):
        b, a = outs[0][name], outs[1][name]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        figures[name] = (float(cos.min()), float(np.abs(a - b).max()))
    return figures


def test_int8_fidelity_matches_a_direct_numpy_computation(int8_pair: tuple[Path, Path]) -> None:
    fp32, int8 = int8_pair
    out = bench.run_benchmark([str(fp32), str(int8)], batches=(1, 4), seqs=(8,), rounds=1, warmup=0, threads=1)
    assert [b["label"] for b in out["bundles"]] == ["fp32", "int8"]
    for r in out["rows"]:
        f = r["fidelity"]
        assert f["reference"] == 0 and f["reference_label"] == "fp32"
        expected = _numpy_fidelity(fp32, int8, r["batch"])
        for name, (cos, diff) in expected.items():
            got = f["outputs"][name]
            if r["bundle"] == 0:  # the reference against itself
                assert got["worst_cosine"] == pytest.approx(1.0, abs=SAME_GRAPH_COS_TOL) and got["max_abs_diff"] == 0
                continue
            assert cos < 1.0 and diff > 0  # int8 is not fp32: the check can see a difference
            assert got["worst_cosine"] == pytest.approx(cos, abs=RECOMPUTE_TOL)
            assert got["max_abs_diff"] == pytest.approx(diff, abs=RECOMPUTE_TOL)
    table = report.format_table(out)
    int8_row = next(r for r in out["rows"] if r["bundle"] == 1)
    assert f"{int8_row['fidelity']['worst_cosine']:.5f}" in table


def test_rows_without_an_fp32_reference_say_so(bundles: list[Path], tmp_path: Path) -> None:
    lone = bench.run_benchmark([str(bundles[1])], batches=(1,), seqs=(4,), rounds=1, warmup=0, threads=1)
    f = lone["rows"][0]["fidelity"]
    assert f["note"] == "no fp32 reference" and f["worst_cosine"] is None and f["max_abs_diff"] is None
    assert "no fp32 reference" in report.format_table(lone)


def test_fp32_references_match_base_adapter_and_labels() -> None:
    def b(mode: str, precision: str, base: str = "f1", task: str = "t", labels: tuple = ("a", "b")) -> dict:
        return {"mode": mode, "precision": precision, "base": base, "task": task, "labels": list(labels)}

    info = [b("merged", "int8"), b("switchable", "fp32"), b("merged", "fp32"), b("switchable", "int8"),
            b("merged", "int8", base="f2"), b("merged", "int8", task="u"), b("merged", "int8", labels=("x", "y"))]
    assert bench.fp32_references(info) == [2, 1, 2, 1, None, None, None]
    assert bench.fp32_references([{"mode": "merged", "precision": "int8", "base": None, "task": None, "labels": []},
                                  {"mode": "merged", "precision": "fp32", "base": None, "task": None, "labels": []}]) \
        == [None, 1]  # no fingerprint, no match
    v1, v2 = b("merged", "fp32") | {"source": "aaa"}, b("merged", "int8") | {"source": "bbb"}
    assert bench.fp32_references([v2, v1]) == [None, 1]  # one adapter name, two versions: no reference
    assert bench.fp32_references([v2, v1 | {"source": "bbb"}]) == [1, 1]


def test_manifest_records_the_exported_adapters_weights(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The digest the bench matches fp32 references by, and a user checks a bundle's origin with."""
    import hashlib
    import json

    from edgelora.config import LoraConfig
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("task", LoraConfig(r=2), labels=["a", "b"])
    adapter = save_adapter(model, "task", tmp_path / "task")
    export_bundle(tiny_bert_dir, {"task": adapter}, mode="merged", precision="fp32", out=tmp_path / "b")
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["adapters"][0]
    assert entry["source_sha256"] == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert bench._bundle_info(str(tmp_path / "b"), None)["source"] == entry["source_sha256"]


def test_labelled_data_gives_accuracy(bundles: list[Path]) -> None:
    from edgelora.runtime import Runtime

    texts = ["the good film", "a bad movie", "great", "awful film", "good movie"]
    gold = ["pos", "neg", "pos", "neg", "neg"]
    out = bench.run_benchmark([str(bundles[0])], batches=(2,), seqs=(4,), rounds=1, warmup=0, threads=1,
                              data=(texts, gold), data_source="five reviews")
    pred = [p["label"] for p in Runtime(bundles[0], intra_op_threads=1).predict(texts)]
    f = out["rows"][0]["fidelity"]
    assert f["rows"] == len(texts) and f["accuracy"] == pytest.approx(np.mean(np.array(pred) == np.array(gold)))
    assert out["fidelity"]["source"] == "five reviews" and out["fidelity"]["labelled"] is True
    other = bench.run_benchmark([str(bundles[0])], batches=(2,), seqs=(4,), rounds=1, warmup=0, threads=1,
                                data=(texts, ["up"] * len(texts)))
    assert other["rows"][0]["fidelity"]["accuracy"] is None
    assert "not the adapter's (neg, pos)" in other["rows"][0]["fidelity"]["accuracy_note"]
    with pytest.raises(EdgeloraError, match=r"2 gold labels for 5 texts"):
        bench.run_benchmark([str(bundles[0])], batches=(1,), seqs=(4,), rounds=1, data=(texts, gold[:2]))


def test_bundle_without_tokenizer_uses_generated_ids(tmp_path: Path) -> None:
    pair = [make_bundle(tmp_path / p, "merged", p).path for p in ("fp32", "int8")]
    for path in pair:
        m = json.loads((path / "manifest.json").read_text())
        m["tokenizer"] = None
        m["base"]["vocab_size"] = len(WORDS)  # where ids come from without a tokenizer
        m["files"].pop("tokenizer.json")
        (path / "tokenizer.json").unlink()
        write_manifest(path, m)
    out = bench.run_benchmark([str(p) for p in pair], batches=(8,), seqs=(4,), rounds=1, warmup=0, threads=1)
    f = out["rows"][1]["fidelity"]
    assert f["inputs"] == "generated ids" and f["rows"] == bench.GENERATED_ROWS
    assert f["worst_cosine"] == pytest.approx(1.0, abs=SAME_GRAPH_COS_TOL) and f["max_abs_diff"] == 0.0


def test_bench_command_reads_labelled_data(bundles: list[Path], tmp_path: Path, capsys) -> None:
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n"
                            for t, y in [("the good film", "pos"), ("a bad movie", "neg")]))
    parser = argparse.ArgumentParser()
    cli_run.add_bench_arguments(parser)
    args = parser.parse_args([str(bundles[0]), "--batch", "1", "--seq", "4", "--rounds", "1", "--warmup", "0",
                              "--threads", "1", "--data", str(data), "--json", str(tmp_path / "r.json")])
    assert cli_run.bench_command(args) == 0
    assert "acc: accuracy on its labels" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    predicted = [p["label"] for p in Runtime(bundles[0], intra_op_threads=1).predict(["the good film", "a bad movie"], "sentiment")]
    expected = np.mean([p == y for p, y in zip(predicted, ["pos", "neg"])])
    assert saved["fidelity"]["source"] == str(data) and saved["rows"][0]["fidelity"]["accuracy"] == expected
    with pytest.raises(EdgeloraError, match=r"nowhere.jsonl: no such file"):
        cli_run.bench_command(parser.parse_args([str(bundles[0]), "--data", str(tmp_path / "nowhere.jsonl")]))


def test_module_entry_point_reports_errors_like_the_cli(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "bench", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgelora: error: ") and "bundle directory not found" in proc.stderr
