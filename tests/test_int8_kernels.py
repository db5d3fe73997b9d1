"""benchmarks/int8_kernels.py: each timing graph computes the recipe it is named after (so the kernel table
compares like with like), every kernel's layer graph runs on a tiny config, and the table reads its figures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int8_kernels  # noqa: E402

from edgelora.fake_quant import fake_quantize_activation_blockwise  # noqa: E402
from edgelora.runtime.cpu import detect_isa, recommended_weight_bits  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}
K, N, ROWS = 96, 40, 5
BITS = recommended_weight_bits(detect_isa().isa)  # u8s8 weights that cannot saturate this CPU's kernel


def _linear(kind: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A graph of one `kind` linear, and its initializers by name."""
    g = int8_kernels._Graph(np.random.default_rng(3), BITS)
    for name, value in (("last", np.array([-1], np.int64)), ("tiny", np.float32(1e-30)), ("q127", np.float32(127)),
                        ("q128", np.float32(128)), ("one", np.float32(1)), ("zp128", np.uint8(128))):
        g.const(name, value)
    y = g.linear(kind, "lin", "x", K, N)
    graph = helper.make_graph(g.nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return model, {t.name: numpy_helper.to_array(t) for t in g.inits}


def _one_linear(kind: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Output of one `kind` linear on seeded input rows, and the input and initializers by name."""
    model, inits = _linear(kind)
    x = np.random.default_rng(4).normal(0, 1, (ROWS, K)).astype(np.float32)
    x[1, 7] = 9.0  # an outlier channel in one row: per-row scales must keep the other rows' resolution
    return int8_kernels.session(model, 1).run(None, {"x": x})[0], {"x": x, **inits}


@pytest.mark.parametrize("kind", ["nbits-b32", "nbits-b128"])
def test_matmulnbits_graph_is_blockwise_int8_activations_and_weights(kind: str) -> None:
    out, t = _one_linear(kind)
    block = 128 if kind == "nbits-b128" else 32
    w = (t["lin.w"].astype(np.float32) - 128).reshape(N, -1)[:, :K] * np.repeat(
        t["lin.s"].reshape(N, -1), block, axis=1)[:, :K]
    x = fake_quantize_activation_blockwise(torch.from_numpy(t["x"]), block).numpy()
    ref = x @ w.T
    # int32 block sums times float scales: the order of the float products differs from numpy's by a few ulps
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_fp32_compute_matmulnbits_leaves_the_activations_unquantized() -> None:
    out, t = _one_linear("nbits-fp32")
    w = (t["lin.w"].astype(np.float32) - 128).reshape(N, -1)[:, :K] * np.repeat(t["lin.s"].reshape(N, -1), 32, axis=1)
    np.testing.assert_allclose(out, t["x"] @ w.T, rtol=1e-4, atol=1e-5)


def test_rowwise_graph_quantizes_each_row_alone() -> None:
    out, t = _one_linear("rowwise")
    x = t["x"]
    amax = np.abs(x).max(axis=1, keepdims=True)
    q = np.round(x * (np.float32(127) / amax))
    ref = (q @ t["lin.w"].astype(np.float32)) * t["lin.s"] * (amax / np.float32(127))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    model, _ = _linear("rowwise")
    alone = int8_kernels.session(model, 1).run(None, {"x": x[:1]})[0]
    np.testing.assert_array_equal(alone, out[:1])  # batch-invariant: row 0 alone is row 0 in the batch


@pytest.mark.parametrize("kind", int8_kernels.KERNELS)
def test_every_kernel_runs_a_layer_of_the_models_shapes(kind: str) -> None:
    model = int8_kernels.kernel_graph(kind, TINY, layers=2, weight_bits=BITS)
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).normal(0, 0.5, (3, TINY["hidden_size"])).astype(np.float32)
    out = int8_kernels.session(model, 1).run(None, {"x": x})[0]
    assert out.shape == x.shape and np.isfinite(out).all()


def test_layer_linears_pack_as_the_export_does() -> None:
    assert int8_kernels.layer_linears(TINY) == [("qkv", "norm", 64, 64 + 2 * 32), ("o", "context", 64, 64),
                                                ("gate_up", "norm", 64, 192), ("down", "swiglu", 96, 64)]


def test_the_table_gives_each_kernel_its_ratio_and_row_scaling() -> None:
    r = {"cpu": "test cpu", "threads": 1, "rounds": 3, "u8s8_weight_bits": 7,
         "ms_per_layer": {"1": {"nbits-b32": 0.5, "rowwise": 0.25}, "4": {"nbits-b32": 1.0, "rowwise": 0.75}},
         "fidelity": {"block 32": {"perplexity_ratio": 1.01, "agreement": 0.5, "exact": 0.25}}}
    text = int8_kernels.table(r)
    assert "rowwise and per-tensor with 7-bit weights" in text
    assert "| 1 | 0.500 (1.00) | 0.250 (0.50) |" in text
    assert "4 rows cost nbits-b32 2.00x, rowwise 3.00x the time of 1 row" in text
    assert "| block 32 | 1.0100 | 0.500 (0.25) |" in text
