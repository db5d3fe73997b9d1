"""Which int8 scheme a decoder export writes, and with which recipe and SmoothQuant factors.

"block" (the default) is MatMulNBits everywhere; "rowwise" is per-row activations and per-channel weights through
MatMulIntegerToFloat, with the recipe's `block_layers` on MatMulNBits (`edgelora.causal_train.decoder_quant`).
What an adapter was trained with decides: its recipe and its `smoothing.safetensors` are exported as they are,
and asking for the other scheme is refused. An adapter trained fp32, or the plain base, takes the scheme asked
for (block unless told), with the recipe for this CPU and factors computed from the base on the fixed text of
`edgelora.causal_smooth`, as training would have computed them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgelora.causal_train import INT8_SCHEMES, decoder_quant
from edgelora.config import QuantConfig, config_to_dict, scheme_of
from edgelora.errors import EdgeloraError
from edgelora.peft_format import CONFIG_FILE
from edgelora.smooth import factors_digest, load_factors

from .decoder_graph import RowwisePlan


@dataclass
class Int8Choice:
    """The scheme of one export, the rowwise recipe (None for block) and where its factors come from."""

    scheme: str
    recipe: QuantConfig | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    factors_from: str | None = None  # an adapter directory, or None: computed from the base at export


def _trained_recipe(path: Path) -> QuantConfig | None:
    """The int8 recipe an adapter was fake-quantized with (None: trained fp32), from its config."""
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the exporter's own reading names the missing or unreadable file
    return recipe_of(((data.get("edgelora") or {}) if isinstance(data, dict) else {}).get("quantization"),
                     path / CONFIG_FILE)


def recipe_of(quant: Mapping[str, Any] | None, source: str | Path) -> QuantConfig | None:
    """An adapter config's `edgelora.quantization` as a QuantConfig (None: trained fp32); a bad one is one line
    naming `source`."""
    if not quant:
        return None
    try:
        return QuantConfig(**quant)
    except TypeError as exc:
        raise EdgeloraError(f"{source}: unreadable quantization recipe ({exc}); re-save the adapter") from None
    except EdgeloraError as exc:
        raise EdgeloraError(f"{source}: {exc}") from None


def choose_int8(adapters: Mapping[str, str | Path], int8_scheme: str | None, precision: str, mode: str,
                weight_bits: int | None = None) -> Int8Choice:
    """The export's scheme: the adapters' training scheme, else `int8_scheme`, else "block"; refuses a mix,
    or a flag that contradicts what an adapter was trained with, in one line naming the adapter."""
    if int8_scheme is not None and int8_scheme not in INT8_SCHEMES:
        raise EdgeloraError(f"int8_scheme={int8_scheme!r} is not supported; choose from {', '.join(INT8_SCHEMES)}")
    if int8_scheme is not None and precision != "int8":
        raise EdgeloraError(f"int8_scheme={int8_scheme!r} applies to int8 exports; drop it or pass precision='int8'")
    trained = {name: (Path(path), _trained_recipe(Path(path))) for name, path in adapters.items()}
    trained = {name: (path, recipe) for name, (path, recipe) in trained.items() if recipe is not None}
    for name, (path, recipe) in trained.items():
        own = scheme_of(recipe)
        if own not in INT8_SCHEMES:
            raise EdgeloraError(f"{path}: trained with the encoders' {own} int8 recipe, which a decoder bundle does not "
                                "write; retrain it with the causal-lm task")
        if int8_scheme is not None and own != int8_scheme and precision == "int8":
            raise EdgeloraError(f"{path}: adapter {name!r} was trained with the {own} int8 scheme; export it with "
                                f"int8_scheme='{own}' or retrain it with int8_scheme='{int8_scheme}'")
    schemes = sorted({scheme_of(r) for _, r in trained.values()})
    if len(schemes) > 1 and precision == "int8":
        raise EdgeloraError(f"the adapters were trained with different int8 schemes ({', '.join(schemes)}); adapters "
                            "in one bundle share one base: retrain them with one scheme, or export them apart")
    scheme = int8_scheme or (schemes[0] if schemes else "block")
    if weight_bits is not None and (precision != "int8" or scheme != "rowwise"):
        raise EdgeloraError(f"weight_bits={weight_bits} applies to the rowwise int8 scheme; drop it or pass "
                            "precision='int8' and int8_scheme='rowwise'")
    if weight_bits not in (None, 7, 8):
        raise EdgeloraError(f"weight_bits={weight_bits} is not supported; choose 7 or 8")
    if precision != "int8" or scheme == "block":
        return Int8Choice("block")
    rowwise = [(path, r) for path, r in trained.values() if scheme_of(r) == "rowwise"]
    if not rowwise:
        return Int8Choice("rowwise", decoder_quant(scheme="rowwise", mode=mode, weight_bits=weight_bits))
    path, recipe = rowwise[0]
    if weight_bits is not None and weight_bits != recipe.weight_bits:
        raise EdgeloraError(f"{path}: trained with {recipe.weight_bits}-bit weights; export it with "
                            f"weight_bits={recipe.weight_bits} (or drop it) or retrain with weight_bits={weight_bits}")
    factors = load_factors(path) if recipe.smoothing is not None else {}
    return Int8Choice("rowwise", dataclasses.replace(recipe, mode=mode), factors, str(path))


def rowwise_plan(choice: Int8Choice, base: torch.nn.Module, tokenizer_dir: Path | None) -> RowwisePlan | None:
    """The graph's `RowwisePlan` (None for block); factors not carried by an adapter are computed from `base` now,
    so call it before any adapter is merged into `base`."""
    if choice.recipe is None:
        return None
    if choice.recipe.smoothing is not None and not choice.factors:
        from edgelora.causal_smooth import base_factors
        from edgelora.causal_train import load_tokenizer

        has_tokenizer = tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file()
        choice.factors = base_factors(base, choice.recipe, load_tokenizer(tokenizer_dir) if has_tokenizer else None)
    from edgelora.runtime.cpu import detect_isa, int8_saturates

    # 8-bit grids go uint8 (u8 x u8) only where u8 x s8 would saturate them: VNNI CPUs keep their fast int8 path
    unsigned = choice.recipe.weight_bits == 8 and int8_saturates(detect_isa().isa)
    return RowwisePlan(choice.recipe, choice.factors, unsigned_weights=unsigned)


def quantization_record(choice: Int8Choice, recipe: QuantConfig, quantized: int, rowwise: int,
                        mode: str, unsigned: bool = False) -> dict[str, Any]:
    """The manifest's "quantization" entry of a rowwise bundle (the block one is written by the exporter)."""
    return {
        "scheme": f"rowwise: weights int8 symmetric per output channel ({recipe.weight_bits}-bit), activations int8 "
                  "per row by the row's own max, in plain ops, into MatMulIntegerToFloat; layers "
                  f"{', '.join(recipe.block_layers)} as MatMulNBits (bits 8, block {recipe.weight_block}, "
                  "accuracy_level 4): a row's result does not depend on its batch",
        "int8_scheme": "rowwise",
        "kernel": "com.microsoft.MatMulIntegerToFloat + com.microsoft.MatMulNBits",
        # uint8 at zero point 128: MLAS's u8 x u8 kernel, exact on every CPU (ONNX Runtime >= 1.25); int8: u8 x s8
        "weight_type": "uint8" if unsigned else "int8",
        "weight_bits": recipe.weight_bits, "block_size": recipe.weight_block, "accuracy_level": 4,
        "activations": {"mode": "per-row"},
        "quantized_matmuls": quantized, "rowwise_matmuls": rowwise,
        "recipe": config_to_dict(recipe),
        "smoothing": None if recipe.smoothing is None else {
            "alpha": recipe.smoothing, "layers": len(choice.factors), "digest": factors_digest(choice.factors),
            "from": f"adapter {choice.factors_from}" if choice.factors_from else "base on fixed calibration text "
                    "(edgelora.causal_smooth), at export",
            "applied": "a Mul by 1/s on the input before its quantizer; W diag(s) on the int8 grid"},
        "excluded": "embeddings, norms, rotary, attention scores" + (", adapter (LoRA) branches" if mode == "switchable" else ""),
    }
