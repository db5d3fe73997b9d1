"""benchmarks/int8_speed.py on two toy ONNX graphs: interleaved rows with wall and CPU time, session settings
passed to every worker and recorded, and a malformed setting refused before any worker starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_speed  # noqa: E402

# The worker reads the CPU clock just after the wall clock at both ends of a run, so a CPU sample may
# cover a few microseconds more than its wall sample.
CLOCK_SLACK_MS = 0.5


def toy_model(path: Path, width: int) -> Path:
    """input_ids (batch, seq) -> float -> MatMul by a (seq, width) weight: a graph the worker feeds by name."""
    weight = np.random.default_rng(width).standard_normal((4, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["ids_f", "w"], ["y"])],
        "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_models_are_timed_interleaved_with_cpu_time_and_settings(tmp_path: Path) -> None:
    a, b = toy_model(tmp_path / "a.onnx", 8), toy_model(tmp_path / "b.onnx", 64)
    result = int8_speed.time_models([str(a), str(b)], batches=[2], seqs=[4], rounds=3, warmup=1, threads=1,
                                    labels=["a", "b"], config=["session.intra_op.allow_spinning=1"],
                                    opt_level="basic", settle_ms=1.0)
    assert result["settings"] == {"config": ["session.intra_op.allow_spinning=1"], "opt_level": "basic",
                                  "settle_ms": 1.0}
    rows = result["rows"]
    assert [(r["model"], r["batch"], r["seq"]) for r in rows] == [("a", 2, 4), ("b", 2, 4)]
    cores = os.cpu_count() or 1
    for r in rows:
        wall, cpu = np.asarray(r["samples_ms"]), np.asarray(r["samples_cpu_ms"])
        assert len(wall) == len(cpu) == 3
        assert r["p50_ms"] == float(np.median(wall)) and r["cpu_p50_ms"] == float(np.median(cpu))
        # a run costs some CPU, and one process cannot burn more than every core for the whole run
        assert np.all(cpu > 0) and np.all(cpu <= wall * cores + CLOCK_SLACK_MS)
    assert rows[0]["speedup_vs_first"] == 1.0 and rows[0]["cpu_speedup_vs_first"] == 1.0
    assert rows[1]["speedup_vs_first"] == pytest.approx(rows[0]["p50_ms"] / rows[1]["p50_ms"], rel=1e-12)
    assert rows[1]["cpu_speedup_vs_first"] == pytest.approx(rows[0]["cpu_p50_ms"] / rows[1]["cpu_p50_ms"], rel=1e-12)
    assert "cpu p50" in int8_speed.format_rows(result)


def test_a_setting_without_equals_sign_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        int8_speed.main(["model.onnx", "--config", "session.intra_op.allow_spinning"])
    assert exc.value.code == 2
    assert "--config 'session.intra_op.allow_spinning' is not KEY=VALUE" in capsys.readouterr().err
