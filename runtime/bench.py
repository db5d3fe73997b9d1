"""Honest CPU benchmarks of bundles: one worker process per bundle, driven in interleaved rounds.

Two ORT sessions in one process distort each other (idle pool threads spin and steal the cores the
other run needs), so each bundle runs in a worker process of its own that loads it once. The parent
asks one worker at a time for one timed run, alternating A B A B ..., so only one runs at a time and
slow drift (thermal, frequency, noisy neighbours) falls on every bundle alike. Across processes the
trap remains: after a run ORT's pool threads spin for tens of milliseconds (measured: ~40 ms of CPU,
done by ~100 ms, on a 2-core AMD EPYC VM), stealing cores from the next worker. So spinning is off by
default for every worker, and when turned on each run waits a settle pause first.

Speed is never reported without its cost: after timing, every worker runs the same real sentences (or
labelled data, or generated ids where there is no tokenizer) in chunks of each benchmarked batch size,
and each row carries its distance from an fp32 reference run in the same benchmark (worst cosine, max
abs diff) and, given labels, its accuracy. A worker serves any `Engine` (a bundle here; torch models and
bare ONNX files in benchmarks/baselines.py) through `serve_worker`, and `run_candidates` drives them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from edgelora.atomic import write_file_atomic, write_text_atomic
from edgelora.errors import EdgeloraError
from edgelora.runtime.cpu import detect_isa
from edgelora.runtime.bundle import read_manifest
from edgelora.runtime.runtime import Runtime

RESULT_VERSION = 2  # 2: rows carry "fidelity", the result a "fidelity" section
METHOD = ("one worker process per bundle, loaded once; per shape: warm-up runs per bundle, then interleaved "
          "rounds of one run per bundle, one process running at a time; time measured in the worker around "
          "one run on synthetic token ids (fixed seed, mask all ones)")
Progress = Callable[[int, int, str], None]
GENERATED_ROWS, GENERATED_SEQ = 32, 16  # fidelity inputs of a model without a tokenizer: rows x tokens of ids
OUTPUTS = ("logits", "embeddings")  # compared outputs, in order of preference for the headline figure

# Fidelity inputs: varied real English (questions, commands, news, reviews, one word, one long line).
# Deliberately not exporters/mixed_precision.py's CALIBRATION_TEXTS, which choose the fp32 layers: a
# figure measured on the sentences that tuned the export would flatter it.
FIDELITY_TEXTS = (
    "The cat sat quietly on the windowsill, watching the rain.",
    "Can you recommend a good Italian restaurant near the station?",
    "Interest rates rose for the third time this year.",
    "My flight to Chicago was cancelled because of the snowstorm.",
    "Photosynthesis converts light energy into chemical energy.",
    "Please turn off the lights in the living room.",
    "The committee will publish its final report next Tuesday.",
    "I absolutely loved the ending of that movie!",
    "This product broke after two days and support never answered.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum is closed on Mondays and public holidays.",
    "She finished the marathon in just under four hours.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The new firmware update fixes a bug in the Bluetooth driver.",
    "What time does the pharmacy open tomorrow morning?",
    "The defendant pleaded not guilty to all charges.",
    "Our quarterly revenue exceeded analyst expectations by twelve percent.",
    "A strong earthquake struck off the coast early on Sunday.",
    "Set an alarm for six thirty.",
    "The orchestra performed Beethoven's ninth symphony to a sold-out hall.",
    "Children under twelve must be accompanied by an adult.",
    "He apologized for the misunderstanding and offered a full refund.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The hiking trail is steep, rocky and poorly marked in places.",
    "I'm not sure whether I locked the front door.",
    "The senator announced she would not seek re-election.",
    "Transfer five hundred dollars from my savings to my checking account.",
    "The quarterback threw for three touchdowns in the second half.",
    "Researchers identified a protein that slows tumour growth in mice.",
    "This hotel room smelled of smoke and the sheets were stained.",
    "Could you translate this paragraph into Spanish?",
    "The bridge will be closed for repairs until the end of May.",
    "Honestly, the service was slow but the food made up for it.",
    "Neural networks learn representations from large amounts of data.",
    "The library extended its opening hours during exam season.",
    "Please remind me to call my grandmother on Sunday.",
    "The company recalled thousands of cars over a braking defect.",
    "A gentle breeze carried the smell of fresh bread down the street.",
    "Is it going to rain in Seattle this weekend?",
    "The treaty was signed by twenty-seven countries in Lisbon.",
    "My package says delivered, but it isn't on my porch.",
    "Shakespeare wrote many of his sonnets during the plague years.",
    "The startup raised forty million dollars in its latest funding round.",
    "Keep the medicine out of reach of children and store below 25 degrees.",
    "What's the difference between a virus and a bacterium?",
    "The referee's decision sparked angry protests from the home fans.",
    "I would like to cancel my subscription, effective immediately.",
    "Glaciers in the Alps have lost more than half their volume since 1900.",
    "Play some relaxing jazz in the kitchen.",
    "The painting was sold at auction for a record price.",
    "ok",
    "Why won't my laptop connect to the office Wi-Fi after the update, even though my phone connects fine?",
)


# -- worker side ----------------------------------------------------------------------------------


def _memory() -> dict[str, int | None]:
    """Peak and current resident bytes of this process.

    VmHWM rather than ru_maxrss on Linux: ru_maxrss survives exec, so a child would report its
    parent's peak.
    """
    peak = now = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    kib = int(line.split()[1]) * 1024
                    peak, now = (kib, now) if line.startswith("VmHWM") else (peak, kib)
    except OSError:  # not Linux
        try:
            import resource  # macOS: ru_maxrss is in bytes there
        except ImportError:  # Windows
            return {"peak": None, "now": None}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak": peak, "now": now}


def _synthetic_feeds(inputs: Sequence[str], vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids of exactly `seq` per row; every worker derives the same ids from (seed, batch, seq)."""
    rng = np.random.default_rng([seed, batch, seq])
    feeds = {}
    for name in inputs:
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, seq), np.int64)
        else:
            feeds[name] = np.zeros((batch, seq), np.int64)
    return feeds


class Engine(Protocol):
    """What a worker times: one loaded model behind `run`, plus what fidelity needs.

    `run` returns outputs by name; the fidelity check compares `logits` and `embeddings` (mean-pooled,
    [batch, hidden]) where both sides have them. `labels` name the logits columns (empty: no task head);
    `size_bytes`, when not None, is the model's size on disk as the report should state it.
    """

    input_names: Sequence[str]
    vocab: int
    threads: int
    labels: Sequence[str]
    size_bytes: int | None

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray] | None:
        """Feeds for texts, padded to the longest; None when the model has no tokenizer."""

    def run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """One inference: the call the harness times."""


class BundleEngine:
    """A bundle through `Runtime`, the adapter fixed for every run."""

    def __init__(self, bundle: str, adapter: str | None, threads: int | None, spinning: bool) -> None:
        self.rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=spinning)
        self.labels = self.rt.labels(adapter)  # unknown adapter names fail here, before any timing
        self.adapter = adapter
        base = self.rt.manifest.base
        self.input_names = self.rt.manifest.inputs
        self.vocab = self.rt.vocab_size or (base.vocab_size if base else None) or 100
        self.threads = self.rt.intra_op_threads
        self.size_bytes = None  # the parent reads the bundle's files

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray] | None:
        return self.rt.tokenize(texts) if self.rt.vocab_size is not None else None

    def run(self, feeds: dict[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return self.rt.run(feeds, self.adapter)


def _fidelity_outputs(engine: Engine, texts: Sequence[str] | None, batch: int, seed: int) -> tuple[dict, str]:
    """Every output of the fidelity inputs, run in chunks of `batch` rows; (outputs, what the inputs were).

    Texts are padded per chunk to its longest, as a server batches them; a model without a tokenizer
    gets GENERATED_ROWS rows of ids from `seed` instead, the same in every worker of one base.
    """
    if texts is not None and engine.tokenize(texts[:1]) is not None:
        chunks = [engine.tokenize(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        what = "texts"
    else:
        rng = np.random.default_rng([seed, GENERATED_ROWS, GENERATED_SEQ])
        ids = rng.integers(0, engine.vocab, size=(GENERATED_ROWS, GENERATED_SEQ), dtype=np.int64)
        chunks = []
        for i in range(0, GENERATED_ROWS, batch):
            part = ids[i : i + batch]
            columns = {"input_ids": part, "attention_mask": np.ones_like(part)}
            chunks.append({n: columns.get(n, np.zeros_like(part)) for n in engine.input_names})
        what = "generated ids"
    parts: dict[str, list[np.ndarray]] = {}
    for feeds in chunks:
        for name, value in engine.run(feeds).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(v) for name, v in parts.items()}, what


def serve_worker(make_engine: Callable[[], Engine]) -> int:
    """Build an engine and serve it over stdin/stdout JSON lines until told to quit: a worker's main.

    Load time and memory are measured around `make_engine`. Ops: shape (make the synthetic feeds),
    run (time n runs), mem, fidelity (write every output of the fidelity inputs to an .npz), quit.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printing to stdout lands on stderr, never in the protocol

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        start = _memory()
        t0 = time.perf_counter()
        engine = make_engine()
        load_s = time.perf_counter() - t0
        send({"ready": True, "load_s": load_s, "mem_start": start, "mem_load": _memory(), "vocab": engine.vocab,
              "threads": engine.threads, "labels": list(engine.labels), "size_bytes": engine.size_bytes})
        feeds: dict[str, np.ndarray] = {}
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg["op"]
            if op == "shape":
                feeds = _synthetic_feeds(engine.input_names, engine.vocab, msg["batch"], msg["seq"], msg["seed"])
                send({"ok": True})
            elif op == "run":
                times = []
                for _ in range(msg["n"]):
                    t = time.perf_counter()
                    engine.run(feeds)
                    times.append((time.perf_counter() - t) * 1e3)
                send({"ms": times})
            elif op == "mem":
                send(_memory())
            elif op == "fidelity":
                outputs, what = _fidelity_outputs(engine, msg["texts"], msg["batch"], msg["seed"])
                np.savez(msg["path"], **outputs)
                send({"inputs": what, "rows": int(next(iter(outputs.values())).shape[0])})
            elif op == "quit":
                return 0
    except EdgeloraError as e:
        send({"error": str(e)})
        return 1
    return 0


# -- parent side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One thing to time: the command that starts its worker (a `serve_worker` main) and its report entry.

    The harness appends `--threads N` (when given) and `--no-spin` (spinning off) to `argv`, so every
    worker of a run gets the same settings. `info` lands in the result as is; its "mode" and "precision"
    show in the table, its "size_bytes" (else the worker's) in the size column.
    """

    label: str
    argv: tuple[str, ...]
    info: Mapping[str, object]
    env: Mapping[str, str] | None = None


class _Worker:
    """A candidate's worker process and its JSON-lines channel."""

    def __init__(self, candidate: Candidate, threads: int | None, spinning: bool) -> None:
        cmd = list(candidate.argv)
        cmd += ["--threads", str(threads)] if threads is not None else []
        cmd += [] if spinning else ["--no-spin"]
        self.label = candidate.label
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, **candidate.env} if candidate.env else None
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, bufsize=1, env=env)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._stderr.seek(0)
            tail = " | ".join(self._stderr.read().strip().splitlines()[-3:])
            raise EdgeloraError(f"{self.label}: benchmark worker exited ({self._proc.returncode}): {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise EdgeloraError(reply["error"])
        return reply

    def call(self, **msg) -> dict:
        try:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:  # the worker died: _read reports its stderr
            pass
        return self._read()

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                self._proc.stdin.write('{"op": "quit"}\n')
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def _parse_spec(spec: str, adapter: str | None) -> tuple[str, str | None]:
    """`path@adapter` -> (path, adapter); a path that itself contains '@' still works when it exists."""
    path, sep, name = spec.rpartition("@")
    if sep and name and not Path(spec).exists():
        return path, name
    return spec, adapter


def _bundle_bytes(path: Path) -> dict[str, int]:
    model = (path / "model.onnx").stat().st_size
    adapters = sum(f.stat().st_size for f in (path / "adapters").glob("*.onnx_adapter")) \
        if (path / "adapters").is_dir() else 0
    return {"model_bytes": model, "adapters_bytes": adapters, "size_bytes": model + adapters}


def _bundle_info(spec: str, default_adapter: str | None) -> dict:
    path, adapter = _parse_spec(spec, default_adapter)
    m = read_manifest(path, verify=False)  # the worker's Runtime verifies the sha256s
    if m.mode == "merged" and adapter is not None and m.adapters and adapter == m.adapters[0].name:
        adapter = None  # the baked adapter: same run
    effective = adapter if m.mode == "switchable" else (m.adapters[0].name if m.adapters else None)
    entry = m.entry(effective) if effective is not None else None
    base = m.base
    return {"spec": spec, "path": str(path), "adapter": adapter, "task": effective, "mode": m.mode,
            "precision": m.precision, "base": (base.fingerprint or base.name) if base else None,
            "base_name": base.name if base else None, "labels": list(entry.labels) if entry else [],
            "source": entry.source_sha256 if entry else None, **_bundle_bytes(Path(path))}


def _labels(bundles: list[dict]) -> None:
    names = [Path(b["path"]).name + (f"@{b['adapter']}" if b["adapter"] else "") for b in bundles]
    unique = len(set(names)) == len(names)
    for b, name in zip(bundles, names):
        b["label"] = name if unique else b["spec"]


def bundle_candidates(bundles: Sequence[str], adapter: str | None = None) -> list[Candidate]:
    """Candidates for bundle directories (`dir@adapter` picks a switchable bundle's adapter)."""
    info = [_bundle_info(spec, adapter) for spec in bundles]
    _labels(info)
    out = []
    for b in info:
        argv = [sys.executable, "-m", "edgelora.runtime.bench", "--worker", b["path"]]
        argv += ["--adapter", b["adapter"]] if b["adapter"] is not None else []
        out.append(Candidate(b["label"], tuple(argv), b))
    return out


def _same_function(a: Mapping, b: Mapping) -> bool:
    """Same base (by manifest fingerprint), same adapter and labels: the same function at any precision.

    Where both manifests record the adapter's source weights (sha256 of its safetensors file), they must
    match too: two versions of an adapter under one name are two functions.
    """
    same_source = a.get("source") is None or b.get("source") is None or a.get("source") == b.get("source")
    return a.get("base") is not None and a.get("base") == b.get("base") and a.get("task") == b.get("task") \
        and a.get("labels") == b.get("labels") and same_source


def _comparisons(bundles: Sequence[Mapping]) -> list[tuple[str, int, int]]:
    """(kind, baseline, candidate) pairs: int8 over fp32, and merged over switchable, like for like."""
    pairs = []
    for i, a in enumerate(bundles):
        for j, b in enumerate(bundles):
            same = _same_function(a, b)
            if same and a["mode"] == b["mode"] and (a["precision"], b["precision"]) == ("fp32", "int8"):
                pairs.append(("int8/fp32", i, j))
            if same and a["precision"] == b["precision"] and (a["mode"], b["mode"]) == ("switchable", "merged"):
                pairs.append(("merged/switchable", i, j))
    return pairs


def fp32_references(bundles: Sequence[Mapping]) -> list[int | None]:
    """Each bundle's fp32 reference in the run: itself when fp32, else an fp32 bundle of the same base,
    adapter and labels, preferably of the same mode; None where the run holds none."""
    refs: list[int | None] = []
    for i, b in enumerate(bundles):
        same = [j for j, r in enumerate(bundles) if r.get("precision") == "fp32" and _same_function(b, r)]
        if b.get("precision") == "fp32":
            refs.append(i)
        else:
            refs.append(next((j for j in same if bundles[j].get("mode") == b.get("mode")), same[0] if same else None))
    return refs


def compare_outputs(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                    names: Sequence[str] = OUTPUTS) -> dict[str, dict]:
    """Per output of `names` in both (same shape, not empty): worst and mean row cosine, max abs diff, worst row.

    Cosines are computed in float64; a row that is zero on both sides counts as identical (1.0), zero on
    one side only as orthogonal (0.0).
    """
    out = {}
    for name in names:
        if name not in candidate or name not in reference:
            continue
        a = np.asarray(candidate[name], np.float64)
        b = np.asarray(reference[name], np.float64)
        if a.shape != b.shape or a.size == 0:
            continue
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)  # (rows, features)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = (a * b).sum(1) / (na * nb)
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
        worst = int(np.argmin(cos))
        out[name] = {"worst_cosine": float(cos[worst]), "mean_cosine": float(cos.mean()),
                     "max_abs_diff": float(np.abs(a - b).max()), "worst_row": worst}
    return out


def accuracy(outputs: Mapping[str, np.ndarray], labels: Sequence[str],
             gold: Sequence[str]) -> tuple[float | None, str | None]:
    """Share of rows whose argmax label is the gold one; (None, why) where that cannot be measured."""
    logits = outputs.get("logits")
    if not labels or logits is None or np.asarray(logits).ndim != 2 or np.asarray(logits).shape[1] != len(labels):
        return None, "no task head"
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        return None, f"data labels {unknown[:3]} are not the adapter's ({', '.join(labels)})"
    pred = np.asarray(labels)[np.argmax(np.asarray(logits), axis=1)]
    return float(np.mean(pred == np.asarray(gold))), None


def _fidelity(i: int, ref: int | None, outs: dict, labels: Sequence[str], ref_label: str | None,
              gold: Sequence[str] | None, names: Sequence[str]) -> dict:
    """One candidate's fidelity entry at one batch size; outs[k] = (outputs, inputs kind) per candidate."""
    mine, inputs = outs[i]
    entry: dict = {"reference": ref, "reference_label": ref_label, "inputs": inputs,
                   "rows": int(next(iter(mine.values())).shape[0]), "output": None, "worst_cosine": None,
                   "mean_cosine": None, "max_abs_diff": None, "outputs": {}, "accuracy": None, "note": None}
    if gold is not None and inputs == "texts":
        entry["accuracy"], why = accuracy(mine, labels, gold)
        entry["accuracy_note"] = why
    if ref is None:
        entry["note"] = "no fp32 reference"
        return entry
    theirs, ref_inputs = outs[ref]
    if ref_inputs != inputs:
        entry["note"] = f"inputs differ from the reference's ({inputs} vs {ref_inputs})"
        return entry
    entry["outputs"] = compare_outputs(mine, theirs, names)
    if not entry["outputs"]:
        entry["note"] = "no output in common with the reference"
        return entry
    entry["output"] = next(n for n in names if n in entry["outputs"])  # the first of `names` both have
    entry.update({k: entry["outputs"][entry["output"]][k] for k in ("worst_cosine", "mean_cosine", "max_abs_diff")})
    return entry


def run_benchmark(
    bundles: Sequence[str],
    *,
    batches: Sequence[int] = (1, 8),
    seqs: Sequence[int] = (16, 128),
    rounds: int = 30,
    warmup: int = 5,
    adapter: str | None = None,
    threads: int | None = None,
    spinning: bool = False,
    settle_ms: float | None = None,
    seed: int = 0,
    data: tuple[Sequence[str], Sequence[str]] | None = None,
    data_source: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Benchmark bundles side by side; returns a JSON-serialisable result (see `format_table`).

    Example:
        >>> r = run_benchmark(["out/fp32", "out/int8"], batches=(1,), seqs=(32,))  # doctest: +SKIP
        >>> print(format_table(r))                                                  # doctest: +SKIP

    Args:
        bundles: bundle directories; `dir@adapter` picks a switchable bundle's adapter for that entry.
        adapter: the adapter for entries that name none.
        threads: intra-op threads per worker; None means physical cores. Workers never run at once.
        spinning: ORT's intra-op spin-waiting, the same for every worker (recorded in the result). Off
            by default: spinning threads of the worker that just ran steal the next worker's cores.
        settle_ms: pause before each timed run; None means 0 without spinning and 200 ms with it, long
            enough for the previous worker's threads to stop spinning (so every run starts with idle
            threads either way).
        data: (texts, gold label names) to measure fidelity and accuracy on, instead of FIDELITY_TEXTS;
            `data_source` names it in the report.
        progress: called as progress(done, total, message) after each timed run.

    The fp32 reference of each bundle is the fp32 bundle in `bundles` of the same base fingerprint,
    adapter and labels (see `fp32_references`); rows without one say "no fp32 reference".
    """
    if not bundles:
        raise EdgeloraError("bench: give at least one bundle directory")
    candidates = bundle_candidates(bundles, adapter)
    info = [c.info for c in candidates]
    texts, gold = (list(data[0]), list(data[1])) if data is not None else (list(FIDELITY_TEXTS), None)
    return run_candidates(candidates, references=fp32_references(info), comparisons=_comparisons(info),
                          batches=batches, seqs=seqs, rounds=rounds, warmup=warmup, threads=threads,
                          spinning=spinning, settle_ms=settle_ms, seed=seed, texts=texts, gold=gold,
                          data_source=data_source or ("data" if data is not None else "built-in sentences"),
                          progress=progress)


def run_candidates(
    candidates: Sequence[Candidate],
    *,
    references: Sequence[int | None] | None = None,
    comparisons: Sequence[tuple[str, int, int]] = (),
    batches: Sequence[int] = (1, 8),
    seqs: Sequence[int] = (16, 128),
    rounds: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    spinning: bool = False,
    settle_ms: float | None = None,
    seed: int = 0,
    texts: Sequence[str] | None = FIDELITY_TEXTS,
    gold: Sequence[str] | None = None,
    data_source: str = "built-in sentences",
    outputs: Sequence[str] = OUTPUTS,
    method: str = METHOD,
    progress: Progress | None = None,
) -> dict:
    """Time candidates interleaved, one worker process each, then measure each one's fidelity.

    Args:
        references: per candidate, the index of its fp32 reference (itself for the reference), or None.
        comparisons: (kind, baseline, candidate) index triples to report as speed-ups per shape.
        texts: the fidelity inputs where a candidate has a tokenizer (generated ids otherwise); with
            `gold` (one label name per text) also accuracy.
        outputs: the outputs fidelity compares, the first one both sides have being a row's headline:
            by default logits (a task head's), else embeddings.
        method: how the candidates were timed, recorded in the result.
    See `run_benchmark` for the rest.
    """
    if not candidates:
        raise EdgeloraError("bench: give at least one bundle directory")
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if not outputs or unknown:
        raise EdgeloraError(f"bench: outputs {list(outputs)!r}: compare one or more of {', '.join(OUTPUTS)}")
    for name, values in (("batch", batches), ("seq", seqs)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise EdgeloraError(f"bench: {name} sizes {list(values)!r} must be positive integers")
    if rounds < 1 or warmup < 0:
        raise EdgeloraError(f"bench: rounds={rounds}, warmup={warmup}; need rounds >= 1 and warmup >= 0")
    if texts is not None and not texts:
        raise EdgeloraError("bench: the fidelity data holds no texts; pass a file with at least one example")
    if gold is not None and (texts is None or len(gold) != len(texts)):
        raise EdgeloraError(f"bench: {len(gold)} gold labels for {len(texts or ())} texts; pass one label per text")
    references = list(references) if references is not None else [None] * len(candidates)
    if settle_ms is None:
        settle_ms = 200.0 if spinning else 0.0
    info = [{**c.info, "label": c.label} for c in candidates]
    shapes = [(b, s) for b in batches for s in seqs]
    total, done = len(shapes) * rounds * len(info), 0
    rows: list[dict] = []
    schedule: list[dict] = []
    samples: dict[tuple[int, int, int], list[float]] = {}
    workers: list[_Worker] = []
    measured: dict[int, dict[int, tuple[dict, str]]] = {}  # batch -> candidate -> (outputs, inputs kind)
    try:
        for c, b in zip(candidates, info):  # one at a time, so load times do not overlap
            w = _Worker(c, threads, spinning)
            workers.append(w)
            b.update(load_s=w.ready["load_s"], threads=w.ready["threads"], labels=w.ready.get("labels", []),
                     rss_start_bytes=w.ready["mem_start"]["peak"], rss_load_bytes=w.ready["mem_load"]["peak"])
            if b.get("size_bytes") is None:
                b["size_bytes"] = w.ready.get("size_bytes")
        for batch, seq in shapes:
            for w in workers:
                w.call(op="shape", batch=batch, seq=seq, seed=seed)
                if warmup:
                    w.call(op="run", n=warmup)
            for r in range(rounds):
                for i, w in enumerate(workers):
                    if settle_ms:
                        time.sleep(settle_ms / 1e3)
                    samples.setdefault((i, batch, seq), []).append(w.call(op="run", n=1)["ms"][0])
                    schedule.append({"bundle": i, "batch": batch, "seq": seq, "round": r})
                    done += 1
                    if progress:
                        progress(done, total, f"{info[i]['label']} {batch}x{seq}")
            for i, w in enumerate(workers):
                mem = w.call(op="mem")
                ms = np.asarray(samples[(i, batch, seq)])
                p50, p95, p99 = np.percentile(ms, [50, 95, 99])
                rows.append({
                    "bundle": i, "label": info[i]["label"], "batch": batch, "seq": seq, "n": len(ms),
                    "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": ms.mean(), "min_ms": ms.min(),
                    "throughput_seq_s": batch / (p50 / 1e3), "size_bytes": info[i]["size_bytes"],
                    "rss_load_bytes": info[i]["rss_load_bytes"], "rss_peak_bytes": mem["peak"],
                    "rss_now_bytes": mem["now"], "samples_ms": ms.tolist(),
                })
        with tempfile.TemporaryDirectory(prefix="edgelora-bench-") as tmp:  # after timing: RSS rows stay clean
            for batch in batches:
                for i, w in enumerate(workers):
                    path = Path(tmp) / f"{i}-{batch}.npz"
                    reply = w.call(op="fidelity", texts=list(texts) if texts is not None else None, batch=batch,
                                   seed=seed, path=str(path))
                    with np.load(path) as z:
                        measured.setdefault(batch, {})[i] = ({k: z[k] for k in z.files}, reply["inputs"])
    finally:
        for w in workers:
            w.close()
    fidelity = {(i, batch): _fidelity(i, references[i], measured[batch], info[i]["labels"],
                                      info[references[i]]["label"] if references[i] is not None else None, gold,
                                      outputs)
                for batch in batches for i in range(len(info))}
    for r in rows:
        r["fidelity"] = fidelity[(r["bundle"], r["batch"])]
    speedups = []
    for kind, base, cand in comparisons:
        for batch, seq in shapes:
            a, b = np.asarray(samples[(base, batch, seq)]), np.asarray(samples[(cand, batch, seq)])
            speedups.append({"kind": kind, "baseline": base, "candidate": cand, "batch": batch, "seq": seq,
                             "speedup": float(np.median(a) / np.median(b)),
                             "speedup_paired": float(np.median(a / b))})  # round by round: drift cancels
    cpu = detect_isa()
    return _plain({
        "edgelora_bench": RESULT_VERSION,
        "machine": {"isa": cpu.isa, "model": cpu.model, "machine": cpu.machine, "physical_cores": cpu.physical_cores,
                    "logical_cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "onnxruntime": ort.__version__,
        "settings": {"batches": list(batches), "seqs": list(seqs), "rounds": rounds, "warmup": warmup,
                     "threads": threads if threads is not None else cpu.physical_cores, "spinning": spinning,
                     "settle_ms": settle_ms, "seed": seed, "method": method},
        "fidelity": {"source": data_source, "texts": len(texts) if texts is not None else 0, "outputs": list(outputs),
                     "labelled": gold is not None, "generated_ids": [GENERATED_ROWS, GENERATED_SEQ],
                     "method": "after timing, each worker runs the fidelity inputs in chunks of each batch size "
                               "(texts padded per chunk); rows compare the reference's outputs row by row"},
        "bundles": info, "rows": rows, "speedups": speedups, "schedule": schedule,
    })


def _plain(obj):
    """numpy scalars -> Python numbers, so json.dump takes the result as is."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


# -- reporting ------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fidelity_cells(f: Mapping | None) -> str:
    """`of  worst cos  max |d|  acc` cells of a row, or its note where there is no figure."""
    if f is None:
        return f"{'-':<6}  {'-':>9}  {'-':>8}  {'-':>5}"
    acc = "-" if f.get("accuracy") is None else f"{f['accuracy']:.3f}"
    if f.get("worst_cosine") is None:
        return f"{str(f.get('note') or '-'):>27}  {acc:>5}"
    of = {"embeddings": "emb"}.get(f["output"], f["output"])
    return f"{of:<6}  {f['worst_cosine']:>9.5f}  {f['max_abs_diff']:>8.2e}  {acc:>5}"


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
            f"{of}{acc}")


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
            f"{'acc':>5}")
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


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write the result as JSON atomically (a reader sees the old file or the whole new one)."""
    write_text_atomic(Path(path), json.dumps(result, indent=2) + "\n")


def plot(result: dict, path_png: str | os.PathLike) -> None:
    """p50 latency bars (p95 whiskers) per shape and bundle, speed-ups written above candidates; PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgeloraError("bench --plot needs matplotlib; pip install matplotlib (or edgelora[dev])") from None
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


# -- CLI glue (registered by edgelora.cli) --------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora bench`."""
    parser.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle directory; DIR@ADAPTER picks an adapter")
    parser.add_argument("--batch", type=_int_list, default=(1, 8), help="batch sizes, e.g. 1,8 (default 1,8)")
    parser.add_argument("--seq", type=_int_list, default=(16, 128), help="sequence lengths (default 16,128)")
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per bundle and shape (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per bundle and shape first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    parser.add_argument("--adapter", default=None, help="adapter for bundles that name none with @")
    parser.add_argument("--spin", action="store_true",
                        help="let ORT threads spin-wait between runs (adds a 200 ms settle pause before each run)")
    parser.add_argument("--data", metavar="SOURCE", default=None,
                        help="labelled texts for fidelity and accuracy: .jsonl/.csv with text and label, or "
                             "builtin:intent|sentiment[:N] (default: built-in sentences, no accuracy)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the full result as JSON")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="also write a latency chart")


def print_progress(done: int, total: int, message: str) -> None:
    """A progress bar on a terminal's stderr, or a line every tenth of the runs when it is not a terminal."""
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        sys.stderr.write(f"\r[{bar:<30}] {done}/{total} {message:<40}")
        if done == total:
            sys.stderr.write("\n")
    elif done == total or done % max(1, total // 10) == 0:
        sys.stderr.write(f"bench: {done}/{total} runs\n")
    sys.stderr.flush()


def load_labelled(source: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of a .jsonl/.csv file or builtin:TASK[:N], read by edgelora.data.

    The one import from the training side: edgelora.data uses the standard library only (no torch),
    so a runtime-only install still reads the same formats, with the same errors, as training does.
    """
    from edgelora.data import load_dataset

    ds = load_dataset(source)
    return list(ds.texts), [ds.label_names[y] for y in ds.labels]


def bench_command(args: argparse.Namespace) -> int:
    """`edgelora bench`: table on stdout, progress on stderr; EdgeloraError propagates to the CLI."""
    source = getattr(args, "data", None)
    data = load_labelled(source) if source else None
    result = run_benchmark(args.bundles, batches=args.batch, seqs=args.seq, rounds=args.rounds,
                           warmup=args.warmup, adapter=args.adapter, threads=args.threads,
                           spinning=args.spin, data=data, data_source=source, progress=print_progress)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora run`."""
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--adapter", default=None, help="adapter to apply (switchable bundles)")
    parser.add_argument("--adapters", default=None, metavar="A,B,A",
                        help="one adapter per text, comma-separated, in text order: one run mixes them")
    parser.add_argument("--text", action="append", default=[], help="a text to classify; repeat for more")
    parser.add_argument("--file", default=None, help="file with one text per line ('-' for stdin)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")


def run_command(args: argparse.Namespace) -> int:
    """`edgelora run`: prints a JSON list of {"text", "label", "score", "scores"}."""
    texts = list(args.text)
    if args.file:
        try:
            f = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
            with f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise EdgeloraError(
                f"{args.file}: cannot read it ({e.strerror}); pass a text file, one text per line"
            ) from None
    if not texts:
        raise EdgeloraError("run: nothing to classify; pass --text TEXT or --file FILE")
    per_row = getattr(args, "adapters", None)
    if per_row is not None:
        if args.adapter is not None:
            raise EdgeloraError("run: pass --adapter (one for all texts) or --adapters (one per text), not both")
        per_row = [a.strip() for a in per_row.split(",")]
        if len(per_row) != len(texts) or not all(per_row):
            raise EdgeloraError(f"run: --adapters names {len(per_row)} adapters for {len(texts)} texts; "
                                "give one name per text, comma-separated")
    rt = Runtime(args.bundle, intra_op_threads=args.threads)
    preds = rt.predict(texts, adapter=args.adapter, adapters=per_row)
    rows = [{"text": t, **({"adapter": a} if per_row else {}), **p} for t, a, p in zip(texts, per_row or texts, preds)]
    print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--worker", metavar="BUNDLE", default=None)
    pre.add_argument("--adapter", default=None)
    pre.add_argument("--threads", type=int, default=None)
    pre.add_argument("--no-spin", action="store_true")
    known, _ = pre.parse_known_args(argv)
    if known.worker is not None:  # internal: the harness's worker process
        return serve_worker(lambda: BundleEngine(known.worker, known.adapter, known.threads, not known.no_spin))
    parser = argparse.ArgumentParser(prog="python -m edgelora.runtime.bench",
                                     description="benchmark bundles on this CPU")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return bench_command(args)
    except EdgeloraError as e:  # as `edgelora bench` reports it
        print(f"edgelora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
