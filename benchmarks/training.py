"""Training-side measurements on all-MiniLM-L6-v2: what int8-aware training costs and what it buys.

1. Step time with fake quantization over without (merged and switchable recipes), steps interleaved
   A B C A B C in one process so machine drift cancels; medians and ratios.
2. Peak resident memory of LoRA training against full fine-tuning, each in a process of its own.
3. Held-out accuracy on the demo tasks: fp32, int8 after plain post-training quantization (adapter trained
   without fake quantization, exported int8), and int8 after QAT. Every int8 figure comes from a deployed
   merged int8 bundle run by ONNX Runtime's int8 kernels; fp32 is the plain adapter in torch as training
   evaluated it (an fp32 bundle matches torch to ~1e-5, see tests/test_export.py), and the QAT adapter's
   fake-quant torch accuracy is listed beside its int8 one. With `--seeds N`, N seeds (each draws its own
   train/held-out split, adapter init and data order): per-seed rows, then mean ± sample std of every
   column and gap. `--weight-bits 7,8` measures both weight ranges. 8-bit weights saturate the int8 kernel
   of AVX2 CPUs without VNNI and the exporter refuses them there, so on such a CPU the 8-bit "int8" columns
   are the torch fake-quant model's accuracy (what the int8 graph reproduces on a VNNI, AMX or ARM CPU),
   marked `int8_source` in the JSON. `--max-minutes M` starts no seed that would end past M minutes.
   `--activations static` measures static int8 (constant activation scales) instead: PTQ is the plain
   adapter calibrated after training (`edgelora calibrate`, observer `--ptq-observer`), QAT is
   `train --qat int8 --activations static` (calibrated before training, minmax); both on the same
   training batches, both exported int8.

    python benchmarks/training.py [--out runs/training] [--skip-accuracy] [--seeds N] [--weight-bits 7,8]
    python benchmarks/training.py --accuracy-only --seeds 4 --weight-bits 7,8
    python benchmarks/training.py --accuracy-only --activations static --seeds 3 --weight-bits 7
    python benchmarks/training.py --accuracy-only --adapter-flags "--rank 16 --include-mlp" --seeds 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from edgelora.atomic import write_text_atomic


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


TASKS = ("intent", "sentiment")


def _cli(*args: str) -> dict:
    """One `edgelora` command in this process (no torch/transformers import per call); its JSON line."""
    from edgelora.cli import main as cli_main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = cli_main(list(args))
    if rc != 0:
        raise RuntimeError(f"edgelora {' '.join(args)} exited {rc}")
    lines = printed.getvalue().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _fake_quant_accuracy(adapter: Path, bits: int, eval_ds, static: bool = False) -> float:
    """Held-out accuracy of a saved adapter in torch with `bits`-bit merged fake quantization added (`static`:
    the adapter's own calibrated static recipe, which it loads with)."""
    from edgelora.config import QuantConfig
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import load_adapter
    from edgelora.tokenize import load_tokenizer
    from edgelora.train import accuracy as torch_accuracy

    base, path = load_base("minilm")
    model = AdapterModel(base)
    model.set_adapter(load_adapter(model, adapter))
    if not static:
        model.set_quant(QuantConfig(weight_bits=bits, mode="merged"))
    return torch_accuracy(model, load_tokenizer(path, 128), list(eval_ds.texts), list(eval_ds.labels))


def _int8_source(bits: int) -> str:
    from edgelora.runtime.cpu import detect_isa, int8_saturates

    isa = detect_isa().isa
    if bits == 8 and int8_saturates(isa):
        return f"torch fake-quant ({isa}: ORT's int8 kernel saturates 8-bit weights; the exporter refuses them)"
    return "int8 ONNX bundle (merged), ONNX Runtime"


def accuracy_row(out: Path, task: str, train_size: int, epochs: int, seed: int, bits: list[int],
                 activations: str = "dynamic", ptq_observer: str = "minmax", adapter_flags: tuple[str, ...] = ()) -> dict:
    """One seed of one task: fp32, PTQ int8 and QAT int8 held-out accuracy (per weight range), and the gaps.

    The held-out split is the one `edgelora train --seed` holds out (it also picks the best epoch there).
    """
    from edgelora.data import load_splits
    from edgelora.runtime import Runtime

    data = f"builtin:{task}:{train_size}"
    _, eval_ds = load_splits(data, seed=seed)
    truth = [eval_ds.label_names[y] for y in eval_ds.labels]
    where = out / f"seed{seed}"

    def acc(bundle: Path) -> float:
        preds = Runtime(bundle).predict(list(eval_ds.texts), adapter=task)
        return sum(p["label"] == t for p, t in zip(preds, truth)) / len(truth)

    def train(recipe: str, *flags: str) -> tuple[Path, float]:
        """The adapter directory and its best held-out accuracy in torch (on `eval_ds`: the same split)."""
        adapter = where / "adapters" / f"{task}-{recipe}"
        printed = _cli("train", "--data", data, "--name", task, "--epochs", str(epochs), "--seed", str(seed),
                       *adapter_flags, *flags, "--out", str(adapter))
        return adapter, printed["eval_accuracy"]

    def export(adapter: Path, label: str, precision: str, *flags: str) -> Path:
        bundle = where / "bundles" / f"{task}-{label}"
        _cli("export", "minilm", "--adapter", f"{task}={adapter}", "--mode", "merged", "--precision", precision,
             *flags, "--out", str(bundle))
        return bundle

    def calibrated(adapter: Path, b: int) -> Path:
        """Static PTQ: the plain adapter with activation ranges from the training batches `train` would use."""
        calibrated = where / "adapters" / f"{task}-plain-static-{ptq_observer}-w{b}"
        _cli("calibrate", str(adapter), "--data", data, "--seed", str(seed), "--weight-bits", str(b),
             "--deploy-mode", "merged", "--observer", ptq_observer, "--out", str(calibrated))
        return calibrated

    static = activations == "static"
    plain, fp32 = train("plain", "--qat", "none")
    row: dict = {"seed": seed, "fp32": fp32}
    for b in bits:
        bundles = not _int8_source(b).startswith("torch")
        if static:
            ptq = calibrated(plain, b)
            row[f"ptq_int8_w{b}"] = (acc(export(ptq, f"plain-static-int8-w{b}", "int8")) if bundles
                                     else _fake_quant_accuracy(ptq, b, eval_ds, static=True))
        else:
            row[f"ptq_int8_w{b}"] = (acc(export(plain, f"plain-int8-w{b}", "int8", "--weight-bits", str(b)))
                                     if bundles else _fake_quant_accuracy(plain, b, eval_ds))
        qat, row[f"qat_fake_quant_w{b}"] = train(f"qat-{activations}-w{b}", "--qat", "int8", "--weight-bits", str(b),
                                                 "--deploy-mode", "merged", "--activations", activations)
        row[f"qat_int8_w{b}"] = (acc(export(qat, f"qat-{activations}-int8-w{b}", "int8")) if bundles
                                 else row[f"qat_fake_quant_w{b}"])
        row[f"ptq_gap_w{b}"] = 100 * (row["fp32"] - row[f"ptq_int8_w{b}"])
        row[f"qat_gap_w{b}"] = 100 * (row["fp32"] - row[f"qat_int8_w{b}"])
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean and sample standard deviation (None for one seed) of every numeric column but the seed."""
    out = {}
    for key in rows[0]:
        if key == "seed":
            continue
        values = [r[key] for r in rows]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
    return out


def accuracy(out: Path, train_size: int, epochs: int, seeds: list[int], bits: list[int],
             max_minutes: float | None = None, on_seed=None, activations: str = "dynamic",
             ptq_observer: str = "minmax", adapter_flags: tuple[str, ...] = ()) -> dict:
    """Rows per seed and task, their summary and the goal checks; `on_seed(partial result)` after each seed."""
    rows: dict[str, list[dict]] = {task: [] for task in TASKS}
    start = time.perf_counter()
    done: list[int] = []
    result: dict = {}
    for seed in seeds:
        elapsed = time.perf_counter() - start
        if done and max_minutes is not None and elapsed + elapsed / len(done) > 60 * max_minutes:
            print(f"stopping after {len(done)} seed(s): another would end past --max-minutes {max_minutes:g}")
            break
        for task in TASKS:
            t = time.perf_counter()
            rows[task].append(row := accuracy_row(out, task, train_size, epochs, seed, bits, activations, ptq_observer,
                                                  adapter_flags))
            print(f"seed {seed} {task}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "seed")
                  + f" ({time.perf_counter() - t:.0f} s)", flush=True)
        done.append(seed)
        result = {"activations": activations, **({"ptq_observer": ptq_observer} if activations == "static" else {}),
                  "adapter_flags": list(adapter_flags),
                  **_accuracy_summary(rows, train_size, epochs, done, bits)}
        result["wall_s"] = time.perf_counter() - start
        if on_seed is not None:
            on_seed(result)
    return result


def _accuracy_summary(rows: dict[str, list[dict]], train_size: int, epochs: int, seeds: list[int],
                      bits: list[int]) -> dict:
    summary = {task: summarize(r) for task, r in rows.items()}
    goals = {}
    for task in rows:
        for b in bits:
            qat, ptq = summary[task][f"qat_gap_w{b}"]["mean"], summary[task][f"ptq_gap_w{b}"]["mean"]
            goals[f"{task}_w{b}"] = {"qat_gap_at_most_0.5": qat <= 0.5, "qat_gap_below_ptq_gap": qat < ptq}
    return {"train_size": train_size, "epochs": epochs, "seeds": list(seeds), "weight_bits": bits,
            "int8_source": {f"w{b}": _int8_source(b) for b in bits}, "rows": rows, "summary": summary,
            "goals_on_means": goals}


def _pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    std = "" if stat["std"] is None else f"±{stat['std'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f}{std}"


def print_accuracy(acc: dict) -> None:
    columns = ["fp32"] + [f"{kind}_w{b}" for b in acc["weight_bits"]
                          for kind in ("ptq_int8", "qat_fake_quant", "qat_int8", "ptq_gap", "qat_gap")]

    def head(column: str) -> str:  # ptq_int8_w7 -> "PTQ int8 w7", qat_fake_quant_w7 -> "QAT fq w7"
        kind, *rest = column.replace("fake_quant", "fq").split("_")
        return " ".join([kind.upper() if kind != "fp32" else kind, *rest])

    heads = {c: head(c) for c in columns}
    observer = f", PTQ observer {acc['ptq_observer']}" if "ptq_observer" in acc else ""
    print(f"held-out accuracy, {acc.get('activations', 'dynamic')} activations{observer}, {len(acc['seeds'])} "
          f"seed(s) {acc['seeds']}; gaps in points vs fp32 "
          f"(mean±std over seeds); int8 columns: " + "; ".join(f"{k}: {v}" for k, v in acc["int8_source"].items()))
    print(f"{'task':10} " + " ".join(f"{heads[c]:>15}" for c in columns))
    for task, stats in acc["summary"].items():
        cells = [_pm(stats[c], 1.0, 2) if "gap" in c else _pm(stats[c]) for c in columns]
        print(f"{task:10} " + " ".join(f"{x:>15}" for x in cells))
    print("per seed:")
    for task, rows in acc["rows"].items():
        for r in rows:
            cells = [f"{r[c]:.2f}" if "gap" in c else f"{r[c]:.3f}" for c in columns]
            print(f"{task:10} " + " ".join(f"{x:>15}" for x in cells) + f"   seed {r['seed']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/training")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the step-time and memory parts")
    parser.add_argument("--seeds", type=int, default=1, help="accuracy: seeds 0..N-1 (mean ± std over them)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="accuracy: start no further seed that would end past this many minutes")
    parser.add_argument("--weight-bits", default="auto",
                        help="accuracy: comma-separated int8 weight ranges to measure, 7 and/or 8 (auto: this CPU's)")
    parser.add_argument("--activations", choices=("dynamic", "static"), default="dynamic",
                        help="accuracy: int8 activation scales per call (dynamic) or calibrated constants (static)")
    parser.add_argument("--ptq-observer", choices=("minmax", "moving_average", "percentile"), default="minmax",
                        help="--activations static: the observer `edgelora calibrate` gives the PTQ adapter")
    parser.add_argument("--adapter-flags", default="",
                        help='accuracy: extra `edgelora train` flags for every adapter, e.g. "--rank 16 --include-mlp"')
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is far faster on a shared, busy machine")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, 3, args.batch, args.seq)
        return 0
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} must be at least 1")
    if args.ptq_observer != "minmax" and args.activations != "static":
        parser.error("--ptq-observer sets static calibration; add --activations static")
    if args.weight_bits == "auto":
        from edgelora.runtime.cpu import detect_isa, recommended_weight_bits

        bits = [recommended_weight_bits(detect_isa().isa)]
    else:
        bits = sorted({int(b) for b in args.weight_bits.split(",") if b.strip() in ("7", "8")})
        if not bits or any(b.strip() not in ("7", "8") for b in args.weight_bits.split(",")):
            parser.error(f"--weight-bits {args.weight_bits}: give 7, 8, 7,8 or auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.accuracy_only:
        result["step_time"] = step_times(args.rounds, args.batch, args.seq)
        st = result["step_time"]
        print(f"step time {args.batch}x{args.seq}: fp32 {st['median_ms']['fp32']:.0f} ms, QAT merged "
              f"{st['median_ms']['qat_merged']:.0f} ms ({st['ratio_qat_merged']:.2f}x), QAT switchable "
              f"{st['median_ms']['qat_switchable']:.0f} ms ({st['ratio_qat_switchable']:.2f}x)", flush=True)
        result["memory"] = mem = memory(args.batch, args.seq)
        print(f"peak RSS: LoRA {mem['lora']['peak_mb']:.0f} MB ({mem['lora']['trainable_params']:,} trainable), "
              f"full fine-tune {mem['full']['peak_mb']:.0f} MB ({mem['full']['trainable_params']:,} trainable): "
              f"{mem['peak_ratio_full_over_lora']:.2f}x", flush=True)
    if not args.skip_accuracy:
        def save(partial: dict) -> None:  # after every seed: an interrupted study keeps what it finished
            result["accuracy"] = partial
            write_text_atomic(out / "training.json", json.dumps(result, indent=2) + "\n")

        acc = accuracy(out, args.train_size, args.epochs, list(range(args.seeds)), bits, args.max_minutes, save,
                       args.activations, args.ptq_observer, tuple(shlex.split(args.adapter_flags)))
        print_accuracy(acc)
    write_text_atomic(out / "training.json", json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
