"""Typed configs: one frozen dataclass per adapter kind and one for the int8 recipe.

Each is checked on construction with a message naming the field, the value and what is allowed, and
round-trips through JSON (it is saved in `adapter_config.json` beside the weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgelora.errors import EdgeloraError

ADAPTER_KINDS = ("lora", "bottleneck")
EXPORT_MODES = ("merged", "switchable")
BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATION_MODES = ("dynamic", "none")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise EdgeloraError(f"{name}={value!r} is not supported; choose from {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class QuantConfig:
    """The int8 recipe shared by training (fake quantization) and export (real integers).

    Args:
        weight_bits: 8, or 7 for CPUs whose u8 x s8 kernel saturates (AVX2 / AVX-512 without VNNI);
            training and export must agree, so the recipe travels in the adapter's config.
        activations: "dynamic" fake-quantizes each quantized layer's input per tensor to uint8 as ONNX
            Runtime's DynamicQuantizeLinear does at run time; "none" quantizes weights only.
        mode: which weight training sees: "merged" fake-quantizes W0 + s*B*A (the tensor a merged export
            quantizes), "switchable" fake-quantizes W0 alone and keeps the adapter branch float.
    """

    weight_bits: int = 8
    activations: str = "dynamic"
    mode: str = "merged"

    def __post_init__(self) -> None:
        _check_choice("weight_bits", self.weight_bits, (8, 7))
        _check_choice("activations", self.activations, ACTIVATION_MODES)
        _check_choice("mode", self.mode, EXPORT_MODES)


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation: y = W0 x + (alpha / r) * B A x, with B zero at start.

    Args:
        r: rank of the update. alpha / r keeps the update's size steady as r changes (Hu et al. 2021, §4.1);
            with `use_rslora` the scale is alpha / sqrt(r), which keeps it steady at large r (Kalajdzievski 2023).
        target_modules: module-name suffixes to adapt; None picks the attention projections of the
            architecture (Wq, Wk, Wv, Wo).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    include_mlp: bool = False
    use_rslora: bool = False
    kind: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise EdgeloraError(f"r={self.r!r} must be a positive integer (the LoRA rank), e.g. 8")
        if not self.alpha > 0:
            raise EdgeloraError(f"alpha={self.alpha!r} must be positive (the update is scaled by alpha/r)")
        if not 0.0 <= self.dropout < 1.0:
            raise EdgeloraError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise EdgeloraError("target_modules=() adapts nothing; give module names or leave it unset")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck adapter: h + up(act(down(h))) after a sub-layer's output projection, up zero at start.

    Args:
        placement: "houlsby" puts one after attention and one after the feed-forward block,
            "pfeiffer" only after the feed-forward block (half the parameters, about the same accuracy).
        reduction_factor: hidden_size / bottleneck width.
    """

    reduction_factor: int = 16
    placement: str = "pfeiffer"
    activation: str = "relu"
    kind: str = field(default="bottleneck", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise EdgeloraError(f"reduction_factor={self.reduction_factor!r} must be a positive integer, e.g. 16")
        _check_choice("placement", self.placement, BOTTLENECK_PLACEMENTS)
        _check_choice("activation", self.activation, ("relu", "gelu", "silu"))


AdapterConfig = LoraConfig | BottleneckConfig


def config_to_dict(config: AdapterConfig | QuantConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    if "target_modules" in data and data["target_modules"] is not None:
        data["target_modules"] = list(data["target_modules"])
    return data


def adapter_config_from_dict(data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
    """Rebuild an adapter config from its JSON form; unknown kinds and fields are refused by name."""
    kind = data.get("kind", "lora")
    cls = {"lora": LoraConfig, "bottleneck": BottleneckConfig}.get(kind)
    if cls is None:
        raise EdgeloraError(f"{source}: unknown adapter kind {kind!r}; choose from {', '.join(ADAPTER_KINDS)}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise EdgeloraError(f"{source}: unknown field(s) {', '.join(unknown)} for a {kind} adapter")
    return cls(**{k: v for k, v in data.items() if k in names})
