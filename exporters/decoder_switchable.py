"""Switchable decoder bundles: one base graph (fp32, or int8 MatMulNBits) with LoRA adapter banks, the adapters
as `.onnx_adapter` files chosen per call, or per row of one batch through `bank.onnx_adapter`.

The bank machinery is the encoder's (exporters/switchable.py: slot forms, `peft_slots`, `build_bank`, the
adapter files); the decoder graph puts a bank on each adapted projection (`decoder_graph.build_decoder_graph`
with `lora_modules`). This module plans the slots, converts the adapters and checks the graph against torch:
each adapter alone (fp32 against the float model, int8 layer by layer and end to end against the fake-quant
model with the switchable recipe: base quantized, LoRA float, as training fake-quantizes for this mode), and
one batch mixing every adapter and "no adapter" row by row, which must give each row what that row's adapter
gives alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from edgelora import smooth
from edgelora.causal_lm import CausalLMAdapterModel
from edgelora.causal_train import decoder_quant
from edgelora.config import LoraConfig, QuantConfig, config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import BLOCK
from edgelora.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter
from edgelora.runtime.bundle import ADAPTER_IDS, BANK_FILE, adapter_file, sha256_file

from .decoder_graph import DecoderGraph, DecoderSpec, RowwisePlan, projection_modules
from .decoder_validate import (
    FP32_REL_TOL,
    INT8_LAYER_REL_TOL,
    INT8_MIN_COSINE,
    _compare,
    decode_feeds,
    layerwise_error,
    prefill_feeds,
    session,
    torch_steps,
)
from .switchable import LORA_SLOT_POLICIES, adapter_tensors, build_bank, slot_specs, write_adapter_file

# The fake quantization a switchable int8 decoder reproduces, and the recipe its adapters train with
# (`edgelora train --task causal-lm --qat int8 --deploy-mode switchable`): blockwise int8 base, float LoRA.
SWITCHABLE_RECIPE = decoder_quant(BLOCK, mode="switchable")
# A mixed batch's row against the same row run with its adapter alone, relative to the largest |logit|. Zero
# padding adds exact zeros and MatMulNBits quantizes each row on its own, so this is 0 when the kernels are
# row-independent, as measured; the bound only keeps a kernel change from failing exports over rounding.
BANK_REL_TOL = 1e-6


@dataclass
class SwitchablePlan:
    """What a switchable decoder export carries: the model with the adapters injected, the slot modules, and
    each adapter's tensors in its `.onnx_adapter` form (filled in once the graph exists)."""

    model: CausalLMAdapterModel
    names: list[str]
    modules: list[str]
    policy: str
    entries: list[dict[str, Any]]
    values: dict[str, dict[str, np.ndarray]]
    warnings: list[str]
    projections: list[str] = dataclasses.field(default_factory=list)  # every projection of the graph, slotted or not


def _projections(model: torch.nn.Module, spec: DecoderSpec) -> list[list[str]]:
    """Every projection of the graph as its packed groups of module names (q|k|v, o, gate|up, down)."""
    kinds = ("qkv", "o_proj", "c_fc", "down_proj") if spec.model_type == "gpt2" else ("qkv", "o_proj", "gate_up", "down_proj")
    return [[m for m, _ in projection_modules(model, spec, f"layers.{i}.{k}")] for i in range(spec.num_layers) for k in kinds]


def plan_switchable(base: torch.nn.Module, spec: DecoderSpec, adapters: Mapping[str, str | Path],
                    lora_slots: str) -> SwitchablePlan:
    """Load the adapters into a copy of `base` (fingerprint, layer and shape checks: `peft_format.load_adapter`)
    and choose the slot modules: the projections they adapt plus those `lora_slots` names ("attention": every
    q/k/v/o, "attention+mlp": every projection, "adapters": none more), widened to whole packed groups."""
    if lora_slots not in LORA_SLOT_POLICIES:
        raise EdgeloraError(f"lora_slots={lora_slots!r} is not supported; choose from {', '.join(LORA_SLOT_POLICIES)}")
    model = CausalLMAdapterModel(copy.deepcopy(base))
    entries, warnings = [], []
    for name, path in adapters.items():
        path = Path(path)
        data = _config(path)
        task = data.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise EdgeloraError(f"{path / CONFIG_FILE}: task_type {task!r} is not a causal-LM adapter; give a CAUSAL_LM "
                                "LoRA adapter")
        load_adapter(model, path, name)
        config = model.configs[name]
        if not isinstance(config, LoraConfig):
            raise EdgeloraError(f"{path}: a {config.kind} adapter cannot go into a decoder bundle; give a LoRA adapter")
        trained = (data.get("edgelora") or {}).get("quantization") or {}
        if trained and trained.get("mode", "merged") != "switchable":
            warnings.append(f"adapter {name!r} was fake-quantized for {trained.get('mode', 'merged')} deployment, "
                            "exported switchable")
        ranks = sorted({layer.lora_A[name].weight.shape[0] for _, layer in model.adapted_layers() if name in layer.lora_A})
        entries.append({"name": name, "kind": "lora", "labels": [], "file": adapter_file(name), "sha256": None,
                        "source_sha256": sha256_file(path / WEIGHTS_FILE),
                        "trained_with": {"weight_bits": trained.get("weight_bits", 8),
                                         "modes": [trained.get("mode", "merged")]} if trained else None,
                        "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": config.alpha,
                        "use_rslora": config.use_rslora})
    names = list(adapters)
    adapted = {layer for layer, module in model.adapted_layers() if any(n in module.lora_A for n in names)}
    wanted = set(adapted)
    if lora_slots != "adapters":
        wanted |= set(model._lora_target_names(LoraConfig(include_mlp=lora_slots == "attention+mlp")))
    groups = _projections(base, spec)
    slotted = {m for g in groups if wanted & set(g) for m in g}
    stray = sorted(adapted - slotted)
    if stray:
        layers = dict(model.adapted_layers())
        owner = next(n for n in names if n in layers[stray[0]].lora_A)
        raise EdgeloraError(f"{adapters[owner]}: adapter targets {stray[0]}, which a switchable decoder has no LoRA "
                            "slot for (attention and MLP projections only); export it merged")
    modules = [m for g in groups for m in g if m in slotted]
    return SwitchablePlan(model, names, modules, lora_slots, entries, {}, warnings, [m for g in groups for m in g])


def _config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeloraError(f"{path / CONFIG_FILE}: missing; give an adapter directory (adapter_config.json and "
                            f"{WEIGHTS_FILE})") from None
    except (OSError, ValueError) as e:
        raise EdgeloraError(f"{path / CONFIG_FILE}: not readable JSON ({e}); re-save the adapter") from None
    if not isinstance(data, dict):
        raise EdgeloraError(f"{path / CONFIG_FILE}: not a JSON object; re-save the adapter")
    return data


def fill_values(plan: SwitchablePlan, graph: DecoderGraph) -> dict[str, np.ndarray]:
    """Each adapter's tensors in its file's form (a bank of one) and the bank of them all; returns the bank."""
    specs = slot_specs(graph.model)
    plan.values = {n: adapter_tensors(plan.model, n, specs) for n in plan.names}
    return build_bank(plan.values, specs)


def adapter_options(tmp: Path, name: str, values: Mapping[str, np.ndarray]) -> tuple[ort.RunOptions, ort.LoraAdapter]:
    """RunOptions activating `values` written as an `.onnx_adapter` under `tmp` (the adapter must stay alive)."""
    path = tmp / f"{name}.onnx_adapter"
    write_adapter_file(path, values)
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    return options, adapter


def _run_steps(sess: ort.InferenceSession, prefill: dict[str, np.ndarray], options: ort.RunOptions,
               extra: Mapping[str, np.ndarray], decode_ids: np.ndarray | None = None):
    """Prefill and one decode step (greedy per row unless `decode_ids` is given): (logits of both, the decode
    ids, both runs' feeds)."""
    first = sess.run(None, {**prefill, **extra}, options)
    ids = first[0][:, -1].argmax(-1) if decode_ids is None else decode_ids
    decode = decode_feeds(prefill, first[1:], ids)
    return [first[0], sess.run(None, {**decode, **extra}, options)[0]], ids, [prefill, decode]


def check_switchable(graph: DecoderGraph, plan: SwitchablePlan, bank: Mapping[str, np.ndarray],
                     precision: str, rowwise: RowwisePlan | None = None) -> dict[str, Any]:
    """Every adapter and "no adapter" through the graph against torch, then one mixed batch through the bank
    against each row's own run. Raises EdgeloraError outside tolerance; returns the figures for the manifest.
    A graph without `quantized` records (read back from a bundle) skips the int8 layer-by-layer check, which
    its base passed at export. `rowwise`: the graph's rowwise int8 recipe and factors (None: block)."""
    runs: list[str | None] = [*plan.names, None]
    batch = max(3, len(runs))
    prefill = prefill_feeds(graph.spec, batch=batch)
    sess = session(graph.model)
    fp32 = plan.model
    fq = None
    recipe = SWITCHABLE_RECIPE if rowwise is None else dataclasses.replace(rowwise.quant, mode="switchable")
    if precision == "int8":
        fq = copy.deepcopy(fp32)
        fq.set_quant(recipe)
        if rowwise is not None and not smooth.current_factors(fq):  # adapters trained with factors brought them
            smooth.apply_smoothing(fq, rowwise.smoothing)
    fp32.set_quant(None)
    report: dict[str, Any] = {
        "inputs": {"batch": batch, "prefill": int(prefill["input_ids"].shape[1]), "decode_steps": 1,
                   "kind": "random token ids, left padding"},
        "tolerances": {"fp32_rel": FP32_REL_TOL, "int8_layer_rel": INT8_LAYER_REL_TOL,
                       "int8_min_cosine": INT8_MIN_COSINE, "bank_row_rel": BANK_REL_TOL},
        "reference": "fp32: the float model with the adapter; int8: the fake-quant model, "
                     f"recipe {config_to_dict(recipe)} (base int8, LoRA float)",
    }
    alone: dict[str | None, tuple[list[np.ndarray], np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in runs:
            label = f"adapter {name!r}" if name else "the plain base (no adapter)"
            options, _keep = adapter_options(Path(tmp), name, plan.values[name]) if name else (ort.RunOptions(), None)
            got, ids, feeds = _run_steps(sess, prefill, options, {})
            alone[name] = got, ids
            masks = [f["attention_mask"] for f in feeds]
            fp32.set_adapter(name)
            entry: dict[str, Any] = {"vs_fp32_torch": _compare(got, torch_steps(fp32.base, prefill, ids), masks)}
            if precision == "fp32" and entry["vs_fp32_torch"]["max_rel_error"] > FP32_REL_TOL:
                raise EdgeloraError(f"export check failed for {label}: fp32 ONNX logits differ from torch by "
                                    f"{entry['vs_fp32_torch']['max_rel_error']:.3g} relative (> {FP32_REL_TOL}); "
                                    "please report this model")
            if fq is not None and graph.quantized:
                err, layer = layerwise_error(graph, feeds, options)
                entry["int8_layers_vs_fake_quant"] = {"max_rel_error": err, "worst_layer": layer,
                                                      "matmuls": len(graph.quantized)}
                if err > INT8_LAYER_REL_TOL:
                    raise EdgeloraError(f"export check failed for {label}: int8 matmul {layer} differs from the "
                                        f"fake-quant product by {err:.2g} relative (> {INT8_LAYER_REL_TOL}); please "
                                        "report this CPU and model")
            if fq is not None:
                fq.set_adapter(name)
                entry["vs_fake_quant_torch"] = _compare(got, torch_steps(fq.base, prefill, ids), masks)
                if entry["vs_fake_quant_torch"]["worst_cosine"] < INT8_MIN_COSINE:
                    raise EdgeloraError(f"export check failed for {label}: int8 ONNX logits are far from the fake-quant "
                                        f"model (cosine {entry['vs_fake_quant_torch']['worst_cosine']:.4f} < "
                                        f"{INT8_MIN_COSINE}); please report this model")
            report[name or "(no adapter)"] = entry
        fp32.set_adapter(None)
        if plan.names:
            report["mixed batch (bank)"] = _check_bank(sess, Path(tmp), prefill, runs, alone, bank)
    return report


def bank_rows(names: Sequence[str], batch: int) -> list[str | None]:
    """Row i of a bank check uses adapter i % (adapters + 1), the last being "no adapter"."""
    cycle = [*names, None]
    return [cycle[i % len(cycle)] for i in range(batch)]


def _check_bank(sess, tmp: Path, prefill, runs, alone, bank) -> dict[str, Any]:
    rows = bank_rows([r for r in runs if r is not None], len(prefill["input_ids"]))
    options, _keep = adapter_options(tmp, "bank", bank)
    ids = np.array([runs.index(r) for r in rows], np.int64)  # the bank's entry order: the adapters, then zero
    decode_ids = np.array([alone[r][1][i] for i, r in enumerate(rows)])
    got, _, feeds = _run_steps(sess, prefill, options, {ADAPTER_IDS: ids}, decode_ids)
    worst = 0.0
    for step in range(2):
        mask = feeds[step]["attention_mask"][:, -got[step].shape[1]:].astype(bool)
        for i, r in enumerate(rows):
            ref = alone[r][0][step][i][mask[i]]
            diff = float(np.abs(got[step][i][mask[i]] - ref).max() / max(np.abs(ref).max(), 1e-30))
            worst = max(worst, diff)
    if worst > BANK_REL_TOL:
        raise EdgeloraError(f"export check failed: a batch mixing adapters row by row differs from each row's own "
                            f"adapter by {worst:.3g} relative (> {BANK_REL_TOL}); please report this CPU and model")
    return {"rows": [r or "(no adapter)" for r in rows], "max_rel_error_vs_alone": worst}


def slots_record(plan: SwitchablePlan, graph: DecoderGraph) -> dict[str, Any]:
    """The manifest's "slots": the modules with a LoRA slot, what an adapter added later must fit."""
    return {"policy": plan.policy, "lora": list(plan.modules), "bottleneck": [], "bottleneck_activation": None,
            "inputs": len(graph.slots), "projections": plan.projections}


def bank_record(plan: SwitchablePlan) -> dict[str, Any]:
    return {"file": BANK_FILE, "adapters": [*plan.names, None]}


def graph_factors(proto, hf_model: torch.nn.Module, spec: DecoderSpec) -> dict[str, torch.Tensor]:
    """A rowwise graph's SmoothQuant factors by module, read back from its `<linear>.smooth_inv` initializers
    (1/s, float32; 1/(1/s) may be one ulp off s, far below what the int8 check resolves)."""
    from onnx import numpy_helper

    head = next((n for n, m in hf_model.named_modules() if m is hf_model.get_output_embeddings()), "lm_head")
    out: dict[str, torch.Tensor] = {}
    for init in proto.graph.initializer:
        if init.name.endswith(".smooth_inv"):
            inv = torch.from_numpy(numpy_helper.to_array(init).astype(np.float32))
            name = init.name[:-len(".smooth_inv")]
            # the builder's names: a layer's projections, else the LM head (exporters/decoder_graph.py linear())
            for module in [m for m, _ in projection_modules(hf_model, spec, name)] or [head]:
                out[module] = 1.0 / inv
    return out


def _bundle_rowwise(manifest, proto, hf_model: torch.nn.Module, spec: DecoderSpec,
                    paths: Sequence[Path]) -> RowwisePlan | None:
    """The RowwisePlan a rowwise bundle was exported with (None for block): its recorded recipe, and its factors
    from a new adapter trained with them (the caller checked their digest) or else from the graph."""
    q = manifest.quantization
    if q is None or q.int8_scheme != "rowwise":
        return None
    recipe = QuantConfig(**(q.recipe or {}))  # its __post_init__ makes JSON's lists tuples
    if recipe.smoothing is None:
        return RowwisePlan(recipe)
    carried = [f for f in (smooth.load_factors(p) for p in paths) if f]
    return RowwisePlan(recipe, carried[0] if carried else graph_factors(proto, hf_model, spec))


def check_added(manifest, proto, hf_model, paths: Mapping[str, str | Path],
                values: Mapping[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """`edgelora add-adapter` on a decoder bundle: each new adapter (its tensors as they will be written)
    through the bundle's graph against torch on `hf_model` (the bundle's base, checked by the caller), and a
    batch mixing them row by row. Returns each new adapter's figures and the mixed batch's."""
    from .decoder_graph import decoder_spec

    spec = decoder_spec(hf_model)
    rowwise = _bundle_rowwise(manifest, proto, hf_model, spec, [Path(paths[name]) for name in values])  # before
    model = CausalLMAdapterModel(hf_model)  # ... this wraps the linears in place
    for name in values:
        load_adapter(model, paths[name], name)
    plan = SwitchablePlan(model, list(values), [], "", [], dict(values), [])
    graph = DecoderGraph(proto, spec)
    report = check_switchable(graph, plan, build_bank(values, slot_specs(proto)), manifest.precision, rowwise)
    out = {name: report[name] for name in values}
    out[f"mixed batch (bank: {', '.join(values)}, added)"] = report["mixed batch (bank)"]
    return out
