"""Mixed precision: measure which layers int8 hurts most, and keep the fewest of them fp32 to meet a target.

Each quantization unit (one linear, or a fused attention's query/key/value together) is fake-quantized
alone, the rest fp32, and its error is how far the pooled embeddings move from the fp32 model's on
calibration text. Then units go back to fp32, worst first, until the model with everything else int8
reaches the target cosine (or the budget runs out). The result is a `QuantConfig.skip_layers` list: the
export keeps those layers fp32 and a model trained with that recipe fake-quantizes the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from edgelora.config import QuantConfig
from edgelora.model import AdapterModel

from .validate import generated_feeds

# Worst cosine of the int8 model's sentence embeddings to the fp32 model's that `keep_fp32="auto"` aims at.
TARGET_COSINE = 0.995
# At most this share of the units goes back to fp32: past it, int8 no longer pays for its error.
MAX_FP32_FRACTION = 0.25
# Real sentences, short and long, to measure with when the base has a tokenizer (random ids otherwise).
# Kept apart from the sentences benchmarks/optimum_compare.py reports fidelity on.
CALIBRATION_TEXTS = (
    "The weather today is sunny with a light breeze.",
    "I need to book a table for four at seven tonight.",
    "The government announced new measures to curb inflation.",
    "This laptop has a great screen but poor battery life.",
    "Where is the nearest train station?",
    "Scientists discovered a new species of frog in the rainforest.",
    "Turn the volume down, please.",
    "The match ended in a goalless draw after extra time.",
    "yes",
    "Thanks!",
    "He has been working at the city hospital for ten years.",
    "The recipe calls for three eggs, butter and a pinch of salt.",
    "Why does my phone battery drain so quickly overnight?",
    "The board approved the merger despite objections from shareholders.",
    "Book me a flight to Denver next Friday morning.",
    "Volcanic ash disrupted air travel across northern Europe.",
    "I can't believe how rude the waiter was to us.",
    "The lecture covered the basics of quantum mechanics.",
    "Remind me to water the plants.",
    "Prices for fresh vegetables have doubled since last spring.",
    "no thanks",
    "Our team shipped the release two weeks ahead of schedule, which nobody expected.",
    "The river flooded the lower part of the village overnight.",
    "Is this jacket available in a larger size?",
)


@dataclass(frozen=True)
class Sensitivity:
    """What `choose_fp32_layers` measured and chose (JSON-ready through `as_manifest`)."""

    fp32_layers: tuple[str, ...]
    target_cosine: float
    worst_cosine_all_int8: float
    worst_cosine: float  # with `fp32_layers` kept fp32
    met: bool
    units: tuple[dict, ...]  # {"layers": [...], "alone_worst_cosine": c}, most sensitive first
    calibration: str

    def as_manifest(self) -> dict:
        return dataclasses.asdict(self) | {"fp32_layers": list(self.fp32_layers), "units": list(self.units)}


def calibration_feeds(base_path: Path | None, feed_names: Sequence[str], vocab_size: int,
                      max_length: int = 128) -> tuple[list[dict[str, torch.Tensor]], str]:
    """One feed per calibration text (batch 1, as a sentence embedder runs), or random ids without a tokenizer."""
    path = None if base_path is None else Path(base_path) / "tokenizer.json"
    if path is not None and path.is_file():
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.enable_truncation(max_length)
        feeds = []
        for text in CALIBRATION_TEXTS:
            e = tok.encode(text)
            row = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            feeds.append({k: torch.tensor([row[k]], dtype=torch.long) for k in feed_names})
        return feeds, f"{len(feeds)} built-in English sentences, one per run"
    rows = generated_feeds(vocab_size, tuple(feed_names), batch=8, seq=16, seed=1)
    feeds = [{k: torch.from_numpy(v[i : i + 1]) for k, v in rows.items()} for i in range(8)]
    return feeds, "8 rows of random token ids (the base has no tokenizer.json)"


def _embeddings(model: AdapterModel, feeds: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**f)[1] for f in feeds])  # (rows, hidden)


def _worst_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def choose_fp32_layers(model: AdapterModel, recipe: QuantConfig, units: Sequence[tuple[str, ...]],
                       feeds: list[dict[str, torch.Tensor]], *, target: float = TARGET_COSINE,
                       max_units: int | None = None, calibration: str = "") -> Sensitivity:
    """Pick the units to keep fp32, most sensitive first, until the worst embedding cosine reaches `target`.

    Args:
        model: the model to export, its adapter active; its fake-quant setting is restored afterwards.
        recipe: the int8 recipe (bits, mode); its `skip_layers` are ignored and replaced.
        units: groups of layers that are int8 or fp32 together (`quantize.quantization_units`).
        max_units: budget (default `MAX_FP32_FRACTION` of the units).
    """
    previous = model.quant
    everything = sorted({layer for unit in units for layer in unit})
    max_units = max(1, int(len(units) * MAX_FP32_FRACTION)) if max_units is None else max_units

    def worst_with_fp32(fp32: set[str]) -> float:
        model.set_quant(dataclasses.replace(recipe, skip_layers=tuple(fp32)))
        return _worst_cosine(_embeddings(model, feeds), reference)

    try:
        model.set_quant(None)
        reference = _embeddings(model, feeds)
        alone = {unit: worst_with_fp32(set(everything) - set(unit)) for unit in units}
        order = sorted(units, key=lambda u: alone[u])  # lowest cosine alone = most sensitive
        chosen: list[tuple[str, ...]] = []
        all_int8 = current = worst_with_fp32(set())
        for unit in order:
            if current >= target or len(chosen) >= max_units:
                break
            chosen.append(unit)
            current = worst_with_fp32({layer for u in chosen for layer in u})
    finally:
        model.set_quant(previous)
    return Sensitivity(
        fp32_layers=tuple(sorted(layer for u in chosen for layer in u)), target_cosine=target,
        worst_cosine_all_int8=all_int8, worst_cosine=current, met=current >= target,
        units=tuple({"layers": list(u), "alone_worst_cosine": round(alone[u], 6)} for u in order),
        calibration=calibration,
    )


def expand_to_units(layers: Sequence[str], units: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """Every layer of each unit that `layers` touches: a fused attention keeps q, k and v fp32 together."""
    wanted = set(layers)
    return tuple(sorted({layer for unit in units if wanted & set(unit) for layer in unit} | wanted))
