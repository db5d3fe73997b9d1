"""Where a decoder bundle's time goes: ORT's profiler per op type for a P-token prefill and for decode steps,
beside the bytes of weights each decoded token reads and the machine's measured memory bandwidth.

One session (intra-op threads --threads), a synthetic prompt of --prompt tokens (seeded ids), then --steps
greedy decode steps through the cache. Profiling is on for the runs it reports; the decode rate is also timed
in a second, unprofiled pass, so the profiler's own cost is visible. Prints a table and, with --json, writes
the figures.

    python benchmarks/decoder_profile.py runs/bundles/smollm2-int8 --prompt 256 --steps 32 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgelora.atomic import write_text_atomic


def bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` numpy copy rate in GB/s, counting the bytes read and the bytes written."""
    src = np.ones(megabytes * 2**20 // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_token(model_path: Path) -> dict[str, int]:
    """Bytes of initializers one decode step reads: every matmul's weights (and scales) in full, one row of
    each gathered table (embeddings, rotary) per token; the rest (norm weights, shapes) in full."""
    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in sizes}
    gathered |= {t for n in model.graph.node if n.op_type == "RotaryEmbedding" for t in n.input[1:3]}  # row lookups
    shared = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"} & gathered  # tied head: read in full
    out = {"matmul_weights": 0, "gathered_rows": 0, "other": 0}
    for name, size in sizes.items():
        init = next(t for t in model.graph.initializer if t.name == name)
        if name in gathered and name not in shared:
            out["gathered_rows"] += size // max(int(init.dims[0]), 1)
        elif len(init.dims) >= 2 or name.endswith(".scales"):
            out["matmul_weights"] += size
        else:
            out["other"] += size
    out["total"] = sum(out.values())
    return out


def _session(model: Path, threads: int, profile_prefix: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _feeds(manifest: dict, prompt: int, seed: int) -> dict[str, np.ndarray]:
    gen = manifest["generation"]
    ids = np.random.default_rng(seed).integers(100, gen["vocab_size"] - 100, size=(1, prompt))
    empty = np.zeros((1, gen["num_kv_heads"], 0, gen["head_dim"]), np.float32)
    return {"input_ids": ids, "attention_mask": np.ones((1, prompt), np.int64),
            "position_ids": np.arange(prompt, dtype=np.int64)[None],
            **{n: empty for n in manifest["inputs"][3:]}}


def _decode(sess: ort.InferenceSession, manifest: dict, feeds: dict, steps: int) -> tuple[float, list[float]]:
    """The prefill's seconds and each decode step's seconds (session.run plus the feed bookkeeping)."""
    names = manifest["inputs"][3:]
    outputs = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    out = sess.run(outputs, feeds)
    prefill = time.perf_counter() - t0
    mask, pos = feeds["attention_mask"], feeds["position_ids"][:, -1:]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = out[0][:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos + 1
        step = {"input_ids": token, "attention_mask": mask, "position_ids": pos, **dict(zip(names, out[1:]))}
        if "logits_to_keep" in feeds:
            step["logits_to_keep"] = feeds["logits_to_keep"]
        out = sess.run(outputs, step)
        times.append(time.perf_counter() - t0)
    return prefill, times


def per_op(profile: Path) -> list[dict]:
    """Per run (in order), node time per op type in microseconds, from ORT's profile JSON."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    totals: list[dict] = [defaultdict(float) for _ in runs]
    counts: list[dict] = [defaultdict(int) for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0:
            totals[i][e["args"]["op_name"]] += e["dur"]
            counts[i][e["args"]["op_name"]] += 1
    return [{"run_us": r["dur"], "ops": dict(t), "nodes": dict(c)} for r, t, c in zip(runs, totals, counts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=int, default=0,
                        help="feed logits_to_keep (when the graph has it): 0 = all positions")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    model = args.bundle / "model.onnx"
    feeds = _feeds(manifest, args.prompt, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, args.threads, str(Path(tmp) / "prof"))
        if args.keep and "logits_to_keep" in {i.name for i in sess.get_inputs()}:
            feeds["logits_to_keep"] = np.asarray(args.keep, np.int64)
        _decode(sess, manifest, feeds, 2)  # warm-up: 3 runs
        _decode(sess, manifest, feeds, args.steps)
        runs = per_op(Path(sess.end_profiling()))[3:]
    plain = _session(model, args.threads, None)
    _decode(plain, manifest, feeds, 2)
    prefill_s, steps_s = _decode(plain, manifest, feeds, args.steps)
    prefill, decode = runs[0], runs[1:]
    decode_ops: dict[str, float] = defaultdict(float)
    for r in decode:
        for op, us in r["ops"].items():
            decode_ops[op] += us / len(decode)
    weights = weight_bytes_per_token(model)
    bw = bandwidth_gbs()
    step_ms = float(np.median(steps_s)) * 1e3
    result = {
        "bundle": str(args.bundle), "precision": manifest.get("precision"),
        "attention": (manifest.get("graph") or {}).get("attention"),
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "load_average": os.getloadavg(), "onnxruntime": ort.__version__,
        "prompt_tokens": args.prompt, "decode_steps": args.steps,
        "prefill_ms": prefill_s * 1e3, "decode_step_ms_median": step_ms, "decode_tok_s": 1e3 / step_ms,
        "profiled_prefill_ms": prefill["run_us"] / 1e3,
        "profiled_decode_step_ms": float(np.median([r["run_us"] for r in decode])) / 1e3,
        "prefill_ops_ms": {k: v / 1e3 for k, v in sorted(prefill["ops"].items(), key=lambda kv: -kv[1])},
        "decode_ops_ms": {k: v / 1e3 for k, v in sorted(decode_ops.items(), key=lambda kv: -kv[1])},
        "decode_nodes": sum(decode[0]["nodes"].values()) if decode else 0,
        "weight_bytes_per_token": weights, "copy_bandwidth_gbs": bw,
        "bandwidth_bound_tok_s": bw * 1e9 / weights["total"],
    }
    print(f"{args.bundle}  ({result['precision']}, attention {result['attention']}, {args.threads} threads, "
          f"load {result['load_average'][0]:.2f}, onnxruntime {ort.__version__})")
    print(f"prefill P={args.prompt}: {result['prefill_ms']:.1f} ms   decode: {step_ms:.2f} ms/token "
          f"({result['decode_tok_s']:.1f} tok/s), {result['decode_nodes']} nodes per step")
    print(f"weights read per token {weights['total'] / 1e6:.1f} MB; numpy copy {bw:.1f} GB/s -> bound "
          f"{result['bandwidth_bound_tok_s']:.0f} tok/s")
    for title, ops, total in (("prefill", result["prefill_ops_ms"], result["profiled_prefill_ms"]),
                              ("decode step", result["decode_ops_ms"], result["profiled_decode_step_ms"])):
        node_sum = sum(ops.values())
        print(f"\n{title}: run {total:.2f} ms, nodes {node_sum:.2f} ms (the rest: scheduling between nodes)")
        for op, ms in list(ops.items())[: args.top]:
            print(f"  {op:34s} {ms:9.3f} ms  {100 * ms / node_sum:5.1f}%")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
