"""Check an export against the torch model it came from, on generated inputs, before it is written.

fp32 graphs must equal the float torch model; int8 graphs are compared with the fake-quantized torch
model (the same quantizer, the same rounding), and with fp32 to report what int8 costs. The figures go
into the manifest; an export outside tolerance is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel

# fp32 ONNX vs torch: the same float ops in another summation order; 1e-3 relative to the largest
# logit leaves ~100x headroom over the 1e-5 seen on MiniLM, and any real export bug is far above it.
FP32_REL_TOL = 1e-3
# int8 ONNX vs the fake-quant torch model: each layer agrees to float rounding, but a float difference
# of one ulp can flip one activation's uint8 rounding, and such flips compound over the layers
# (measured on MiniLM: embeddings 0.99+ cosine to fake quant). A broken int8 graph (wrong scale, a
# saturating kernel, a transposed weight) falls far below this floor.
INT8_MIN_COSINE = 0.97


@dataclass(frozen=True)
class Check:
    name: str
    max_abs_diff: float
    worst_cosine: float

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "worst_cosine": self.worst_cosine}


def generated_feeds(vocab_size: int, feeds: tuple[str, ...], batch: int = 4, seq: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (away from the special tokens) with ragged padding, as real batches have."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 2)
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, seq - row * (seq // (2 * batch)) :] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: out[k] for k in feeds}


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 1.0
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    return float(np.min((a * b).sum(-1) / np.maximum(na * nb, 1e-12)))


def compare(name: str, got: np.ndarray, ref: np.ndarray) -> Check:
    if got.shape != ref.shape:
        raise EdgeloraError(f"export check {name}: ONNX output shape {got.shape} != torch {ref.shape}")
    diff = float(np.abs(got - ref).max()) if got.size else 0.0
    return Check(name, diff, worst_cosine(got, ref))


def torch_outputs(model: AdapterModel, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        logits, pooled = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return logits.numpy(), pooled.numpy()


def session(model_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], adapter_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    run_options = None
    if adapter_path is not None:
        adapter = ort.LoraAdapter()
        adapter.Load(adapter_path)
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
    logits, pooled = sess.run(["logits", "embeddings"], feeds, run_options)
    return logits, pooled


def check_tolerance(precision: str, label: str, logits: Check, pooled: Check, ref_scale: float) -> None:
    if precision == "fp32":
        bound = FP32_REL_TOL * max(1.0, ref_scale)
        if max(logits.max_abs_diff, pooled.max_abs_diff) > bound:
            raise EdgeloraError(
                f"export check failed for {label}: fp32 ONNX differs from torch by "
                f"{max(logits.max_abs_diff, pooled.max_abs_diff):.3g} (> {bound:.3g}); please report this model"
            )
    elif min(logits.worst_cosine, pooled.worst_cosine) < INT8_MIN_COSINE:
        raise EdgeloraError(
            f"export check failed for {label}: int8 ONNX is far from the fake-quant model "
            f"(cosine {min(logits.worst_cosine, pooled.worst_cosine):.4f} < {INT8_MIN_COSINE}); "
            "if this CPU lacks VNNI, export with --weight-bits 7"
        )
