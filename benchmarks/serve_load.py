"""Load-test `edgelora serve` on loopback: throughput and p50/p95 latency at several client counts, per batching mode.

Each (mode, window) gets a server process of its own (`python -m edgelora.cli serve`, 127.0.0.1, a
free port), all started at once with ORT spinning off, so the idle ones sleep. Clients are threads of this
process on keep-alive connections sending a fixed number of requests, each with a random adapter; per
client count the requests go in rounds, every server one slice in turn, so load from other processes
falls on all alike. Every answer is checked against `Runtime.predict` run offline on the same texts,
so the table also says what batching cost in fidelity. Clients and server share the CPU: on a small
machine the client threads take a visible share of it, so read the figures as end-to-end, not model-only.

Modes: off (each request its own run: bit-identical to offline predict), on (requests of one adapter
merged), mix (merged batches mixing adapters run once through the adapter bank; bundles with a bank only).

    python benchmarks/serve_load.py BUNDLE --concurrency 1,4,16 --requests 200 --window-ms 0,2 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgelora.atomic import write_file_atomic, write_text_atomic
from edgelora.runtime import Runtime, detect_isa

WORDS = ("turn on the lights in kitchen please off play some music stop song lock front door unlock set temperature "
         "to twenty degrees what is weather today tomorrow will it rain this movie was great awful boring loved "
         "hated film acting plot really not very good bad").split()
MODES = ("off", "on", "mix")


def workload(adapters: Sequence[str], n: int, texts_per_request: int, seed: int = 0) -> list[dict]:
    """`n` requests of `texts_per_request` texts of 3 to 24 words, each with a random adapter, from `seed`."""
    rng = random.Random(seed)
    return [{"texts": [" ".join(rng.choices(WORDS, k=rng.randint(3, 24))) for _ in range(texts_per_request)],
             "adapter": rng.choice(list(adapters))} for _ in range(n)]


class Server:
    """`python -m edgelora.cli serve` in a process of its own, on 127.0.0.1 and a free port."""

    def __init__(self, bundle: str, mode: str, *, threads: int | None, window_ms: float, max_batch: int) -> None:
        cmd = [sys.executable, "-m", "edgelora.cli", "serve", bundle, "--port", "0", "--log-level", "warning",
               "--batching", "off" if mode == "off" else "on", "--window-ms", str(window_ms),
               "--max-batch", str(max_batch), "--queue-limit", "4096"]
        cmd.append("--mix-adapters" if mode == "mix" else "--no-mix-adapters")
        if threads:
            cmd += ["--threads", str(threads)]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", Path(self.log.name).read_text())
            if found:
                self.port = int(found.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.05)

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def batch_stats(self) -> tuple[float, float, float]:
        """(texts summed, requests summed, runs) over all session runs so far, from /metrics."""
        text = self.get("/metrics")

        def value(name: str) -> float:
            return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

        return (value("edgelora_batch_size_sum"), value("edgelora_batch_requests_sum"),
                value("edgelora_batch_requests_count"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


def drive(port: int, requests: list[dict], concurrency: int, time_cap: float) -> tuple[list, list[float], float]:
    """Send `requests` from `concurrency` client threads; returns answers (None where not sent), latencies, wall s."""
    answers: list[dict | None] = [None] * len(requests)
    latencies: list[float] = []
    order = iter(range(len(requests)))
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + time_cap

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(30.0, time_cap))
        try:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                body = json.dumps(requests[i]).encode()
                start = time.perf_counter()
                conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                elapsed = time.perf_counter() - start
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
                with lock:
                    latencies.append(elapsed)
                answers[i] = json.loads(data)
        finally:
            conn.close()

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client) for _ in range(concurrency)]:
            f.result()
    return answers, latencies, time.perf_counter() - t0


def fidelity(answers: list[dict | None], expected: list[list[dict]]) -> dict:
    """Answers against offline predict: rows bit-identical, label disagreements, largest score difference."""
    rows = identical = flips = 0
    worst = 0.0
    for answer, want in zip(answers, expected):
        if answer is None:
            continue
        for got, ref in zip(answer["predictions"], want):
            rows += 1
            identical += got == ref
            flips += got["label"] != ref["label"]
            worst = max(worst, max(abs(got["scores"][k] - ref["scores"][k]) for k in ref["scores"]))
    return {"rows": rows, "bit_identical_rows": identical, "label_disagreements": flips, "max_abs_score_diff": worst}


def run(bundle: str, *, modes: Sequence[str], windows: Sequence[float], concurrency: Sequence[int], requests: int,
        texts_per_request: int, threads: int | None, max_batch: int, rounds: int, time_cap: float,
        warmup: int = 20) -> dict:
    """Every (mode, window) server at once, idle ones asleep (ORT spinning off); per client count, `rounds`
    rounds each send every server one slice of the requests in turn, so load from elsewhere falls on all alike."""
    warnings.simplefilter("ignore", RuntimeWarning)  # truncation notices
    offline = Runtime(bundle, intra_op_threads=threads, allow_spinning=False)
    adapters = list(offline.adapters)
    work = workload(adapters, requests, texts_per_request)
    expected = [offline.predict(r["texts"], adapter=r["adapter"]) for r in work]
    banked = offline.mixes_in_one_run
    m = offline.manifest
    del offline  # its session must not compete with the servers' for the cores
    if "mix" in modes and not banked:
        print(f"serve_load: skipping mode mix: {bundle} has no adapter bank", file=sys.stderr)
        modes = [mode for mode in modes if mode != "mix"]
    configs = [(mode, w) for mode in modes for w in ([0.0] if mode == "off" else windows)]
    servers: dict[tuple[str, float], Server] = {}
    results = []
    try:
        for mode, w in configs:
            servers[(mode, w)] = Server(bundle, mode, threads=threads, window_ms=w, max_batch=max_batch)
            drive(servers[(mode, w)].port, workload(adapters, warmup, texts_per_request, seed=1), 4, time_cap)
        slices = [list(range(r, len(work), rounds)) for r in range(rounds)]
        for c in concurrency:
            answers = {key: [None] * len(work) for key in servers}
            lat: dict = {key: [] for key in servers}
            wall = dict.fromkeys(servers, 0.0)
            before = {key: server.batch_stats() for key, server in servers.items()}
            for idx in slices:
                for key, server in servers.items():
                    got, ms, seconds = drive(server.port, [work[i] for i in idx], c, time_cap / rounds)
                    for i, answer in zip(idx, got):
                        answers[key][i] = answer
                    lat[key] += ms
                    wall[key] += seconds
            for (mode, w), server in servers.items():
                texts, reqs, runs = (a - b for a, b in zip(server.batch_stats(), before[(mode, w)]))
                ms = np.array(lat[(mode, w)]) * 1000
                done = len(ms)
                seconds = wall[(mode, w)]
                row = {"mode": mode, "window_ms": w, "concurrency": c, "requests": done, "wall_s": seconds,
                       "requests_per_s": done / seconds, "texts_per_s": done * texts_per_request / seconds,
                       "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                       "mean_texts_per_run": texts / runs if runs else 0.0,
                       "mean_requests_per_run": reqs / runs if runs else 0.0,
                       **fidelity(answers[(mode, w)], expected)}
                results.append(row)
                print(f"serve_load: {mode:>3} window {w:g} ms c={c:<3} {row['requests_per_s']:7.1f} req/s  "
                      f"p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    cpu = detect_isa()
    return {
        "bundle": str(bundle), "mode": m.mode, "precision": m.precision, "adapters": adapters,
        "adapter_bank": banked, "requests_per_level": requests, "texts_per_request": texts_per_request,
        "rounds": rounds, "max_batch": max_batch, "threads": threads or cpu.physical_cores,
        "cpu": {"model": cpu.model, "isa": cpu.isa, "physical_cores": cpu.physical_cores},
        "python": platform.python_version(), "results": results,
    }


def format_table(result: dict) -> str:
    lines = [f"{result['bundle']} ({result['mode']} {result['precision']}), {result['texts_per_request']} text(s) "
             f"per request, {result['requests_per_level']} requests per row in {result['rounds']} rounds, "
             f"max batch {result['max_batch']}, {result['threads']} ORT threads, {result['cpu']['model']}",
             f"{'mode':>4} {'window':>6} {'clients':>7} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'texts/run':>9} "
             f"{'reqs/run':>8} {'identical':>10} {'flips':>5} {'max|dscore|':>11}"]
    for r in result["results"]:
        lines.append(f"{r['mode']:>4} {r['window_ms']:>6g} {r['concurrency']:>7} {r['requests_per_s']:>8.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['mean_texts_per_run']:>9.2f} "
                     f"{r['mean_requests_per_run']:>8.2f} {r['bit_identical_rows']:>4}/{r['rows']:<5} {r['label_disagreements']:>5} "
                     f"{r['max_abs_score_diff']:>11.3g}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(f"{r['mode']} {r['window_ms']:g} ms" for r in result["results"]):
        rows = [r for r in result["results"] if f"{r['mode']} {r['window_ms']:g} ms" == mode]
        xs = [r["concurrency"] for r in rows]
        ax1.plot(xs, [r["requests_per_s"] for r in rows], marker="o", label=mode)
        ax2.plot(xs, [r["p95_ms"] for r in rows], marker="o", label=mode)
    for ax, title in ((ax1, "throughput (requests/s)"), (ax2, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"edgelora serve: {Path(result['bundle']).name} ({result['precision']})")
    fig.tight_layout()
    write_file_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--modes", default="off,on,mix", help="comma-separated from off, on, mix (default all)")
    parser.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count and mode (default 200)")
    parser.add_argument("--texts", type=int, default=1, help="texts per request (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="server ORT threads (default: physical cores)")
    parser.add_argument("--window-ms", type=_floats, default=[0.0, 2.0],
                        help="batching windows to compare for the merging modes (default 0,2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per client count (default 2)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per client count and mode at most")
    parser.add_argument("--json", default=None, help="also write the result as JSON")
    parser.add_argument("--plot", default=None, help="also write a PNG chart (needs matplotlib)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    result = run(args.bundle, modes=modes, windows=args.window_ms, concurrency=args.concurrency,
                 requests=args.requests, texts_per_request=args.texts, threads=args.threads,
                 max_batch=args.max_batch, rounds=args.rounds, time_cap=args.time_cap)
    print(format_table(result))
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
