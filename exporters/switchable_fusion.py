"""ONNX Runtime's attention fusion on a switchable graph, its float adapter branches lifted out and rejoined.

`fuse_switchable` does for a switchable graph what `fusion.fuse_graph` does for a merged one. The graph's
float adapter branches (LoRA, bottleneck, joined to a layer's output by Adds) would hide every attention
pattern from ORT: it lifts the branches out, lets ORT fuse the plain base with MultiHeadAttention — which
takes the query, key and value projections as inputs rather than one packed weight — and joins each branch
again where its layer's output now is: a LoRA on q, k or v between its projection MatMul and the attention.
Layers without a branch on q, k and v get a packed Attention as merged graphs do, so int8 makes them
QAttention. The others then trade ORT's MultiHeadAttention for ONNX's own Attention (opset 23), which ORT's
CPU runs faster (`STANDARD_ATTENTION_OPSET`). The q, k and v MatMuls stay layers of their own, quantized and
checked one by one like any other; `validate.layerwise_error` checks each attention core too.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnxruntime.transformers.onnx_model import OnnxModel

from edgelora.model import AdapterModel
from edgelora.runtime.bundle import ADAPTER_IDS

from .fusion import DEFAULT_FUSIONS, FUSED_OPS, FUSED_REL_TOL, Fusion, fusable, optimize, relative_difference, run_graph
from .onnx_graph import MASK_FILTER_VALUE, ExportedGraph
from .switchable import slot_specs

# Switchable graphs run their adapted attention cores as ONNX's Attention (this opset, whose CPU kernel
# ONNX Runtime has had since 1.23) rather than ORT's MultiHeadAttention: six MiniLM-sized layers fed by
# the same int8 q, k, v took 1.22-1.40x the time of merged graphs' QAttention with MultiHeadAttention
# and 1.04-1.11x with ONNX's Attention, 1x32 to 8x128 over two runs, outputs equal bit for bit (ORT 1.32, 2-core AMD
# EPYC, AVX2, 2 threads, 200 rounds: `python benchmarks/attention_cores.py`).
STANDARD_ATTENTION_OPSET = 23
STANDARD_ATTENTION_ORT = "1.23"  # the first onnxruntime with a CPU kernel for it; bundles record it under 'requires'
# An adapter branch is found by walking back from an Add that joins a layer's output. Real branches are
# small (LoRA: 5 nodes, a bottleneck about 12); the walk gives up past this many nodes rather than wander
# through the network from a residual Add.
_BRANCH_MAX_NODES = 64
# The random adapter bank a fused switchable graph must also reproduce the unfused one on: entries,
# width, and scale (a delta of ~0.1-1 against activations of ~1: clearly visible, far from saturating).
_CHECK_BANK = (3, 2, 0.1)


class _Unfusable(Exception):
    """A switchable graph whose adapter branches cannot be lifted out and rejoined; the message is the note."""


@dataclass(frozen=True)
class _Branch:
    """The adapter branch of one layer of a switchable graph (see `_branches`)."""

    layer: str
    matmul: str  # the base projection, MatMul(x, weight_t)
    trunk: str  # the base layer's output (the projection plus its bias): where the branch joins
    out: str  # the adapted layer's output
    nodes: tuple[onnx.NodeProto, ...]  # slot Gathers, adapter MatMuls and activations, the joining Adds
    linear: bool  # reads only the layer's input (LoRA), so it may join before the bias as well as after


def _branches(proto: onnx.ModelProto, weights: Mapping[str, str], slots: set[str]) -> list[_Branch]:
    """Every layer's adapter branch: the Adds that join its output and the nodes computing what they add
    from the layer's input or output, the bank inputs (`slots`) and constants alone."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    initializers = {i.name for i in graph.initializer} | {ADAPTER_IDS}
    order = {n.output[0]: i for i, n in enumerate(graph.node)}  # nodes are known by their first output

    def constant(t: str) -> bool:  # torch's exporter writes shared constants as Identity(initializer)
        n = producer.get(t)
        return t in initializers if n is None else n.op_type == "Constant" or (
            n.op_type == "Identity" and constant(n.input[0]))

    def delta(tensor: str, x: str, trunk: str) -> tuple[list[onnx.NodeProto], bool] | None:
        found: dict[str, onnx.NodeProto] = {}
        stack, seen, reads_trunk, reads_slot = [tensor], set(), False, False
        while stack:
            t = stack.pop()
            if t in seen or t == x:
                continue
            seen.add(t)
            if t == trunk:
                reads_trunk = True
            elif t in slots:
                reads_slot = True
            elif constant(t):
                continue
            elif t not in producer:  # another graph input (input_ids, ...): not a branch
                return None
            else:
                found[producer[t].output[0]] = producer[t]
                if len(found) > _BRANCH_MAX_NODES:
                    return None
                stack.extend(i for i in producer[t].input if i)
        if not reads_slot:
            return None
        return sorted(found.values(), key=lambda n: order[n.output[0]]), reads_trunk

    branches = []
    for layer, weight in weights.items():
        matmuls = [n for n in consumers.get(weight, []) if n.op_type == "MatMul" and n.input[1] == weight]
        if len(matmuls) != 1:
            continue
        x, out = matmuls[0].input[0], matmuls[0].output[0]
        matmul = trunk = out
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add" and all(constant(t) for t in set(after[0].input) - {out}):
            trunk = after[0].output[0]  # the bias Add
        current, nodes, linear = trunk, [], True
        while True:
            joins = []
            for n in consumers.get(current, []):
                if n.op_type == "Add" and list(n.input).count(current) == 1:
                    found = delta(n.input[1] if n.input[0] == current else n.input[0], x, current)
                    if found is not None:
                        joins.append((n, found))
            if not joins:
                break
            if len(joins) > 1:
                raise _Unfusable(f"unfused: {layer} has two adapter branches joining one tensor")
            join, (part, reads_trunk) = joins[0]
            inside = {n.output[0] for n in part} | {join.output[0]}
            if any(c.output[0] not in inside for c in consumers[current]):
                raise _Unfusable(f"unfused: {layer}'s output is read both by its adapter branch and elsewhere")
            nodes += [*part, join]
            linear = linear and not reads_trunk
            current = join.output[0]
        if nodes:
            branches.append(_Branch(layer, matmul, trunk, current, tuple(nodes), linear))
    owned = [o for b in branches for n in b.nodes for o in n.output]
    if len(owned) != len(set(owned)):
        raise _Unfusable("unfused: two layers' adapter branches share nodes")
    return branches


def _without_branches(proto: onnx.ModelProto, branches: Sequence[_Branch]) -> onnx.ModelProto:
    """A copy of the switchable graph with every adapter branch lifted out: the plain base, for ORT to fuse."""
    lifted = {o for b in branches for n in b.nodes for o in n.output}
    to_trunk = {b.out: b.trunk for b in branches}
    outputs = {o.name for o in proto.graph.output}
    if outputs & set(to_trunk):
        raise _Unfusable("unfused: an adapted layer's output is a graph output")
    plain = onnx.ModelProto()
    plain.CopyFrom(proto)
    keep = [n for n in plain.graph.node if not set(n.output) & lifted]
    for n in keep:
        for i, t in enumerate(n.input):
            n.input[i] = to_trunk.get(t, t)
    del plain.graph.node[:]
    plain.graph.node.extend(keep)
    return plain


def _rejoin(fused: onnx.ModelProto, original: onnx.ModelProto, branches: Sequence[_Branch]) -> None:
    """Put the adapter branches back into the fused graph, in place: each joins its layer's output, or — a
    LoRA on q, k or v whose bias ORT moved into the MultiHeadAttention — the projection feeding it."""

    graph = fused.graph
    base = list(graph.node)  # only these are rewired: a branch's own nodes read what they read before
    produced = {o for n in base for o in n.output}
    nodes = list(base)
    for b in branches:
        part = [onnx.NodeProto() for _ in b.nodes]
        for copy, node in zip(part, b.nodes):
            copy.CopyFrom(node)
        if b.trunk in produced:
            for n in base:
                for i, t in enumerate(n.input):
                    if t == b.trunk:
                        n.input[i] = b.out
        else:
            users = [(n, i) for n in base for i, t in enumerate(n.input) if t == b.matmul]
            if not (b.linear and len(users) == 1 and users[0][0].op_type == "MultiHeadAttention" and users[0][1] < 3):
                raise _Unfusable(f"unfused: could not rejoin the adapter branch of {b.layer} after fusion")
            for n in part:
                for i, t in enumerate(n.input):
                    if t == b.trunk:
                        n.input[i] = b.matmul  # x W + delta; the MultiHeadAttention adds the bias
            node, index = users[0]
            node.input[index] = b.out
        nodes += part
    # What the branches read and ORT pruned with them: bank inputs, initializers, Constant and Identity nodes.
    inputs = {i.name: i for i in original.graph.input}
    inits = {i.name: i for i in original.graph.initializer}
    consts = {n.output[0]: n for n in original.graph.node if n.op_type in ("Constant", "Identity")}
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    available |= {o for n in nodes for o in n.output}
    pending = list(nodes)
    while pending:
        for t in pending.pop().input:
            if not t or t in available:
                continue
            if t in inputs:
                graph.input.append(inputs[t])
            if t in inits:
                graph.initializer.append(inits[t])
            elif t in consts:
                nodes.append(consts[t])
                pending.append(consts[t])
            elif t not in inputs:
                raise _Unfusable(f"unfused: {t}, which an adapter branch reads, is gone after fusion")
            available.add(t)
    del graph.node[:]
    graph.node.extend(nodes)
    OnnxModel.graph_topological_sort(graph)


def _trace_multi_head(fused: onnx.ModelProto, weights: Mapping[str, str]) -> dict[str, tuple[str, str, str]]:
    """MultiHeadAttention node -> the layers whose MatMuls give its query, key and value."""
    layer_of = {w: layer for layer, w in weights.items()}
    producer = {o: n for n in fused.graph.node for o in n.output}
    inits = {i.name for i in fused.graph.initializer}
    traced = {}
    for node in fused.graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        if not multi_head_compatible(node) or node.input[3] not in inits:
            raise _Unfusable(f"unfused: fused {node.name} uses attributes or inputs edgelora does not check")
        mms = [producer.get(t) for t in node.input[:3]]
        if any(m is None or m.op_type != "MatMul" or m.input[1] not in layer_of for m in mms):
            raise _Unfusable(f"unfused: could not trace fused {node.name}'s query, key and value to three layers")
        traced[node.name] = tuple(layer_of[m.input[1]] for m in mms)
    return traced  # type: ignore[return-value]


def multi_head_compatible(node: onnx.NodeProto) -> bool:
    """A MultiHeadAttention that `validate.multi_head_reference` computes the same: q, k, v, a bias, a mask."""
    return {a.name for a in node.attribute} == {"num_heads"} and len(node.input) in (4, 5) and all(node.input[:4])


def _pack_plain_attention(fused: onnx.ModelProto, multi_head: dict[str, tuple[str, str, str]],
                          adapted: set[str]) -> dict[str, tuple[str, str, str]]:
    """Turn each MultiHeadAttention whose q, k and v have no adapter branch into a packed Attention, in
    place (int8 then makes it one QAttention, as in merged graphs). Returns those Attention nodes' layers."""
    graph = fused.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers = Counter(t for n in graph.node for t in n.input)
    inits = {i.name: i for i in graph.initializer}
    packed: dict[str, tuple[str, str, str]] = {}
    drop: set[str] = set()
    for node in graph.node:
        if node.op_type != "MultiHeadAttention" or adapted & set(multi_head[node.name]):
            continue
        mms = [producer[t] for t in node.input[:3]]
        if len({m.input[0] for m in mms}) != 1 or any(readers[m.output[0]] != 1 for m in mms):
            continue
        weight = np.concatenate([numpy_helper.to_array(inits[m.input[1]]) for m in mms], axis=1)  # (in, 3 * hidden)
        graph.initializer.append(numpy_helper.from_array(weight, f"{node.name}_qkv_weight"))
        mask = list(node.input[4:5])
        heads = int(helper.get_attribute_value(node.attribute[0]))
        attention = helper.make_node("Attention", [mms[0].input[0], f"{node.name}_qkv_weight", node.input[3], *mask],
                                     list(node.output), name=node.name, domain="com.microsoft", num_heads=heads)
        node.CopyFrom(attention)
        drop |= {m.output[0] for m in mms}
        packed[node.name] = multi_head.pop(node.name)
    keep = [n for n in graph.node if n.output[0] not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    return packed


def _standard_attention(fused: onnx.ModelProto, multi_head: Mapping[str, tuple[str, str, str]],
                        weights: Mapping[str, str]) -> onnx.ModelProto:
    """The fused switchable graph with every MultiHeadAttention replaced by ONNX's Attention (opset 23).

    ONNX's Attention takes no bias and a mask of (batch, heads or 1, q_len, kv_len): each projection's
    bias becomes an Add right after its MatMul (ORT's int8 fusion then takes it into MatMulIntegerToFloat,
    and the LoRA branch joins after it: x W + b + delta, as before), and the raw (batch, seq) mask becomes
    one additive mask of `onnx_graph.MASK_FILTER_VALUE` for padded keys, built once and read by every layer:
    what MultiHeadAttention computes from the raw mask. ORT 1.32 wants that mask's query axis spelled out
    (it refuses (batch, 1, 1, seq)), so it is expanded to batch x seq x seq floats per call: 0.5 MB at
    8 x 128, 64 MB at 64 x 512.
    """

    if not any(o.domain == "com.microsoft" for o in fused.opset_import):  # ORT's optimizer leaves it out
        fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    proto = version_converter.convert_version(fused, STANDARD_ATTENTION_OPSET)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    projection = {n.input[1]: n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    readers = defaultdict(list)
    for n in graph.node:
        for i, t in enumerate(n.input):
            readers[t].append((n, i))
    after: dict[str, onnx.NodeProto] = {}  # projection MatMul output -> the Add of its bias
    masks: dict[str, str] = {}  # raw mask -> its additive (batch, 1, seq, seq) form
    for node in graph.node:
        if node.op_type != "MultiHeadAttention":
            continue
        bias = np.split(numpy_helper.to_array(inits[node.input[3]]), 3)
        heads = int(next(helper.get_attribute_value(a) for a in node.attribute if a.name == "num_heads"))
        for part, layer, b in zip("qkv", multi_head[node.name], bias):
            mm = projection[weights[layer]].output[0]
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), f"{layer}.attention_bias"))
            for reader, index in readers[mm]:
                reader.input[index] = f"{mm}.biased"
            after[mm] = helper.make_node("Add", [mm, f"{layer}.attention_bias"], [f"{mm}.biased"],
                                         name=f"{node.name}.bias_{part}")
        mask = node.input[4] if len(node.input) > 4 else ""
        if mask:
            masks.setdefault(mask, f"{mask}.additive")
        core = helper.make_node("Attention", [*node.input[:3], *([masks[mask]] if mask else [])], list(node.output),
                                name=node.name, q_num_heads=heads, kv_num_heads=heads)
        node.CopyFrom(core)
    built, constants = [], {}
    for raw, out in masks.items():  # one in BERT graphs; the constants have the same names for each
        mask_nodes, constants = additive_mask(raw, out)
        built += mask_nodes
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    nodes = []
    for n in graph.node:
        nodes.append(n)
        nodes += [after[o] for o in n.output if o in after]
    del graph.node[:]
    graph.node.extend(built + nodes)
    OnnxModel.graph_topological_sort(graph)
    return proto


def additive_mask(raw: str, out: str) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """Nodes turning a raw (batch, seq) int mask `raw` into ONNX Attention's additive (batch, 1, seq, seq)
    mask `out`: (mask - 1) * 10000, so 0 for real keys and `onnx_graph.MASK_FILTER_VALUE` for padding, as
    MultiHeadAttention and QAttention add; and the constants they read (the same names for every mask)."""
    constants = {"attention_mask.one": np.array(1, np.float32),
                 "attention_mask.filter": np.array(-MASK_FILTER_VALUE, np.float32),
                 "attention_mask.axes": np.array([1, 2], np.int64), "attention_mask.seq_axis": np.array([1], np.int64),
                 "attention_mask.lead": np.array([1, 1], np.int64), "attention_mask.tail": np.array([1], np.int64)}
    nodes = [
        helper.make_node("Cast", [raw], [f"{raw}.float"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", [f"{raw}.float", "attention_mask.one"], [f"{raw}.minus_one"]),
        helper.make_node("Mul", [f"{raw}.minus_one", "attention_mask.filter"], [f"{raw}.keys"]),
        helper.make_node("Unsqueeze", [f"{raw}.keys", "attention_mask.axes"], [f"{raw}.keys4d"]),
        helper.make_node("Shape", [raw], [f"{raw}.shape"]),
        helper.make_node("Gather", [f"{raw}.shape", "attention_mask.seq_axis"], [f"{raw}.seq"], axis=0),
        helper.make_node("Concat", ["attention_mask.lead", f"{raw}.seq", "attention_mask.tail"], [f"{raw}.rows"], axis=0),
        helper.make_node("Expand", [f"{raw}.keys4d", f"{raw}.rows"], [out]),  # (b,1,1,s) x (1,1,s,1)
    ]
    return nodes, constants


def _drop_unread_initializers(proto: onnx.ModelProto) -> None:
    """Remove initializers no node reads and no graph input overrides: the q, k, v weights a packed
    Attention replaced, the MultiHeadAttention biases split onto the projections."""
    read = {t for n in proto.graph.node for t in n.input} | {i.name for i in proto.graph.input}
    keep = [i for i in proto.graph.initializer if i.name in read]
    if len(keep) < len(proto.graph.initializer):
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)


def random_bank(proto: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """Random adapter-bank feeds (every slot, a few entries, one per row) for comparing two switchable graphs."""
    entries, width, scale = _CHECK_BANK
    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in slot_specs(proto).items():
        value = spec.zeros(entries, width)
        feeds[name] = (rng.standard_normal(value.shape) * scale).astype(np.float32)
    feeds[ADAPTER_IDS] = np.arange(batch, dtype=np.int64) % entries
    return feeds


def fuse_switchable(graph: ExportedGraph, model: AdapterModel, feeds: dict[str, np.ndarray],
                    fusions: tuple[str, ...] = DEFAULT_FUSIONS) -> Fusion:
    """ORT's attention fusion on a switchable graph, in place, its adapter branches kept float and per row.

    The branches are lifted out, ORT fuses the plain base (MultiHeadAttention, raw mask), the branches are
    joined again and the result must reproduce the unfused graph (`FUSED_REL_TOL`) on `feeds` with no
    adapter and with a random adapter bank mixed per row. Of `fusions` only "attention" applies here: the
    others would fold the Adds the branches join. Anything else leaves the graph unfused, with a note.
    """
    shape = fusable(model, fusions)
    if isinstance(shape, Fusion):
        return shape
    if "attention" not in fusions:
        return Fusion(tuple(fusions), note="unfused: switchable graphs take only the attention fusion")
    heads, hidden = shape
    skipped = [f for f in fusions if f != "attention"]
    try:
        branches = _branches(graph.model, graph.weights, {n for group in graph.slots.values() for n in group})
        fused = optimize(_without_branches(graph.model, branches), heads, hidden, ("attention",), multi_head=True)
        if isinstance(fused, str):
            return Fusion(tuple(fusions), note=fused)
        multi_head = _trace_multi_head(fused, graph.weights)
        if not multi_head:
            return Fusion(tuple(fusions), note="unfused: ORT's attention fusion matched nothing in this graph")
        _rejoin(fused, graph.model, branches)
    except _Unfusable as e:
        return Fusion(tuple(fusions), note=str(e))
    attention = _pack_plain_attention(fused, multi_head, {b.layer for b in branches})
    if multi_head:
        try:
            fused = _standard_attention(fused, multi_head, graph.weights)
        except Exception as exc:  # noqa: BLE001 - the converter or a graph ORT fused otherwise: stay unfused
            return Fusion(tuple(fusions), note=f"unfused: moving the attention cores to ONNX Attention failed "
                                               f"({type(exc).__name__}: {exc})"[:300])
    _drop_unread_initializers(fused)
    packed = {layer for group in attention.values() for layer in group}
    used = {i for n in fused.graph.node for i in n.input}
    lost = [layer for layer, name in graph.weights.items() if layer not in packed and name not in used]
    if lost:
        return Fusion(tuple(fusions), note=f"unfused: the fusions dropped the weight of {lost[0]}")
    checks = (feeds, {**feeds, **random_bank(graph.model, len(next(iter(feeds.values()))))})
    for want, got in zip(run_graph(graph.model, *checks), run_graph(fused, *checks)):
        rel = relative_difference(want, got)
        if rel > FUSED_REL_TOL:
            note = f"unfused: the fused graph differed from the unfused one by {rel:.2g} relative"
            return Fusion(tuple(fusions), note=note)
    graph.model.CopyFrom(fused)
    graph.weights = {layer: name for layer, name in graph.weights.items() if layer not in packed}
    counts = Counter(f"ai.onnx.{n.op_type}" if n.op_type == "Attention" and n.domain in ("", "ai.onnx") else n.op_type
                     for n in fused.graph.node)
    applied = {op: counts[op] for op in FUSED_OPS if counts[op]}
    summary = ", ".join(f"{op} x{n}" for op, n in applied.items())
    note = (f"ORT attention fusion, adapter branches lifted out and rejoined, adapted attention cores as "
            f"ONNX Attention (opset {STANDARD_ATTENTION_OPSET}): {summary}")
    if skipped:
        note += f"; {', '.join(skipped)} not applied to switchable graphs"
    return Fusion(tuple(fusions), applied, attention, note, multi_head)
