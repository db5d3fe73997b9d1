"""Decoder bench results for people: the terminal table (speed and fidelity side by side) and a PNG chart."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgelora.atomic import write_file_atomic
from edgelora.errors import EdgeloraError


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def header(result: dict) -> list[str]:
    """The lines above the table: machine, ISA, load, settings, method of the fidelity columns."""
    m, s, f = result["machine"], result["settings"], result["fidelity"]
    load = m.get("load_average")
    load_text = f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""
    return [
        f"{m['model']} ({m['isa']}, {m['physical_cores']} physical cores{load_text}), onnxruntime "
        f"{result['onnxruntime']}, {s['threads']} threads, spinning {'on' if s['spinning'] else 'off'}",
        f"one process per candidate, interleaved: {s['rounds']} rounds after {s['warmup']} warm-up; medians over "
        f"rounds; decode: {s['decode_prompt']}-token prompt then {s['new_tokens']} greedy steps, "
        f"batch 1 and {s['concurrent']} rows together (tok/s of all rows)",
        f"agree: greedy tokens equal to the fp32 reference's before the first divergence, share over "
        f"{f['agreement_prompts']} prompts x {f['agreement_tokens']} tokens (exact: prompts matching entirely); "
        f"ppl x: held-out perplexity over the reference's ({f['held_out_texts']} texts; [95% paired bootstrap "
        "interval over texts])",
    ]


def _ci(interval: list[float] | None) -> str:
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "–"


def format_decoder_table(result: dict) -> str:
    """One row per candidate: first-token ms per P, decode tok/s at batch 1 and B, step percentiles, size,
    RSS, agreement and perplexity ratio; 'not run' candidates listed below with their reasons."""
    s = result["settings"]
    ps, conc = [str(p) for p in s["prompt_tokens"]], str(s["concurrent"])
    rows = result["rows"]
    width = max([len("candidate")] + [len(r["label"]) for r in rows] + [len(n["label"]) for n in result.get("not_run", [])])
    head = (f"{'candidate':<{width}}  " + "  ".join(f"{'ttft' + p:>9}" for p in ps) + f"  {'tok/s b1':>8}  "
            + (f"{'tok/s b' + conc:>9}  {'gain':>5}  " if conc != "1" else "")
            + f"{'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  {'size MB':>7}  {'RSS MB':>7}  {'agree':>6}  "
            f"{'exact':>5}  {'ppl x':>7}  {'[95% interval]':>16}")
    lines = header(result) + ["", head, "-" * len(head)]
    for r in rows:
        one = r["decode"]["1"]
        many = r["decode"].get(conc)
        f = r["fidelity"]
        agree = f.get("agreement") or {}
        cells = [f"{r['label']:<{width}}"] + [f"{_num(r['ttft_ms'][p], '.1f'):>9}" for p in ps]
        cells.append(f"{_num(one['tokens_s'], '.1f'):>8}")
        if conc != "1":
            cells += [f"{_num(many['tokens_s'] if many else None, '.1f'):>9}", f"{_num(r.get('batch_gain'), '.2f'):>5}"]
        cells += [f"{_num(one.get('p50_ms'), '.2f'):>7}", f"{_num(one.get('p95_ms'), '.2f'):>7}",
                  f"{_num(one.get('p99_ms'), '.2f'):>7}", f"{_mb(r['size_bytes']):>7}", f"{_mb(r['rss_peak_bytes']):>7}",
                  f"{_num(agree.get('prefix_share'), '.3f'):>6}", f"{_num(agree.get('exact_share'), '.2f'):>5}",
                  f"{_num(f.get('perplexity_ratio'), '.4f'):>7}",
                  f"{_ci(f.get('perplexity_ratio_ci95')):>16}"]
        lines.append("  ".join(cells))
    said: dict[str, list[str]] = {}  # note -> the candidates it is about, so a shared note is one line
    for r in rows:
        if conc in r["decode"] and r["decode"][conc].get("note"):
            said.setdefault(f"{conc} rows: {r['decode'][conc]['note']}", []).append(r["label"])
        if r["fidelity"].get("note"):
            said.setdefault(r["fidelity"]["note"], []).append(r["label"])
    notes = [f"{', '.join(labels)}: {note}" for note, labels in said.items()]
    refs = sorted({(r["label"], r["fidelity"]["reference_label"]) for r in rows
                   if r["fidelity"]["reference_label"] not in (None, r["label"])})
    if refs:
        notes.append("fp32 references: " + "; ".join(f"{a} vs {b}" for a, b in refs))
    mixed = [f"{r['label']}: {conc} rows on adapters {r['decode'][conc]['adapters']}" for r in rows
             if conc in r["decode"] and len(set(r["decode"][conc].get("adapters") or [None])) > 1]
    lines += [""] + notes + mixed if notes or mixed else []
    for n in result.get("not_run", []):
        lines.append(f"{n['label']}: not run ({n['reason']})")
    for c in result.get("comparisons", []):
        lines.append(f"{c['what']}: {_num(c['ratio'], '.2f')}x")
    return "\n".join(lines)


def plot_decoder(result: dict, path_png: str | os.PathLike) -> None:
    """Two panels: decode tok/s (batch 1 and B) and first-token ms per P, one bar per candidate; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeloraError("plotting needs matplotlib; pip install matplotlib (or edgelora[dev])") from None
    rows, s = result["rows"], result["settings"]
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(4 + 1.4 * len(rows), 4.4))
    sizes = ["1"] + ([str(s["concurrent"])] if s["concurrent"] > 1 else [])
    w = 0.8 / len(sizes)
    for k, size in enumerate(sizes):
        vals = [(r["decode"].get(size) or {}).get("tokens_s") or 0.0 for r in rows]
        a.bar(x + k * w, vals, w, label=f"batch {size}")
    a.set_ylabel("decode tokens/s (all rows)")
    a.legend(fontsize=7)
    ps = [str(p) for p in s["prompt_tokens"]]
    w = 0.8 / len(ps)
    for k, p in enumerate(ps):
        b.bar(x + k * w, [r["ttft_ms"][p] for r in rows], w, label=f"P = {p}")
    b.set_ylabel("time to first token (ms)")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks(x + 0.4 - 0.4 / len(sizes if ax is a else ps), labels, rotation=30, ha="right", fontsize=7)
    fig.suptitle("\n".join(header(result)[:2]), fontsize=7)
    fig.tight_layout()
    write_file_atomic(Path(path_png), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
