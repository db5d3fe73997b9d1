"""Honest CPU benchmarks of bundles: one worker process per bundle, driven in interleaved rounds.

Two ORT sessions in one process distort each other (idle pool threads spin and steal the cores the
other run needs), so each bundle runs in a worker process of its own that loads it once. The parent
asks one worker at a time for one timed run, alternating A B A B ..., so only one runs at a time and
slow drift (thermal, frequency, noisy neighbours) falls on every bundle alike. Across processes the
trap remains: after a run ORT's pool threads spin for tens of milliseconds (measured: ~40 ms of CPU,
done by ~100 ms, on a 2-core AMD EPYC VM), stealing cores from the next worker. So spinning is off by
default for every worker, and when turned on each run waits a settle pause first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.cpu import detect_isa
from edgelora.runtime.runtime import Runtime, read_manifest

RESULT_VERSION = 1
METHOD = ("one worker process per bundle, loaded once; per shape: warm-up runs per bundle, then interleaved "
          "rounds of one run per bundle, one process running at a time; time measured in the worker around "
          "Runtime.run on synthetic token ids (fixed seed, mask all ones)")
Progress = Callable[[int, int, str], None]


# -- worker side ----------------------------------------------------------------------------------


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


def _worker_main(bundle: str, adapter: str | None, threads: int | None, spinning: bool) -> int:
    """Serve one bundle over stdin/stdout JSON lines until told to quit."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printing to stdout lands on stderr, never in the protocol

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        start = _memory()
        t0 = time.perf_counter()
        rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=spinning)
        rt.labels(adapter)  # unknown adapter names fail here, before any timing
        load_s = time.perf_counter() - t0
        vocab = rt.vocab_size or int(rt.manifest.get("base", {}).get("vocab_size") or 100)
        send({"ready": True, "load_s": load_s, "mem_start": start, "mem_load": _memory(), "vocab": vocab,
              "threads": rt.intra_op_threads})
        feeds: dict[str, np.ndarray] = {}
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg["op"]
            if op == "shape":
                feeds = _synthetic_feeds(rt.manifest["inputs"], vocab, msg["batch"], msg["seq"], msg["seed"])
                send({"ok": True})
            elif op == "run":
                times = []
                for _ in range(msg["n"]):
                    t = time.perf_counter()
                    rt.run(feeds, adapter)
                    times.append((time.perf_counter() - t) * 1e3)
                send({"ms": times})
            elif op == "mem":
                send(_memory())
            elif op == "quit":
                return 0
    except EdgeloraError as e:
        send({"error": str(e)})
        return 1
    return 0


# -- parent side ----------------------------------------------------------------------------------


class _Worker:
    """A bundle's worker process and its JSON-lines channel."""

    def __init__(self, path: str, adapter: str | None, threads: int | None, spinning: bool) -> None:
        cmd = [sys.executable, "-m", "edgelora.runtime.bench", "--worker", path]
        cmd += ["--adapter", adapter] if adapter is not None else []
        cmd += ["--threads", str(threads)] if threads is not None else []
        cmd += [] if spinning else ["--no-spin"]
        self.path = path
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            raise EdgeloraError(f"{self.path}: benchmark worker exited ({self._proc.returncode}): {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise EdgeloraError(reply["error"])
        return reply

    def call(self, **msg) -> dict:
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
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


def _parse_spec(spec: str, adapter: str | None) -> tuple[str, str | None]:
    """`path@adapter` -> (path, adapter); a path that itself contains '@' still works when it exists."""
    path, sep, name = spec.rpartition("@")
    if sep and name and not Path(spec).exists():
        return path, name
    return spec, adapter


def _bundle_bytes(path: Path) -> dict[str, int]:
    model = (path / "model.onnx").stat().st_size
    adapters = sum(f.stat().st_size for f in (path / "adapters").glob("*.onnx_adapter")) \
        if (path / "adapters").is_dir() else 0
    return {"model_bytes": model, "adapters_bytes": adapters, "size_bytes": model + adapters}


def _bundle_info(spec: str, default_adapter: str | None) -> dict:
    path, adapter = _parse_spec(spec, default_adapter)
    m = read_manifest(path, verify=False)  # the worker's Runtime verifies the sha256s
    if m["mode"] == "merged" and adapter is not None and m["adapters"] and adapter == m["adapters"][0]["name"]:
        adapter = None  # the baked adapter: same run
    effective = adapter if m["mode"] == "switchable" else (m["adapters"][0]["name"] if m["adapters"] else None)
    base = m.get("base") or {}
    return {"spec": spec, "path": str(path), "adapter": adapter, "task": effective, "mode": m["mode"],
            "precision": m.get("precision"), "base": base.get("fingerprint") or base.get("name"),
            "base_name": base.get("name"), **_bundle_bytes(Path(path))}


def _labels(bundles: list[dict]) -> None:
    names = [Path(b["path"]).name + (f"@{b['adapter']}" if b["adapter"] else "") for b in bundles]
    unique = len(set(names)) == len(names)
    for b, name in zip(bundles, names):
        b["label"] = name if unique else b["spec"]


def _comparisons(bundles: list[dict]) -> list[tuple[str, int, int]]:
    """(kind, baseline, candidate) pairs: int8 over fp32, and merged over switchable, like for like."""
    pairs = []
    for i, a in enumerate(bundles):
        for j, b in enumerate(bundles):
            same = a["base"] == b["base"] and a["task"] == b["task"]
            if same and a["mode"] == b["mode"] and (a["precision"], b["precision"]) == ("fp32", "int8"):
                pairs.append(("int8/fp32", i, j))
            if same and a["precision"] == b["precision"] and (a["mode"], b["mode"]) == ("switchable", "merged"):
                pairs.append(("merged/switchable", i, j))
    return pairs


def run_benchmark(
    bundles: Sequence[str],
    *,
    batches: Sequence[int] = (1, 8),
    seqs: Sequence[int] = (16, 128),
    rounds: int = 30,
    warmup: int = 5,
    adapter: str | None = None,
    threads: int | None = None,
    spinning: bool = False,
    settle_ms: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Benchmark bundles side by side; returns a JSON-serialisable result (see `format_table`).

    Example:
        >>> r = run_benchmark(["out/fp32", "out/int8"], batches=(1,), seqs=(32,))  # doctest: +SKIP
        >>> print(format_table(r))                                                  # doctest: +SKIP

    Args:
        bundles: bundle directories; `dir@adapter` picks a switchable bundle's adapter for that entry.
        adapter: the adapter for entries that name none.
        threads: intra-op threads per worker; None means physical cores. Workers never run at once.
        spinning: ORT's intra-op spin-waiting, the same for every worker (recorded in the result). Off
            by default: spinning threads of the worker that just ran steal the next worker's cores.
        settle_ms: pause before each timed run; None means 0 without spinning and 200 ms with it, long
            enough for the previous worker's threads to stop spinning (so every run starts with idle
            threads either way).
        progress: called as progress(done, total, message) after each timed run.
    """
    if not bundles:
        raise EdgeloraError("bench: give at least one bundle directory")
    for name, values in (("batch", batches), ("seq", seqs)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise EdgeloraError(f"bench: {name} sizes {list(values)!r} must be positive integers")
    if rounds < 1 or warmup < 0:
        raise EdgeloraError(f"bench: rounds={rounds}, warmup={warmup}; need rounds >= 1 and warmup >= 0")
    if settle_ms is None:
        settle_ms = 200.0 if spinning else 0.0
    info = [_bundle_info(spec, adapter) for spec in bundles]
    _labels(info)
    shapes = [(b, s) for b in batches for s in seqs]
    total, done = len(shapes) * rounds * len(info), 0
    rows: list[dict] = []
    schedule: list[dict] = []
    samples: dict[tuple[int, int, int], list[float]] = {}
    workers: list[_Worker] = []
    try:
        for b in info:  # one at a time, so load times do not overlap
            w = _Worker(b["path"], b["adapter"], threads, spinning)
            workers.append(w)
            b.update(load_s=w.ready["load_s"], threads=w.ready["threads"],
                     rss_start_bytes=w.ready["mem_start"]["peak"], rss_load_bytes=w.ready["mem_load"]["peak"])
        for batch, seq in shapes:
            for w in workers:
                w.call(op="shape", batch=batch, seq=seq, seed=seed)
                if warmup:
                    w.call(op="run", n=warmup)
            for r in range(rounds):
                for i, w in enumerate(workers):
                    if settle_ms:
                        time.sleep(settle_ms / 1e3)
                    samples.setdefault((i, batch, seq), []).append(w.call(op="run", n=1)["ms"][0])
                    schedule.append({"bundle": i, "batch": batch, "seq": seq, "round": r})
                    done += 1
                    if progress:
                        progress(done, total, f"{info[i]['label']} {batch}x{seq}")
            for i, w in enumerate(workers):
                mem = w.call(op="mem")
                ms = np.asarray(samples[(i, batch, seq)])
                p50, p95, p99 = np.percentile(ms, [50, 95, 99])
                rows.append({
                    "bundle": i, "label": info[i]["label"], "batch": batch, "seq": seq, "n": len(ms),
                    "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": ms.mean(), "min_ms": ms.min(),
                    "throughput_seq_s": batch / (p50 / 1e3), "size_bytes": info[i]["size_bytes"],
                    "rss_load_bytes": info[i]["rss_load_bytes"], "rss_peak_bytes": mem["peak"],
                    "rss_now_bytes": mem["now"], "samples_ms": ms.tolist(),
                })
    finally:
        for w in workers:
            w.close()
    speedups = []
    for kind, base, cand in _comparisons(info):
        for batch, seq in shapes:
            a, b = np.asarray(samples[(base, batch, seq)]), np.asarray(samples[(cand, batch, seq)])
            speedups.append({"kind": kind, "baseline": base, "candidate": cand, "batch": batch, "seq": seq,
                             "speedup": float(np.median(a) / np.median(b)),
                             "speedup_paired": float(np.median(a / b))})  # round by round: drift cancels
    cpu = detect_isa()
    return _plain({
        "edgelora_bench": RESULT_VERSION,
        "machine": {"isa": cpu.isa, "model": cpu.model, "machine": cpu.machine, "physical_cores": cpu.physical_cores,
                    "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "onnxruntime": ort.__version__,
        "settings": {"batches": list(batches), "seqs": list(seqs), "rounds": rounds, "warmup": warmup,
                     "threads": threads if threads is not None else cpu.physical_cores, "spinning": spinning,
                     "settle_ms": settle_ms, "seed": seed, "method": METHOD},
        "bundles": info, "rows": rows, "speedups": speedups, "schedule": schedule,
    })


def _plain(obj):
    """numpy scalars -> Python numbers, so json.dump takes the result as is."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


# -- reporting ------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(result: dict) -> str:
    """The result as a terminal table: one row per bundle and shape, then the speed-ups."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"{m['model']} ({m['isa']}, {m['physical_cores']} physical cores), onnxruntime {result['onnxruntime']}, "
        f"{s['threads']} threads, spinning " + (f"on ({s['settle_ms']:g} ms settle before each run)"
                                                if s["spinning"] else "off"),
        f"one process per bundle, interleaved: {s['rounds']} rounds per shape after {s['warmup']} warm-up runs",
        "",
    ]
    width = max(len("bundle"), *(len(b["label"]) for b in result["bundles"]))
    head = (f"{'bundle':<{width}}  {'mode':<10}  {'prec':<4}  {'shape':>7}  {'p50 ms':>8}  {'p95 ms':>8}  "
            f"{'p99 ms':>8}  {'seq/s':>8}  {'size MB':>7}  {'RSS MB':>7}")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        b = result["bundles"][r["bundle"]]
        lines.append(
            f"{b['label']:<{width}}  {b['mode']:<10}  {str(b['precision']):<4}  {r['batch']:>3}x{r['seq']:<3}  "
            f"{r['p50_ms']:>8.3f}  {r['p95_ms']:>8.3f}  {r['p99_ms']:>8.3f}  {r['throughput_seq_s']:>8.1f}  "
            f"{_mb(r['size_bytes']):>7}  {_mb(r['rss_peak_bytes']):>7}"
        )
    if result["speedups"]:
        lines += ["", "speed-up (ratio of p50s; median of per-round ratios in brackets)"]
        for sp in result["speedups"]:
            base, cand = (result["bundles"][sp[k]]["label"] for k in ("baseline", "candidate"))
            lines.append(f"  {sp['kind']:<17}  {cand} over {base}  {sp['batch']}x{sp['seq']}:  "
                         f"{sp['speedup']:.2f}x ({sp['speedup_paired']:.2f}x)")
    return "\n".join(lines)


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write the result as JSON atomically: a temp file beside `path`, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(result: dict, path_png: str | os.PathLike) -> None:
    """p50 latency bars (p95 whiskers) per shape and bundle, speed-ups written above candidates; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeloraError("bench --plot needs matplotlib; pip install matplotlib (or edgelora[dev])") from None
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in result["rows"]))
    bundles = result["bundles"]
    rows = {(r["bundle"], r["batch"], r["seq"]): r for r in result["rows"]}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(2.2 + 1.1 * len(bundles) * len(shapes), 4.2), squeeze=False)
    for ax, (batch, seq) in zip(axes[0], shapes):
        p50 = [rows[(i, batch, seq)]["p50_ms"] for i in range(len(bundles))]
        p95 = [rows[(i, batch, seq)]["p95_ms"] for i in range(len(bundles))]
        x = np.arange(len(bundles))
        ax.bar(x, p50, color=[colors[i % len(colors)] for i in x],
               yerr=[np.zeros(len(x)), np.subtract(p95, p50)], capsize=3)
        stacked = [0] * len(bundles)  # several comparisons on one bar stack upwards
        for sp in result["speedups"]:
            if (sp["batch"], sp["seq"]) == (batch, seq):
                c = sp["candidate"]
                ax.annotate(f"{sp['kind'].split('/')[0]} {sp['speedup']:.2f}x", (c, p95[c]), textcoords="offset points",
                            xytext=(0, 4 + 10 * stacked[c]), ha="center", fontsize=7)
                stacked[c] += 1
        ax.set_title(f"batch {batch} x seq {seq}", fontsize=9)
        ax.set_xticks(x, [b["label"] for b in bundles], rotation=30, ha="right", fontsize=7)
        ax.margins(y=0.15)
    axes[0][0].set_ylabel("latency p50 (ms), whisker p95")
    m = result["machine"]
    fig.suptitle(f"{m['model']} ({m['isa']}), onnxruntime {result['onnxruntime']}, "
                 f"{result['settings']['threads']} threads, one process per bundle, spinning "
                 f"{'on' if result['settings']['spinning'] else 'off'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)


# -- CLI glue (registered by edgelora.cli) --------------------------------------------------------


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
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per bundle and shape (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per bundle and shape first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--adapter", default=None, help="adapter for bundles that name none with @")
    parser.add_argument("--spin", action="store_true",
                        help="let ORT threads spin-wait between runs (adds a 200 ms settle pause before each run)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the full result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also write a latency chart")


def _stderr_progress(done: int, total: int, message: str) -> None:
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        sys.stderr.write(f"\r[{bar:<30}] {done}/{total} {message:<40}")
        if done == total:
            sys.stderr.write("\n")
    elif done == total or done % max(1, total // 10) == 0:
        sys.stderr.write(f"bench: {done}/{total} runs\n")
    sys.stderr.flush()


def bench_command(args: argparse.Namespace) -> int:
    """`edgelora bench`: table on stdout, progress on stderr; EdgeloraError propagates to the CLI."""
    result = run_benchmark(args.bundles, batches=args.batch, seqs=args.seq, rounds=args.rounds,
                           warmup=args.warmup, adapter=args.adapter, threads=args.threads,
                           spinning=args.spin, progress=_stderr_progress)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
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
    """`edgelora run`: prints a JSON list of {"text", "label", "score", "scores"}."""
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
    rt = Runtime(args.bundle, intra_op_threads=args.threads)
    preds = rt.predict(texts, adapter=args.adapter, adapters=per_row)
    rows = [{"text": t, **({"adapter": a} if per_row else {}), **p} for t, a, p in zip(texts, per_row or texts, preds)]
    print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--worker", metavar="BUNDLE", default=None)
    pre.add_argument("--adapter", default=None)
    pre.add_argument("--threads", type=int, default=None)
    pre.add_argument("--no-spin", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.worker is not None:  # internal: the harness's worker process
        return _worker_main(known.worker, known.adapter, known.threads, not known.no_spin)
    parser = argparse.ArgumentParser(prog="python -m edgelora.runtime.bench",
                                     description="benchmark bundles on this CPU")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return bench_command(args)
    except EdgeloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
