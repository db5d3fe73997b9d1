"""Load-test `edgelora serve` on a decoder bundle over its OpenAI API, on loopback, bounded in count and time.

One server process (`python -m edgelora.cli serve BUNDLE`, 127.0.0.1, a free port); the clients are threads of
this process, each on its own connection, streaming greedy chat completions (`stream: true`) for a fixed set
of (adapter, prompt) pairs over up to 4 adapters. Three phases:

1. **solo**: every pair once, one client at a time. These answers are each request's solo greedy run.
2. **levels**: 1, 4 and 16 concurrent clients (`--concurrency`), `--requests` each, the pairs in a seeded
   order: aggregate completion tokens/s (all tokens over the level's wall time), p50/p95 time to first token
   (request sent to first streamed piece) and per-token latency (a request's time from its first to its last
   piece over its tokens after the first). Every answer is compared with its pair's solo answer: any
   difference is cross-talk between requests that share a batch.
3. **leak**: `--leak-requests` more (1,000 for the full run) at `--leak-concurrency`, streamed, every tenth
   client hanging up after its first piece; the server's resident memory (VmRSS) is sampled at the start,
   middle and end of the phase. Answers of the completed ones are compared with the solo answers too.

Clients and server share the CPU, so the figures are end to end, not model-only; on a host shared with
other jobs read them with the load average the report records. Writes `load_test.md` and `load_test.json` to
`--out` (benchmarks/results/ by default).

    python benchmarks/load_test.py                        # small: runs/load/smollm2-int8-4, 8 requests a level
    python benchmarks/load_test.py BUNDLE --requests 64 --leak-requests 1000 --max-tokens 32   # the full run
    python benchmarks/load_test.py --prepare              # train 4 SmolLM2 adapters, export the default bundle
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelora.atomic import write_text_atomic
from edgelora.generation_tasks import make_pairs
from edgelora.runtime import detect_isa

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "runs" / "load" / "smollm2-int8-4"
# The default bundle's adapters: two tasks (edgelora/generation_tasks.py) x two seeds and ranks, int8 QAT for a
# switchable deployment, one epoch of batch 8 on 80% of the rows (240 rows: 24 steps; 40 rows: 4 steps, short
# training that still makes a distinct adapter); the name, task, seed, rank and rows of each.
ADAPTERS = (("home", "home-json", 0, 8, 240), ("meeting", "meeting", 0, 8, 40),
            ("home-r4", "home-json", 1, 4, 40), ("meeting-r4", "meeting", 1, 4, 40))
HANG_UP_EVERY = 10  # in the leak phase, every tenth client closes its connection after the first piece
REPLACEMENT = "\ufffd"  # what the text stream shows for the bytes of a character not yet complete
RSS_FLAT_MB = 32.0  # growth from the middle to the end of the leak phase allowed before "flat" is refused


# -- the server ------------------------------------------------------------------------------------------------


class Server:
    """`python -m edgelora.cli serve BUNDLE` in a process of its own, on 127.0.0.1 and a free port."""

    def __init__(self, bundle: Path, threads: int | None, extra: Sequence[str]) -> None:
        cmd = [sys.executable, "-m", "edgelora.cli", "serve", str(bundle), "--port", "0", "--log-level", "warning",
               *(["--threads", str(threads)] if threads else []), *extra]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="load_test_serve_", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 300
        while True:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", Path(self.log.name).read_text())
            if found:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"edgelora serve did not start:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        """The server process's resident memory now (VmRSS), in MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def get(self, path: str) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise SystemExit(f"GET {path}: {response.status} {body[:500]!r}")
            return body
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """The unlabelled series of /metrics (Prometheus text), by name."""
        found = re.findall(r"^([a-zA-Z_:][\w:]*) (\S+)$", self.get("/metrics").decode(), re.M)
        return {name: float(value) for name, value in found}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


# -- one streamed request --------------------------------------------------------------------------------------


@dataclass
class Answer:
    pair: int
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None  # request sent -> first streamed piece
    per_token_s: float | None = None  # first -> last piece, over the tokens after the first
    error: str | None = None
    hung_up: bool = False


def stream_chat(port: int, pair: int, body: dict, timeout_s: float, hang_up: bool = False) -> Answer:
    """POST /v1/chat/completions with stream: true; the pieces, usage and timings of one answer."""
    answer = Answer(pair)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    pieces, first, last, usage, done = [], None, None, None, False
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            answer.error = f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}"
            return answer
        for raw in response:  # server-sent events, one `data: ...` line each
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                answer.error = f"stream error: {chunk['error']}"
                return answer
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(piece)
            if hang_up and pieces:
                answer.hung_up = True
                return answer
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        answer.error = f"{type(e).__name__}: {e}"
        return answer
    finally:
        conn.close()
    if not done:
        answer.error = "the stream ended without data: [DONE]"
    answer.text = "".join(pieces)
    answer.tokens = usage["completion_tokens"] if usage else len(pieces)
    if first is not None:
        answer.ttft_s = first - started
        if answer.tokens > 1:
            answer.per_token_s = (last - first) / (answer.tokens - 1)
    return answer


# -- phases ----------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    port: int
    pairs: list[tuple[str, str]]  # (model, user prompt)
    max_tokens: int
    timeout_s: float
    deadline: float  # time.monotonic() after which no new request starts
    solo: dict[int, str] = field(default_factory=dict)

    def body(self, pair: int) -> dict:
        model, prompt = self.pairs[pair]
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}

    def run(self, order: Sequence[int], clients: int, hang_up_every: int = 0,
            on_done=None) -> tuple[list[Answer], float, int]:
        """`order`'s pairs with `clients` requests in flight; the answers, the wall time and how many requests
        the deadline left unstarted."""
        skipped = 0
        lock = threading.Lock()

        def one(i_pair: tuple[int, int]) -> Answer | None:
            nonlocal skipped
            i, pair = i_pair
            if time.monotonic() > self.deadline:
                with lock:
                    skipped += 1
                return None
            hang_up = hang_up_every > 0 and i % hang_up_every == hang_up_every - 1
            answer = stream_chat(self.port, pair, self.body(pair), self.timeout_s, hang_up)
            if on_done is not None:
                on_done(i)
            return answer

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for a in pool.map(one, enumerate(order)) if a is not None]
        return answers, time.perf_counter() - started, skipped


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarize(answers: list[Answer], wall_s: float, solo: dict[int, str], skipped: int, prefix: bool = False) -> dict:
    """A phase's figures; `prefix`: the answers were cut shorter than the solo ones, so each must begin them."""
    complete = [a for a in answers if a.error is None and not a.hung_up]
    ttft = [a.ttft_s for a in complete if a.ttft_s is not None]
    per_token = [a.per_token_s for a in complete if a.per_token_s is not None]
    # a cut answer may end inside a character made of several tokens, decoded so far as U+FFFD
    differ = [a for a in complete if a.pair in solo
              and not (solo[a.pair].startswith(a.text.rstrip(REPLACEMENT)) if prefix else a.text == solo[a.pair])]
    tokens = sum(a.tokens for a in complete)
    return {
        "requests": len(answers), "complete": len(complete), "hung_up": sum(a.hung_up for a in answers),
        "errors": sorted({a.error for a in answers if a.error})[:5],
        "error_count": sum(a.error is not None for a in answers),
        "skipped_by_time_cap": skipped, "completion_tokens": tokens, "wall_s": round(wall_s, 2),
        "tokens_per_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "ttft_ms_p50": percentile_ms(ttft, 50), "ttft_ms_p95": percentile_ms(ttft, 95),
        "per_token_ms_p50": percentile_ms(per_token, 50), "per_token_ms_p95": percentile_ms(per_token, 95),
        "equal_to_solo": len(complete) - len(differ), "differ_from_solo": len(differ),
        "first_difference": None if not differ else {"pair": differ[0].pair, "solo": solo[differ[0].pair],
                                                     "got": differ[0].text},
    }


def prompts(n: int) -> list[str]:
    """`n` held-out prompts of each builtin generation task (their own seed: never trained on)."""
    return [p for task in ("home-json", "meeting") for p, _ in make_pairs(task, n, seed=101, split="eval")]


def cpu_facts() -> dict:
    cpu = detect_isa()
    int8 = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8") if f in cpu.flags]
    return {"cpu": cpu.model, "logical_cpus": os.cpu_count(), "physical_cores": cpu.physical_cores, "isa": cpu.isa,
            "int8_flags": int8}


# -- the run ---------------------------------------------------------------------------------------------------


def load_test(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    facts = {**cpu_facts(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    server = Server(args.bundle, args.threads, args.serve_arg)
    try:
        listed = json.loads(server.get("/v1/models"))["data"]
        models = [m["id"] for m in listed]
        # default: the adapters (models with a parent, the base), else the base alone
        adapters = args.adapters or [m["id"] for m in listed if m.get("parent")] or models
        missing = sorted(set(adapters) - set(models))
        if missing:
            raise SystemExit(f"--adapters: {', '.join(missing)} not served; the bundle has {', '.join(models)}")
        adapters = adapters[:4]
        texts = prompts(args.prompts)
        pairs = [(a, p) for a in adapters for p in texts]
        work = Workload(server.port, pairs, args.max_tokens, args.request_timeout_s,
                        deadline=started + args.time_cap_s)
        rss = {"after_start": round(server.rss_mb(), 1)}

        # 1. every pair alone: the reference answers (and the first requests warm the server up)
        answers, wall, skipped = work.run(range(len(pairs)), 1)
        failed = [a.error for a in answers if a.error]
        if failed or skipped:
            raise SystemExit(f"solo phase: {failed[:3] or f'{skipped} requests past --time-cap-s'}")
        work.solo = {a.pair: a.text for a in answers}
        solo = {"pairs": len(pairs), "wall_s": round(wall, 2), "empty_answers": sum(not t for t in work.solo.values()),
                "answers": [{"model": pairs[i][0], "prompt": pairs[i][1], "text": t}
                            for i, t in sorted(work.solo.items())]}

        # 2. 1, 4 and 16 clients
        rng = random.Random(args.seed)
        levels = []
        for clients in args.concurrency:
            order = [rng.randrange(len(pairs)) for _ in range(args.requests)]
            answers, wall, skipped = work.run(order, clients)
            levels.append({"clients": clients, **summarize(answers, wall, work.solo, skipped)})
            print(f"  {clients:>3} clients: {levels[-1]['tokens_per_s']} tokens/s, "
                  f"{levels[-1]['differ_from_solo']} differ from solo", file=sys.stderr)

        # 3. many requests: resident memory at the start, middle and end
        order = [rng.randrange(len(pairs)) for _ in range(args.leak_requests)]
        rss["leak_start"] = round(server.rss_mb(), 1)
        samples: dict[int, float] = {}

        def sample(i: int) -> None:
            if i == len(order) // 2 and i not in samples:
                samples[i] = server.rss_mb()
            if i % 100 == 99:
                print(f"  memory phase: request {i + 1} of {len(order)} done", file=sys.stderr)

        work.max_tokens = args.leak_max_tokens or args.max_tokens
        answers, wall, skipped = work.run(order, args.leak_concurrency, HANG_UP_EVERY, on_done=sample)
        time.sleep(1.0)  # let hung-up requests' slots be freed before the last sample
        rss["leak_middle"] = round(next(iter(samples.values()), float("nan")), 1)
        rss["leak_end"] = round(server.rss_mb(), 1)
        shorter = work.max_tokens < args.max_tokens
        leak = {"clients": args.leak_concurrency, "max_tokens": work.max_tokens,
                **summarize(answers, wall, work.solo, skipped, prefix=shorter), "rss_mb": rss}
        growth = rss["leak_end"] - rss["leak_middle"]
        leak["rss_growth_middle_to_end_mb"] = round(growth, 1)
        leak["rss_flat"] = bool(abs(growth) <= RSS_FLAT_MB)
        metrics = server.metrics()
    finally:
        server.stop()
    facts["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "bundle": str(args.bundle), "adapters": adapters, "prompts_per_task": args.prompts,
        "max_tokens": args.max_tokens, "threads": args.threads, "serve_args": args.serve_arg,
        "host": facts, "solo": solo, "levels": levels, "leak": leak, "server_metrics_after": metrics,
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(report: dict) -> str:
    h = report["host"]
    lines = [
        f"# edgelora serve load test ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
        f"`{report['command']}`", "",
        f"Bundle `{report['bundle']}`, adapters {', '.join(report['adapters'])}; "
        f"{len(report['adapters']) * 2 * report['prompts_per_task']} (adapter, prompt) pairs, greedy chat "
        f"completions streamed, at most {report['max_tokens']} new tokens. CPU: {h['cpu']}, {h['logical_cpus']} "
        f"logical CPUs, ISA {h['isa']} ({', '.join(h['int8_flags'])}); load average before "
        f"{h['load_average_before']}, after {h['load_average_after']} (clients and server share the CPU).", "",
        "| clients | requests | tokens | wall s | aggregate tokens/s | TTFT p50 ms | TTFT p95 ms "
        "| per-token p50 ms | per-token p95 ms | equal to solo | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        lines.append(f"| {lv['clients']} | {lv['complete']} | {lv['completion_tokens']} | {lv['wall_s']} | "
                     f"{lv['tokens_per_s']} | {lv['ttft_ms_p50']} | {lv['ttft_ms_p95']} | {lv['per_token_ms_p50']} | "
                     f"{lv['per_token_ms_p95']} | {lv['equal_to_solo']}/{lv['complete']} | {lv['error_count']} |")
    lk = report["leak"]
    rss = lk["rss_mb"]
    lines += [
        "", f"Memory: {lk['requests']} requests at {lk['clients']} clients, at most {lk['max_tokens']} new tokens "
        f"({lk['hung_up']} hung up after the first piece, {lk['error_count']} errors, {lk['skipped_by_time_cap']} not "
        f"started before the time cap), {lk['completion_tokens']} tokens in {lk['wall_s']} s; "
        f"{lk['equal_to_solo']}/{lk['complete']} completed answers equal to solo"
        f"{' (the start of it: shorter answers)' if lk['max_tokens'] < report['max_tokens'] else ''}.", "",
        "| server RSS MiB | after start | leak phase start | middle | end | middle -> end |",
        "|---|---|---|---|---|---|",
        f"| | {rss['after_start']} | {rss['leak_start']} | {rss['leak_middle']} | {rss['leak_end']} | "
        f"{lk['rss_growth_middle_to_end_mb']:+} ({'flat' if lk['rss_flat'] else 'GROWING'}, "
        f"limit ±{RSS_FLAT_MB:g}) |", "",
    ]
    m = report["server_metrics_after"]
    if "edgelora_active_requests" in m:
        lines += [f"After the run the server's /metrics shows {m['edgelora_active_requests']:g} active requests, "
                  f"{m.get('edgelora_queue_depth', float('nan')):g} queued and "
                  f"{m.get('edgelora_kv_cache_bytes', float('nan')):g} KV cache bytes in use.", ""]
    return "\n".join(lines)


# -- making the default bundle ---------------------------------------------------------------------------------


def prepare(bundle: Path) -> None:
    """Train the four adapters of ADAPTERS (each skipped when already there) and export them switchable on
    one int8 SmolLM2 base."""
    work = bundle.parent / "adapters"
    for name, task, seed, rank, rows in ADAPTERS:
        out = work / name
        if (out / "adapter_model.safetensors").is_file():
            continue
        began = time.time()
        subprocess.run([sys.executable, "-m", "edgelora.cli", "train", "--task", "causal-lm", "--base", "smollm2",
                        "--data", f"builtin:{task}:{rows}", "--name", name, "--seed", str(seed), "--rank",
                        str(rank), "--qat", "int8", "--deploy-mode", "switchable", "--eval-generate", "0",
                        "--out", str(out)], check=True)
        print(f"trained {name} in {time.time() - began:.0f} s", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "edgelora.cli", "export", "smollm2",
                    *[f"--adapter={name}={work / name}" for name, *_ in ADAPTERS],
                    "--mode", "switchable", "--precision", "int8", "--out", str(bundle)], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE,
                        help=f"decoder bundle to serve (default {DEFAULT_BUNDLE.relative_to(ROOT)}, see --prepare)")
    parser.add_argument("--prepare", action="store_true",
                        help="train the default bundle's 4 SmolLM2 adapters and export it first (tens of minutes)")
    parser.add_argument("--adapters", type=lambda s: s.split(","), default=None,
                        help="comma-separated models to use (default: the bundle's adapters, at most 4)")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level (default 8)")
    parser.add_argument("--leak-requests", type=int, default=100,
                        help="requests of the memory phase (default 100; the full run: 1000)")
    parser.add_argument("--leak-concurrency", type=int, default=8)
    parser.add_argument("--leak-max-tokens", type=int, default=None,
                        help="new tokens per answer in the memory phase (default: --max-tokens)")
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts per task (default 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="new tokens per answer at most (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="the server's ORT intra-op threads")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an extra `edgelora serve` argument (repeat; e.g. --serve-arg=--max-kv-mb=256)")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--time-cap-s", type=float, default=1800.0,
                        help="no request starts after this many seconds (default 1800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    for name in ("requests", "leak_requests", "leak_concurrency", "prompts", "max_tokens", "leak_max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: positive client counts, e.g. 1,4,16")
    if args.prepare:
        prepare(args.bundle)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle}: no bundle there; pass a decoder bundle or build the default with --prepare")

    report = load_test(args)
    table = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "load_test.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(args.out / "load_test.md", table)
    print(table)
    ok = all(lv["differ_from_solo"] == 0 and lv["error_count"] == 0 for lv in report["levels"])
    leak = report["leak"]
    ok = ok and leak["differ_from_solo"] == 0 and leak["error_count"] == 0 and leak["rss_flat"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
