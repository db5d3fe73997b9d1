"""The one int8 quantizer: training fake-quantizes with it and the exporter writes its integers.

Weights: symmetric, per output channel, round half to even, clamp to [-qmax, qmax] with qmax = 127 for
8-bit or 63 for 7-bit (CPUs whose u8 x s8 kernel saturates 16-bit pair sums: AVX2/AVX-512 without VNNI).
Activations: per-tensor asymmetric uint8, either dynamic — computed exactly as ONNX Runtime's
DynamicQuantizeLinear, from each tensor's own extremes — or static, with a scale and zero point fixed by
calibration (see `edgelora/calibrate.py`) and applied exactly as ONNX Runtime's QuantizeLinear does.
Gradients pass straight through the rounding. In the weight and dynamic quantizers no clamp ever cuts, since
the ranges come from the tensor's own extremes; the static clamp does cut, and no gradient flows through it.
"""

from __future__ import annotations

import torch

from edgelora.errors import EdgeloraError

WEIGHT_BITS = (8, 7)


def weight_qmax(bits: int) -> int:
    """Largest integer magnitude of a symmetric weight grid: 127 for 8 bits, 63 for 7 bits."""
    if bits not in WEIGHT_BITS:
        raise EdgeloraError(f"weight_bits={bits} is not supported; choose from {WEIGHT_BITS}")
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel scale of a (out, in) weight: max|w| / qmax, and 1 for an all-zero row."""
    qmax = weight_qmax(bits)
    amax = weight.detach().abs().amax(dim=1)  # (out,)
    scale = amax / qmax
    return torch.where(amax > 0, scale, torch.ones_like(scale)).to(torch.float32)


def quantize_weight(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), float32 scale (out,)) — what the exporter writes into the graph."""
    w = weight.detach().to(torch.float32)
    scale = weight_scale(w, bits)
    qmax = weight_qmax(bits)
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)  # round half to even, as ORT
    return q.to(torch.int8), scale


class _WeightFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        qmax = weight_qmax(bits)
        scale = weight_scale(weight, bits).to(weight.dtype)[:, None]  # (out, 1)
        return torch.clamp_(torch.round_(weight / scale), -qmax, qmax).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quantize_weight(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Quantize-dequantize a (out, in) weight on the int8 grid, straight-through in the backward pass.

    The scale is recomputed from the current weight every call (it follows training) and is treated
    as a constant for the gradient, so d(out)/d(weight) is the identity — the clamp never cuts a weight
    because the scale comes from the weight's own maximum. One autograd node, so QAT adds no backward
    work beyond passing the gradient on.
    """
    return _WeightFakeQuant.apply(weight, bits)


UINT8_MAX = 255


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of uint8 over [lo, hi] widened to include 0, as DynamicQuantizeLinear chooses them.

    float32 scale = (max(hi, 0) - min(lo, 0)) / 255 (1 for an all-zero range), zero point round(-lo / scale)
    saturated to [0, 255] and held as a float32 integer. Static quantization uses the same rule on a
    calibrated range, so one definition serves both modes.
    """
    lo = torch.clamp(lo.detach().to(torch.float32), max=0.0)
    hi = torch.clamp(hi.detach().to(torch.float32), min=0.0)
    scale = (hi - lo) / float(UINT8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, UINT8_MAX)
    return scale, zero_point


def activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of DynamicQuantizeLinear: the range always includes 0, uint8 [0, 255]."""
    return qparams_from_range(*torch.aminmax(x.detach()))


class _ActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scale, zp = activation_qparams(x)
        q = torch.round_(x.to(torch.float32) / scale).add_(zp).clamp_(0, 255)
        return q.sub_(zp).mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-tensor uint8 quantize-dequantize of an activation, as ONNX Runtime does at run time.

    The dynamic range is taken from the whole tensor (every row of the batch, padding included, as
    ORT sees it), so no value falls outside it and the straight-through gradient is exact there.
    """
    return _ActFakeQuant.apply(x)


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The uint8 tensor ONNX Runtime's QuantizeLinear(x, scale, zero_point) gives: x / scale rounded half to
    even, plus the zero point, saturated to [0, 255]."""
    q = torch.round(x.detach().to(torch.float32) / scale).add_(zero_point)
    return q.clamp_(0, UINT8_MAX).to(torch.uint8)


class _StaticActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q = torch.round_(x.to(torch.float32) / scale).add_(zero_point)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((q >= 0) & (q <= UINT8_MAX))  # inside the grid: where the gradient passes
        return q.clamp_(0, UINT8_MAX).sub_(zero_point).mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quantize_activation_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Static per-tensor uint8 quantize-dequantize with fixed (scale, zero_point), as QuantizeLinear does.

    Values outside the calibrated range saturate at 0 or 255, and their gradient is zero (the clamp cuts,
    as in PyTorch's FakeQuantize); inside it the gradient passes straight through the rounding.
    `scale` and `zero_point` are float32 scalars (`qparams_from_range` gives them).
    """
    return _StaticActFakeQuant.apply(x, scale, zero_point)


# --- blockwise int8: the decoder scheme, ONNX Runtime's MatMulNBits (bits 8, accuracy_level 4) ----------------
#
# MLAS's int8 path quantizes its float input per row and per block of `block` values along K (the last block
# may be shorter): amax = max|x| over the block, scale = amax / 127 and inverse = 127 / amax, both float32
# divisions (inverse 0 for an all-zero block), q = x * inverse rounded half to even. Weights use the same rule
# here, so one function gives both: symmetric, never clamped (|q| <= 127 by construction), stored by the
# exporter as uint8 q + 128 (MatMulNBits' default 8-bit zero point). A row's integers depend on that row
# alone, so a request's result does not change with its batch-mates.

BLOCK = 32
_BLOCK_QMAX = 127.0


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise EdgeloraError(f"weight_block={block!r} is not supported; give a power of two >= 16, e.g. 32")


def _blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q as float32 (..., n_blocks, block), scale float32 (..., n_blocks), padded columns) of the last dim."""
    _check_block(block)
    k = x.shape[-1]
    pad = -k % block
    xf = x.detach().to(torch.float32)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))  # zeros change no block's max
    xb = xf.reshape(*xf.shape[:-1], (k + pad) // block, block)
    amax = xb.abs().amax(dim=-1)  # (..., n_blocks)
    qmax = torch.full_like(amax, _BLOCK_QMAX)  # tensor / tensor: torch computes `127.0 / t` as 127 * (1 / t),
    scale = amax / qmax  # one ulp off MLAS's single division, which moves values next to a .5 tie
    inverse = torch.where(amax > 0, qmax / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    q = torch.round(xb * inverse[..., None])  # round half to even, as _mm512_roundscale_ps(NEAREST)
    return q, scale, pad


def quantize_weight_blockwise(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q (out, in), float32 scale (out, ceil(in / block))) of a (out, in) weight, blocks along `in`.

    `in` need not be a multiple of `block`: the last block is shorter, as MatMulNBits pads it with zeros.
    """
    q, scale, pad = _blockwise(weight, block)
    q = q.reshape(weight.shape[0], -1)
    return q[:, : q.shape[1] - pad].to(torch.int8), scale


def _dequantize_blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    q, scale, pad = _blockwise(x, block)
    y = (q * scale[..., None]).reshape(*x.shape[:-1], -1)
    return y[..., : y.shape[-1] - pad].to(x.dtype)


class _BlockwiseFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:  # type: ignore[override]
        return _dequantize_blockwise(x, block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def fake_quantize_weight_blockwise(weight: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize a (out, in) weight on the symmetric int8 grid per block of `block` inputs,
    straight-through in the backward pass (no clamp ever cuts: each block's scale is its own max)."""
    return _BlockwiseFakeQuant.apply(weight, block)


def fake_quantize_activation_blockwise(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Quantize-dequantize an activation as MatMulNBits' int8 path does at run time: per row (every leading
    index) and per block of `block` values of the last dimension, symmetric int8; straight-through gradient.
    Each row's result depends on that row only, which is what makes the int8 decoder batch-invariant."""
    return _BlockwiseFakeQuant.apply(x, block)


# --- per-row int8: the decoder's rowwise scheme, plain ops into ONNX Runtime's MatMulIntegerToFloat ------------
#
# The graph quantizes a linear's input row by row: amax = max(max|x| over the last dim, ROW_TINY) (ReduceMax,
# Max), scale = amax / 127 as a float32 division (Div), q = round(x / scale) half to even, + 128, as uint8 (one
# QuantizeLinear whose block is the whole row; ONNX Runtime divides in float32 as torch does), fed to the kernel
# with zero point 128; the product's float row is then multiplied by `scale` (Mul). An all-zero row gives q = 0
# and output 0. No clamp cuts (|x / scale| <= 127 up to one rounding, which rounds back to 127), and a row's
# integers depend on that row only, so a request's result does not change with its batch-mates. Weights are
# the per-output-channel grid above (`quantize_weight`, 7 or 8 bits).

ROW_QMAX = 127.0
ROW_TINY = 1e-30  # the floor the graph's Max puts under a row's max: an all-zero row divides by it, not by 0


def quantize_activation_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as float32 integers in [-127, 127] (..., k), float32 row scale (..., 1)): what the graph's nodes compute."""
    xf = x.detach().to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=ROW_TINY)  # (..., 1)
    scale = amax / torch.full_like(amax, ROW_QMAX)  # tensor / tensor: one float32 division, as ONNX Runtime's Div
    return torch.round(xf / scale), scale


class _RowwiseActFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        q, scale = quantize_activation_rowwise(x)
        return (q * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def fake_quantize_activation_rowwise(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize an activation per row (every leading index), symmetric int8 by the row's own max, as
    the rowwise decoder graph does at run time; straight-through gradient (no clamp ever cuts)."""
    return _RowwiseActFakeQuant.apply(x)
