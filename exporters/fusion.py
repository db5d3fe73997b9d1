"""ONNX Runtime's BERT fusions on an exported fp32 graph, keeping track of where every layer's weight went.

`fuse_graph` runs `onnxruntime.transformers.optimizer` (model type "bert": Attention, and on request
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu) on a merged-mode graph, then maps each fused Attention's
packed [Wq | Wk | Wv] weight back to the three layers it came from, so `quantize.py` can write the shared
quantizer's int8 weights into the fused graph (Attention -> QAttention, per-column scales). Anything that
does not fuse cleanly — another architecture, a pattern ORT does not recognise, a fused graph that
computes something else — leaves the graph unfused and says why in `Fusion.note`.

Switchable graphs get the same fusions through `switchable_fusion.fuse_switchable`, which shares `Fusion`,
the checks and the optimizer call defined here.
"""


from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, model_type

from .onnx_graph import ExportedGraph
from .quantize import qattention_compatible

# Architectures whose exported graphs ORT's "bert" fusions are known to match and compute exactly.
FUSABLE_ARCHITECTURES = ("bert",)
# Ops the fusions produce, in the order a manifest lists them.
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "ai.onnx.Attention", "SkipLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu")
# The fusions one can ask for (names as in the manifest) and the FusionOptions switches behind each.
FUSIONS = {
    "attention": ("enable_attention",),
    "embed_layer_norm": ("enable_embed_layer_norm",),
    "skip_layer_norm": ("enable_skip_layer_norm", "enable_bias_skip_layer_norm"),
    "bias_gelu": ("enable_bias_gelu",),
}
# Only the attention fusion pays on ONNX Runtime 1.32's CPU kernels. Measured on all-MiniLM-L6-v2 int8
# (AMD EPYC AVX2, one thread, 8x128, same process, interleaved): 12 SkipLayerNormalization nodes took
# 27.3 ms against 5.4 ms for the Add + LayerNormalization pairs they replace, 6 BiasGelu 13.5 ms against
# 11.5 ms of Gelu (+ a share of Add), EmbedLayerNormalization 1.4 ms against 1.1 ms of Gathers; the whole
# graph was 1.15x faster with attention alone than with all four (204 -> 178 ms; 1x32: 6.2 -> 5.5 ms).
DEFAULT_FUSIONS = ("attention",)
# A fused fp32 graph computes the same float ops in another order (measured ~1e-6 on MiniLM embeddings);
# anything above this relative difference means a fusion changed the function, and the graph stays unfused.
FUSED_REL_TOL = 1e-4


@dataclass(frozen=True)
class Fusion:
    """What `fuse_graph` did.

    Attributes:
        requested: the fusion names asked for (`FUSIONS`).
        applied: fused op type -> how many nodes of it the graph now has (empty: unfused).
        attention: fused Attention node name -> its (query, key, value) layer names.
        note: a line for the manifest: which fusions, or why none.
        multi_head: attention core (ONNX Attention, fused as MultiHeadAttention) node name -> the (query,
            key, value) layers whose MatMuls feed it (switchable graphs: those layers keep their own
            MatMuls and adapter branches).
    """

    requested: tuple[str, ...] = ()
    applied: dict[str, int] = field(default_factory=dict)
    attention: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    note: str = ""
    multi_head: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def as_manifest(self) -> dict:
        out = {"requested": list(self.requested), "applied": dict(self.applied),
               "attention_layers": {k: list(v) for k, v in self.attention.items()}, "note": self.note}
        if self.multi_head:
            out["multi_head_attention_layers"] = {k: list(v) for k, v in self.multi_head.items()}
        return out


def _heads_and_hidden(model: AdapterModel) -> tuple[int, int] | None:
    config = getattr(model.base, "config", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return (heads, hidden) if isinstance(heads, int) and isinstance(hidden, int) else None


def run_graph(proto: onnx.ModelProto, *feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """The outputs of `proto` on each of `feeds`, from one session."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def fusable(model: AdapterModel, fusions: Sequence[str]) -> Fusion | tuple[int, int]:
    """(heads, hidden) where ORT's BERT fusions may apply to `model`; else the unfused Fusion saying why."""
    unknown = sorted(set(fusions) - set(FUSIONS))
    if unknown:
        raise EdgeloraError(f"fusions {unknown} are not supported; choose from {', '.join(FUSIONS)}")
    if not fusions:
        return Fusion(note="unfused: no fusions requested")
    arch = model_type(model.base) or type(model.base).__name__
    if arch not in FUSABLE_ARCHITECTURES:
        fusable = ", ".join(FUSABLE_ARCHITECTURES)
        return Fusion(tuple(fusions), note=f"unfused: ORT's BERT fusions apply to {fusable} bases, not {arch}")
    shape = _heads_and_hidden(model)
    if shape is None:
        return Fusion(tuple(fusions), note=f"unfused: the {arch} config gives no num_attention_heads / hidden_size")
    return shape


def optimize(proto: onnx.ModelProto, heads: int, hidden: int, fusions: Sequence[str],
              multi_head: bool = False) -> onnx.ModelProto | str:
    """ORT's BERT fusions on a copy of `proto`: the fused model, or why they failed (a note)."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(proto)  # optimize_model edits the proto it is given
    options = FusionOptions("bert")
    for name, switches in FUSIONS.items():
        for switch in switches:
            setattr(options, switch, name in fusions)
    # A raw 2-D mask keeps torch's semantics for any padding side; the 1-D "mask index" alternative
    # assumes right padding and would silently differ on left-padded feeds.
    options.use_raw_attention_mask(True)
    options.use_multi_head_attention = multi_head
    logging.disable(logging.WARNING)  # the fusion modules log under bare names ("fusion_attention", ...)
    try:
        return optimize_model(candidate, model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0,
                              optimization_options=options).model
    except Exception as exc:  # noqa: BLE001 - a fusion pass failing must not fail the export
        return f"unfused: ORT's BERT fusions failed on this graph ({type(exc).__name__}: {exc})"[:300]
    finally:
        logging.disable(logging.NOTSET)


def fuse_graph(graph: ExportedGraph, model: AdapterModel, feeds: dict[str, np.ndarray],
               fusions: tuple[str, ...] = DEFAULT_FUSIONS) -> Fusion:
    """Apply ORT's BERT fusions to `graph.model` in place where they apply and compute the same outputs.

    Args:
        graph: a merged-mode fp32 export (switchable graphs: `switchable_fusion.fuse_switchable`).
        model: the model it came from: architecture, head count and hidden size.
        feeds: inputs on which the fused graph must reproduce the unfused one (`FUSED_REL_TOL`).
        fusions: names from `FUSIONS`; the default is the set measured fastest (`DEFAULT_FUSIONS`).
    """
    shape = fusable(model, fusions)
    if isinstance(shape, Fusion):
        return shape
    heads, hidden = shape
    original = {init.name: init for init in graph.model.graph.initializer}
    layer_weights = {layer: numpy_helper.to_array(original[name]) for layer, name in graph.weights.items()}
    fused = optimize(graph.model, heads, hidden, fusions)
    if isinstance(fused, str):
        return Fusion(fusions, note=fused)
    counts = Counter(n.op_type for n in fused.graph.node)
    applied = {op: counts[op] for op in FUSED_OPS if counts[op]}
    if not applied:
        return Fusion(fusions, note="unfused: ORT's BERT fusions matched nothing in this graph")

    inits = {init.name: init for init in fused.graph.initializer}
    attention: dict[str, tuple[str, str, str]] = {}
    for node in fused.graph.node:
        if node.op_type != "Attention":
            continue
        if not qattention_compatible(node):
            return Fusion(fusions, note=f"unfused: fused {node.name} uses attributes or inputs QAttention lacks")
        if node.input[1] not in inits:
            return Fusion(fusions, note=f"unfused: fused {node.name} takes its weight from a computed tensor")
        packed = numpy_helper.to_array(inits[node.input[1]])  # (in, 3 * hidden): [Wq | Wk | Wv] transposed
        blocks = np.split(packed, 3, axis=1) if packed.shape[1] % 3 == 0 else []
        found = [next((layer for layer, w in layer_weights.items() if w.shape == b.shape and np.array_equal(w, b)), None)
                 for b in blocks]
        if len(found) != 3 or None in found or len(set(found)) != 3:
            return Fusion(fusions, note=f"unfused: could not trace fused {node.name}'s packed weight back to three layers")
        node.name = node.name or f"Attention_{len(attention)}"
        attention[node.name] = tuple(found)  # type: ignore[assignment]
    packed_layers = {layer for group in attention.values() for layer in group}
    used = {i for n in fused.graph.node for i in n.input}
    lost = [layer for layer, name in graph.weights.items() if layer not in packed_layers and name not in used]
    if lost:
        return Fusion(fusions, note=f"unfused: the fusions dropped the weight of {lost[0]}")

    rel = relative_difference(run_graph(graph.model, feeds)[0], run_graph(fused, feeds)[0])
    if rel > FUSED_REL_TOL:
        return Fusion(fusions, note=f"unfused: the fused graph differed from the unfused one by {rel:.2g} relative")
    graph.model.CopyFrom(fused)
    graph.weights = {layer: name for layer, name in graph.weights.items() if layer not in packed_layers}
    summary = ", ".join(f"{op} x{n}" for op, n in applied.items())
    return Fusion(tuple(fusions), applied, attention, f"ORT BERT fusions {list(fusions)} (raw attention mask): {summary}")


def relative_difference(want: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """The largest |want - got| of any output relative to that output's largest |want|; inf on a shape change."""
    worst = 0.0
    for a, b in zip(want, got):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12)))
    return worst
