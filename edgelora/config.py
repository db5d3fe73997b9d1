"""Typed configs: one frozen dataclass per adapter kind and one for the int8 recipe.

Each is checked on construction with a message naming the field, the value and what is allowed, and
round-trips through JSON (it is saved in `adapter_config.json` beside the weights).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgelora.errors import EdgeloraError

ADAPTER_KINDS = ("lora", "bottleneck")
EXPORT_MODES = ("merged", "switchable")
BOTTLENECK_PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATION_MODES = ("dynamic", "static", "none", "per-row")
LORA_INITS = ("default", "pissa", "int8-residual")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise EdgeloraError(f"{name}={value!r} is not supported; choose from {', '.join(map(str, allowed))}")


def check_smoothing(alpha: object) -> None:
    """Refuse a SmoothQuant migration strength outside [0, 1], or not a number (None, no smoothing, is the caller's)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise EdgeloraError(f"smoothing={alpha!r} must be between 0 and 1 (SmoothQuant's alpha, e.g. 0.7)")


INT8_RESIDUAL_NEEDS_SWITCHABLE = (
    "init='int8-residual' fits the adapter to the int8 rounding error of a base that stays Q(W0), which only "
    "the switchable int8 recipe keeps: add the adapter with quant=QuantConfig(mode='switchable')"
)
INT8_RESIDUAL_SMOOTHING = ("smoothing with init='int8-residual': the init fits the rounding error of the unsmoothed "
                           "base, which smoothing changes; drop one of them")


@dataclass(frozen=True)
class QuantConfig:
    """The int8 recipe shared by training (fake quantization) and export (real integers).

    Args:
        weight_bits: 8, or 7 for CPUs whose u8 x s8 kernel saturates (AVX2 / AVX-512 without VNNI);
            training and export must agree, so the recipe travels in the adapter's config.
        activations: "dynamic" fake-quantizes each quantized layer's input per tensor to uint8 as ONNX
            Runtime's DynamicQuantizeLinear does at run time; "static" uses a per-tensor uint8 scale and
            zero point fixed by calibration (`edgelora.calibrate`), which the export writes as constants
            and which save with the adapter; "none" quantizes weights only; "per-row" is the decoder's
            rowwise scheme (see `block_layers`).
        mode: which weight training sees: "merged" fake-quantizes W0 + s*B*A (the tensor a merged export
            quantizes), "switchable" fake-quantizes W0 alone and keeps the adapter branch float.
        skip_layers: layer names (as `AdapterModel.quantizable_names()` gives them) kept fp32 — mixed
            precision for the layers int8 hurts most (the exporter's `keep_fp32="auto"` measures which).
            Training skips them in fake quantization and the export leaves them fp32, so both agree.
        smoothing: SmoothQuant migration strength alpha in [0, 1] (`edgelora.smooth`), or None for none.
            The factors it gives are computed once from the frozen base on calibration text, then training
            and export both apply them; they save with the adapter (`smoothing.safetensors`).
        weight_block: 0 is the encoder scheme above (per-output-channel weights, per-tensor uint8
            activations). A power of two >= 16 (32 for the decoder export) is the decoder scheme of ONNX
            Runtime's MatMulNBits: symmetric int8 weights per block of `weight_block` inputs and, with
            activations "dynamic", each input row quantized per block too, so a row's result never depends
            on its batch-mates. It needs 8-bit weights and dynamic or no activation quantization (with
            activations "per-row", it is the block size of `block_layers` alone, and `weight_bits` that of the
            other layers).
        block_layers: the decoder's rowwise scheme (activations "per-row"): every layer gets symmetric
            per-output-channel weights of `weight_bits` and its input quantized per row by the row's own max
            (ONNX Runtime's MatMulIntegerToFloat, faster than MatMulNBits on CPUs without VNNI), except the
            layers named here (suffixes at a dot, e.g. "mlp.down_proj", "lm_head"), which keep the blockwise
            recipe of `weight_block` because their inputs carry the outliers one row scale handles worst.
    """

    weight_bits: int = 8
    activations: str = "dynamic"
    mode: str = "merged"
    skip_layers: tuple[str, ...] = ()
    smoothing: float | None = None
    weight_block: int = 0
    block_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("weight_bits", self.weight_bits, (8, 7))
        _check_weight_block(self)
        _check_choice("activations", self.activations, ACTIVATION_MODES)
        _check_choice("mode", self.mode, EXPORT_MODES)
        if isinstance(self.skip_layers, str) or not all(isinstance(n, str) and n for n in self.skip_layers):
            raise EdgeloraError(f"skip_layers={self.skip_layers!r} must be a list of layer names, e.g. "
                                "['encoder.layer.0.output.dense']")
        object.__setattr__(self, "skip_layers", tuple(sorted(set(self.skip_layers))))  # JSON lists come back as tuples
        _check_block_layers(self)
        if self.smoothing is not None:
            check_smoothing(self.smoothing)


def _check_weight_block(quant: QuantConfig) -> None:
    block = quant.weight_block
    if isinstance(block, bool) or not isinstance(block, int) or (block != 0 and (block < 16 or block & (block - 1))):
        raise EdgeloraError(f"weight_block={block!r} must be 0 (per-channel int8) or a power of two >= 16 "
                            "(blockwise int8, 32 for decoders)")
    if block and quant.weight_bits != 8 and quant.activations != "per-row":
        raise EdgeloraError(f"weight_block={block} (blockwise int8) needs weight_bits=8, got {quant.weight_bits}")
    if block and quant.activations == "static":
        raise EdgeloraError(f"weight_block={block} quantizes activations per row and block at run time; "
                            "use activations='dynamic' or 'none', not 'static'")


def _check_block_layers(quant: QuantConfig) -> None:
    """The rowwise scheme's rules: block_layers and weight_block go together, and only with per-row activations."""
    layers = quant.block_layers
    if isinstance(layers, str) or not all(isinstance(n, str) and n for n in layers):
        raise EdgeloraError(f"block_layers={layers!r} must be a list of layer-name suffixes, e.g. "
                            "['mlp.down_proj', 'lm_head']")
    object.__setattr__(quant, "block_layers", tuple(sorted(set(layers))))
    if quant.activations != "per-row":
        if layers:
            raise EdgeloraError(f"block_layers={list(layers)} applies to activations='per-row' (the decoder's rowwise "
                                "scheme); drop it or set activations='per-row'")
        return
    if layers and not quant.weight_block:
        raise EdgeloraError(f"block_layers={list(layers)} keeps those layers blockwise and needs weight_block, "
                            "e.g. weight_block=32")
    if quant.weight_block and not layers:
        raise EdgeloraError(f"weight_block={quant.weight_block} with activations='per-row' applies to block_layers; "
                            "name them (e.g. ['mlp.down_proj', 'lm_head']) or set weight_block=0")


def _suffix_match(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def scheme_of(quant: QuantConfig) -> str:
    """The recipe's int8 scheme by name: "rowwise" (decoder, per-row activations), "block" (decoder,
    MatMulNBits) or "per-channel" (encoders)."""
    if quant.activations == "per-row":
        return "rowwise"
    return "block" if quant.weight_block else "per-channel"


def is_block_layer(quant: QuantConfig, name: str) -> bool:
    """Whether the rowwise recipe keeps layer `name` (a module name) on the blockwise grid."""
    return _suffix_match(name, quant.block_layers)


def layer_recipe(quant: QuantConfig | None, name: str) -> QuantConfig | None:
    """The recipe one layer computes: None (fp32) for `skip_layers`; under the rowwise scheme either the pure
    rowwise recipe (per-channel weights, per-row activations) or, for `block_layers`, the blockwise one, so a
    layer never has to tell the two apart by name."""
    if quant is None or name in quant.skip_layers:
        return None
    if quant.activations != "per-row":
        return quant
    if is_block_layer(quant, name):
        return QuantConfig(weight_block=quant.weight_block, mode=quant.mode)
    return dataclasses.replace(quant, weight_block=0, block_layers=())


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation: y = W0 x + (alpha / r) * B A x.

    Args:
        r: rank of the update. alpha / r keeps the update's size steady as r changes (Hu et al. 2021, §4.1);
            with `use_rslora` the scale is alpha / sqrt(r), which keeps it steady at large r (Kalajdzievski 2023).
        target_modules: module-name suffixes to adapt; None picks the attention projections of the
            architecture (Wq, Wk, Wv, Wo).
        init: how A and B start; every choice leaves the deployed model equal to the base at step 0.
            "default": A Kaiming-uniform, B zero.
            "pissa": A, B from W0's top-r singular triplets (Meng et al. 2024). The layer subtracts that
            starting product, which plays the part of PiSSA's residual base W0 - B A without touching W0,
            so training sees exactly what deploys; a saved PiSSA adapter is the plain LoRA
            [B, -B_init] [A; A_init] of rank 2r that applies to the original base.
            "int8-residual": A, B the best rank-r fit of W0 - Q(W0), Q the shared fake quantizer at the
            recipe's bits (LoftQ-like, Li et al. 2023), so that Q(W0) + B A ~ W0 at step 0. Needs the
            switchable int8 recipe, where the base is Q(W0) and the branch float.
        rank_pattern: per-layer ranks overriding r, as PEFT's `rank_pattern`: each key is a regex matched
            against the end of a layer name at a dot (the first key that matches wins), e.g.
            {"encoder.layer.0.attention.self.query": 2}. Scaling is then alpha / r_layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    include_mlp: bool = False
    use_rslora: bool = False
    init: str = "default"
    rank_pattern: tuple[tuple[str, int], ...] | None = None
    kind: str = field(default="lora", init=False)

    def __post_init__(self) -> None:
        if not _positive_int(self.r):
            raise EdgeloraError(f"r={self.r!r} must be a positive integer (the LoRA rank), e.g. 8")
        if not self.alpha > 0:
            raise EdgeloraError(f"alpha={self.alpha!r} must be positive (the update is scaled by alpha/r)")
        if not 0.0 <= self.dropout < 1.0:
            raise EdgeloraError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise EdgeloraError("target_modules=() adapts nothing; give module names or leave it unset")
        _check_choice("init", self.init, LORA_INITS)
        if self.rank_pattern is not None:
            object.__setattr__(self, "rank_pattern", _rank_pattern(self.rank_pattern) or None)

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r)

    def scaling_for(self, r: int) -> float:
        """The update's scale in a layer of rank r: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (r**0.5 if self.use_rslora else r)

    def rank_for(self, layer: str) -> int:
        """Layer `layer`'s rank: the first `rank_pattern` key matching the end of its name (as PEFT), else r."""
        for key, rank in self.rank_pattern or ():
            if re.match(rf"(.*\.)?({key})$", layer):
                return rank
        return self.r


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _rank_pattern(value: Any) -> tuple[tuple[str, int], ...]:
    """A {layer regex: rank} mapping (or its pairs) as an ordered tuple of pairs, each checked."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = [(key, rank) for key, rank in pairs]
    except (TypeError, ValueError):
        raise EdgeloraError(f"rank_pattern={value!r} must map layer names to ranks, e.g. {{'query': 4}}") from None
    for key, rank in pairs:
        if not isinstance(key, str) or not key:
            raise EdgeloraError(f"rank_pattern key {key!r} must be a non-empty layer name or regex")
        try:
            re.compile(key)
        except re.error as exc:
            raise EdgeloraError(f"rank_pattern key {key!r} is not a valid regex ({exc})") from None
        if not _positive_int(rank):
            raise EdgeloraError(f"rank_pattern[{key!r}]={rank!r} must be a positive integer (that layer's rank)")
    return tuple(pairs)


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of `config`'s adapter as saved: a plain LoRA (init "default") applying to the original base.

    A PiSSA adapter is saved as [B, -B_init] [A; A_init]: every rank doubles, and alpha changes so that
    each layer keeps its scale (alpha / r or alpha / sqrt(r)). Any other init only chose the start.
    """
    if config.init != "pissa":
        return dataclasses.replace(config, init="default")
    pattern = None if config.rank_pattern is None else {k: 2 * r for k, r in config.rank_pattern}
    alpha = config.alpha * (2**0.5 if config.use_rslora else 2)
    return dataclasses.replace(config, r=2 * config.r, alpha=alpha, rank_pattern=pattern, init="default")


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


def check_recipe(adapter: AdapterConfig, quant: QuantConfig | None) -> None:
    """Refuse an adapter config that cannot train as it deploys under `quant` (None: no fake quantization).

    Each config checks its own fields on construction; these rules join two of them, so `AdapterModel.add_adapter`
    calls this, and the CLI calls it before minutes of loading.
    """
    if getattr(adapter, "init", None) != "int8-residual":
        return
    if quant is None or quant.mode != "switchable":
        raise EdgeloraError(INT8_RESIDUAL_NEEDS_SWITCHABLE)
    if quant.smoothing is not None:
        raise EdgeloraError(INT8_RESIDUAL_SMOOTHING)


def config_to_dict(config: AdapterConfig | QuantConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    if isinstance(config, QuantConfig) and not config.weight_block:
        del data["weight_block"]  # the per-channel recipe saves as it did before blockwise int8 existed
    if isinstance(config, QuantConfig):
        if config.block_layers:
            data["block_layers"] = list(config.block_layers)
        else:
            del data["block_layers"]  # the other schemes save as they did before the rowwise one existed
    if "target_modules" in data and data["target_modules"] is not None:
        data["target_modules"] = list(data["target_modules"])
    if data.get("rank_pattern") is not None:
        data["rank_pattern"] = dict(data["rank_pattern"])
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
