"""Write int8 weights into an exported graph with the shared quantizer — no second rounding pass.

Every `MatMul(x, weight_t)` of a quantizable layer becomes the dynamic-quantization pattern ONNX Runtime
fuses into `DynamicQuantizeMatMul`: DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul
by (x_scale * w_scale). W_s8 and w_scale come from `edgelora.fake_quant.quantize_weight` on the very
(out, in) tensor training fake-quantized, and DynamicQuantizeLinear is what training's activation fake
quantizer imitates, so the graph reproduces the fake-quantized model up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelora.fake_quant import quantize_weight


@dataclass(frozen=True)
class QuantizedLayer:
    """Where one quantized layer lives in the graph: its float input, its int8 product, its float weight."""

    input: str
    output: str
    weight: np.ndarray  # (out, in) float32: the tensor the shared quantizer rounded


def quantize_graph(model: onnx.ModelProto, weights: dict[str, str], bits: int) -> dict[str, QuantizedLayer]:
    """Rewrite, in place, the MatMuls whose weight initializer is named in `weights` (layer -> initializer).

    Returns, per quantized layer, the tensors a layer-by-layer check needs. Layers absent from `weights`
    (adapter branches, heads, attention score products) stay fp32.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    layer_of = {init: layer for layer, init in weights.items()}
    layers: dict[str, QuantizedLayer] = {}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # activation -> (x_u8, x_scale, x_zp)
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in layer_of:
            new_nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        w_t = numpy_helper.to_array(inits[w_name])  # (in, out)
        q, scale = quantize_weight(torch.from_numpy(np.ascontiguousarray(w_t.T)), bits)  # (out, in), (out,)
        base = w_name.removesuffix(".weight_t")
        q_name, s_name = f"{base}.weight_q", f"{base}.weight_scale"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.numpy().T), q_name))  # (in, out) int8
        graph.initializer.append(numpy_helper.from_array(scale.numpy().astype(np.float32), s_name))
        dropped.add(w_name)
        if x not in quantized_inputs:
            qx = (f"{x}_quant", f"{x}_scale", f"{x}_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(qx), name=f"{x}_DynamicQuantizeLinear"))
            quantized_inputs[x] = qx
        x_q, x_scale, x_zp = quantized_inputs[x]
        out = node.output[0]
        new_nodes += [
            helper.make_node("MatMulInteger", [x_q, q_name, x_zp], [f"{out}_int32"], name=f"{base}.MatMulInteger"),
            helper.make_node("Cast", [f"{out}_int32"], [f"{out}_cast"], to=TensorProto.FLOAT, name=f"{base}.Cast"),
            helper.make_node("Mul", [x_scale, s_name], [f"{out}_scale"], name=f"{base}.ScaleMul"),
            helper.make_node("Mul", [f"{out}_cast", f"{out}_scale"], [out], name=f"{base}.OutputMul"),
        ]
        layers[layer_of[w_name]] = QuantizedLayer(x, out, np.ascontiguousarray(w_t.T))
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    keep = [init for init in graph.initializer if init.name not in dropped or init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return layers
