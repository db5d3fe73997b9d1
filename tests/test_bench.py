"""The benchmark harness on tiny bundles: interleaving, statistics, speed-ups, JSON, PNG, table, CLI glue."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edgelora.errors import EdgeloraError
from edgelora.runtime import bench
from test_runtime import TEXTS, make_bundle  # the tiny-bundle builder; tests/ is on sys.path under pytest

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
        assert r["size_bytes"] > 0 and r["rss_peak_bytes"] >= r["rss_load_bytes"] > 0
    s = result["settings"]
    assert s["threads"] == 1 and s["rounds"] == ROUNDS and s["spinning"] is False  # the default: no trap


def test_int8_over_fp32_speedup_per_shape(result: dict) -> None:
    sp = [s for s in result["speedups"] if s["kind"] == "int8/fp32"]
    assert [(s["baseline"], s["candidate"]) for s in sp] == [(0, 1)] * len(BATCHES) * len(SEQS)
    assert all(s["speedup"] > 0 and s["speedup_paired"] > 0 for s in sp)


def test_json_is_written_atomically_and_reads_back(result: dict, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    bench.write_json(result, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


def test_plot_writes_a_png(result: dict, tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    bench.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_mentions_every_bundle(result: dict) -> None:
    table = bench.format_table(result)
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
    bench.add_bench_arguments(parser)
    args = parser.parse_args([*map(str, bundles), "--batch", "1", "--seq", "4", "--rounds", "2", "--warmup", "0",
                              "--threads", "1", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert bench.bench_command(args) == 0
    assert bundles[0].name in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["seqs"] == [4]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_run_command_prints_predictions(bundles: list[Path], tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    bench.add_run_arguments(parser)
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXTS[1]}\n\n{TEXTS[2]}\n")
    args = parser.parse_args([str(bundles[0]), "--text", TEXTS[0], "--file", str(texts), "--threads", "1"])
    assert bench.run_command(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["text"] for o in out] == TEXTS
    assert all(o["label"] in ("neg", "pos") and set(o["scores"]) == {"neg", "pos"} for o in out)
    with pytest.raises(EdgeloraError, match=r"nothing to classify"):
        bench.run_command(parser.parse_args([str(bundles[0])]))
