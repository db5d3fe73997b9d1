"""The bench worker protocol: one process per candidate, JSON lines over stdin/stdout.

Worker side: `serve_worker` builds an `Engine` (a bundle, a torch model, a bare ONNX file), measures its
load time and memory, then answers ops (shape, run, mem, fidelity, quit). Parent side: `Candidate` says how
to start one, `Worker` talks to it. The harness that drives them in interleaved rounds is
`edgelora.runtime.bench`; benchmarks/ scripts start their own engines through the same two ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.runtime.fidelity import GENERATED_ROWS, GENERATED_SEQ


def _memory() -> dict[str, int | None]:
    """Peak and current resident bytes of this process.

    VmHWM rather than ru_maxrss on Linux: ru_maxrss survives exec, so a child would report its
    parent's peak.
    """
    peak = now = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    kib = int(line.split()[1]) * 1024
                    peak, now = (kib, now) if line.startswith("VmHWM") else (peak, kib)
    except OSError:  # not Linux
        try:
            import resource  # macOS: ru_maxrss is in bytes there
        except ImportError:  # Windows
            return {"peak": None, "now": None}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak": peak, "now": now}


def _synthetic_feeds(inputs: Sequence[str], vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids of exactly `seq` per row; every worker derives the same ids from (seed, batch, seq)."""
    rng = np.random.default_rng([seed, batch, seq])
    feeds = {}
    for name in inputs:
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), np.int64)
        else:
            feeds[name] = np.zeros((batch, seq), np.int64)
    return feeds


class Engine(Protocol):
    """What a worker times: one loaded model behind `run`, plus what fidelity needs.

    `run` returns outputs by name; the fidelity check compares `logits` and `embeddings` (mean-pooled,
    [batch, hidden]) where both sides have them. `labels` name the logits columns (empty: no task head);
    `size_bytes`, when not None, is the model's size on disk as the report should state it.
    """

    input_names: Sequence[str]
    vocab: int
    threads: int
    labels: Sequence[str]
    size_bytes: int | None

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray] | None:
        """Feeds for texts, padded to the longest; None when the model has no tokenizer."""

    def run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """One inference: the call the harness times."""


def _fidelity_outputs(engine: Engine, texts: Sequence[str] | None, batch: int, seed: int) -> tuple[dict, str]:
    """Every output of the fidelity inputs, run in chunks of `batch` rows; (outputs, what the inputs were).

    Texts are padded per chunk to its longest, as a server batches them; a model without a tokenizer
    gets GENERATED_ROWS rows of ids from `seed` instead, the same in every worker of one base. A token-level
    output (batch x tokens x ..., e.g. a token classifier's logits) gives one row per real token, so chunks
    padded to different lengths concatenate and padding is never compared.
    """
    if texts is not None and engine.tokenize(texts[:1]) is not None:
        chunks = [engine.tokenize(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        what = "texts"
    else:
        rng = np.random.default_rng([seed, GENERATED_ROWS, GENERATED_SEQ])
        ids = rng.integers(0, engine.vocab, size=(GENERATED_ROWS, GENERATED_SEQ), dtype=np.int64)
        chunks = []
        for i in range(0, GENERATED_ROWS, batch):
            part = ids[i : i + batch]
            columns = {"input_ids": part, "attention_mask": np.ones_like(part)}
            chunks.append({n: columns.get(n, np.zeros_like(part)) for n in engine.input_names})
        what = "generated ids"
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in chunks:
        real = np.asarray(feeds["attention_mask"]).astype(bool)  # (batch, tokens)
        for name, value in engine.run(feeds).items():
            value = np.asarray(value)
            if value.ndim >= 3 and value.shape[:2] == real.shape:
                value = value[real]  # (real tokens, ...)
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(v) for name, v in parts.items()}, what


def serve_worker(make_engine: Callable[[], Engine], ops: Mapping[str, Callable[[Engine, dict], dict]] | None = None) -> int:
    """Build an engine and serve it over stdin/stdout JSON lines until told to quit: a worker's main.

    Load time and memory are measured around `make_engine`. Ops: shape (make the synthetic feeds),
    run (time n runs: wall and process CPU ms), mem, fidelity (write every output of the fidelity inputs to
    an .npz), quit; `ops` adds more, each called as op(engine, message) for its reply (the decoder bench's
    first-token, decode and greedy ops, runtime/decoder_bench.py).
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printing to stdout lands on stderr, never in the protocol

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        start = _memory()
        t0 = time.perf_counter()
        engine = make_engine()
        load_s = time.perf_counter() - t0
        send({"ready": True, "load_s": load_s, "mem_start": start, "mem_load": _memory(), "vocab": engine.vocab,
              "threads": engine.threads, "labels": list(engine.labels), "size_bytes": engine.size_bytes})
        feeds: dict[str, np.ndarray] = {}
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg["op"]
            if op == "shape":
                feeds = _synthetic_feeds(engine.input_names, engine.vocab, msg["batch"], msg["seq"], msg["seed"])
                send({"ok": True})
            elif op == "run":
                times, cpu = [], []
                for _ in range(msg["n"]):
                    t, c = time.perf_counter(), time.process_time()
                    engine.run(feeds)
                    times.append((time.perf_counter() - t) * 1e3)
                    cpu.append((time.process_time() - c) * 1e3)  # this process's CPU time: steadier when shared
                send({"ms": times, "cpu_ms": cpu})
            elif op == "mem":
                send(_memory())
            elif op == "fidelity":
                outputs, what = _fidelity_outputs(engine, msg["texts"], msg["batch"], msg["seed"])
                np.savez(msg["path"], **outputs)
                send({"inputs": what, "rows": int(next(iter(outputs.values())).shape[0])})
            elif op == "quit":
                return 0
            elif ops is not None and op in ops:
                send(ops[op](engine, msg))
            else:
                send({"error": f"bench worker: unknown op {op!r}"})
    except EdgeloraError as e:
        send({"error": str(e)})
        return 1
    return 0



def worker_request(argv: Sequence[str]) -> tuple[dict, int | None, bool] | None:
    """In a benchmark script that is also its candidates' worker: the (spec, threads, spinning) that `Worker`
    started this process with (`--worker SPEC --threads N --no-spin`), or None in the harness process."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--worker", default=None)
    pre.add_argument("--threads", type=int, default=None)
    pre.add_argument("--no-spin", action="store_true")
    known, _ = pre.parse_known_args(list(argv))
    if known.worker is None:
        return None
    return json.loads(known.worker), known.threads, not known.no_spin


@dataclass(frozen=True)
class Candidate:
    """One thing to time: the command that starts its worker (a `serve_worker` main) and its report entry.

    The harness appends `--threads N` (when given) and `--no-spin` (spinning off) to `argv`, so every
    worker of a run gets the same settings. `info` lands in the result as is; its "mode" and "precision"
    show in the table, its "size_bytes" (else the worker's) in the size column.
    """

    label: str
    argv: tuple[str, ...]
    info: Mapping[str, object]
    env: Mapping[str, str] | None = None


class Worker:
    """A candidate's worker process and its JSON-lines channel."""

    def __init__(self, candidate: Candidate, threads: int | None, spinning: bool) -> None:
        cmd = list(candidate.argv)
        cmd += ["--threads", str(threads)] if threads is not None else []
        cmd += [] if spinning else ["--no-spin"]
        self.label = candidate.label
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, **candidate.env} if candidate.env else None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, bufsize=1, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            raise EdgeloraError(f"{self.label}: benchmark worker exited ({self._proc.returncode}): {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise EdgeloraError(reply["error"])
        return reply

    def call(self, **msg) -> dict:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:  # the worker died: _read reports its stderr
            pass
        return self._read()

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()
