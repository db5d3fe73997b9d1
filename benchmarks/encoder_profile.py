"""Where an encoder bundle's time goes: ONNX Runtime's profiler, node time per op type and node count per run.

A switchable bundle runs with its first adapter active (RunOptions, as `Runtime` runs it), a merged one as it
is; synthetic ids of --batch x --seq, --runs profiled runs after 20 warm-up runs. Comparing a switchable bundle
with its merged twin shows what the adapter branches cost (their Gathers, MatMuls and joining Adds).

    python benchmarks/encoder_profile.py runs/bundles/merged-intent-int8 runs/bundles/switchable-int8 --batch 1 --seq 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(bundle: Path, batch: int, seq: int, threads: int, runs: int) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(bundle / "model.onnx"), so, providers=["CPUExecutionProvider"])
        options, adapter = ort.RunOptions(), None
        if manifest["mode"] == "switchable" and manifest["adapters"]:
            adapter = ort.LoraAdapter()
            adapter.Load(str(bundle / manifest["adapters"][0]["file"]))
            options.add_active_adapter(adapter)
        feeds = {i.name: (np.ones if i.name == "attention_mask" else np.zeros)((batch, seq), np.int64)
                 for i in sess.get_inputs()}
        feeds["input_ids"] = np.random.default_rng(0).integers(1000, 2000, (batch, seq))
        for _ in range(20):
            sess.run(None, feeds, options)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds, options)
        per_run = (time.perf_counter() - t0) / runs
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    counts: Counter = Counter()
    total_runs = sum(e.get("name") == "model_run" for e in events)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] += e["dur"]
            counts[e["args"]["op_name"]] += 1
    return {"bundle": str(bundle), "mode": manifest["mode"], "ms_per_run_profiled": per_run * 1e3,
            "nodes_per_run": sum(counts.values()) // total_runs,
            "node_ms": sum(totals.values()) / total_runs / 1e3,
            "ops_ms": {op: us / total_runs / 1e3 for op, us in sorted(totals.items(), key=lambda kv: -kv[1])},
            "ops_count": {op: n // total_runs for op, n in counts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    print(f"{args.batch}x{args.seq}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for bundle in args.bundles:
        r = profile(bundle, args.batch, args.seq, args.threads, args.runs)
        print(f"{bundle.name} ({r['mode']}): {r['ms_per_run_profiled']:.2f} ms a run (profiled), "
              f"{r['nodes_per_run']} nodes, node time {r['node_ms']:.2f} ms")
        for op, ms in list(r["ops_ms"].items())[: args.top]:
            print(f"  {op:32s} {ms:7.3f} ms  x{r['ops_count'][op]}")


if __name__ == "__main__":
    main()
