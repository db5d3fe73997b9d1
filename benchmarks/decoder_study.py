"""Does int8-aware training pay on a decoder, and what does int8 cost in held-out perplexity? (issue 15)

For each task and seed (the seed draws the task's train and held-out rows, the LoRA init and the batch order):
train LoRA (r=8, q/k/v/o) on the base fp32 and with QAT int8 (blockwise, merged mode) with the same settings;
export the fp32 adapter to an fp32 bundle and an int8 bundle (post-training quantization, PTQ) and the QAT
adapter to an int8 bundle; score every bundle through the torch-free runtime (greedy, the held-out prompts) by
exact match and field accuracy, beside the torch model's own score of each adapter. Then, from the bundles'
logits (`Generator.perplexity`): held-out perplexity of int8 vs fp32 for the plain base and the fp32 adapter —
on the held-out answers given their prompts, and on general English (runtime/fidelity.py's FIDELITY_TEXTS) —
and greedy agreement of int8 with fp32 over the held-out prompts.

    .venv/bin/python benchmarks/decoder_study.py --seeds 2 --threads 1

Writes `--out`/study.json and `--out`/study.md (atomically) after every seed; each (task, seed) result is kept
in `--out`/parts/, so a rerun with more seeds only trains the new ones (same settings required).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from edgelora import causal_data, generation_tasks
from edgelora.atomic import write_text_atomic
from edgelora.causal_train import train_causal_lm
from edgelora.exporters.decoder_export import export_decoder
from edgelora.runtime.fidelity import FIDELITY_TEXTS
from edgelora.runtime.generate import Generator

SCORES = ("exact_match", "field_accuracy")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "").strip() or platform.machine()
    flags = fields.get("Flags", "").split()
    extras = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name} ({', '.join(extras)})" if extras else name


def bundle_answers(gen: Generator, prompts: list, max_new_tokens: int, batch: int) -> tuple[list[str], list[list[int]]]:
    """Greedy answers and their token ids, `batch` prompts per run (rows are batch-invariant)."""
    texts, ids = [], []
    for i in range(0, len(prompts), batch):
        texts += [t.strip() for t in gen.generate_batch(prompts[i : i + batch], max_new_tokens=max_new_tokens)]
        ids += [list(t) for t in gen.stats.token_ids]
    return texts, ids


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """Greedy agreement of `other` with `reference`: tokens equal up to the first divergence (as a share of the
    reference's tokens, and per answer) and the share of identical answers."""
    prefix, total, shares = 0, 0, []
    for a, b in zip(reference, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix, total = prefix + n, total + len(a)
        shares.append(n / max(len(a), len(b)) if max(len(a), len(b)) else 1.0)
    return {"prefix_tokens": prefix / max(total, 1), "mean_prefix_share": sum(shares) / max(len(shares), 1),
            "identical_answers": sum(a == b for a, b in zip(reference, other)) / max(len(reference), 1)}


def bundle_report(gen: Generator, task: str, rows: list, args: argparse.Namespace) -> dict[str, Any]:
    """Task score of a bundle's greedy answers, its held-out perplexities and its answer token ids."""
    started = time.perf_counter()
    answers, ids = bundle_answers(gen, [r.prompt_messages for r in rows], args.max_new_tokens, args.gen_batch)
    scores = generation_tasks.score(task, answers, [r.reference for r in rows])
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    ppl_task = gen.perplexity([(r.prompt_messages, r.reference) for r in rows])
    ppl_general = gen.perplexity(list(FIDELITY_TEXTS))
    return {**{k: scores[k] for k in (*SCORES, "parsable")}, "ppl_task_answers": ppl_task,
            "ppl_general": ppl_general, "generate_seconds": generate_s,
            "score_seconds": time.perf_counter() - started, "sample": answers[:2], "token_ids": ids}


def with_bundle(base: str, out: Path, adapter: Path | None, precision: str, task: str, rows: list,
                args: argparse.Namespace, keep: bool = False) -> dict[str, Any]:
    """Export (unless `out` holds the bundle already: the plain base's, shared by every seed), then report."""
    started = time.perf_counter()
    if not (out / "manifest.json").is_file():
        export_decoder(base, out, adapter=adapter, precision=precision)
    export_s = time.perf_counter() - started
    report = bundle_report(Generator(out, intra_op_threads=args.threads), task, rows, args)
    if not (keep or args.keep_bundles):
        shutil.rmtree(out)
    return {**report, "export_seconds": export_s}


def pair(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """int8 against fp32: perplexity ratios and greedy agreement."""
    return {"ppl_task_ratio": int8["ppl_task_answers"] / fp32["ppl_task_answers"],
            "ppl_general_ratio": int8["ppl_general"] / fp32["ppl_general"],
            **agreement(fp32["token_ids"], int8["token_ids"])}


def run_seed(task: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train_src, eval_src = f"builtin:{task}:{args.train}", f"builtin:{task}:{args.eval}"
    _, rows = causal_data.load_splits(train_src, eval_src, seed=seed)
    result: dict[str, Any] = {"task": task, "seed": seed}
    adapters = {}
    for qat in (None, "int8"):
        name = qat or "fp32"
        out = work / f"{task}-{seed}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        report = train_causal_lm(args.base, train_src, eval_src, out=out, epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch, rank=args.rank, max_length=args.max_length, qat=qat,
                                 seed=seed, eval_generate=None, max_new_tokens=args.max_new_tokens)
        gen = report["generation"]
        result[f"torch_{name}"] = {**{k: gen[k] for k in (*SCORES, "parsable")}, "sample": gen["predictions"][:2],
                                   "train_seconds": report["seconds"], "steps": report["steps"],
                                   "final_eval_loss": report["history"][-1].get("eval_loss")}
        adapters[name] = out
    result["base_fp32"] = with_bundle(args.base, work / "base-fp32", None, "fp32", task, rows, args, keep=True)
    result["base_int8"] = with_bundle(args.base, work / "base-int8", None, "int8", task, rows, args, keep=True)
    result["bundle_fp32"] = with_bundle(args.base, work / "b-fp32", adapters["fp32"], "fp32", task, rows, args)
    result["bundle_ptq_int8"] = with_bundle(args.base, work / "b-ptq", adapters["fp32"], "int8", task, rows, args)
    result["bundle_qat_int8"] = with_bundle(args.base, work / "b-qat", adapters["int8"], "int8", task, rows, args)
    result["base_int8_vs_fp32"] = pair(result["base_fp32"], result["base_int8"])
    result["ptq_int8_vs_fp32"] = pair(result["bundle_fp32"], result["bundle_ptq_int8"])
    result["qat_int8_vs_fp32"] = pair(result["bundle_fp32"], result["bundle_qat_int8"])
    for name in adapters.values():
        shutil.rmtree(name, ignore_errors=True)
    return result


# --- summary ----------------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


SCORE_COLUMNS = (("torch fp32", "torch_fp32"), ("bundle fp32", "bundle_fp32"), ("bundle PTQ int8", "bundle_ptq_int8"),
                 ("torch QAT", "torch_int8"), ("bundle QAT int8", "bundle_qat_int8"))


def summarize(parts: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for task in sorted({p["task"] for p in parts}):
        rows = [p for p in parts if p["task"] == task]
        s: dict[str, Any] = {"seeds": [p["seed"] for p in rows]}
        for metric in SCORES:
            for _, key in (*SCORE_COLUMNS, ("base", "base_fp32")):
                s[f"{key}.{metric}"] = mean_std([p[key][metric] for p in rows])
            for gap, (a, b) in {"ptq_minus_fp32": ("bundle_ptq_int8", "bundle_fp32"),
                                "qat_minus_fp32": ("bundle_qat_int8", "bundle_fp32"),
                                "qat_minus_ptq": ("bundle_qat_int8", "bundle_ptq_int8")}.items():
                s[f"{gap}.{metric}_points"] = mean_std([100 * (p[a][metric] - p[b][metric]) for p in rows])
        for key in ("base_fp32", "base_int8", "bundle_fp32", "bundle_ptq_int8", "bundle_qat_int8"):
            for ppl in ("ppl_task_answers", "ppl_general"):
                s[f"{key}.{ppl}"] = mean_std([p[key][ppl] for p in rows])
        for key in ("base_int8_vs_fp32", "ptq_int8_vs_fp32", "qat_int8_vs_fp32"):
            for field in ("ppl_task_ratio", "ppl_general_ratio", "prefix_tokens", "identical_answers"):
                s[f"{key}.{field}"] = mean_std([p[key][field] for p in rows])
        summary[task] = s
    return summary


def markdown(parts: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    minutes = ", ".join(f"{p['seconds'] / 60:.1f}" for p in sorted(parts, key=lambda p: (p["task"], p["seed"])))
    lines = [f"# Decoder study: fp32 vs post-training int8 vs QAT int8 on {meta['base']}", "",
             f"CPU: {meta['cpu']}; {meta['threads']} thread(s); {meta['train']} training rows, {meta['epochs']} "
             f"epoch(s), lr {meta['lr']}, batch {meta['batch']}, max_length {meta['max_length']}, "
             f"LoRA r={meta['rank']} q/k/v/o; {meta['eval']} held-out prompts, greedy, up to "
             f"{meta['max_new_tokens']} new tokens. "
             f"Scores in percent, mean ± sample std over seeds; gaps in points. Time per seed (two trainings with "
             f"their torch scoring, three adapter exports, runtime scoring; the first seed of a run also exports "
             f"the plain base twice): "
             f"{minutes} min; {sum(p['seconds'] for p in parts) / 60:.1f} min in all.", ""]
    for task in sorted({p["task"] for p in parts}):
        rows = sorted((p for p in parts if p["task"] == task), key=lambda p: p["seed"])
        seeds = [p["seed"] for p in rows]
        lines += [f"## {task} (seeds {', '.join(map(str, seeds))})", "",
                  "| metric | plain base | " + " | ".join(c for c, _ in SCORE_COLUMNS)
                  + " | PTQ − fp32 | QAT − fp32 | QAT − PTQ |", "|---" * (len(SCORE_COLUMNS) + 5) + "|"]
        for metric in SCORES:
            cells = [pm([p["base_fp32"][metric] for p in rows])]
            cells += [pm([p[key][metric] for p in rows]) for _, key in SCORE_COLUMNS]
            for a, b in (("bundle_ptq_int8", "bundle_fp32"), ("bundle_qat_int8", "bundle_fp32"),
                         ("bundle_qat_int8", "bundle_ptq_int8")):
                cells.append(pm([p[a][metric] - p[b][metric] for p in rows]))
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed (exact match / field accuracy, %):", "",
                  "| seed | " + " | ".join(c for c, _ in SCORE_COLUMNS) + " |", "|---" * (len(SCORE_COLUMNS) + 1) + "|"]
        for p in rows:
            lines.append(f"| {p['seed']} | " + " | ".join(
                f"{100 * p[key]['exact_match']:.1f} / {100 * p[key]['field_accuracy']:.1f}" for _, key in SCORE_COLUMNS)
                + " |")
        lines += ["", "Held-out perplexity from the bundles' logits (answers given their prompts; general English: "
                  f"{len(FIDELITY_TEXTS)} FIDELITY_TEXTS) and greedy agreement with the fp32 bundle over the held-out "
                  "prompts (tokens equal up to the first divergence / identical answers):", "",
                  "| model | fp32 ppl answers | int8 ppl answers | ratio | fp32 ppl general | int8 ppl general | ratio "
                  "| agreeing tokens | identical answers |", "|---" * 9 + "|"]
        for label, f, i, cmp in (("plain base", "base_fp32", "base_int8", "base_int8_vs_fp32"),
                                 ("fp32 adapter, PTQ int8", "bundle_fp32", "bundle_ptq_int8", "ptq_int8_vs_fp32"),
                                 ("QAT adapter int8 (vs fp32 adapter)", "bundle_fp32", "bundle_qat_int8",
                                  "qat_int8_vs_fp32")):
            lines.append(f"| {label} | " + " | ".join([
                pm([p[f]["ppl_task_answers"] for p in rows], 1, 4), pm([p[i]["ppl_task_answers"] for p in rows], 1, 4),
                pm([p[cmp]["ppl_task_ratio"] for p in rows], 1, 4),
                pm([p[f]["ppl_general"] for p in rows], 1, 2), pm([p[i]["ppl_general"] for p in rows], 1, 2),
                pm([p[cmp]["ppl_general_ratio"] for p in rows], 1, 4),
                pm([p[cmp]["prefix_tokens"] for p in rows]), pm([p[cmp]["identical_answers"] for p in rows])]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, parts: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """study.json (settings, summary, every part without its token ids) and study.md, each atomically."""
    slim = [{k: ({kk: vv for kk, vv in v.items() if kk != "token_ids"} if isinstance(v, dict) else v)
             for k, v in p.items()} for p in parts]
    write_text_atomic(out / "study.json", json.dumps({"meta": meta, "summary": summarize(parts), "parts": slim},
                                                     indent=1))
    write_text_atomic(out / "study.md", markdown(parts, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--tasks", default="home-json", help="comma-separated: home-json,meeting")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1")
    parser.add_argument("--train", type=int, default=240, help="training rows")
    parser.add_argument("--eval", type=int, default=48, help="held-out prompts")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--gen-batch", type=int, default=16, help="prompts per runtime batch")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--keep-bundles", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/decoder_study"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {k: getattr(args, k) for k in ("base", "train", "eval", "epochs", "lr", "batch", "rank", "max_length",
                                              "max_new_tokens")}
    meta = {**settings, "threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__}
    work, part_dir = args.out / "work", args.out / "parts"
    shutil.rmtree(work, ignore_errors=True)  # a previous run's leftovers (the base bundles are remade)
    part_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = []
    for task in args.tasks.split(","):
        for seed in range(args.seeds):
            path = part_dir / f"{task}-seed{seed}.json"
            if path.is_file() and json.loads(path.read_text())["settings"] == settings:
                parts.append(json.loads(path.read_text())["result"])
                continue
            t0 = time.perf_counter()
            result = run_seed(task, seed, args, work)
            result["seconds"] = time.perf_counter() - t0
            write_text_atomic(path, json.dumps({"settings": settings, "result": result}, indent=1))
            parts.append(result)
            meta["wall_seconds"] = time.perf_counter() - started
            write_results(args.out, parts, meta)
            print(f"{task} seed {seed}: {result['seconds']:.0f} s", flush=True)
    meta["wall_seconds"] = time.perf_counter() - started
    write_results(args.out, parts, meta)
    shutil.rmtree(work, ignore_errors=True)
    print((args.out / "study.md").read_text())


if __name__ == "__main__":
    main()
