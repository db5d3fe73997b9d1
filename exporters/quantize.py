"""Write int8 weights into an exported graph with the shared quantizer — no second rounding pass.

Every `MatMul(x, weight_t)` of a quantizable layer becomes the dynamic-quantization pattern ONNX Runtime
fuses into `DynamicQuantizeMatMul`: DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul
by (x_scale * w_scale). A fused `Attention` (see `fusion.py`) becomes DynamicQuantizeLinear(x) ->
`QAttention` with the packed [Wq | Wk | Wv] weight and one scale per column: the per-output-channel scales
of the three layers side by side, so QAttention computes exactly the three quantized projections.
W_s8 and w_scale come from `edgelora.fake_quant.quantize_weight` on the very (out, in) tensor training
fake-quantized, and DynamicQuantizeLinear is what training's activation fake quantizer imitates, so the
graph reproduces the fake-quantized model up to float summation order.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelora.fake_quant import quantize_weight

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantizedLayer:
    """Where one quantized layer lives in the graph: its float input, its int8 product, its float weight."""

    input: str
    output: str
    weight: np.ndarray  # (out, in) float32: the tensor the shared quantizer rounded


@dataclass(frozen=True)
class QuantizedAttention:
    """A QAttention node: three quantized projections (query, key, value) and the attention after them.

    A layer-by-layer check recomputes softmax(q k^T / sqrt(d) + mask) v from `input` with the fake
    quantizer and compares it with `output`.
    """

    input: str
    output: str
    mask: str  # the node's raw (batch, seq) int32 mask input; "" for none
    weight: np.ndarray  # (3 * hidden, in) float32: Wq, Wk, Wv stacked, each row rounded on its own scale
    bias: np.ndarray  # (3 * hidden,)
    num_heads: int
    layers: tuple[str, str, str]


def qattention_compatible(node: onnx.NodeProto) -> bool:
    """An Attention that QAttention (and `validate.attention_reference`) computes the same: heads, bias, a mask."""
    return {a.name for a in node.attribute} == {"num_heads"} and len(node.input) <= 4


def count_layers(quantized: Mapping[str, QuantizedLayer | QuantizedAttention]) -> int:
    """Linear layers now int8 (a QAttention holds three)."""
    return sum(len(q.layers) if isinstance(q, QuantizedAttention) else 1 for q in quantized.values())


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def quantize_graph(
    model: onnx.ModelProto,
    weights: dict[str, str],
    bits: int,
    attention: Mapping[str, tuple[str, str, str]] | None = None,
    skip: Collection[str] = (),
) -> dict[str, QuantizedLayer | QuantizedAttention]:
    """Rewrite, in place, the MatMuls whose weight initializer is named in `weights` (layer -> initializer)
    and the fused Attention nodes named in `attention` (node name -> its query, key, value layers).

    Args:
        skip: layers to keep fp32 (mixed precision). A fused Attention stays fp32 if any of its three
            layers is skipped, so callers skip query, key and value together (see `quantization_units`).

    Returns, per quantized layer (or per QAttention node), the tensors a layer-by-layer check needs.
    Layers absent from `weights` (adapter branches, heads, attention score products) stay fp32.
    """
    graph = model.graph
    attention = dict(attention or {})
    skip = set(skip)
    inits = {init.name: init for init in graph.initializer}
    layer_of = {init: layer for layer, init in weights.items() if layer not in skip}
    layers: dict[str, QuantizedLayer | QuantizedAttention] = {}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # activation -> (x_u8, x_scale, x_zp)
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()

    def quantize_input(x: str) -> tuple[str, str, str]:
        if x not in quantized_inputs:
            qx = (f"{x}_quant", f"{x}_scale", f"{x}_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(qx), name=f"{x}_DynamicQuantizeLinear"))
            quantized_inputs[x] = qx
        return quantized_inputs[x]

    def add_weight(w_t: np.ndarray, base: str) -> tuple[str, str, np.ndarray]:
        """(int8 (in, out) initializer, scale initializer, the float (out, in) weight) from an (in, out) weight."""
        w = np.ascontiguousarray(w_t.T)
        q, scale = quantize_weight(torch.from_numpy(w), bits)  # (out, in), (out,)
        q_name, s_name = f"{base}.weight_q", f"{base}.weight_scale"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.numpy().T), q_name))  # (in, out) int8
        graph.initializer.append(numpy_helper.from_array(scale.numpy().astype(np.float32), s_name))
        return q_name, s_name, w

    for node in graph.node:
        if node.op_type == "Attention" and node.name in attention and not skip & set(attention[node.name]):
            x, w_name, b_name = node.input[0], node.input[1], node.input[2]
            mask = node.input[3] if len(node.input) > 3 else ""
            if not qattention_compatible(node):
                raise RuntimeError(f"fused {node.name} uses features QAttention lacks; fusion.py should have refused it")
            q_name, s_name, w = add_weight(numpy_helper.to_array(inits[w_name]), f"{node.name}.qkv")
            dropped.add(w_name)
            x_q, x_scale, x_zp = quantize_input(x)
            q_node = helper.make_node(
                "QAttention", [x_q, q_name, b_name, x_scale, s_name, mask, x_zp], list(node.output),
                name=f"{node.name}.QAttention", domain=MS_DOMAIN,
            )
            q_node.attribute.extend(node.attribute)
            new_nodes.append(q_node)
            layers[node.name] = QuantizedAttention(
                x, node.output[0], mask, w, numpy_helper.to_array(inits[b_name]).astype(np.float32),
                int(_attr(node, "num_heads")), tuple(attention[node.name]),
            )
            continue
        if node.op_type != "MatMul" or node.input[1] not in layer_of:
            new_nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        base = w_name.removesuffix(".weight_t")
        q_name, s_name, w = add_weight(numpy_helper.to_array(inits[w_name]), base)
        dropped.add(w_name)
        x_q, x_scale, x_zp = quantize_input(x)
        out = node.output[0]
        new_nodes += [
            helper.make_node("MatMulInteger", [x_q, q_name, x_zp], [f"{out}_int32"], name=f"{base}.MatMulInteger"),
            helper.make_node("Cast", [f"{out}_int32"], [f"{out}_cast"], to=TensorProto.FLOAT, name=f"{base}.Cast"),
            helper.make_node("Mul", [x_scale, s_name], [f"{out}_scale"], name=f"{base}.ScaleMul"),
            helper.make_node("Mul", [f"{out}_cast", f"{out}_scale"], [out], name=f"{base}.OutputMul"),
        ]
        layers[layer_of[w_name]] = QuantizedLayer(x, out, w)
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    keep = [init for init in graph.initializer if init.name not in dropped or init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if layers and not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return layers


def quantization_units(layers: Collection[str], attention: Mapping[str, tuple[str, str, str]] | None) -> list[tuple[str, ...]]:
    """The groups of layers that are int8 or fp32 together: a fused Attention's three projections, else each layer."""
    grouped = [tuple(group) for group in (attention or {}).values()]
    packed = {layer for group in grouped for layer in group}
    return grouped + [(layer,) for layer in layers if layer not in packed]
