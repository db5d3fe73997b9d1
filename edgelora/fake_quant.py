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
