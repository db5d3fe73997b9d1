"""`edgelora export`: a base and its adapters -> a checked bundle (merged or switchable, fp32 or int8).

Example:
    >>> export_bundle("minilm", {"intent": "runs/intent"}, mode="switchable", precision="int8", out="bundles/sw8")
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelora import __version__, smooth
from edgelora.calibrate import ranges_to_dict, static_qparams
from edgelora.config import EXPORT_MODES, QuantConfig, check_smoothing, config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, hidden_size, load_base, max_positions, model_type
from edgelora.peft_format import WEIGHTS_FILE, load_adapter
from edgelora.runtime.bundle import (
    MODEL_FILE,
    TOKEN_CLASSIFICATION,
    TOKENIZER_FILE,
    AdapterEntry,
    BaseInfo,
    Bank,
    Manifest,
    Quantization,
    Requires,
    TokenizerSpec,
    check_out,
    encoder_task,
    sha256_file,
    write_bundle,
)
from edgelora.runtime.cpu import detect_isa, recommended_weight_bits  # the CPU the int8 recipe is tuned for
from edgelora.tokenize import DEFAULT_MAX_LENGTH

from . import validate
from .fusion import DEFAULT_FUSIONS, fuse_graph
from .onnx_graph import HIDDEN_STATE, export_graph
from .mixed_precision import TARGET_COSINE, calibration_feeds, choose_fp32_layers, expand_to_units
from .quantize import QuantizedAttention, count_layers, quantization_units, quantize_graph
from .switchable import (
    BANK_FILE,
    LORA_SLOT_POLICIES,
    adapter_tensors,
    build_bank,
    check_bank,
    make_slots_inputs,
    slot_plan,
    slot_specs,
    slots_manifest,
    write_adapter_file,
)
from .switchable_fusion import STANDARD_ATTENTION_ORT, fuse_switchable
from .switchable_pack import pack_switchable

PRECISIONS = ("fp32", "int8")


def _weight_bits(model: AdapterModel, requested: int | None, isa: str) -> tuple[int, str]:
    """Bits from the flag, else from the adapters' training recipe, else from the CPU; they must agree."""
    trained = {layer.quant.weight_bits for _, layer in model.adapted_layers() if layer.quant is not None}
    if len(trained) > 1:
        raise EdgeloraError(f"the adapters were trained with different weight bits {sorted(trained)}; export them separately")
    if requested is not None:
        if trained and requested not in trained:
            raise EdgeloraError(
                f"weight_bits={requested} differs from the {trained.pop()}-bit recipe the adapters were trained with; "
                "drop weight_bits or retrain"
            )
        return requested, "flag"
    if trained:
        return trained.pop(), "adapter training recipe"
    return recommended_weight_bits(isa), f"CPU ({isa})"


def _activations(model: AdapterModel) -> str:
    """The int8 activation mode: "static" where the adapters were trained (and calibrated) so, else dynamic."""
    return "static" if model.quant is not None and model.quant.activations == "static" else "dynamic"


def _activations_manifest(model: AdapterModel, recipe: QuantConfig) -> dict[str, Any]:
    if recipe.activations != "static":
        return {"mode": "dynamic", "from": "DynamicQuantizeLinear at run time"}
    ranges = ranges_to_dict(model)
    return {"mode": "static", "from": "adapter calibration", "observer": ranges["observer"],
            "batches_observed": ranges["batches_observed"],
            "qparams": {n: [r["scale"], r["zero_point"]] for n, r in ranges["layers"].items()
                        if n not in recipe.skip_layers}}


def _smoothing(model: AdapterModel, requested: float | None, bits: int, base_path: Path,
               feed_names: tuple[str, ...]) -> tuple[float | None, dict[str, Any]]:
    """SmoothQuant alpha and where it came from: the adapters' training, or computed now (post-training)."""
    trained = smooth.current_factors(model)
    alpha = model.quant.smoothing if model.quant is not None else None
    if trained:
        if requested is not None and requested != alpha:
            raise EdgeloraError(f"smooth_alpha={requested} differs from the smoothing the adapters were trained with "
                                f"({alpha}); drop smooth_alpha or retrain")
        return alpha, {"alpha": alpha, "from": "adapter training recipe", "layers": len(trained),
                       "digest": smooth.factors_digest(trained)}
    if requested is None:
        return None, {"alpha": None, "from": "none"}
    if _activations(model) == "static":
        raise EdgeloraError(f"smooth_alpha={requested}: the adapters' static activation ranges were calibrated on "
                            "unsmoothed inputs; drop smooth_alpha, or retrain with QuantConfig(smoothing=ALPHA, "
                            "activations='static')")
    previous = model.quant
    model.set_quant(QuantConfig(weight_bits=bits))  # wraps every quantizable linear, so each can hold factors
    model.set_quant(previous)
    vocab = model.base.get_input_embeddings().num_embeddings
    feeds, described = calibration_feeds(base_path, feed_names, vocab)
    summary = smooth.smooth_model(model, feeds, requested)  # the base's ranges, as training computes them
    return requested, {"alpha": requested, "from": "export (post-training, the adapters did not train with it)",
                       "layers": summary["layers"], "calibration": described,
                       "digest": smooth.factors_digest(smooth.current_factors(model))}


def _smoothing_arrays(model: AdapterModel) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(s, 1/s) as float32 numpy per smoothed layer: the very constants the fake quantizer used."""
    return {name: (layer.smooth.cpu().numpy(), layer.smooth_inv.cpu().numpy())
            for name, layer in model.adapted_layers() if layer.smooth is not None}


def _fp32_layers(model: AdapterModel, keep_fp32, units, bits: int, mode: str, base_path: Path,
                 feed_names: tuple[str, ...], target: float) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The layers an int8 export keeps fp32 and where that choice came from (for the manifest)."""
    trained = tuple(model.quant.skip_layers) if model.quant is not None else ()
    known = set(model.quantizable_names())
    if keep_fp32 is None or (keep_fp32 == "auto" and trained):
        if not trained:
            return (), {"from": "none"}
        layers = expand_to_units(trained, units)
        choice: dict[str, Any] = {"from": "adapter training recipe"}
        if layers != trained:
            choice["note"] = "widened to whole fused attention blocks; the adapters fake-quantized part of them"
        return layers, choice
    if keep_fp32 == "auto":
        vocab = model.base.get_input_embeddings().num_embeddings
        feeds, described = calibration_feeds(base_path, feed_names, vocab)
        recipe = QuantConfig(weight_bits=bits, activations=_activations(model), mode=mode)
        chosen = choose_fp32_layers(model, recipe, units, feeds, target=target, calibration=described)
        return chosen.fp32_layers, {"from": "measured sensitivity", "sensitivity": chosen.as_manifest()}
    if isinstance(keep_fp32, str):
        raise EdgeloraError(f"keep_fp32={keep_fp32!r}: give layer names or 'auto'")
    unknown = sorted(set(keep_fp32) - known)
    if unknown:
        raise EdgeloraError(f"keep_fp32: {unknown[0]!r} is not a quantizable layer; e.g. {sorted(known)[0]!r}")
    layers = expand_to_units(tuple(keep_fp32), units)
    if trained and set(layers) != set(expand_to_units(trained, units)):
        raise EdgeloraError(
            f"keep_fp32={sorted(keep_fp32)} differs from the fp32 layers the adapters were trained with "
            f"({sorted(trained)}); drop keep_fp32 or retrain"
        )
    return layers, {"from": "request"}


def export_bundle(
    base: str | Path,
    adapters: Mapping[str, str | Path],
    *,
    mode: str,
    precision: str,
    out: str | Path,
    weight_bits: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    fusions: Sequence[str] | None = None,
    keep_fp32: Sequence[str] | str | None = None,
    target_cosine: float = TARGET_COSINE,
    smooth_alpha: float | None = None,
    lora_slots: str = "adapters",
    hidden_state: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export `base` with `adapters` (name -> adapter directory) to a bundle; returns its manifest, as written.

    Args:
        fusions: ONNX Runtime's BERT fusions to apply to BERT bases (names from `fusion.FUSIONS`;
            None: `fusion.DEFAULT_FUSIONS`, the fastest measured; (): none), fp32 and int8 alike, so
            int8/fp32 compares like with like. Switchable graphs take the attention fusion only, with
            their adapter branches joined again (`switchable_fusion.fuse_switchable`). Other bases stay unfused;
            the manifest says what was fused, or why not.
        keep_fp32: int8 mixed precision: layer names to keep fp32, or "auto" to measure each layer's
            effect on the embeddings and keep the most sensitive fp32 until their worst cosine to fp32
            reaches `target_cosine` (see `mixed_precision.py`). None: what the adapters were trained
            with (`QuantConfig.skip_layers`), else nothing. The choice is recorded in the manifest.
        smooth_alpha: SmoothQuant for int8 (`edgelora.smooth`): adapters trained with smoothing always
            export with their factors; for adapters trained without, this alpha computes factors now from
            the base on calibration text (post-training smoothing). None: none beyond the adapters'.
        lora_slots: in switchable mode, which layers get a LoRA slot: "adapters" (those these adapters
            adapt), or "attention" / "attention+mlp" (every such projection), so that LoRA adapters trained
            later on them can be added with `edgelora add-adapter` (see `switchable.slot_plan`).
        hidden_state: add the token-level `last_hidden_state` output (batch, tokens, hidden) beside the
            pooled `embeddings`. Adapters with a head give `logits` too (`edgelora.heads` says how each head
            pools); adapters without one (PEFT's FEATURE_EXTRACTION) make an embeddings bundle.
    """
    if mode not in EXPORT_MODES:
        raise EdgeloraError(f"mode={mode!r} is not supported; choose from {', '.join(EXPORT_MODES)}")
    if precision not in PRECISIONS:
        raise EdgeloraError(f"precision={precision!r} is not supported; choose from {', '.join(PRECISIONS)}")
    if not adapters:
        raise EdgeloraError("adapters is empty; give at least one adapter directory to export")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise EdgeloraError(f"max_length={max_length!r} must be a positive number of tokens, e.g. 128")
    if lora_slots not in LORA_SLOT_POLICIES:
        raise EdgeloraError(f"lora_slots={lora_slots!r} is not supported; choose from {', '.join(LORA_SLOT_POLICIES)}")
    if mode == "merged" and len(adapters) != 1:
        raise EdgeloraError(f"merged mode bakes one adapter into the graph, got {len(adapters)}; use mode='switchable' for several")
    if isinstance(target_cosine, bool) or not isinstance(target_cosine, (int, float)) or not 0.0 < target_cosine <= 1.0:
        raise EdgeloraError(f"target_cosine={target_cosine!r} must be in (0, 1], e.g. 0.995")
    if smooth_alpha is not None and precision != "int8":
        raise EdgeloraError("smooth_alpha applies to int8 exports; drop it or pass precision='int8'")
    if smooth_alpha is not None:
        check_smoothing(smooth_alpha)
    check_out(Path(out))  # before minutes of export work, not only when writing
    say = progress or (lambda _msg: None)
    say("loading base")
    hf_model, base_path = load_base(base)
    model = _model_for(hf_model, adapters)
    # Texts are truncated to what the base can embed: longer inputs would index past its position table.
    max_length = min(max_length, max_positions(hf_model) or max_length)
    for name, path in adapters.items():
        load_adapter(model, path, name)
    names = list(adapters)
    cpu = detect_isa()
    bits, bits_source = _weight_bits(model, weight_bits if precision == "int8" else None, cpu.isa)
    trained_modes = sorted({layer.quant.mode for _, layer in model.adapted_layers() if layer.quant is not None})

    say("exporting graph")
    if mode == "merged":
        graph = export_graph(model, mode="merged", adapter=names[0], hidden_state=hidden_state)
        plan, specs = None, {}
    else:
        plan = slot_plan(model, names, lora_slots)
        graph = export_graph(model, mode="switchable", adapter=None, slots=plan, hidden_state=hidden_state)
        make_slots_inputs(graph)  # adapter banks gathered by adapter_ids (see switchable.py)
        specs = slot_specs(graph.model)
    say("fusing")
    vocab = model.base.get_input_embeddings().num_embeddings
    requested = DEFAULT_FUSIONS if fusions is None else tuple(fusions)
    fuse = fuse_graph if mode == "merged" else fuse_switchable  # switchable: adapter branches rejoined float
    check_feeds = validate.generated_feeds(vocab, graph.feeds)  # what the fused and packed graphs are checked on
    fusion = fuse(graph, model, check_feeds, requested)
    packs = {}
    if mode == "switchable" and fusion.multi_head:  # q, k, v of each adapted attention core: one projection
        packs, pack_note = pack_switchable(graph, fusion.multi_head, check_feeds)
        fusion = dataclasses.replace(fusion, note="; ".join(n for n in (fusion.note, pack_note) if n))
        specs = slot_specs(graph.model)
    packed = {name: pack.layers for name, pack in packs.items()}
    grouped = {**fusion.attention, **packed}  # int8 or fp32 together
    quantized: dict = {}
    fp32_layers: tuple[str, ...] = ()
    fp32_choice: dict[str, Any] = {"from": "none"}
    alpha, smoothing_choice = None, {"alpha": None, "from": "none"}
    if precision == "int8":
        alpha, smoothing_choice = _smoothing(model, smooth_alpha, bits, base_path, graph.feeds)
        units = quantization_units(model.quantizable_names(), grouped)
        if keep_fp32 == "auto" and not (model.quant and model.quant.skip_layers):
            say("measuring layer sensitivity")
        fp32_layers, fp32_choice = _fp32_layers(model, keep_fp32, units, bits, mode, base_path, graph.feeds, target_cosine)
        say("quantizing")
        static = static_qparams(model) if _activations(model) == "static" else None
        quantized = quantize_graph(graph.model, graph.weights, bits, fusion.attention, skip=fp32_layers, static=static,
                                  smoothing=_smoothing_arrays(model),
                                  packed=packed)
    recipe = QuantConfig(weight_bits=bits, activations=_activations(model), mode=mode, skip_layers=fp32_layers,
                         smoothing=alpha)
    model_bytes = graph.model.SerializeToString()
    adapter_values = {n: adapter_tensors(model, n, specs, packs) for n in names} if mode == "switchable" else {}
    bank = build_bank(adapter_values, specs) if mode == "switchable" else {}

    say("validating against torch")
    report = _validate(model, graph.model, graph.feeds, names, mode, precision, recipe, adapter_values, quantized)
    if hidden_state:
        report[HIDDEN_STATE] = _check_hidden_state(model, graph.model, graph.feeds, names, mode, precision,
                                                   adapter_values)
    if bank:
        report["mixed batch (bank)"] = check_bank(model, graph.model, graph.feeds, names, precision, recipe, bank)

    entries = tuple(
        AdapterEntry.create(
            n, kind=model.configs[n].kind, labels=model.labels[n], switchable=mode == "switchable",
            head=model.head_kind(n),
            source_sha256=sha256_file(Path(adapters[n]) / WEIGHTS_FILE),  # the adapter weights exported
            trained_with=None if not trained_modes else {"weight_bits": bits, "modes": trained_modes},
        )
        for n in names
    )
    quantization = None if precision == "fp32" else Quantization(
        scheme="weights int8 symmetric per output channel (shared quantizer), activations "
               f"{recipe.activations} uint8 per tensor",
        activations=_activations_manifest(model, recipe),
        weight_bits=bits,
        weight_bits_from=bits_source,
        isa=cpu.isa,
        quantized_matmuls=count_layers(quantized),
        qattention_nodes=sum(isinstance(q, QuantizedAttention) for q in quantized.values()),
        recipe=dict(config_to_dict(recipe), skip_layers=list(recipe.skip_layers)),
        fp32_layers=tuple(fp32_layers),
        fp32_layers_from=fp32_choice,
        smoothing=smoothing_choice,
        excluded="embeddings, attention score products, adapter branches, heads",
    )
    manifest = Manifest(
        edgelora_version=__version__,
        mode=mode,
        precision=precision,
        task=TOKEN_CLASSIFICATION if model.task == TOKEN_CLASSIFICATION else encoder_task(entries),
        base=BaseInfo(name=str(base), fingerprint=model.base_fingerprint,
                      architecture=model_type(hf_model) or type(hf_model).__name__, hidden_size=hidden_size(hf_model)),
        inputs=tuple(graph.feeds),
        outputs=tuple(graph.outputs),
        tokenizer=TokenizerSpec(file=TOKENIZER_FILE, max_length=max_length)
        if (base_path / TOKENIZER_FILE).is_file() else None,
        adapters=entries,
        quantization=quantization,
        fusions=fusion.as_manifest(),
        requires=Requires(onnxruntime=STANDARD_ATTENTION_ORT) if fusion.applied.get("ai.onnx.Attention") else None,
        isa=cpu.isa,
        validation=report,
        warnings=(f"adapters were fake-quantized for {trained_modes} deployment, exported as {mode}",)
        if trained_modes and mode not in trained_modes else None,
        slots=slots_manifest(plan, lora_slots, packs) if mode == "switchable" else None,
        bank=Bank(file=BANK_FILE, adapters=(*names, None)) if mode == "switchable" else None,  # entry i: adapter_ids == i
    )
    writers: dict[str, Callable[[Path], None]] = {MODEL_FILE: lambda p: p.write_bytes(model_bytes)}
    if bank:
        writers[BANK_FILE] = lambda p: write_adapter_file(p, bank)
    for entry in entries:
        if entry.file is not None:
            writers[entry.file] = lambda p, values=adapter_values[entry.name]: write_adapter_file(p, values)
    say("writing bundle")
    return write_bundle(Path(out), manifest, writers, base_path)


def _model_for(hf_model, adapters: Mapping[str, str | Path]) -> AdapterModel:
    """The model the adapters load into: per-token heads for token-classification adapters (ours, or PEFT's
    TOKEN_CLS), a sequence model otherwise; `load_adapter` refuses an adapter of the other task by name."""
    from edgelora.peft_format import adapter_task
    from edgelora.token_model import TokenAdapterModel

    first = next(iter(adapters.values()))
    return TokenAdapterModel(hf_model) if adapter_task(first) == TOKEN_CLASSIFICATION else AdapterModel(hf_model)


def _check_hidden_state(model, proto, feeds_names, names, mode, precision, adapter_values) -> dict[str, Any]:
    """Compare the token-level output with the fp32 torch model for the first adapter (fp32 bundles within
    the fp32 tolerance; int8 recorded as the cosine of the token vectors, checked by the embeddings)."""
    import tempfile

    vocab = model.base.get_input_embeddings().num_embeddings
    feeds = validate.generated_feeds(vocab, feeds_names)
    name = names[0]
    with tempfile.TemporaryDirectory() as tmp:
        adapter_file = None
        if mode == "switchable":
            adapter_file = str(Path(tmp) / f"{name}.onnx_adapter")
            write_adapter_file(Path(adapter_file), adapter_values[name])
        run_options, _adapter = validate.adapter_run_options(adapter_file)
        (got,) = validate.session(proto.SerializeToString()).run([HIDDEN_STATE], feeds, run_options)
    ref_model = copy.deepcopy(model)
    ref_model.set_quant(None)
    ref_model.set_adapter(name)
    with torch.no_grad():
        ref = ref_model.hidden_states(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    real = feeds["attention_mask"].astype(bool)  # padded positions carry no meaning: compare real tokens
    check = validate.compare(HIDDEN_STATE, got[real], ref[real])
    if precision == "fp32" and check.max_abs_diff > validate.FP32_REL_TOL * max(1.0, float(np.abs(ref).max())):
        raise EdgeloraError(f"export check failed for adapter {name!r}: fp32 ONNX {HIDDEN_STATE} differs from torch "
                            f"by {check.max_abs_diff:.3g}; please report this model")
    return {"adapter": name, "vs_fp32_torch": check.as_dict()}


def _validate(model, proto, feeds_names, names, mode, precision, recipe, adapter_values, quantized) -> dict[str, Any]:
    """Run the graph on generated inputs for every adapter (and no adapter in switchable mode) and
    compare with torch: fp32 against the float model, int8 against the fake-quant model layer by layer
    and end to end. Raises EdgeloraError outside tolerance; returns the figures for the manifest."""
    import tempfile

    vocab = model.base.get_input_embeddings().num_embeddings
    feeds = validate.generated_feeds(vocab, feeds_names)
    sess = validate.session(proto.SerializeToString())
    fp32_model = copy.deepcopy(model)
    fp32_model.set_quant(None)
    fq_model = None
    if precision == "int8":
        fq_model = copy.deepcopy(model)
        fq_model.set_quant(recipe)
    report: dict[str, Any] = {
        "inputs": {"batch": int(feeds["input_ids"].shape[0]), "seq": int(feeds["input_ids"].shape[1]),
                   "kind": "random token ids, ragged padding"},
        "tolerances": {"fp32_rel": validate.FP32_REL_TOL, "int8_layer_rel": validate.INT8_LAYER_REL_TOL,
                       "int8_min_cosine": validate.INT8_MIN_COSINE},
    }
    runs: list[str | None] = list(names) + ([None] if mode == "switchable" else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in runs:
            adapter_file = None
            if mode == "switchable" and name is not None:
                adapter_file = str(Path(tmp) / f"{name}.onnx_adapter")
                write_adapter_file(Path(adapter_file), adapter_values[name])
            run_options, _adapter = validate.adapter_run_options(adapter_file)
            logits, pooled = validate.run_graph(sess, feeds, run_options)
            label = f"adapter {name!r}" if name else "the plain base (no adapter)"
            entry: dict[str, Any] = {}
            for ref_name, ref_model in (("vs_fp32_torch", fp32_model), ("vs_fake_quant_torch", fq_model)):
                if ref_model is None:
                    continue
                ref_model.set_adapter(name)
                ref_logits, ref_pooled = validate.torch_outputs(ref_model, feeds)
                if logits.ndim == 3:  # per-token logits: padded positions mean nothing, compare the real tokens
                    real = feeds["attention_mask"].astype(bool)
                    lc = validate.compare("logits", logits[real], ref_logits[real])
                else:
                    lc = validate.compare("logits", logits, ref_logits)
                pc = validate.compare("embeddings", pooled, ref_pooled)
                entry[ref_name] = {"logits": lc.as_dict(), "embeddings": pc.as_dict()}
                if (ref_name == "vs_fp32_torch") == (precision == "fp32"):
                    validate.check_tolerance(precision, label, lc, pc, float(np.abs(ref_pooled).max()))
            if quantized:
                err, layer = validate.layerwise_error(proto, feeds, quantized, recipe.weight_bits, run_options)
                entry["int8_layers_vs_fake_quant"] = {"max_rel_error": err, "worst_layer": layer}
                if err > validate.INT8_LAYER_REL_TOL:
                    raise EdgeloraError(
                        f"export check failed for {label}: int8 layer {layer} differs from the fake-quant product "
                        f"by {err:.2g} relative (> {validate.INT8_LAYER_REL_TOL}); with 8-bit weights on a CPU "
                        "without VNNI, export with weight_bits=7"
                    )
            report[name or "(no adapter)"] = entry
    return report
