"""SmolLM2-135M decoder bundles, fp32 vs int8: decode rate, first-token and 256-token prefill latency,
file sizes, and how close int8's greedy tokens and logits stay to fp32's.

Exports both bundles in a child process (or reuses --bundles DIR/{fp32,int8}-ATTENTION), then times
one session at a time (two live sessions steal each other's cores, see DESIGN.md): batch 1, greedy, a
chat prompt, 64 new tokens, the median of --runs runs, --threads intra-op threads. The generation loop is a minimal numpy one over the
graph's cache inputs and outputs, with no sampling and no tokenizer work in the timed region.

    python benchmarks/decoder_speed.py --threads 2 --runs 5 --json decoder_speed.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.atomic import write_text_atomic
from edgelora.exporters.decoder_validate import position_ids

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about a lighthouse in winter."}],
    [{"role": "system", "content": "You turn requests into JSON."},
     {"role": "user", "content": "Switch off the kitchen lights at 10 pm."}],
]


def session(bundle: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])


def generate(sess: ort.InferenceSession, manifest: dict, prompt: list[int], steps: int,
             ban: list[int]) -> tuple[list[int], list[np.ndarray], float, float]:
    """Greedy batch-1 decoding with end-of-sequence banned: (tokens, logits per step, first-token seconds,
    decode seconds for the remaining steps)."""
    gen, names = manifest["generation"], manifest["inputs"][3:]
    empty = np.zeros((1, gen["num_kv_heads"], 0, gen["head_dim"]), np.float32)
    mask = np.ones((1, len(prompt)), np.int64)
    feeds = {"input_ids": np.asarray([prompt], np.int64), "attention_mask": mask,
             "position_ids": position_ids(mask, len(prompt)), **{n: empty for n in names}}
    tokens, logits, first = [], [], 0.0
    start = time.perf_counter()
    for step in range(steps):
        out = sess.run(None, feeds)
        last = out[0][0, -1]
        logits.append(last)
        choice = last.copy()
        choice[ban] = -np.inf
        tokens.append(int(choice.argmax()))
        if step == 0:
            first = time.perf_counter() - start
            start = time.perf_counter()
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        feeds = {"input_ids": np.asarray([[tokens[-1]]], np.int64), "attention_mask": mask,
                 "position_ids": position_ids(mask, 1), **dict(zip(names, out[1:]))}
    return tokens, logits, first, time.perf_counter() - start


def prefill_seconds(sess: ort.InferenceSession, manifest: dict, length: int, runs: int) -> float:
    gen = manifest["generation"]
    empty = np.zeros((1, gen["num_kv_heads"], 0, gen["head_dim"]), np.float32)
    ids = np.random.default_rng(0).integers(100, gen["vocab_size"] - 100, size=(1, length))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length)[None],
             **{n: empty for n in manifest["inputs"][3:]}}
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=Path(tempfile.gettempdir()) / "edgelora-decoder-speed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", default="invariant", help="the graph's attention core (decoder_graph.ATTENTION_CORES)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from edgelora.embedded import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)
    prompts = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for m in PROMPTS]
    results: dict = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                     "attention": args.attention,
                     "onnxruntime": ort.__version__, "prompt_tokens": len(prompts[0]), "new_tokens": args.new_tokens}
    greedy: dict = {}
    for precision in ("fp32", "int8"):
        bundle = args.bundles / f"{precision}-{args.attention}"
        if not (bundle / "manifest.json").is_file():  # in a child: torch's threads and memory would skew the timing
            code = "import sys; from edgelora.exporters.decoder_export import export_decoder; " \
                   "export_decoder('smollm2', sys.argv[1], precision=sys.argv[2], attention=sys.argv[3])"
            subprocess.run([sys.executable, "-c", code, str(bundle), precision, args.attention], check=True)
        manifest = json.loads((bundle / "manifest.json").read_text())
        ban = manifest["generation"]["eos_token_ids"]
        sess = session(bundle, args.threads)
        generate(sess, manifest, prompts[0], 4, ban)  # warm-up
        rates, firsts = [], []
        for _ in range(args.runs):
            _, _, first, rest = generate(sess, manifest, prompts[0], args.new_tokens, ban)
            rates.append((args.new_tokens - 1) / rest)
            firsts.append(first)
        greedy[precision] = [generate(sess, manifest, p, args.new_tokens, ban)[:2] for p in prompts]
        size = sum((bundle / f).stat().st_size for f in manifest["files"] if f.startswith("model.onnx"))
        results[precision] = {"decode_tokens_per_s": float(np.median(rates)), "decode_runs": rates,
                              "first_token_ms": 1000 * float(np.median(firsts)),
                              "prefill_256_ms": 1000 * prefill_seconds(sess, manifest, 256, args.runs),
                              "model_mb": size / 1e6}
        del sess
        gc.collect()
    agreement = []
    for (t8, l8), (t32, l32) in zip(greedy["int8"], greedy["fp32"]):
        same = np.asarray(t8) == np.asarray(t32)
        agreement.append({"tokens_equal": float(same.mean()),
                          "first_difference": int(np.argmin(same)) if not same.all() else None,
                          "first_step_logits_rel_error": float(np.abs(l8[0] - l32[0]).max() / np.abs(l32[0]).max())})
    results["int8_vs_fp32"] = agreement
    print(f"{'':6} {'decode tok/s':>12} {'first token ms':>15} {'prefill 256 ms':>15} {'model MB':>9}")
    for precision in ("fp32", "int8"):
        r = results[precision]
        print(f"{precision:6} {r['decode_tokens_per_s']:12.1f} {r['first_token_ms']:15.1f} "
              f"{r['prefill_256_ms']:15.1f} {r['model_mb']:9.1f}")
    print("int8 vs fp32 greedy:", json.dumps(agreement))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
