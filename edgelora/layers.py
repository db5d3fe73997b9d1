"""The adapted linear layer: a frozen `nn.Linear` with named LoRA and bottleneck adapters and int8 fake quant.

LoRA runs in parallel with the base weight (y = W0 x + s B A x); a bottleneck adapter runs in series
after it (y + up(act(down(y)))). One wrapper serves both so that a layer carries several named adapters,
the fake quantizer sees exactly the weight the exporter will quantize, and the exporter finds the
adapter weights under fixed names: `lora_A`, `lora_B`, `bottleneck.<name>.down`, `bottleneck.<name>.up`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgelora import svd
from edgelora.config import INT8_RESIDUAL_NEEDS_SWITCHABLE, BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import (
    fake_quantize_activation,
    fake_quantize_activation_blockwise,
    fake_quantize_activation_rowwise,
    fake_quantize_weight,
    fake_quantize_weight_blockwise,
)

# Where adapter tensors sit in a state dict, by the attribute names below: `<layer>.lora_A.<name>.weight`,
# `<layer>.lora_B.<name>.weight`, `<layer>.bottleneck.<name>.{down,up}.{weight,bias}`; PEFT's files say
# `<layer>.lora_A.weight`. The adapter format, checkpoints and the exporter find adapter weights by these.
LORA_A_KEY, LORA_B_KEY, BOTTLENECK_KEY = ".lora_A.", ".lora_B.", ".bottleneck."
ADAPTER_KEYS = (LORA_A_KEY, LORA_B_KEY, BOTTLENECK_KEY)

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
STATIC_NEEDS_CALIBRATION = (
    "activations='static' needs calibrated input ranges; run edgelora.calibrate.calibrate(model, batches) first"
)


class Bottleneck(nn.Module):
    """down -> activation -> up, added to its input; `up` starts at zero so the adapter starts as identity."""

    def __init__(self, width: int, config: BottleneckConfig) -> None:
        super().__init__()
        inner = max(1, width // config.reduction_factor)
        self.down = nn.Linear(width, inner)
        self.act = _ACTIVATIONS[config.activation]()
        self.up = nn.Linear(inner, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class LoraStart(nn.Module):
    """PiSSA's frozen starting product B_init @ A_init, subtracted beside the trained branch.

    Buffers, not parameters, and not persistent: the state dict (hence checkpoints and fingerprints)
    never holds them; they are recomputed from the base weight, which is deterministic.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A.detach().clone(), persistent=False)  # (r, in)
        self.register_buffer("B", B.detach().clone(), persistent=False)  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)


def weight_quantizer(quant: QuantConfig):
    """The weight fake quantizer of a recipe: blockwise (decoder) when `weight_block` is set, else per channel."""
    if quant.weight_block:
        return lambda w: fake_quantize_weight_blockwise(w, quant.weight_block)
    return lambda w: fake_quantize_weight(w, quant.weight_bits)


def svd_init(weight: torch.Tensor, r: int, scaling: float, init: str,
             quant: QuantConfig | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting (A (r, in), B (out, r)) for init "pissa" or "int8-residual", with scaling * B @ A the fitted part."""
    W = weight.detach().float()
    if init == "pissa":
        A, B, _ = svd.pissa_init(W, r)
    else:
        if quant is None or quant.mode != "switchable":
            raise EdgeloraError(INT8_RESIDUAL_NEEDS_SWITCHABLE)
        A, B, _ = svd.int8_residual_init(W, r, weight_quantizer(quant))
    root = scaling**0.5  # split the scale evenly so that scaling * B @ A is the fit, as PEFT's PiSSA does
    A, B = A / root, B / root
    if A.shape[0] < r:  # r above min(out, in): the extra components start (and stay) zero
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1)
    return A.to(weight.dtype), B.to(weight.dtype)


class AdaptedLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; holds any number of named adapters, one of which is active."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_start = nn.ModuleDict()  # PiSSA adapters only: the frozen starting product
        self.scaling: dict[str, float] = {}
        self.bottleneck = nn.ModuleDict()
        self.quant: QuantConfig | None = None
        # Static activations: the layer input's calibrated range and uint8 (scale, zero_point), and the static
        # fake quantizer (`edgelora.calibrate.ActivationObserver`); set by `calibrate` or by loading an adapter.
        self.register_module("act_observer", None)
        # SmoothQuant (see `edgelora/smooth.py`): per-input-channel factors s, the int8 path computes
        # Q(x * (1/s)) Q(W diag(s)) instead of Q(x) Q(W); None: no smoothing. Buffers, not persistent:
        # they travel in the adapter's own file, not in the base state dict or its fingerprint.
        self.register_buffer("smooth", None, persistent=False)  # (in,)
        self.register_buffer("smooth_inv", None, persistent=False)  # (in,) float32 1/s, the graph's Mul constant
        self.active: str | None = None
        self.merged: str | None = None
        self._int8_cache: tuple | None = None  # (key, Q(weight)) while no gradient is taken: see _int8_weight
        self._unmerged_weight: torch.Tensor | None = None
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def adapter_names(self) -> list[str]:
        return sorted(set(self.lora_A) | set(self.bottleneck))

    def add_lora(self, name: str, config: LoraConfig, r: int | None = None) -> None:
        """Add LoRA `name` of rank `r` (default config.r), initialised as `config.init` says."""
        r = config.r if r is None else r
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(r)
        init = config.init
        if init == "int8-residual" and self.quant is None:
            init = "default"  # a layer the recipe keeps fp32 (skip_layers) has no rounding error to absorb
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        else:
            A, B = svd_init(self.base.weight, r, self.scaling[name], init, self.quant)
            with torch.no_grad():
                self.lora_A[name].weight.copy_(A)
                self.lora_B[name].weight.copy_(B)
            if init == "pissa":
                self.lora_start[name] = LoraStart(A, B)
        self._to_base_device(name)

    def add_bottleneck(self, name: str, config: BottleneckConfig) -> None:
        self.bottleneck[name] = Bottleneck(self.out_features, config)
        self._to_base_device(name)

    def _to_base_device(self, name: str) -> None:
        ref = self.base.weight
        for table in (self.lora_A, self.lora_B, self.lora_start, self.bottleneck):
            if name in table:
                table[name].to(device=ref.device, dtype=ref.dtype)

    def delete(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_start, self.bottleneck):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        if self.active == name:
            self.active = None

    def lora_delta(self, name: str) -> torch.Tensor:
        """s * B @ A (less a PiSSA start) as an (out, in) tensor — the update a merged export adds to W0."""
        A, B = self.lora_weights(name)
        return self.scaling[name] * (B @ A)

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the plain LoRA, at this layer's scaling, that applies to the original base weight.

        The trained factors themselves, except for PiSSA: [A; A_init] and [B, -B_init], of twice the rank.
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_start:
            start = self.lora_start[name]
            A, B = torch.cat([A, start.A]), torch.cat([B, -start.B], dim=1)  # (2r, in), (out, 2r)
        return A, B

    def merge(self) -> None:
        """Fold the active LoRA into the base weight; merging twice is a no-op, `unmerge` restores W0 bit for bit."""
        name = self.active
        if self.merged is not None or name is None or name not in self.lora_A:
            return
        with torch.no_grad():
            self._unmerged_weight = self.base.weight.detach().clone()
            self.base.weight.add_(self.lora_delta(name))
        self.merged = name

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        if self.merged is not None and name != self.merged:
            raise EdgeloraError(
                f"adapter {self.merged!r} is merged into the base weights; unmerge it before activating {name!r}"
            )
        lora = name if (name in self.lora_A and self.merged is None) else None
        weight, bias = self.base.weight, self.base.bias
        if self.quant is None:
            y = F.linear(x, weight, bias)
            if lora is not None:
                y = y + self._lora_branch(lora, x)
        else:
            xs = x if self.smooth_inv is None else x * self.smooth_inv
            xq = self._quantize_input(xs)
            merged = lora is not None and self.quant.mode == "merged"
            # merged: training sees the very tensor the merged export quantizes, Q(W0 + s B A)
            y = F.linear(xq, self._int8_weight(lora if merged else None), bias)
            if lora is not None and not merged:
                y = y + self._lora_branch(lora, x)  # the switchable branch stays float
        if name is not None and name in self.bottleneck:
            y = self.bottleneck[name](y)
        return y

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 path's input as the recipe quantizes it: dynamic, static (calibrated) or not at all."""
        if self.quant.activations == "dynamic":
            if self.quant.weight_block:  # MatMulNBits: each row per block of the input dimension
                return fake_quantize_activation_blockwise(x, self.quant.weight_block)
            return fake_quantize_activation(x)
        if self.quant.activations == "per-row":  # the rowwise decoder scheme: each row by its own max
            return fake_quantize_activation_rowwise(x)
        if self.quant.activations == "static":
            if self.act_observer is None:
                raise EdgeloraError(STATIC_NEEDS_CALIBRATION)
            return self.act_observer(x)
        return x

    def set_smoothing(self, smooth: torch.Tensor | None) -> None:
        """Smooth this layer's int8 input by per-channel factors `smooth` (in,); None removes smoothing."""
        if smooth is None:
            self.smooth = self.smooth_inv = None
            return
        ref = self.base.weight
        if smooth.shape != (self.in_features,) or not bool(torch.all(smooth > 0)):
            raise EdgeloraError(f"smoothing factors must be {self.in_features} positive numbers, got shape "
                                f"{tuple(smooth.shape)}; recompute them with edgelora.smooth.smoothing_factors")
        self.smooth = smooth.detach().to(device=ref.device, dtype=torch.float32).clone()
        self.smooth_inv = (1.0 / self.smooth).to(torch.float32)

    def smoothed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W diag(s): the (out, in) tensor the int8 grid holds when the layer is smoothed (W itself if not)."""
        return weight if self.smooth is None else weight * self.smooth.to(weight.dtype)

    def _fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_quantizer(self.quant)(self.smoothed_weight(weight))

    def _int8_weight(self, lora: str | None) -> torch.Tensor:
        """Q(W0), or Q(W0 + s B A) for a merged-recipe LoRA. Without autograd (evaluation, generation) the
        result is kept until a weight changes: a decoder's generate would otherwise requantize every layer,
        LM head included, at every token."""
        parts = [self.base.weight] + ([self.lora_A[lora].weight, self.lora_B[lora].weight] if lora else [])

        def compute() -> torch.Tensor:
            return self._fake_quant_weight(self.base.weight + self.lora_delta(lora) if lora else self.base.weight)

        if torch.is_grad_enabled():
            self._int8_cache = None
            return compute()
        key = (lora, self.quant, self.scaling.get(lora), id(self.smooth), self.merged,
               *((p.data_ptr(), p._version) for p in parts))
        if self._int8_cache is None or self._int8_cache[0] != key:
            self._int8_cache = (key, compute())
        return self._int8_cache[1]

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A[name](self.lora_dropout[name](x))  # (..., r)
        y = self.lora_B[name](h)
        if name in self.lora_start:  # PiSSA: W0 x - s B_init A_init x is the residual base, as PEFT's (no dropout)
            y = y - self.lora_start[name](x)
        return self.scaling[name] * y

    def extra_repr(self) -> str:
        q = "" if self.quant is None else f", fake_quant=int{self.quant.weight_bits}/{self.quant.mode}"
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}{q}"
