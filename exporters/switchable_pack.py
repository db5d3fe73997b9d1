"""Switchable graphs with q, k and v packed: one projection, one LoRA branch and a Split per attention core.

After `switchable_fusion.fuse_switchable` an adapted attention core (ONNX Attention) reads three projections of
one input, each with its bias Add and its own LoRA branch (Gather A, MatMul, Gather B, MatMul, Add): three
int8 matmuls and fifteen float nodes per layer, most too small for their work to outweigh what ONNX Runtime
spends per node. `pack_attention_inputs` rewrites them into x [Wq|Wk|Wv] + [bq|bk|bv] (one int8 matmul once
quantized), one LoRA branch (x A_qkv) B_qkv with A_qkv = [Aq|Ak|Av] (in, rq+rk+rv) and B_qkv block-diagonal
(rq+rk+rv, out_q+out_k+out_v), one Add, and a Split into the attention's q, k and v. Each output column is the
same sum as before plus exact zeros: int8 weight scales are per column, B_qkv's off-diagonal blocks are zero.

The adapters' q, k and v slots become one packed pair (`model.base.<pack>.lora_A` / `.lora_B`); `pack_slots` is
the one conversion from per-layer tensors (natural or banked) to it, used by export, add-adapter and the check
here. The manifest records each pack under `slots["packed"]` (`Pack.as_manifest`). Measured on MiniLM int8,
ORT 1.32, a 2-core AVX2 EPYC: switchable over merged at 1x32 went from 1.16 to 1.09 with the packs
(`benchmarks/switching.py`; README "Switchable bundles are fused too").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.onnx_model import OnnxModel

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import ADAPTER_IDS

from .fusion import FUSED_REL_TOL, relative_difference, run_graph
from .onnx_graph import ExportedGraph
from .switchable import BANK_AXIS
from .switchable_fusion import random_bank

_PREFIX = "model.base."  # slot names: model.base.<layer>.lora_A (switchable.make_slots_inputs)


@dataclass(frozen=True)
class Pack:
    """The q, k and v projections of one attention core, packed into one.

    name: the packed pseudo-layer (`<common prefix>.query+key+value`); its slots are model.base.<name>.lora_A/B.
    layers: the projections in column order; widths: their output widths.
    lora: those with a LoRA slot, in the order their ranks fill A_qkv's columns (and B_qkv's rows).
    """

    name: str
    layers: tuple[str, ...]
    widths: tuple[int, ...]
    lora: tuple[str, ...]

    @property
    def weight(self) -> str:
        """The packed (in, sum of widths) base weight: no `model.base.` name, so it names no layer of the base."""
        return f"packed.{self.name}.weight_t"

    def as_manifest(self) -> dict:
        return {"layers": list(self.layers), "widths": list(self.widths), "lora": list(self.lora)}

    @classmethod
    def from_manifest(cls, name: str, record: Mapping) -> Pack:
        return cls(name, tuple(record["layers"]), tuple(int(w) for w in record["widths"]), tuple(record["lora"]))


def packs_of(slots: Mapping | None) -> dict[str, Pack]:
    """The packs a manifest's `slots` records (none in bundles made before packing)."""
    return {name: Pack.from_manifest(name, record) for name, record in ((slots or {}).get("packed") or {}).items()}


def pack_slots(values: Mapping[str, np.ndarray], packs: Mapping[str, Pack],
               source: object = "adapter") -> dict[str, np.ndarray]:
    """Per-layer LoRA tensors -> the packed slots: A (..., in, r) side by side, B (..., r, out) on the block
    diagonal at its layer's columns. Leading (bank) axes pass through; tensors outside every pack, and LoRA of
    a packed layer that has no LoRA slot in its pack, stay as they are (the caller's slot check names them).

    Args:
        source: what an error names (the adapter directory).
    """
    out = dict(values)
    for pack in packs.values():
        present = [layer for layer in pack.lora if f"{_PREFIX}{layer}.lora_A" in out]
        if not present:
            continue
        a = [out.pop(f"{_PREFIX}{layer}.lora_A") for layer in present]
        b = [out.pop(f"{_PREFIX}{layer}.lora_B", None) for layer in present]
        offsets = dict(zip(pack.layers, np.cumsum((0, *pack.widths[:-1])).tolist()))
        widths = dict(zip(pack.layers, pack.widths))
        rank = sum(x.shape[-1] for x in a)
        packed_b = np.zeros((*a[0].shape[:-2], rank, sum(pack.widths)), np.float32)
        row = 0
        for layer, down, up in zip(present, a, b):
            if up is None or up.shape[:-2] != down.shape[:-2] or up.shape[-2] != down.shape[-1] \
                    or up.shape[-1] != widths[layer] or down.shape[-2] != a[0].shape[-2]:
                got = "no lora_B" if up is None else f"lora_B {tuple(up.shape)}"
                raise EdgeloraError(f"{source}: LoRA of {layer} has lora_A {tuple(down.shape)} and {got}; the "
                                    f"bundle's packed q, k, v slot takes (in, r) and (r, {widths[layer]}); the "
                                    "adapter is for another base")
            packed_b[..., row:row + up.shape[-2], offsets[layer]:offsets[layer] + widths[layer]] = up
            row += up.shape[-2]
        out[f"{_PREFIX}{pack.name}.lora_A"] = np.concatenate(a, axis=-1).astype(np.float32)
        out[f"{_PREFIX}{pack.name}.lora_B"] = packed_b
    return out


@dataclass(frozen=True)
class _Projection:
    """One of an attention core's inputs: x W + b, plus a LoRA branch or none."""

    x: str
    nodes: tuple[onnx.NodeProto, ...]  # the MatMul, the bias Add and the branch: what packing removes
    weight: str
    bias: str
    lora: bool


def _projection(tensor: str, weight: str, layer: str, producer: Mapping[str, onnx.NodeProto],
                readers: Counter, inits: set[str]) -> _Projection | None:
    """Match `tensor` = MatMul(x, weight) + bias [+ (x Gather(A)) Gather(B)], every step read once; None if not."""

    def made(t: str, op: str) -> onnx.NodeProto | None:
        n = producer.get(t)
        return n if n is not None and n.op_type == op and readers[t] == 1 else None

    def biased(t: str) -> tuple[onnx.NodeProto, onnx.NodeProto, str] | None:
        add = made(t, "Add")
        if add is None:
            return None
        for mm_out, bias in (add.input, add.input[::-1]):
            mm = made(mm_out, "MatMul")
            if mm is not None and mm.input[1] == weight and bias in inits:
                return mm, add, bias
        return None

    found = biased(tensor)
    if found is not None:
        mm, add, bias = found
        return _Projection(mm.input[0], (mm, add), weight, bias, False)
    join = made(tensor, "Add")
    if join is None:
        return None
    for base_out, delta in (join.input, join.input[::-1]):
        found = biased(base_out)
        up = made(delta, "MatMul")
        if found is None or up is None:
            continue
        mm, add, bias = found
        down, up_rows = made(up.input[0], "MatMul"), made(up.input[1], "Gather")
        down_rows = made(down.input[1], "Gather") if down is not None else None
        if down is None or up_rows is None or down_rows is None or down.input[0] != mm.input[0] \
                or list(down_rows.input) != [f"{_PREFIX}{layer}.lora_A", ADAPTER_IDS] \
                or list(up_rows.input) != [f"{_PREFIX}{layer}.lora_B", ADAPTER_IDS]:
            continue
        return _Projection(mm.input[0], (mm, add, down_rows, down, up_rows, up, join), weight, bias, True)
    return None


def _pack_name(layers: Sequence[str]) -> str:
    """`encoder.layer.0.attention.self.query+key+value` for those three layers."""
    parts = [layer.split(".") for layer in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(parts[0][:common] + ["+".join(".".join(p[common:]) for p in parts)])


def _slot_input(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def pack_attention_inputs(graph: ExportedGraph, cores: Mapping[str, tuple[str, str, str]]) -> dict[str, Pack]:
    """Pack, in place, the q, k, v projections (and LoRA branches) feeding each attention core named in `cores`
    (`Fusion.multi_head`: node -> its query, key, value layers). A core whose inputs are not three biased
    projections of one input, each with a plain LoRA branch or none, is left as it is. `graph.weights` trades
    the packed layers for the packs (`Pack.weight`). Returns the packs made, by name.
    """
    g = graph.model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers = Counter(t for n in g.node for t in n.input)
    readers.update(o.name for o in g.output)
    inits = {i.name: i for i in g.initializer}
    packs: dict[str, Pack] = {}
    drop: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    new_inputs: list[onnx.ValueInfoProto] = []
    for node in g.node:
        layers = cores.get(node.name)
        if node.op_type != "Attention" or layers is None or any(layer not in graph.weights for layer in layers):
            continue
        parts = [_projection(t, graph.weights[layer], layer, producer, readers, set(inits))
                 for t, layer in zip(node.input[:3], layers)]
        if any(p is None for p in parts) or len({p.x for p in parts}) != 1:
            continue
        pack = Pack(_pack_name(layers), tuple(layers), tuple(int(inits[p.weight].dims[1]) for p in parts),
                    tuple(layer for layer, p in zip(layers, parts) if p.lora))
        x, name = parts[0].x, pack.name
        weight = np.concatenate([numpy_helper.to_array(inits[p.weight]) for p in parts], axis=1)  # (in, sum of widths)
        bias = np.concatenate([numpy_helper.to_array(inits[p.bias]) for p in parts])
        new_inits += [numpy_helper.from_array(weight, pack.weight), numpy_helper.from_array(bias, f"packed.{name}.bias"),
                      numpy_helper.from_array(np.array(pack.widths, np.int64), f"packed.{name}.split")]
        out = f"packed.{name}.biased"
        new_nodes += [helper.make_node("MatMul", [x, pack.weight], [f"packed.{name}.projection"], name=f"{name}.MatMul"),
                      helper.make_node("Add", [f"packed.{name}.projection", f"packed.{name}.bias"], [out],
                                       name=f"{name}.bias")]
        if pack.lora:
            a, b = f"{_PREFIX}{name}.lora_A", f"{_PREFIX}{name}.lora_B"
            rank, total = f"{_PREFIX}{name}.lora_rank", sum(pack.widths)
            new_inits += [numpy_helper.from_array(np.zeros((1, weight.shape[0], 0), np.float32), a),
                          numpy_helper.from_array(np.zeros((1, 0, total), np.float32), b)]
            new_inputs += [_slot_input(a, [BANK_AXIS, weight.shape[0], rank]), _slot_input(b, [BANK_AXIS, rank, total])]
            new_nodes += [
                helper.make_node("Gather", [a, ADAPTER_IDS], [f"{a}.rows"], axis=0, name=f"{a}.Gather"),
                helper.make_node("MatMul", [x, f"{a}.rows"], [f"packed.{name}.lora_down"], name=f"{name}.lora_down"),
                helper.make_node("Gather", [b, ADAPTER_IDS], [f"{b}.rows"], axis=0, name=f"{b}.Gather"),
                helper.make_node("MatMul", [f"packed.{name}.lora_down", f"{b}.rows"], [f"packed.{name}.lora_delta"],
                                 name=f"{name}.lora_up"),
                helper.make_node("Add", [out, f"packed.{name}.lora_delta"], [f"packed.{name}.adapted"],
                                 name=f"{name}.lora_join"),
            ]
            out = f"packed.{name}.adapted"
        new_nodes.append(helper.make_node("Split", [out, f"packed.{name}.split"], list(node.input[:3]), axis=-1,
                                          name=f"{name}.Split"))
        drop |= {id(n) for p in parts for n in p.nodes}
        packs[name] = pack
    if not packs:
        return packs
    gone = {t for n in g.node if id(n) in drop for t in n.input}  # slots, weights, biases: dropped if no longer read
    nodes = [n for n in g.node if id(n) not in drop] + new_nodes
    del g.node[:]
    g.node.extend(nodes)
    still_read = {t for n in g.node for t in n.input}
    keep_inits = [i for i in g.initializer if not (i.name in gone and i.name not in still_read)] + new_inits
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    keep_inputs = [i for i in g.input if not (i.name in gone and i.name not in still_read)] + new_inputs
    del g.input[:]
    g.input.extend(keep_inputs)
    OnnxModel.graph_topological_sort(g)
    packed_layers = {layer for pack in packs.values() for layer in pack.layers}
    graph.weights = {**{k: v for k, v in graph.weights.items() if k not in packed_layers},
                     **{pack.name: pack.weight for pack in packs.values()}}
    graph.slots = {role: tuple(n for n in names if n in still_read) for role, names in graph.slots.items()}
    graph.slots["packed"] = tuple(f"{_PREFIX}{p.name}.lora_{ab}" for p in packs.values() if p.lora for ab in "AB")
    return packs


def pack_switchable(graph: ExportedGraph, cores: Mapping[str, tuple[str, str, str]],
                    feeds: dict[str, np.ndarray]) -> tuple[dict[str, Pack], str]:
    """`pack_attention_inputs`, kept only if the packed graph computes what the unpacked one does
    (`fusion.FUSED_REL_TOL`) on `feeds` with no adapter and with a random bank mixed per row, the same bank
    packed by `pack_slots`. Returns the packs kept and a note for the manifest's fusions."""
    before = onnx.ModelProto()
    before.CopyFrom(graph.model)
    weights, slots = dict(graph.weights), dict(graph.slots)
    packs = pack_attention_inputs(graph, cores)
    if not packs:
        return {}, ""
    bank = random_bank(before, len(next(iter(feeds.values()))))
    checks_before = (feeds, {**feeds, **bank})
    checks_after = (feeds, {**feeds, **pack_slots(bank, packs)})
    for want, got in zip(run_graph(before, *checks_before), run_graph(graph.model, *checks_after)):
        rel = relative_difference(want, got)
        if rel > FUSED_REL_TOL:
            graph.model.CopyFrom(before)
            graph.weights, graph.slots = weights, slots
            return {}, f"q, k, v left unpacked: the packed graph differed from the unpacked one by {rel:.2g} relative"
    return packs, f"q, k, v packed into one projection and one LoRA branch for {len(packs)} attention cores"
