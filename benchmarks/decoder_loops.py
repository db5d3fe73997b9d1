"""Graph or runtime: our gqa bundle and ORT GenAI's model against each other in one decode loop, and GenAI in its own.

Three candidates, each in a process of its own, alternating for --rounds rounds: "ours" (a `gqa` bundle decoded
the way `Generator` decodes it: IOBinding, one cache buffer per tensor, runtime/shared_kv.py), "genai-graph"
(ORT GenAI's model.onnx in that very loop: plain ONNX Runtime, its inputs, the same buffers) and "genai" (the
same model through onnxruntime-genai's own C++ generator). Each decodes --steps greedy tokens after a --prompt
token prompt (seeded ids), --repeats times after a warm-up; prints the median step of each, its tokens/s and
its ratio to "genai". ours / genai-graph compares the graphs; genai-graph / genai compares the loops.

    python benchmarks/decoder_loops.py --ours runs/bundles/smollm2-int8-gqa --genai runs/peers/genai-int8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decoder_ab import decode_times, run_child  # noqa: E402  (the decode loop and the timing-child runner)

from edgelora.runtime.shared_kv import shares_kv  # noqa: E402

CANDIDATES = ("ours", "genai-graph", "genai")


def _prompt(prompt: int) -> np.ndarray:
    return np.random.default_rng(0).integers(100, 20000 - 100, (1, prompt)).astype(np.int64)


def ort_loop(model: Path, threads: int, prompt: int, steps: int, repeats: int) -> list[float]:
    """Step times (s) of greedy decoding through plain ONNX Runtime with one cache buffer per tensor: the loop
    of benchmarks/decoder_ab.py, on the same prompt as `genai_loop`."""
    return decode_times(model, threads, prompt, steps, repeats, shared=True, vocab=20000)[1]


def genai_loop(model_dir: Path, threads: int, prompt: int, steps: int, repeats: int) -> list[float]:
    """Step times (s) of onnxruntime-genai's own greedy loop on its model directory (its config's threads set)."""
    import onnxruntime_genai as og

    config_file = model_dir / "genai_config.json"
    original = config_file.read_text()
    config = json.loads(original)
    config["model"]["decoder"].setdefault("session_options", {}).update(intra_op_num_threads=threads,
                                                                        inter_op_num_threads=1)
    config_file.write_text(json.dumps(config, indent=2))
    try:  # GenAI reads its threads from the directory's config only: set for the load, then put back
        model = og.Model(str(model_dir))
    finally:
        config_file.write_text(original)
    ids = _prompt(prompt)[0].tolist()
    times: list[float] = []
    for rep in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + steps + 1, min_length=prompt + steps + 1, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # the prompt's run
        gen.get_next_tokens()
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()
            gen.get_next_tokens()
            if rep:
                times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=Path, help="a bundle exported with attention='gqa'")
    parser.add_argument("--genai", type=Path, help="ORT GenAI's model-builder output directory (genai_config.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per child, after one warm-up")
    parser.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours is None or not (args.ours / "manifest.json").is_file():
        parser.error(f"--ours {args.ours}: no manifest.json there; pass a bundle exported with attention='gqa'")
    try:
        graph = json.loads((args.ours / "manifest.json").read_text()).get("graph")
    except (OSError, ValueError, AttributeError) as e:
        parser.error(f"--ours {args.ours / 'manifest.json'}: unreadable ({e}); re-export the bundle")
    if not shares_kv(graph):
        parser.error(f"--ours {args.ours}: not exported with attention='gqa'; export it with --attention gqa")
    if args.genai is None or not (args.genai / "genai_config.json").is_file():
        parser.error(f"--genai {args.genai}: no genai_config.json there; pass ORT GenAI's model-builder output")
    if args.child:
        run = {"ours": lambda: ort_loop(args.ours / "model.onnx", args.threads, args.prompt, args.steps, args.repeats),
               "genai-graph": lambda: ort_loop(args.genai / "model.onnx", args.threads, args.prompt, args.steps,
                                               args.repeats),
               "genai": lambda: genai_loop(args.genai, args.threads, args.prompt, args.steps, args.repeats)}
        print(json.dumps(float(np.median(run[args.child]()))))
        return 0
    medians: dict[str, list[float]] = {c: [] for c in CANDIDATES}
    loads = []
    for _ in range(args.rounds):
        for c in CANDIDATES:
            loads.append(os.getloadavg()[0])
            cmd = [sys.executable, __file__, "--child", c, "--ours", str(args.ours), "--genai", str(args.genai),
                   "--threads", str(args.threads), "--prompt", str(args.prompt), "--steps", str(args.steps),
                   "--repeats", str(args.repeats)]
            medians[c].append(run_child(parser, c, cmd))
    print(f"P={args.prompt}, {args.steps} decode steps, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    base = float(np.median(medians["genai"]))
    for c in CANDIDATES:
        step = float(np.median(medians[c]))
        print(f"  {c:<12} step {1e3 * step:6.2f} ms   {1 / step:6.1f} tok/s   {base / step:.3f}x genai")
    return 0


if __name__ == "__main__":
    sys.exit(main())
