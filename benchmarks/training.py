"""Training-side measurements on all-MiniLM-L6-v2: what int8-aware training costs and what it buys.

1. Step time with fake quantization over without (merged and switchable recipes), steps interleaved
   A B C A B C in one process so machine drift cancels; medians and ratios.
2. Peak resident memory of LoRA training against full fine-tuning, each in a process of its own.
3. Held-out accuracy on the demo tasks: fp32, int8 after plain post-training quantization (adapter trained
   without fake quantization, exported int8), and int8 after QAT — all through deployed bundles.

    python benchmarks/training.py [--out runs/training] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def _model(quant: str | None, full: bool = False):
    from edgelora.config import LoraConfig, QuantConfig
    from edgelora.model import AdapterModel, load_base

    base, _ = load_base("minilm")
    model = AdapterModel(base)
    q = None if quant is None else QuantConfig(weight_bits=7, mode=quant)
    model.add_adapter("task", LoraConfig(r=8), [str(i) for i in range(8)], quant=q)
    if full:  # full fine-tuning: every base weight trains (adapter stays for the head's sake)
        for p in model.base.parameters():
            p.requires_grad_(True)
    return model


def _batch(batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    return ids, torch.ones_like(ids), torch.randint(0, 8, (batch,), generator=g)


def step_times(rounds: int, batch: int, seq: int) -> dict:
    configs = {"fp32": _model(None), "qat_merged": _model("merged"), "qat_switchable": _model("switchable")}
    opts = {k: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for k, m in configs.items()}
    ids, mask, y = _batch(batch, seq)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds + 2):
        for name, model in configs.items():
            model.train()
            t = time.perf_counter()
            logits, _ = model(ids, mask)
            torch.nn.functional.cross_entropy(logits, y).backward()
            opts[name].step()
            opts[name].zero_grad()
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"batch": batch, "seq": seq, "rounds": rounds, "median_ms": med,
            "ratio_qat_merged": med["qat_merged"] / med["fp32"], "ratio_qat_switchable": med["qat_switchable"] / med["fp32"]}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(kind: str, steps: int, batch: int, seq: int) -> None:
    model = _model(None, full=(kind == "full"))
    after_load = _peak_rss_mb()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    ids, mask, y = _batch(batch, seq)
    for _ in range(steps):
        logits, _ = model(ids, mask)
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    print(json.dumps({"kind": kind, "after_load_mb": after_load, "peak_mb": _peak_rss_mb(), "trainable_params": trainable}))


def memory(batch: int, seq: int) -> dict:
    out = {}
    for kind in ("lora", "full"):
        res = subprocess.run([sys.executable, __file__, "--memory-worker", kind, "--batch", str(batch), "--seq", str(seq)],
                             check=True, capture_output=True, text=True)
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    out["peak_ratio_full_over_lora"] = out["full"]["peak_mb"] / out["lora"]["peak_mb"]
    out["training_increment_ratio"] = (out["full"]["peak_mb"] - out["full"]["after_load_mb"]) / max(
        1e-9, out["lora"]["peak_mb"] - out["lora"]["after_load_mb"])
    return out


def _cli(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "edgelora.cli", *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else {}


def accuracy(out: Path, train_size: int, epochs: int) -> dict:
    from edgelora.data import load_splits
    from edgelora.runtime import Runtime

    results = {}
    for task in ("intent", "sentiment"):
        _, eval_ds = load_splits(f"builtin:{task}:{train_size}", seed=0)
        truth = [eval_ds.label_names[y] for y in eval_ds.labels]

        def acc(bundle: Path) -> float:
            preds = Runtime(bundle).predict(list(eval_ds.texts), adapter=task)
            return sum(p["label"] == t for p, t in zip(preds, truth)) / len(truth)

        row = {}
        for recipe, qat in (("plain", ["--qat", "none"]), ("qat", ["--qat", "int8", "--deploy-mode", "merged"])):
            adapter = out / "adapters" / f"{task}-{recipe}"
            _cli("train", "--data", f"builtin:{task}:{train_size}", "--name", task, "--epochs", str(epochs),
                 *qat, "--out", str(adapter))
            for precision in ("fp32", "int8"):
                bundle = out / "bundles" / f"{task}-{recipe}-{precision}"
                args = ["export", "minilm", "--adapter", f"{task}={adapter}", "--mode", "merged",
                        "--precision", precision, "--out", str(bundle)]
                _cli(*args)
                row[f"{recipe}_{precision}"] = acc(bundle)
        row["ptq_gap_points"] = 100 * (row["plain_fp32"] - row["plain_int8"])
        row["qat_gap_points"] = 100 * (row["plain_fp32"] - row["qat_int8"])
        results[task] = row
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/training")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, 3, args.batch, args.seq)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    result["step_time"] = step_times(args.rounds, args.batch, args.seq)
    st = result["step_time"]
    print(f"step time {args.batch}x{args.seq}: fp32 {st['median_ms']['fp32']:.0f} ms, QAT merged "
          f"{st['median_ms']['qat_merged']:.0f} ms ({st['ratio_qat_merged']:.2f}x), QAT switchable "
          f"{st['median_ms']['qat_switchable']:.0f} ms ({st['ratio_qat_switchable']:.2f}x)", flush=True)
    result["memory"] = mem = memory(args.batch, args.seq)
    print(f"peak RSS: LoRA {mem['lora']['peak_mb']:.0f} MB ({mem['lora']['trainable_params']:,} trainable), full "
          f"fine-tune {mem['full']['peak_mb']:.0f} MB ({mem['full']['trainable_params']:,} trainable): "
          f"{mem['peak_ratio_full_over_lora']:.2f}x", flush=True)
    if not args.skip_accuracy:
        result["accuracy"] = acc = accuracy(out, args.train_size, args.epochs)
        print(f"{'task':10} {'fp32':>7} {'PTQ int8':>9} {'QAT int8':>9} {'PTQ gap':>8} {'QAT gap':>8}")
        for task, r in acc.items():
            print(f"{task:10} {r['plain_fp32']:7.3f} {r['plain_int8']:9.3f} {r['qat_int8']:9.3f} "
                  f"{r['ptq_gap_points']:7.1f}p {r['qat_gap_points']:7.1f}p")
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
