"""Claims about the fidelity a classifier's user reads: beside the logits cosine, `bench` gives the share of
rows whose label agrees with the fp32 bundle's (a cosine of 0.93 with every label unchanged is not alarming).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tiny_bundle import make_bundle, write_manifest

from edgelora.runtime import Runtime, bench, fidelity, report


def test_agreement_counts_rows_whose_argmax_is_the_references() -> None:
    ref = {"logits": np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])}
    # far in cosine (row 0 scaled and shifted), yet three labels of four unchanged
    cand = {"logits": np.array([[9.0, -4.0], [1.0, 1.5], [0.0, 0.4], [5.0, 1.0]])}
    assert fidelity.label_agreement(cand, ref) == 0.75
    assert fidelity.compare_outputs(cand, ref)["logits"]["worst_cosine"] < 0.95
    assert fidelity.label_agreement({"embeddings": np.ones((2, 3))}, {"embeddings": np.ones((2, 3))}) is None
    assert fidelity.label_agreement({"logits": np.zeros((2, 0))}, {"logits": np.zeros((2, 0))}) is None


def test_bench_shows_label_agreement_beside_the_cosine(tmp_path: Path) -> None:
    # Two bundles of one (recorded) function whose heads differ: the candidate's decision boundary is put
    # through the middle of the texts' embeddings, so some labels flip and others do not.
    fp32 = make_bundle(tmp_path / "a", "merged", "fp32", seed=0).path
    other = make_bundle(tmp_path / "b", "merged", "int8", seed=0).path
    texts = list(bench.FIDELITY_TEXTS)
    pooled = Runtime(fp32, intra_op_threads=1, optimized_cache=False).run(texts)["embeddings"]  # (rows, hidden)
    w = np.random.default_rng(5).standard_normal((pooled.shape[1], 2)).astype(np.float32)
    margin = pooled @ (w[:, 1] - w[:, 0])
    b = np.array([0.0, -np.median(margin)], np.float32)
    proto = onnx.load(str(other / "model.onnx"))
    for init in proto.graph.initializer:
        if init.name in ("head.weight", "head.bias"):
            init.CopyFrom(numpy_helper.from_array(w if init.name == "head.weight" else b, init.name))
    onnx.save(proto, str(other / "model.onnx"))
    manifest = json.loads((other / "manifest.json").read_text())
    write_manifest(other, {**manifest, "files": dict.fromkeys(manifest["files"])})

    out = bench.run_benchmark([str(fp32), str(other)], batches=(4,), seqs=(8,), rounds=1, warmup=0, threads=1)
    labels = []
    for path in (fp32, other):
        rt = Runtime(path, intra_op_threads=1, optimized_cache=False)
        labels.append(np.concatenate([rt.run(texts[i : i + 4])["logits"] for i in range(0, len(texts), 4)]).argmax(1))
    expected = float(np.mean(labels[0] == labels[1]))
    assert 0.0 < expected < 1.0, "the test bundles must differ in some labels and agree in others"
    row = next(r for r in out["rows"] if r["bundle"] == 1)
    assert row["fidelity"]["label_agreement"] == expected
    assert next(r for r in out["rows"] if r["bundle"] == 0)["fidelity"]["label_agreement"] == 1.0
    table = report.format_table(out)
    assert "agree" in table and f"{100 * expected:.1f}%" in table
