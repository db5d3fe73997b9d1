"""Claims about adapter directories in PEFT's layout: round trips, PEFT interop both ways, and one-line
refusals for another base, another shape, corrupt files and missing paths.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import peft
import pytest
import torch
from conftest import BASES, MIN_ADAPTER_EFFECT, make_base, make_inputs, randomize_adapters
from safetensors.torch import load_file, save_file

from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, read_adapter, save_adapter
from edgelora.tokenize import load_tokenizer

ADAPTERS = {
    "lora": LoraConfig(r=4, alpha=8.0),
    "bottleneck": BottleneckConfig(reduction_factor=4, placement="houlsby", activation="gelu"),
}
LABELS = ["neg", "neutral", "pos"]
# PEFT vs edgelora on the same weights: W x + s (B (A x)) on both sides; measured exactly 0 with peft 0.21,
# but PEFT may reorder the scaling or the sum in another version, which moves a few ulps (~1e-7).
PEFT_ATOL = 1e-5
# PEFT warns (and ignores) our extra JSON section; that is the design, not a failure.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Unexpected keyword arguments \['edgelora'\]:UserWarning", "ignore::FutureWarning"
)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, as `AdapterModel.encode` pools."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1)


def saved(tmp_path: Path, kind: str = "bert", adapter: str = "lora", quant: QuantConfig | None = None):
    """A randomized adapter 'task' saved from a model over make_base(kind); returns (model, dir, feeds)."""
    model = AdapterModel(make_base(kind))
    model.add_adapter("task", ADAPTERS[adapter], LABELS, quant=quant)
    randomize_adapters(model)
    out = save_adapter(model, "task", tmp_path / "adapter")
    return model, out, make_inputs(kind)


def assert_adapter_matters(model: AdapterModel, feeds: dict[str, torch.Tensor]) -> None:
    with torch.no_grad(), model.disable_adapter():
        without = model.encode(**feeds)
    with torch.no_grad():
        effect = (model.encode(**feeds) - without).abs().max().item()
    assert effect > MIN_ADAPTER_EFFECT, f"adapter barely changes the output ({effect:.1e})"


def assert_nothing_added(model: AdapterModel) -> None:
    assert not model.configs and not model.heads
    assert all(not layer.adapter_names for _, layer in model.adapted_layers())


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("kind", BASES)
def test_save_then_load_gives_identical_outputs(tmp_path: Path, kind: str, adapter: str) -> None:
    model, path, feeds = saved(tmp_path, kind, adapter)
    assert_adapter_matters(model, feeds)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    fresh = AdapterModel(make_base(kind))
    assert load_adapter(fresh, path) == "task"
    assert fresh.active == "task" and fresh.labels["task"] == LABELS
    # a loaded LoRA names exactly the layers its file holds; everything else in the config is unchanged
    loaded = fresh.configs["task"]
    if adapter == "lora":
        assert loaded.target_modules == tuple(sorted(n for n, layer in fresh.adapted_layers() if "task" in layer.lora_A))
        loaded = dataclasses.replace(loaded, target_modules=None)
    assert loaded == model.configs["task"]
    with torch.no_grad():
        want, got = model(**feeds), fresh(**feeds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_adapter_from_memory_loads_onto_the_same_base_read_from_disk(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """save_pretrained -> load_base keeps every base weight, so the fingerprint (and the adapter) still fit."""
    model, path, feeds = saved(tmp_path)
    base, _ = load_base(tiny_bert_dir)
    from_disk = AdapterModel(base)
    assert from_disk.base_fingerprint == model.base_fingerprint == AdapterModel(load_base(tiny_bert_dir)[0]).base_fingerprint
    load_adapter(from_disk, path)
    with torch.no_grad():
        assert torch.equal(from_disk(**feeds)[0], model(**feeds)[0])
    assert load_tokenizer(tiny_bert_dir).encode("alpha w3").tokens == ["[CLS]", "alpha", "w3", "[SEP]"]


def test_quantization_recipe_travels_with_the_adapter(tmp_path: Path) -> None:
    recipe = QuantConfig(weight_bits=7, mode="switchable")
    model, path, feeds = saved(tmp_path, quant=recipe)
    fresh = AdapterModel(make_base("bert"))
    load_adapter(fresh, path, name="renamed")
    assert fresh.quant == recipe and fresh.active == "renamed"
    assert all(layer.quant == recipe for _, layer in fresh.adapted_layers())
    with torch.no_grad():
        assert torch.equal(fresh(**feeds)[0], model(**feeds)[0])


def test_saving_over_an_adapter_replaces_it_and_a_failed_save_keeps_it(tmp_path: Path, monkeypatch) -> None:
    model, path, feeds = saved(tmp_path)
    first = (path / WEIGHTS_FILE).read_bytes()
    randomize_adapters(model, seed=1)
    save_adapter(model, "task", path)
    assert (path / WEIGHTS_FILE).read_bytes() != first

    import edgelora.peft_format as pf

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pf, "save_file", broken_save)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    randomize_adapters(model, seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, "task", path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    with pytest.raises(EdgeloraError, match=r"unknown adapter 'nope'; this model has \['task'\]"):
        save_adapter(model, "nope", tmp_path / "other")


# --- refusals ---------------------------------------------------------------------------------------------


def test_another_base_is_refused_naming_the_path(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    other = AdapterModel(make_base("bert", seed=1))  # same architecture, other weights
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path))}: adapter was trained on another base"):
        load_adapter(other, path)
    assert_nothing_added(other)


def test_another_shape_is_refused_even_without_the_base_check(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    import transformers as tf

    wide = tf.BertModel(
        tf.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    model = AdapterModel(wide)
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path))}: .* has shape \(4, 32\) but this base needs \(4, 48\)"):
        load_adapter(model, path, check_base=False)
    assert_nothing_added(model)


def test_edited_rank_is_refused(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    tensors = load_file(str(path / WEIGHTS_FILE))
    key = next(k for k in tensors if k.endswith("query.lora_A.weight"))
    tensors[key] = torch.zeros(6, tensors[key].shape[1])  # rank 6 where the config says 4
    save_file(tensors, str(path / WEIGHTS_FILE))
    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=r"lora_A\.task\.weight has shape \(6, 32\) but this base needs \(4, 32\); the adapter is for another base or rank"):
        load_adapter(model, path)
    assert_nothing_added(model)


def test_layers_the_base_does_not_have_are_refused(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    model = AdapterModel(make_base("distilbert"))
    with pytest.raises(EdgeloraError, match=r"adapter targets layers this base does not have \(encoder\.layer\.0"):
        load_adapter(model, path, check_base=False)
    assert_nothing_added(model)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors_is_refused(tmp_path: Path, damage: str) -> None:
    _, path, _ = saved(tmp_path)
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x00not safetensors" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(weights))}: corrupt or truncated safetensors file"):
        load_adapter(AdapterModel(make_base("bert")), path)


@pytest.mark.parametrize("text", ["{not json", "\xff\xfe", ""])
def test_corrupt_json_is_refused(tmp_path: Path, text: str) -> None:
    _, path, _ = saved(tmp_path)
    (path / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path / CONFIG_FILE))}: corrupt JSON"):
        read_adapter(path)


def test_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    (path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(EdgeloraError, match=r"adapter_config\.json: expected a JSON object"):
        read_adapter(path)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    data = json.loads((path / CONFIG_FILE).read_text())
    data["edgelora"]["format_version"] = 99
    (path / CONFIG_FILE).write_text(json.dumps(data))
    with pytest.raises(EdgeloraError, match=r"written by a newer edgelora \(format 99\); upgrade edgelora"):
        read_adapter(path)


def test_missing_paths_are_refused(tmp_path: Path) -> None:
    model = AdapterModel(make_base("bert"))
    missing = tmp_path / "nowhere"
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(missing))}: adapter directory does not exist$"):
        load_adapter(model, missing)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(EdgeloraError, match=r"file\.txt: expected an adapter directory"):
        load_adapter(model, a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeloraError, match=r"empty: not an adapter directory \(no adapter_config\.json\)"):
        load_adapter(model, empty)
    _, path, _ = saved(tmp_path)
    (path / WEIGHTS_FILE).unlink()
    (path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(EdgeloraError, match=r"missing adapter_model\.safetensors \(adapter_model\.bin found"):
        load_adapter(model, path)
    assert_nothing_added(model)


# --- PEFT interop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_loads_into_edgelora(tmp_path: Path, rslora: bool) -> None:
    peft_model = peft.get_peft_model(
        make_base("bert"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False, use_rslora=rslora),
    ).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    feeds = make_inputs("bert")
    with torch.no_grad():
        want = pooled(peft_model(**feeds).last_hidden_state, feeds["attention_mask"])
        with peft_model.disable_adapter():
            plain = pooled(peft_model(**feeds).last_hidden_state, feeds["attention_mask"])
    assert (want - plain).abs().max() > MIN_ADAPTER_EFFECT

    ours = AdapterModel(make_base("bert"))
    assert load_adapter(ours, tmp_path / "peft") == "peft"
    layers = sorted(n for n, layer in ours.adapted_layers() if "peft" in layer.lora_A)
    assert layers == [f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    assert ours.configs["peft"].scaling == (4.0 if rslora else 2.0)
    with torch.no_grad():
        got = ours.encode(**feeds)
    torch.testing.assert_close(got, want, rtol=0, atol=PEFT_ATOL)


@pytest.mark.parametrize("rslora", [False, True])
def test_edgelora_lora_loads_in_peft(tmp_path: Path, rslora: bool) -> None:
    model = AdapterModel(make_base("bert"))
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0, use_rslora=rslora, include_mlp=True), LABELS)
    randomize_adapters(model)
    feeds = make_inputs("bert")
    assert_adapter_matters(model, feeds)
    path = save_adapter(model, "task", tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(make_base("bert"), path).eval()
    assert peft_model.peft_config["default"].use_rslora is rslora
    with torch.no_grad():
        got = pooled(peft_model(**feeds).last_hidden_state, feeds["attention_mask"])
        want = model.encode(**feeds)
    torch.testing.assert_close(got, want, rtol=0, atol=PEFT_ATOL)


def test_peft_dora_is_refused(tmp_path: Path) -> None:
    """DoRA rescales each column by a learned magnitude; loading it as plain LoRA would be silently wrong."""
    peft.get_peft_model(
        make_base("bert"), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True)
    ).save_pretrained(tmp_path / "dora")
    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=r"adapter_config\.json: DoRA is not supported; give a plain LoRA adapter"):
        load_adapter(model, tmp_path / "dora")
    assert_nothing_added(model)


def test_peft_per_layer_alpha_is_refused(tmp_path: Path) -> None:
    peft.get_peft_model(
        make_base("bert"), peft.LoraConfig(r=2, target_modules=["query", "value"], alpha_pattern={"value": 32})
    ).save_pretrained(tmp_path / "pattern")
    with pytest.raises(EdgeloraError, match=r"per-layer alpha \(alpha_pattern\) is not supported"):
        load_adapter(AdapterModel(make_base("bert")), tmp_path / "pattern")


def test_other_peft_methods_are_refused(tmp_path: Path) -> None:
    _, path, _ = saved(tmp_path)
    (path / CONFIG_FILE).write_text(json.dumps({"peft_type": "IA3", "target_modules": ["query"]}))
    with pytest.raises(EdgeloraError, match=r"peft_type 'IA3' is not supported; only LoRA adapters load from PEFT"):
        load_adapter(AdapterModel(make_base("bert")), path)
