"""Torch -> ONNX for an `AdapterModel`, with every weight the exporter needs under a known initializer name.

Each adapted (or quantizable) linear is exported as `y = x @ weight_t + bias`, with `weight_t` stored
already transposed (in, out) so an int8 rewrite needs no Transpose; LoRA adds `(x @ lora_A) @ lora_B`
and a bottleneck adds `act(y @ down_w + down_b) @ up_w + up_b`. In merged mode the LoRA delta is folded
into `weight_t`; in switchable mode the adapter tensors become graph inputs (see `switchable.py`).
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field

import onnx
import torch
from torch import nn

from edgelora.heads import activation, head_kind, pool
from edgelora.layers import AdaptedLinear
from edgelora.model import AdapterModel
from edgelora.runtime.bundle import TOKEN_CLASSIFICATION

OPSET = 17
FEEDS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("logits", "embeddings")
HIDDEN_STATE = "last_hidden_state"  # the token-level output an embeddings bundle gives on request
SLOT_RANK = 2  # placeholder width of switchable slots at trace time; replaced by a zero-size default
# ONNX Runtime's Attention adds this to the scores of masked keys (its `mask_filter_value` default); the
# additive masks the exporter builds and the torch references in validate.py use the same value.
MASK_FILTER_VALUE = -10000.0


class _ExportLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous().float())  # (in, out)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.lora = False
        self.bottleneck_act: nn.Module | None = None

    def add_lora(self, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        self.register_buffer("lora_A", a_t.contiguous().float())  # (in, r)
        self.register_buffer("lora_B", b_t.contiguous().float())  # (r, out), scaling folded in
        self.lora = True

    def add_bottleneck(self, down: nn.Linear, up: nn.Linear, act: nn.Module) -> None:
        self.register_buffer("down_w", down.weight.detach().t().contiguous().float())  # (out, m)
        self.register_buffer("down_b", down.bias.detach().float().clone())
        self.register_buffer("up_w", up.weight.detach().t().contiguous().float())  # (m, out)
        self.register_buffer("up_b", up.bias.detach().float().clone())
        self.bottleneck_act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        if self.bias is not None:
            y = y + self.bias
        if self.lora:
            y = y + torch.matmul(torch.matmul(x, self.lora_A), self.lora_B)
        if self.bottleneck_act is not None:
            y = y + torch.matmul(self.bottleneck_act(torch.matmul(y, self.down_w) + self.down_b), self.up_w) + self.up_b
        return y


class _ExportHead(nn.Module):
    """A head of kind `kind` (`edgelora.heads`): pool, optional dense + activation (`dense_w` (hidden, hidden)
    transposed, `dense_b`), then `weight_t` (hidden, labels) and `bias`."""

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                 dense: nn.Linear | None = None) -> None:
        super().__init__()
        self.kind = head_kind(kind)
        self.register_buffer("weight_t", weight.detach().t().contiguous().float())  # (hidden, labels)
        self.register_buffer("bias", (bias if bias is not None else weight.new_zeros(weight.shape[0])).detach().float().clone())
        if self.kind.activation is not None:
            self.register_buffer("dense_w", dense.weight.detach().t().contiguous().float())  # (hidden, hidden)
            self.register_buffer("dense_b", dense.bias.detach().float().clone())

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled if self.kind.token == "mean" else pool(hidden, mask, self.kind.token)  # (batch, hidden)
        if self.kind.activation is not None:
            x = activation(self.kind.activation)(torch.matmul(x, self.dense_w) + self.dense_b)
        return torch.matmul(x, self.weight_t) + self.bias


class _ExportModel(nn.Module):
    def __init__(self, model: AdapterModel, head: _ExportHead | None, use_token_types: bool, hidden_state: bool) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.use_token_types = use_token_types
        self.hidden_state = hidden_state

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # type: ignore[override]
        hidden = self.model.hidden_states(input_ids, attention_mask, token_type_ids if self.use_token_types else None)
        pooled = pool(hidden, attention_mask, "mean")
        out = (self.head(hidden, attention_mask, pooled),) if self.head is not None else ()
        return out + (pooled,) + ((hidden,) if self.hidden_state else ())


@dataclass
class ExportedGraph:
    """An ONNX model plus where its weights live: layer name -> initializer names."""

    model: onnx.ModelProto
    feeds: tuple[str, ...]
    weights: dict[str, str] = field(default_factory=dict)  # layer -> its (in, out) base weight initializer
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)  # switchable adapter inputs by role
    outputs: tuple[str, ...] = OUTPUTS  # logits (where a head is), embeddings, last_hidden_state (on request)
    per_token: bool = False  # the head classifies each token: logits (batch, seq, labels)


def per_token(model: AdapterModel) -> bool:
    """Whether the model's heads classify each token (`logits` [batch, seq, labels]) rather than each text."""
    return model.task == TOKEN_CLASSIFICATION


def uses_token_types(model: AdapterModel) -> bool:
    config = getattr(model.base, "config", None)
    return bool(getattr(config, "type_vocab_size", 0)) and getattr(config, "model_type", "") != "distilbert"


def export_graph(model: AdapterModel, *, mode: str, adapter: str | None, slots: dict | None = None,
                 hidden_state: bool = False) -> ExportedGraph:
    """Export `model` to ONNX in fp32.

    Args:
        mode: "merged" folds `adapter`'s LoRA into the base weights and bakes its bottleneck and head in;
            "switchable" exports the plain base with a placeholder slot for every adapter tensor in `slots`
            (`{"lora": set(layers), "bottleneck": {layer: act}, "hidden": int, "head": kind or None}`), made
            graph inputs later. A graph without a head (an adapter without one; slots' head None) has no
            `logits` output.
        hidden_state: add the token-level `last_hidden_state` (batch, seq, hidden) output.
    """
    model = copy.deepcopy(model).cpu().float().eval()
    model.set_quant(None)
    gen = torch.Generator().manual_seed(0)
    weights: dict[str, str] = {}
    slot_names: dict[str, list[str]] = {"lora": [], "bottleneck": [], "head": []}
    for name in model.quantizable_names():
        parent_name, _, child = name.rpartition(".")
        parent = model.base.get_submodule(parent_name) if parent_name else model.base
        layer = getattr(parent, child)
        if isinstance(layer, AdaptedLinear):
            weight = layer.base.weight
            if mode == "merged" and adapter in layer.lora_A:
                weight = weight + layer.lora_delta(adapter)
            out = _ExportLinear(weight, layer.base.bias)
            if mode == "merged" and adapter in layer.bottleneck:
                b = layer.bottleneck[adapter]
                out.add_bottleneck(b.down, b.up, b.act)
        else:
            weight = layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()  # GPT-2 Conv1D is (in, out)
            out = _ExportLinear(weight, layer.bias)
        if mode == "switchable" and slots is not None:
            if name in slots["lora"]:
                out.add_lora(torch.randn(out.weight_t.shape[0], SLOT_RANK, generator=gen) * 0.01,
                             torch.randn(SLOT_RANK, out.weight_t.shape[1], generator=gen) * 0.01)
                slot_names["lora"] += [f"model.base.{name}.lora_A", f"model.base.{name}.lora_B"]
            if name in slots["bottleneck"]:
                width = out.weight_t.shape[1]
                down, up = nn.Linear(width, SLOT_RANK), nn.Linear(SLOT_RANK, width)
                out.add_bottleneck(down, up, copy.deepcopy(slots["bottleneck"][name]))
                slot_names["bottleneck"] += [f"model.base.{name}.{p}" for p in ("down_w", "down_b", "up_w", "up_b")]
        setattr(parent, child, out)
        weights[name] = f"model.base.{name}.weight_t"
    head: _ExportHead | None = None
    if mode == "merged" and adapter is not None and adapter in model.heads:
        dense = model.head_dense[adapter] if adapter in model.head_dense else None
        head = _ExportHead(model.head_kind(adapter), model.heads[adapter].weight, model.heads[adapter].bias, dense)
    elif mode == "switchable" and slots is not None and slots.get("head") is not None:
        hidden = slots["hidden"]
        placeholder = nn.Linear(hidden, hidden)  # replaced by zero defaults when the slots become inputs
        head = _ExportHead(slots["head"], torch.randn(SLOT_RANK, hidden, generator=gen) * 0.01, torch.zeros(SLOT_RANK),
                           placeholder)
        slot_names["head"] = ["head.weight_t", "head.bias"] + (
            ["head.dense_w", "head.dense_b"] if head.kind.activation is not None else [])
    token_types = uses_token_types(model)
    wrapper = _ExportModel(model, head, token_types, hidden_state).eval()
    feeds = FEEDS if token_types else FEEDS[:2]
    outputs = (("logits",) if head is not None else ()) + ("embeddings",) + ((HIDDEN_STATE,) if hidden_state else ())
    # A batch of two rows, the second right-padded: a last-token head must trace its gather, not a constant.
    ids = torch.randint(5, 100, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    args = (ids, mask) + ((torch.zeros_like(ids),) if token_types else ())
    buffer = io.BytesIO()
    dynamic = {n: {0: "batch", 1: "sequence"} for n in feeds}
    logits_axes = {0: "batch", 1: "sequence", 2: "num_labels"} if per_token(model) else {0: "batch", 1: "num_labels"}
    dynamic.update({"logits": logits_axes, "embeddings": {0: "batch"}, HIDDEN_STATE: {0: "batch", 1: "sequence"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, args, buffer, dynamo=False, input_names=list(feeds), output_names=list(outputs),
            dynamic_axes={k: v for k, v in dynamic.items() if k in feeds or k in outputs},
            opset_version=OPSET, do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    names = {init.name for init in proto.graph.initializer}
    missing = [n for n in list(weights.values()) + sum(slot_names.values(), []) if n not in names]
    if missing:
        raise RuntimeError(f"export lost initializer names {missing[:3]}; the exporter needs them to quantize")
    return ExportedGraph(proto, feeds, weights, {k: tuple(v) for k, v in slot_names.items()}, outputs,
                         per_token(model))
