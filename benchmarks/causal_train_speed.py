"""SmolLM2 LoRA (r=8, q/k/v/o) on the home-json task: training speed on this CPU, and held-out exact match and
field accuracy of the plain base vs after N steps, fp32 and QAT int8 (blockwise, merged).

    .venv/bin/python benchmarks/causal_train_speed.py --train 160 --eval 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from edgelora import causal_data
from edgelora.causal_lm import CausalLMAdapterModel
from edgelora.causal_train import evaluate_generation, load_tokenizer, train_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=160, help="training rows (steps = rows / batch)")
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine a second thread made steps ~4x slower")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--skip-qat", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, held = f"builtin:home-json:{args.train}", f"builtin:home-json:{args.eval}"
    results = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "train_rows": args.train,
               "eval_rows": args.eval, "batch": args.batch}
    model = CausalLMAdapterModel.from_base("smollm2")
    tok = load_tokenizer(model.base_path)
    _, rows = causal_data.load_splits(data, held)
    started = time.perf_counter()
    results["plain"] = {k: v for k, v in evaluate_generation(model, tok, rows, 32, task="home-json").items()
                        if k != "predictions"}
    results["plain"]["seconds"] = time.perf_counter() - started
    for qat in (None,) if args.skip_qat else (None, "int8"):
        with tempfile.TemporaryDirectory() as tmp:
            report = train_causal_lm("smollm2", data, held, out=os.path.join(tmp, "a"), epochs=1, batch_size=args.batch,
                                     lr=args.lr, max_length=args.max_length, qat=qat, eval_generate=None,
                                     max_new_tokens=32)
        gen = {k: v for k, v in report["generation"].items() if k != "predictions"}
        results[qat or "fp32"] = {"steps": report["steps"], "train_seconds": report["seconds"],
                                  "steps_per_second": report["steps"] / report["seconds"],
                                  "tokens_per_second": report["tokens_per_second"], "history": report["history"],
                                  "sample": report["generation"]["predictions"][:3], **gen}
        print(json.dumps(results, indent=1), flush=True)


if __name__ == "__main__":
    main()
