"""The measuring half of benchmarks/switching.py: each function runs in a process of its own and returns JSON.

Runtime only (no torch): `switching.py` builds the bundles, starts one process per measurement as
`python benchmarks/switching_workers.py <kind> '<json kwargs>'` (two ORT sessions in one process distort each
other; see DESIGN.md), and summarizes what they print.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

RUNS_FOR_MEMORY = 8  # runs of 8x128 before reading RSS, cycling through the bundle's adapters


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return {"rss": out.get("VmRSS", 0), "peak": out.get("VmHWM", 0)}


def _feeds(rt, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, batch, seq])
    ids = rng.integers(1000, rt.vocab_size, size=(batch, seq), dtype=np.int64)
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: out[k] for k in rt.manifest.inputs}


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _stats(values) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    p25, p50, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(p50), "p25": float(p25), "p75": float(p75), "n": int(v.size)}


def worker_switch(bundle: str, threads: int, rounds: int, shapes: list) -> dict:
    """One session: run X after Y vs X after X, paired round by round; RunOptions costs."""
    import onnxruntime as ort

    from edgelora.runtime import Runtime

    rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=False)
    names = list(rt.adapters)
    result: dict = {"adapters": len(names), "shapes": {}}
    for batch, seq in shapes:
        feeds = _feeds(rt, batch, seq)
        for name in names * 2:
            rt.run(feeds, adapter=name)
        same, switched = [], []
        for r in range(rounds * 10 if batch * seq <= 64 else rounds):  # small shapes: cheap, and noisier
            x, y = names[r % len(names)], names[(r + 1) % len(names)]
            for first in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate which block goes first
                rt.run(feeds, adapter=y if first else x)
                (switched if first else same).append(_ms(lambda: rt.run(feeds, adapter=x)))
        diff = np.asarray(switched) - np.asarray(same)
        result["shapes"][f"{batch}x{seq}"] = {"after_same_ms": _stats(same), "after_other_ms": _stats(switched),
                                              "switch_overhead_ms": _stats(diff)}
    n = 100_000
    t = time.perf_counter()
    for i in range(n):
        rt._options_for(names[i % len(names)])
    result["runoptions_lookup_us"] = (time.perf_counter() - t) / n * 1e6
    path = Path(bundle) / rt.manifest.adapters[0].file
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    n = 10_000
    t = time.perf_counter()
    for _ in range(n):
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
    result["runoptions_build_us"] = (time.perf_counter() - t) / n * 1e6
    loads = []
    for _ in range(50):
        t = time.perf_counter()
        ort.LoraAdapter().Load(str(path))
        loads.append((time.perf_counter() - t) * 1e3)
    result["adapter_file_load_ms"] = _stats(loads)
    return result


def worker_reload(bundle: str, threads: int, repeats: int) -> dict:
    """Runtime construction of a bundle: the cost of 'switching' by loading another merged bundle."""
    from edgelora.runtime import Runtime

    def construct(cache: bool) -> float:
        t = time.perf_counter()
        rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=False, optimized_cache=cache)
        ms = (time.perf_counter() - t) * 1e3
        del rt
        gc.collect()
        return ms

    construct(True)  # imports, and the optimized-graph cache, out of the way
    warm = [construct(True) for _ in range(repeats)]
    cold = [construct(False) for _ in range(max(2, repeats // 2))]
    return {"construct_cached_ms": _stats(warm), "construct_uncached_ms": _stats(cold)}


def worker_memory(bundle: str, threads: int) -> dict:
    """Resident memory: before, after loading the bundle, after running every adapter, after a mixed batch."""
    before = _rss()
    from edgelora.runtime import Runtime

    imported = _rss()
    rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=False)
    loaded = _rss()
    feeds = _feeds(rt, 8, 128)
    names = list(rt.adapters)
    for i in range(RUNS_FOR_MEMORY):  # the same number of runs for every N: the arena grows with runs too
        rt.run(feeds, adapter=names[i % len(names)])
    ran = _rss()
    out = {"adapters": len(names), "before": before, "imported": imported, "loaded": loaded, "ran_each": ran}
    if rt.manifest.mode == "switchable" and len(names) > 1:
        for _ in range(RUNS_FOR_MEMORY):
            rt.run(feeds, adapters=[names[i % len(names)] for i in range(8)])
        out["ran_mixed"] = _rss()
    return out


def worker_mixed(bundle: str, threads: int, rounds: int, shapes: list) -> dict:
    """N tasks: one mixed batch (per-row adapters) vs N single-task batches vs one batch of one adapter."""
    from edgelora.runtime import Runtime

    rt = Runtime(bundle, intra_op_threads=threads, allow_spinning=False)
    names = list(rt.adapters)
    out: dict = {"tasks": len(names), "shapes": {}}
    for per_task, seq in shapes:
        feeds = _feeds(rt, per_task * len(names), seq)
        rows = [names[i // per_task] for i in range(per_task * len(names))]
        parts = [{k: v[i * per_task:(i + 1) * per_task] for k, v in feeds.items()} for i in range(len(names))]
        variants = {
            "mixed_one_run": lambda: rt.run(feeds, adapters=rows),
            "separate_runs": lambda: [rt.run(p, adapter=n) for p, n in zip(parts, names)],
            "uniform_one_run": lambda: rt.run(feeds, adapter=names[0]),
        }
        for fn in variants.values():
            fn(), fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for r in range(rounds):
            for k in order[r % 3:] + order[: r % 3]:
                times[k].append(_ms(variants[k]))
        stats = {k: _stats(v) for k, v in times.items()}
        stats["separate_over_mixed"] = stats["separate_runs"]["median"] / stats["mixed_one_run"]["median"]
        stats["mixed_over_uniform"] = stats["mixed_one_run"]["median"] / stats["uniform_one_run"]["median"]
        out["shapes"][f"{len(names)}x{per_task}x{seq}"] = stats
    return out


def worker_fidelity(int8: str, fp32: str, threads: int) -> dict:
    """A mixed batch's rows vs the same rows alone (int8 and fp32), and int8's own error, on the 4 adapters."""
    from edgelora.runtime import Runtime

    q, f = (Runtime(b, intra_op_threads=threads, allow_spinning=False) for b in (int8, fp32))
    names = list(q.adapters)
    feeds = _feeds(q, 16, 64, seed=1)
    feeds["attention_mask"][1::2, 40:] = 0  # ragged padding, as real batches have
    rows = [names[i % len(names)] for i in range(16)]

    def compare(rt) -> tuple[list, list]:
        mixed = rt.run(feeds, adapters=rows)
        alone = [rt.run({k: v[i:i + 1] for k, v in feeds.items()}, adapter=n) for i, n in enumerate(rows)]
        return mixed, alone

    (qm, qa), (fm, fa) = compare(q), compare(f)

    def worst(a_emb, b_emb, a_log, b_log) -> float:
        return float(max(np.abs(a_emb - b_emb).max(), max(np.abs(x - y).max() for x, y in zip(a_log, b_log))))

    # The same int8 effect without mixing: the whole batch through one adapter vs each row alone.
    uniform = q.run(feeds, adapter=names[0])
    uniform_alone = [q.run({k: v[i:i + 1] for k, v in feeds.items()}, adapter=names[0]) for i in range(16)]
    q_alone_emb = np.concatenate([a["embeddings"] for a in qa])
    f_alone_emb = np.concatenate([a["embeddings"] for a in fa])
    q_alone_log = [a["logits"][0] for a in qa]
    f_alone_log = [a["logits"][0] for a in fa]
    return {
        "rows": 16, "seq": 64,
        "fp32_mixed_vs_alone_max_abs": worst(fm["embeddings"], f_alone_emb, fm["logits"], f_alone_log),
        "int8_mixed_vs_alone_max_abs": worst(qm["embeddings"], q_alone_emb, qm["logits"], q_alone_log),
        "int8_alone_vs_fp32_alone_max_abs": worst(q_alone_emb, f_alone_emb, q_alone_log, f_alone_log),
        "int8_mixed_vs_alone_same_label": float(np.mean([a.argmax() == b.argmax() for a, b in zip(qm["logits"], q_alone_log)])),
        "int8_uniform_batch_vs_alone_max_abs": worst(
            uniform["embeddings"], np.concatenate([a["embeddings"] for a in uniform_alone]),
            list(uniform["logits"]), [a["logits"][0] for a in uniform_alone]),
        "int8_uniform_batch_vs_alone_same_label": float(np.mean(
            [a.argmax() == b["logits"][0].argmax() for a, b in zip(uniform["logits"], uniform_alone)])),
        # Label flips between int8 runs happen on near ties (random heads have small margins): how often
        # each int8 variant agrees with fp32, and the widest fp32 margin of any row whose label moved.
        "int8_alone_same_label_as_fp32": float(np.mean([a.argmax() == b.argmax() for a, b in zip(q_alone_log, f_alone_log)])),
        "int8_mixed_same_label_as_fp32": float(np.mean([a.argmax() == b.argmax() for a, b in zip(qm["logits"], f_alone_log)])),
        "widest_fp32_margin_of_a_moved_label": max(
            [float(np.diff(np.sort(b)[-2:])[0]) for a, c, b in zip(qm["logits"], q_alone_log, f_alone_log)
             if a.argmax() != c.argmax() or c.argmax() != b.argmax()] or [0.0]),
        "embedding_scale_max_abs": float(np.abs(f_alone_emb).max()),
    }


def worker_paired(bundles: dict[str, str], threads: int, rounds: int, shapes: list) -> dict:
    """Bundles (label -> dir[@adapter]) run in turn in one process, order rotated each round: per shape, the
    median over rounds of each one's time over the first one's (wall and process CPU time)."""
    from edgelora.runtime import Runtime

    runs = {}
    for label, spec in bundles.items():
        path, _, adapter = spec.partition("@")
        runs[label] = (Runtime(path, intra_op_threads=threads, allow_spinning=False), adapter or None)
    first = next(iter(runs))
    out: dict = {"reference": first, "threads": threads, "shapes": {}}
    for batch, seq in shapes:
        feeds = _feeds(runs[first][0], batch, seq)
        for rt, adapter in runs.values():
            for _ in range(3):
                rt.run(feeds, adapter=adapter)
        wall: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(rounds * 5 if batch * seq <= 64 else rounds):  # small shapes: cheap, and noisier
            for label in order[r % len(order):] + order[: r % len(order)]:
                rt, adapter = runs[label]
                c, t = time.process_time(), time.perf_counter()
                rt.run(feeds, adapter=adapter)
                wall[label].append((time.perf_counter() - t) * 1e3)
                cpu[label].append((time.process_time() - c) * 1e3)
        ratios = {k: float(np.median(np.asarray(v) / np.asarray(wall[first]))) for k, v in wall.items() if k != first}
        cpu_ratios = {k: float(np.median(np.asarray(v) / np.asarray(cpu[first]))) for k, v in cpu.items() if k != first}
        out["shapes"][f"{batch}x{seq}"] = {"ms": {k: _stats(v) for k, v in wall.items()}, "ratio": ratios,
                                           "cpu_ratio": cpu_ratios}
    return out


WORKERS = {"paired": worker_paired, "switch": worker_switch, "reload": worker_reload, "memory": worker_memory, "mixed": worker_mixed,
           "fidelity": worker_fidelity}


def main(argv: list[str]) -> int:
    """`<kind> <json kwargs>`: run one measurement, print its JSON as the last line."""
    kind, kwargs = argv[0], json.loads(argv[1])
    print(json.dumps(WORKERS[kind](**kwargs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
