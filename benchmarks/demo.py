"""The edgelora demo: int8-aware LoRA adapters trained, exported, switched and benchmarked.

Runs the same `edgelora` commands the README shows, on synthetic tasks generated inside the project.
Encoder part: two adapters on all-MiniLM-L6-v2 (smart-home commands -> intent, short product reviews ->
sentiment; see edgelora/data.py), each task's held-out accuracy in fp32 and int8 and the int8-versus-fp32
latency table. Slot-filling part: a token-classification adapter on MiniLM tagging the room, device and
temperature in smart-home commands (builtin:slots), its entities with offsets, and held-out entity-level F1
of the merged fp32 and int8 bundles (runs/demo/slots.json). Decoder part: a generation adapter on
SmolLM2-135M (smart-home command -> JSON action, see edgelora/generation_tasks.py) trained with int8 QAT,
exported fp32 and int8, a few held-out prompts answered with and without it, the held-out task score of each
bundle and its decode speed (runs/demo/decoder.json, .md).

    python benchmarks/demo.py [--out runs/demo] [--skip-encoder] [--skip-slots] [--skip-decoder] [--decoder-rows 240]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgelora.atomic import write_text_atomic
from edgelora.runtime import Runtime

TASKS = ("intent", "sentiment")
EXAMPLES = (
    "could you switch the bedroom lamp off, it's too bright",
    "play something relaxing in the living room",
    "the battery is great but the screen cracked in a week",
    "honestly not bad at all for the price",
)
GEN_TASK = "home-json"  # the decoder part's builtin generation task
GEN_ADAPTER = "home"
SHOWN_PROMPTS = 3  # held-out prompts printed with and without the adapter
SPEED_PROMPTS = 4  # held-out prompts each timing process answers


def sh(*args: str, capture: bool = False) -> str:
    """Run one edgelora command, echoing it as a user would type it; its stdout when `capture`."""
    print(f"\n$ edgelora {shlex.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "edgelora.cli", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout if capture else ""


def accuracy(rt: Runtime, adapter: str, texts: list[str], labels: list[int], label_names: tuple[str, ...]) -> float:
    correct = 0
    for i in range(0, len(texts), 64):
        preds = rt.predict(texts[i : i + 64], adapter=adapter)
        correct += sum(p["label"] == label_names[y] for p, y in zip(preds, labels[i : i + 64]))
    return correct / len(texts)


def encoder_part(args: argparse.Namespace, out: Path) -> None:
    from edgelora.data import load_splits

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


# --- token classification: slot filling ---------------------------------------------------------------------
SLOT_EXAMPLES = ("set the guest room to 21.5 degrees please", "could you switch on the ceiling fan in the study")


def bundle_entity_f1(rt: Runtime, adapter: str | None, ds) -> dict[str, float]:
    """Entity-level F1 of a token-classification bundle on a `TokenDataset` whose words are `entities.words`'s."""
    from edgelora.runtime.entities import entity_f1, words

    gold, pred = [], []
    for i in range(0, len(ds), 64):
        texts = list(ds.texts[i : i + 64])
        for j, p in enumerate(rt.predict(texts, adapter=adapter)):
            if [(w["start"], w["end"]) for w in p["words"]] != [tuple(s) for s in ds.spans[i + j]]:
                raise RuntimeError(f"example {i + j}: the bundle's words differ from the data's; use builtin data")
            gold.append(ds.tag_names(i + j))
            pred.append([w["label"] for w in p["words"]])
    return entity_f1(gold, pred)


def slots_part(args: argparse.Namespace, out: Path) -> dict:
    """A token-classification LoRA (room, device, temperature spans) trained with int8 QAT on MiniLM, exported
    merged fp32 and int8; held-out entity-level F1 of each bundle."""
    from edgelora.token_data import load_token_splits

    data = f"builtin:slots:{args.slot_size}"
    sh("train", "--task", "token-classification", "--base", "minilm", "--data", data, "--name", "slots",
       "--qat", "int8", "--epochs", str(args.epochs), "--out", str(out / "adapters" / "slots"))
    bundles = {}
    for precision in ("fp32", "int8"):
        bundles[precision] = out / "bundles" / f"merged-slots-{precision}"
        sh("export", "minilm", "--adapter", f"slots={out / 'adapters' / 'slots'}", "--mode", "merged",
           "--precision", precision, "--out", str(bundles[precision]))
    rt = Runtime(bundles["int8"])
    print("\nslot filling, merged int8 bundle:")
    for text, p in zip(SLOT_EXAMPLES, rt.predict(list(SLOT_EXAMPLES))):
        shown = ", ".join(f"{e['label']}={e['text']!r} [{e['start']}:{e['end']}] ({e['score']:.2f})" for e in p["entities"])
        print(f"  {text!r:52} -> {shown or 'no entities'}")
    _, eval_ds = load_token_splits(data, seed=0)
    result = {p: bundle_entity_f1(Runtime(b), None, eval_ds) for p, b in bundles.items()}
    print(f"\nheld-out entity-level F1 ({len(eval_ds)} commands, exact span and type):")
    print(f"  {'bundle':14} {'precision':>9} {'recall':>8} {'F1':>8}")
    for p, r in result.items():
        print(f"  {'merged ' + p:14} {r['precision']:9.3f} {r['recall']:8.3f} {r['f1']:8.3f}")
    write_text_atomic(out / "slots.json", json.dumps({"data": data, "eval_size": len(eval_ds), **result}, indent=2) + "\n")
    return result


# --- decoder part ---------------------------------------------------------------------------------------------
def held_out_rows(rows: int, n: int):
    """The first `n` held-out rows of `builtin:home-json:ROWS`: the rows `edgelora train --eval-generate n` scored."""
    from edgelora.causal_data import load_splits

    _, eval_rows = load_splits(f"builtin:{GEN_TASK}:{rows}", seed=0)
    return eval_rows[:n]


def bundle_score(bundle: Path, adapter: str | None, rows, max_new_tokens: int, batch: int = 16) -> dict:
    """The held-out task score of a bundle, its greedy answers decoded in batches (rows don't see their batch-mates)."""
    from edgelora import generation_tasks
    from edgelora.runtime.generate import Generator

    gen = Generator(bundle)
    answers: list[str] = []
    for i in range(0, len(rows), batch):
        prompts = [r.prompt_messages for r in rows[i : i + batch]]
        answers += [a.strip() for a in gen.generate_batch(prompts, adapter, max_new_tokens=max_new_tokens)]
    scores = generation_tasks.score(GEN_TASK, answers, [r.reference for r in rows])
    return {**scores, "rows": len(rows), "answers": answers}


def time_bundle(bundle: str, adapter: str | None, rows: int, max_new_tokens: int, threads: int) -> dict:
    """Batch-1 greedy generation of the first SPEED_PROMPTS held-out prompts with one bundle, in this process
    alone (one warm-up answer first): per prompt, its tokens, first-token latency and decode rate."""
    from edgelora.runtime.generate import Generator

    gen = Generator(bundle, intra_op_threads=threads)
    prompts = [r.prompt_messages for r in held_out_rows(rows, SPEED_PROMPTS)]
    gen.generate(prompts[0], adapter, max_new_tokens=max_new_tokens)
    timed = []
    for prompt in prompts:
        gen.generate(prompt, adapter, max_new_tokens=max_new_tokens)
        st = gen.stats
        timed.append({"prompt_tokens": st.prompt_tokens[0], "new_tokens": st.decode_runs + 1,
                      "first_token_s": st.prefill_s,
                      "decode_tokens_per_s": st.decode_runs / st.decode_s if st.decode_runs else None})
    return {"threads": threads, "prompts": timed}


def bundle_mb(bundle: Path) -> float:
    """The bundle's files as exported (the runtime's optimized-graph cache under .cache/ left out)."""
    return sum(f.stat().st_size for f in bundle.iterdir() if f.is_file()) / 2**20


def decoder_part(args: argparse.Namespace, out: Path) -> dict:
    started = time.time()
    rows, n_eval, max_new = args.decoder_rows, args.eval_prompts, args.max_new_tokens
    adapter_dir = out / "adapters" / GEN_ADAPTER

    train_report = out / "decoder_train.json"  # what `edgelora train` printed: the torch model's held-out score
    bundles = {p: out / "bundles" / f"smollm2-{GEN_ADAPTER}-{p}" for p in ("fp32", "int8")}
    base_bundle = out / "bundles" / "smollm2-int8"
    if args.reuse_decoder:
        missing = [str(p) for p in (train_report, *bundles.values(), base_bundle) if not p.exists()]
        if missing:
            raise SystemExit(f"--reuse-decoder: {', '.join(missing)} missing; run the decoder part once without it")
        report = json.loads(train_report.read_text())
        print(f"\nreusing the adapter and bundles under {out} (--reuse-decoder)")
        train_s = export_s = 0.0
    else:
        # 1. Train a generation adapter on SmolLM2 with the decoder's int8 fake quantization (blocks of 32).
        trained = sh("train", "--task", "causal-lm", "--base", "smollm2", "--data", f"builtin:{GEN_TASK}:{rows}",
                     "--name", GEN_ADAPTER, "--qat", "int8", "--eval-generate", str(n_eval),
                     "--max-new-tokens", str(max_new), "--out", str(adapter_dir), capture=True)
        report = json.loads(trained.strip().splitlines()[-1])
        print(json.dumps(report))
        write_text_atomic(train_report, json.dumps(report, indent=2) + "\n")
        train_s = time.time() - started

        # 2. Export the adapter merged, fp32 and int8, and the plain base int8 for "without the adapter".
        for precision, bundle in bundles.items():
            sh("export", "smollm2", "--adapter", f"{GEN_ADAPTER}={adapter_dir}", "--precision", precision,
               "--out", str(bundle))
        sh("export", "smollm2", "--precision", "int8", "--out", str(base_bundle))
        export_s = time.time() - started - train_s

    # 3. A few held-out prompts, with and without the adapter (both int8 bundles).
    held_out = held_out_rows(rows, n_eval)
    shown = held_out[:SHOWN_PROMPTS]
    plain = Runtime(base_bundle)
    tuned = Runtime(bundles["int8"])
    print(f"\nheld-out prompts, int8 bundles (greedy, at most {max_new} new tokens):")
    examples = []
    for r in shown:
        prompt = r.prompt_messages
        without = plain.generate(prompt, max_new_tokens=max_new).strip()
        with_adapter = tuned.generate(prompt, GEN_ADAPTER, max_new_tokens=max_new).strip()
        examples.append({"prompt": prompt[-1]["content"], "reference": r.reference, "base": without,
                         "adapter": with_adapter})
        print(f"  prompt:       {prompt[-1]['content']}\n  plain base:   {without!r}\n"
              f"  with adapter: {with_adapter}\n  reference:    {r.reference}\n")
    del plain, tuned

    # 4. Held-out task score of each bundle, on the prompts the training scored in torch.
    scores = {"torch (training, fake-quant)": report.get("generation", {})}
    for label, bundle, adapter in (("fp32 bundle", bundles["fp32"], GEN_ADAPTER), ("int8 bundle", bundles["int8"], GEN_ADAPTER),
                                   ("plain base int8", base_bundle, None)):
        scores[label] = bundle_score(bundle, adapter, held_out, max_new)
    print(f"held-out {GEN_TASK} score ({len(held_out)} prompts, exact match / field accuracy):")
    for label, s in scores.items():
        print(f"  {label:30} {s.get('exact_match', float('nan')):6.3f} {s.get('field_accuracy', float('nan')):6.3f}")
    score_s = time.time() - started - train_s - export_s

    # 5. Decode speed, batch 1: each bundle timed in a process of its own, fp32 and int8 alternating.
    from edgelora.runtime.cpu import detect_isa

    cpu = detect_isa()
    threads = args.threads or cpu.physical_cores
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for round_ in range(args.speed_rounds):
        for precision in (("fp32", "int8") if round_ % 2 == 0 else ("int8", "fp32")):
            child = subprocess.run([sys.executable, __file__, "--time-bundle", str(bundles[precision]),
                                    "--decoder-rows", str(rows), "--max-new-tokens", str(max_new),
                                    "--threads", str(threads)],
                                   check=True, text=True, stdout=subprocess.PIPE)
            runs[precision] += json.loads(child.stdout.strip().splitlines()[-1])["prompts"]
    speed = {}
    for precision, timed in runs.items():
        rates = [t["decode_tokens_per_s"] for t in timed if t["decode_tokens_per_s"]]
        speed[precision] = {"decode_tokens_per_s": statistics.median(rates),
                            "first_token_ms": 1000 * statistics.median(t["first_token_s"] for t in timed),
                            "prompt_tokens": statistics.median(t["prompt_tokens"] for t in timed),
                            "new_tokens": statistics.median(t["new_tokens"] for t in timed),
                            "samples": len(timed), "mb": bundle_mb(bundles[precision])}
    speed_s = time.time() - started - train_s - export_s - score_s

    result = {
        "task": GEN_TASK, "rows": rows, "steps": report["steps"],
        "held_out_prompts": len(held_out), "max_new_tokens": max_new, "examples": examples,
        "scores": {k: {m: v for m, v in s.items() if m != "answers"} for k, s in scores.items()},
        "held_out": [{"prompt": r.prompt_messages[-1]["content"], "reference": r.reference,
                      **{k: s["answers"][i] for k, s in scores.items() if "answers" in s}} for i, r in enumerate(held_out)],
        "speed": speed, "threads": threads,
        "speed_note": f"batch 1, greedy, median over {args.speed_rounds} rounds x {SPEED_PROMPTS} held-out prompts "
                      f"(after a warm-up answer), each bundle in its own process, fp32/int8 alternating",
        "seconds": {"train": train_s, "export": export_s, "score": score_s, "speed": speed_s,
                    "total": time.time() - started},
        "cpu": cpu_name(), "cores": os.cpu_count(), "isa": cpu.isa, "load_average": os.getloadavg(),
    }
    table = decoder_table(result)
    print("\n" + table)
    write_text_atomic(out / "decoder.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "decoder.md", table)
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def decoder_table(result: dict) -> str:
    """The decoder part's markdown table: task score beside speed, per model."""
    n = result["held_out_prompts"]
    lines = [f"| SmolLM2-135M + `{GEN_ADAPTER}` ({GEN_TASK}) | exact match ({n}) | field accuracy | decode tokens/s "
             "| first token (ms) | size (MB) |", "|---|---|---|---|---|---|"]
    for label, s in result["scores"].items():
        precision = label.split()[0] if label.endswith(" bundle") else None
        sp = result["speed"].get(precision) if precision else None
        speed = (f"{sp['decode_tokens_per_s']:.1f} | {sp['first_token_ms']:.0f} | {sp['mb']:.0f}" if sp else "- | - | -")
        em, fa = s.get("exact_match"), s.get("field_accuracy")
        lines.append(f"| {label} | {em:.3f} | {fa:.3f} | {speed} |" if em is not None else f"| {label} | - | - | {speed} |")
    lines.append("")
    sp = result["speed"]["int8"]
    lines.append(f"{result['speed_note']}; {result['threads']} intra-op threads; prompts ~{sp['prompt_tokens']:.0f} "
                 f"tokens, answers ~{sp['new_tokens']:.0f}; {result['cpu']} ({result['isa']}), {result['cores']} cores, "
                 f"load average {result['load_average'][0]:.1f} at the end.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--skip-encoder", action="store_true", help="leave out the MiniLM classification part")
    parser.add_argument("--skip-decoder", action="store_true", help="leave out the SmolLM2 generation part")
    parser.add_argument("--skip-slots", action="store_true", help="leave out the MiniLM slot-filling part")
    parser.add_argument("--slot-size", type=int, default=800,
                        help="slot filling: builtin:slots commands (20%% held out, with unseen paraphrases)")
    parser.add_argument("--train-size", type=int, default=2000, help="encoder: examples per task (20%% held out)")
    parser.add_argument("--epochs", type=int, default=3, help="encoder: epochs per adapter")
    parser.add_argument("--rounds", type=int, default=20, help="encoder: benchmark rounds per shape")
    parser.add_argument("--decoder-rows", type=int, default=240,
                        help="decoder: builtin:home-json rows (20%% held out; 1 epoch of batch 8 over the rest)")
    parser.add_argument("--eval-prompts", type=int, default=48, help="decoder: held-out prompts scored")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="decoder: tokens per answer at most")
    parser.add_argument("--speed-rounds", type=int, default=3,
                        help="decoder: timing processes per bundle (fp32 and int8 alternating)")
    parser.add_argument("--threads", type=int, default=None, help="decoder: intra-op threads when timing "
                        "(default: the physical cores, as Runtime uses)")
    parser.add_argument("--reuse-decoder", action="store_true",
                        help="decoder: keep the adapter and bundles of an earlier run in --out (no training or "
                             "export); prompts, scores and timing run again")
    parser.add_argument("--time-bundle", default=None, help=argparse.SUPPRESS)  # the timing child process
    args = parser.parse_args()
    if args.time_bundle:
        print(json.dumps(time_bundle(args.time_bundle, GEN_ADAPTER, args.decoder_rows, args.max_new_tokens,
                                     args.threads)))
        return 0
    held_out = max(1, round(args.decoder_rows * 0.2))
    if not 1 <= args.eval_prompts <= held_out:
        parser.error(f"--eval-prompts {args.eval_prompts}: builtin:{GEN_TASK}:{args.decoder_rows} holds out "
                     f"{held_out} rows; ask for 1 to {held_out} or raise --decoder-rows")
    out = Path(args.out)
    start = time.time()
    if not args.skip_encoder:
        encoder_part(args, out)
        print(f"\nencoder part finished in {time.time() - start:.0f} s", flush=True)
    if not args.skip_slots:
        slots_start = time.time()
        slots_part(args, out)
        print(f"\nslot-filling part finished in {time.time() - slots_start:.0f} s", flush=True)
    if not args.skip_decoder:
        decoder_start = time.time()
        decoder_part(args, out)
        print(f"\ndecoder part finished in {time.time() - decoder_start:.0f} s", flush=True)
    print(f"\ndemo finished in {time.time() - start:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
