"""Claims about the fused int8 export: ORT's BERT fusions with our own int8 weights, mixed precision, manifest.

Merged BERT graphs get ONNX Runtime's attention fusion; the int8 graph turns each fused Attention into
QAttention with the shared quantizer's weights and per-column scales, and still equals the fake-quant
torch model layer by layer. fp32 fused graphs equal torch. Layers kept fp32 (mixed precision) are fp32
in the graph and skipped by the fake quantizer alike. Bases the fusions do not fit export unfused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import (FP32_ATOL, INT8_LAYER_REL_TOL, INT8_MIN_COSINE, WEIGHT_BITS, make_base, make_inputs,
                      randomize_adapters, write_tokenizer)
from onnx import numpy_helper

from edgelora.config import LoraConfig, QuantConfig, config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.exporters import validate
from edgelora.exporters.export import export_bundle
from edgelora.exporters.fusion import DEFAULT_FUSIONS
from edgelora.exporters.quantize import QuantizedAttention
from edgelora.fake_quant import quantize_weight
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.runtime.cpu import detect_isa

LAYER = "encoder.layer.{}.attention.self.{}"


def save_lora(base_dir: Path, out: Path, quant: QuantConfig | None = None) -> Path:
    model = AdapterModel(load_base(base_dir)[0])
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["neg", "pos"], quant=quant)
    randomize_adapters(model)
    return save_adapter(model, "lo", out / "lo")


def reference(base_dir: Path, adapter: Path, quant: QuantConfig | None) -> AdapterModel:
    model = AdapterModel(load_base(base_dir)[0])
    load_adapter(model, adapter, "lo")
    model.set_quant(quant)
    return model.eval()


def pooled(model: AdapterModel, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**feeds)[1].numpy()


def run(bundle: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    rt = Runtime(bundle, intra_op_threads=1, allow_spinning=False)
    return rt.run({k: v.numpy() for k, v in feeds.items()})["embeddings"]


def nodes(bundle: Path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(bundle / "model.onnx")).graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def lora(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(tiny_bert_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def bundles(tiny_bert_dir: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for precision in ("fp32", "int8"):
        out[precision] = root / precision
        export_bundle(str(tiny_bert_dir), {"lo": lora}, mode="merged", precision=precision, out=out[precision],
                      weight_bits=WEIGHT_BITS)
    return out


def test_fused_fp32_bundle_equals_torch_for_right_and_left_padding(bundles, tiny_bert_dir, lora) -> None:
    assert len(nodes(bundles["fp32"], "Attention")) == 2
    model = reference(tiny_bert_dir, lora, None)
    right = make_inputs("bert")  # last row half padding
    left = {k: v.flip(1) if k == "attention_mask" else v for k, v in right.items()}  # padding first
    for feeds in (right, left):
        diff = float(np.abs(run(bundles["fp32"], feeds) - pooled(model, feeds)).max())
        print(f"fused fp32 vs torch: max diff {diff:.2e}")
        assert diff <= FP32_ATOL


def test_fused_int8_graph_matches_fake_quant_layer_by_layer(bundles) -> None:
    m = json.loads((bundles["int8"] / "manifest.json").read_text())
    q = m["quantization"]
    assert (q["quantized_matmuls"], q["qattention_nodes"]) == (12, 2)  # 2 x (q, k, v packed + out, ffn1, ffn2)
    figures = m["validation"]["lo"]["int8_layers_vs_fake_quant"]
    print(f"fused int8: worst layer {figures['worst_layer']} at {figures['max_rel_error']:.2e} relative")
    assert figures["max_rel_error"] <= INT8_LAYER_REL_TOL
    assert m["validation"]["lo"]["vs_fake_quant_torch"]["embeddings"]["worst_cosine"] >= INT8_MIN_COSINE


def test_onnx_runtime_fuses_every_dynamic_int8_matmul_with_its_bias(bundles, tmp_path: Path) -> None:
    """The int8 speed rests on ORT's own fusions: in the graph a Runtime executes (ORT_ENABLE_ALL), each
    DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul chain is one DynamicQuantizeMatMul that took the
    layer's bias Add as well, so no quantized layer runs as four kernels with a pass over memory each."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundles["int8"] / "model.onnx"), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    q = json.loads((bundles["int8"] / "manifest.json").read_text())["quantization"]
    matmuls = q["quantized_matmuls"] - 3 * q["qattention_nodes"]  # attention output, ffn1, ffn2 per layer
    fused = [n for n in optimized if n.op_type == "DynamicQuantizeMatMul"]
    assert len(fused) == matmuls and all(len(n.input) == 5 and n.input[4] for n in fused)  # input 4: the bias
    assert not [n.name for n in optimized if n.op_type in ("MatMulInteger", "MatMulIntegerToFloat")]
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in optimized) == q["qattention_nodes"]  # QAttention's


def test_qattention_holds_the_shared_quantizers_weights_with_per_column_scales(bundles, tiny_bert_dir, lora) -> None:
    """Re-derived from the torch model: [Wq; Wk; Wv] (LoRA merged) rounded by quantize_weight row by row."""
    proto = onnx.load(str(bundles["int8"] / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    model = reference(tiny_bert_dir, lora, None)
    for index, node in enumerate(n for n in proto.graph.node if n.op_type == "QAttention"):
        stacked = torch.cat([model.base.get_submodule(LAYER.format(index, p)).base.weight
                             + model.base.get_submodule(LAYER.format(index, p)).lora_delta("lo")
                             for p in ("query", "key", "value")]).detach()  # (3 * hidden, in)
        q, scale = quantize_weight(stacked, WEIGHT_BITS)
        np.testing.assert_array_equal(inits[node.input[1]], q.numpy().T)  # stored (in, 3 * hidden) int8
        np.testing.assert_array_equal(inits[node.input[4]], scale.numpy())  # one scale per column


def test_layerwise_check_catches_a_wrong_qattention_scale(bundles) -> None:
    """The probe really recomputes the attention: a 1% scale error on one column block shows up far above tolerance."""
    proto = onnx.load(str(bundles["int8"] / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "QAttention")
    inits = {i.name: i for i in proto.graph.initializer}
    layers = {node.name: QuantizedAttention(
        node.input[0].removesuffix("_quant"), node.output[0], node.input[5],
        (numpy_helper.to_array(inits[node.input[1]]).T * numpy_helper.to_array(inits[node.input[4]])[:, None]).astype(np.float32),
        numpy_helper.to_array(inits[node.input[2]]), 4, ("q", "k", "v"))}
    feeds = validate.generated_feeds(120, ("input_ids", "attention_mask", "token_type_ids"), seq=12)
    feeds["input_ids"] = feeds["input_ids"] % 116 + 4
    good, _ = validate.layerwise_error(proto, feeds, layers, WEIGHT_BITS)
    scale = numpy_helper.to_array(inits[node.input[4]]).copy()
    scale[len(scale) // 3 * 2 :] *= 1.01  # the value block
    inits[node.input[4]].CopyFrom(numpy_helper.from_array(scale, node.input[4]))
    bad, _ = validate.layerwise_error(proto, feeds, layers, WEIGHT_BITS)
    print(f"QAttention vs its recomputation: {good:.2e} as exported, {bad:.2e} with a 1% wrong value scale")
    assert good <= INT8_LAYER_REL_TOL < bad


def test_mixed_precision_layers_are_fp32_in_graph_and_fake_quant(tiny_bert_dir, lora, tmp_path: Path) -> None:
    keep = ["encoder.layer.0.intermediate.dense", LAYER.format(1, "query")]  # query widens to q, k, v of layer 1
    m = export_bundle(str(tiny_bert_dir), {"lo": lora}, mode="merged", precision="int8", out=tmp_path / "b",
                      weight_bits=WEIGHT_BITS, keep_fp32=keep).to_dict()
    expected = sorted([keep[0]] + [LAYER.format(1, p) for p in ("query", "key", "value")])
    assert m["quantization"]["fp32_layers"] == expected == m["quantization"]["recipe"]["skip_layers"]
    assert m["quantization"]["quantized_matmuls"] == 12 - 4
    assert [len(nodes(tmp_path / "b", op)) for op in ("QAttention", "Attention")] == [1, 1]
    proto = onnx.load(str(tmp_path / "b" / "model.onnx"))
    float_weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    assert f"model.base.{keep[0]}.weight_t" in float_weights

    recipe = QuantConfig(WEIGHT_BITS, skip_layers=tuple(expected))
    fq = reference(tiny_bert_dir, lora, recipe)
    assert all((layer.quant is None) == (name in expected) for name, layer in fq.adapted_layers())
    full = reference(tiny_bert_dir, lora, QuantConfig(WEIGHT_BITS))
    feeds = make_inputs("bert")
    got = run(tmp_path / "b", feeds)
    to_mixed, to_full = (float(np.abs(got - pooled(ref, feeds)).mean()) for ref in (fq, full))
    print(f"mixed int8 bundle: mean diff to its fake quant {to_mixed:.2e}, to the all-int8 fake quant {to_full:.2e}")
    assert to_mixed * 3 <= to_full
    assert m["validation"]["lo"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL


def test_export_keeps_fp32_what_training_skipped(tiny_bert_dir, tmp_path: Path) -> None:
    skip = (LAYER.format(0, "query"), LAYER.format(0, "key"), LAYER.format(0, "value"))
    recipe = QuantConfig(WEIGHT_BITS, skip_layers=skip)
    assert QuantConfig(**json.loads(json.dumps(config_to_dict(recipe)))) == recipe  # travels in adapter_config.json
    adapter = save_lora(tiny_bert_dir, tmp_path, quant=recipe)
    m = export_bundle(str(tiny_bert_dir), {"lo": adapter}, mode="merged", precision="int8", out=tmp_path / "b").to_dict()
    assert m["quantization"]["fp32_layers"] == sorted(skip)
    assert m["quantization"]["fp32_layers_from"] == {"from": "adapter training recipe"}
    with pytest.raises(EdgeloraError, match=r"differs from the fp32 layers the adapters were trained with"):
        export_bundle(str(tiny_bert_dir), {"lo": adapter}, mode="merged", precision="int8", out=tmp_path / "c",
                      keep_fp32=["encoder.layer.1.output.dense"])


def test_auto_mixed_precision_keeps_the_most_sensitive_units_within_budget(tiny_bert_dir, lora, tmp_path: Path) -> None:
    m = export_bundle(str(tiny_bert_dir), {"lo": lora}, mode="merged", precision="int8", out=tmp_path / "b",
                      weight_bits=WEIGHT_BITS, keep_fp32="auto", target_cosine=0.9999999).to_dict()
    choice = m["quantization"]["fp32_layers_from"]
    sens = choice["sensitivity"]
    alone = [u["alone_worst_cosine"] for u in sens["units"]]
    assert choice["from"] == "measured sensitivity" and len(alone) == 8  # 2 fused attentions + 6 linears
    assert alone == sorted(alone)  # most sensitive (lowest cosine alone) first
    chosen = [u["layers"] for u in sens["units"][:2]]  # budget: a quarter of 8 units, the target is out of reach
    assert m["quantization"]["fp32_layers"] == sorted(sum(chosen, [])) == sens["fp32_layers"]
    assert sens["worst_cosine"] >= sens["worst_cosine_all_int8"] and not sens["met"]


def test_manifest_records_fusions_recipe_and_isa(bundles) -> None:
    for precision, bundle in bundles.items():
        m = json.loads((bundle / "manifest.json").read_text())
        assert m["isa"] == detect_isa().isa
        assert m["fusions"]["requested"] == list(DEFAULT_FUSIONS)
        assert m["fusions"]["applied"]["Attention"] == 2
        assert m["fusions"]["attention_layers"]["Attention_0"] == [LAYER.format(0, p) for p in ("query", "key", "value")]
    q = json.loads((bundles["int8"] / "manifest.json").read_text())["quantization"]
    recipe = {k: q["recipe"][k] for k in ("weight_bits", "activations", "mode", "skip_layers")}  # other keys: other tests
    assert recipe == {"weight_bits": WEIGHT_BITS, "activations": "dynamic", "mode": "merged", "skip_layers": []}
    assert q["activations"]["mode"] == "dynamic"  # static bundles: tests/test_static.py
    assert q["isa"] == detect_isa().isa


def test_no_fusions_requested_gives_the_unfused_graph(tiny_bert_dir, lora, tmp_path: Path) -> None:
    m = export_bundle(str(tiny_bert_dir), {"lo": lora}, mode="merged", precision="int8", out=tmp_path / "b",
                      weight_bits=WEIGHT_BITS, fusions=()).to_dict()
    assert m["fusions"]["applied"] == {} and m["fusions"]["note"].startswith("unfused")
    assert len(nodes(tmp_path / "b", "MatMulInteger")) == 12 and not nodes(tmp_path / "b", "QAttention")
    with pytest.raises(EdgeloraError, match=r"fusions \['flash'\] are not supported"):
        export_bundle(str(tiny_bert_dir), {"lo": lora}, mode="merged", precision="fp32", out=tmp_path / "c",
                      fusions=("flash",))


def test_gpt2_base_falls_back_to_unfused_with_a_note(tmp_path: Path) -> None:
    base_dir = tmp_path / "gpt2"
    make_base("gpt2").save_pretrained(base_dir)
    write_tokenizer(base_dir)
    model = AdapterModel(load_base(base_dir)[0])
    model.add_adapter("lo", LoraConfig(r=2), labels=["a", "b"])
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    m = export_bundle(str(base_dir), {"lo": adapter}, mode="merged", precision="int8", out=tmp_path / "b",
                      weight_bits=WEIGHT_BITS).to_dict()
    assert m["fusions"]["applied"] == {} and "not gpt2" in m["fusions"]["note"]
    assert m["validation"]["lo"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL


def test_quant_config_refuses_a_bare_string_skip_list() -> None:
    with pytest.raises(EdgeloraError, match=r"skip_layers='encoder' must be a list of layer names"):
        QuantConfig(skip_layers="encoder")
