"""A causal LM -> a checked decoder bundle: merged (at most one LoRA folded into the weights) or switchable
(LoRA adapters as files beside one base graph, chosen per call or per row: exporters/decoder_switchable.py).

The bundle holds model.onnx (see `decoder_graph`: new tokens + KV cache in, logits + longer cache out),
the base's tokenizer files with its chat template, and a manifest (format version 2, task "causal-lm")
whose "generation" record is what a generation loop needs: cache shape, vocabulary, context length and
the special token ids. Every export is checked against torch first (`decoder_validate`).

Example:
    >>> export_decoder("smollm2", "bundles/smol8", adapter="runs/home", precision="int8")
    >>> export_decoder("smollm2", "bundles/sw8", adapters={"home": "runs/home", "meet": "runs/meet"},
    ...                mode="switchable", precision="int8")
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from edgelora import __version__
from edgelora.config import LoraConfig, config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.layers import LORA_A_KEY, LORA_B_KEY
from edgelora.model import fingerprint, load_causal_lm
from edgelora.peft_format import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, adapter_config, read_adapter
from edgelora.runtime.cpu import detect_isa
from edgelora.runtime.bundle import (
    ADAPTER_NAME,
    ADAPTER_NAME_RULE,
    BANK_FILE,
    CAUSAL_LM,
    DECODER_TOKENIZER_FILES,
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    check_out,
    format_version_for,
    sha256_file,
    write_bundle,
)
from .decoder_switchable import SWITCHABLE_RECIPE, bank_record, check_switchable, fill_values, plan_switchable, slots_record
from .switchable import write_adapter_file
from .decoder_graph import ATTENTION_CORES, OPSET, DecoderSpec, build_decoder_graph, decoder_spec
from .decoder_int8 import choose_int8, quantization_record, rowwise_plan
from .decoder_validate import PERPLEXITY_TEXTS, perplexity, validate_decoder

MODES = ("merged", "switchable")

PRECISIONS = ("fp32", "int8")
TASK = CAUSAL_LM
PROTOBUF_LIMIT = 2**31 - 2**26  # protobuf refuses messages of 2 GiB; keep a margin for the graph itself
REQUIRES_ORT = "1.23"  # opset 23 (Attention, RMSNormalization) on CPU; the checks ran on the version in "validation"
# uint8 rowwise grids: before 1.25 ONNX Runtime ran u8 x u8 matmuls through its u8 x s8 code on VNNI and AMX CPUs,
# which is wrong for weights above 127 (microsoft/onnxruntime#27671, fixed in 1.25.0)
REQUIRES_ORT_UNSIGNED = "1.25"


def merge_lora(model: torch.nn.Module, adapter: str | Path, adapter_name: str | None = None) -> dict[str, Any]:
    """Merge a PEFT LoRA adapter (CAUSAL_LM) into `model` in place: W = W0 + scaling * B @ A per target.

    scaling is lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), r read per layer from A's shape
    (PEFT's rank_pattern). Refuses, naming the file and key, an adapter of another task, another base
    (a module this model lacks, a shape it does not have) or a LoRA variant that computes something else.
    GPT-2's Conv1D layers (weight (in, out), PEFT's fan_in_fan_out) take the transposed product.
    """
    path = Path(adapter)
    data, tensors = read_adapter(path)
    source, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    task = data.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise EdgeloraError(f"{source}: task_type {task!r} is not a causal-LM adapter; give a CAUSAL_LM LoRA adapter")
    config = adapter_config(data, str(source))
    if not isinstance(config, LoraConfig):
        raise EdgeloraError(f"{source}: a {config.kind} adapter cannot be merged into a decoder; give a LoRA adapter")
    modules = dict(model.named_modules())
    expected = (data.get("edgelora") or {}).get("base_fingerprint")
    if expected and expected != fingerprint(model):
        raise EdgeloraError(f"{path}: adapter was trained on another base (fingerprint {expected[:12]}…); "
                            "export it with the base it was trained on")
    a_keys = sorted(k for k in tensors if k.endswith(f"{LORA_A_KEY}weight"))
    stray = sorted(set(tensors) - set(a_keys) - {k.replace(LORA_A_KEY, LORA_B_KEY) for k in a_keys})
    for key in stray:  # PEFT saves a tied LM head's base weight beside its LoRA: harmless if it is this base's
        own = modules.get(key[len(PEFT_PREFIX):].removesuffix(".weight").removesuffix(".base_layer"))
        if not (key.endswith(".weight") and own is not None and isinstance(getattr(own, "weight", None), torch.Tensor)
                and torch.equal(own.weight.detach(), tensors[key].to(own.weight.dtype))):
            raise EdgeloraError(f"{weights}: key {key} is neither a LoRA A/B weight of a linear nor a weight of this "
                                "base; only plain LoRA on linear layers merges into a decoder")
    if not a_keys:
        raise EdgeloraError(f"{weights}: holds no LoRA weights")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    planned = []
    for a_key in a_keys:
        b_key = a_key.replace(LORA_A_KEY, LORA_B_KEY)
        name = a_key[len(PEFT_PREFIX):-len(f"{LORA_A_KEY}weight")] if a_key.startswith(PEFT_PREFIX) else a_key
        module = modules.get(name)
        conv = type(module).__name__ == "Conv1D"  # GPT-2's linear, weight (in, out): PEFT's fan_in_fan_out
        if not (isinstance(module, torch.nn.Linear) or conv):
            raise EdgeloraError(f"{weights}: {a_key} targets {name!r}, which is not a linear layer of this base; "
                                "the adapter is for another base")
        if b_key not in tensors:
            raise EdgeloraError(f"{weights}: {a_key} has no {b_key}; re-save the adapter")
        a, b = tensors[a_key].to(torch.float32), tensors[b_key].to(torch.float32)  # (r, in), (out, r)
        n_out, n_in = module.weight.shape[::-1] if conv else module.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise EdgeloraError(f"{weights}: {a_key} {tuple(a.shape)} / {b_key} {tuple(b.shape)} do not fit "
                                f"{name} ({n_out}x{n_in}); the adapter is for another base")
        planned.append((name, module, a, b, conv))
    for name, module, a, b, conv in planned:
        rank = a.shape[0]
        scaling = config.alpha / (math.sqrt(rank) if config.use_rslora else rank)
        if tied and module is model.get_output_embeddings():  # merging must not change the input embeddings
            module.weight = torch.nn.Parameter(module.weight.detach().clone(), requires_grad=False)
        delta = scaling * (b @ a)  # (out, in)
        with torch.no_grad():
            module.weight += delta.T if conv else delta
    ranks = sorted({a.shape[0] for _, _, a, _, _ in planned})
    return {"name": adapter_name or path.name, "kind": "lora", "file": None, "sha256": None, "layers": len(planned),
            "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": config.alpha, "use_rslora": config.use_rslora,
            "source_sha256": sha256_file(weights)}


def write_model(proto: onnx.ModelProto, path: Path) -> None:
    """model.onnx, its weights beside it in model.onnx.data when the graph passes protobuf's 2 GB limit
    (fp32 models above ~500M parameters); the bundle's manifest lists and hashes both files."""
    if proto.ByteSize() < PROTOBUF_LIMIT:
        path.write_bytes(proto.SerializeToString())
        return
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def generation_record(model: torch.nn.Module, spec: DecoderSpec, tokenizer_dir: Path | None) -> dict[str, Any]:
    """The manifest's "generation" entry: eos ids from generation_config (else config), the chat template."""
    config, gen = model.config, getattr(model, "generation_config", None)

    def first(attr: str) -> Any:
        for source in (gen, config):
            value = getattr(source, attr, None) if source is not None else None
            if value is not None:
                return value
        return None

    eos = list(dict.fromkeys(_token_ids(first("eos_token_id"))))
    template = None
    if tokenizer_dir is not None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").is_file():
        template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    bos, pad = first("bos_token_id"), first("pad_token_id")
    return {"num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "vocab_size": spec.vocab_size, "context_length": spec.context_length, "eos_token_ids": eos,
            "bos_token_id": None if bos is None else _token_ids(bos)[0],
            "pad_token_id": None if pad is None else _token_ids(pad)[0],
            "chat_template": template if isinstance(template, str) else None}


def export_decoder(
    base: str | Path | torch.nn.Module,
    out: str | Path,
    *,
    adapter: str | Path | None = None,
    adapter_name: str | None = None,
    adapters: Mapping[str, str | Path] | None = None,
    mode: str = "merged",
    precision: str = "fp32",
    attention: str = "invariant",
    lora_slots: str = "attention",
    tokenizer_dir: str | Path | None = None,
    int8_scheme: str | None = None,
    weight_bits: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export a causal LM to a checked decoder bundle at `out`, with `adapter` merged or `adapters` switchable;
    returns its manifest.

    Args:
        base: "smollm2", a Hugging Face causal-LM directory, or a loaded model (left unchanged: a merged
            adapter goes into a copy).
        adapter: a PEFT LoRA directory (CAUSAL_LM), merged as W0 + scaling * B @ A before quantization.
        adapters: name -> PEFT LoRA directory (CAUSAL_LM); in merged mode at most one (as `adapter`), in
            switchable mode any number, none giving the plain base with empty slots.
        mode: "merged", or "switchable": the base (fp32, or int8 with the LoRA branches float) with an adapter
            bank on each slotted projection; `adapters/<name>.onnx_adapter` per adapter and `bank.onnx_adapter`
            for batches that mix them row by row (`Runtime.row_options`).
        lora_slots: switchable mode: which projections get a slot beyond those the adapters adapt, so that
            adapters trained later fit `edgelora add-adapter`: "attention" (q/k/v/o, the default),
            "attention+mlp", or "adapters" (none more).
        precision: "fp32", or "int8" (blockwise MatMulNBits; the graph is checked layer by layer against
            the fake-quant model, `edgelora.fake_quant.fake_quantize_*_blockwise`).
        attention: the attention core (`decoder_graph.ATTENTION_CORES`): "invariant" (the default: float64
            softmax, batch-invariant), "ops", "onnx" or "gqa" (float32, faster, rows may change with left
            padding; "gqa", ONNX Runtime's GroupQueryAttention, is one node a layer and the fastest).
        tokenizer_dir: where the tokenizer files are (default: the base directory).
        int8_scheme: int8 only: "block" (MatMulNBits everywhere) or "rowwise" (per-row activations and
            per-channel weights through MatMulIntegerToFloat, down_proj and the LM head blockwise, SmoothQuant);
            None: the scheme the adapters were trained with, else "block" (`decoder_int8.choose_int8`).
        weight_bits: rowwise only: 8 (written uint8 at zero point 128, MLAS's u8 x u8 kernel: exact on every
            CPU) or 7 (int8, the u8 x s8 kernel: faster on one row where it saturates at 8 bits, AVX2 without
            VNNI); None: what the adapters were trained with, else the recommendation for this CPU.
    """
    if precision not in PRECISIONS:
        raise EdgeloraError(f"precision={precision!r} is not supported; choose from {', '.join(PRECISIONS)}")
    if mode not in MODES:
        raise EdgeloraError(f"mode={mode!r} is not supported; choose from {', '.join(MODES)}")
    named = dict(adapters or {})
    if adapter is not None:
        if named:
            raise EdgeloraError("pass adapter= (one, merged) or adapters= (name -> directory), not both")
        named = {adapter_name or Path(adapter).name: adapter}
    if mode == "merged" and len(named) > 1:
        raise EdgeloraError(f"a merged decoder bundle holds one adapter, got {len(named)} ({', '.join(named)}); "
                            "use mode='switchable' for several")
    for name in named if mode == "switchable" else ():  # switchable: names are file names in the bundle
        if not ADAPTER_NAME.fullmatch(name):
            raise EdgeloraError(f"adapter name {name!r} must be {ADAPTER_NAME_RULE}")
    if attention not in ATTENTION_CORES:
        raise EdgeloraError(f"attention={attention!r} is not supported; choose from {', '.join(ATTENTION_CORES)}")
    int8 = choose_int8(named, int8_scheme, precision, mode, weight_bits)
    check_out(Path(out))  # before minutes of work, not only when writing
    say = progress or (lambda _msg: None)
    say("loading base")
    if isinstance(base, torch.nn.Module):
        model, base_dir, base_name = base, None, getattr(base.config, "_name_or_path", "") or type(base).__name__
        if named and mode == "merged":
            model = copy.deepcopy(base)
    else:
        model, base_dir = load_causal_lm(base)
        base_name = str(base)
    model.eval()
    spec = decoder_spec(model)  # refuses an unsupported model type before any other work
    base_fingerprint = fingerprint(model)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else base_dir
    if int8.recipe is not None:
        say("smoothing (rowwise int8)")
    rowwise = rowwise_plan(int8, model, tok_dir)  # from the base, before an adapter merges into it
    unsigned = rowwise is not None and rowwise.unsigned_weights  # uint8 grids: u8 x u8, ONNX Runtime >= 1.25
    entries: list[dict[str, Any]] = []
    switchable: dict[str, Any] = {}
    writers: dict[str, Callable[[Path], None]] = {}
    if mode == "merged":
        for name, path in named.items():
            say("merging adapter")
            entries.append(merge_lora(model, path, name))
        say("building graph")
        graph = build_decoder_graph(model, precision, attention, rowwise=rowwise)
        say("validating against torch")
        label = f"adapter {entries[0]['name']!r}" if entries else "the base"
        report = validate_decoder(graph, model, precision, label, rowwise)
    else:
        say("loading adapters")
        plan = plan_switchable(model, spec, named, lora_slots)
        say("building graph")
        graph = build_decoder_graph(model, precision, attention, lora_modules=plan.modules, rowwise=rowwise)
        bank = fill_values(plan, graph)
        say("validating against torch")
        report = check_switchable(graph, plan, bank, precision, rowwise)
        entries = plan.entries
        switchable = {"slots": slots_record(plan, graph), "bank": bank_record(plan),
                      **({"warnings": plan.warnings} if plan.warnings else {})}
        writers[BANK_FILE] = lambda p: write_adapter_file(p, bank)
        for entry in entries:
            writers[entry["file"]] = lambda p, values=plan.values[entry["name"]]: write_adapter_file(p, values)
        del plan  # the torch copies with the adapters: not needed for what follows
    if precision == "int8" and tok_dir is not None and (tok_dir / "tokenizer.json").is_file():
        say("measuring perplexity")
        try:
            tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the Rust side raises a bare Exception; the runtime names the file
            report["perplexity_vs_fp32_torch"] = f"not measured: tokenizer.json unreadable ({str(exc)[:80]})"
        else:
            ids = [tok.encode(text).ids[: spec.context_length] for text in PERPLEXITY_TEXTS]
            report["perplexity_vs_fp32_torch"] = perplexity(graph, model, [i for i in ids if len(i) > 1])
    report["onnxruntime"] = ort.__version__
    cpu = detect_isa()
    manifest: dict[str, Any] = {
        "edgelora_version": __version__,
        "task": TASK,
        "mode": mode,
        "precision": precision,
        "base": {"name": base_name, "fingerprint": base_fingerprint, "architecture": spec.model_type,
                 "hidden_size": spec.hidden_size},
        "inputs": graph.input_names,  # what a caller feeds; adapter banks and adapter_ids have defaults
        "outputs": graph.output_names,
        "tokenizer": {"file": "tokenizer.json", "max_length": spec.context_length}
        if tok_dir is not None and (tok_dir / "tokenizer.json").is_file() else None,
        "generation": generation_record(model, spec, tok_dir),
        "adapters": entries,
        "quantization": None if precision == "fp32" else quantization_record(
            int8, rowwise.quant, len(graph.quantized), sum(q.kind == "rowwise" for q in graph.quantized.values()), mode,
            unsigned)
        if rowwise is not None else {
            "scheme": "weights int8 symmetric per block of 32 inputs; activations int8 per row and block of 32 "
                      "at run time (MatMulNBits bits 8, accuracy_level 4): a row's result does not depend on its batch",
            "kernel": "com.microsoft.MatMulNBits", "weight_bits": 8, "block_size": 32, "accuracy_level": 4,
            "quantized_matmuls": len(graph.quantized),
            "excluded": "embeddings, norms, rotary, attention scores"
                        + (", adapter (LoRA) branches" if mode == "switchable" else ""),
            **({"recipe": config_to_dict(SWITCHABLE_RECIPE)} if mode == "switchable" else {}),
        },
        "graph": {"opset": OPSET, "attention": attention, "optional_inputs": graph.optional_inputs,
                  "packed": ["q|k|v"] + (["gate|up"] if spec.model_type != "gpt2" else []),
                  # where rotary positions come from: position_ids, or each token's cache index (a gqa core with
                  # rotary inside; runtime/engine.py feeds a moved row's position_ids less the columns it moved)
                  "positions": graph.positions,
                  **({"adapter_inputs": len(graph.slots)} if mode == "switchable" else {})},
        "requires": {"onnxruntime": REQUIRES_ORT_UNSIGNED if unsigned else REQUIRES_ORT},
        "isa": cpu.isa,
        "validation": report,
        **switchable,
    }
    typed = Manifest.from_dict({**manifest, "format": FORMAT, "format_version": format_version_for(TASK), "files": {}},
                               Path(out) / MANIFEST_FILE)
    writers[MODEL_FILE] = lambda p: write_model(graph.model, p)
    for name in DECODER_TOKENIZER_FILES:
        if tok_dir is not None and (tok_dir / name).is_file():
            writers[name] = lambda p, src=tok_dir / name: shutil.copyfile(src, p)
    say("writing bundle")
    return write_bundle(Path(out), typed, writers, None)
