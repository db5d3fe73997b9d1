"""benchmarks/baselines.py on a tiny BERT with a LoRA adapter: every candidate runs in the one harness,
fidelity is measured against PyTorch fp32, and a missing Optimum venv is reported in the table, not hidden."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import randomize_adapters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines  # noqa: E402

# Our fp32 ONNX bundle against fp32 torch: the same float ops, fused and reordered (~1e-6 on toy bases).
FP32_MIN_COSINE = 1 - 1e-5
# Any int8 path against fp32 on a two-layer toy: rounding must show (cosine < 1) but stay small.
INT8_VS_FP32_MIN_COSINE = 0.99


@pytest.mark.slow  # two torch workers and three exports: ~30 s on a shared 2-core machine
def test_baselines_on_a_tiny_model(tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgelora.config import LoraConfig
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["neg", "pos"])
    randomize_adapters(model)
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    out = tmp_path / "out"
    rc = baselines.main(["--base", str(tiny_bert_dir), "--adapter", str(adapter), "--out", str(out), "--batch", "2",
                         "--seq", "8", "--rounds", "2", "--warmup", "0", "--threads", "1",
                         "--optimum-python", str(tmp_path / "no-venv" / "bin" / "python")])
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "baselines.json").read_text())
    labels = [b["label"] for b in result["bundles"]]
    assert labels == ["torch-fp32", "torch-int8", "ours-merged-fp32", "ours-merged-int8", "ours-switchable-int8"]
    order = [s["bundle"] for s in result["schedule"]]
    assert order == list(range(len(labels))) * (len(order) // len(labels))  # interleaved, one run each in turn
    rows = {r["label"]: r for r in result["rows"]}  # one shape
    ref = rows["torch-fp32"]["fidelity"]
    assert ref["worst_cosine"] == pytest.approx(1.0, abs=1e-12) and ref["max_abs_diff"] == 0.0
    assert rows["ours-merged-fp32"]["fidelity"]["worst_cosine"] >= FP32_MIN_COSINE
    for label in ("torch-int8", "ours-merged-int8"):
        f = rows[label]["fidelity"]
        assert f["output"] == "logits" and f["reference_label"] == "torch-fp32"
        assert INT8_VS_FP32_MIN_COSINE < f["worst_cosine"] < 1.0 and f["max_abs_diff"] > 0
    for r in result["rows"]:
        assert r["size_bytes"] > 0 and r["rss_peak_bytes"] > 0 and r["p50_ms"] > 0
    md = (out / "baselines.md").read_text()
    assert "| optimum-int8 | not run: no Optimum venv" in md and "Hardware: " in md and "--optimum-python" in md
    assert "optimum-int8  not run" in printed and "| ours-switchable-int8 | 2 × 8 |" in printed
    assert (out / "baselines.png").read_bytes()[:4] == b"\x89PNG"
