"""The `edgelora` command: train, export, run, bench, extract.

Every verb prints a user's mistake as one line (`edgelora: error: ...`) and exits 2; `--debug` shows
the traceback. Training and export import torch lazily, so `run` and `bench` work on a runtime-only install.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from edgelora import __version__
from edgelora.errors import EdgeloraError


def _progress_bar(total: int | None, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # runtime-only installs have no tqdm: report to stderr line by line
        return None
    # disable=None: draw only on a terminal, so a log or a pipe gets the one-line error and no bar debris
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)


# --- train ---------------------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA or bottleneck adapter (and its head) on a frozen base",
                       description="Train one adapter and save it as a PEFT-layout directory.")
    p.add_argument("--base", default="minilm", help="Hugging Face model directory, or 'minilm' (embedded all-MiniLM-L6-v2)")
    p.add_argument("--data", required=True, help="train data: .jsonl/.csv with text and label, or builtin:intent|sentiment[:N]")
    p.add_argument("--eval", default=None, help="held-out data (default: a seeded split of --data)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder name)")
    p.add_argument("--kind", choices=("lora", "bottleneck"), default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (update scaled by alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--targets", default=None, help="comma-separated module names to adapt (default: attention Wq,Wk,Wv,Wo)")
    p.add_argument("--include-mlp", action="store_true", help="also adapt the feed-forward projections")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck width = hidden / factor")
    p.add_argument("--placement", choices=("houlsby", "pfeiffer"), default="pfeiffer")
    p.add_argument("--qat", choices=("int8", "none"), default="none", help="int8-aware fake quantization while training")
    p.add_argument("--weight-bits", default="auto", help="7, 8 or auto (7 where this CPU's int8 kernel saturates)")
    p.add_argument("--deploy-mode", choices=("merged", "switchable"), default="merged",
                   help="the export mode the fake quantizer prepares for")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
    from edgelora.data import load_splits
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter
    from edgelora.tokenize import load_tokenizer
    from edgelora.train import TrainConfig, train_adapter

    name = args.name or Path(args.out).name
    train_ds, eval_ds = load_splits(args.data, args.eval, seed=args.seed, text_field=args.text_field, label_field=args.label_field)
    if args.kind == "lora":
        targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else None
        config = LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, use_rslora=args.rslora,
                            target_modules=targets, include_mlp=args.include_mlp)
    else:
        config = BottleneckConfig(reduction_factor=args.reduction_factor, placement=args.placement)
    quant = None
    if args.qat == "int8":
        quant = QuantConfig(weight_bits=_resolve_bits(args.weight_bits), mode=args.deploy_mode)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    base, base_path = load_base(args.base)
    tokenizer = load_tokenizer(base_path, args.max_length)
    model = AdapterModel(base)
    model.add_adapter(name, config, list(train_ds.label_names), quant=quant)
    bar = _progress_bar(train_config.epochs * -(-len(train_ds) // train_config.batch_size), f"train {name}")
    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg.rsplit("loss", 1)[-1].strip() and "loss " + msg.rsplit("loss", 1)[-1].strip())
            bar.update(1)
    try:
        result = train_adapter(model, name, tokenizer, train_ds.texts, train_ds.labels, eval_ds.texts, eval_ds.labels,
                               train_config, progress)
    finally:
        if bar is not None:
            bar.close()
    training = {"data": str(args.data), "train_size": len(train_ds), "eval_size": len(eval_ds),
                "best_eval_accuracy": result.best_accuracy, "best_epoch": result.best_epoch,
                "history": result.history, "device": result.device, "max_length": args.max_length}
    save_adapter(model, name, args.out, base_name=str(args.base), extra={"training": training})
    print(json.dumps({"adapter": name, "out": str(args.out), "eval_accuracy": result.best_accuracy,
                      "best_epoch": result.best_epoch, "device": result.device}))
    return 0


def _resolve_bits(value: str) -> int:
    if value == "auto":
        from edgelora.runtime.cpu import detect_isa, recommended_weight_bits

        return recommended_weight_bits(detect_isa().isa)
    if value not in ("7", "8"):
        raise EdgeloraError(f"--weight-bits {value!r} is not supported; choose 7, 8 or auto")
    return int(value)


# --- export --------------------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="base + adapters -> a checked ONNX bundle (merged or switchable, fp32 or int8)")
    p.add_argument("base", help="Hugging Face model directory, or 'minilm'")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR", help="adapter directory (repeatable)")
    p.add_argument("--mode", choices=("merged", "switchable"), default="merged")
    p.add_argument("--precision", choices=("fp32", "int8"), default="int8")
    p.add_argument("--weight-bits", type=int, choices=(7, 8), default=None,
                   help="default: the adapters' training recipe, else what this CPU needs")
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation length recorded in the bundle")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced atomically)")
    p.set_defaults(func=_cmd_export)


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name, spec
        if name in adapters:
            raise EdgeloraError(f"--adapter {spec}: the name {name!r} is given twice; write NAME=DIR to rename one")
        adapters[name] = path
    return adapters


def _cmd_export(args: argparse.Namespace) -> int:
    from edgelora.exporters.export import export_bundle

    bar = _progress_bar(None, "export")
    try:
        manifest = export_bundle(args.base, parse_adapter_specs(args.adapter), mode=args.mode, precision=args.precision,
                                 out=args.out, weight_bits=args.weight_bits, max_length=args.max_length,
                                 progress=(lambda m: bar.set_description_str(f"export: {m}")) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({"bundle": str(args.out), "mode": manifest["mode"], "precision": manifest["precision"],
                      "adapters": [a["name"] for a in manifest["adapters"]], "validation": manifest["validation"]}))
    return 0


# --- run / bench (no torch) -------------------------------------------------------------------------
def _add_runtime_verbs(sub) -> None:
    from edgelora.runtime import bench

    p = sub.add_parser("run", help="run a bundle on text and print JSON predictions")
    bench.add_run_arguments(p)
    p.set_defaults(func=bench.run_command)
    p = sub.add_parser("bench", help="int8 vs fp32 latency, throughput, size and memory, interleaved in one run")
    bench.add_bench_arguments(p)
    p.set_defaults(func=bench.bench_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgelora", description="Train adapters, export int8 ONNX, run on CPUs.")
    parser.add_argument("--version", action="version", version=f"edgelora {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_export(sub)
    _add_runtime_verbs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeloraError as exc:
        if args.debug:
            raise
        print(f"edgelora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgelora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
