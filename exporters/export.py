"""`edgelora export`: a base and its adapters -> a checked bundle (merged or switchable, fp32 or int8).

Example:
    >>> export_bundle("minilm", {"intent": "runs/intent"}, mode="switchable", precision="int8", out="bundles/sw8")
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgelora import __version__
from edgelora.config import EXPORT_MODES, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, hidden_size, load_base, model_type
from edgelora.peft_format import load_adapter
from edgelora.runtime.cpu import detect_isa, recommended_weight_bits
from edgelora.tokenize import DEFAULT_MAX_LENGTH

from . import validate
from .bundle import check_out, write_bundle
from .onnx_graph import OUTPUTS, export_graph
from .quantize import quantize_graph
from .switchable import adapter_tensors, make_slots_inputs, slot_plan, write_adapter_file

PRECISIONS = ("fp32", "int8")


def _weight_bits(model: AdapterModel, requested: int | None, isa: str) -> tuple[int, str]:
    """Bits from the flag, else from the adapters' training recipe, else from the CPU; they must agree."""
    trained = {layer.quant.weight_bits for _, layer in model.adapted_layers() if layer.quant is not None}
    if len(trained) > 1:
        raise EdgeloraError(f"the adapters were trained with different weight bits {sorted(trained)}; export them separately")
    if requested is not None:
        if trained and requested not in trained:
            raise EdgeloraError(
                f"--weight-bits {requested} differs from the {trained.pop()}-bit recipe the adapters were trained with; "
                "drop the flag or retrain"
            )
        return requested, "flag"
    if trained:
        return trained.pop(), "adapter training recipe"
    return recommended_weight_bits(isa), f"CPU ({isa})"


def export_bundle(
    base: str | Path,
    adapters: Mapping[str, str | Path],
    *,
    mode: str,
    precision: str,
    out: str | Path,
    weight_bits: int | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export `base` with `adapters` (name -> adapter directory) to a bundle; returns its manifest."""
    if mode not in EXPORT_MODES:
        raise EdgeloraError(f"--mode {mode!r} is not supported; choose from {', '.join(EXPORT_MODES)}")
    if precision not in PRECISIONS:
        raise EdgeloraError(f"--precision {precision!r} is not supported; choose from {', '.join(PRECISIONS)}")
    if not adapters:
        raise EdgeloraError("give at least one --adapter [NAME=]DIR to export")
    if mode == "merged" and len(adapters) != 1:
        raise EdgeloraError(f"merged mode bakes one adapter into the graph, got {len(adapters)}; use --mode switchable for several")
    check_out(Path(out))  # before minutes of export work, not only when writing
    say = progress or (lambda _msg: None)
    say("loading base")
    hf_model, base_path = load_base(base)
    model = AdapterModel(hf_model)
    for name, path in adapters.items():
        load_adapter(model, path, name)
    names = list(adapters)
    cpu = detect_isa()
    bits, bits_source = _weight_bits(model, weight_bits if precision == "int8" else None, cpu.isa)
    trained_modes = sorted({layer.quant.mode for _, layer in model.adapted_layers() if layer.quant is not None})

    say("exporting graph")
    if mode == "merged":
        graph = export_graph(model, mode="merged", adapter=names[0])
        slot_names: list[str] = []
    else:
        graph = export_graph(model, mode="switchable", adapter=None, slots=slot_plan(model, names))
        slot_names = make_slots_inputs(graph)
    quantized: dict = {}
    if precision == "int8":
        say("quantizing")
        quantized = quantize_graph(graph.model, graph.weights, bits)
    model_bytes = graph.model.SerializeToString()
    adapter_values = {n: adapter_tensors(model, n, slot_names) for n in names} if mode == "switchable" else {}

    say("validating against torch")
    report = _validate(model, graph.model, graph.feeds, names, mode, precision, bits, adapter_values, quantized)

    manifest = {
        "edgelora_version": __version__,
        "mode": mode,
        "precision": precision,
        "base": {
            "name": str(base),
            "fingerprint": model.base_fingerprint,
            "architecture": model_type(hf_model) or type(hf_model).__name__,
            "hidden_size": hidden_size(hf_model),
        },
        "inputs": list(graph.feeds),
        "outputs": list(OUTPUTS),
        "tokenizer": {"file": "tokenizer.json", "max_length": max_length} if (base_path / "tokenizer.json").is_file() else None,
        "adapters": [
            {
                "name": n,
                "kind": model.configs[n].kind,
                "labels": model.labels[n],
                "file": f"adapters/{n}.onnx_adapter" if mode == "switchable" else None,
                "sha256": None,
                "trained_with": None if not trained_modes else {"weight_bits": bits, "modes": trained_modes},
            }
            for n in names
        ],
        "quantization": None
        if precision == "fp32"
        else {
            "scheme": "weights int8 symmetric per output channel (shared quantizer), activations dynamic uint8 per tensor",
            "weight_bits": bits,
            "weight_bits_from": bits_source,
            "isa": cpu.isa,
            "quantized_matmuls": len(quantized),
            "excluded": "embeddings, attention score products, adapter branches, heads",
        },
        "validation": report,
    }
    if trained_modes and mode not in trained_modes:
        manifest["warnings"] = [f"adapters were fake-quantized for {trained_modes} deployment, exported as {mode}"]
    writers: dict[str, Callable[[Path], None]] = {"model.onnx": lambda p: p.write_bytes(model_bytes)}
    for n, values in adapter_values.items():
        writers[f"adapters/{n}.onnx_adapter"] = lambda p, values=values: write_adapter_file(p, values)
    say("writing bundle")
    write_bundle(Path(out), manifest, writers, base_path)
    return manifest


def _validate(model, proto, feeds_names, names, mode, precision, bits, adapter_values, quantized) -> dict[str, Any]:
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
        fq_model.set_quant(QuantConfig(weight_bits=bits, activations="dynamic", mode=mode))
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
            logits, pooled = sess.run(["logits", "embeddings"], feeds, run_options)
            label = f"adapter {name!r}" if name else "the plain base (no adapter)"
            entry: dict[str, Any] = {}
            for ref_name, ref_model in (("vs_fp32_torch", fp32_model), ("vs_fake_quant_torch", fq_model)):
                if ref_model is None:
                    continue
                ref_model.set_adapter(name)
                ref_logits, ref_pooled = validate.torch_outputs(ref_model, feeds)
                lc, pc = validate.compare("logits", logits, ref_logits), validate.compare("embeddings", pooled, ref_pooled)
                entry[ref_name] = {"logits": lc.as_dict(), "embeddings": pc.as_dict()}
                if (ref_name == "vs_fp32_torch") == (precision == "fp32"):
                    validate.check_tolerance(precision, label, lc, pc, float(np.abs(ref_pooled).max()))
            if quantized:
                err, layer = validate.layerwise_error(proto, feeds, quantized, bits, run_options)
                entry["int8_layers_vs_fake_quant"] = {"max_rel_error": err, "worst_layer": layer}
                if err > validate.INT8_LAYER_REL_TOL:
                    raise EdgeloraError(
                        f"export check failed for {label}: int8 layer {layer} differs from the fake-quant product "
                        f"by {err:.2g} relative (> {validate.INT8_LAYER_REL_TOL}); with 8-bit weights on a CPU "
                        "without VNNI, export with --weight-bits 7"
                    )
            report[name or "(no adapter)"] = entry
    return report
