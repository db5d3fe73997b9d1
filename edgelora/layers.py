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

from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import fake_quantize_activation, fake_quantize_weight

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


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


class AdaptedLinear(nn.Module):
    """Wraps a frozen `nn.Linear`; holds any number of named adapters, one of which is active."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.bottleneck = nn.ModuleDict()
        self.quant: QuantConfig | None = None
        self.active: str | None = None
        self.merged: str | None = None
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

    def add_lora(self, name: str, config: LoraConfig) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self._to_base_device(name)

    def add_bottleneck(self, name: str, config: BottleneckConfig) -> None:
        self.bottleneck[name] = Bottleneck(self.out_features, config)
        self._to_base_device(name)

    def _to_base_device(self, name: str) -> None:
        ref = self.base.weight
        for table in (self.lora_A, self.lora_B, self.bottleneck):
            if name in table:
                table[name].to(device=ref.device, dtype=ref.dtype)

    def delete(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.bottleneck):
            if name in table:
                del table[name]
        self.scaling.pop(name, None)
        if self.active == name:
            self.active = None

    def lora_delta(self, name: str) -> torch.Tensor:
        """s * B @ A as an (out, in) tensor — the update a merged export adds to W0."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

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
            xq = fake_quantize_activation(x) if self.quant.activations == "dynamic" else x
            if lora is not None and self.quant.mode == "merged":
                # Training sees the very tensor the merged export quantizes: Q(W0 + s B A).
                y = F.linear(xq, fake_quantize_weight(weight + self.lora_delta(lora), self.quant.weight_bits), bias)
            else:
                y = F.linear(xq, fake_quantize_weight(weight, self.quant.weight_bits), bias)
                if lora is not None:
                    y = y + self._lora_branch(lora, x)  # the switchable branch stays float
        if name is not None and name in self.bottleneck:
            y = self.bottleneck[name](y)
        return y

    def _lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_A[name](self.lora_dropout[name](x))  # (..., r)
        return self.scaling[name] * self.lora_B[name](h)

    def extra_repr(self) -> str:
        q = "" if self.quant is None else f", fake_quant=int{self.quant.weight_bits}/{self.quant.mode}"
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}{q}"
