"""Bench results for people: the terminal table, the one-line fidelity note and the latency chart (PNG)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgelora.atomic import write_file_atomic
from edgelora.errors import EdgeloraError
from edgelora.runtime.fidelity import GENERATED_ROWS, GENERATED_SEQ, OUTPUTS


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _agree(f: Mapping) -> str:
    """The label agreement as a percentage of rows, or '-' (no logits on both sides)."""
    share = f.get("label_agreement")
    return "-" if share is None else f"{100 * share:.1f}%"


def _fidelity_cells(f: Mapping | None) -> str:
    """`of  worst cos  max |d|  agree  acc` cells of a row, or its note where there is no figure."""
    if f is None:
        return f"{'-':<6}  {'-':>9}  {'-':>8}  {'-':>6}  {'-':>5}"
    acc = "-" if f.get("accuracy") is None else f"{f['accuracy']:.3f}"
    if f.get("worst_cosine") is None:
        return f"{str(f.get('note') or '-'):>27}  {'-':>6}  {acc:>5}"
    of = {"embeddings": "emb"}.get(f["output"], f["output"])
    return f"{of:<6}  {f['worst_cosine']:>9.5f}  {f['max_abs_diff']:>8.2e}  {_agree(f):>6}  {acc:>5}"


def fidelity_note(result: dict) -> str:
    """One line saying what the fidelity columns measure."""
    f = result.get("fidelity") or {}
    src = f"{f.get('texts', 0)} texts ({f.get('source', 'built-in sentences')})"
    rows, seq = f.get("generated_ids", [GENERATED_ROWS, GENERATED_SEQ])
    acc = "; acc: accuracy on its labels" if f.get("labelled") else ""
    names = f.get("outputs", list(OUTPUTS))
    of = " or ".join(names) + (" (the first both sides have)" if len(names) > 1 else "")
    return (f"fidelity vs each row's fp32 reference, on {src} in chunks of the row's batch size (no tokenizer: "
            f"{rows}x{seq} generated ids):\nworst row cosine and max abs diff of the output named under 'of', "
            f"{of}; agree: rows whose label (argmax of logits) is the reference's{acc}")


def format_table(result: dict) -> str:
    """The result as a terminal table: one row per bundle and shape, then the speed-ups."""
    m, s = result["machine"], result["settings"]
    lines = [
        f"{m['model']} ({m['isa']}, {m['physical_cores']} physical cores), onnxruntime {result['onnxruntime']}, "
        f"{s['threads']} threads, spinning " + (f"on ({s['settle_ms']:g} ms settle before each run)"
                                                if s["spinning"] else "off"),
        f"one process per bundle, interleaved: {s['rounds']} rounds per shape after {s['warmup']} warm-up runs",
        fidelity_note(result),
        "",
    ]
    width = max(len("bundle"), *(len(b["label"]) for b in result["bundles"]))
    mode_w = max(4, *(len(str(b.get("mode"))) for b in result["bundles"]))
    head = (f"{'bundle':<{width}}  {'mode':<{mode_w}}  {'prec':<4}  {'shape':>7}  {'p50 ms':>8}  {'p95 ms':>8}  "
            f"{'p99 ms':>8}  {'seq/s':>8}  {'size MB':>7}  {'RSS MB':>7}  {'of':<6}  {'worst cos':>9}  {'max |d|':>8}  "
            f"{'agree':>6}  {'acc':>5}")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        b = result["bundles"][r["bundle"]]
        lines.append(
            f"{b['label']:<{width}}  {str(b.get('mode')):<{mode_w}}  {str(b.get('precision')):<4}  "
            f"{r['batch']:>3}x{r['seq']:<3}  {r['p50_ms']:>8.3f}  {r['p95_ms']:>8.3f}  {r['p99_ms']:>8.3f}  "
            f"{r['throughput_seq_s']:>8.1f}  {_mb(r['size_bytes']):>7}  {_mb(r['rss_peak_bytes']):>7}  "
            f"{_fidelity_cells(r.get('fidelity'))}"
        )
    refs = {(r["bundle"], r["fidelity"]["reference_label"]) for r in result["rows"] if r.get("fidelity")}
    named = sorted({(result["bundles"][i]["label"], ref) for i, ref in refs
                    if ref is not None and ref != result["bundles"][i]["label"]})
    if named:
        lines += ["", "fp32 references: " + "; ".join(f"{lab} vs {ref}" for lab, ref in named)]
    if result["speedups"]:
        lines += ["", "speed-up (ratio of p50s; median of per-round ratios in brackets)"]
        for sp in result["speedups"]:
            base, cand = (result["bundles"][sp[k]]["label"] for k in ("baseline", "candidate"))
            lines.append(f"  {sp['kind']:<17}  {cand} over {base}  {sp['batch']}x{sp['seq']}:  "
                         f"{sp['speedup']:.2f}x ({sp['speedup_paired']:.2f}x)")
    return "\n".join(lines)


def plot(result: dict, path_png: str | os.PathLike) -> None:
    """p50 latency bars (p95 whiskers) per shape and bundle, speed-ups written above candidates; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeloraError("plotting needs matplotlib; pip install matplotlib (or edgelora[dev])") from None
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in result["rows"]))
    bundles = result["bundles"]
    rows = {(r["bundle"], r["batch"], r["seq"]): r for r in result["rows"]}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(2.2 + 1.1 * len(bundles) * len(shapes), 4.2), squeeze=False)
    for ax, (batch, seq) in zip(axes[0], shapes):
        p50 = [rows[(i, batch, seq)]["p50_ms"] for i in range(len(bundles))]
        p95 = [rows[(i, batch, seq)]["p95_ms"] for i in range(len(bundles))]
        x = np.arange(len(bundles))
        ax.bar(x, p50, color=[colors[i % len(colors)] for i in x],
               yerr=[np.zeros(len(x)), np.subtract(p95, p50)], capsize=3)
        stacked = [0] * len(bundles)  # several comparisons on one bar stack upwards
        for sp in result["speedups"]:
            if (sp["batch"], sp["seq"]) == (batch, seq):
                c = sp["candidate"]
                ax.annotate(f"{sp['kind'].split('/')[0]} {sp['speedup']:.2f}x", (c, p95[c]), textcoords="offset points",
                            xytext=(0, 4 + 10 * stacked[c]), ha="center", fontsize=7)
                stacked[c] += 1
        ax.set_title(f"batch {batch} x seq {seq}", fontsize=9)
        ticks = []
        for i, b in enumerate(bundles):
            f = rows[(i, batch, seq)].get("fidelity") or {}
            cos = f"cos {f['worst_cosine']:.5f}" if f.get("worst_cosine") is not None else (f.get("note") or "")
            if f.get("label_agreement") is not None:
                cos += f"\nlabels {_agree(f)}"
            ticks.append(f"{b['label']}\n{cos}" if cos else b["label"])
        ax.set_xticks(x, ticks, rotation=30, ha="right", fontsize=7)
        ax.margins(y=0.15)
    axes[0][0].set_ylabel("latency p50 (ms), whisker p95")
    m = result["machine"]
    fig.suptitle(f"{m['model']} ({m['isa']}), onnxruntime {result['onnxruntime']}, "
                 f"{result['settings']['threads']} threads, one process per bundle, spinning "
                 f"{'on' if result['settings']['spinning'] else 'off'}\n"
                 "under each bar: worst cosine to its fp32 reference at that batch size", fontsize=9)
    fig.tight_layout()
    write_file_atomic(Path(path_png), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
