"""SmoothQuant factors for a decoder's rowwise int8 scheme, from the frozen base on fixed calibration text.

One row scale per input row wastes most of int8's levels on the few outlier channels of a decoder's norm
outputs; SmoothQuant (`edgelora.smooth`) moves them into the per-channel weights first. The factors come from
the base alone, on the fixed texts below, never from a task's data: every adapter trained on one base then
carries the same factors as the plain base's export, so any of them can share one switchable bundle, and
training and export, which both call `smooth_decoder`, compute them the same way.
"""

from __future__ import annotations

import copy

import torch

from edgelora.config import QuantConfig
from edgelora.errors import EdgeloraError

# General text of several kinds (commands, prose, numbers, code, a chat request); held apart from the texts the
# exporter and `edgelora bench` measure perplexity on.
CALIBRATION_TEXTS = (
    "Set the living room lights to forty percent and turn on the fan.",
    "Minutes of the weekly meeting: the team reviewed the budget and agreed to hire two engineers in March.",
    "Water boils at one hundred degrees Celsius at sea level, and at lower temperatures on a mountain.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The train from Paris arrived forty minutes late because of a signal failure near Lyon.",
    "Please write a short poem about autumn leaves falling in a quiet park.",
)


def calibration_feeds(tokenizer) -> list[dict[str, torch.Tensor]]:
    """One unpadded row per calibration text (no special tokens), as `smooth.smooth_model` feeds the model."""
    feeds = []
    for text in CALIBRATION_TEXTS:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.long)
        feeds.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return feeds


def smooth_decoder(model, tokenizer, alpha: float) -> dict:
    """Set the factors of a `CausalLMAdapterModel` already wrapped for its int8 recipe; returns a summary."""
    from edgelora.smooth import smooth_model

    return {**smooth_model(model, calibration_feeds(tokenizer), alpha), "from": "base on fixed calibration text"}


def base_factors(base: torch.nn.Module, quant: QuantConfig, tokenizer) -> dict[str, torch.Tensor]:
    """The factors `smooth_decoder` gives a Hugging Face causal LM under `quant`, computed on a copy (the
    exporter's path for a base exported without a smoothed adapter)."""
    from edgelora.causal_lm import CausalLMAdapterModel
    from edgelora.smooth import current_factors

    if quant.smoothing is None:
        return {}
    if tokenizer is None:
        raise EdgeloraError("the rowwise int8 scheme computes SmoothQuant factors on calibration text and needs the "
                            "base's tokenizer; pass tokenizer_dir (or export a base directory that holds one)")
    model = CausalLMAdapterModel(copy.deepcopy(base))
    model.set_quant(quant)
    smooth_decoder(model, tokenizer, quant.smoothing)
    return {name: t.detach().cpu().clone() for name, t in current_factors(model).items()}
