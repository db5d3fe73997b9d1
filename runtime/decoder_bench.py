"""The decoder half of `edgelora bench`: first-token latency, decode rate and fidelity of generating engines.

Every candidate (a decoder bundle here; torch, ONNX Runtime GenAI and llama.cpp peers in
benchmarks/decoder_peers.py) runs in a worker process of its own (`edgelora.runtime.worker`) and answers four
decoder ops: `ttft` (prefill a prompt of P token ids and pick the first token), `decode` (prefill, then a
fixed number of greedy steps for one or more rows, end-of-sequence ignored so every candidate decodes as
many tokens), `greedy` (continuations of the agreement prompts) and `perplexity` (of the held-out texts as
token ids the parent makes, the same ids for every candidate). The parent drives them in
interleaved rounds (A B A B per measurement, one process running at a time) and reports medians over rounds.
`python -m edgelora.runtime.decoder_bench --worker BUNDLE` is a bundle's worker process.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import CAUSAL_LM, LOGITS_TO_KEEP, TOKENIZER_FILE, read_manifest
from edgelora.runtime.cpu import detect_isa
from edgelora.runtime.fidelity import (AGREEMENT_PROMPTS, HELD_OUT_TEXTS, greedy_agreement, perplexity_ratio_interval,
                                       pooled_perplexity)
from edgelora.runtime.session import first_line
from edgelora.runtime.shared_kv import SharedKV
from edgelora.runtime.worker import Candidate, Worker, serve_worker

DECODER_RESULT_VERSION = 1
PROMPT_TOKENS = (32, 256)  # the prompt lengths for time to first token
NEW_TOKENS = 64  # greedy decode steps per timed decode run
CONCURRENT = 4  # rows decoded together for the batched rate
AGREEMENT_TOKENS = 32  # greedy tokens compared per agreement prompt
DECODE_PROMPT = 32  # prompt tokens before a timed decode run
METHOD = ("one worker process per candidate, loaded once; after warm-up, interleaved rounds: per measurement (first "
          "token at each P, decode at batch 1, decode at batch B) one run per candidate, one process running at a "
          "time; prompts are the same token ids for every candidate (a fixed English passage, cycled to P tokens); "
          "decode runs prefill a 32-token prompt, then time each greedy step with end-of-sequence ignored")
# A plain passage cycled to build prompts of exactly P tokens: every candidate reads the same ids.
PASSAGE = ("The harbour was quiet in the early morning. Fishing boats rocked gently against the pier while gulls "
           "circled overhead, and the smell of salt and diesel drifted over the market stalls that were only "
           "beginning to open. An old man mended a net on an upturned crate, counting the knots under his breath. ")
Progress = Callable[[int, int, str], None]


class BundleDecoder:
    """A decoder bundle behind the bench ops: its session driven directly, greedy, with per-row adapters.

    Rows of one run use `Runtime.row_options` (one adapter for all rows: its RunOptions; different adapters:
    the bundle's adapter bank and `adapter_ids`), so the timed loop is what a batching server runs.
    """

    def __init__(self, bundle: str, adapter: str | None, threads: int | None, spinning: bool) -> None:
        from edgelora.runtime.runtime import Runtime

        self.rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=spinning)
        if self.rt.manifest.task != CAUSAL_LM:
            raise EdgeloraError(f"{bundle}: task {self.rt.manifest.task!r} is not a decoder; the decoder bench "
                                "times causal-lm bundles")
        self.gen = self.rt.generator()
        self.spec = self.gen.spec
        self.adapter = adapter
        self.rt.row_options([adapter])  # an unknown adapter name fails here, before any timing
        self.vocab = self.spec.vocab_size or self.gen.tokenizer.get_vocab_size()
        self.threads = self.rt.intra_op_threads
        self.labels: tuple[str, ...] = ()
        self.size_bytes = None  # the parent reads the bundle's files
        self.input_names = list(self.rt.manifest.inputs)
        self._past = [f"past_key_values.{i}.{kv}" for i in range(self.spec.num_layers) for kv in ("key", "value")]
        self._outputs = ["logits", *(f"present.{i}.{kv}" for i in range(self.spec.num_layers) for kv in ("key", "value"))]
        self._positions = "position_ids" in self.input_names
        # as Generator feeds it where the graph has it: the LM head for the last position only
        optional = {i.name for i in self.rt.session.get_overridable_initializers()}
        self._keep_last = {LOGITS_TO_KEEP: np.asarray(1, np.int64)} if LOGITS_TO_KEEP in optional else {}

    def row_adapters(self, rows: int) -> list[str | None]:
        """The adapter of each of `rows` concurrent rows: different adapters, cycled, where the bundle is
        switchable and can mix them in one run; else this worker's adapter for every row."""
        names = list(self.rt.adapters)
        if self.rt.manifest.mode == "switchable" and len(names) > 1 and rows > 1 and self.rt.mixes_in_one_run:
            return [names[i % len(names)] for i in range(rows)]
        return [self.adapter] * rows

    def decode(self, prompts: Sequence[Sequence[int]], steps: int, adapters: Sequence[str | None]
               ) -> tuple[list[list[int]], float, list[float]]:
        """Greedy decoding of the rows together, `steps` tokens each after the prompt's first (eos ignored).

        Returns (tokens per row, seconds to the first token, seconds of each later step)."""
        options, extra = self.rt.row_options(adapters)
        B, T = len(prompts), max(len(p) for p in prompts)
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        ids = np.full((B, T), pad, np.int64)
        mask = np.zeros((B, T), np.int64)
        for r, p in enumerate(prompts):  # left padding
            ids[r, T - len(p):] = p
            mask[r, T - len(p):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((B, self.spec.num_kv_heads, 0, self.spec.head_dim), np.float32)
        past: list[np.ndarray] = [empty] * len(self._past)
        tokens: list[list[int]] = [[] for _ in range(B)]
        times: list[float] = []
        kv: SharedKV | None = None  # as Generator decodes a GroupQueryAttention bundle: one buffer per cache tensor
        for step in range(steps + 1):
            t0 = time.perf_counter()
            feeds = {"input_ids": ids, "attention_mask": mask, **extra}
            if self._positions:
                feeds["position_ids"] = positions
            if kv is None:
                logits, *past = self.rt.session.run(self._outputs, {**feeds, **dict(zip(self._past, past)),
                                                                    **self._keep_last}, options)
                if steps and self.gen.shares_cache(options, feeds):
                    kv = SharedKV.holding(self.rt.session, self._past, self._outputs[1:], past, steps)
            else:
                logits = kv.step(feeds, options)
            chosen = logits[:, -1].argmax(axis=-1)  # (B,)
            ids = chosen[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            times.append(time.perf_counter() - t0)
            for r in range(B):
                tokens[r].append(int(chosen[r]))
        return tokens, times[0], times[1:]

    def score(self, texts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per token-id text, the log-probabilities of its tokens from the second on."""
        return [self.gen.score_ids(ids, self.adapter).logprobs for ids in texts]

    def encode(self, text: str) -> list[int]:
        return self.gen.tokenizer.encode(text, add_special_tokens=True).ids


def _op_ttft(engine, msg: dict) -> dict:
    """Prefill msg["ids"] and pick the first token, msg["n"] times: wall ms of each."""
    out = []
    for _ in range(msg["n"]):
        _, first, _ = engine.decode([msg["ids"]], 0, engine.row_adapters(1))
        out.append(first * 1e3)
    return {"ms": out}


def _op_decode(engine, msg: dict) -> dict:
    """msg["rows"] copies of the prompt decoded together for msg["steps"] greedy steps: ms of each step."""
    rows = msg["rows"]
    if rows > 1 and getattr(engine, "batch_note", None):
        return {"skipped": engine.batch_note}  # a peer that decodes one sequence at a time says why
    adapters = engine.row_adapters(rows)
    _, first, steps = engine.decode([msg["ids"]] * rows, msg["steps"], adapters)
    return {"first_ms": first * 1e3, "step_ms": [s * 1e3 for s in steps], "adapters": adapters}


def _op_greedy(engine, msg: dict) -> dict:
    """Greedy continuations of each prompt alone (batch 1), msg["n"] tokens each."""
    out = []
    for ids in msg["prompts"]:
        tokens, _, _ = engine.decode([ids], msg["n"] - 1, engine.row_adapters(1))
        out.append(tokens[0])
    return {"tokens": out}


def _op_perplexity(engine, msg: dict) -> dict:
    """Pooled perplexity of the token-id texts msg["ids"], with each text's summed negative log-likelihood and
    scored token count (for the interval of a ratio)."""
    scores = engine.score(msg["ids"])
    return {"perplexity": pooled_perplexity(scores), "nll": [float(-np.sum(lp)) for lp in scores],
            "tokens": [int(np.size(lp)) for lp in scores]}


DECODER_OPS = {"ttft": _op_ttft, "decode": _op_decode, "greedy": _op_greedy, "perplexity": _op_perplexity}


def prompt_of(tokenizer_file: str | os.PathLike, tokens: int) -> list[int]:
    """Exactly `tokens` ids: the PASSAGE tokenized (no special tokens) and cycled."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(PASSAGE, add_special_tokens=False).ids
    return [ids[i % len(ids)] for i in range(tokens)]


def agreement_prompts(tokenizer_file: str | os.PathLike) -> list[list[int]]:
    """AGREEMENT_PROMPTS as token ids with the tokenizer's special tokens, as `Generator.prompt_ids` makes them."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    return [tok.encode(p, add_special_tokens=True).ids for p in AGREEMENT_PROMPTS]


def held_out_ids(tokenizer_file: str | os.PathLike, texts: Sequence[str] = HELD_OUT_TEXTS) -> list[list[int]]:
    """The held-out texts as token ids with the tokenizer's special tokens: every candidate scores these ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    return [tok.encode(t, add_special_tokens=True).ids for t in texts]


def decoder_candidates(bundles: Sequence[str], adapter: str | None = None) -> list[Candidate]:
    """Candidates for decoder bundle directories (`dir@adapter` picks a switchable bundle's adapter)."""
    from edgelora.runtime.bench import _bundle_info, _labels

    info = [_bundle_info(spec, adapter) for spec in bundles]
    _labels(info)
    out = []
    for b in info:
        m = read_manifest(b["path"], verify=False)
        if m.task != CAUSAL_LM or m.generation is None:
            raise EdgeloraError(f"{b['path']}: task {m.task!r}; bench decoder bundles and encoder bundles in "
                                "separate runs")
        b.update(kind="bundle", context_length=m.generation.context_length,
                 tokenizer=str(Path(b["path"]) / (m.tokenizer.file if m.tokenizer else TOKENIZER_FILE)))
        argv = [sys.executable, "-m", "edgelora.runtime.decoder_bench", "--worker", b["path"]]
        argv += ["--adapter", b["adapter"]] if b["adapter"] is not None else []
        out.append(Candidate(b["label"], tuple(argv), b))
    return out


def decoder_references(info: Sequence[Mapping]) -> list[int | None]:
    """Each candidate's fp32 reference: the fp32 bundle of the same base and adapter (see fidelity)."""
    from edgelora.runtime.fidelity import fp32_references

    return fp32_references([b if b.get("kind", "bundle") == "bundle" else {} for b in info])


def is_decoder_bundle(path: str) -> bool:
    """Whether a bench argument (`dir` or `dir@adapter`) names a causal-lm bundle."""
    from edgelora.runtime.bench import _parse_spec

    where, _ = _parse_spec(path, None)
    try:
        return read_manifest(where, verify=False).task == CAUSAL_LM
    except EdgeloraError:
        return False


def _check_settings(prompt_tokens: Sequence[int], new_tokens: int, concurrent: int, rounds: int, warmup: int,
                    agreement_tokens: int) -> None:
    if not prompt_tokens or any(not isinstance(p, int) or p < 1 for p in prompt_tokens):
        raise EdgeloraError(f"bench: prompt_tokens {list(prompt_tokens)!r}: pass positive integers")
    for name, value, low in (("new_tokens", new_tokens, 2), ("concurrent", concurrent, 1), ("rounds", rounds, 1),
                             ("warmup", warmup, 0), ("agreement_tokens", agreement_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise EdgeloraError(f"bench: {name}={value!r}; pass an integer >= {low}")


def _percentiles(ms: Sequence[float]) -> dict:
    if not len(ms):
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(ms), [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def run_decoder_candidates(
    candidates: Sequence[Candidate],
    *,
    tokenizer_file: str | os.PathLike,
    references: Sequence[int | None] | None = None,
    prompt_tokens: Sequence[int] = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    concurrent: int = CONCURRENT,
    rounds: int = 5,
    warmup: int = 1,
    threads: int | None = None,
    spinning: bool = False,
    agreement_tokens: int = AGREEMENT_TOKENS,
    held_out: Sequence[str] = HELD_OUT_TEXTS,
    method: str = METHOD,
    progress: Progress | None = None,
) -> dict:
    """Time generating candidates interleaved, one worker process each, then measure each one's fidelity.

    Args:
        tokenizer_file: the tokenizer every candidate's prompts are made with (all candidates share a vocabulary).
        references: per candidate, the index of its fp32 reference (itself for the reference), or None.
        prompt_tokens: prompt lengths P whose time to the first token is measured.
        new_tokens: greedy steps per timed decode run (after a 32-token prompt and its first token).
        concurrent: rows decoded together for the batched rate (different adapters where a bundle has them).
        agreement_tokens: greedy tokens per agreement prompt compared against the reference's.
        held_out: texts for the perplexity ratio.
    """
    if not candidates:
        raise EdgeloraError("bench: give at least one decoder bundle directory")
    _check_settings(prompt_tokens, new_tokens, concurrent, rounds, warmup, agreement_tokens)
    info = [{**c.info, "label": c.label} for c in candidates]
    scored = held_out_ids(tokenizer_file, held_out)
    longest = max(*prompt_tokens, DECODE_PROMPT + new_tokens + 1, max(map(len, agreement_prompts(tokenizer_file)))
                  + agreement_tokens, max(map(len, scored)))
    for b in info:
        ctx = b.get("context_length")
        if ctx is not None and longest > ctx:
            raise EdgeloraError(f"{b.get('path', b['label'])}: context_length {ctx} is shorter than the bench needs "
                                f"({longest} tokens); lower prompt_tokens or new_tokens")
    references = list(references) if references is not None else [None] * len(candidates)
    prompts = {p: prompt_of(tokenizer_file, p) for p in prompt_tokens}
    decode_prompt = prompt_of(tokenizer_file, DECODE_PROMPT)
    batches = [1] + ([concurrent] if concurrent > 1 else [])
    measures = [("ttft", p) for p in prompt_tokens] + [("decode", b) for b in batches]
    ttft: dict[tuple[int, int], list[float]] = {}
    rate: dict[tuple[int, int], list[float]] = {}  # (candidate, rows) -> tokens/s per round, all rows together
    steps: dict[tuple[int, int], list[float]] = {}  # (candidate, rows) -> every decode step's ms
    skipped: dict[tuple[int, int], str] = {}
    used_adapters: dict[tuple[int, int], list] = {}
    schedule: list[dict] = []
    total, done = rounds * len(measures) * len(info), 0
    workers: list[Worker] = []
    greedy: dict[int, list[list[int]]] = {}
    ppl: dict[int, dict] = {}  # candidate -> perplexity, and per text nll and tokens
    unscored: dict[int, str] = {}  # candidate -> why its fidelity runs failed
    try:
        for c, b in zip(candidates, info):  # one at a time, so load times do not overlap
            w = Worker(c, threads, spinning)
            workers.append(w)
            b.update(load_s=w.ready["load_s"], threads=w.ready["threads"], rss_load_bytes=w.ready["mem_load"]["peak"])
            if b.get("size_bytes") is None:
                b["size_bytes"] = w.ready.get("size_bytes")
            if max(max(p) for p in prompts.values()) >= w.ready["vocab"]:
                raise EdgeloraError(f"{b['label']}: its vocabulary ({w.ready['vocab']}) is not the tokenizer's "
                                    f"{tokenizer_file}; bench candidates of one vocabulary together")

        def measure(i: int, kind: str, value: int, timed: bool) -> None:
            w = workers[i]
            if kind == "ttft":
                ms = w.call(op="ttft", ids=prompts[value], n=1)["ms"][0]
                if timed:
                    ttft.setdefault((i, value), []).append(ms)
                return
            reply = w.call(op="decode", ids=decode_prompt, rows=value, steps=new_tokens)
            if "skipped" in reply:
                skipped[(i, value)] = reply["skipped"]
            elif timed:
                rate.setdefault((i, value), []).append(value * len(reply["step_ms"]) / (sum(reply["step_ms"]) / 1e3))
                steps.setdefault((i, value), []).extend(reply["step_ms"])
                used_adapters[(i, value)] = reply.get("adapters")

        for _ in range(warmup):
            for kind, value in measures:
                for i in range(len(workers)):
                    measure(i, kind, value, timed=False)
        for r in range(rounds):
            for kind, value in measures:
                for i in range(len(workers)):
                    measure(i, kind, value, timed=True)
                    schedule.append({"candidate": i, "measure": kind, "value": value, "round": r})
                    done += 1
                    if progress:
                        progress(done, total, f"{info[i]['label']} {kind} {value}")
        for i, w in enumerate(workers):  # after timing: the fidelity runs do not touch the timed RSS
            info[i]["rss_peak_bytes"] = w.call(op="mem")["peak"]
            try:  # a candidate that cannot score keeps its timings, with the reason where its fidelity would be
                greedy[i] = w.call(op="greedy", prompts=agreement_prompts(tokenizer_file),
                                   n=agreement_tokens)["tokens"]
                ppl[i] = w.call(op="perplexity", ids=scored)
            except EdgeloraError as e:
                unscored[i] = f"fidelity not measured: {first_line(e)}"
                greedy.pop(i, None)
    finally:
        for w in workers:
            w.close()

    rows = []
    for i, b in enumerate(info):
        ref = references[i]
        row: dict = {"candidate": i, "label": b["label"], "size_bytes": b.get("size_bytes"),
                     "rss_load_bytes": b.get("rss_load_bytes"), "rss_peak_bytes": b.get("rss_peak_bytes"),
                     "ttft_ms": {str(p): float(np.median(ttft[(i, p)])) for p in prompt_tokens},
                     "ttft_samples_ms": {str(p): ttft[(i, p)] for p in prompt_tokens}, "decode": {}}
        for rows_n in batches:
            key = (i, rows_n)
            if key in skipped:
                row["decode"][str(rows_n)] = {"rows": rows_n, "tokens_s": None, "note": skipped[key]}
                continue
            row["decode"][str(rows_n)] = {"rows": rows_n, "tokens_s": float(np.median(rate[key])),
                                          "tokens_s_rounds": rate[key], "steps": len(steps[key]),
                                          "adapters": used_adapters.get(key), **_percentiles(steps[key])}
        one, many = row["decode"]["1"], row["decode"].get(str(concurrent))
        row["batch_gain"] = (many["tokens_s"] / one["tokens_s"]) if many and many["tokens_s"] else None
        scores = ppl.get(i, {})
        fid: dict = {"reference": ref, "reference_label": info[ref]["label"] if ref is not None else None,
                     "agreement": None, "perplexity": scores.get("perplexity"), "perplexity_ratio": None,
                     "perplexity_ratio_ci95": None, "note": None,
                     # per held-out text, so an interval can be recomputed from the saved result
                     "nll_per_text": scores.get("nll"), "tokens_per_text": scores.get("tokens")}
        if ref is None:
            fid["note"] = "no fp32 reference"
        elif i in unscored or ref in unscored:
            fid["note"] = unscored.get(i) or f"{info[ref]['label']} (the reference): {unscored[ref]}"
        else:
            fid["agreement"] = greedy_agreement(greedy[i], greedy[ref])
            fid["perplexity_ratio"] = ppl[i]["perplexity"] / ppl[ref]["perplexity"]
            fid["perplexity_ratio_ci95"] = list(perplexity_ratio_interval(ppl[i]["nll"], ppl[ref]["nll"],
                                                                          ppl[i]["tokens"]))
        row["fidelity"] = fid
        rows.append(row)
    cpu = detect_isa()
    return _plain({
        "edgelora_decoder_bench": DECODER_RESULT_VERSION,
        "machine": {"isa": cpu.isa, "model": cpu.model, "machine": cpu.machine, "physical_cores": cpu.physical_cores,
                    "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average": list(os.getloadavg())
                    if hasattr(os, "getloadavg") else None},
        "onnxruntime": ort.__version__,
        "settings": {"prompt_tokens": list(prompt_tokens), "new_tokens": new_tokens, "decode_prompt": DECODE_PROMPT,
                     "concurrent": concurrent, "rounds": rounds, "warmup": warmup,
                     "threads": threads if threads is not None else cpu.physical_cores, "spinning": spinning,
                     "method": method},
        "fidelity": {"agreement_prompts": len(AGREEMENT_PROMPTS), "agreement_tokens": agreement_tokens,
                     "held_out_texts": len(held_out),
                     "method": "greedy continuations of fixed plain-text prompts at batch 1, end-of-sequence ignored; "
                               "prefix share: tokens equal to the fp32 reference's before the first divergence over "
                               "the tokens compared, averaged over prompts; exact share: prompts whose whole "
                               "continuation matches; perplexity ratio: held-out perplexity (teacher forcing) over "
                               "the reference's, with a 95% paired bootstrap interval over texts"},
        "candidates": info, "rows": rows, "schedule": schedule,
    })


def run_decoder_benchmark(bundles: Sequence[str], *, adapter: str | None = None, **kwargs) -> dict:
    """Benchmark decoder bundles side by side; `decoder_report.format_decoder_table` shows the result.

    Example:
        >>> r = run_decoder_benchmark(["b/smollm2-fp32", "b/smollm2-int8"], rounds=3)  # doctest: +SKIP

    Keyword arguments as for `run_decoder_candidates`; prompts are made with the first bundle's tokenizer.
    """
    if not bundles:
        raise EdgeloraError("bench: give at least one decoder bundle directory")
    candidates = decoder_candidates(bundles, adapter)
    info = [c.info for c in candidates]
    return run_decoder_candidates(candidates, tokenizer_file=info[0]["tokenizer"], references=decoder_references(info),
                                  **kwargs)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def _main(argv: Sequence[str] | None = None) -> int:
    """A decoder bundle's worker: `python -m edgelora.runtime.decoder_bench --worker BUNDLE [--adapter A]`."""
    parser = argparse.ArgumentParser(prog="python -m edgelora.runtime.decoder_bench",
                                     description="internal: one decoder bench worker serving a bundle")
    parser.add_argument("--worker", metavar="BUNDLE", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-spin", action="store_true")
    args = parser.parse_args(argv)
    return serve_worker(lambda: BundleDecoder(args.worker, args.adapter, args.threads, not args.no_spin), DECODER_OPS)


if __name__ == "__main__":
    sys.exit(_main())
