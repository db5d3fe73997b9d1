"""Claims about edgelora.fake_quant, the one quantizer training and export share.

Hand-computed grids pin the rounding rule and the per-channel scale; one-node ONNX graphs run in ONNX
Runtime pin that our activation parameters are DynamicQuantizeLinear's, that the static fake quantizer is
QuantizeLinear bit for bit (saturation included), and that an int8 layer built from `quantize_weight`
computes what the fake-quantized torch layer computes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from edgelora.config import QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import (
    activation_qparams,
    fake_quantize_activation,
    fake_quantize_activation_static,
    fake_quantize_weight,
    qparams_from_range,
    quantize_activation_static,
    quantize_weight,
    weight_qmax,
    weight_scale,
)

# int8 graph vs fake-quantized torch layer, relative to the output's largest magnitude. The integer
# products are exact on both sides (7-bit weights cannot saturate u8 x s8 pair sums); only the float32
# order of the two scale multiplications and of the K-term sum differs, a few ulps (~1e-7) each.
INT8_MATMUL_REL_TOL = 1e-5
OPSET = 17


def _session(model: onnx.ModelProto, optimize: bool = False) -> ort.InferenceSession:
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # what every onnxruntime >= 1.20 reads
    return model


# --- weights: grid, rounding, clamp ----------------------------------------------------------------


def test_rounds_half_to_even_with_per_channel_scale() -> None:
    w = torch.tensor(
        [
            [127.0, 2.5, -2.5, 3.5, 0.5, -0.5],  # max|w| 127 -> scale 1: .5 goes to the even neighbour
            [-254.0, 5.0, -3.0, 1.0, 7.0, 9.0],  # max|w| 254 -> scale 2: 2.5, -1.5, 0.5, 3.5, 4.5
        ]
    )
    q, scale = quantize_weight(w, bits=8)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == [1.0, 2.0]
    assert q.tolist() == [[127, 2, -2, 4, 0, 0], [-127, 2, -2, 0, 4, 4]]


def test_seven_bit_grid() -> None:
    w = torch.tensor([[63.0, 2.5, -1.5], [126.0, 5.0, -63.0]])
    q, scale = quantize_weight(w, bits=7)
    assert scale.tolist() == [1.0, 2.0]
    assert q.tolist() == [[63, 2, -2], [63, 2, -32]]  # -31.5 -> -32 (even)


@pytest.mark.parametrize("bits", [8, 7])
def test_values_stay_on_the_symmetric_grid(bits: int) -> None:
    qmax = weight_qmax(bits)
    assert qmax == {8: 127, 7: 63}[bits]
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * 3
    w[3] = -w[3].abs() * 10  # a row whose extreme is negative: it maps to -qmax, never -qmax-1
    q, scale = quantize_weight(w, bits)
    assert int(q.max()) <= qmax and int(q.min()) >= -qmax
    assert torch.equal(q.abs().amax(dim=1), torch.full((16,), qmax, dtype=torch.int8))  # every row uses its range
    assert int(q[3].min()) == -qmax
    assert torch.allclose(scale, w.abs().amax(dim=1) / qmax, rtol=0, atol=0)


def test_all_zero_row_gets_scale_one_and_stays_zero() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    q, scale = quantize_weight(w)
    assert scale[0].item() == 1.0 and q[0].tolist() == [0, 0, 0]
    fq = fake_quantize_weight(w)
    assert torch.isfinite(fq).all() and fq[0].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(weight_scale(torch.zeros(2, 3)), torch.ones(2))


@pytest.mark.parametrize("bits", [8, 7])
def test_fake_quantize_weight_is_quantize_weight_dequantized(bits: int) -> None:
    w = torch.randn(24, 33, generator=torch.Generator().manual_seed(1))
    w[5] = 0.0
    q, scale = quantize_weight(w, bits)
    assert torch.equal(fake_quantize_weight(w, bits), q.to(torch.float32) * scale[:, None])


@pytest.mark.parametrize("bits", [8, 7])
def test_weight_gradient_is_straight_through(bits: int) -> None:
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    upstream = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    fake_quantize_weight(w, bits).backward(upstream)
    assert torch.equal(w.grad, upstream)  # the row maxima (at +-qmax) included


def test_activation_gradient_is_straight_through() -> None:
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    upstream = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(5))
    fake_quantize_activation(x).backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("bits", [4, 6, 16])
def test_bad_bits_are_refused(bits: int) -> None:
    w = torch.ones(2, 2)
    with pytest.raises(EdgeloraError, match=rf"weight_bits={bits} is not supported; choose from"):
        quantize_weight(w, bits)
    with pytest.raises(EdgeloraError, match=rf"weight_bits={bits} is not supported"):
        fake_quantize_weight(w, bits)
    with pytest.raises(EdgeloraError, match=rf"weight_bits={bits} is not supported; choose from 8, 7"):
        QuantConfig(weight_bits=bits)


# --- activations: DynamicQuantizeLinear ---------------------------------------------------------------


def _dynamic_quantize_linear() -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],  # per tensor: fed flattened
        [
            helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"]),
            helper.make_tensor_value_info("y_scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("y_zero_point", TensorProto.UINT8, []),
        ],
    )
    return _session(_model(graph))


def _activation_cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return {
        "normal": torch.randn(4, 9, 16, generator=g),
        "wide": torch.randn(2, 64, generator=g) * 37.0 + 5.0,
        "tiny": torch.randn(3, 8, generator=g) * 1e-4,
        "all_positive": torch.rand(5, 11, generator=g) + 0.25,
        "all_negative": -(torch.rand(5, 11, generator=g) * 3 + 0.1),
        "constant_positive": torch.full((3, 4), 2.5),
        "constant_negative": torch.full((3, 4), -0.75),
        "constant_zero": torch.zeros(3, 4),
        # scale 31.875 / 255 = 0.125 exactly, so x / scale lands on every .5 tie
        "ties": torch.cat([torch.tensor([0.0, 31.875]), (torch.arange(0, 254) + 0.5) * 0.125]),
        # min -10.5 * 0.125: the zero point itself is a tie (10.5), and so is every interior value
        "tied_zero_point": torch.cat([torch.tensor([-1.3125, 30.5625]), (torch.arange(-10, 244) + 0.5) * 0.125]),
    }


@pytest.mark.parametrize("case", list(_activation_cases()))
def test_activation_qparams_match_dynamic_quantize_linear(case: str) -> None:
    x = _activation_cases()[case]
    y, ort_scale, ort_zp = _dynamic_quantize_linear().run(None, {"x": x.reshape(-1).numpy()})
    y = y.reshape(x.shape)
    scale, zp = activation_qparams(x)
    assert scale.item() == float(ort_scale), (scale.item(), float(ort_scale))
    assert zp.item() == int(ort_zp)
    # Our dequantized activation is ORT's integers on ORT's grid, bit for bit ...
    fq = fake_quantize_activation(x)
    expected = (torch.from_numpy(y.astype(np.float32)) - float(ort_zp)) * float(ort_scale)
    assert torch.equal(fq, expected)
    # ... and the integers we stand for are ORT's uint8 values.
    ours_u8 = torch.round(fq / scale + zp).to(torch.int64)
    assert torch.equal(ours_u8, torch.from_numpy(y.astype(np.int64)))


# --- the int8 layer: what you train is what you deploy ------------------------------------------------


def _int8_linear_graph(q: torch.Tensor, scale: torch.Tensor) -> onnx.ModelProto:
    """x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q^T) -> Cast -> Mul x_scale -> Mul w_scale."""
    n_out, n_in = q.shape
    inits = [
        numpy_helper.from_array(q.t().contiguous().numpy().astype(np.int8), "w_q"),  # (in, out) for MatMul
        numpy_helper.from_array(scale.numpy().astype(np.float32), "w_scale"),  # (out,)
    ]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zp"]),
        helper.make_node("MatMulInteger", ["x_q", "w_q", "x_zp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["acc_f", "x_scale"], ["y_x"]),
        helper.make_node("Mul", ["y_x", "w_scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    return _model(graph)


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_graph_matches_fake_quant(seed: int, optimize: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 48, generator=g) * 0.2
    w[7] = 0.0  # a dead output channel
    x = torch.randn(5, 48, generator=g) + 0.3
    q, scale = quantize_weight(w, bits=7)
    (y,) = _session(_int8_linear_graph(q, scale), optimize).run(None, {"x": x.numpy()})
    ref = F.linear(fake_quantize_activation(x), fake_quantize_weight(w, 7))
    err = (torch.from_numpy(y) - ref).abs().max() / ref.abs().max()
    assert err <= INT8_MATMUL_REL_TOL, f"relative error {err:.2e}"
    # and the quantization itself is visible: the int8 layer is not the float one
    assert (ref - F.linear(x, w)).abs().max() > 1e-4


# --- activations: static QuantizeLinear -----------------------------------------------------------------


def _quantize_linear() -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["y"])],
        "ql",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("zero_point", TensorProto.UINT8, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n"])],
    )
    return _session(_model(graph))


def _static_cases() -> dict[str, tuple[torch.Tensor, float, float]]:
    """(x, lo, hi): a calibrated range [lo, hi] and values that fall inside it and, mostly, beyond it."""
    g = torch.Generator().manual_seed(7)
    return {
        "inside": (torch.randn(4, 9, 16, generator=g), -5.0, 5.0),
        "beyond_both_ends": (torch.randn(2, 512, generator=g) * 4.0, -1.5, 2.0),
        "far_beyond": (torch.randn(300, generator=g) * 1e4, -0.5, 0.25),
        "all_positive_range": (torch.randn(3, 64, generator=g) + 1.0, 0.5, 3.0),  # zero point 0, negatives clip
        "all_negative_range": (torch.randn(3, 64, generator=g) - 1.0, -3.0, -0.5),  # zero point 255
        "tiny_range": (torch.randn(3, 64, generator=g) * 1e-4, -1e-4, 1e-4),
        "zero_range": (torch.randn(3, 8, generator=g), 0.0, 0.0),  # scale 1: a coarse but valid grid
        # scale 31.875 / 255 = 0.125, zero point 0: every x / scale below is a .5 tie, and some lie beyond 255
        "ties": ((torch.arange(-20, 300) + 0.5) * 0.125, 0.0, 31.875),
        # zero point 10.5 -> 10 (even); the ties sit around it and across both ends of the grid
        "tied_zero_point": ((torch.arange(-30, 270) + 0.5) * 0.125, -1.3125, 30.5625),
    }


@pytest.mark.parametrize("case", list(_static_cases()))
def test_static_fake_quant_is_quantize_linear_bit_for_bit(case: str) -> None:
    x, lo, hi = _static_cases()[case]
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi))
    (y,) = _quantize_linear().run(None, {"x": x.reshape(-1).numpy(), "scale": scale.numpy(),
                                          "zero_point": np.array(int(zp), np.uint8)})
    y = torch.from_numpy(y.reshape(x.shape))
    assert torch.equal(quantize_activation_static(x, scale, zp), y)  # ORT's integers, saturation included
    expected = (y.to(torch.float32) - zp) * scale  # ... and our dequantized value is exactly theirs
    assert torch.equal(fake_quantize_activation_static(x, scale, zp), expected)
    if case.startswith("beyond") or case.startswith("far"):
        assert int(y.min()) == 0 and int(y.max()) == 255  # the case really saturates


def test_static_with_the_tensors_own_range_is_dynamic_bit_for_bit() -> None:
    x = torch.randn(4, 7, 33, generator=torch.Generator().manual_seed(8)) * 3 + 0.5
    scale, zp = qparams_from_range(x.min(), x.max())
    assert (scale, zp) == activation_qparams(x)
    assert torch.equal(fake_quantize_activation_static(x, scale, zp), fake_quantize_activation(x))


def test_static_gradient_passes_inside_the_range_and_is_zero_outside() -> None:
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.0))
    x = torch.tensor([-5.0, -1.0, -0.3, 0.0, 0.7, 2.0, 2.004, 9.0], requires_grad=True)
    upstream = torch.arange(1.0, 9.0)
    fake_quantize_activation_static(x, scale, zp).backward(upstream)
    # -1 and 2 are the range's ends and round onto the grid's ends; 2.004 still rounds to 255 (inside);
    # -5 and 9 saturate: the clamp cuts and no gradient flows, as in PyTorch's FakeQuantize.
    inside = torch.round(x.detach() / scale) + zp
    assert inside.tolist()[6] == 255 and inside.tolist()[0] < 0 and inside.tolist()[7] > 255
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]


def _static_int8_linear_graph(q: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor,
                              fused: bool) -> onnx.ModelProto:
    """x -> QuantizeLinear(const scale, zp) -> MatMulIntegerToFloat, or -> MatMulInteger -> Cast -> Mul -> Mul."""
    n_out, n_in = q.shape
    inits = [
        numpy_helper.from_array(q.t().contiguous().numpy().astype(np.int8), "w_q"),
        numpy_helper.from_array(w_scale.numpy().astype(np.float32), "w_scale"),
        numpy_helper.from_array(x_scale.numpy().astype(np.float32), "x_scale"),
        numpy_helper.from_array(np.array(int(x_zp), np.uint8), "x_zp"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"])]
    if fused:
        nodes.append(helper.make_node("MatMulIntegerToFloat", ["x_q", "w_q", "x_scale", "w_scale", "x_zp"], ["y"],
                                      domain="com.microsoft"))
    else:
        nodes += [
            helper.make_node("MatMulInteger", ["x_q", "w_q", "x_zp"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["acc_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x_scale", "w_scale"], ["xw_scale"]),
            helper.make_node("Mul", ["acc_f", "xw_scale"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes, "static_int8_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["MatMulIntegerToFloat", "MatMulInteger"])
@pytest.mark.parametrize("seed", [0, 1])
def test_static_int8_graph_matches_fake_quant(seed: int, fused: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 48, generator=g) * 0.2
    x = torch.randn(5, 48, generator=g) * 2 + 0.3  # wider than the calibrated range below: some values clip
    scale, zp = qparams_from_range(torch.tensor(-2.0), torch.tensor(3.0))
    q, w_scale = quantize_weight(w, bits=7)
    (y,) = _session(_static_int8_linear_graph(q, w_scale, scale, zp, fused), optimize=True).run(None, {"x": x.numpy()})
    ref = F.linear(fake_quantize_activation_static(x, scale, zp), fake_quantize_weight(w, 7))
    err = (torch.from_numpy(y) - ref).abs().max() / ref.abs().max()
    assert err <= INT8_MATMUL_REL_TOL, f"relative error {err:.2e}"


def test_ort_does_not_fuse_the_constant_scale_pattern() -> None:
    """Why the static export writes MatMulIntegerToFloat itself: with constant scales, ONNX Runtime folds
    Mul(x_scale, w_scale) into one constant before its MatMulIntegerToFloat fusion looks for that Mul, so
    MatMulInteger -> Cast -> Mul stays three kernels. If this fails, ORT learned to fuse it: revisit."""
    q, w_scale = quantize_weight(torch.randn(8, 16, generator=torch.Generator().manual_seed(9)), bits=7)
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ops = {}
    for fused in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(_static_int8_linear_graph(q, w_scale, scale, zp, fused).SerializeToString(), opts,
                                 providers=["CPUExecutionProvider"])
            ops[fused] = sorted(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    assert ops[False] == ["Cast", "MatMulInteger", "Mul", "QuantizeLinear"]
    assert ops[True] == ["MatMulIntegerToFloat", "QuantizeLinear"]
