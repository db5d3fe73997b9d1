"""Static activation quantization: observers that record each quantized layer's input range, and calibration.

With `QuantConfig(activations="static")` every quantized layer's input is fake-quantized to uint8 with a
scale and zero point fixed ahead of time, and the export writes them as constants (QuantizeLinear), so the
int8 graph skips the per-call min/max of dynamic quantization and a row's result no longer depends on its
batch-mates. The ranges come from an `ActivationObserver` per layer: `calibrate` runs a few batches through
the model to fill them, and may leave them observing through the first QAT steps before they freeze (as
PyTorch's QAT recipe disables its observers after the first epochs). The ranges save with the adapter.

Example:
    >>> model.add_adapter("intent", LoraConfig(), labels, quant=QuantConfig(activations="static"))
    >>> calibrate(model, batches[:8], qat_steps=100)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgelora.errors import EdgeloraError
from edgelora.fake_quant import UINT8_MAX, fake_quantize_activation_static, qparams_from_range
from edgelora.layers import AdaptedLinear
from edgelora.model import AdapterModel
from edgelora.tokenize import encode

OBSERVER_KINDS = ("minmax", "moving_average", "percentile")
# What an observer does on a forward pass: nothing but quantize (frozen), record and pass the input
# through float (calibration, as post-training calibration runs the float model), or record on training
# passes while fake-quantizing with the current range (the first QAT steps).
FROZEN, CALIBRATING, QAT_OBSERVING = 0, 1, 2


@dataclass(frozen=True)
class ObserverConfig:
    """How an observer turns what it saw into a range.

    Args:
        kind: "minmax": the extremes over every observed batch (nothing is ever clipped on the
            calibration data). "moving_average": an exponential moving average of each batch's extremes
            (PyTorch's MovingAverageMinMaxObserver), which forgets early batches while QAT moves the
            weights. "percentile": the mean over batches of each batch's `percentile` and
            100 - `percentile` points, clipping rare outliers to spend the 256 levels on the bulk.
        averaging_constant: the moving average's weight of a new batch (PyTorch's default 0.01 suits
            hundreds of QAT steps; a few calibration batches want more, e.g. 0.1).
        percentile: in (50, 100]; 100 equals the extremes of each batch.
    """

    kind: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.kind not in OBSERVER_KINDS:
            raise EdgeloraError(f"observer kind={self.kind!r} is not supported; choose from {', '.join(OBSERVER_KINDS)}")
        if not 0 < self.averaging_constant <= 1:
            raise EdgeloraError(f"averaging_constant={self.averaging_constant!r} must be in (0, 1], e.g. 0.01")
        if not 50 < self.percentile <= 100:
            raise EdgeloraError(f"percentile={self.percentile!r} must be in (50, 100], e.g. 99.99")


class ActivationObserver(nn.Module):
    """One layer's input range and its static uint8 (scale, zero_point); also the layer's static fake quantizer.

    Every statistic is a buffer, so checkpoints and `state_dict` carry an observer mid-QAT exactly.
    """

    def __init__(self, config: ObserverConfig = ObserverConfig()) -> None:
        super().__init__()
        self.config = config
        for name in ("min_val", "max_val", "avg_min", "avg_max", "pct_min", "pct_max"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float32))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))  # batches observed
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.float32))  # an integer in [0, 255]
        self.register_buffer("phase", torch.tensor(CALIBRATING, dtype=torch.int64))
        self.register_buffer("steps_left", torch.zeros((), dtype=torch.int64))  # QAT passes still observed
        # Python mirrors of `phase` and `steps_left`: forward reads these, so a frozen observer on a GPU never
        # waits for the device to hand a buffer back (the buffers stay the checkpointed truth).
        self._phase, self._steps_left = CALIBRATING, 0

    @property
    def frozen(self) -> bool:
        return self._phase == FROZEN

    def _set_phase(self, phase: int, steps_left: int) -> None:
        self._phase, self._steps_left = phase, steps_left
        self.phase.fill_(phase)
        self.steps_left.fill_(steps_left)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._phase, self._steps_left = int(self.phase), int(self.steps_left)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch's values into the statistics (every element, padding included, as the graph sees them)."""
        x = x.detach().to(torch.float32).reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        first = int(self.batches) == 0
        if first:
            self.min_val.copy_(lo), self.max_val.copy_(hi), self.avg_min.copy_(lo), self.avg_max.copy_(hi)
        else:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
            c = self.config.averaging_constant
            self.avg_min.add_(c * (lo - self.avg_min))
            self.avg_max.add_(c * (hi - self.avg_max))
        if self.config.kind == "percentile":
            n = x.numel()
            k_hi = min(n, math.ceil(self.config.percentile / 100 * (n - 1)) + 1)  # 1-based order statistics
            k_lo = max(1, n + 1 - k_hi)
            p_lo, p_hi = torch.kthvalue(x, k_lo).values, torch.kthvalue(x, k_hi).values
            seen = float(self.batches)
            self.pct_min.copy_((self.pct_min * seen + p_lo) / (seen + 1))  # the mean of the batches' points
            self.pct_max.copy_((self.pct_max * seen + p_hi) / (seen + 1))
        self.batches.add_(1)
        self.update_qparams()

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) as the configured kind reads the statistics."""
        if self.config.kind == "moving_average":
            return self.avg_min, self.avg_max
        if self.config.kind == "percentile":
            return self.pct_min, self.pct_max
        return self.min_val, self.max_val

    def update_qparams(self) -> None:
        scale, zero_point = qparams_from_range(*self.observed_range())
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def start(self, qat_steps: int = 0) -> None:
        """After calibration: freeze now, or keep observing the next `qat_steps` training passes first."""
        if int(self.batches) == 0:
            raise EdgeloraError("an activation observer saw no data; give calibrate() batches that reach every layer")
        self.update_qparams()
        self._set_phase(QAT_OBSERVING if qat_steps > 0 else FROZEN, qat_steps)

    def freeze(self) -> None:
        self._set_phase(FROZEN, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._phase == CALIBRATING:
            self.observe(x)
            return x
        if self._phase == QAT_OBSERVING and self.training:
            self.observe(x)
            self._set_phase(QAT_OBSERVING, self._steps_left - 1)
            if self._steps_left <= 0:
                self.freeze()
        return fake_quantize_activation_static(x, self.scale, self.zero_point)

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) as Python numbers: the float32 scale exactly, the zero point as an int."""
        return float(self.scale), int(self.zero_point)

    def extra_repr(self) -> str:
        state = {FROZEN: "frozen", CALIBRATING: "calibrating", QAT_OBSERVING: f"observing {self._steps_left} more"}
        return f"{self.config.kind}, {state[self._phase]}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` did, as recorded in the adapter and the bundle manifest."""

    observer: ObserverConfig
    batches: int
    qat_steps: int
    layers: int

    def as_dict(self) -> dict[str, Any]:
        return {"observer": asdict(self.observer), "batches": self.batches, "qat_observe_steps": self.qat_steps,
                "layers": self.layers}


def static_layers(model: AdapterModel) -> list[tuple[str, AdaptedLinear]]:
    """The layers whose input the recipe quantizes statically (the recipe's `skip_layers` stay fp32)."""
    return [(n, layer) for n, layer in model.adapted_layers()
            if layer.quant is not None and layer.quant.activations == "static"]


def _needs_static(model: AdapterModel, what: str) -> list[tuple[str, AdaptedLinear]]:
    if model.quant is None or model.quant.activations != "static":
        have = "no int8 recipe" if model.quant is None else f"activations={model.quant.activations!r}"
        raise EdgeloraError(f"{what} needs a static int8 recipe, the model has {have}; "
                            "set one with model.set_quant(QuantConfig(activations='static'))")
    return static_layers(model)


def calibrate(
    model: AdapterModel,
    batches: Iterable[Mapping[str, Any]],
    observer: ObserverConfig = ObserverConfig(),
    qat_steps: int = 0,
) -> Calibration:
    """Record every static layer's input range over `batches` and fix its (scale, zero_point).

    The model runs in eval mode without gradients, with the activations passed through float (the
    weights stay fake-quantized), as post-training calibration does; each layer gets a fresh observer.

    Args:
        batches: model inputs (`input_ids`, `attention_mask`, ...) as tensors or numpy arrays; a few
            batches of real training text are enough for min/max.
        qat_steps: keep observing the first `qat_steps` training forward passes (the ranges follow the
            weights as QAT moves them, with the fake quantizer using the current range), then freeze.
            0 freezes now.
    """
    if isinstance(qat_steps, bool) or not isinstance(qat_steps, int) or qat_steps < 0:
        raise EdgeloraError(f"qat_steps={qat_steps!r} must be a whole number of training steps >= 0")
    layers = _needs_static(model, "calibrate()")
    ref = next(model.parameters())
    for _, layer in layers:
        layer.act_observer = ActivationObserver(observer).to(ref.device)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).to(ref.device)
                         for k, v in batch.items()})
                count += 1
        if count == 0:
            raise EdgeloraError("calibrate() got no batches; give at least one batch of model inputs")
        for _, layer in layers:
            layer.act_observer.start(qat_steps)
    except BaseException:
        for _, layer in layers:  # never leave half-calibrated observers that silently quantize
            layer.act_observer = None
        raise
    finally:
        model.train(was_training)
    return Calibration(observer, count, qat_steps, len(layers))


def check_calib_batches(batches: object) -> None:
    """The number of calibration batches must be a positive whole number; the CLI checks it before minutes of loading."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise EdgeloraError(f"batches={batches!r} must be a positive number of batches, e.g. 8")


def text_batches(tokenizer, texts: Sequence[str], batches: int, batch_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`batches` batches of `batch_size` texts drawn (seeded, without repeats) from `texts`, tokenized: the
    calibration inputs the CLI uses. Fewer when `texts` runs out."""
    check_calib_batches(batches)
    order = np.random.default_rng(seed).permutation(len(texts))[: batches * batch_size]
    return [encode(tokenizer, [texts[i] for i in order[j : j + batch_size]]) for j in range(0, len(order), batch_size)]


def freeze(model: AdapterModel) -> None:
    """Stop every observer now; the current ranges stay (the end of a QAT observation phase, by hand)."""
    for _, layer in model.adapted_layers():
        if layer.act_observer is not None:
            layer.act_observer.freeze()


def static_qparams(model: AdapterModel) -> dict[str, tuple[float, int]]:
    """Layer name -> (scale, zero_point) of every static layer; what the export writes as constants."""
    layers = _needs_static(model, "a static int8 export")
    missing = [n for n, layer in layers if layer.act_observer is None]
    if missing:
        raise EdgeloraError(f"layer {missing[0]} has no calibrated activation range; run edgelora.calibrate.calibrate "
                            "on the model")
    return {n: layer.act_observer.qparams() for n, layer in layers}


# --- the ranges in the adapter file ---------------------------------------------------------------------
RANGES_KEY = "static_activations"  # under "edgelora" in adapter_config.json


def ranges_to_dict(model: AdapterModel) -> dict[str, Any]:
    """The observers as JSON: their config, how much they saw, and per layer the exact float32 scale, the
    zero point and the observed range. JSON floats hold a float32 exactly, so the scales load back bit for bit."""
    qparams = static_qparams(model)
    observers = {n: layer.act_observer for n, layer in static_layers(model)}
    first = next(iter(observers.values()), None)
    return {
        "observer": asdict(first.config) if first else asdict(ObserverConfig()),
        "batches_observed": max((int(o.batches) for o in observers.values()), default=0),
        "still_observing": sorted(n for n, o in observers.items() if not o.frozen),
        "layers": {
            n: {"scale": qparams[n][0], "zero_point": qparams[n][1],
                "range": [float(v) for v in o.observed_range()]}
            for n, o in observers.items()
        },
    }


def load_ranges(model: AdapterModel, data: Any, source: str) -> None:
    """Give every static layer of `model` a frozen observer holding the saved (scale, zero_point).

    Layers that already hold calibrated ranges (another adapter's) must agree: a graph has one
    QuantizeLinear per input, so adapters calibrated apart cannot share one static base.
    """
    layers = dict(_needs_static(model, f"{source}: loading static activation ranges"))
    entries = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise EdgeloraError(f"{source}: the recipe has activations='static' but no calibrated ranges "
                            f"('{RANGES_KEY}'); calibrate and save the adapter again")
    unknown = sorted(set(entries) - set(layers))
    if unknown:
        raise EdgeloraError(f"{source}: static range for {unknown[0]!r}, which is not a quantized layer of this base; wrong base?")
    missing = sorted(set(layers) - set(entries))
    if missing:
        raise EdgeloraError(f"{source}: no static range for layer {missing[0]!r}; calibrate and save the adapter again")
    try:
        config = ObserverConfig(**data.get("observer", {}))
    except TypeError as exc:
        raise EdgeloraError(f"{source}: bad static observer config ({exc})") from None
    observers: dict[str, ActivationObserver] = {}  # all checked before any layer changes
    for name, entry in sorted(entries.items()):
        try:
            scale, zero_point = float(entry["scale"]), entry["zero_point"]
            lo, hi = (float(v) for v in entry.get("range", (0.0, 0.0)))
        except (TypeError, KeyError, ValueError):
            raise EdgeloraError(f"{source}: static range of {name!r} must hold a scale and a zero_point") from None
        if not (math.isfinite(scale) and scale > 0 and np.float32(scale) == scale):
            raise EdgeloraError(f"{source}: static scale of {name!r} is {scale!r}; it must be a positive float32")
        if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not 0 <= zero_point <= UINT8_MAX:
            raise EdgeloraError(f"{source}: static zero_point of {name!r} is {zero_point!r}; it must be an integer in [0, 255]")
        layer = layers[name]
        held = layer.act_observer
        if held is not None and held.frozen and int(held.batches) > 0 and held.qparams() != (scale, zero_point):
            raise EdgeloraError(
                f"{source}: layer {name!r} already holds another adapter's static activation range; adapters "
                "calibrated apart cannot share one static int8 graph: export them one per bundle, or train with "
                "activations='dynamic'"
            )
        observer = ActivationObserver(config).to(layer.base.weight.device)
        with torch.no_grad():
            observer.scale.fill_(scale)
            observer.zero_point.fill_(zero_point)
            observer.min_val.fill_(lo), observer.max_val.fill_(hi)
            observer.avg_min.fill_(lo), observer.avg_max.fill_(hi), observer.pct_min.fill_(lo), observer.pct_max.fill_(hi)
            observer.batches.fill_(max(1, int(data.get("batches_observed", 1) or 1)))
        observer.freeze()
        observers[name] = observer
    for name, observer in observers.items():
        layers[name].act_observer = observer
