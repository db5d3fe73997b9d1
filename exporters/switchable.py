"""Switchable mode: adapter tensors become graph inputs with zero-size defaults, adapters become files.

Every LoRA, bottleneck and head tensor of the exported graph is an overridable initializer (a graph
input with a same-named initializer) whose width dimension is 0, so running with no adapter is exactly
the base; each adapter is an `.onnx_adapter` file (ONNX Runtime's format) holding its values by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from edgelora.layers import AdaptedLinear
from edgelora.model import AdapterModel

from .onnx_graph import ExportedGraph

# (role suffix, which axis is the adapter's width, whether the default keeps a full-size zero tensor)
_SLOT_AXES = {"lora_A": 1, "lora_B": 0, "down_w": 1, "down_b": 0, "up_w": 0, "up_b": None, "weight_t": 1, "bias": 0}


def make_slots_inputs(graph: ExportedGraph) -> list[str]:
    """Turn every slot initializer into a graph input with a zero-width default; returns their names."""
    proto = graph.model
    inits = {init.name: init for init in proto.graph.initializer}
    names = [n for group in graph.slots.values() for n in group]
    for name in names:
        value = numpy_helper.to_array(inits[name])
        suffix = name.rsplit(".", 1)[-1]
        axis = _SLOT_AXES[suffix]
        if axis is None:  # the up-projection bias adds to every output: its default is zeros of full width
            default = np.zeros_like(value)
            shape: list[int | str] = list(value.shape)
        else:
            dims = list(value.shape)
            dims[axis] = 0
            default = np.zeros(dims, dtype=value.dtype)
            shape = list(value.shape)
            shape[axis] = f"{name.rsplit('.', 1)[0]}.width"
        inits[name].CopyFrom(numpy_helper.from_array(default, name))
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    del proto.graph.value_info[:]  # shapes inferred at trace time carry the placeholder width
    return names


def adapter_tensors(model: AdapterModel, name: str, slot_names: list[str]) -> dict[str, np.ndarray]:
    """Adapter `name`'s values under the graph's slot names (LoRA scaling folded into lora_B)."""
    values: dict[str, np.ndarray] = {}
    layers: dict[str, AdaptedLinear] = dict(model.adapted_layers())
    for layer_name, layer in layers.items():
        prefix = f"model.base.{layer_name}"
        if name in layer.lora_A:
            values[f"{prefix}.lora_A"] = layer.lora_A[name].weight.detach().t()
            values[f"{prefix}.lora_B"] = (layer.scaling[name] * layer.lora_B[name].weight.detach()).t()
        if name in layer.bottleneck:
            b = layer.bottleneck[name]
            values[f"{prefix}.down_w"] = b.down.weight.detach().t()
            values[f"{prefix}.down_b"] = b.down.bias.detach()
            values[f"{prefix}.up_w"] = b.up.weight.detach().t()
            values[f"{prefix}.up_b"] = b.up.bias.detach()
    head = model.heads[name]
    values["head.weight_t"] = head.weight.detach().t()
    values["head.bias"] = head.bias.detach()
    unknown = sorted(set(values) - set(slot_names))
    if unknown:
        raise RuntimeError(f"adapter {name!r} has tensors with no slot in the graph: {unknown[:3]}")
    return {k: np.ascontiguousarray(v.to(torch.float32).cpu().numpy()) for k, v in values.items()}


def write_adapter_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def slot_plan(model: AdapterModel, names: list[str]) -> dict:
    """Which layers need a LoRA slot and which a bottleneck slot so that every adapter in `names` fits."""
    lora: set[str] = set()
    bottleneck: dict[str, torch.nn.Module] = {}
    for layer_name, layer in model.adapted_layers():
        for n in names:
            if n in layer.lora_A:
                lora.add(layer_name)
            if n in layer.bottleneck:
                bottleneck.setdefault(layer_name, layer.bottleneck[n].act)
    acts = {type(a).__name__ for a in bottleneck.values()}
    if len(acts) > 1:
        from edgelora.errors import EdgeloraError

        raise EdgeloraError(f"bottleneck adapters with different activations ({', '.join(sorted(acts))}) cannot share a graph")
    hidden = next(iter(model.heads.values())).in_features
    return {"lora": lora, "bottleneck": bottleneck, "hidden": hidden}
