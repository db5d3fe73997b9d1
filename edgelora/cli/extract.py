"""`edgelora extract` and `edgelora reduce`: a LoRA adapter from the SVD of a full fine-tune's weight deltas, and
a LoRA adapter's rank lowered. The work is edgelora.extract's; torch loads inside the commands.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from edgelora.cli.common import Progress, as_flags, flag_words, write_json

# Phrases of edgelora.extract's errors and warnings that name its parameters, in the flags that set them.
PHRASES = {"tuned must be a full fine-tune of base": "--tuned must be a full fine-tune of --base",
           "; choose one with name=NAME": "; give --name",
           "is base really the model tuned was fine-tuned from?":
               "is --base really the model --tuned was fine-tuned from?",
           "choose an empty or new directory for out": "choose an empty or new --out directory"}


def _add_target(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="keep K components in every layer")
    group.add_argument("--energy", type=float, help="keep per layer the fewest components holding fraction F of "
                                                    "the delta's sum of sigma^2, e.g. 0.9")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def add_extract_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora extract`."""
    p.description = ("A LoRA adapter from a full fine-tune: for each linear layer whose weight changed, the best "
                     "rank-K fit of the change (truncated SVD), saved as an adapter directory `edgelora export` takes.")
    p.add_argument("--base", required=True, help="the model that was fine-tuned: Hugging Face directory or 'minilm'")
    p.add_argument("--tuned", required=True, help="the fully fine-tuned model (Hugging Face directory)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder name)")
    _add_target(p)


def add_reduce_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora reduce`."""
    p.description = "Lower a LoRA adapter's rank: the best rank-K (or energy) approximation of each layer's B A."
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="LoRA adapter directory (ours or PEFT's)")
    p.add_argument("--out", required=True, help="adapter directory to write")
    _add_target(p)


def _table(rows: list[dict[str, Any]], before: bool = False) -> str:
    width = max(len("layer"), *(len(r["layer"]) for r in rows))
    head = f"{'layer':<{width}}  {'shape':>11}  " + ("from  " if before else "") + "rank  energy kept  rel. error"
    lines = [head]
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        lines.append(f"{r['layer']:<{width}}  {shape:>11}  " + (f"{r['rank_before']:>4}  " if before else "")
                     + f"{r['rank']:>4}  {r['energy_kept']:>11.4f}  {r['relative_error']:>10.4f}")
    return "\n".join(lines)


def extract_command(args: argparse.Namespace) -> int:
    """`edgelora extract`: the per-layer table and totals on stdout, the library's warnings as warning lines."""
    from edgelora.extract import extract_adapter

    bar = Progress(None, "extract")
    try:
        with as_flags({}, PHRASES):
            report = extract_adapter(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                                     name=args.name, progress=bar.describe)
    finally:
        bar.close()
    for message in report["warnings"]:
        warnings.warn(flag_words(message, {}, PHRASES))
    t = report["total"]
    print(_table(report["layers"]))
    print(f"{t['layers']} layers, ranks {t['ranks']}: {t['lora_params']:,} LoRA parameters for {t['dense_params']:,} "
          f"dense (compression {t['compression_ratio']:.1f}x); relative error {t['relative_error']:.4f}, "
          f"energy kept {t['energy_kept']:.4f}")
    head = report["head"]
    what = (f"{len(head['labels'])} labels, {head['kind']} head from {head['source']}" if head["kind"]
            else "no head: an embeddings adapter")
    print(f"adapter {report['name']!r} ({what}) written to {report['out']}")
    if args.json:
        write_json(report, args.json)
    return 0


def reduce_command(args: argparse.Namespace) -> int:
    """`edgelora reduce`: the per-layer table (rank before and after) and totals on stdout."""
    from edgelora.extract import reduce_adapter

    with as_flags({}, PHRASES):
        report = reduce_adapter(args.adapter, args.out, rank=args.rank, energy=args.energy)
    t = report["total"]
    print(_table(report["layers"], before=True))
    print(f"{t['layers']} layers, ranks {t['ranks']}: {t['lora_params']:,} LoRA parameters (was "
          f"{t['lora_params_before']:,}); relative error {t['relative_error']:.4f}; written to {report['out']}")
    if args.json:
        write_json(report, args.json)
    return 0
