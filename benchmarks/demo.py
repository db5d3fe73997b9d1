"""The edgelora demo: two int8-aware LoRA adapters on all-MiniLM-L6-v2, exported, switched and benchmarked.

Runs the same `edgelora` commands the README shows, on two synthetic tasks generated inside the project
(smart-home commands -> intent, short product reviews -> sentiment; see edgelora/data.py), then prints
each task's held-out accuracy in fp32 and int8 and the int8-versus-fp32 latency table.

    python benchmarks/demo.py [--out runs/demo] [--train-size 2000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from edgelora.atomic import write_text_atomic
from edgelora.data import load_splits
from edgelora.runtime import Runtime

TASKS = ("intent", "sentiment")
EXAMPLES = (
    "could you switch the bedroom lamp off, it's too bright",
    "the battery is great but the screen cracked in a week",
    "play something relaxing in the living room",
    "honestly not bad at all for the price",
)


def sh(*args: str) -> None:
    """Run one edgelora command, echoing it as a user would type it."""
    print(f"\n$ edgelora {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "edgelora.cli", *args], check=True, stdout=subprocess.DEVNULL)


def accuracy(rt: Runtime, adapter: str, texts: list[str], labels: list[int], label_names: tuple[str, ...]) -> float:
    correct = 0
    for i in range(0, len(texts), 64):
        preds = rt.predict(texts[i : i + 64], adapter=adapter)
        correct += sum(p["label"] == label_names[y] for p, y in zip(preds, labels[i : i + 64]))
    return correct / len(texts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--train-size", type=int, default=2000, help="examples per task (20% held out)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20, help="benchmark rounds per shape")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.time()

    # 1. Train two adapters with int8 fake quantization (7-bit weights where this CPU's int8 kernel saturates).
    for task in TASKS:
        sh("train", "--base", "minilm", "--data", f"builtin:{task}:{args.train_size}", "--name", task,
           "--qat", "int8", "--deploy-mode", "switchable", "--epochs", str(args.epochs),
           "--out", str(out / "adapters" / task))

    # 2. Export: one switchable bundle holding both adapters, one merged bundle of `intent`, fp32 twins of each.
    adapters = [f"{t}={out / 'adapters' / t}" for t in TASKS]
    bundles = {}
    for precision in ("fp32", "int8"):
        bundles[("switchable", precision)] = out / "bundles" / f"switchable-{precision}"
        sh("export", "minilm", *sum((["--adapter", a] for a in adapters), []), "--mode", "switchable",
           "--precision", precision, "--out", str(bundles[("switchable", precision)]))
        bundles[("merged", precision)] = out / "bundles" / f"merged-intent-{precision}"
        sh("export", "minilm", "--adapter", adapters[0], "--mode", "merged", "--precision", precision,
           "--out", str(bundles[("merged", precision)]))

    # 3. One int8 session, both tasks: switch adapter per call, no reload.
    rt = Runtime(bundles[("switchable", "int8")])
    print(f"\nswitchable int8 bundle, adapters {list(rt.adapters)}:")
    for text in EXAMPLES:
        answers = {task: rt.predict([text], adapter=task)[0] for task in TASKS}
        shown = ", ".join(f"{t}={a['label']} ({a['score']:.2f})" for t, a in answers.items())
        print(f"  {text!r:62} -> {shown}")

    # 4. Held-out accuracy, fp32 vs int8, through the deployed bundles.
    print("\nheld-out accuracy (synthetic tasks, texts never seen in training):")
    print(f"  {'task':10} {'n':>5} {'fp32':>8} {'int8':>8} {'merged int8':>12}")
    results = {}
    for task in TASKS:
        _, eval_ds = load_splits(f"builtin:{task}:{args.train_size}", seed=0)
        texts, labels = list(eval_ds.texts), list(eval_ds.labels)
        row = {p: accuracy(Runtime(bundles[("switchable", p)]), task, texts, labels, eval_ds.label_names) for p in ("fp32", "int8")}
        if task == TASKS[0]:
            row["merged_int8"] = accuracy(Runtime(bundles[("merged", "int8")]), task, texts, labels, eval_ds.label_names)
        results[task] = row
        merged = f"{row['merged_int8']:.3f}" if "merged_int8" in row else "-"
        print(f"  {task:10} {len(texts):5d} {row['fp32']:8.3f} {row['int8']:8.3f} {merged:>12}")

    # 5. int8 vs fp32 latency, interleaved in one run.
    bench_json = out / "bench.json"
    print(flush=True)
    cmd = ["bench", *(str(bundles[k]) for k in [("merged", "fp32"), ("merged", "int8"), ("switchable", "fp32"), ("switchable", "int8")]),
           "--adapter", "intent", "--batch", "1,8", "--seq", "32,128", "--rounds", str(args.rounds), "--json", str(bench_json)]
    print(f"$ edgelora {shlex.join(cmd)}", flush=True)
    subprocess.run([sys.executable, "-m", "edgelora.cli", *cmd], check=True)
    write_text_atomic(out / "accuracy.json", json.dumps(results, indent=2) + "\n")
    print(f"\ndemo finished in {time.time() - start:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
