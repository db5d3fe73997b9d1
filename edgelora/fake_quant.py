"""The one int8 quantizer: training fake-quantizes with it and the exporter writes its integers.

Weights: symmetric, per output channel, round half to even, clamp to [-qmax, qmax] with qmax = 127 for
8-bit or 63 for 7-bit (CPUs whose u8 x s8 kernel saturates 16-bit pair sums: AVX2/AVX-512 without VNNI).
Activations: dynamic per-tensor asymmetric uint8, computed exactly as ONNX Runtime's DynamicQuantizeLinear.
Gradients pass straight through the rounding; neither clamp ever cuts, since both ranges come from the
tensor's own extremes.
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


def activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of DynamicQuantizeLinear: the range always includes 0, uint8 [0, 255]."""
    lo, hi = torch.aminmax(x.detach())
    lo = torch.clamp(lo.to(torch.float32), max=0.0)
    hi = torch.clamp(hi.to(torch.float32), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return scale, zero_point


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
