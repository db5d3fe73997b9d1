"""Claims about edgelora.fake_quant, the one quantizer training and export share.

Hand-computed grids pin the rounding rule and the per-channel scale; one-node ONNX graphs run in ONNX
Runtime pin that our activation parameters are DynamicQuantizeLinear's and that an int8 layer built from
`quantize_weight` computes what the fake-quantized torch layer computes.
"""

from __future__ import annotations

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
    fake_quantize_weight,
    quantize_weight,
    weight_qmax,
    weight_scale,
)

# int8 graph vs fake-quantized torch layer, relative to the output's largest magnitude. The integer
# products are exact on both sides (7-bit weights cannot saturate u8 x s8 pair sums); only the float32
# order of the two scale multiplications and of the K-term sum differs, a few ulps (~1e-7) each.
INT8_LAYER_REL_TOL = 1e-5
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
    assert err <= INT8_LAYER_REL_TOL, f"relative error {err:.2e}"
    # and the quantization itself is visible: the int8 layer is not the float one
    assert (ref - F.linear(x, w)).abs().max() > 1e-4
