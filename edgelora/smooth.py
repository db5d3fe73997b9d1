"""SmoothQuant: move activation outliers into the weights before int8, per input channel.

A transformer's linear inputs have a few channels far larger than the rest (BERT's LayerNorm outputs,
GELU outputs), so one per-tensor uint8 scale wastes most of its 256 levels on them. SmoothQuant (Xiao et
al. 2023) divides channel j of the input by s_j and multiplies column j of the weight by s_j, which leaves
x W^T unchanged in real numbers and evens out the input, at the cost of a wider weight column, which the
per-output-channel weight grid absorbs better. With s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), alpha sets
how much of the difficulty moves. Layers that read the same tensor (query, key, value) share one s, so
they keep sharing one quantized input (and a fused attention's one input scale).

Training and export use the same factors: `AdaptedLinear` fake-quantizes Q(x / s) Q(W diag(s)) and the
exporter writes a Mul by 1/s in front of the input's quantizer and the int8 grid of W diag(s). The
factors come from the frozen base on calibration text, before any adapter trains, and are stored with
the adapter (`smoothing.safetensors`), since the adapter was trained against them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgelora.config import INT8_RESIDUAL_SMOOTHING, check_smoothing, is_block_layer
from edgelora.errors import EdgeloraError

# Migration strength. On all-MiniLM-L6-v2 with 7-bit weights, the worst / mean sentence cosine of the
# fake-quant model to fp32 over exporters/mixed_precision.py's calibration texts was 0.949 / 0.989 unsmoothed,
# and 0.972 / 0.990, 0.963 / 0.994, 0.974 / 0.996, 0.945 / 0.993 at alpha 0.5, 0.6, 0.7, 0.8.
DEFAULT_ALPHA = 0.7
# Channels that never fired in calibration (max |x| = 0) would get s = 0; floor both maxima instead.
_FLOOR = 1e-5
SMOOTHING_FILE = "smoothing.safetensors"


def input_ranges(model: torch.nn.Module, feeds: Iterable[Mapping[str, torch.Tensor]]) \
        -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """Per-channel max |x| of every adapted layer's input over `feeds`, and the groups of layers that read one tensor.

    Runs `model` (an `AdapterModel`) as it is — call it with fake quantization off and no adapter active, so
    the ranges are the base's.
    """
    from edgelora.layers import AdaptedLinear

    layers = {name: m for name, m in model.base.named_modules() if isinstance(m, AdaptedLinear)}
    amax: dict[str, torch.Tensor] = {}
    readers: dict[int, list[str]] = {}  # id of an input tensor -> layers that read it (one forward)
    alive: list[torch.Tensor] = []  # holds each forward's inputs, so no id is reused within it
    groups: dict[tuple[str, ...], None] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)
            readers.setdefault(id(args[0]), []).append(name)
            alive.append(args[0])
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for feed in feeds:
                readers.clear()
                alive.clear()
                device = next(model.parameters()).device
                model(**{k: torch.as_tensor(v).to(device) for k, v in feed.items()})
                for names in readers.values():
                    groups[tuple(names)] = None
    finally:
        for h in handles:
            h.remove()
    return amax, [list(g) for g in groups]


def smoothing_factors(model: torch.nn.Module, feeds: Iterable[Mapping[str, torch.Tensor]],
                      alpha: float = DEFAULT_ALPHA, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """s per layer name (layers reading one tensor get the same s), from the base's inputs on `feeds`.

    Args:
        alpha: migration strength in [0, 1]; 0 leaves activations alone, 1 moves all their range into weights.
        layers: which adapted layers to smooth (default: every adapted layer; `smooth_model` leaves out
            the recipe's fp32 layers).
    """
    check_smoothing(alpha)
    amax, groups = input_ranges(model, feeds)
    modules = dict(model.adapted_layers())
    wanted = set(modules if layers is None else layers)
    factors: dict[str, torch.Tensor] = {}
    for group in groups:
        group = [n for n in group if n in wanted]
        if not group:
            continue
        x_max = torch.stack([amax[n] for n in group]).amax(dim=0).clamp(min=_FLOOR)  # (in,)
        w_max = torch.stack([modules[n].base.weight.detach().abs().amax(dim=0).float() for n in group])
        w_max = w_max.amax(dim=0).clamp(min=_FLOOR)  # (in,) over every output row of the group
        s = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=_FLOOR)
        for n in group:
            factors[n] = s
    return factors


def smooth_model(model: torch.nn.Module, feeds: Iterable[Mapping[str, torch.Tensor]], alpha: float) -> dict:
    """Compute the factors from the base (fake quant off, no adapter) on `feeds` and set them; returns a summary.

    Call it once, before training: the adapter then trains against the smoothed int8 path it deploys with.
    Every quantizable layer must already be wrapped (`AdapterModel.set_quant` with an int8 recipe does it).
    """
    if any(getattr(c, "init", None) == "int8-residual" for c in model.configs.values()):
        raise EdgeloraError(INT8_RESIDUAL_SMOOTHING)
    feeds = list(feeds)
    previous = model.quant
    int8_layers = [n for n, _ in model.adapted_layers() if smoothed_layer(previous, n)]
    model.set_quant(None)
    try:
        with model.disable_adapter():
            factors = smoothing_factors(model, feeds, alpha, layers=int8_layers)  # fp32 layers need none
    finally:
        model.set_quant(previous)
    apply_smoothing(model, factors)
    return {"alpha": alpha, "layers": len(factors), "batches": len(feeds)}


def smoothed_layer(quant, name: str) -> bool:
    """Whether a recipe smooths layer `name`: not its fp32 layers, nor the rowwise scheme's blockwise ones (their
    inputs keep their own per-block scales, and an unsmoothed tied LM head keeps sharing the embeddings)."""
    return quant is None or (name not in quant.skip_layers and not is_block_layer(quant, name))


def apply_smoothing(model: torch.nn.Module, factors: Mapping[str, torch.Tensor] | None) -> None:
    """Set every adapted layer's factors (None or a missing name: unsmoothed)."""
    factors = factors or {}
    names = dict(model.adapted_layers())
    unknown = sorted(set(factors) - set(names))
    if unknown:
        raise EdgeloraError(f"smoothing factors name layers this model lacks ({', '.join(unknown[:3])}); "
                            "they were computed for another base — recompute them for this one")
    calibrated = [n for n, layer in names.items() if getattr(layer, "act_observer", None) is not None]
    if calibrated:
        raise EdgeloraError(f"layer {calibrated[0]} already holds static activation ranges calibrated without these "
                            "factors; smooth first, then calibrate (the CLI does it in that order)")
    previous = {name: layer.smooth for name, layer in names.items()}
    try:
        for name, layer in names.items():
            layer.set_smoothing(factors.get(name))
    except EdgeloraError:  # all or nothing: a bad vector leaves every layer as it was
        for name, layer in names.items():
            layer.set_smoothing(previous[name])
        raise


def current_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The factors the model's layers hold now, by layer name."""
    return {name: layer.smooth for name, layer in model.adapted_layers() if layer.smooth is not None}


def factors_digest(factors: Mapping[str, torch.Tensor]) -> str | None:
    """sha256 over the layer names and float32 bytes of the factors (None without any): one id for one set."""
    if not factors:
        return None
    digest = hashlib.sha256()
    for name in sorted(factors):
        digest.update(name.encode() + b"\0" + factors[name].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_factors(factors: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Write `smoothing.safetensors` into a directory being filled (the caller makes the write atomic)."""
    if factors:
        save_file({name: t.detach().cpu().float().contiguous() for name, t in factors.items()},
                  str(Path(directory) / SMOOTHING_FILE))


def load_factors(directory: Path) -> dict[str, torch.Tensor]:
    """The factors saved beside an adapter, {} when it was trained without smoothing."""
    path = Path(directory) / SMOOTHING_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # a truncated or foreign file
        raise EdgeloraError(f"{path}: not a readable safetensors file ({exc}); re-save the adapter") from exc
