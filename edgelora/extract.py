"""LoRA adapters from the SVD of weight deltas (the `edgelora extract` and `edgelora reduce` verbs' library).

extract: for every adaptable linear whose weight differs between a base and its full fine-tune, the best
rank-k fit of the delta (Eckart-Young: B A = U_k S_k V_k^T), saved as an ordinary adapter directory that
`edgelora export` takes. reduce: the same truncation of an existing LoRA adapter's B A, without its base.
Reading the fine-tuned model's directory and head is edgelora.finetuned's: the adapter takes the tuned model's
own head (an architecture's sequence-classification head, a per-token classifier, or none), and a head that
cannot be applied exactly is refused before any SVD. Adapters are written through edgelora.peft_format; the
commands are edgelora/cli/extract.py. Torch loads inside the functions.

Example:
    >>> report = extract_adapter("minilm", "runs/full-ft", "runs/intent-r16", rank=16)  # doctest: +SKIP
    >>> reduce_adapter("runs/intent-r16", "runs/intent-r4", rank=4)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelora.errors import EdgeloraError
from edgelora.finetuned import quiet_transformers, read_head
from edgelora.runtime.bundle import ADAPTER_NAME, ADAPTER_NAME_RULE
from edgelora.runtime.manifest import MEAN_POOLED, PER_TOKEN

if TYPE_CHECKING:
    from torch import Tensor, nn

    from edgelora.model import AdapterModel

# A delta larger than this fraction of the base weight, in the median layer, means `base` is most likely not
# the model `tuned` was fine-tuned from (fine-tunes move weights by ~0.1-10%; unrelated models by ~140%).
UNRELATED_BASE_REL_DELTA = 0.5
# What each kind of dropped delta is, in a warning.
DROPPED = {"bias": "biases", "linear": "linear weights outside the adaptable projections",
           "other": "other tensors (embeddings, LayerNorm, ...)",
           "unused": None}  # BERT's pooler, where the adapter's head does not read it (the bert-pooler head carries it)


# --- the math on models ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerFit:
    """One layer's truncated delta: rank kept, energy kept (sum of kept sigma^2 / ||delta||_F^2) and the
    relative error ||delta - B A||_F / ||delta||_F."""

    layer: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    energy_kept: float
    relative_error: float
    delta_norm: float  # ||W_tuned - W_base||_F
    base_norm: float  # ||W_base||_F

    @property
    def params(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1])

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape), "params": self.params}


@dataclass
class Extraction:
    """Per-layer LoRA factors (scaling 1: delta ~ B @ A), their fits, and the deltas a LoRA cannot carry."""

    fits: list[LayerFit]
    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> A (r, in), B (out, r)
    dropped: list[dict[str, Any]] = field(default_factory=list)  # {"tensor", "what", "norm", "relative"}: DROPPED

    def summary(self) -> dict[str, Any]:
        dense = sum(f.shape[0] * f.shape[1] for f in self.fits)
        lora = sum(f.params for f in self.fits)
        total = sum(f.delta_norm**2 for f in self.fits)
        err = sum((f.relative_error * f.delta_norm) ** 2 for f in self.fits)
        return {
            "layers": len(self.fits),
            "ranks": sorted({f.rank for f in self.fits}),
            "lora_params": lora,
            "dense_params": dense,
            "compression_ratio": dense / lora,
            "relative_error": math.sqrt(err / total) if total > 0 else 0.0,
            "energy_kept": 1.0 - err / total if total > 0 else 1.0,
            "dropped_tensors": len(self.dropped),
        }


def check_target(rank: int | None, energy: float | None) -> None:
    """Exactly one of rank (an integer >= 1) or energy (a fraction in (0, 1])."""
    if (rank is None) == (energy is None):
        raise EdgeloraError(f"give exactly one of rank (components kept) or energy (fraction of sigma^2 kept), "
                            f"got rank={rank!r}, energy={energy!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise EdgeloraError(f"rank={rank!r} must be an integer >= 1 (components kept per layer)")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1):
        raise EdgeloraError(f"energy={energy!r} must be in (0, 1] (fraction of each delta's sigma^2 kept), e.g. 0.9")


def _weight(module: nn.Module) -> Tensor:
    """(out, in) weight of an nn.Linear, an AdaptedLinear's base or GPT-2's Conv1D (stored (in, out))."""
    from edgelora.layers import AdaptedLinear

    if isinstance(module, AdaptedLinear):
        module = module.base
    return module.weight.detach().t() if type(module).__name__ == "Conv1D" else module.weight.detach()


def _check_pair(base: nn.Module, tuned: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two state dicts, once they are known to be the same architecture with the same shapes."""
    from edgelora.model import base_state_dict, model_type

    kinds = (model_type(base) or type(base).__name__, model_type(tuned) or type(tuned).__name__)
    if kinds[0] != kinds[1]:
        raise EdgeloraError(f"the base is a {kinds[0]} model and the tuned one a {kinds[1]} model; "
                            "tuned must be a full fine-tune of base")
    b, t = base_state_dict(base), base_state_dict(tuned)
    # A task model may be saved without the base's pooler (RoBERTa's, a masked LM's): no LoRA reads it.
    only_b, only_t = ([k for k in sorted(set(x) - set(y)) if not k.startswith("pooler.")] for x, y in ((b, t), (t, b)))
    if only_b or only_t:
        what = "; ".join(f"only in {side}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for side, keys in (("base", only_b), ("tuned", only_t)) if keys)
        raise EdgeloraError(f"base and tuned {kinds[0]} models have different architectures ({what}); "
                            "tuned must be a full fine-tune of base")
    for key in b:
        if key in t and b[key].shape != t[key].shape:
            raise EdgeloraError(f"{key} has shape {tuple(b[key].shape)} in the base but {tuple(t[key].shape)} in the "
                                "tuned model; tuned must be a full fine-tune of base")
    return b, t


def _norm(x: Tensor) -> float:
    return float(x.detach().double().norm())


def extract_lora(model: AdapterModel, tuned: nn.Module, *, rank: int | None = None, energy: float | None = None,
                 method: str = "auto", progress: Callable[[str], None] | None = None) -> Extraction:
    """LoRA factors of `tuned` - `model.base` for every adaptable linear whose weight differs.

    Args:
        model: the base, wrapped; `add_extracted_adapter` later puts the result on it.
        tuned: the same architecture after full fine-tuning (a plain module, e.g. from `load_base`).
        rank, energy: keep `rank` components per layer (clamped to the layer's size), or per layer the
            fewest whose sigma^2 hold `energy` of the delta's.
        method: passed to `svd.truncated_svd` ("auto": exact up to 1024 on the smaller side).

    Bias, embedding, LayerNorm and other linear deltas cannot ride on a LoRA: they are listed in `dropped`.
    """
    import torch

    from edgelora.svd import truncated_svd

    check_target(rank, energy)
    base_sd, tuned_sd = _check_pair(model.base, tuned)
    adaptable = model.quantizable_names()
    carried = {f"{n}.weight" for n in adaptable}
    fits: list[LayerFit] = []
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for i, name in enumerate(adaptable):
        W0, W1 = _weight(model.base.get_submodule(name)), _weight(tuned.get_submodule(name))
        if torch.equal(W0, W1):
            continue
        if progress is not None:
            progress(f"layer {i + 1}/{len(adaptable)}: {name}")
        delta = W1.float() - W0.float()
        lr = truncated_svd(delta, rank=rank, energy=energy, method=method)
        fits.append(LayerFit(name, tuple(delta.shape), lr.rank, lr.energy_kept, lr.relative_error, _norm(delta),
                             _norm(W0)))
        factors[name] = (lr.A.float(), lr.B.float())
    linear_weights = {f"{n}.weight" for n, m in model.base.named_modules() if isinstance(m, torch.nn.Linear)}
    dropped = []
    for key, value in base_sd.items():
        if key in carried or key not in tuned_sd or torch.equal(value, tuned_sd[key]) or not value.is_floating_point():
            continue
        what = ("unused" if key.startswith("pooler.") else "bias" if key.endswith(".bias")
                else "linear" if key in linear_weights else "other")
        diff = _norm(tuned_sd[key].float() - value.float())
        dropped.append({"tensor": key, "what": what, "norm": diff, "relative": diff / max(_norm(value), 1e-12)})
    if not fits:
        others = f" (only {len(dropped)} other tensors differ, e.g. {dropped[0]['tensor']})" if dropped else ""
        raise EdgeloraError(f"no adaptable linear layer differs between the base and the tuned model{others}; "
                            "nothing for a LoRA adapter to carry")
    return Extraction(fits, factors, dropped)


def add_extracted_adapter(model: AdapterModel, name: str, extraction: Extraction, labels: list[str],
                          head: tuple[Tensor, Tensor | None] | None = None, *, kind: str = MEAN_POOLED,
                          dense: tuple[Tensor, Tensor] | None = None) -> None:
    """Add LoRA `name` holding `extraction` to `model`: r = the largest layer rank, alpha = r, a per-layer
    `rank_pattern` where ranks differ (their scale r / r_layer folded into B).

    Args:
        labels: the head's classes; empty for an adapter without a head (embeddings only).
        head: the classifier's (weight, bias), required with labels; bias None for a head without one.
        kind: the head's kind (`edgelora.heads.HEAD_KINDS`), e.g. the tuned architecture's ("bert-pooler").
        dense: the (weight, bias) of the layer before the classifier, for kinds that have one; for
            "bert-pooler" the tuned model's pooler, which a full fine-tune changes.
    """
    import torch

    from edgelora.config import LoraConfig
    from edgelora.heads import head_kind

    if labels and head is None:
        raise EdgeloraError(f"adapter {name!r}: labels {labels} were given without the head's weights; give head="
                            "(weight, bias), or no labels for an adapter without a head")
    if labels and (dense is not None) != (head_kind(kind).activation is not None):
        raise EdgeloraError(f"adapter {name!r}: head {kind!r} {'takes no' if dense is not None else 'needs its'} "
                            "dense layer")
    ranks = {f.layer: f.rank for f in extraction.fits}
    r = max(ranks.values())
    config = LoraConfig(r=r, alpha=float(r), target_modules=tuple(ranks),
                        rank_pattern={layer: k for layer, k in ranks.items() if k != r} or None)
    model.add_adapter(name, config, labels, head=kind)
    layers = dict(model.adapted_layers())
    with torch.no_grad():
        for layer_name, (A, B) in extraction.factors.items():
            layer = layers[layer_name]
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B / layer.scaling[name])
        if not labels:
            return
        weight, bias = head
        model.heads[name].weight.copy_(weight)
        if model.heads[name].bias is not None:
            model.heads[name].bias.copy_(bias if bias is not None else torch.zeros_like(model.heads[name].bias))
        if dense is not None:
            model.head_dense[name].weight.copy_(dense[0])
            model.head_dense[name].bias.copy_(dense[1])


# --- extract: directories in, adapter directory out ------------------------------------------------------
def extract_adapter(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int | None = None,
                    energy: float | None = None, name: str | None = None, method: str = "auto",
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Extract a LoRA adapter from Hugging Face directories `base` (or "minilm") and `tuned`; save it to `out`.

    The adapter's head is the tuned model's own (`finetuned.read_head`): a ...ForSequenceClassification's
    architecture head with its tuned weights, a ...ForTokenClassification's per-token classifier, or none
    for a model saved without a head (an embeddings adapter). Any other head is refused before the SVD.

    Returns the report: per-layer fits, totals (compression ratio, overall relative error), the dropped
    deltas, the head (kind, source, labels) and any warnings (the CLI prints those; nothing here prints).
    """
    from edgelora.heads import head_kind
    from edgelora.model import AdapterModel, hidden_size, load_base
    from edgelora.peft_format import check_adapter_out, save_adapter
    from edgelora.token_model import TokenAdapterModel

    check_target(rank, energy)
    check_adapter_out(out)  # before minutes of work
    name = name or Path(out).resolve().name
    if not ADAPTER_NAME.fullmatch(name):
        raise EdgeloraError(f"adapter name {name!r} must be {ADAPTER_NAME_RULE}; choose one with name=NAME")
    say = progress or (lambda _msg: None)
    say("loading models")
    with quiet_transformers():
        base_model, _ = load_base(base)
        tuned_model, tuned_path = load_base(tuned)
    _check_pair(base_model, tuned_model)  # another model entirely is the first thing to say
    head = read_head(tuned_path, tuned_model, hidden_size(base_model))  # refusals before the SVD
    if head.kind is not None and head_kind(head.kind).dense_from_base and \
            getattr(getattr(base_model, "pooler", None), "dense", None) is None:
        raise EdgeloraError(f"{tuned}: its {head.kind} head reads the base's pooler, and the base {base} has none "
                            "(its checkpoint holds no pooler); give the base checkpoint with its pooler")
    model = TokenAdapterModel(base_model) if head.kind == PER_TOKEN else AdapterModel(base_model)
    extraction = extract_lora(model, tuned_model, rank=rank, energy=energy, method=method, progress=say)
    if head.kind is not None and head_kind(head.kind).dense_from_base:  # the tuned pooler is the head's dense layer
        extraction.dropped = [d for d in extraction.dropped if not d["tensor"].startswith("pooler.")]
    warns = _warnings(extraction)
    summary = extraction.summary()
    add_extracted_adapter(model, name, extraction, head.labels,
                          None if head.weight is None else (head.weight, head.bias),
                          kind=head.kind or MEAN_POOLED, dense=head.dense)
    target = {"rank": rank} if rank is not None else {"energy": energy}
    provenance = {"tuned": str(tuned), **target, **{k: summary[k] for k in ("ranks", "compression_ratio",
                                                                              "relative_error", "energy_kept")}}
    say("saving")
    save_adapter(model, name, out, base_name=str(base), extra={"extraction": provenance})
    return {
        "base": str(base), "tuned": str(tuned), "out": str(out), "name": name, **target,
        "layers": [f.as_dict() for f in extraction.fits],
        "total": summary,
        "dropped": extraction.dropped,
        "head": {"kind": head.kind, "source": head.source, "labels": head.labels},
        "warnings": warns,
    }


def _warnings(extraction: Extraction) -> list[str]:
    warns = []
    by_what: dict[str, list[dict]] = {}
    for d in extraction.dropped:
        by_what.setdefault(d["what"], []).append(d)
    for what, items in sorted(by_what.items()):
        if DROPPED[what] is None:
            continue
        worst = max(items, key=lambda d: d["relative"])
        warns.append(f"dropped the deltas of {len(items)} {DROPPED[what]}: a LoRA adapter carries linear weights "
                     f"only; the largest, of {worst['tensor']}, is {100 * worst['relative']:.2g}% of its norm")
    rel = sorted(f.delta_norm / max(f.base_norm, 1e-12) for f in extraction.fits)
    median = rel[len(rel) // 2]
    if median > UNRELATED_BASE_REL_DELTA:
        warns.append(f"the median layer differs by {100 * median:.0f}% of its norm: is base really the model "
                     "tuned was fine-tuned from?")
    return warns


# --- reduce: adapter directory in, adapter directory out ------------------------------------------------
def reduce_adapter(path: str | Path, out: str | Path, *, rank: int | None = None,
                   energy: float | None = None) -> dict[str, Any]:
    """Truncate every layer of the LoRA adapter at `path` to its best rank-k (or energy) approximation of
    s * B @ A (`svd.reduce_lora_rank`) and write the result to `out`; no base model needed.

    alpha and rsLoRA stay; each layer's new scale is folded into its B, and differing layer ranks go
    into `rank_pattern`. The head, labels and base fingerprint are kept. Returns the report.
    """
    import torch

    from edgelora.config import LoraConfig, config_to_dict
    from edgelora.layers import LORA_A_KEY, LORA_B_KEY
    from edgelora.peft_format import (
        CONFIG_FILE,
        PEFT_PREFIX,
        WEIGHTS_FILE,
        adapter_config,
        check_adapter_out,
        read_adapter,
        write_adapter_dir,
    )
    from edgelora.smooth import load_factors
    from edgelora.svd import reduce_lora_rank

    check_target(rank, energy)
    path, out = Path(path), Path(out)
    check_adapter_out(out)
    data, tensors = read_adapter(path)
    config = adapter_config(data, str(path / CONFIG_FILE))
    if not isinstance(config, LoraConfig):
        raise EdgeloraError(f"{path}: a {config.kind} adapter; reduce truncates LoRA adapters (their B A) only")
    pairs = [(k, k.replace(LORA_A_KEY, LORA_B_KEY, 1)) for k in sorted(tensors) if LORA_A_KEY in k]
    if not pairs:
        raise EdgeloraError(f"{path / WEIGHTS_FILE}: holds no LoRA weights to reduce")
    fits, new_factors = [], {}
    for a_key, b_key in pairs:
        layer = a_key.partition(LORA_A_KEY)[0].removeprefix(PEFT_PREFIX)
        A, B = tensors[a_key].float(), tensors.get(b_key)
        r = config.rank_for(layer)
        if B is None or A.shape[0] != r or B.shape[1] != r:
            got = f"{tuple(A.shape)} and {None if B is None else tuple(B.shape)}"
            raise EdgeloraError(f"{path / WEIGHTS_FILE}: layer {layer} has lora_A/lora_B of shapes {got} but the config "
                                f"says rank {r}; the adapter is damaged")
        lr = reduce_lora_rank(A, B.float(), rank=rank, energy=energy, scaling=config.scaling_for(r))
        delta_norm = float(torch.linalg.vector_norm(lr.singular_values.double()))
        fits.append({"layer": layer, "shape": [B.shape[0], A.shape[1]], "rank_before": r, "rank": lr.rank,
                     "energy_kept": lr.energy_kept, "relative_error": lr.relative_error, "delta_norm": delta_norm})
        new_factors[(a_key, b_key)] = lr
    new_r = max(f["rank"] for f in fits)
    pattern = {f["layer"]: f["rank"] for f in fits if f["rank"] != new_r}
    new_config = dataclasses.replace(config, r=new_r, rank_pattern=pattern or None)
    new_tensors = {k: v for k, v in tensors.items() if LORA_A_KEY not in k and LORA_B_KEY not in k}
    for (a_key, b_key), lr in new_factors.items():
        new_tensors[a_key] = lr.A.float().contiguous()
        new_tensors[b_key] = (lr.B / new_config.scaling_for(lr.rank)).float().contiguous()
    total = sum(f["delta_norm"] ** 2 for f in fits)
    err = sum((f["relative_error"] * f["delta_norm"]) ** 2 for f in fits)
    before = sum(f["rank_before"] * sum(f["shape"]) for f in fits)
    after = sum(f["rank"] * sum(f["shape"]) for f in fits)
    summary = {"layers": len(fits), "ranks": sorted({f["rank"] for f in fits}), "lora_params_before": before,
               "lora_params": after, "relative_error": math.sqrt(err / total) if total > 0 else 0.0}
    target = {"rank": rank} if rank is not None else {"energy": energy}
    new_data = {**data, "r": new_r}
    new_data.pop("rank_pattern", None)
    if pattern:
        new_data["rank_pattern"] = pattern
    extras = dict(data.get("edgelora") or {})
    if "adapter" in extras:
        extras["adapter"] = config_to_dict(new_config)
    extras["reduced"] = {"from": str(path), **target, **summary}
    new_data["edgelora"] = extras
    write_adapter_dir(out, new_data, new_tensors, load_factors(path))  # smoothing stays: B A only changed rank
    return {"adapter": str(path), "out": str(out), **target, "layers": fits, "total": summary}
