"""Claims about the blockwise int8 quantizer (edgelora.fake_quant), the decoder's scheme.

One MatMulNBits node (com.microsoft, bits 8, block 32, accuracy_level 4) run in ONNX Runtime pins that the
fake quantizer computes what the kernel computes: the same activation integers per row and block (ties
included), the same weight grid, and products equal to float accumulation level; and that a row's output
is bit for bit the same alone and batched with other rows.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from edgelora.errors import EdgeloraError
from edgelora.fake_quant import (
    fake_quantize_activation_blockwise,
    fake_quantize_weight_blockwise,
    quantize_weight_blockwise,
)

# MatMulNBits vs fake_quant(x) @ fake_quant(W).T, relative to the output's largest magnitude. Both sides
# multiply the same integers; the kernel sums each block's int8 products exactly in int32, then scales
# and sums the blocks in float32 and subtracts the zero point's share (128 * sum(q_x) * scales) in float,
# which cancels a few leading bits. Measured <= 5e-7 on this CPU; 1e-5 leaves 20x headroom, while one
# activation integer off by one already moves the output by ~1e-3 relative.
NBITS_REL_TOL = 1e-5
BLOCK = 32


def matmul_nbits(q: torch.Tensor, scale: torch.Tensor, threads: int = 1) -> ort.InferenceSession:
    """A session computing x @ W.T with W given as blockwise int8 (q, scale), written as the exporter does."""
    n, k = q.shape
    blocks = scale.shape[1]
    padded = torch.zeros(n, blocks * BLOCK, dtype=torch.int32)
    padded[:, :k] = q.to(torch.int32)
    data = (padded + 128).to(torch.uint8).reshape(n, blocks, BLOCK).numpy()
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=4)
    graph = helper.make_graph(
        [node], "nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(data, "B"),
                     numpy_helper.from_array(scale.reshape(-1).numpy().astype(np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


SHAPES = [(5, 64, 96), (1, 576, 576), (16, 1536, 576), (7, 48, 100), (4, 64, 17)]  # (m, n, k); 100, 17: ragged K


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_matmul_nbits_equals_fake_quant(shape: tuple[int, int, int], seed: int) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    w[3, : min(k, BLOCK)] = 0.0  # an all-zero block
    x = torch.randn(m, k, generator=g) * 2 + 0.3
    q, scale = quantize_weight_blockwise(w)
    (y,) = matmul_nbits(q, scale).run(None, {"x": x.numpy()})
    ref = (fake_quantize_activation_blockwise(x).double() @ fake_quantize_weight_blockwise(w).double().T)
    err = float((torch.from_numpy(y).double() - ref).abs().max() / ref.abs().max())
    assert err <= NBITS_REL_TOL, f"relative error {err:.2e}"
    # the activations really are quantized: with float inputs the gap is ~1e-3, far above the tolerance
    float_act = x.double() @ fake_quantize_weight_blockwise(w).double().T
    assert float((torch.from_numpy(y).double() - float_act).abs().max() / ref.abs().max()) > 100 * NBITS_REL_TOL


def test_activation_ties_round_half_to_even_like_the_kernel() -> None:
    """Block max 127 makes the inverse scale exactly 1, so x lands on .5 ties; one-hot weights of 1 (scale
    1/127, integer 127) read each activation's integer back out of the kernel."""
    ties = torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 126.5, -125.5])
    x = torch.zeros(1, BLOCK)
    x[0, 0] = 127.0
    x[0, 1 : 1 + len(ties)] = ties
    w = torch.eye(BLOCK)
    q, scale = quantize_weight_blockwise(w)
    assert q.diagonal().tolist() == [127] * BLOCK
    (y,) = matmul_nbits(q, scale).run(None, {"x": x.numpy()})
    expected = [127.0, 0.0, 2.0, 2.0, -2.0, -0.0, 4.0, 126.0, -126.0]
    assert y[0, : len(expected)].tolist() == expected
    assert fake_quantize_activation_blockwise(x)[0, : len(expected)].tolist() == expected


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_alone_and_batched(threads: int) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1536, 576, generator=g) * 0.05
    x = torch.randn(6, 576, generator=g)
    others = torch.randn(25, 576, generator=g) * 8  # batch-mates with far larger ranges
    sess = matmul_nbits(*quantize_weight_blockwise(w), threads=threads)
    (batched,) = sess.run(None, {"x": torch.cat([x, others]).numpy()})
    for row in range(len(x)):
        (alone,) = sess.run(None, {"x": x[row : row + 1].numpy()})
        assert np.array_equal(alone[0], batched[row]), f"row {row} changed with its batch"


def test_weight_grid_and_scales() -> None:
    w = torch.zeros(2, 40)
    w[0, :32] = torch.linspace(-1.0, 0.5, 32)  # block max |-1|: -1 -> -127
    w[0, 32:] = torch.tensor([0.0, 0.25, -0.125, 2.0, 0.0, 0.0, 0.0, 0.0])  # the short last block, max 2
    q, scale = quantize_weight_blockwise(w)
    assert q.dtype == torch.int8 and q.shape == (2, 40) and scale.shape == (2, 2)
    assert scale[0].tolist() == [np.float32(1.0) / np.float32(127.0), np.float32(2.0) / np.float32(127.0)]
    assert int(q[0, 0]) == -127 and int(q[0, 35]) == 127
    assert q[0, 32:36].tolist() == [0, 16, -8, 127]  # 0.25 * 63.5 = 15.875, -0.125 * 63.5 = -7.9375
    assert scale[1].tolist() == [0.0, 0.0] and q[1].abs().sum() == 0  # all-zero blocks stay zero
    fq = fake_quantize_weight_blockwise(w)
    assert torch.isfinite(fq).all() and torch.equal(fq[1], torch.zeros(40))
    padded = torch.nn.functional.pad(q.float(), (0, 24)).reshape(2, 2, 32) * scale[..., None]
    assert torch.equal(fq, padded.reshape(2, 64)[:, :40])


def test_activation_blocks_are_per_row() -> None:
    x = torch.randn(3, 4, 70, generator=torch.Generator().manual_seed(7))
    fq = fake_quantize_activation_blockwise(x)
    for index in np.ndindex(3, 4):
        assert torch.equal(fq[index], fake_quantize_activation_blockwise(x[index][None])[0])
    big = x.clone()
    big[0, 0] *= 1000  # one row's range never reaches another's
    assert torch.equal(fake_quantize_activation_blockwise(big)[1:], fq[1:])


def test_gradients_are_straight_through() -> None:
    g = torch.Generator().manual_seed(8)
    w = torch.randn(8, 45, generator=g).requires_grad_(True)
    x = torch.randn(2, 3, 45, generator=g).requires_grad_(True)
    F.linear(fake_quantize_activation_blockwise(x), fake_quantize_weight_blockwise(w)).sum().backward()
    ones = torch.ones(2, 3, 8)
    assert torch.allclose(w.grad, (ones.reshape(-1, 8).T @ fake_quantize_activation_blockwise(x).detach().reshape(-1, 45)))
    assert torch.allclose(x.grad, ones @ fake_quantize_weight_blockwise(w).detach())
    up = torch.randn(8, 45, generator=g)
    w.grad = None
    fake_quantize_weight_blockwise(w).backward(up)
    assert torch.equal(w.grad, up)


def test_bfloat16_input_keeps_its_dtype() -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    fq = fake_quantize_activation_blockwise(x)
    assert fq.dtype == torch.bfloat16
    assert torch.equal(fq, fake_quantize_activation_blockwise(x.float()).to(torch.bfloat16))


@pytest.mark.parametrize("block", [0, 8, 24, 48, True])
def test_bad_block_is_refused(block: int) -> None:
    with pytest.raises(EdgeloraError, match=rf"weight_block={block!r} is not supported; give a power of two >= 16"):
        quantize_weight_blockwise(torch.ones(2, 64), block)
    with pytest.raises(EdgeloraError, match="weight_block="):
        fake_quantize_activation_blockwise(torch.ones(2, 64), block)


def test_activation_integers_are_the_kernels_on_many_rows() -> None:
    """Identity weights (integer 127, scale 1/127) make the kernel output q * s * (127 * (1/127)), so
    round(y / s) reads back its integer for every activation: over ~260k values, ours are the same. This
    caught 127 / amax computed as 127 * (1 / amax) (torch's scalar / tensor), one ulp off and enough to
    move a value sitting next to a .5 tie."""
    g = torch.Generator().manual_seed(10)
    amax = torch.rand(4096, 1, generator=g, dtype=torch.float64) * 3 + 0.01
    ties = torch.randint(-126, 126, (4096, 2 * BLOCK), generator=g) + 0.5
    x = (ties * amax / 127).to(torch.float32)  # within an ulp or two of a .5 tie: the rounding decides
    x[:, 0] = x[:, BLOCK] = amax[:, 0].to(torch.float32)  # each block's max
    q, scale = quantize_weight_blockwise(torch.eye(2 * BLOCK))
    (y,) = matmul_nbits(q, scale).run(None, {"x": x.numpy()})
    amax = x.reshape(4096, 2, BLOCK).abs().amax(-1).repeat_interleave(BLOCK, dim=1)
    s = amax / torch.full_like(amax, 127.0)
    kernel_q = torch.round(torch.from_numpy(y) / s)
    ours_q = torch.round(fake_quantize_activation_blockwise(x) / s)
    assert torch.equal(kernel_q, ours_q), f"{int((kernel_q != ours_q).sum())} activation integers differ"


def test_scales_are_float32_divisions() -> None:
    """scale = amax / 127 and inverse = 127 / amax, each one correctly rounded float32 division, as MLAS."""
    amax = torch.rand(100_000, generator=torch.Generator().manual_seed(12)) * 5 + 1e-3
    x = torch.zeros(100_000, BLOCK)
    x[:, 0] = amax
    x[:, 1] = (amax.double() * 46.5 / 127).float()  # next to the 46.5 tie
    expected = np.rint(x[:, 1].numpy() * (np.float32(127.0) / amax.numpy()))  # numpy: one rounding per op
    q = torch.round(fake_quantize_activation_blockwise(x)[:, 1] / (amax / torch.full_like(amax, 127.0)))
    assert torch.equal(q, torch.from_numpy(expected))
    _, scale = quantize_weight_blockwise(x)
    assert np.array_equal(scale[:, 0].numpy(), amax.numpy() / np.float32(127.0))
