"""Time ONNX models (bundles or bare .onnx files) on this CPU, each in a worker process of its own, interleaved.

Two ORT sessions in one process distort each other (idle pool threads spin and steal the cores the next
run needs), so every model runs in its own worker process, spinning off, and the parent asks one worker
at a time for one run, alternating A B C A B C ..., so slow drift and noisy neighbours fall on all alike.
Bare .onnx files let this compare graphs that are not edgelora bundles (Optimum's, fusion variants).

    python benchmarks/int8_speed.py A.onnx B/ --batch 1,8 --seq 32,128 --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _model_path(spec: str) -> Path:
    path = Path(spec)
    return path / "model.onnx" if path.is_dir() else path


def synthetic_feeds(names: Sequence[str], vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids of exactly `seq` per row from (seed, batch, seq), mask all ones, token types zero."""
    rng = np.random.default_rng([seed, batch, seq])
    ids = rng.integers(1000, vocab, size=(batch, seq), dtype=np.int64)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {n: out[n] for n in names}


def _worker(spec: str, threads: int, vocab: int) -> int:
    import onnxruntime as ort

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(_model_path(spec)), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    proto.write(json.dumps({"ready": True, "load_s": time.perf_counter() - t0}) + "\n")
    feeds: dict[str, np.ndarray] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "shape":
            feeds = synthetic_feeds(names, vocab, msg["batch"], msg["seq"], msg.get("seed", 0))
            proto.write('{"ok": true}\n')
        elif msg["op"] == "run":
            times = []
            for _ in range(msg["n"]):
                t = time.perf_counter()
                sess.run(None, feeds)
                times.append((time.perf_counter() - t) * 1e3)
            proto.write(json.dumps({"ms": times}) + "\n")
        else:
            return 0
    return 0


class _Worker:
    def __init__(self, spec: str, threads: int, vocab: int) -> None:
        cmd = [sys.executable, __file__, "--worker", spec, "--threads", str(threads), "--vocab", str(vocab)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker for {self.proc.args[3]} exited with {self.proc.wait()}")
        return json.loads(line)

    def call(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def time_models(specs: Sequence[str], *, batches: Sequence[int] = (1, 8), seqs: Sequence[int] = (32, 128),
                rounds: int = 30, warmup: int = 5, threads: int | None = None, vocab: int = 30522,
                labels: Sequence[str] | None = None) -> dict:
    """p50 latency of every model per (batch, seq), interleaved one run at a time; ratios against the first."""
    threads = threads or min(os.cpu_count() or 1, 2)
    labels = list(labels or specs)
    workers = [_Worker(s, threads, vocab) for s in specs]
    rows = []
    try:
        for batch in batches:
            for seq in seqs:
                for w in workers:
                    w.call(op="shape", batch=batch, seq=seq)
                    w.call(op="run", n=warmup)
                samples = [[] for _ in workers]
                for _ in range(rounds):
                    for i, w in enumerate(workers):
                        samples[i] += w.call(op="run", n=1)["ms"]
                base = np.asarray(samples[0])
                for i, label in enumerate(labels):
                    ms = np.asarray(samples[i])
                    rows.append({"model": label, "batch": batch, "seq": seq, "p50_ms": float(np.median(ms)),
                                 "p95_ms": float(np.percentile(ms, 95)), "min_ms": float(ms.min()),
                                 "speedup_vs_first": float(np.median(base) / np.median(ms)),
                                 "speedup_vs_first_paired": float(np.median(base / ms)), "samples_ms": ms.tolist()})
    finally:
        for w in workers:
            w.close()
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                        "load_avg_after": os.getloadavg()},
            "method": "one worker process per model, spinning off, interleaved single runs, synthetic ids, mask all ones",
            "rounds": rounds, "warmup": warmup, "rows": rows}


def format_rows(result: dict) -> str:
    lines = [f"{'model':<40} {'shape':>7} {'p50 ms':>9} {'p95 ms':>9} {'vs first':>9} {'(paired)':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['model'][-40:]:<40} {r['batch']}x{r['seq']:<5} {r['p50_ms']:9.3f} {r['p95_ms']:9.3f} "
                     f"{r['speedup_vs_first']:8.2f}x {r['speedup_vs_first_paired']:8.2f}x")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=_ints, default=[1, 8])
    parser.add_argument("--seq", type=_ints, default=[32, 128])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.threads or 1, args.vocab)
    result = time_models(args.models, batches=args.batch, seqs=args.seq, rounds=args.rounds, warmup=args.warmup,
                         threads=args.threads, vocab=args.vocab)
    print(format_rows(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
