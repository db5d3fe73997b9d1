"""Check a decoder graph against the torch model it came from, before the bundle is written.

Both run a left-padded prefill and then one decode step through the cache. fp32 graphs must give the
torch logits within FP32_REL_TOL; int8 graphs are checked layer by layer (each MatMulNBits output against
the fake-quant product of the very input it was given) and end to end against the fake-quant torch model
and fp32. The figures go into the manifest; an export outside tolerance is refused.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import helper

from edgelora.errors import EdgeloraError
from edgelora.fake_quant import (
    fake_quantize_activation_blockwise,
    fake_quantize_activation_rowwise,
    fake_quantize_weight,
    fake_quantize_weight_blockwise,
)

from .decoder_graph import DecoderGraph, DecoderSpec, QuantizedMatMul, RowwisePlan

# fp32 graph vs torch, max |difference| over real positions relative to the largest |logit|: the same float
# ops in another summation order (measured ~2e-7 on tiny models, ~1e-6 on SmolLM2); a wrong mask, rotary
# or cache shows at 1e-2 and above.
FP32_REL_TOL = 1e-4
# Each MatMulNBits output vs fake_quant(x) @ fake_quant(W).T of the same x, relative to the output's largest
# magnitude: the same integers, float32 block sums in another order (<= 5e-7 measured, see
# tests/test_fake_quant_blockwise.py); one activation integer off by one shows at ~1e-3.
INT8_LAYER_REL_TOL = 1e-4
# End to end, int8 graph vs the fake-quant torch model: one ulp can flip one activation's rounding and
# flips compound over the layers, so only a floor that catches a graph wrong as a whole.
INT8_MIN_COSINE = 0.95


def prefill_feeds(spec: DecoderSpec, batch: int = 3, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids, left-padded by 0, 2, 5, ... tokens per row, and an empty cache."""
    rng = np.random.default_rng(seed)
    low = min(100, spec.vocab_size // 4)
    ids = rng.integers(low, spec.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    for row in range(batch):
        mask[row, : min(seq - 1, row * (row + 3) // 2)] = 0
    ids[mask == 0] = 0
    empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, seq)}
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(spec.num_layers) for kv in ("key", "value")})
    return feeds


def position_ids(mask: np.ndarray, new: int) -> np.ndarray:
    """The positions of the last `new` tokens: cumsum(mask) - 1, clipped at 0 (left padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -new:].astype(np.int64)


def decode_feeds(previous: dict[str, np.ndarray], presents: list[np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The next step's feeds: one new token per row after `previous`, with the cache it returned."""
    mask = np.concatenate([previous["attention_mask"], np.ones((len(ids), 1), np.int64)], axis=1)
    feeds = {"input_ids": ids.reshape(-1, 1).astype(np.int64), "attention_mask": mask,
             "position_ids": position_ids(mask, 1)}
    names = [k for k in previous if k.startswith("past_key_values.")]
    feeds.update(dict(zip(names, presents)))
    return feeds


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def torch_steps(model: torch.nn.Module, prefill: dict[str, np.ndarray], decode_ids: np.ndarray) -> list[np.ndarray]:
    """The torch model's logits for the prefill and for one decode step through its own cache."""
    t = {k: torch.from_numpy(prefill[k]) for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        first = model(**t, use_cache=True)
        mask = torch.cat([t["attention_mask"], torch.ones(len(decode_ids), 1, dtype=torch.int64)], dim=1)
        pos = torch.from_numpy(position_ids(mask.numpy(), 1))
        second = model(input_ids=torch.from_numpy(decode_ids.reshape(-1, 1)), attention_mask=mask, position_ids=pos,
                       cache=first.cache, use_cache=True)
    return [first.logits.numpy(), second.logits.numpy()]


def _real(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(n, vocab): the rows of real (unpadded) positions; a padded position's output is never used."""
    return logits[mask[:, -logits.shape[1]:].astype(bool)]


def _compare(got: list[np.ndarray], ref: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    a = np.concatenate([_real(g, m) for g, m in zip(got, masks)]).astype(np.float64)
    b = np.concatenate([_real(r, m) for r, m in zip(ref, masks)]).astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return {"max_rel_error": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)),
            "worst_cosine": float(cos.min()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


class _FakeQuantLinear(torch.nn.Module):
    """A linear (or GPT-2 Conv1D, weight (in, out)) computing what its MatMulNBits node computes:
    blockwise int8 weight and activation."""

    def __init__(self, linear: torch.nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight if isinstance(self.linear, torch.nn.Linear) else self.linear.weight.T
        return F.linear(fake_quantize_activation_blockwise(x), fake_quantize_weight_blockwise(weight), self.linear.bias)


def fake_quant_model(model: torch.nn.Module, rowwise: RowwisePlan | None = None) -> torch.nn.Module:
    """A copy of a causal LM whose every projection and LM head is blockwise fake-quantized; with `rowwise`,
    fake-quantized as training does it under that recipe and its SmoothQuant factors (`AdaptedLinear`)."""
    if rowwise is not None:
        from edgelora.causal_lm import CausalLMAdapterModel
        from edgelora.smooth import apply_smoothing

        wrapped = CausalLMAdapterModel(copy.deepcopy(model))
        wrapped.set_quant(rowwise.quant)
        apply_smoothing(wrapped, rowwise.smoothing)
        return wrapped.base
    fq = copy.deepcopy(model)
    if getattr(fq.config, "model_type", None) == "gpt2":
        targets = [(getattr(block, part), name) for block in fq.transformer.h for part, name in
                   (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))]
    else:
        targets = [(parent, name) for layer in fq.model.layers for parent, names in
                   ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                    (layer.mlp, ("gate_proj", "up_proj", "down_proj"))) for name in names]
    for parent, name in targets:
        setattr(parent, name, _FakeQuantLinear(getattr(parent, name)))
    fq.lm_head = _FakeQuantLinear(fq.lm_head)
    return fq


def fake_quant_product(q: QuantizedMatMul, x: torch.Tensor) -> torch.Tensor:
    """What one int8 matmul of the graph must give for input x: the fake-quant product of its scheme."""
    weight = torch.from_numpy(q.weight)
    if q.kind == "rowwise":
        return F.linear(fake_quantize_activation_rowwise(x), fake_quantize_weight(weight, q.bits))
    return F.linear(fake_quantize_activation_blockwise(x), fake_quantize_weight_blockwise(weight))


def layerwise_error(graph: DecoderGraph, feeds: list[dict[str, np.ndarray]],
                    run_options: ort.RunOptions | None = None) -> tuple[float, str]:
    """Worst relative error of any int8 matmul's output against the fake-quant product of its own input, over
    the given runs (prefill and decode; `run_options`: an adapter active in a switchable graph): every
    quantized input and output is exposed as a graph output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(graph.model)
    names = sorted({t for q in graph.quantized.values() for t in (q.input, q.output)})
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in existing)
    sess = session(probe, optimize=False)  # every probed tensor kept as it is
    worst, worst_layer = 0.0, ""
    for run in feeds:
        values = dict(zip(names, sess.run(names, run, run_options)))
        for name, q in graph.quantized.items():
            ref = fake_quant_product(q, torch.from_numpy(values[q.input]))
            err = float((torch.from_numpy(values[q.output]) - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
            if err > worst:
                worst, worst_layer = err, name
    return worst, worst_layer


def validate_decoder(graph: DecoderGraph, model: torch.nn.Module, precision: str, label: str,
                     rowwise: RowwisePlan | None = None) -> dict[str, Any]:
    """Run `graph` and `model` (fp32, adapters merged) on a left-padded prefill and one decode step; raise
    EdgeloraError outside tolerance; return the figures for the manifest."""
    prefill = prefill_feeds(graph.spec)
    sess = session(graph.model)
    first = sess.run(None, prefill)
    decode_ids = first[0][:, -1].argmax(-1)  # the greedy next token of every row
    decode = decode_feeds(prefill, first[1:], decode_ids)
    got = [first[0], sess.run(None, decode)[0]]
    masks = [prefill["attention_mask"], decode["attention_mask"]]
    fp32 = _compare(got, torch_steps(model, prefill, decode_ids), masks)
    report: dict[str, Any] = {
        "inputs": {"batch": int(prefill["input_ids"].shape[0]), "prefill": int(prefill["input_ids"].shape[1]),
                   "decode_steps": 1, "kind": "random token ids, left padding"},
        "tolerances": {"fp32_rel": FP32_REL_TOL, "int8_layer_rel": INT8_LAYER_REL_TOL,
                       "int8_min_cosine": INT8_MIN_COSINE},
        "vs_fp32_torch": fp32,
    }
    if precision == "fp32":
        if fp32["max_rel_error"] > FP32_REL_TOL:
            raise EdgeloraError(f"export check failed for {label}: fp32 ONNX logits differ from torch by "
                                f"{fp32['max_rel_error']:.3g} relative (> {FP32_REL_TOL}); please report this model")
        return report
    err, layer = layerwise_error(graph, [prefill, decode])
    report["int8_layers_vs_fake_quant"] = {"max_rel_error": err, "worst_layer": layer,
                                          "matmuls": len(graph.quantized)}
    if err > INT8_LAYER_REL_TOL:
        raise EdgeloraError(f"export check failed for {label}: int8 matmul {layer} differs from the fake-quant "
                            f"product by {err:.2g} relative (> {INT8_LAYER_REL_TOL}); please report this CPU and model")
    fq = _compare(got, torch_steps(fake_quant_model(model, rowwise), prefill, decode_ids), masks)
    report["vs_fake_quant_torch"] = fq
    if fq["worst_cosine"] < INT8_MIN_COSINE:
        raise EdgeloraError(f"export check failed for {label}: int8 ONNX logits are far from the fake-quant model "
                            f"(cosine {fq['worst_cosine']:.4f} < {INT8_MIN_COSINE}); please report this model")
    return report


# Plain English the int8 export's perplexity is measured on (held out from any task): the manifest reports
# fp32 and int8 perplexity over them, so a user sees what rounding costs on ordinary text.
PERPLEXITY_TEXTS = (
    "The cat sat quietly on the windowsill, watching the rain run down the glass.",
    "Interest rates rose for the third time this year, and mortgages followed.",
    "My flight to Chicago was cancelled because of the snowstorm, so I took the train.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "The committee will publish its final report next Tuesday after the vote.",
    "She learned to play the violin as a child and still practises every evening.",
    "Fresh bread, a little butter and a cup of tea make a fine breakfast.",
    "The museum reopened after two years of repairs to its roof and walls.",
)


def perplexity(graph: DecoderGraph, model: torch.nn.Module, token_ids: list[list[int]]) -> dict[str, float]:
    """Perplexity of the fp32 torch model and of the graph over `token_ids` (each text's next-token cross
    entropy from one prefill, pooled over all tokens), and their ratio."""
    sess = session(graph.model)
    spec = graph.spec
    totals = {"fp32": 0.0, "graph": 0.0}
    count = 0
    for ids in token_ids:
        x = np.asarray([ids], np.int64)
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(ids))[None],
                 **{name: empty for name in graph.input_names[3:]}}
        logits = {"graph": sess.run(["logits"], feeds)[0][0].astype(np.float64)}
        with torch.no_grad():
            logits["fp32"] = model(input_ids=torch.from_numpy(x)).logits[0].double().numpy()
        for key, z in logits.items():
            z = z[:-1] - z[:-1].max(-1, keepdims=True)
            logprob = z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(-1))
            totals[key] -= float(logprob.sum())
        count += len(ids) - 1
    fp32, graph_ppl = math.exp(totals["fp32"] / count), math.exp(totals["graph"] / count)
    return {"texts": len(token_ids), "tokens": count, "fp32": fp32, "int8": graph_ppl, "ratio": graph_ppl / fp32}
