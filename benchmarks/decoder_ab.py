"""A/B timing of decoder bundles (or of one bundle with and without `logits_to_keep`), interleaved.

Each variant runs in a process of its own (two live sessions in one process steal each other's cores),
alternating A B A B ... for --rounds rounds; a child loads the session, warms it up, then times a P-token
prefill (--prompt, synthetic seeded ids) and --steps greedy decode steps at batch 1 through the cache with a
minimal numpy loop. Prints each variant's median prefill ms and decode tok/s, the ratio to the first, and
the load average, so a busy machine shows in the figures.

    python benchmarks/decoder_ab.py runs/bundles/int8-old runs/bundles/int8-new:keep=1 --rounds 5
    python benchmarks/decoder_ab.py GQA:keep=1 GQA:keep=1,kv=shared --prompt 1024 --steps 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def decode_times(model: Path, threads: int, prompt: int, steps: int, repeats: int, *, keep: int = 0,
                 shared: bool = True, vocab: int = 20000) -> tuple[list[float], list[float]]:
    """Seconds of each prefill and of each greedy decode step at batch 1 through plain ONNX Runtime, for any
    decoder graph of the past_key_values / present convention (ours, or ORT GenAI's model.onnx, whose cache
    dims come from its genai_config.json): `repeats` passes after one warm-up, a P-token prompt of seeded ids
    below `vocab`, then `steps` steps, the cache copied through the outputs or (`shared`) written in place in
    one buffer per tensor (runtime/shared_kv.py; GroupQueryAttention graphs). `keep` feeds logits_to_keep where
    the graph takes it."""
    import onnxruntime as ort

    from edgelora.runtime.shared_kv import SharedKV

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [n.replace("past_key_values.", "present.") for n in past]
    heads, dim = inputs[past[0]].shape[1], inputs[past[0]].shape[3]
    if not isinstance(heads, int) or not isinstance(dim, int):  # symbolic in GenAI's graph: its config has them
        decoder = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]
        heads, dim = decoder["num_key_value_heads"], decoder["head_size"]
    optional = {i.name for i in sess.get_overridable_initializers()}
    extra = {"logits_to_keep": np.asarray(keep, np.int64)} if keep and "logits_to_keep" in optional else {}
    ids = np.random.default_rng(0).integers(100, max(101, vocab - 100), size=(1, prompt)).astype(np.int64)
    prefills: list[float] = []
    times: list[float] = []
    for rep in range(repeats + 1):  # the first pass warms up
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, prompt), np.int64),
                 **{n: np.zeros((1, heads, 0, dim), np.float32) for n in past}, **extra}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(prompt, dtype=np.int64)[None]
        t0 = time.perf_counter()
        out = sess.run(["logits", *present], feeds)
        if rep:
            prefills.append(time.perf_counter() - t0)
        kv = SharedKV.holding(sess, past, present, out[1:], steps) if shared else None
        logits, cache, T = out[0], out[1:], prompt
        for _ in range(steps):
            t0 = time.perf_counter()
            step = {"input_ids": logits[:, -1].argmax(-1)[:, None].astype(np.int64),
                    "attention_mask": np.ones((1, T + 1), np.int64)}
            if "position_ids" in inputs:
                step["position_ids"] = np.full((1, 1), T, np.int64)
            if kv is not None:
                logits = kv.step(step)
            else:
                logits, *cache = sess.run(["logits", *present], {**step, **dict(zip(past, cache)), **extra})
            T += 1
            if rep:
                times.append(time.perf_counter() - t0)
    return prefills, times


def child(bundle: Path, keep: int, shared: bool, prompt: int, steps: int, threads: int, repeats: int) -> dict:
    vocab = json.loads((bundle / "manifest.json").read_text())["generation"]["vocab_size"]
    prefills, steps_s = decode_times(bundle / "model.onnx", threads, prompt, steps, repeats, keep=keep, shared=shared,
                                     vocab=vocab)
    return {"prefill_ms": 1e3 * float(np.median(prefills)), "decode_tok_s": 1 / float(np.median(steps_s))}


def run_child(parser: argparse.ArgumentParser, label: str, cmd: list[str]):
    """One timing child's JSON answer (its last stdout line); a failed child is one line naming it and its error."""
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        parser.error(f"{label}: the timing child failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def variant(parser: argparse.ArgumentParser, text: str) -> tuple[str, tuple[str, str]]:
    """BUNDLE[:keep=N,kv=copy|shared] checked here, each mistake one line naming the variant and the fix."""
    from edgelora.runtime.shared_kv import shares_kv

    path, _, opts = text.partition(":")
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        parser.error(f"{text}: {manifest} not found; pass a decoder bundle directory")
    opt: dict[str, str] = {}
    for o in filter(None, opts.split(",")):
        key, eq, value = o.partition("=")
        if not eq or key not in ("keep", "kv"):
            parser.error(f"{text}: option {o!r}; options are keep=N and kv=copy|shared")
        opt[key] = value
    keep, kv = opt.get("keep", "0"), opt.get("kv", "copy")
    if not keep.isdigit():
        parser.error(f"{text}: keep={keep}; pass a count of positions (0: all)")
    if kv not in ("copy", "shared"):
        parser.error(f"{text}: kv={kv}; pass kv=copy or kv=shared")
    if kv == "shared" and not shares_kv(json.loads(manifest.read_text()).get("graph")):
        parser.error(f"{text}: kv=shared needs a bundle exported with attention='gqa'; drop kv=shared")
    return path, (keep, kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="BUNDLE or BUNDLE:OPTS, OPTS comma-separated: keep=N (feed "
                        "logits_to_keep=N), kv=shared (decode into one cache buffer per tensor; gqa bundles)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="prefill + decode passes per child")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), args.child[2] == "shared", args.prompt,
                               args.steps, args.threads, args.repeats)))
        return
    parsed = [(v, *variant(parser, v)) for v in args.variants]
    results: dict[str, list[dict]] = {v: [] for v, _, _ in parsed}
    loads = []
    for _ in range(args.rounds):
        for v, path, (keep, kv) in parsed:
            loads.append(os.getloadavg()[0])
            results[v].append(run_child(parser, v, [sys.executable, __file__, "--child", path, keep, kv, "--prompt",
                                                    str(args.prompt), "--steps", str(args.steps), "--threads",
                                                    str(args.threads), "--repeats", str(args.repeats)]))
    base = None
    print(f"P={args.prompt}, {args.steps} decode steps, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    for v, _, _ in parsed:
        pre = float(np.median([r["prefill_ms"] for r in results[v]]))
        tok = float(np.median([r["decode_tok_s"] for r in results[v]]))
        base = base or (pre, tok)
        print(f"  {v:50s} prefill {pre:8.1f} ms ({pre / base[0]:.3f}x)   decode {tok:6.1f} tok/s "
              f"({tok / base[1]:.3f}x)")


if __name__ == "__main__":
    main()
