"""Write int8 weights into an exported graph with the shared quantizer — no second rounding pass.

Every `MatMul(x, weight_t)` of a quantizable layer becomes the dynamic-quantization pattern ONNX Runtime
fuses into `DynamicQuantizeMatMul`: DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, W_s8) -> Cast -> Mul
by (x_scale * w_scale). A fused `Attention` (see `fusion.py`) becomes DynamicQuantizeLinear(x) ->
`QAttention` with the packed [Wq | Wk | Wv] weight and one scale per column: the per-output-channel scales
of the three layers side by side, so QAttention computes exactly the three quantized projections.
W_s8 and w_scale come from `edgelora.fake_quant.quantize_weight` on the very (out, in) tensor training
fake-quantized, and DynamicQuantizeLinear is what training's activation fake quantizer imitates, so the
graph reproduces the fake-quantized model up to float summation order.

Static activations (calibrated, see `edgelora/calibrate.py`) replace DynamicQuantizeLinear by
QuantizeLinear(x, scale, zero_point) with constant qparams, one per input tensor as well, feeding QAttention
or `MatMulIntegerToFloat` (contrib op: the int8 product times x_scale * w_scale, in one kernel). The plain
MatMulInteger -> Cast -> Mul form is not fused by ONNX Runtime when the scales are constants: constant
folding turns Mul(x_scale, w_scale) into one initializer first, and the MatMulIntegerToFloat fusion then
no longer matches; so we write the fused node ourselves (measured on ORT 1.32: the same output, bit for bit).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelora.errors import EdgeloraError
from edgelora.fake_quant import quantize_weight

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantizedLayer:
    """Where one quantized layer lives in the graph: its float input, its int8 product, its float weight."""

    input: str
    output: str
    weight: np.ndarray  # (out, in) float32: the tensor the shared quantizer rounded
    act_qparams: tuple[float, int] | None = None  # static input (scale, zero_point); None: dynamic
    members: tuple[str, ...] = ()  # the layers packed into this one (switchable_pack: q, k, v); (): itself


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
    act_qparams: tuple[float, int] | None = None  # static input (scale, zero_point); None: dynamic


def qattention_compatible(node: onnx.NodeProto) -> bool:
    """An Attention that QAttention (and `validate.attention_reference`) computes the same: heads, bias, a mask."""
    return {a.name for a in node.attribute} == {"num_heads"} and len(node.input) <= 4


def count_layers(quantized: Mapping[str, QuantizedLayer | QuantizedAttention]) -> int:
    """Linear layers now int8 (a QAttention, or a packed projection, holds three)."""
    return sum(len(q.layers) if isinstance(q, QuantizedAttention) else len(q.members) or 1 for q in quantized.values())


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
    static: Mapping[str, tuple[float, int]] | None = None,
    smoothing: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    packed: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, QuantizedLayer | QuantizedAttention]:
    """Rewrite, in place, the MatMuls whose weight initializer is named in `weights` (layer -> initializer)
    and the fused Attention nodes named in `attention` (node name -> its query, key, value layers).

    Args:
        skip: layers to keep fp32 (mixed precision). A fused Attention stays fp32 if any of its three
            layers is skipped, so callers skip query, key and value together (see `quantization_units`).
        static: static activations: layer -> calibrated input (scale, zero_point), for every layer
            quantized (`edgelora.calibrate.static_qparams`). None: dynamic activations.
        smoothing: SmoothQuant factors by layer, (s, 1/s) float32 (in,) each, as the layer holds them
            (`edgelora.smooth`): the layer's input goes through a Mul by 1/s before its quantizer, and its weight is W diag(s);
            layers that read one tensor share one s, hence one Mul and one quantizer.
        packed: pseudo-layers of `weights` that are several layers side by side (`switchable_pack.Pack`: q, k
            and v of a switchable graph) -> those layers, which skip, static and smoothing name. Per-channel
            scales make the packed int8 weight the three layers' int8 weights side by side.

    Returns, per quantized layer (or per QAttention node), the tensors a layer-by-layer check needs.
    Layers absent from `weights` (adapter branches, heads, attention score products) stay fp32.
    """
    graph = model.graph
    attention = dict(attention or {})
    skip = set(skip)
    inits = {init.name: init for init in graph.initializer}
    packed = dict(packed or {})

    def members(layer: str) -> tuple[str, ...]:
        return packed.get(layer, (layer,))

    layer_of = {init: layer for layer, init in weights.items() if not skip & set(members(layer))}
    layers: dict[str, QuantizedLayer | QuantizedAttention] = {}
    quantized_inputs: dict[tuple, tuple[str, str, str]] = {}  # (activation, qparams) -> (x_u8, x_scale, x_zp)
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()

    def qparams_of(layers_: Collection[str]) -> tuple[float, int] | None:
        if static is None:
            return None
        missing = [n for n in layers_ if n not in static]
        if missing:
            raise EdgeloraError(f"layer {missing[0]} has no calibrated static activation range; calibrate the model")
        found = {static[n] for n in layers_}
        if len(found) > 1:  # one QAttention input: q, k and v saw the same tensor, so calibration agrees
            raise EdgeloraError(f"layers {', '.join(layers_)} share one input but hold different static ranges "
                                f"{sorted(found)}; calibrate them together (edgelora.calibrate.calibrate)")
        return found.pop()

    def quantize_input(x: str, qparams: tuple[float, int] | None) -> tuple[str, str, str]:
        if (x, qparams) not in quantized_inputs:
            tag = "" if not any(key[0] == x for key in quantized_inputs) else f"_{len(quantized_inputs)}"
            qx = (f"{x}_quant{tag}", f"{x}_scale{tag}", f"{x}_zero_point{tag}")
            if qparams is None:
                new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(qx), name=f"{x}_DynamicQuantizeLinear"))
            else:
                graph.initializer.append(numpy_helper.from_array(np.array(qparams[0], np.float32), qx[1]))
                graph.initializer.append(numpy_helper.from_array(np.array(qparams[1], np.uint8), qx[2]))
                new_nodes.append(helper.make_node("QuantizeLinear", [x, qx[1], qx[2]], [qx[0]],
                                                  name=f"{x}_QuantizeLinear{tag}"))
            quantized_inputs[(x, qparams)] = qx
        return quantized_inputs[(x, qparams)]

    smoothed_inputs: dict[tuple[str, bytes], str] = {}  # (activation, 1/s) -> the Mul's output

    def smooth_of(layers_: Collection[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """(s, 1/s) float32 shared by `layers_`, or None when they are unsmoothed."""
        found = [(smoothing or {}).get(n) for n in layers_]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found) or any(not np.array_equal(f[0], found[0][0]) for f in found):
            raise EdgeloraError(f"layers {', '.join(layers_)} share one input but not one smoothing; compute the "
                                "factors with edgelora.smooth.smoothing_factors, which groups them")
        return found[0]

    def smooth_input(x: str, smooth: tuple[np.ndarray, np.ndarray] | None) -> str:
        if smooth is None:
            return x
        key = (x, smooth[1].tobytes())
        if key not in smoothed_inputs:
            tag = f"_{len(smoothed_inputs)}"
            inv_name, out = f"{x}_smooth_inv{tag}", f"{x}_smoothed{tag}"
            graph.initializer.append(numpy_helper.from_array(smooth[1].astype(np.float32), inv_name))
            new_nodes.append(helper.make_node("Mul", [x, inv_name], [out], name=f"{x}_SmoothMul{tag}"))
            smoothed_inputs[key] = out
        return smoothed_inputs[key]

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
            smooth = smooth_of(attention[node.name])
            w_t = numpy_helper.to_array(inits[w_name])
            w_t = w_t if smooth is None else w_t * smooth[0][:, None]  # (in, 3 hidden): W diag(s), as training
            q_name, s_name, w = add_weight(w_t, f"{node.name}.qkv")
            dropped.add(w_name)
            act = qparams_of(attention[node.name])
            x = smooth_input(x, smooth)
            x_q, x_scale, x_zp = quantize_input(x, act)
            # QAttention runs one small u8s8 GEMM per head, yet measured (ORT 1.32, AVX2) it beats one wide
            # DynamicQuantizeMatMul for [Wq|Wk|Wv] followed by Split and MultiHeadAttention: same output bit
            # for bit, the block 13-16% slower (the whole model 3-6%) at 1x32 and 8x128: extra copies, transposes.
            q_node = helper.make_node(
                "QAttention", [x_q, q_name, b_name, x_scale, s_name, mask, x_zp], list(node.output),
                name=f"{node.name}.QAttention", domain=MS_DOMAIN,
            )
            q_node.attribute.extend(node.attribute)
            new_nodes.append(q_node)
            layers[node.name] = QuantizedAttention(
                x, node.output[0], mask, w, numpy_helper.to_array(inits[b_name]).astype(np.float32),
                int(_attr(node, "num_heads")), tuple(attention[node.name]), act,
            )
            continue
        if node.op_type != "MatMul" or node.input[1] not in layer_of:
            new_nodes.append(node)
            continue
        x, w_name = node.input[0], node.input[1]
        base = w_name.removesuffix(".weight_t")
        smooth = smooth_of(members(layer_of[w_name]))
        w_t = numpy_helper.to_array(inits[w_name])
        w_t = w_t if smooth is None else w_t * smooth[0][:, None]  # (in, out): W diag(s), as training
        q_name, s_name, w = add_weight(w_t, base)
        dropped.add(w_name)
        act = qparams_of(members(layer_of[w_name]))
        x = smooth_input(x, smooth)
        x_q, x_scale, x_zp = quantize_input(x, act)
        out = node.output[0]
        if act is not None:
            new_nodes.append(helper.make_node("MatMulIntegerToFloat", [x_q, q_name, x_scale, s_name, x_zp], [out],
                                              name=f"{base}.MatMulIntegerToFloat", domain=MS_DOMAIN))
        else:
            # ORT (ENABLE_EXTENDED and up) fuses these four nodes and the layer's bias Add after them into one
            # DynamicQuantizeMatMul, so writing that op ourselves gains nothing (pinned in test_export_int8.py).
            # Measured on ORT 1.32, AVX2 EPYC, one GEMM: uint8 weights with zero point 128 ran 15-20% slower than
            # int8, and 8-bit weights exactly as fast as 7-bit (the same u8s8 kernel).
            new_nodes += [
                helper.make_node("MatMulInteger", [x_q, q_name, x_zp], [f"{out}_int32"], name=f"{base}.MatMulInteger"),
                helper.make_node("Cast", [f"{out}_int32"], [f"{out}_cast"], to=TensorProto.FLOAT, name=f"{base}.Cast"),
                helper.make_node("Mul", [x_scale, s_name], [f"{out}_scale"], name=f"{base}.ScaleMul"),
                helper.make_node("Mul", [f"{out}_cast", f"{out}_scale"], [out], name=f"{base}.OutputMul"),
            ]
        layer = layer_of[w_name]
        layers[layer] = QuantizedLayer(x, out, w, act, members(layer) if layer in packed else ())
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
    """The groups of layers that are int8 or fp32 together: a fused Attention's three projections (or a switchable
    graph's packed q, k, v: pass them in `attention` too), else each layer."""
    grouped = [tuple(group) for group in (attention or {}).values()]
    packed = {layer for group in grouped for layer in group}
    return grouped + [(layer,) for layer in layers if layer not in packed]
