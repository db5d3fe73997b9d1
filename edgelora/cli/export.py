"""`edgelora export` and `edgelora add-adapter`: base + adapters -> a checked ONNX bundle, and more adapters into a
switchable bundle without re-exporting its base. Torch loads inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from edgelora.cli.common import Progress, as_flags
from edgelora.errors import EdgeloraError

# The library's parameters (export_bundle, export_decoder, add_adapters) and the flags that set them: its errors
# name the parameter, `as_flags` turns them into the flag a command-line user typed.
FLAGS = {"weight_bits": "--weight-bits", "smooth_alpha": "--smooth", "keep_fp32": "--keep-fp32", "mode": "--mode",
         "int8_scheme": "--int8-scheme", "precision": "--precision", "max_length": "--max-length", "lora_slots": "--slots",
         "target_cosine": "--target-cosine"}
PHRASES = {
    "drop weight_bits or retrain": "drop the flag or retrain",
    "drop smooth_alpha or retrain": "drop the flag or retrain",
    "drop keep_fp32 or retrain": "drop the flag or retrain",
    "keep_fp32: ": "--keep-fp32: ",
    "drop smooth_alpha, or retrain with QuantConfig(smoothing=ALPHA, activations='static')":
        "drop --smooth, or retrain with --smooth and --activations static",
    "smooth_alpha applies to int8 exports; drop it or pass precision='int8'":
        "--smooth applies to int8 exports; drop it or add --precision int8",
    "adapters is empty; give at least one adapter directory to export":
        "give at least one --adapter [NAME=]DIR to export",
    "choose an empty or new directory for out": "choose an empty or new --out directory",
    "retrain with QuantConfig.smoothing": "retrain with --smooth",
    "train with activations='dynamic'": "train with --activations dynamic",
}
ADD_PHRASES = {
    "adapters is empty; give at least one adapter directory to add": "give at least one --adapter [NAME=]DIR to add",
    "(exported with mode='switchable')": "(edgelora export --mode switchable)",
    "pass replace=True": "pass --replace",
    "SmoothQuant (QuantConfig.smoothing)": "SmoothQuant (--smooth)",
    "pass base, or check=False": "pass --base, or --no-check",
    "; pass the right base": "; pass the right --base",
    "retrain with QuantConfig.smoothing": "retrain with --smooth",
}


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora export`."""
    p.add_argument("base", help="Hugging Face model directory, or 'minilm' or 'smollm2' (the embedded bases)")
    p.add_argument("--task", choices=("auto", "classification", "causal-lm"), default="auto",
                   help="causal-lm writes a decoder bundle (KV cache, generation; `edgelora generate` runs it); auto: "
                        "causal-lm for 'smollm2' or a CAUSAL_LM adapter, else classification")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR", help="adapter directory (repeatable)")
    p.add_argument("--mode", choices=("merged", "switchable"), default="merged")
    p.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    p.add_argument("--weight-bits", type=int, choices=(7, 8), default=None,
                   help="default: the adapters' training recipe, else what this CPU needs")
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length recorded in the bundle")
    p.add_argument("--slots", choices=("adapters", "attention", "attention+mlp"), default=None,
                   help="switchable mode: LoRA slots on the layers these adapters use, or on more layers so that "
                        "adapters added later with `edgelora add-adapter` fit (default: adapters; causal-lm: "
                        "attention, q/k/v/o of every layer, plus what the adapters adapt)")
    p.add_argument("--keep-fp32", default=None, metavar="auto|LAYER,...",
                   help="int8 mixed precision: 'auto' keeps the layers int8 hurts most fp32 until the worst sentence "
                        "cosine to fp32 reaches --target-cosine; or comma-separated layer names")
    p.add_argument("--target-cosine", type=float, default=None, help="--keep-fp32 auto: the worst-sentence goal "
                                                                      "(default 0.995)")
    p.add_argument("--fusions", default=None, metavar="NAME,...|none",
                   help="ONNX Runtime BERT fusions: comma-separated from attention, embed_layer_norm, "
                        "skip_layer_norm, bias_gelu, or 'none' (default: attention, the fastest measured)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="int8: SmoothQuant with migration strength ALPHA for adapters trained without it "
                        "(adapters trained with --smooth always export with their own factors)")
    p.add_argument("--attention", choices=("invariant", "ops", "onnx", "gqa"), default="invariant",
                   help="causal-lm: the attention core; 'invariant' (float64 sums: a row's tokens are the same alone "
                        "and batched) or 'gqa' (ONNX Runtime's GroupQueryAttention, fastest, float32)")
    p.add_argument("--int8-scheme", choices=("block", "rowwise"), default=None,
                   help="causal-lm int8: block (MatMulNBits everywhere) or rowwise (per-row activations and "
                        "per-channel weights through MatMulIntegerToFloat, down_proj and the LM head block, "
                        "SmoothQuant); default: what the adapters were trained with, else block")
    p.add_argument("--hidden-state", action="store_true",
                   help="also output the token-level last_hidden_state (batch x tokens x hidden) beside the pooled "
                        "embeddings, e.g. for a FEATURE_EXTRACTION adapter")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")


def export_command(args: argparse.Namespace) -> int:
    from edgelora.exporters.export import export_bundle

    adapters = parse_adapter_specs(args.adapter)
    if _export_task(args.task, args.base, adapters) == "causal-lm":
        return _export_decoder(args, adapters)

    if args.attention != "invariant":
        raise EdgeloraError("--attention applies to causal-lm bundles; drop it for a classification export")
    if args.int8_scheme is not None:
        raise EdgeloraError("--int8-scheme applies to causal-lm bundles; drop it for a classification export")
    if args.target_cosine is not None and (args.keep_fp32 or "").strip() != "auto":
        raise EdgeloraError("--target-cosine is the goal of --keep-fp32 auto; add --keep-fp32 auto or drop it")
    if args.smooth is not None:
        from edgelora.config import check_smoothing

        with as_flags({"smoothing": "--smooth"}):
            check_smoothing(args.smooth)
    bar = Progress(None, "export")
    try:
        with as_flags(FLAGS, PHRASES):
            manifest = export_bundle(args.base, adapters, mode=args.mode, precision=args.precision,
                                     out=args.out, weight_bits=args.weight_bits, max_length=args.max_length,
                                     lora_slots=args.slots or "adapters", fusions=parse_fusions(args.fusions),
                                     keep_fp32=parse_keep_fp32(args.keep_fp32), smooth_alpha=args.smooth,
                                     hidden_state=args.hidden_state,
                                     **({"target_cosine": args.target_cosine}
                                        if args.target_cosine is not None else {}),
                                     progress=bar.describe)
    finally:
        bar.close()
    tokenizer = manifest.tokenizer
    if tokenizer and tokenizer.max_length < args.max_length:
        warnings.warn(f"--max-length {args.max_length} exceeds the base's positions; the bundle truncates texts to "
                      f"{tokenizer.max_length} tokens")
    print(json.dumps({"bundle": str(args.out), "mode": manifest.mode, "precision": manifest.precision,
                      "adapters": list(manifest.adapter_names), "validation": manifest.validation}))
    return 0


# export flags a decoder bundle does not take, with the value that means "not given"
ENCODER_ONLY = {"max_length": 128, "keep_fp32": None, "target_cosine": None,
                "fusions": None, "smooth": None, "hidden_state": False}


def _export_task(task: str, base: str, adapters: dict[str, str]) -> str:
    """causal-lm or classification: as asked, else from the base's name or the adapters' PEFT task type."""
    if task != "auto":
        return task
    if base == "smollm2":
        return "causal-lm"
    for path in adapters.values():
        try:
            config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # the exporter names the unreadable file
        if isinstance(config, dict) and config.get("task_type") == "CAUSAL_LM":
            return "causal-lm"
    return "classification"


def _export_decoder(args: argparse.Namespace, adapters: dict[str, str]) -> int:
    """A decoder bundle, fp32 or blockwise int8: merged (at most one LoRA folded in) or switchable (any number of
    LoRA adapters beside the base, none giving the plain base)."""
    from edgelora.exporters.decoder_export import export_decoder

    given = [k for k, unset in ENCODER_ONLY.items() if getattr(args, k) != unset]
    if given:
        raise EdgeloraError(f"--{given[0].replace('_', '-')} applies to encoder bundles; drop it for a causal-lm export")
    if args.mode == "merged" and args.slots is not None:
        raise EdgeloraError("--slots applies to switchable bundles; drop it or add --mode switchable")
    if args.mode == "merged" and len(adapters) > 1:
        raise EdgeloraError(f"a merged causal-lm bundle holds one adapter, got {len(adapters)} ({', '.join(adapters)}); "
                            "add --mode switchable, or export one bundle per adapter")
    bar = Progress(None, "export")
    try:
        with as_flags(FLAGS, PHRASES):
            manifest = export_decoder(args.base, args.out, adapters=adapters, mode=args.mode, precision=args.precision,
                                      lora_slots=args.slots or "attention", int8_scheme=args.int8_scheme,
                                      weight_bits=args.weight_bits, attention=args.attention,
                                      progress=bar.describe)
    finally:
        bar.close()
    print(json.dumps({"bundle": str(args.out), "task": manifest.task, "mode": manifest.mode,
                      "precision": manifest.precision, "adapters": list(manifest.adapter_names),
                      "validation": manifest.validation}))
    return 0


def parse_fusions(value: str | None) -> tuple[str, ...] | None:
    from edgelora.exporters.fusion import FUSIONS

    if value is None:
        return None
    if value.strip() == "none":
        return ()
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in FUSIONS]
    if unknown or not names:
        raise EdgeloraError(f"--fusions {value!r}: choose from {', '.join(FUSIONS)}, comma-separated, or 'none'")
    return names


def parse_keep_fp32(value: str | None) -> tuple[str, ...] | str | None:
    if value is None or value.strip() == "auto":
        return None if value is None else "auto"
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise EdgeloraError(f"--keep-fp32 {value!r}: give 'auto' or comma-separated layer names")
    return names


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora add-adapter`."""
    parser.add_argument("bundle", metavar="BUNDLE", help="switchable bundle directory (rewritten atomically)")
    parser.add_argument("--adapter", action="append", default=[], required=True, metavar="[NAME=]DIR",
                        help="adapter directory to add (repeatable); NAME defaults to the adapter's own")
    parser.add_argument("--base", default=None,
                        help="base model to check the adapter against torch (default: the one the manifest names)")
    parser.add_argument("--no-check", action="store_true", help="skip the torch comparison (no base needed)")
    parser.add_argument("--replace", action="store_true", help="replace an adapter of the same name")


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """`[NAME=]DIR` -> {name: dir}; without NAME, the directory's name (as `edgelora export` does)."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if name in adapters:
            raise EdgeloraError(f"--adapter {spec}: the name {name!r} is given twice; write NAME=DIR to rename one")
        adapters[name] = path
    return adapters


def add_adapter_command(args: argparse.Namespace) -> int:
    """`edgelora add-adapter`: prints a JSON summary of the bundle's adapters and the new ones' checks."""
    from edgelora.exporters.add import add_adapters

    def say(message: str) -> None:
        if sys.stderr.isatty():
            print(f"add-adapter: {message}", file=sys.stderr)

    adapters = parse_adapter_specs(args.adapter)
    with as_flags({"weight_bits": "--weight-bits", "lora_slots": "--slots"}, ADD_PHRASES):
        manifest = add_adapters(args.bundle, adapters, base=args.base, check=not args.no_check, replace=args.replace,
                                progress=say)
    print(json.dumps({"bundle": str(args.bundle), "added": list(adapters),
                      "adapters": list(manifest.adapter_names),
                      "bank": manifest.bank.file if manifest.bank else None,
                      "validation": {n: manifest.validation.get(n) for n in adapters}}))
    return 0
