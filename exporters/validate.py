"""Check an export against the torch model it came from, on generated inputs, before it is written.

fp32 graphs must equal the float torch model; int8 graphs are compared with the fake-quantized torch
model (the same quantizer, the same rounding), and with fp32 to report what int8 costs. The figures go
into the manifest; an export outside tolerance is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from edgelora.errors import EdgeloraError
from edgelora.fake_quant import fake_quantize_activation, fake_quantize_activation_static, fake_quantize_weight
from edgelora.model import AdapterModel

from .onnx_graph import MASK_FILTER_VALUE
from .quantize import QuantizedAttention

# fp32 ONNX vs torch: the same float ops in another summation order; 1e-3 relative to the largest
# logit leaves ~100x headroom over the 1e-5 seen on MiniLM, and any real export bug is far above it.
FP32_REL_TOL = 1e-3
# int8 ONNX vs the fake-quant torch model, layer by layer: given the same input, each quantized layer
# must give the fake-quant product to float rounding (measured ~1e-6 relative on MiniLM with 7-bit
# weights). A saturating kernel (8-bit weights on AVX2) shows ~1e-1, a wrong scale or layout far more.
INT8_LAYER_REL_TOL = 1e-4
# End to end the two drift apart: one ulp of float difference can flip one activation's uint8 rounding
# and such flips compound over the layers (MiniLM: embeddings ~0.99 cosine to fake quant, the same
# order as fake quant to fp32). This floor only catches a graph that is wrong as a whole.
INT8_MIN_COSINE = 0.95


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


def run_graph(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], options: ort.RunOptions | None = None) \
        -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of a graph; logits (batch, 0) for a graph without a head (an embeddings bundle)."""
    names = {o.name for o in sess.get_outputs()}
    if "logits" in names:
        logits, pooled = sess.run(["logits", "embeddings"], feeds, options)
        return logits, pooled
    (pooled,) = sess.run(["embeddings"], feeds, options)
    return np.zeros((pooled.shape[0], 0), np.float32), pooled


def adapter_run_options(adapter_path: str | None) -> tuple[ort.RunOptions | None, ort.LoraAdapter | None]:
    """RunOptions activating the adapter file, and the adapter itself (keep it alive while running)."""
    if adapter_path is None:
        return None, None
    adapter = ort.LoraAdapter()
    adapter.Load(adapter_path)
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    return run_options, adapter


def check_tolerance(precision: str, label: str, logits: Check, pooled: Check, ref_scale: float) -> None:
    if precision == "fp32":
        bound = FP32_REL_TOL * max(1.0, ref_scale)
        if max(logits.max_abs_diff, pooled.max_abs_diff) > bound:
            raise EdgeloraError(
                f"export check failed for {label}: fp32 ONNX differs from torch by "
                f"{max(logits.max_abs_diff, pooled.max_abs_diff):.3g} (> {bound:.3g}); please report this model"
            )
    elif pooled.worst_cosine < INT8_MIN_COSINE:
        raise EdgeloraError(
            f"export check failed for {label}: int8 ONNX embeddings are far from the fake-quant model "
            f"(cosine {pooled.worst_cosine:.4f} < {INT8_MIN_COSINE}); please report this model"
        )


def layerwise_error(model: onnx.ModelProto, feeds: dict[str, np.ndarray], layers: dict, bits: int,
                    run_options: ort.RunOptions | None = None) -> tuple[float, str]:
    """Worst relative error of any int8 layer against the fake-quant product of the same input.

    Exposes each quantized layer's float input and int8 output as graph outputs, runs once, and
    recomputes every layer in torch with the shared fake quantizer: (max error, worst layer). A fused
    QAttention is recomputed whole: its three fake-quant projections, then the attention over them. An
    attention core of a switchable graph (ONNX Attention, or MultiHeadAttention in older bundles: q, k, v
    from int8 projections plus float adapter branches) is recomputed from the q, k, v and mask it is
    given, so the fused node is checked too.
    A static layer's input is fake-quantized with its constant (scale, zero_point), as its QuantizeLinear
    does: given the same float input both compute the same integers (tests/test_static.py pins
    QuantizeLinear bit for bit), so only float summation order differs and the dynamic tolerance holds.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = {t: onnx.TensorProto.FLOAT for layer in layers.values() for t in (layer.input, layer.output)}
    types.update({layer.mask: onnx.TensorProto.INT32 for layer in layers.values()
                  if isinstance(layer, QuantizedAttention) and layer.mask})
    cores = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    standard = [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    types.update({t: onnx.TensorProto.FLOAT for n in cores + standard for t in (*n.input[:3], n.output[0])})
    types.update({n.input[4]: onnx.TensorProto.INT32 for n in cores if len(n.input) > 4 and n.input[4]})
    types.update({n.input[3]: onnx.TensorProto.FLOAT for n in standard if len(n.input) > 3 and n.input[3]})
    names = sorted(types)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every probe tensor
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(names, sess.run(names, feeds, run_options)))
    worst, worst_layer = 0.0, ""

    def relative_error(output: str, ref: torch.Tensor) -> float:  # max abs difference over the reference's max
        return float((torch.from_numpy(values[output]) - ref).abs().max() / ref.abs().max().clamp(min=1e-12))

    for name, layer in layers.items():
        x = torch.from_numpy(values[layer.input])
        w = fake_quantize_weight(torch.tensor(layer.weight), bits)
        if layer.act_qparams is None:
            xq = fake_quantize_activation(x)
        else:
            scale, zero_point = (torch.tensor(v, dtype=torch.float32) for v in layer.act_qparams)
            xq = fake_quantize_activation_static(x, scale, zero_point)
        if isinstance(layer, QuantizedAttention):
            mask = torch.from_numpy(values[layer.mask]) if layer.mask else None
            ref = attention_reference(xq, w, torch.tensor(layer.bias), mask, layer.num_heads)
        else:
            ref = torch.nn.functional.linear(xq, w)
        err = relative_error(layer.output, ref)
        if err > worst:
            worst, worst_layer = err, name
    inits = {init.name: init for init in model.graph.initializer}

    def core_reference(node: onnx.NodeProto) -> torch.Tensor:
        q, k, v = (torch.from_numpy(values[t]) for t in node.input[:3])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MultiHeadAttention":
            bias = torch.from_numpy(numpy_helper.to_array(inits[node.input[3]]).copy())
            mask = torch.from_numpy(values[node.input[4]]) if len(node.input) > 4 and node.input[4] else None
            return multi_head_reference(q, k, v, bias, mask, attrs["num_heads"])
        # ONNX Attention: BERT's attention as the export means it (scale 1/sqrt(d), not causal), so a node
        # computing anything else — another scale, causal, soft-capped — differs from it and is caught
        additive = torch.from_numpy(values[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        return _attend(q, k, v, None, attrs["q_num_heads"], additive)

    for node in cores + standard:
        ref = core_reference(node)
        err = relative_error(node.output[0], ref)
        if err > worst:
            worst, worst_layer = err, node.name
    return worst, worst_layer


def attention_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None,
                        num_heads: int) -> torch.Tensor:
    """What ORT's (Q)Attention computes, in torch: softmax(q k^T / sqrt(d) + mask) v over the packed projection.

    Args:
        x: (batch, seq, in) input; weight: (3 * hidden, in) with Wq, Wk, Wv stacked; bias: (3 * hidden,).
        mask: a raw (batch, seq) mask of 1 (attend) and 0 (padding), a (batch,) count of leading real
            tokens (ORT's "mask index"), or None.
    """
    q, k, v = torch.nn.functional.linear(x, weight, bias).chunk(3, dim=-1)  # each (batch, seq, hidden)
    return _attend(q, k, v, mask, num_heads)


def multi_head_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                         mask: torch.Tensor | None, num_heads: int) -> torch.Tensor:
    """What ORT's MultiHeadAttention computes from separate (batch, seq, hidden) q, k, v and a (3 * hidden,)
    bias [bq | bk | bv]: the attention of `attention_reference` after its projections."""
    bq, bk, bv = bias.chunk(3)
    return _attend(q + bq, k + bk, v + bv, mask, num_heads)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, num_heads: int,
            additive: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v per head. `mask`: raw (batch, seq) or a (batch,) mask index, turned
    into MASK_FILTER_VALUE for padded keys; `additive`: a float mask broadcastable to (batch, heads, seq, seq),
    as ONNX's Attention takes it."""
    batch, seq, hidden = q.shape
    d = hidden // num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, seq, num_heads, d).transpose(1, 2)  # (batch, heads, seq, d)

    scores = heads(q) @ heads(k).transpose(-1, -2) / d**0.5  # (batch, heads, seq, seq)
    if mask is not None:
        if mask.dim() == 1:  # mask index: the first mask[b] keys are real
            mask = (torch.arange(seq)[None, :] < mask[:, None]).to(torch.int32)
        scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * MASK_FILTER_VALUE
    if additive is not None:
        scores = scores + additive
    context = torch.softmax(scores, dim=-1) @ heads(v)  # (batch, heads, seq, d)
    return context.transpose(1, 2).reshape(batch, seq, hidden)
