"""SmolLM2-135M switchable decoder bundles: what the LoRA slots cost. Decode rate of fp32 and int8 bundles with no
adapter, with an adapter active, and for a batch of 4 mixing adapters row by row (one session run per step),
against the merged int8 bundle of the plain base (no slots at all); and the bundles' file sizes.

Exports the bundles once into --dir (two random rank-8 / rank-16 LoRA adapters on q/k/v/o, small enough to keep
the model's answers), then times each case in a process of its own, the cases alternating over --rounds rounds
(two live sessions steal each other's cores, see DESIGN.md). Greedy, a chat prompt, 64 new tokens through
`Runtime.generate` / `Generator.generate_batch`; the rate is decode steps (after the first token) per second of
the decode loop, times the rows.

    python benchmarks/decoder_switchable_speed.py --dir /tmp/smol-sw --threads 2 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a haiku about a lighthouse in winter."}]
NEW_TOKENS = 64
CASES = {  # name -> (bundle, adapters of the rows; one row: Runtime.generate)
    "merged int8, plain base": ("merged-int8", [None]),
    "switchable int8, no adapter": ("switchable-int8", [None]),
    "switchable int8, adapter a": ("switchable-int8", ["a"]),
    "switchable fp32, no adapter": ("switchable-fp32", [None]),
    "switchable fp32, adapter a": ("switchable-fp32", ["a"]),
    "switchable int8, batch of 4 on a": ("switchable-int8", ["a", "a", "a", "a"]),
    "switchable int8, batch of 4 mixing a, b, none, a": ("switchable-int8", ["a", "b", None, "a"]),
}


def export(root: Path) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from edgelora.exporters.decoder_export import export_decoder
    from edgelora.model import load_causal_lm

    names = ("a", "b", "switchable-int8", "switchable-fp32", "merged-int8")
    if all((root / n).is_dir() for n in names):
        return
    model, _ = load_causal_lm("smollm2")
    adapters = {}
    for name, seed, rank in (("a", 1, 8), ("b", 2, 16)):
        if not (root / name).is_dir():
            torch.manual_seed(seed)
            peft = get_peft_model(copy.deepcopy(model), LoraConfig(
                r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
            with torch.no_grad():
                for key, p in peft.named_parameters():
                    if "lora_B" in key:
                        p.normal_(std=0.002)
            peft.save_pretrained(root / name)
        adapters[name] = root / name
    for precision in ("int8", "fp32"):
        if not (root / f"switchable-{precision}").is_dir():
            export_decoder("smollm2", root / f"switchable-{precision}", adapters=adapters, mode="switchable",
                           precision=precision)
    if not (root / "merged-int8").is_dir():
        export_decoder("smollm2", root / "merged-int8", precision="int8")


def measure(bundle: Path, rows: list, threads: int) -> dict:
    """One case in this process: a warm-up call, then one timed call."""
    from edgelora.runtime import Runtime

    rt = Runtime(bundle, intra_op_threads=threads)
    gen = rt.generator()

    def once() -> None:
        if len(rows) == 1:
            rt.generate(PROMPT, adapter=rows[0], max_new_tokens=NEW_TOKENS)
        else:
            gen.generate_batch([PROMPT] * len(rows), adapters=rows, max_new_tokens=NEW_TOKENS)

    once()
    once()
    s = gen.stats
    return {"decode_steps": s.decode_runs, "rows": len(rows), "tokens": s.new_tokens,
            "tok_s": len(rows) * s.decode_runs / s.decode_s, "first_token_ms": 1000 * s.prefill_s}


def sizes(root: Path) -> dict:
    out = {}
    for name in ("merged-int8", "switchable-int8", "switchable-fp32"):
        d = root / name
        files = {p.relative_to(d).as_posix(): p.stat().st_size for p in d.rglob("*") if p.is_file()}
        out[name] = {"model.onnx_MB": round(files.get("model.onnx", 0) / 2**20, 1),
                     "adapters_KB": {k: round(v / 1024) for k, v in files.items() if k.endswith(".onnx_adapter")},
                     "total_MB": round(sum(files.values()) / 2**20, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        bundle, rows = CASES[args.child]
        print(json.dumps(measure(args.dir / bundle, rows, args.threads)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    export(args.dir)
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--threads", str(args.threads),
                                  "--child", case], capture_output=True, text=True, check=True)
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = {c: {"tok_s_median": round(statistics.median(r["tok_s"] for r in rs), 1),
                 "tok_s_runs": [round(r["tok_s"], 1) for r in rs],
                 "first_token_ms_median": round(statistics.median(r["first_token_ms"] for r in rs), 1),
                 "rows": rs[0]["rows"], "new_tokens": rs[0]["tokens"]} for c, rs in runs.items()}
    result = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "rounds": args.rounds,
              "loadavg_before_after": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "sizes": sizes(args.dir), "cases": table}
    for case, row in table.items():
        print(f"{case:52s} {row['tok_s_median']:7.1f} tok/s  runs {row['tok_s_runs']}  first {row['first_token_ms_median']} ms")
    print(json.dumps(result["sizes"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
