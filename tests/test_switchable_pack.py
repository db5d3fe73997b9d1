"""Claims about packed q, k, v in switchable graphs (exporters/switchable_pack.py).

`pack_slots` turns per-layer LoRA factors into one packed pair whose product is, column block by column
block, each layer's own product (and exact zeros for a layer the adapter leaves alone); a bundle packed
that way runs an adapter on only some of q, k, v (PEFT's default for BERT is query and value) beside one on
all three, in one mixed batch, as the torch model does; an adapter that does not fit a packed slot is
refused in one line naming its tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FP32_ATOL, make_inputs, max_abs, randomize_adapters

from edgelora.config import LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.add import add_adapters
from edgelora.exporters.export import export_bundle
from edgelora.exporters.switchable_pack import Pack, pack_slots, packs_of
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import save_adapter
from edgelora.runtime import Runtime

LAYERS = ("l.q", "l.k", "l.v")
WIDTHS = (6, 2, 2)  # grouped-query shaped: q wider than k and v


def _per_layer(rng: np.random.Generator, ranks: dict[str, int], bank: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    out = {}
    for layer, rank in ranks.items():
        width = WIDTHS[LAYERS.index(layer)]
        out[f"model.base.{layer}.lora_A"] = rng.standard_normal((*bank, 5, rank)).astype(np.float32)
        out[f"model.base.{layer}.lora_B"] = rng.standard_normal((*bank, rank, width)).astype(np.float32)
    return out


@pytest.mark.parametrize("bank", [(), (3,)], ids=["one-adapter", "bank"])
def test_packed_product_is_each_layers_product_side_by_side(bank: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    pack = Pack("l.q+k+v", LAYERS, WIDTHS, LAYERS)
    values = _per_layer(rng, {"l.q": 2, "l.v": 3}, bank)  # k left alone, the ranks differ
    values["model.base.l.o.lora_A"] = np.ones((*bank, 5, 1), np.float32)  # outside the pack: passes through
    packed = pack_slots(values, {pack.name: pack})
    assert sorted(packed) == ["model.base.l.o.lora_A", "model.base.l.q+k+v.lora_A", "model.base.l.q+k+v.lora_B"]
    a, b = packed["model.base.l.q+k+v.lora_A"], packed["model.base.l.q+k+v.lora_B"]
    assert a.shape == (*bank, 5, 5) and b.shape == (*bank, 5, sum(WIDTHS))
    x = rng.standard_normal((4, 5)).astype(np.float32)
    got = np.split(x @ a @ b, np.cumsum(WIDTHS)[:-1], axis=-1)
    for layer, part in zip(LAYERS, got):
        if layer == "l.k":
            assert not part.any()  # exact zeros: B's off-diagonal blocks are zero
            continue
        want = x @ values[f"model.base.{layer}.lora_A"] @ values[f"model.base.{layer}.lora_B"]
        np.testing.assert_allclose(part, want, rtol=1e-5, atol=1e-5)  # float32 sums of up to 5 terms


def test_pack_slots_refuses_factors_that_do_not_chain() -> None:
    pack = Pack("l.q+k+v", LAYERS, WIDTHS, LAYERS)
    values = _per_layer(np.random.default_rng(1), {"l.q": 2})
    values["model.base.l.q.lora_B"] = values["model.base.l.q.lora_B"][:1]  # rank 1 against A's 2
    with pytest.raises(EdgeloraError, match=r"^adapters/x: LoRA of l\.q has lora_A \(5, 2\) and lora_B \(1, 6\); "
                                            r".*the adapter is for another base$"):
        pack_slots(values, {pack.name: pack}, "adapters/x")


@pytest.fixture(scope="module")
def partial(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters: "all" on q, k, v and o; "qv" on query and value only (PEFT's BERT default), rank 2."""
    torch.manual_seed(0)
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("all", LoraConfig(r=4, alpha=8.0), labels=["a", "b"])
    model.add_adapter("qv", LoraConfig(r=2, alpha=4.0, target_modules=("query", "value")), labels=["x", "y", "z"])
    randomize_adapters(model)
    root = tmp_path_factory.mktemp("partial")
    return {name: save_adapter(model, name, root / name) for name in ("all", "qv")}


def _reference(base: Path, adapters: dict[str, Path]) -> AdapterModel:
    from edgelora.peft_format import load_adapter

    model = AdapterModel(load_base(base)[0])
    for name, path in adapters.items():
        load_adapter(model, path, name)
    return model.eval()


def _torch(model: AdapterModel, feeds: dict[str, np.ndarray], adapter: str) -> np.ndarray:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[1].numpy()


def test_a_partial_adapter_beside_a_full_one_in_a_packed_bundle(tiny_bert_dir, partial, tmp_path: Path) -> None:
    out = tmp_path / "b"
    manifest = export_bundle(str(tiny_bert_dir), partial, mode="switchable", precision="fp32", out=out).to_dict()
    packs = packs_of(manifest["slots"])
    assert len(packs) == 2 and all(len(p.lora) == 3 for p in packs.values()), manifest["slots"]
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("Split") == 2
    reference = _reference(tiny_bert_dir, partial)
    feeds = {k: v.numpy() for k, v in make_inputs("bert", batch=4).items()}
    rows = ["qv", "all", None, "qv"]
    got = Runtime(out, intra_op_threads=1, allow_spinning=False).run(feeds, adapters=rows)["embeddings"]
    for i, name in enumerate(rows):
        want = _torch(reference, {k: v[i:i + 1] for k, v in feeds.items()}, name)
        assert max_abs(got[i:i + 1], want) <= FP32_ATOL, name


def test_a_partial_adapter_joins_a_packed_bundle_and_a_misfit_is_refused(tiny_bert_dir, partial,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "b"
    export_bundle(str(tiny_bert_dir), {"all": partial["all"]}, mode="switchable", precision="fp32", out=out)
    add_adapters(out, {"qv": partial["qv"]})
    assert json.loads((out / "manifest.json").read_text())["bank"]["adapters"] == ["all", "qv", None]
    reference = _reference(tiny_bert_dir, partial)
    feeds = {k: v.numpy() for k, v in make_inputs("bert", batch=2).items()}
    got = Runtime(out, intra_op_threads=1, allow_spinning=False).run(feeds, adapter="qv")["embeddings"]
    assert max_abs(got, _torch(reference, feeds, "qv")) <= FP32_ATOL

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in partial["qv"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in weights if "layer.0.attention.self.value.lora_B" in k)
    weights[key] = torch.cat([weights[key], weights[key][:1]])  # one output more than value has
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EdgeloraError, match=rf"^{bad}: {key} has shape \(2, \d+\), which does not fit bundle {out}'s "
                                            r"input model\.base\..*query\+key\+value\.lora_B \(its part \(r, \d+\)\); "
                                            r"the adapter is for another base$"):
        add_adapters(out, {"qv2": bad})
