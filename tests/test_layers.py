"""Claims about adapted layers and AdapterModel, across BERT-, DistilBERT-, GPT-2- and Llama-style bases
and across LoRA and bottleneck adapters: identity at start, merge/unmerge, gradients, several adapters,
the two fake-quant modes, and clear errors for bad configs.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import BASES, MIN_ADAPTER_EFFECT, make_base, make_inputs, randomize_adapters
from torch import nn

from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import fake_quantize_activation, fake_quantize_weight
from edgelora.layers import AdaptedLinear
from edgelora.model import AdapterModel, base_state_dict

ADAPTERS = {
    "lora": LoraConfig(r=4, alpha=8.0),
    "lora_mlp": LoraConfig(r=2, alpha=4.0, include_mlp=True),
    "bottleneck": BottleneckConfig(reduction_factor=4, placement="houlsby", activation="gelu"),  # no dead units
}
LABELS = ["neg", "pos"]
# Merged vs unmerged float32: W x + s B (A x) and (W + s B A) x round differently, a few ulps per
# layer on hidden states of size ~1 after LayerNorm; measured <= 9e-7 over two layers, >10x headroom.
MERGE_ATOL = 1e-5
# Conv1D (addmm on W) vs nn.Linear (matmul on W^T) may sum in a different order: measured 0 here
# (same BLAS kernel), but a few ulps are legitimate on other builds.
CONV1D_ATOL = 1e-6


def hidden(model: AdapterModel, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(**feeds)  # (batch, hidden)


def plain_hidden(base: nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    return AdapterModel.encode.__get__(_Holder(base))(**feeds).detach()


class _Holder:
    """Lets `AdapterModel.encode` run on a bare base without wrapping anything."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base


def adapted(kind: str, adapter: str = "lora", seed: int = 0) -> tuple[AdapterModel, dict[str, torch.Tensor]]:
    model = AdapterModel(make_base(kind))
    model.add_adapter("a", ADAPTERS[adapter], LABELS)
    randomize_adapters(model, seed=seed)
    return model, make_inputs(kind)


def assert_adapter_matters(model: AdapterModel, feeds: dict[str, torch.Tensor]) -> None:
    with model.disable_adapter():
        without = hidden(model, feeds)
    effect = (hidden(model, feeds) - without).abs().max().item()
    assert effect > MIN_ADAPTER_EFFECT, f"adapter barely changes the output ({effect:.1e}); the test would prove nothing"


# --- identity, merge, unmerge --------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("kind", BASES)
def test_adding_an_adapter_keeps_outputs(kind: str, adapter: str) -> None:
    base = make_base(kind)
    feeds = make_inputs(kind)
    before = plain_hidden(base, feeds)
    model = AdapterModel(base)
    model.add_adapter("a", ADAPTERS[adapter], LABELS)
    assert model.active == "a" and any(True for _ in model.adapted_layers())
    atol = CONV1D_ATOL if kind == "gpt2" else 0.0  # GPT-2's Conv1D became an equal nn.Linear
    torch.testing.assert_close(hidden(model, feeds), before, rtol=0, atol=atol)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("kind", BASES)
def test_merged_equals_unmerged(kind: str, adapter: str) -> None:
    model, feeds = adapted(kind, adapter)
    assert_adapter_matters(model, feeds)
    unmerged = hidden(model, feeds)
    model.merge()
    if adapter.startswith("lora"):
        assert all(layer.merged == "a" for _, layer in model.adapted_layers() if "a" in layer.lora_A)
    else:  # a bottleneck runs in series after the layer: nothing to fold, it stays a live branch
        assert all(layer.merged is None for _, layer in model.adapted_layers())
    torch.testing.assert_close(hidden(model, feeds), unmerged, rtol=0, atol=MERGE_ATOL)


@pytest.mark.parametrize("kind", BASES)
def test_unmerge_restores_base_weights_bit_for_bit(kind: str) -> None:
    model, feeds = adapted(kind)
    before = {k: v.clone() for k, v in base_state_dict(model.base).items()}
    unmerged = hidden(model, feeds)
    model.merge()
    changed = [k for k, v in base_state_dict(model.base).items() if not torch.equal(v, before[k])]
    assert changed, "merge changed no base weight"
    model.unmerge()
    after = base_state_dict(model.base)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(hidden(model, feeds), unmerged)


@pytest.mark.parametrize("kind", BASES)
def test_merging_twice_is_a_no_op(kind: str) -> None:
    model, feeds = adapted(kind)
    model.merge()
    once = {k: v.clone() for k, v in base_state_dict(model.base).items()}
    out_once = hidden(model, feeds)
    model.merge()
    assert all(torch.equal(v, once[k]) for k, v in base_state_dict(model.base).items())
    assert torch.equal(hidden(model, feeds), out_once)
    model.unmerge()
    model.unmerge()  # and unmerging twice too
    model.merge()
    torch.testing.assert_close(hidden(model, feeds), out_once, rtol=0, atol=0)


# --- gradients ----------------------------------------------------------------------------------------

_ADAPTER_PARAM = re.compile(r"\.(lora_A|lora_B|bottleneck)\.([^.]+)\.")


def _owner(param_name: str) -> str:
    """'a' / 'b' for an adapter's or a head's parameter, 'base' for the frozen base."""
    if param_name.startswith("heads."):
        return param_name.split(".")[1]
    found = _ADAPTER_PARAM.search(param_name)
    return found.group(2) if found else "base"


@pytest.mark.parametrize("adapter", ["lora", "bottleneck"])
@pytest.mark.parametrize("kind", BASES)
def test_only_active_adapter_and_head_get_gradients(kind: str, adapter: str) -> None:
    model = AdapterModel(make_base(kind))
    model.add_adapter("a", ADAPTERS[adapter], LABELS)
    model.add_adapter("b", ADAPTERS["lora" if adapter == "bottleneck" else "bottleneck"], LABELS)
    randomize_adapters(model)
    model.set_adapter("a")
    feeds = make_inputs(kind)
    logits, _ = model(**feeds)
    F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    owners: dict[str, list[str]] = {"a": [], "b": [], "base": []}
    for name, p in model.named_parameters():
        owner = _owner(name)
        owners[owner].append(name)
        if owner == "a":
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert all(owners.values()), owners  # each group was found
    assert sorted(id(p) for p in model.trainable_parameters()) == sorted(
        id(p) for n, p in model.named_parameters() if _owner(n) == "a"
    )


# --- several named adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BASES)
def test_set_disable_and_delete_named_adapters(kind: str) -> None:
    base = make_base(kind)
    feeds = make_inputs(kind)
    plain = plain_hidden(base, feeds)
    model = AdapterModel(base)
    model.add_adapter("a", ADAPTERS["lora"], LABELS)
    model.add_adapter("b", ADAPTERS["bottleneck"], ["x", "y", "z"])
    randomize_adapters(model)
    assert model.active == "b"  # the newest adapter is active
    out_b = hidden(model, feeds)
    model.set_adapter("a")
    out_a = hidden(model, feeds)
    assert (out_a - plain).abs().max() > MIN_ADAPTER_EFFECT and (out_b - plain).abs().max() > MIN_ADAPTER_EFFECT
    assert (out_a - out_b).abs().max() > MIN_ADAPTER_EFFECT
    assert model(**feeds)[0].shape == (3, 2)
    with model.disable_adapter():
        assert model.active is None
        torch.testing.assert_close(hidden(model, feeds), plain, rtol=0, atol=CONV1D_ATOL)
        assert model(**feeds)[0].shape == (3, 0)  # no adapter, no head
    assert model.active == "a" and torch.equal(hidden(model, feeds), out_a)
    model.set_adapter("b")
    assert torch.equal(hidden(model, feeds), out_b) and model(**feeds)[0].shape == (3, 3)

    model.delete_adapter("a")
    assert sorted(model.configs) == ["b"] and sorted(model.heads) == ["b"] and model.active == "b"
    assert all("a" not in layer.adapter_names for _, layer in model.adapted_layers())
    assert torch.equal(hidden(model, feeds), out_b)
    model.delete_adapter("b")
    assert model.active is None and not model.configs
    torch.testing.assert_close(hidden(model, feeds), plain, rtol=0, atol=CONV1D_ATOL)
    with pytest.raises(EdgeloraError, match=r"unknown adapter 'b'; this model has none"):
        model.set_adapter("b")


def test_deleting_a_merged_adapter_restores_the_base() -> None:
    model, feeds = adapted("bert")
    before = {k: v.clone() for k, v in base_state_dict(model.base).items()}
    model.merge()
    model.delete_adapter("a")
    assert all(torch.equal(v, before[k]) for k, v in base_state_dict(model.base).items())


def test_adapter_errors_name_the_adapter() -> None:
    model, feeds = adapted("bert")
    with pytest.raises(EdgeloraError, match=r"unknown adapter 'nope'; this model has \['a'\]"):
        model.set_adapter("nope")
    with pytest.raises(EdgeloraError, match=r"unknown adapter 'nope'"):
        model.delete_adapter("nope")
    with pytest.raises(EdgeloraError, match=r"adapter 'a' already exists"):
        model.add_adapter("a", ADAPTERS["lora"], LABELS)
    with pytest.raises(EdgeloraError, match=r"adapter name 'a b' must be letters, digits"):
        model.add_adapter("a b", ADAPTERS["lora"], LABELS)
    with pytest.raises(EdgeloraError, match=r"needs at least 2 labels, got 1"):
        model.add_adapter("c", ADAPTERS["lora"], ["only"])
    model.add_adapter("c", ADAPTERS["lora"], LABELS)
    model.set_adapter("a")
    model.merge()
    model.set_adapter("c")
    with pytest.raises(EdgeloraError, match=r"adapter 'a' is merged into the base weights; unmerge it before activating 'c'"):
        hidden(model, feeds)


# --- fake quantization: merged vs switchable ----------------------------------------------------------


def _one_layer(quant: QuantConfig) -> tuple[AdaptedLinear, torch.Tensor]:
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(16, 12))
    layer.add_lora("a", LoraConfig(r=4, alpha=8.0))
    randomize_adapters(layer)
    layer.active = "a"
    layer.quant = quant
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return layer, x


# The switchable layer and the reference compute the same float branch, perhaps in another order (the layer's
# dropout/scaling path vs x @ A.T @ B.T here): equal on this CPU (measured 0), 1e-6 leaves other kernels room.
BRANCH_ATOL = 1e-6


@pytest.mark.parametrize("activations", ["dynamic", "none"])
@pytest.mark.parametrize("bits", [8, 7])
@pytest.mark.parametrize("mode", ["merged", "switchable"])
def test_fake_quantization_sees_the_weights_each_mode_deploys(mode: str, bits: int, activations: str) -> None:
    """merged: the merged weight W0 + s*BA is quantized, exactly what merging then quantizing gives;
    switchable: only the base W0 is, and the adapter branch stays float on the float input."""
    layer, x = _one_layer(QuantConfig(weight_bits=bits, activations=activations, mode=mode))
    W0, b = layer.base.weight, layer.base.bias
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    xq = fake_quantize_activation(x) if activations == "dynamic" else x
    scaling = 2.0  # alpha / r = 8 / 4
    if mode == "merged":
        expected = F.linear(xq, fake_quantize_weight(W0 + scaling * (B @ A), bits), b)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        layer.merge()  # what training saw is exactly what merging and quantizing gives
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    else:
        expected = F.linear(xq, fake_quantize_weight(W0, bits), b) + scaling * ((x @ A.T) @ B.T)
        torch.testing.assert_close(layer(x), expected, rtol=BRANCH_ATOL, atol=BRANCH_ATOL)
        merged_layer, _ = _one_layer(QuantConfig(weight_bits=bits, activations=activations, mode="merged"))
        assert (merged_layer(x) - layer(x)).abs().max() > 1e-4  # the two modes quantize different tensors


def test_set_quant_wraps_every_quantizable_layer_and_off_restores_float() -> None:
    model, feeds = adapted("bert")
    float_out = hidden(model, feeds)
    model.set_quant(QuantConfig(weight_bits=7))
    assert sorted(n for n, _ in model.adapted_layers()) == sorted(model.quantizable_names())
    assert all(layer.quant == QuantConfig(weight_bits=7) for _, layer in model.adapted_layers())
    quant_out = hidden(model, feeds)
    assert 0 < (quant_out - float_out).abs().max() < 0.2  # rounding-sized, not broken
    model.set_quant(None)
    torch.testing.assert_close(hidden(model, feeds), float_out, rtol=0, atol=0)


# --- scaling and configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora, expected", [(False, 0.5), (True, 2.0)])
def test_lora_scaling_alpha_over_r_or_sqrt_r(rslora: bool, expected: float) -> None:
    config = LoraConfig(r=16, alpha=8.0, use_rslora=rslora)
    assert config.scaling == expected
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(24, 20))
    layer.add_lora("a", config)
    randomize_adapters(layer)
    layer.active = "a"
    assert layer.scaling["a"] == expected
    x = torch.randn(3, 24)
    branch = layer(x) - layer.base(x)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(branch, expected * (x @ A.T @ B.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_delta("a"), expected * (B @ A))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LoraConfig(r=0), r"r=0 must be a positive integer"),
        (lambda: LoraConfig(r=2.5), r"r=2.5 must be a positive integer"),
        (lambda: LoraConfig(alpha=0), r"alpha=0 must be positive"),
        (lambda: LoraConfig(alpha=-1.0), r"alpha=-1.0 must be positive"),
        (lambda: LoraConfig(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (lambda: LoraConfig(target_modules=()), r"target_modules=\(\) adapts nothing"),
        (lambda: BottleneckConfig(placement="middle"), r"placement='middle' is not supported; choose from houlsby, pfeiffer"),
        (lambda: BottleneckConfig(reduction_factor=0), r"reduction_factor=0 must be a positive integer"),
        (lambda: BottleneckConfig(activation="tanh"), r"activation='tanh' is not supported; choose from relu, gelu, silu"),
        (lambda: QuantConfig(mode="both"), r"mode='both' is not supported; choose from merged, switchable"),
        (lambda: QuantConfig(activations="per_token"),
         r"activations='per_token' is not supported; choose from dynamic, static, none"),
    ],
)
def test_bad_configs_are_refused(make, message: str) -> None:
    with pytest.raises(EdgeloraError, match=message):
        make()


@pytest.mark.parametrize("kind", BASES)
def test_unknown_target_module_is_refused_and_nothing_is_added(kind: str) -> None:
    model = AdapterModel(make_base(kind))
    with pytest.raises(EdgeloraError, match=r"target_modules=\('nonexistent',\) matched no linear layer of \w+Model"):
        model.add_adapter("a", LoraConfig(target_modules=("nonexistent",)), LABELS)
    assert not model.configs and not list(model.adapted_layers())


def test_target_modules_pick_layers_by_suffix() -> None:
    model = AdapterModel(make_base("bert"))
    model.add_adapter("a", LoraConfig(r=2, target_modules=("query", "value")), LABELS)
    adapted_names = [n for n, layer in model.adapted_layers() if "a" in layer.lora_A]
    assert adapted_names == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]


@pytest.mark.parametrize("placement, per_layer", [("pfeiffer", 1), ("houlsby", 2)])
def test_bottleneck_placement(placement: str, per_layer: int) -> None:
    model = AdapterModel(make_base("llama"))
    model.add_adapter("a", BottleneckConfig(reduction_factor=8, placement=placement), LABELS)
    names = [n for n, layer in model.adapted_layers() if "a" in layer.bottleneck]
    assert len(names) == 2 * per_layer and all(n.endswith(("mlp.down_proj", "self_attn.o_proj")) for n in names)
    assert model.base.get_submodule(names[0]).bottleneck["a"].down.out_features == 32 // 8


# --- GPT-2's Conv1D ------------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_are_wrapped_with_the_same_output() -> None:
    base = make_base("gpt2")
    feeds = make_inputs("gpt2")
    before = plain_hidden(base, feeds)
    convs = {n: m for n, m in base.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(convs) == 8
    x = {n: torch.randn(2, 3, m.weight.shape[0]) for n, m in convs.items()}
    conv_out = {n: m(x[n]).detach() for n, m in convs.items()}
    model = AdapterModel(base)
    model.add_adapter("a", LoraConfig(r=2, include_mlp=True), LABELS)
    model.set_quant(None)
    layers = dict(model.adapted_layers())
    assert sorted(layers) == sorted(convs)  # every Conv1D became an AdaptedLinear ...
    for name, layer in layers.items():
        assert isinstance(layer.base, nn.Linear)
        assert torch.equal(layer.base.weight, convs[name].weight.t())  # ... holding the transpose
        torch.testing.assert_close(layer(x[name]), conv_out[name], rtol=0, atol=CONV1D_ATOL)
    torch.testing.assert_close(hidden(model, feeds), before, rtol=0, atol=CONV1D_ATOL)
    randomize_adapters(model)
    assert_adapter_matters(model, feeds)


@pytest.mark.parametrize("mode", ["merged", "switchable"])
def test_the_int8_weight_kept_for_inference_follows_every_weight_change(mode: str) -> None:
    """Without autograd the fake-quantized weight is computed once, and again whenever a weight changes: after
    an optimizer step on the LoRA, an in-place edit of the base, or a switch of the active adapter."""
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(64, 48))
    layer.quant = QuantConfig(mode=mode)
    layer.add_lora("a", LoraConfig(r=4))
    layer.add_lora("b", LoraConfig(r=4))
    for name in ("a", "b"):
        nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    x = torch.randn(5, 64)

    def fresh(name: str) -> torch.Tensor:  # the same forward with autograd on: nothing kept
        layer.active = name
        with torch.enable_grad():
            return layer(x).detach()

    def kept(name: str) -> torch.Tensor:
        layer.active = name
        with torch.no_grad():
            return layer(x)

    assert torch.equal(kept("a"), fresh("a"))
    kept("a")
    first = layer._int8_cache
    kept("a")
    assert layer._int8_cache is first  # reused, not recomputed
    optimizer = torch.optim.SGD([layer.lora_A["a"].weight, layer.lora_B["a"].weight], lr=0.5)
    layer.active = "a"
    layer(x).sum().backward()
    kept("a")  # kept from before the step
    optimizer.step()
    after_step = kept("a")
    assert torch.equal(after_step, fresh("a"))
    kept("a")
    with torch.no_grad():
        layer.base.weight.mul_(1.5)  # in place: same storage, a new version
    after_edit = kept("a")
    assert torch.equal(after_edit, fresh("a")) and not torch.equal(after_edit, after_step)
    kept("a")
    assert torch.equal(kept("b"), fresh("b"))
    assert not torch.equal(kept("a"), kept("b"))
