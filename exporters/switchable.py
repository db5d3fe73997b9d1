"""Switchable mode: one int8 base, adapters as files, chosen per call or per row without a new session.

Every adapter tensor of the graph (LoRA A and B, bottleneck down/up, the head) is an *adapter bank*: an
overridable initializer (graph input + same-named initializer) with a leading adapter axis, from which
each batch row takes its slice by the int64 overridable initializer `adapter_ids` (Gather on axis 0,
then a batched MatMul: x [B,S,in] @ A[ids] [B,in,r] @ B[ids] [B,r,out]). The defaults are a bank of one
zero-width entry and `adapter_ids = [0]`, so with nothing fed the graph is exactly the plain base.

One graph, one path for both uses — the slots *are* the bank:
  - one adapter per call: `adapters/<name>.onnx_adapter` holds that adapter alone as a bank of one at its
    own rank and label count; `adapter_ids` keeps its default [0], which broadcasts over the batch;
  - one adapter per row: `bank.onnx_adapter` holds every adapter of the bundle stacked (ranks, bottleneck
    widths and label counts zero-padded to the largest, plus a last all-zero entry for "no adapter"), and
    the runtime feeds `adapter_ids` [batch]. Zero padding adds exact zeros, so a row's result is its
    adapter's, bit for bit in fp32.
Either way switching is choosing another ONNX Runtime `RunOptions`; the base session is never rebuilt.

Why one path rather than 2-D per-call slots beside a separate bank: every layer would then carry two
adapter branches, and a single-adapter run would pay for the unused one. With one, a single-adapter run
costs what a 2-D slot did (a Gather of one entry, and a MatMul that broadcasts it over the batch).

int8: the base quantizes its activations per tensor over the whole batch (DynamicQuantizeLinear, which
training's fake quantizer imitates), so in int8 a row's result depends on its batch-mates within int8
rounding — in any batch, mixed or not. What holds exactly is that a mixed batch gives what the
fake-quantized torch model gives for that same mixed batch (`per_row_adapters` is that reference).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from edgelora.config import LoraConfig, plain_lora_config
from edgelora.errors import EdgeloraError
from edgelora.layers import ADAPTER_KEYS, LORA_A_KEY, LORA_B_KEY, AdaptedLinear
from edgelora.heads import pool
from edgelora.model import AdapterModel, hidden_size
from edgelora.peft_format import HEAD_PREFIX, PEFT_PREFIX, adapter_state, backbone_prefix
# adapter_ids: int64 [rows], each row's bank entry; default [0]
from edgelora.runtime.bundle import ADAPTER_IDS, BANK_FILE, TOKEN_CLASSIFICATION

from . import validate
from .onnx_graph import ExportedGraph

BANK_AXIS = "adapters"  # name of the leading (adapter) dimension of every bank input
# Which layers get a LoRA slot: those the exported adapters adapt, or every attention (and MLP)
# projection, so adapters trained later on those layers can be added without re-exporting the base.
LORA_SLOT_POLICIES = ("adapters", "attention", "attention+mlp")

# role (the slot name's last part) -> (axis of the adapter's width — rank, bottleneck size or label
# count — in the tensor's natural form, or None; leading axes the bank form adds). Natural forms:
# lora_A (in, r), lora_B (r, out) with the LoRA scaling folded in, down_w (out, m), down_b (m,),
# up_w (m, out), up_b (out,), head weight_t (hidden, labels), head bias (labels,), and for heads with a
# dense layer (`edgelora.heads`) dense_w (hidden, hidden) and dense_b (hidden,). The biases of the
# bottleneck get two leading axes, (adapters, 1, width), so a row's slice broadcasts over positions.
_ROLES = {
    "lora_A": (1, 1), "lora_B": (0, 1), "down_w": (1, 1), "down_b": (0, 2), "up_w": (0, 1), "up_b": (None, 2),
    "weight_t": (1, 1), "bias": (0, 1), "dense_w": (None, 1), "dense_b": (None, 1),
}
# Symbolic names of the widths: one per (layer, kind) — ONNX Runtime's memory planner assumes inputs
# sharing a dimension name share its size, and a layer's LoRA rank and bottleneck width differ.
_WIDTH_NAMES = {"lora_A": "lora_rank", "lora_B": "lora_rank", "down_w": "bottleneck_width",
                "down_b": "bottleneck_width", "up_w": "bottleneck_width", "weight_t": "labels", "bias": "labels"}
_ACTIVATION_NAMES = {"ReLU": "relu", "GELU": "gelu", "SiLU": "silu"}


@dataclass(frozen=True)
class SlotSpec:
    """One adapter input of a switchable graph: its shape with the width at 0, and which axis is the width."""

    name: str
    shape: tuple[int, ...]  # the default's shape: the bank axis 1 and the width 0 (up_b: full width)
    width_axis: int | None  # None: the tensor has no adapter-dependent width (up_b)
    banked: bool  # False in bundles made before adapter banks (2-D slots, no adapter_ids)

    def zeros(self, rows: int, width: int) -> np.ndarray:
        shape = list(self.shape)
        if self.banked:
            shape[0] = rows
        if self.width_axis is not None:
            shape[self.width_axis] = width
        return np.zeros(shape, np.float32)

    def row(self, value: np.ndarray) -> np.ndarray:
        """A tensor in its natural form -> this slot's form (a bank of one when banked)."""
        lead = len(self.shape) - value.ndim
        return np.ascontiguousarray(value.reshape((1,) * lead + value.shape), dtype=np.float32)

    def fits(self, value: np.ndarray) -> bool:
        """Whether `value` (in this slot's form) has the slot's fixed dimensions."""
        return value.ndim == len(self.shape) and all(
            got == want for axis, (got, want) in enumerate(zip(value.shape, self.shape))
            if axis != self.width_axis and not (self.banked and axis == 0)
        )


def _role(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def make_slots_inputs(graph: ExportedGraph) -> list[str]:
    """Turn every slot initializer into a bank input with a zero-width default, gathered by `adapter_ids`.

    Rewrites the graph in place: each slot's consumers read `Gather(slot, adapter_ids)` instead, and the
    head's MatMuls run on their (batch, hidden) inputs unsqueezed to (batch, 1, hidden). Returns the slot names.
    """
    proto = graph.model
    g = proto.graph
    inits = {init.name: init for init in g.initializer}
    names = [n for group in graph.slots.values() for n in group]
    gathered = {}
    for name in names:
        natural = numpy_helper.to_array(inits[name])
        axis, lead = _ROLES[_role(name)]
        if graph.per_token and name == "head.bias":
            lead = 2  # (adapters, 1, labels): a row's slice broadcasts over its positions
        width_axis = None if axis is None else axis + lead
        shape: list[int | str] = [BANK_AXIS] + [1] * (lead - 1) + list(natural.shape)
        default_shape = [1] + [1] * (lead - 1) + list(natural.shape)
        if width_axis is not None:
            shape[width_axis] = f"{name.rsplit('.', 1)[0]}.{_WIDTH_NAMES[_role(name)]}"
            default_shape[width_axis] = 0
        inits[name].CopyFrom(numpy_helper.from_array(np.zeros(default_shape, np.float32), name))
        g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        gathered[name] = f"{name}.rows"
    g.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), ADAPTER_IDS))
    g.input.append(helper.make_tensor_value_info(ADAPTER_IDS, TensorProto.INT64, ["adapter_rows"]))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "adapter_bank.axis1"))

    nodes = [helper.make_node("Gather", [n, ADAPTER_IDS], [gathered[n]], axis=0, name=f"{n}.Gather") for n in names]
    for node in g.node:
        uses = [i for i, x in enumerate(node.input) if x in gathered]
        if not uses:
            nodes.append(node)
            continue
        if node.op_type not in ("MatMul", "Add") or len(uses) != 1:
            raise RuntimeError(f"slot {node.input[uses[0]]} feeds a {node.op_type}; the bank rewrite expects MatMul or Add")
        slot = node.input[uses[0]]
        node.input[uses[0]] = gathered[slot]
        if node.op_type == "MatMul" and _role(slot) in ("weight_t", "dense_w") and slot.startswith("head.") \
                and not graph.per_token:
            # (batch, hidden) @ (batch, hidden, labels) would broadcast to (batch, batch, labels): lift the
            # pooled rows to (batch, 1, hidden), multiply per row, and drop the axis again.
            pooled, out, tag = node.input[0], node.output[0], slot
            nodes.append(helper.make_node("Unsqueeze", [pooled, "adapter_bank.axis1"], [f"{tag}.input_rows"],
                                          name=f"{tag}.Unsqueeze"))
            node.input[0] = f"{tag}.input_rows"
            node.output[0] = f"{tag}.output_rows"
            nodes += [node, helper.make_node("Squeeze", [f"{tag}.output_rows", "adapter_bank.axis1"], [out],
                                             name=f"{tag}.Squeeze")]
            continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]  # shapes inferred at trace time carry the placeholder width
    return names


def slot_specs(proto: onnx.ModelProto) -> dict[str, SlotSpec]:
    """The adapter inputs of a switchable graph (banked, or the 2-D slots of older bundles), by name."""
    inits = {init.name: init for init in proto.graph.initializer}
    banked = ADAPTER_IDS in inits
    specs = {}
    for inp in proto.graph.input:
        if inp.name not in inits or inp.name == ADAPTER_IDS or _role(inp.name) not in _ROLES:
            continue
        shape = tuple(int(d) for d in inits[inp.name].dims)
        axis, lead = _ROLES[_role(inp.name)]
        if banked and inp.name == "head.bias":
            lead = len(shape) - 1  # 2 for a per-token head's (adapters, 1, labels)
        width_axis = None if axis is None else axis + (lead if banked else 0)
        specs[inp.name] = SlotSpec(inp.name, shape, width_axis, banked)
    return specs


# A bottleneck tensor's key part in the adapter file -> its slot role (all but the biases transposed).
_BOTTLENECK_ROLES = {"down.weight": "down_w", "down.bias": "down_b", "up.weight": "up_w", "up.bias": "up_b"}


def peft_slots(tensors: Mapping[str, np.ndarray], scaling_for: Callable[[int], float] | None,
               resolve: Callable[[str], str], source: object,
               head_prefix: str = HEAD_PREFIX) -> dict[str, tuple[np.ndarray, str]]:
    """An adapter's tensors under its file's keys (`peft_format.adapter_state`) -> {slot name: (value in the
    slot's natural form, the key it came from)}: the one conversion from an adapter to the graph's slots.

    Args:
        scaling_for: the LoRA scaling of a layer of rank r (`LoraConfig.scaling_for`), folded into B; None
            for a bottleneck adapter.
        resolve: the graph's name of a layer named in a key (PEFT keys may carry a task model's prefix);
            raises EdgeloraError for a layer the graph lacks.
        source: what errors name (the adapter directory).
        head_prefix: where the file keeps its head's weight and bias: ours under `edgelora_head.`, a PEFT
            task model's classifier under `base_model.model.classifier.` (TOKEN_CLS) or `...score.`.
    """
    out: dict[str, tuple[np.ndarray, str]] = {}
    for key, value in tensors.items():
        if key.startswith(head_prefix):
            slot = {"weight": "head.weight_t", "bias": "head.bias"}.get(key[len(head_prefix):])
            if slot is None:
                raise EdgeloraError(f"{source}: unknown head tensor {key}; re-save the adapter")
            out[slot] = (value.T if slot == "head.weight_t" else value), key
            continue
        inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        marker = next((m for m in ADAPTER_KEYS if m in inner), None)
        if marker is None:
            raise EdgeloraError(f"{source}: tensor {key} is neither LoRA, bottleneck nor head; re-save the adapter")
        layer_key, _, rest = inner.partition(marker)
        prefix = f"model.base.{resolve(layer_key)}"
        if marker == LORA_A_KEY:
            out[f"{prefix}.lora_A"] = value.T, key  # (in, r)
        elif marker == LORA_B_KEY:
            if scaling_for is None:
                raise EdgeloraError(f"{source}: tensor {key} is LoRA but the adapter is not; re-save the adapter")
            out[f"{prefix}.lora_B"] = (scaling_for(value.shape[1]) * value).T, key  # (r, out), the scaling folded in
        else:
            role = _BOTTLENECK_ROLES.get(rest)
            if role is None:
                raise EdgeloraError(f"{source}: unknown bottleneck tensor {key}; re-save the adapter")
            out[f"{prefix}.{role}"] = (value.T if role in ("down_w", "up_w") else value), key
    return out


def natural_tensors(model: AdapterModel, name: str) -> dict[str, np.ndarray]:
    """Adapter `name`'s tensors in natural form under the graph's slot names (LoRA scaling folded into B):
    what `edgelora add-adapter` makes of the adapter's file, through the same `peft_slots`."""
    config = model.configs[name]
    scaling = plain_lora_config(config).scaling_for if isinstance(config, LoraConfig) else None
    state = {k: v.numpy() for k, v in adapter_state(model, name).items() if any(m in k for m in ADAPTER_KEYS)}
    prefix = backbone_prefix(model, name)
    values = {slot: value for slot, (value, _key) in
              peft_slots(state, scaling, lambda layer: layer.removeprefix(prefix), name).items()}
    return {**values, **head_tensors(model, name)}


def head_tensors(model: AdapterModel, name: str) -> dict[str, np.ndarray]:
    """Adapter `name`'s head under the graph's slot names, in natural form (none for an adapter without a head;
    a zero bias for heads whose classifier has none)."""
    if name not in model.heads:
        return {}
    linear = model.heads[name]
    weight = linear.weight.detach().cpu().float()
    out = {"head.weight_t": weight.T.numpy().copy(),
           "head.bias": (linear.bias.detach().cpu().float() if linear.bias is not None
                         else torch.zeros(weight.shape[0])).numpy().copy()}
    if name in model.head_dense:
        dense = model.head_dense[name]
        out["head.dense_w"] = dense.weight.detach().cpu().float().T.numpy().copy()
        out["head.dense_b"] = dense.bias.detach().cpu().float().numpy().copy()
    return out


def adapter_tensors(model: AdapterModel, name: str, specs: Mapping[str, SlotSpec],
                    packs: Mapping | None = None) -> dict[str, np.ndarray]:
    """Adapter `name`'s values as its `.onnx_adapter` file holds them: each in its slot's form, the LoRA of
    q, k and v packed where the graph packs them (`switchable_pack.Pack`, by name)."""
    values = natural_tensors(model, name)
    if packs:
        from .switchable_pack import pack_slots  # that module builds on this one

        values = pack_slots(values, packs, name)
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise RuntimeError(f"adapter {name!r} has tensors with no slot in the graph: {unknown[:3]}")
    return {k: specs[k].row(v) for k, v in values.items()}


def build_bank(adapters: Mapping[str, Mapping[str, np.ndarray]], specs: Mapping[str, SlotSpec]) -> dict[str, np.ndarray]:
    """Stack adapters (each a bank of one, as in its file) into one bank, in the given order, plus a last
    all-zero entry for "no adapter". Widths are zero-padded to the largest; every slot is present."""
    rows = list(adapters.values())
    bank = {}
    for name, spec in specs.items():
        widths = [r[name].shape[spec.width_axis] for r in rows if name in r] if spec.width_axis is not None else []
        width = max(widths, default=0)
        out = spec.zeros(len(rows) + 1, width)  # (adapters + 1, ...): the last entry stays zero
        for i, r in enumerate(rows):
            if name in r:
                index = [i] + [slice(0, d) for d in r[name].shape[1:]]
                out[tuple(index)] = r[name][0]
        bank[name] = out
    return bank


def write_adapter_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    """An `.onnx_adapter` file's parameters as numpy arrays."""
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # noqa: BLE001 - ORT raises a bare RuntimeError/Fail for any bad file
        raise EdgeloraError(f"{path}: not a readable .onnx_adapter file ({str(e).strip().splitlines()[0][:200]})") from None
    return {k: np.array(v.numpy()) for k, v in params.items()}


def slot_plan(model: AdapterModel, names: Sequence[str], lora_slots: str = "adapters") -> dict:
    """Which layers get a LoRA slot and which a bottleneck slot so that every adapter in `names` fits.

    Args:
        lora_slots: "adapters" gives LoRA slots only where these adapters have LoRA; "attention" and
            "attention+mlp" add a slot to every such projection of the architecture, so that LoRA
            adapters trained later on them can be added (`edgelora add-adapter`). An unused slot costs a
            zero-width branch per layer at run time.
    """
    if lora_slots not in LORA_SLOT_POLICIES:
        raise EdgeloraError(f"lora_slots={lora_slots!r} is not supported; choose from {', '.join(LORA_SLOT_POLICIES)}")
    lora: set[str] = set()
    bottleneck: dict[str, torch.nn.Module] = {}
    for layer_name, layer in model.adapted_layers():
        for n in names:
            if n in layer.lora_A:
                lora.add(layer_name)
            if n in layer.bottleneck:
                bottleneck.setdefault(layer_name, layer.bottleneck[n].act)
    if lora_slots != "adapters":
        # The layers LoraConfig would target by default: the architecture's attention (and MLP) projections.
        lora |= set(model._lora_target_names(LoraConfig(include_mlp=lora_slots == "attention+mlp")))
    acts = {type(a).__name__ for a in bottleneck.values()}
    if len(acts) > 1:
        raise EdgeloraError(f"bottleneck adapters with different activations ({', '.join(sorted(acts))}) cannot share a graph")
    heads = {n: model.head_kind(n) for n in names if model.head_kind(n) is not None}
    if len(set(heads.values())) > 1:
        listed = ", ".join(f"{n}: {k}" for n, k in heads.items())
        raise EdgeloraError(f"adapters with different heads ({listed}) cannot share a switchable graph, which pools "
                            "one way; export them in separate bundles")
    head = next(iter(heads.values()), None)
    return {"lora": lora, "bottleneck": bottleneck, "hidden": hidden_size(model.base), "head": head}


def slots_manifest(plan: dict, lora_slots: str, packs: Mapping | None = None) -> dict:
    """The manifest's record of the graph's slots: what an adapter added later must fit, and how its q, k, v
    LoRA are packed (`switchable_pack.Pack`, by name; absent when none are)."""
    acts = {_ACTIVATION_NAMES.get(type(a).__name__, type(a).__name__) for a in plan["bottleneck"].values()}
    packed = {"packed": {name: pack.as_manifest() for name, pack in packs.items()}} if packs else {}
    return {
        "policy": lora_slots,
        "lora": sorted(plan["lora"]),
        "bottleneck": sorted(plan["bottleneck"]),
        "bottleneck_activation": acts.pop() if acts else None,
        "head_hidden": plan["hidden"],
        "head": plan.get("head"),  # the kind every adapter's head must have (edgelora.heads); None: no head
        **packed,
    }


# --- the torch reference of a mixed batch -----------------------------------------------------------------


@contextlib.contextmanager
def per_row_adapters(model: AdapterModel, rows: Sequence[str | None]) -> Iterator[None]:
    """Within this context every adapted layer of `model` applies adapter `rows[i]` to batch row i.

    Each layer computes its output once per distinct adapter on the whole batch — so the fake-quantized
    base sees the whole batch, as ONNX Runtime's per-tensor dynamic quantization does — and keeps each
    row from its own adapter's output. The reference a mixed-batch graph must reproduce.
    """
    names = list(dict.fromkeys(rows))
    layers = [layer for _, layer in model.adapted_layers()]

    def forward(layer: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
        out = None
        for name in names:
            layer.active = name
            y = AdaptedLinear.forward(layer, x)
            if out is None:
                out = torch.empty_like(y)
            mask = torch.tensor([r == name for r in rows])
            out[mask] = y[mask]
        layer.active = None
        return out

    previous = model.active
    model.set_adapter(None)
    for layer in layers:
        layer.forward = lambda x, layer=layer: forward(layer, x)  # instance attribute shadows the class method
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        model.set_adapter(previous)


def mixed_torch_outputs(model: AdapterModel, feeds: Mapping[str, np.ndarray], rows: Sequence[str | None]) \
        -> tuple[list[np.ndarray], np.ndarray]:
    """Per-row logits (each row its adapter's label count; none for "no adapter"; per token for a token head)
    and the pooled embeddings."""
    with per_row_adapters(model, rows), torch.no_grad():
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
        hidden = model.hidden_states(**tensors)
        mask = tensors["attention_mask"]
        pooled = pool(hidden, mask, "mean")
        none = np.zeros((hidden.shape[1], 0) if model.task == TOKEN_CLASSIFICATION else 0, np.float32)
        logits = [model.classify(r, hidden[i : i + 1], mask[i : i + 1], pooled[i : i + 1])[0].numpy()
                  if r is not None else none for i, r in enumerate(rows)]
    return logits, pooled.numpy()


def bank_rows(names: Sequence[str], batch: int) -> list[str | None]:
    """A batch that cycles through every adapter and "no adapter": the rows a bank check runs."""
    cycle = list(names) + [None]
    return [cycle[i % len(cycle)] for i in range(max(batch, len(cycle)))]


def check_bank(model: AdapterModel, proto: onnx.ModelProto, feed_names: Sequence[str], names: Sequence[str],
               precision: str, recipe, bank: Mapping[str, np.ndarray]) -> dict:
    """Run one mixed batch (every adapter and "no adapter", one per row) through the bank and compare each
    row with the torch model applying that row's adapter: fp32 with the float model, int8 with the
    fake-quant model on the same mixed batch. Raises EdgeloraError outside tolerance; returns the figures."""
    vocab = model.base.get_input_embeddings().num_embeddings
    rows = bank_rows(names, 4)
    feeds = validate.generated_feeds(vocab, tuple(feed_names), batch=len(rows))
    ids = np.array([len(names) if r is None else list(names).index(r) for r in rows], np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / BANK_FILE
        write_adapter_file(path, bank)
        options, _adapter = validate.adapter_run_options(str(path))
        sess = validate.session(proto.SerializeToString())
        logits, pooled = validate.run_graph(sess, {**feeds, ADAPTER_IDS: ids}, options)
    report: dict = {"rows": [r or "(no adapter)" for r in rows]}
    refs = {"vs_fp32_torch": None}
    if precision == "int8":
        refs["vs_fake_quant_torch"] = recipe
    for ref_name, quant in refs.items():
        ref_model = copy.deepcopy(model)
        ref_model.set_quant(quant)
        ref_logits, ref_pooled = mixed_torch_outputs(ref_model, feeds, rows)
        got = np.concatenate([logits[i][..., : ref.shape[-1]].ravel() for i, ref in enumerate(ref_logits)])
        lc = validate.compare("logits", got, np.concatenate([ref.ravel() for ref in ref_logits]))
        pc = validate.compare("embeddings", pooled, ref_pooled)
        report[ref_name] = {"logits": lc.as_dict(), "embeddings": pc.as_dict()}
        if (ref_name == "vs_fp32_torch") == (precision == "fp32"):
            validate.check_tolerance(precision, "a mixed batch through the adapter bank", lc, pc,
                                     float(np.abs(ref_pooled).max()))
    return report
