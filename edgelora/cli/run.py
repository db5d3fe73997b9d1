"""`edgelora run` and `edgelora bench`: a bundle on text, and bundles timed side by side. No torch: both work on a
runtime-only install (onnxruntime, numpy, tokenizers), so the runtime loads inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgelora.cli.common import Progress, as_flags, write_json
from edgelora.errors import EdgeloraError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora bench`."""
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directory; DIR@ADAPTER picks an adapter")
    parser.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, e.g. 1,8 (default 1,8)")
    parser.add_argument("--seq", type=_int_list, default=(16, 128), help="sequence lengths (default 16,128)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed runs per bundle and shape (default 30; decoder bundles: 5 rounds of every measurement)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs per bundle and shape first (default 5; decoder bundles: 1)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--adapter", default=None, help="adapter for bundles that name none with @")
    parser.add_argument("--spin", action="store_true",
                        help="let ORT threads spin-wait between runs (adds a 200 ms settle pause before each run)")
    parser.add_argument("--data", metavar="SOURCE", default=None,
                        help="labelled texts for fidelity and accuracy: .jsonl/.csv with text and label, or "
                             "builtin:intent|sentiment[:N] (default: built-in sentences, no accuracy)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the full result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also write a latency chart")
    decoder = parser.add_argument_group("decoder bundles (task causal-lm)")
    decoder.add_argument("--prompt-tokens", type=_int_list, default=(32, 256),
                         help="prompt lengths for time to first token (default 32,256)")
    decoder.add_argument("--new-tokens", type=int, default=64, help="greedy steps per timed decode run (default 64)")
    decoder.add_argument("--concurrent", type=int, default=4,
                         help="rows decoded together, on different adapters where a bundle has them (default 4)")


class BenchProgress:
    """`progress(done, total, message)` for the bench harness: a bar on a terminal, a line every tenth of the runs
    when not; `benchmarks/` scripts that drive the harness use it too."""

    def __init__(self) -> None:
        self._bar: Progress | None = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self._bar is None or self._bar.total != total:
            self._bar = Progress(total, "bench", lines="runs")
        self._bar.update_to(done, message)
        if done == total:
            self._bar.close()
            self._bar = None


def load_labelled(source: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of a .jsonl/.csv file or builtin:TASK[:N], read by edgelora.data.

    The one import from the training side: edgelora.data uses the standard library only (no torch),
    so a runtime-only install still reads the same formats, with the same errors, as training does.
    """
    from edgelora.data import load_dataset

    ds = load_dataset(source)
    return list(ds.texts), [ds.label_names[y] for y in ds.labels]


def bench_command(args: argparse.Namespace) -> int:
    """`edgelora bench`: table on stdout, progress on stderr; EdgeloraError propagates to the CLI."""
    from edgelora.runtime.bench import run_benchmark
    from edgelora.runtime.decoder_bench import is_decoder_bundle
    from edgelora.runtime.report import format_table, plot

    decoders = [is_decoder_bundle(b) for b in args.bundles]
    if any(decoders):
        if not all(decoders):
            raise EdgeloraError("bench: decoder (causal-lm) and encoder bundles given together; bench them in "
                                "separate runs")
        return _bench_decoders(args)
    source = getattr(args, "data", None)
    data = load_labelled(source) if source else None
    result = run_benchmark(args.bundles, batches=args.batch, seqs=args.seq,
                           rounds=30 if args.rounds is None else args.rounds,
                           warmup=5 if args.warmup is None else args.warmup, adapter=args.adapter, threads=args.threads,
                           spinning=args.spin, data=data, data_source=source, progress=BenchProgress())
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        with as_flags({}, {"plotting needs matplotlib": "bench --plot needs matplotlib"}):
            plot(result, args.plot)
    return 0


def _bench_decoders(args: argparse.Namespace) -> int:
    """`edgelora bench` on decoder bundles: first-token latency, decode rate, agreement and perplexity."""
    from edgelora.runtime.decoder_bench import run_decoder_benchmark
    from edgelora.runtime.decoder_report import format_decoder_table, plot_decoder

    if args.data:
        raise EdgeloraError("bench: --data is for encoder bundles; decoder bundles use built-in prompts and "
                            "held-out texts")
    fields = {"new_tokens": "--new-tokens", "concurrent": "--concurrent", "rounds": "--rounds", "warmup": "--warmup"}
    with as_flags(fields, {"prompt_tokens": "--prompt-tokens", "or new_tokens": "or --new-tokens"}):
        result = run_decoder_benchmark(args.bundles, adapter=args.adapter, prompt_tokens=args.prompt_tokens,
                                       new_tokens=args.new_tokens, concurrent=args.concurrent,
                                       rounds=5 if args.rounds is None else args.rounds,
                                       warmup=1 if args.warmup is None else args.warmup, threads=args.threads,
                                       spinning=args.spin, progress=BenchProgress())
    print(format_decoder_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        with as_flags({}, {"plotting needs matplotlib": "bench --plot needs matplotlib"}):
            plot_decoder(result, args.plot)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora run`."""
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--adapter", default=None, help="adapter to apply (switchable bundles)")
    parser.add_argument("--adapters", default=None, metavar="A,B,A",
                        help="one adapter per text, comma-separated, in text order: one run mixes them")
    parser.add_argument("--text", action="append", default=[], help="a text to classify; repeat for more")
    parser.add_argument("--file", default=None, help="file with one text per line ('-' for stdin)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")


def run_command(args: argparse.Namespace) -> int:
    """`edgelora run`: prints a JSON list of {"text", "label", "score", "scores"} (token-classification bundles:
    {"text", "words", "entities"}, each entity with its label, character offsets, text and score; an embeddings
    bundle: {"text", "embedding"})."""
    texts = list(args.text)
    if args.file:
        try:
            f = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
            with f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise EdgeloraError(
                f"{args.file}: cannot read it ({e.strerror}); pass a text file, one text per line"
            ) from None
    if not texts:
        raise EdgeloraError("run: nothing to classify; pass --text TEXT or --file FILE")
    per_row = getattr(args, "adapters", None)
    if per_row is not None:
        if args.adapter is not None:
            raise EdgeloraError("run: pass --adapter (one for all texts) or --adapters (one per text), not both")
        per_row = [a.strip() for a in per_row.split(",")]
        if len(per_row) != len(texts) or not all(per_row):
            raise EdgeloraError(f"run: --adapters names {len(per_row)} adapters for {len(texts)} texts; "
                                "give one name per text, comma-separated")
    from edgelora.runtime.runtime import Runtime

    rt = Runtime(args.bundle, intra_op_threads=args.threads)
    if rt.manifest.task == "embeddings":  # no head (e.g. a PEFT FEATURE_EXTRACTION adapter): the vectors
        vectors = rt.run(texts, adapter=args.adapter, adapters=per_row)["embeddings"]
        rows = [{"text": t, **({"adapter": a} if per_row else {}), "embedding": [float(x) for x in v]}
                for t, a, v in zip(texts, per_row or texts, vectors)]
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    preds = rt.predict(texts, adapter=args.adapter, adapters=per_row)
    rows = [{"text": t, **({"adapter": a} if per_row else {}), **p} for t, a, p in zip(texts, per_row or texts, preds)]
    print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0
