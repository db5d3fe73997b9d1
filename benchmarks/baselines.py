"""Our bundles against the usual ways to run the same model on a CPU, timed in one interleaved run.

For all-MiniLM-L6-v2 (or `--base DIR` with `--adapter DIR`), six candidates, each in a worker process
of its own (`edgelora.runtime.worker`), driven by the bench harness (`edgelora.runtime.bench.run_candidates`):
the same synthetic inputs per shape, the same thread count, spinning off everywhere (ORT's spin-wait off, and
OMP_WAIT_POLICY=PASSIVE for torch), one run at a time, A B C ... interleaved.

    torch-fp32        PyTorch eager, fp32: the model as trained (adapter unmerged); the fidelity reference
    torch-int8        PyTorch eager, `torch.ao.quantization.quantize_dynamic` on every nn.Linear (adapter merged)
    optimum-int8      Optimum: `optimum-cli export onnx` then `onnxruntime quantize --avx2 --per_channel`,
                      made in its own venv (benchmarks/optimum_compare.py), mean-pooled here; no task head
    ours-merged-fp32  our merged bundle, fp32
    ours-merged-int8  our merged bundle, int8
    ours-switchable-int8  our switchable bundle, int8 base with the adapter applied at run time

Fidelity: every candidate's outputs on the bench's real sentences against torch-fp32's (worst row cosine,
max abs diff; of the embeddings for the plain base, of the logits with an adapter), and accuracy with
`--data`. Writes JSON, a PNG, and a README-ready markdown table with the command and the hardware.

    .venv/bin/python benchmarks/baselines.py --out runs/baselines --batch 1,8 --seq 32,128 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimum_compare import OPTIMUM_PYTHON, make_optimum_models, mean_pool, optimum_missing, zero_adapter  # noqa: E402

from edgelora.atomic import write_text_atomic  # noqa: E402
from edgelora.cli.common import write_json  # noqa: E402
from edgelora.cli.run import BenchProgress, load_labelled  # noqa: E402
from edgelora.errors import EdgeloraError  # noqa: E402
from edgelora.runtime import bench, report, worker  # noqa: E402
from edgelora.runtime.cpu import detect_isa  # noqa: E402
from edgelora.tokenize import DEFAULT_MAX_LENGTH  # noqa: E402

METHOD = ("one worker process per candidate, loaded once; per shape: warm-up runs per candidate, then interleaved "
          "rounds of one run per candidate, one process running at a time; time measured in the worker around one "
          "inference (torch: forward under inference_mode; ONNX: session run, plus mean pooling for Optimum's "
          "last_hidden_state) on synthetic token ids (fixed seed, mask all ones); ORT spinning off, torch "
          "OMP_WAIT_POLICY=PASSIVE")


# -- worker side: engines for the bench harness ---------------------------------------------------


def _tokenizer(model_dir: Path, max_length: int):
    from edgelora.tokenize import load_tokenizer

    return load_tokenizer(model_dir, max_length)  # what the bundles ship, truncated and padded alike


class TorchEngine:
    """A base + adapter as a PyTorch eager model: fp32 as trained, or merged and dynamically quantized."""

    def __init__(self, base: str, adapter: str, int8: bool, threads: int, max_length: int) -> None:
        import io

        import torch

        from edgelora.model import AdapterModel, load_base
        from edgelora.peft_format import load_adapter
        from edgelora.tokenize import encode

        torch.set_num_threads(threads)
        hf_model, base_path = load_base(base)
        model = AdapterModel(hf_model)
        name = load_adapter(model, adapter)
        model.set_quant(None)  # fp32: no fake quantization, whatever recipe the adapter was trained with
        model.set_adapter(name)
        model.eval()
        if int8:
            _unwrap_merged(model)
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model, self.torch = model, torch
        self._tok, self._encode = _tokenizer(base_path, max_length), encode
        self.input_names = list(encode(self._tok, ["a"]))
        self.vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.threads = torch.get_num_threads()
        self.labels = tuple(model.labels[name])
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        self.size_bytes = buf.tell()  # serialized weights, fp32 or packed int8

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self._encode(self._tok, list(texts))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            logits, pooled = self.model(**{k: self.torch.from_numpy(v) for k, v in feeds.items()})
        return {"logits": logits.numpy(), "embeddings": pooled.numpy()}


def _unwrap_merged(model) -> None:
    """Replace every adapter wrapper by what a PyTorch user would quantize: the nn.Linear with the LoRA
    merged in, followed by the bottleneck where the adapter is one (it cannot merge)."""
    from torch import nn

    model.merge()
    for name, layer in list(model.adapted_layers()):
        parent_name, _, child = name.rpartition(".")
        parent = model.base.get_submodule(parent_name) if parent_name else model.base
        tail = layer.bottleneck[layer.active] if layer.active in layer.bottleneck else None
        setattr(parent, child, layer.base if tail is None else nn.Sequential(layer.base, tail))


class OnnxEngine:
    """A bare ONNX file (Optimum's) in one ORT session set up as `Runtime` sets up its own, mean-pooling
    a last_hidden_state output into embeddings."""

    def __init__(self, model: str, tokenizer_dir: str, threads: int, spinning: bool, max_length: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._tok = _tokenizer(Path(tokenizer_dir), max_length)
        self.vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.threads = threads
        self.labels = ()
        self.size_bytes = Path(model).stat().st_size

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        from edgelora.tokenize import encode

        feeds = encode(self._tok, list(texts))
        return {k: feeds[k] for k in self.input_names}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(zip(self._outputs, self.session.run(None, feeds)))
        if "embeddings" not in values and "last_hidden_state" in values:
            values["embeddings"] = mean_pool(values.pop("last_hidden_state"), feeds["attention_mask"])
        return values


def _worker(spec: dict, threads: int, spinning: bool) -> int:
    if spec["kind"] == "torch":
        return worker.serve_worker(lambda: TorchEngine(spec["base"], spec["adapter"], spec["int8"], threads,
                                                      spec["max_length"]))
    return worker.serve_worker(lambda: OnnxEngine(spec["model"], spec["tokenizer"], threads, spinning,
                                                 spec["max_length"]))


# -- parent side ----------------------------------------------------------------------------------


def _candidate(label: str, spec: dict, info: dict) -> worker.Candidate:
    argv = (sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec))
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if spec["kind"] == "torch" else None  # torch's idle threads: no spinning
    return worker.Candidate(label, argv, info, env)


def prepare(base: str, adapter: str | None, out: Path, optimum_python: Path,
            say) -> tuple[list[worker.Candidate], str | None]:
    """Export our bundles, make Optimum's model, describe the candidates; returns them and why Optimum's
    pipeline did not run (None when it did)."""
    from edgelora.exporters.export import export_bundle
    from edgelora.model import resolve_base_path

    base_path = resolve_base_path(base)
    if adapter is None:
        say("making a zero LoRA adapter (B = 0: the plain base)")
        adapter_dir, name = zero_adapter(out / "adapters", base), "base"
    else:
        adapter_dir = Path(adapter)
        name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("edgelora", {}).get("name") \
            or adapter_dir.name
    torch_spec = {"kind": "torch", "base": str(base), "adapter": str(adapter_dir), "max_length": DEFAULT_MAX_LENGTH}
    cands = [
        _candidate("torch-fp32", {**torch_spec, "int8": False}, {"mode": "eager", "precision": "fp32"}),
        _candidate("torch-int8", {**torch_spec, "int8": True}, {"mode": "eager", "precision": "int8"}),
    ]
    missing = optimum_missing(optimum_python)
    if missing is None:
        say("Optimum: export + quantize --avx2 --per_channel (its own venv)")
        model_dir = base_path if adapter is None else _merged_hf_model(base, adapter_dir, out / "merged-hf")
        if model_dir is None:
            missing = "Optimum exports a Hugging Face model; this adapter is not LoRA, so it does not merge into one"
        else:
            made = make_optimum_models(model_dir, out / "optimum", optimum_python)
            cands.append(_candidate("optimum-int8", {"kind": "onnx", "model": str(made["int8"]),
                                                     "tokenizer": str(base_path), "max_length": DEFAULT_MAX_LENGTH},
                                    {"mode": "ort", "precision": "int8", "size_bytes": made["int8"].stat().st_size}))
    for mode, precision in (("merged", "fp32"), ("merged", "int8"), ("switchable", "int8")):
        say(f"exporting our {mode} {precision} bundle")
        path = out / "bundles" / f"{mode}-{precision}"
        export_bundle(base, {name: adapter_dir}, mode=mode, precision=precision, out=path)
        c = bench.bundle_candidates([f"{path}@{name}" if mode == "switchable" else str(path)])[0]
        cands.append(worker.Candidate(f"ours-{mode}-{precision}", c.argv, c.info))
    return cands, missing


def _merged_hf_model(base: str, adapter_dir: Path, out: Path) -> Path | None:
    """The base with a LoRA adapter merged in, saved as a plain Hugging Face model (None for other adapters)."""
    import shutil

    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import load_adapter

    hf_model, base_path = load_base(base)
    model = AdapterModel(hf_model)
    name = load_adapter(model, adapter_dir)
    if model.configs[name].kind != "lora":
        return None
    model.set_quant(None)
    model.set_adapter(name)
    _unwrap_merged(model)
    model.base.save_pretrained(out)
    for f in base_path.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def hardware(result: dict) -> str:
    import onnxruntime as ort
    import torch

    m = result["machine"]
    return (f"{m['model']} ({m['isa']}, {m['physical_cores']} physical / {m['logical_cores']} logical cores), "
            f"{result['settings']['threads']} threads, onnxruntime {ort.__version__}, torch {torch.__version__}, "
            f"Python {m['python']}")


def markdown(result: dict, command: str) -> str:
    """README-ready: the command, the hardware, then one table row per candidate and shape."""
    s = result["settings"]
    f = result["fidelity"]
    lines = [
        f"Command: `{command}`",
        f"Hardware: {hardware(result)}.",
        f"Medians of {s['rounds']} interleaved rounds after {s['warmup']} warm-up runs, each candidate in its own "
        "process, spinning off. Fidelity against PyTorch fp32 on "
        f"{f['texts']} {f['source']}, in batches of the row's batch size.",
        "",
        "| implementation | batch × tokens | p50 ms | p95 ms | seq/s | vs torch fp32 | size MB | peak RSS MB "
        "| worst cosine | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    p50 = {(r["bundle"], r["batch"], r["seq"]): r["p50_ms"] for r in result["rows"]}

    def mb(n: int | None) -> str:
        return "–" if n is None else f"{n / 2**20:.{0 if n >= 10 * 2**20 else 1}f}"

    for r in result["rows"]:
        fid = r["fidelity"]
        of = {"embeddings": "emb"}.get(fid["output"], fid["output"])
        cos = f"{fid['worst_cosine']:.5f} ({of})" if fid["worst_cosine"] is not None else fid["note"]
        diff = f"{fid['max_abs_diff']:.2e}" if fid["max_abs_diff"] is not None else "–"
        speedup = p50[(0, r["batch"], r["seq"])] / r["p50_ms"]
        lines.append(f"| {r['label']} | {r['batch']} × {r['seq']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['throughput_seq_s']:.0f} | {speedup:.2f}× | {mb(r['size_bytes'])} | "
                     f"{mb(r['rss_peak_bytes'])} | {cos} | {diff} |")
    missing = result.get("baselines", {}).get("optimum_not_run")
    if missing:
        lines.append(f"| optimum-int8 | not run: {missing} | | | | | | | | |")
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    request = worker.worker_request(argv)
    if request is not None:  # internal: one candidate's worker process
        return _worker(*request)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="minilm", help="base model name or directory (default minilm)")
    parser.add_argument("--adapter", default=None, help="adapter directory (default: a zero LoRA, the plain base)")
    parser.add_argument("--out", type=Path, default=Path("runs/baselines"), help="bundles, models and results")
    parser.add_argument("--batch", type=_ints, default=(1, 8))
    parser.add_argument("--seq", type=_ints, default=(32, 128))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every candidate (default: physical cores)")
    parser.add_argument("--data", default=None,
                        help="labelled texts for fidelity and accuracy (.jsonl/.csv/builtin:TASK)")
    parser.add_argument("--optimum-python", type=Path, default=OPTIMUM_PYTHON,
                        help=f"python of a venv with optimum-onnx (default {OPTIMUM_PYTHON})")
    args = parser.parse_args(argv)
    command = "python benchmarks/baselines.py " + shlex.join(argv)
    start = time.time()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        candidates, optimum_not_run = prepare(args.base, args.adapter, args.out, args.optimum_python,
                                              lambda msg: print(f"[{time.time() - start:5.0f} s] {msg}", flush=True))
        if optimum_not_run:
            print(f"optimum-int8: not run: {optimum_not_run}", flush=True)
        texts, gold = load_labelled(args.data) if args.data else (list(bench.FIDELITY_TEXTS), None)
        threads = args.threads or detect_isa().physical_cores
        adapter_head = args.adapter is not None  # the zero adapter's head is random: compare embeddings then
        comparisons = [("vs torch-fp32", 0, i) for i in range(1, len(candidates))]
        labels = [c.label for c in candidates]
        comparisons.append(("int8/fp32", labels.index("ours-merged-fp32"), labels.index("ours-merged-int8")))
        print(f"[{time.time() - start:5.0f} s] timing {len(candidates)} candidates", flush=True)
        result = bench.run_candidates(
            candidates, references=[0] * len(candidates), comparisons=comparisons, batches=args.batch, seqs=args.seq,
            rounds=args.rounds, warmup=args.warmup, threads=threads, texts=texts, gold=gold,
            data_source=args.data or "built-in sentences", outputs=bench.OUTPUTS if adapter_head else ("embeddings",),
            method=METHOD, progress=BenchProgress())
    except EdgeloraError as e:
        print(f"edgelora: error: {e}", file=sys.stderr)
        return 2
    import torch

    result["baselines"] = {"command": command, "optimum_not_run": optimum_not_run, "torch": torch.__version__,
                           "platform": platform.platform(), "load_avg_after": os.getloadavg(),
                           "wall_s": time.time() - start}
    print(report.format_table(result))
    if optimum_not_run:
        print(f"optimum-int8  not run: {optimum_not_run}")
    print("\n" + markdown(result, command))
    write_json(result, args.out / "baselines.json")
    report.plot(result, args.out / "baselines.png")
    write_text_atomic(args.out / "baselines.md", markdown(result, command) + "\n")
    print(f"\nwrote {args.out}/baselines.json, baselines.png, baselines.md ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
