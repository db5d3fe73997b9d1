"""A/B timing of the serving engine (runtime/engine.py) on one decoder bundle: its cache handling, interleaved.

Variants, each in a process of its own, alternating A B C ... for --rounds rounds:
  shared      the engine as shipped: prefill asks for the last position's logits only (`logits_to_keep`), and a
              gqa bundle decodes on shared cache buffers while the batch keeps its rows;
  copy        the same with every decode step copying the cache (past in, present out), as before shared buffers;
  copy-all    copy, and prefill computing every position's logits, as the engine ran before either change.
A child loads the bundle, warms it up, then times, with end-of-sequence ignored so every request runs its full
max_tokens: the first token of a --prompt-token request alone (submit to first token), and --rows requests of
--prompt tokens submitted together, decoding --steps tokens each (aggregate tokens/s after the last first
token). Prints each variant's medians, the ratio to the first variant and the load average.

    python benchmarks/engine_ab.py BUNDLE --variants shared,copy,copy-all --prompt 256 --rows 4 --steps 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("shared", "copy", "copy-all")


def child(bundle: Path, variant: str, prompt: int, rows: int, steps: int, threads: int) -> dict:
    import warnings

    from edgelora.runtime import Runtime
    from edgelora.runtime.decoder_bench import prompt_of
    from edgelora.runtime.engine import Engine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a gqa bundle's batch-invariance notice
        engine = Engine(Runtime(bundle, intra_op_threads=threads), max_rows=max(rows, 1),
                        prefill_tokens=max(512, rows * prompt))
    engine._eos = frozenset()  # every request runs its max_tokens: the same work in every variant
    if variant != "shared":
        engine._shares = False
    if variant == "copy-all":
        engine._keep_last = {}
    ids = prompt_of(bundle / "tokenizer.json", prompt)

    def run(jobs):
        while not all(j.done for j in jobs):
            engine.step()

    run([engine.submit(ids[:16], max_tokens=4)])  # warm-up
    t0 = time.perf_counter()
    job = engine.submit(ids, max_tokens=1)
    run([job])
    first_ms = (time.perf_counter() - t0) * 1e3
    jobs = [engine.submit(ids, max_tokens=steps + 1) for _ in range(rows)]
    while not all(j.token_ids for j in jobs):
        engine.step()
    made0, t1 = sum(len(j.token_ids) for j in jobs), time.perf_counter()
    run(jobs)
    made = sum(len(j.token_ids) for j in jobs) - made0
    return {"first_ms": first_ms, "tok_s": made / (time.perf_counter() - t1), "shared_steps": engine.shared_steps}


def main(argv: list[str] | None = None) -> None:
    from decoder_ab import run_child

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--variants", default="shared,copy,copy-all")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.bundle, args.child, args.prompt, args.rows, args.steps, args.threads)))
        return
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle}: manifest.json not found; pass a decoder bundle directory")
    variants = [v for v in args.variants.split(",") if v]
    wrong = [v for v in variants if v not in VARIANTS]
    if wrong or not variants:
        parser.error(f"--variants {args.variants}: choose from {', '.join(VARIANTS)}")
    loads = [os.getloadavg()[0]]
    got: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, str(args.bundle), "--child", v, "--prompt", str(args.prompt),
                   "--rows", str(args.rows), "--steps", str(args.steps), "--threads", str(args.threads)]
            got[v].append(run_child(parser, v, cmd))
        loads.append(os.getloadavg()[0])
    print(f"{args.bundle}: prompt {args.prompt} tokens, {args.rows} rows x {args.steps} steps, {args.threads} "
          f"threads, {args.rounds} interleaved rounds, load average {min(loads):.2f}-{max(loads):.2f}")
    base = {k: float(np.median([r[k] for r in got[variants[0]]])) for k in ("first_ms", "tok_s")}
    for v in variants:
        first = float(np.median([r["first_ms"] for r in got[v]]))
        rate = float(np.median([r["tok_s"] for r in got[v]]))
        print(f"  {v:9s} first token {first:8.1f} ms ({first / base['first_ms']:.3f}x)   {args.rows} rows "
              f"{rate:6.1f} tok/s ({rate / base['tok_s']:.3f}x)   shared steps {got[v][-1]['shared_steps']}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
