"""Claims about fusing switchable graphs, and about rewriting a bundle through the one bundle writer.

A switchable BERT graph gets ORT's attention fusion with its float adapter branches lifted out and
joined again: the fused graph computes what the unfused one does, for any padding side and any mix of
adapters per row. What cannot be joined again, and every base ORT's BERT fusions do not fit, stays
unfused with a note in the manifest. Layers with no adapter on q, k, v get the merged graphs' packed
Attention (int8: QAttention). `edgelora add-adapter` rewrites a bundle with `edgelora.runtime.bundle.write_bundle`,
carrying its unchanged files over as hard links.
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import (MIN_ADAPTER_EFFECT, VOCAB_SIZE, WEIGHT_BITS, make_base, make_inputs, randomize_adapters,
                      unread_initializers, write_tokenizer)

from edgelora.config import BottleneckConfig, LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters import fusion, switchable_fusion, validate
from edgelora.exporters.add import add_adapters
from edgelora.exporters.export import export_bundle
from edgelora.exporters.onnx_graph import export_graph
from edgelora.exporters.switchable import make_slots_inputs, slot_plan
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import save_adapter
from edgelora.runtime import Runtime
from edgelora.runtime.bundle import read_manifest, write_bundle

# Fused vs unfused fp32 graph: the same float ops in another order (measured ~3e-7 relative here); the
# fusion's own acceptance bound, so a graph this test accepts is one the exporter keeps fused.
FUSED_REL_TOL = fusion.FUSED_REL_TOL


def _switchable_graph(model: AdapterModel, names: list[str]):
    graph = export_graph(model, mode="switchable", adapter=None, slots=slot_plan(model, names))
    make_slots_inputs(graph)
    return graph


def _outputs(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return fusion.run_graph(proto, feeds)[0]


def _relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(a, b) if x.size)


@pytest.fixture(scope="module")
def lora_model() -> AdapterModel:
    torch.manual_seed(0)
    model = AdapterModel(make_base("bert"))
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["a", "b"])
    model.add_adapter("bn", BottleneckConfig(reduction_factor=4, placement="houlsby", activation="gelu"),
                      labels=["x", "y"])
    randomize_adapters(model)
    return model


def test_fused_switchable_graph_equals_unfused_for_either_padding_and_mixed_rows(lora_model) -> None:
    graph = _switchable_graph(lora_model, ["lo", "bn"])
    unfused = copy.deepcopy(graph.model)
    feeds = validate.generated_feeds(VOCAB_SIZE, graph.feeds, batch=6)
    result = switchable_fusion.fuse_switchable(graph, lora_model, feeds)
    assert result.applied.get("ai.onnx.Attention") == 2, result.note
    left = {k: v.copy() for k, v in feeds.items()}
    left["attention_mask"] = left["attention_mask"][:, ::-1].copy()  # left padding: real tokens at the end
    bank = switchable_fusion.random_bank(unfused, batch=6)  # random adapters, one per row, cycling through three
    plain = _outputs(unfused, left)
    for check in (feeds, left, {**feeds, **bank}, {**left, **bank}):
        want, got = _outputs(unfused, check), _outputs(graph.model, check)
        assert _relative(want, got) <= FUSED_REL_TOL
    moved = float(np.abs(_outputs(unfused, {**left, **bank})[1] - plain[1]).max())
    assert moved >= MIN_ADAPTER_EFFECT  # the random bank does reach the outputs


def test_a_branch_that_cannot_join_again_leaves_the_graph_unfused_with_a_note(lora_model) -> None:
    """A branch reading the biased query (not its input) cannot join before the bias the attention core adds."""
    graph = _switchable_graph(lora_model, ["lo"])
    layer = "encoder.layer.0.attention.self.query"
    nodes = list(graph.model.graph.node)
    projection = next(n for n in nodes if n.op_type == "MatMul" and n.input[1] == graph.weights[layer])
    biased = next(n for n in nodes if n.op_type == "Add" and projection.output[0] in n.input).output[0]
    lora_a = next(n for n in nodes if n.op_type == "MatMul" and n.input[1] == f"model.base.{layer}.lora_A.rows")
    lora_a.input[0] = biased  # (x W + b) A B instead of x A B: still a branch, no longer a linear one
    before = graph.model.SerializeToString()
    feeds = validate.generated_feeds(VOCAB_SIZE, graph.feeds)
    result = switchable_fusion.fuse_switchable(graph, lora_model, feeds)
    assert result.applied == {}
    assert result.note == f"unfused: could not rejoin the adapter branch of {layer} after fusion"
    assert graph.model.SerializeToString() == before


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bert")
    make_base("bert").save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def _adapters(base_dir: Path, out: Path, configs: dict) -> dict[str, Path]:
    torch.manual_seed(0)
    model = AdapterModel(load_base(base_dir)[0])
    for name, config in configs.items():
        model.add_adapter(name, config, labels=["a", "b"])
    randomize_adapters(model)
    return {name: save_adapter(model, name, out / name) for name in configs}


def test_layers_without_adapter_branches_get_packed_attention_and_qattention(bert_dir, tmp_path: Path) -> None:
    adapters = _adapters(bert_dir, tmp_path, {"bn": BottleneckConfig(reduction_factor=4, placement="houlsby"),
                                              "lo": LoraConfig(r=2, target_modules=("query", "value"))})
    manifest = export_bundle(str(bert_dir), {"bn": adapters["bn"]}, mode="switchable", precision="int8",
                             out=tmp_path / "b", weight_bits=WEIGHT_BITS).to_dict()
    assert manifest["fusions"]["applied"]["Attention"] == 2 and "multi_head_attention_layers" not in manifest["fusions"]
    proto = onnx.load(str(tmp_path / "b" / "model.onnx"))
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["QAttention"] == 2 and not ops["MultiHeadAttention"] and not ops["Attention"]
    assert unread_initializers(proto) == []  # not the q, k, v weights the packed one replaced
    assert "requires" not in manifest  # QAttention only: any onnxruntime runs it
    worst = manifest["validation"]["bn"]["int8_layers_vs_fake_quant"]
    assert worst["max_rel_error"] <= validate.INT8_LAYER_REL_TOL
    # q, k, v now live in a packed weight; add-adapter still knows the layers and names the missing slot
    with pytest.raises(EdgeloraError, match=r"adapter targets layer encoder\.layer\.0\.attention\.self\.query with "
                                            r"LoRA, which has no LoRA slot in bundle"):
        add_adapters(tmp_path / "b", {"lo": adapters["lo"]}, check=False)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bases_the_bert_fusions_do_not_fit_export_switchable_unfused_with_a_note(kind: str, tmp_path: Path) -> None:
    make_base(kind).save_pretrained(tmp_path / "base")
    adapters = _adapters(tmp_path / "base", tmp_path, {"lo": LoraConfig(r=2)})
    manifest = export_bundle(str(tmp_path / "base"), adapters, mode="switchable", precision="fp32", out=tmp_path / "b").to_dict()
    assert manifest["fusions"]["applied"] == {}
    assert manifest["fusions"]["note"] == f"unfused: ORT's BERT fusions apply to bert bases, not {kind}"
    feeds = {k: v.numpy() for k, v in make_inputs(kind).items()}
    assert Runtime(tmp_path / "b", intra_op_threads=1).run(feeds, adapter="lo")["logits"].shape == (3, 2)


def test_switchable_graphs_take_only_the_attention_fusion_and_none_if_asked(bert_dir, tmp_path: Path) -> None:
    adapters = _adapters(bert_dir, tmp_path, {"lo": LoraConfig(r=2)})
    manifest = export_bundle(str(bert_dir), adapters, mode="switchable", precision="fp32", out=tmp_path / "b",
                             fusions=()).to_dict()
    assert manifest["fusions"]["note"] == "unfused: no fusions requested"
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node)
    assert ops["Softmax"] == 2 and not ops["MultiHeadAttention"] and not ops["Attention"]
    # The fusions that would fold the Adds the branches join are left out, and the manifest says so.
    manifest = export_bundle(str(bert_dir), adapters, mode="switchable", precision="fp32", out=tmp_path / "c",
                             fusions=("attention", "skip_layer_norm")).to_dict()
    assert manifest["fusions"]["applied"]["ai.onnx.Attention"] == 2
    assert "; skip_layer_norm not applied to switchable graphs" in manifest["fusions"]["note"]
    assert manifest["fusions"]["note"].endswith("; q, k, v packed into one projection and one LoRA branch for 2 attention cores")


# --- rewriting a bundle: one writer ---------------------------------------------------------------------


@pytest.fixture
def bundle(bert_dir, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    adapters = _adapters(bert_dir, tmp_path, {"one": LoraConfig(r=2), "two": LoraConfig(r=4)})
    out = tmp_path / "bundle"
    export_bundle(str(bert_dir), {"one": adapters["one"]}, mode="switchable", precision="fp32", out=out)
    Runtime(out, intra_op_threads=1)  # writes the optimized-graph cache under .cache/
    return out, adapters


def test_add_adapter_carries_unchanged_files_over_as_links_and_keeps_the_cache(bundle) -> None:
    out, adapters = bundle
    before = {p.relative_to(out).as_posix(): p.stat().st_ino for p in out.rglob("*") if p.is_file()}
    assert any(rel.startswith(".cache/") for rel in before)
    manifest = add_adapters(out, {"two": adapters["two"]}, check=False).to_dict()
    after = {p.relative_to(out).as_posix(): p.stat().st_ino for p in out.rglob("*") if p.is_file()}
    unchanged = ["model.onnx", "tokenizer.json", "adapters/one.onnx_adapter"]
    unchanged += [rel for rel in before if rel.startswith(".cache/")]
    assert {rel: after[rel] for rel in unchanged} == {rel: before[rel] for rel in unchanged}  # the same files
    assert after["bank.onnx_adapter"] != before["bank.onnx_adapter"]
    assert not any(rel.startswith(".cache/") for rel in manifest["files"])  # carried over, not listed
    assert manifest["files"]["adapters/two.onnx_adapter"] == manifest["adapters"][1]["sha256"]
    rt = Runtime(out, intra_op_threads=1)  # verifies every sha256 the new manifest lists
    assert rt.adapters == ("one", "two")


def test_add_adapter_names_a_listed_file_that_is_missing_and_keeps_the_bundle(bundle) -> None:
    out, adapters = bundle
    (out / "tokenizer.json").unlink()
    manifest_before = (out / "manifest.json").read_text()
    missing = re.escape(f"{out / 'tokenizer.json'}: missing (listed in manifest.json)")
    with pytest.raises(EdgeloraError, match="^" + missing):
        add_adapters(out, {"two": adapters["two"]}, check=False)
    assert (out / "manifest.json").read_text() == manifest_before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".bundle")) == []


def test_write_bundle_refuses_to_write_into_a_kept_file(bundle) -> None:
    out, _ = bundle
    manifest = read_manifest(out)
    model_bytes = (out / "model.onnx").read_bytes()
    with pytest.raises(ValueError, match=r"\['model\.onnx'\] both kept and written"):
        write_bundle(out, manifest, {"model.onnx": lambda p: p.write_bytes(b"")}, None,
                     keep={"model.onnx": manifest.files["model.onnx"]})
    assert (out / "model.onnx").read_bytes() == model_bytes and os.path.getsize(out / "model.onnx") > 0


def test_the_three_attention_cores_compute_the_same_layers_padding_included() -> None:
    """benchmarks/attention_cores.py times QAttention against MultiHeadAttention and ONNX's Attention with
    the exporter's additive mask (`switchable_fusion.additive_mask`); its timings mean something only if all three
    compute the same six layers, here with a half-padded row. Same integers, same float attention: measured
    equal bit for bit. A mask of the wrong sign differs by ~1.3 relative."""
    import sys

    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import attention_cores

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    diffs = attention_cores.relative_differences(*attention_cores.sessions_and_feeds(3, 10, options))
    assert max(diffs.values()) <= FUSED_REL_TOL, diffs


def test_a_failed_move_to_onnx_attention_leaves_the_graph_unfused_with_a_note(lora_model, monkeypatch) -> None:
    graph = _switchable_graph(lora_model, ["lo"])
    before = graph.model.SerializeToString()

    def refuse(model, version):
        raise RuntimeError("no adapter for op X")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    result = switchable_fusion.fuse_switchable(graph, lora_model, validate.generated_feeds(VOCAB_SIZE, graph.feeds))
    assert result.applied == {}
    assert result.note == ("unfused: moving the attention cores to ONNX Attention failed (RuntimeError: no adapter "
                           "for op X)")
    assert graph.model.SerializeToString() == before
