"""Time ONNX models (bundles or bare .onnx files) on this CPU, each in a worker process of its own, interleaved.

Two ORT sessions in one process distort each other (idle pool threads spin and steal the cores the next
run needs), so every model runs in its own worker process, spinning off, and the parent asks one worker
at a time for one run, alternating A B C A B C ..., so slow drift and noisy neighbours fall on all alike.
Bare .onnx files let this compare graphs that are not edgelora bundles (Optimum's, fusion variants).
Besides wall time each run records the worker's CPU time: on a machine shared with other jobs, wall time
swings with how often the scheduler takes the core away, while CPU time at one thread (`--threads 1`)
counts only the work done, so it ranks graph variants far more steadily (it still feels cache contention).
The worker processes are the bench harness's (`edgelora.runtime.worker`), serving an `OnnxFileEngine`.

    python benchmarks/int8_speed.py A.onnx B/ --batch 1,8 --seq 32,128 --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgelora.cli.common import write_json
from edgelora.runtime.worker import Candidate, Worker, serve_worker


def _model_path(spec: str) -> Path:
    path = Path(spec)
    return path / "model.onnx" if path.is_dir() else path


OPT_LEVELS = ("disable", "basic", "extended", "all")


class OnnxFileEngine:
    """A bare ONNX file (or a bundle's model.onnx) in one ORT session, for the bench worker (`serve_worker`)."""

    labels: Sequence[str] = ()
    size_bytes = None

    def __init__(self, spec: str, threads: int, vocab: int, config: Sequence[str], opt_level: str) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        levels = ort.GraphOptimizationLevel
        so.graph_optimization_level = {"disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
                                       "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[opt_level]
        entries = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
        entries.update(entry.partition("=")[::2] for entry in config)  # KEY=VALUE entries override the defaults
        for key, value in entries.items():
            so.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(_model_path(spec)), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.vocab, self.threads = vocab, threads

    def tokenize(self, texts: Sequence[str]) -> None:
        return None  # synthetic ids only

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(None, feeds)))


def _candidate(spec: str, vocab: int, config: Sequence[str], opt_level: str) -> Candidate:
    """This script as a worker process for one model; the harness appends --threads and --no-spin."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--vocab", str(vocab),
            "--opt-level", opt_level] + [f"--config={entry}" for entry in config]
    return Candidate(spec, tuple(argv), {})


def time_models(specs: Sequence[str], *, batches: Sequence[int] = (1, 8), seqs: Sequence[int] = (32, 128),
                rounds: int = 30, warmup: int = 5, threads: int | None = None, vocab: int = 30522,
                labels: Sequence[str] | None = None, config: Sequence[str] = (), opt_level: str = "all",
                settle_ms: float = 0.0) -> dict:
    """p50 latency of every model per (batch, seq), interleaved one run at a time; ratios against the first.

    Args:
        config: ONNX Runtime session config entries "KEY=VALUE" for every worker, e.g.
            "session.intra_op.allow_spinning=1" (spinning is off unless turned on here).
        opt_level: graph optimization level of every session, one of `OPT_LEVELS`.
        settle_ms: pause before each timed run, so threads of the worker that ran before stop spinning.
    """
    threads = threads or min(os.cpu_count() or 1, 2)
    labels = list(labels or specs)
    workers: list[Worker] = []
    rows = []
    try:
        for spec in specs:  # one at a time, so load times do not overlap; spinning as `config` sets it
            workers.append(Worker(_candidate(spec, vocab, config, opt_level), threads, spinning=True))
        for batch in batches:
            for seq in seqs:
                for w in workers:
                    w.call(op="shape", batch=batch, seq=seq, seed=0)
                    w.call(op="run", n=warmup)
                samples: list[list[float]] = [[] for _ in workers]
                cpu: list[list[float]] = [[] for _ in workers]
                for _ in range(rounds):
                    for i, w in enumerate(workers):
                        if settle_ms:
                            time.sleep(settle_ms / 1e3)
                        got = w.call(op="run", n=1)
                        samples[i] += got["ms"]
                        cpu[i] += got["cpu_ms"]
                base, base_cpu = np.asarray(samples[0]), np.asarray(cpu[0])
                for i, label in enumerate(labels):
                    ms, cpu_ms = np.asarray(samples[i]), np.asarray(cpu[i])
                    rows.append({"model": label, "batch": batch, "seq": seq, "p50_ms": float(np.median(ms)),
                                 "p95_ms": float(np.percentile(ms, 95)), "min_ms": float(ms.min()),
                                 "speedup_vs_first": float(np.median(base) / np.median(ms)),
                                 "speedup_vs_first_paired": float(np.median(base / ms)),
                                 "cpu_p50_ms": float(np.median(cpu_ms)),
                                 "cpu_speedup_vs_first": float(np.median(base_cpu) / np.median(cpu_ms)),
                                 "samples_ms": ms.tolist(), "samples_cpu_ms": cpu_ms.tolist()})
    finally:
        for w in workers:
            w.close()
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                        "load_avg_after": os.getloadavg()},
            "settings": {"config": list(config), "opt_level": opt_level, "settle_ms": settle_ms},
            "method": "one worker process per model, interleaved single runs, synthetic ids, mask all ones, spinning "
                      "off unless settings.config turns it on; cpu_* figures: the worker's process CPU time per run",
            "rounds": rounds, "warmup": warmup, "rows": rows}


def format_rows(result: dict) -> str:
    lines = [f"{'model':<40} {'shape':>7} {'p50 ms':>9} {'p95 ms':>9} {'vs first':>9} {'(paired)':>9} "
             f"{'cpu p50':>9} {'cpu vs':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['model'][-40:]:<40} {r['batch']}x{r['seq']:<5} {r['p50_ms']:9.3f} {r['p95_ms']:9.3f} "
                     f"{r['speedup_vs_first']:8.2f}x {r['speedup_vs_first_paired']:8.2f}x "
                     f"{r['cpu_p50_ms']:9.3f} {r['cpu_speedup_vs_first']:6.2f}x")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-spin", action="store_true", help=argparse.SUPPRESS)  # the harness's; --config decides
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=_ints, default=[1, 8])
    parser.add_argument("--seq", type=_ints, default=[32, 128])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="ONNX Runtime session config entry for every worker (repeatable)")
    parser.add_argument("--opt-level", choices=OPT_LEVELS, default="all")
    parser.add_argument("--settle-ms", type=float, default=0.0, help="pause before each timed run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    bad = [c for c in args.config if "=" not in c]
    if bad:
        parser.error(f"--config {bad[0]!r} is not KEY=VALUE")
    if args.worker:
        return serve_worker(lambda: OnnxFileEngine(args.worker, args.threads or 1, args.vocab, args.config,
                                                   args.opt_level))
    result = time_models(args.models, batches=args.batch, seqs=args.seq, rounds=args.rounds, warmup=args.warmup,
                         threads=args.threads, vocab=args.vocab, config=args.config, opt_level=args.opt_level,
                         settle_ms=args.settle_ms)
    print(format_rows(result))
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
