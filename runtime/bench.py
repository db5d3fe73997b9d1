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
bare ONNX files in benchmarks/) through `edgelora.runtime.worker`, and `run_candidates` drives them; the
figures come from `edgelora.runtime.fidelity`, the table and chart from `edgelora.runtime.report`.
`python -m edgelora.runtime.bench --worker BUNDLE` is the worker process of a bundle.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeloraError
from edgelora.runtime.cpu import detect_isa
from edgelora.runtime.fidelity import (
    FIDELITY_TEXTS,
    GENERATED_ROWS,
    GENERATED_SEQ,
    OUTPUTS,
    fp32_references,
    row_fidelity,
    speedup_pairs,
)
from edgelora.runtime.bundle import read_manifest
from edgelora.runtime.runtime import Runtime
from edgelora.runtime.worker import Candidate, Worker, serve_worker

RESULT_VERSION = 2  # 2: rows carry "fidelity", the result a "fidelity" section
METHOD = ("one worker process per bundle, loaded once; per shape: warm-up runs per bundle, then interleaved "
          "rounds of one run per bundle, one process running at a time; time measured in the worker around "
          "one run on synthetic token ids (fixed seed, mask all ones)")
Progress = Callable[[int, int, str], None]


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
    """Benchmark bundles side by side; returns a JSON-serialisable result (`report.format_table` shows it).

    Example:
        >>> r = run_benchmark(["out/fp32", "out/int8"], batches=(1,), seqs=(32,))  # doctest: +SKIP
        >>> print(report.format_table(r))                                           # doctest: +SKIP

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
    return run_candidates(candidates, references=fp32_references(info), comparisons=speedup_pairs(info),
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
    workers: list[Worker] = []
    measured: dict[int, dict[int, tuple[dict, str]]] = {}  # batch -> candidate -> (outputs, inputs kind)
    try:
        for c, b in zip(candidates, info):  # one at a time, so load times do not overlap
            w = Worker(c, threads, spinning)
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
    fidelity = {(i, batch): row_fidelity(i, references[i], measured[batch], info[i]["labels"],
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


def _main(argv: Sequence[str] | None = None) -> int:
    """A worker process of `bundle_candidates`: `python -m edgelora.runtime.bench --worker BUNDLE [--adapter A]`."""
    parser = argparse.ArgumentParser(prog="python -m edgelora.runtime.bench",
                                     description="internal: one bench worker serving a bundle (see edgelora bench)")
    parser.add_argument("--worker", metavar="BUNDLE", required=True)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-spin", action="store_true")
    args = parser.parse_args(argv)
    return serve_worker(lambda: BundleEngine(args.worker, args.adapter, args.threads, not args.no_spin))


if __name__ == "__main__":
    sys.exit(_main())
