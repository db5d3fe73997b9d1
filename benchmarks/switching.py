"""Switchable adapters on all-MiniLM-L6-v2: switch cost, latency against merged, memory per adapter, mixed batches.

Builds (once, under --out) random-but-realistic LoRA adapters (r=8 on the attention projections, B drawn
with a small std, heads of 2 to 5 labels), a switchable int8 bundle holding 1 adapter (exported) and
copies grown to 2, 4 and 8 adapters with `add_adapters` (the base is not re-exported), a switchable fp32
bundle of 4, the same switchable int8 bundle of 4 unfused, and merged int8 bundles of the first adapter
(attention fused, the export default, and unfused). Then measures, each configuration in a worker process of its
own (benchmarks/switching_workers.py; two ORT sessions in one process distort each other; see DESIGN.md),
spinning off, medians:

  switch      a run with adapter X right after one with adapter Y vs right after X (paired, one
              session), the RunOptions lookup, and building a RunOptions; against reloading a merged
              bundle (Runtime construction, optimized-graph cache warm and cold)
  latency     switchable int8 (4 adapters, one chosen; attention fused, the export default, and unfused) vs
              merged int8, interleaved workers (runtime.bench), at each --threads count; and the same three
              paired in one process (spinning off, order rotated each round): the median of per-round
              ratios, which a shared, noisy machine moves far less than separate p50s
  memory      resident memory after loading N = 1, 2, 4, 8 adapters, after running each, after a mixed batch
  mixed       one batch of N tasks (per-row adapters, one run) vs N single-task batches vs one uniform batch
  fidelity    a mixed batch's rows vs the same rows run alone, int8 and fp32

    python benchmarks/switching.py --out runs/switching --threads 1,2   # table on stdout, JSON in runs/switching/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgelora.atomic import write_text_atomic

BASE = "minilm"
N_ADAPTERS = (1, 2, 4, 8)
LABEL_COUNTS = (2, 3, 4, 5, 2, 3, 4, 5)
LORA_B_STD = 0.02  # trained LoRA B entries on MiniLM are of this order; enough to move every output


# --- building the bundles (torch) ---------------------------------------------------------------------


def build(out: Path, progress) -> dict:
    """Adapters and bundles under `out` (reused when present); returns paths and build timings."""
    bundles = out / "bundles"
    stamp = out / "bundles.json"
    if stamp.is_file():
        return json.loads(stamp.read_text())
    import torch

    from edgelora.config import LoraConfig
    from edgelora.exporters.add import add_adapters
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    torch.manual_seed(0)
    progress("making adapters")
    model = AdapterModel(load_base(BASE)[0])
    names = [f"task{i}" for i in range(max(N_ADAPTERS))]
    adapters = {}
    for name, count in zip(names, LABEL_COUNTS):
        model.add_adapter(name, LoraConfig(r=8, alpha=16.0), labels=[f"{name}-{j}" for j in range(count)])
        with torch.no_grad():
            for _, layer in model.adapted_layers():
                layer.lora_B[name].weight.normal_(0.0, LORA_B_STD)
        adapters[name] = str(save_adapter(model, name, out / "adapters" / name, base_name=BASE))
    timings = {}
    t = time.perf_counter()
    progress("exporting switchable int8 (1 adapter)")
    export_bundle(BASE, {names[0]: adapters[names[0]]}, mode="switchable", precision="int8", out=bundles / "sw1")
    timings["export_switchable_int8_s"] = time.perf_counter() - t
    previous = 1
    for n in N_ADAPTERS[1:]:
        progress(f"adding adapters: {n}")
        shutil.copytree(bundles / f"sw{previous}", bundles / f"sw{n}", ignore=shutil.ignore_patterns(".cache"))
        t = time.perf_counter()
        add_adapters(bundles / f"sw{n}", {m: adapters[m] for m in names[previous:n]}, check=n == 2)
        timings[f"add_{n - previous}_adapters_to_sw{previous}_s" + ("_with_torch_check" if n == 2 else "")] = \
            time.perf_counter() - t
        previous = n
    progress("exporting switchable fp32 (4 adapters)")
    export_bundle(BASE, {m: adapters[m] for m in names[:4]}, mode="switchable", precision="fp32", out=bundles / "sw4-fp32")
    progress("exporting switchable int8 unfused (4 adapters)")
    t = time.perf_counter()
    export_bundle(BASE, {m: adapters[m] for m in names[:4]}, mode="switchable", precision="int8",
                  out=bundles / "sw4-unfused", fusions=())
    timings["export_switchable_int8_unfused_4_adapters_s"] = time.perf_counter() - t
    for label, fusions in (("merged", None), ("merged-unfused", ())):
        progress(f"exporting {label} int8")
        t = time.perf_counter()
        export_bundle(BASE, {names[0]: adapters[names[0]]}, mode="merged", precision="int8", out=bundles / label,
                      fusions=fusions)
        timings[f"export_{label}_int8_s"] = time.perf_counter() - t
    result = {"bundles": {p.name: str(p) for p in sorted(bundles.iterdir())}, "adapters": adapters, "build_s": timings}
    write_text_atomic(stamp, json.dumps(result, indent=2) + "\n")
    return result


def run_worker(kind: str, **kwargs) -> dict:
    """Run one measurement (benchmarks/switching_workers.py) in a fresh process of its own and return its JSON."""
    cmd = [sys.executable, str(Path(__file__).with_name("switching_workers.py")), kind, json.dumps(kwargs)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- driver -------------------------------------------------------------------------------------------


def measure(paths: dict, thread_counts: list[int], rounds: int, progress) -> dict:
    """Latency at every thread count in `thread_counts`; everything else at the first."""
    from edgelora.runtime.bench import run_benchmark

    b = paths["bundles"]
    threads = thread_counts[0]
    result: dict = {}
    progress("switching")
    result["switch"] = run_worker("switch", bundle=b["sw4"], threads=threads, rounds=rounds, shapes=[[1, 32], [8, 128]])
    progress("reloading merged")
    result["reload_merged"] = run_worker("reload", bundle=b["merged"], threads=threads, repeats=10)
    result["latency"] = {}
    for count in thread_counts:
        progress(f"latency, {count} thread(s)")
        result["latency"][str(count)] = run_benchmark(
            [b["merged"], b["merged-unfused"], f"{b['sw4']}@task0", f"{b['sw4-unfused']}@task0"], batches=(1, 8),
            seqs=(32, 128), rounds=rounds, warmup=3, threads=count)
    result["latency_paired"] = {}
    for count in thread_counts:
        progress(f"latency paired in one process, {count} thread(s)")
        result["latency_paired"][str(count)] = run_worker(
            "paired", bundles={"merged": b["merged"], "switchable": f"{b['sw4']}@task0",
                               "switchable-unfused": f"{b['sw4-unfused']}@task0"},
            threads=count, rounds=rounds, shapes=[[1, 32], [1, 128], [8, 32], [8, 128]])
    progress("memory")
    memory: dict[str, list] = {}
    for _ in range(3):  # interleaved repeats, one fresh process each
        for key in ["merged", *(f"sw{n}" for n in N_ADAPTERS)]:
            memory.setdefault(key, []).append(run_worker("memory", bundle=b[key], threads=threads))
    result["memory"] = memory
    progress("mixed batches")
    result["mixed"] = run_worker("mixed", bundle=b["sw4"], threads=threads, rounds=rounds, shapes=[[1, 32], [8, 128]])
    progress("fidelity")
    result["fidelity"] = run_worker("fidelity", int8=b["sw4"], fp32=b["sw4-fp32"], threads=threads)
    return result


def _sizes(path: str) -> dict[str, int]:
    p = Path(path)
    adapters = sorted((p / "adapters").glob("*.onnx_adapter")) if (p / "adapters").is_dir() else []
    return {"model": (p / "model.onnx").stat().st_size, "adapters": sum(a.stat().st_size for a in adapters),
            "adapter_each": adapters[0].stat().st_size if adapters else 0,
            "bank": (p / "bank.onnx_adapter").stat().st_size if (p / "bank.onnx_adapter").is_file() else 0}


def summarize(paths: dict, m: dict) -> dict:
    mb = 1 / 2**20
    s: dict = {}
    sw = m["switch"]
    reload_ms = m["reload_merged"]["construct_cached_ms"]["median"]
    overhead = {k: v["switch_overhead_ms"]["median"] for k, v in sw["shapes"].items()}
    # Switching = the RunOptions lookup + whatever the first run after a change costs more (paired
    # median, counted only when positive); shape by shape, against one reload of the merged bundle.
    switch_ms = {k: sw["runoptions_lookup_us"] / 1e3 + max(0.0, v) for k, v in overhead.items()}
    s["switch"] = {
        "runoptions_lookup_us": sw["runoptions_lookup_us"], "runoptions_build_us": sw["runoptions_build_us"],
        "adapter_file_load_ms": sw["adapter_file_load_ms"]["median"],
        "run_after_other_minus_after_same_ms": overhead,
        "switch_cost_ms": switch_ms,
        "reload_merged_cached_ms": reload_ms,
        "reload_merged_uncached_ms": m["reload_merged"]["construct_uncached_ms"]["median"],
        "reload_over_switch": {k: reload_ms / v for k, v in switch_ms.items()},
    }
    s["latency"] = {}
    for count, bench in m["latency"].items():  # by thread count
        rows = {(r["label"], r["batch"], r["seq"]): r["p50_ms"] for r in bench["rows"]}
        labels = [b["label"] for b in bench["bundles"]]
        lat = {}
        for batch in (1, 8):
            for seq in (32, 128):
                merged, unfused, switch, switch_unfused = (rows[(lab, batch, seq)] for lab in labels)
                lat[f"{batch}x{seq}"] = {
                    "merged_ms": merged, "merged_unfused_ms": unfused, "switchable_ms": switch,
                    "switchable_unfused_ms": switch_unfused, "switchable_over_merged": switch / merged,
                    "switchable_over_merged_unfused": switch / unfused,
                    "switchable_unfused_over_merged": switch_unfused / merged}
        s["latency"][count] = lat
    s["latency_paired"] = {
        count: {shape: {"wall": r["ratio"], "cpu": r["cpu_ratio"]} for shape, r in paired["shapes"].items()}
        for count, paired in m.get("latency_paired", {}).items()
    }
    mem = {}
    for key, reps in m["memory"].items():
        med = {stage: float(np.median([r[stage]["rss"] for r in reps])) * mb
               for stage in ("before", "imported", "loaded", "ran_each", "ran_mixed") if stage in reps[0]}
        mem[key] = {"adapters": reps[0]["adapters"], **{f"{k}_mb": v for k, v in med.items()},
                    "files_mb": {k: v * mb for k, v in _sizes(paths["bundles"][key]).items()}}
    one = mem["sw1"]
    for key in (f"sw{n}" for n in N_ADAPTERS[1:]):
        extra = mem[key]["adapters"] - one["adapters"]
        mem[key]["loaded_increment_per_adapter_mb"] = (mem[key]["loaded_mb"] - one["loaded_mb"]) / extra
        mem[key]["ran_increment_per_adapter_mb"] = (mem[key]["ran_each_mb"] - one["ran_each_mb"]) / extra
    s["memory"] = mem
    s["mixed"] = m["mixed"]["shapes"]
    s["fidelity"] = m["fidelity"]
    return s


def table(s: dict) -> str:
    sw = s["switch"]
    lines = ["switching (one session, 4 adapters)",
             f"  RunOptions lookup           {sw['runoptions_lookup_us']:.2f} us   (build one: {sw['runoptions_build_us']:.2f} us, "
             f"load an .onnx_adapter: {sw['adapter_file_load_ms']:.3f} ms)"]
    lines += [f"  reload merged bundle        {sw['reload_merged_cached_ms']:.1f} ms (optimized graph cached), "
              f"{sw['reload_merged_uncached_ms']:.1f} ms uncached"]
    for shape, ms in sw["run_after_other_minus_after_same_ms"].items():
        lines.append(f"  {shape:>5}: run after another adapter - after the same {ms:+.3f} ms (median, paired); "
                     f"switch cost {sw['switch_cost_ms'][shape]:.4f} ms; reload / switch {sw['reload_over_switch'][shape]:.0f}x")
    for count, lat in s["latency"].items():
        lines += ["", f"latency p50 (ms), {count} thread(s)   merged  merged-unfused  switchable  sw-unfused   "
                      "sw/merged  sw-unfused/merged"]
        for shape, r in lat.items():
            lines.append(f"  {shape:>26}  {r['merged_ms']:7.2f}  {r['merged_unfused_ms']:14.2f}  {r['switchable_ms']:10.2f}"
                         f"  {r['switchable_unfused_ms']:10.2f}   {r['switchable_over_merged']:9.3f}"
                         f"  {r['switchable_unfused_over_merged']:17.3f}")
    for count, paired in s["latency_paired"].items():
        lines += ["", f"paired in one process, {count} thread(s): median per-round ratio over merged (wall; CPU time)"]
        for shape, r in paired.items():
            lines.append(f"  {shape:>8}  " + "  ".join(f"{k} {r['wall'][k]:.3f} ({r['cpu'][k]:.3f})" for k in r["wall"]))
    lines += ["", "memory RSS (MB)   adapters  loaded  ran each  ran mixed  +/adapter(loaded)  +/adapter(ran)  adapter file"]
    for key, r in s["memory"].items():
        lines.append(f"  {key:>14}  {r['adapters']:8d}  {r['loaded_mb']:6.1f}  {r['ran_each_mb']:8.1f}  "
                     f"{r.get('ran_mixed_mb', float('nan')):9.1f}  {r.get('loaded_increment_per_adapter_mb', float('nan')):17.2f}"
                     f"  {r.get('ran_increment_per_adapter_mb', float('nan')):14.2f}  {r['files_mb']['adapter_each']:12.2f}")
    lines += ["", "mixed batch (ms)  shape (tasks x rows x seq)  mixed 1 run  N separate runs  uniform 1 run  separate/mixed"]
    for shape, r in s["mixed"].items():
        lines.append(f"  {shape:>30}  {r['mixed_one_run']['median']:11.2f}  {r['separate_runs']['median']:15.2f}"
                     f"  {r['uniform_one_run']['median']:13.2f}  {r['separate_over_mixed']:14.2f}")
    f = s["fidelity"]
    lines += ["", f"fidelity (16 rows x 64, 4 adapters): mixed vs alone max |diff| fp32 {f['fp32_mixed_vs_alone_max_abs']:.1e}, "
              f"int8 {f['int8_mixed_vs_alone_max_abs']:.1e} (int8 vs fp32 alone {f['int8_alone_vs_fp32_alone_max_abs']:.1e}); "
              f"same label {f['int8_mixed_vs_alone_same_label']:.0%}",
              f"  labels as fp32's: int8 alone {f.get('int8_alone_same_label_as_fp32', float('nan')):.0%}, int8 mixed "
              f"{f.get('int8_mixed_same_label_as_fp32', float('nan')):.0%}; moved labels had fp32 margins <= "
              f"{f.get('widest_fp32_margin_of_a_moved_label', float('nan')):.3f}",
              f"  without mixing (one adapter, whole batch vs rows alone), int8: max |diff| "
              f"{f['int8_uniform_batch_vs_alone_max_abs']:.1e}, same label {f['int8_uniform_batch_vs_alone_same_label']:.0%}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/switching", help="bundles and switching.json go here")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", default="1", help="intra-op threads of every session; a list (1,2) measures "
                        "latency at each, everything else at the first")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"[switching] {msg}", file=sys.stderr, flush=True)

    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads {args.threads!r}: give thread counts such as 1 or 1,2")
    paths = build(out, progress)
    measured = measure(paths, thread_counts, args.rounds, progress)
    summary = summarize(paths, measured)
    from edgelora.runtime import detect_isa

    cpu = detect_isa()
    import onnxruntime as ort

    result = {"summary": summary, "measured": measured, "build": paths,
              "settings": {"base": BASE, "threads": thread_counts, "rounds": args.rounds, "spinning": False,
                           "lora": {"r": 8, "alpha": 16.0, "targets": "attention (q, k, v, o)", "b_std": LORA_B_STD}},
              "machine": {"isa": cpu.isa, "model": cpu.model, "logical_cores": os.cpu_count(),
                          "platform": platform.platform()}, "onnxruntime": ort.__version__}
    write_text_atomic(out / "switching.json", json.dumps(result, indent=2) + "\n")
    print(table(summary))
    print(f"\nJSON: {out / 'switching.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
