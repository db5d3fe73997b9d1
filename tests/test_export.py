"""Claims about `export_bundle`, checked as numbers against the torch model the bundle came from.

fp32 bundles (merged and switchable) equal the float torch model; int8 bundles reproduce the fake-quantized
torch model — the manifest's own layer-by-layer figures, an independent numpy re-computation of one int8
layer, and the embeddings end to end. GPT-2-, Llama- and PEFT-made adapters export too; a failed export
leaves the previous bundle as it was; every bad input stops with one clear EdgeloraError.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import (FP32_ATOL, INT8_LAYER_REL_TOL, INT8_MIN_COSINE, MIN_ADAPTER_EFFECT, TRACKS_FAKE_QUANT_FACTOR,
                      WEIGHT_BITS, assert_each_adapter_changes_output, make_base, make_inputs, max_abs, mean_abs,
                      randomize_adapters, snapshot, worst_cosine, write_tokenizer)
from onnx import helper, numpy_helper

import edgelora.exporters.export as export_module
from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.export import export_bundle
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime, read_manifest

# Quantization must visibly move the output (int8 vs fp32 embeddings measured 5e-4 to 2e-2 with 7-bit
# weights, 100x the fp32 export's own error), or an "int8" bundle that silently stayed fp32 would pass.
INT8_VS_FP32_MIN_DIFF = 1e-4

ADAPTERS = {
    "lo": LoraConfig(r=4, alpha=8.0, include_mlp=True),
    "bn": BottleneckConfig(reduction_factor=4, placement="houlsby", activation="gelu"),  # gelu: no dead units
}
LABELS = {"lo": ["neg", "pos"], "bn": ["x", "y", "z"]}


# --- helpers -----------------------------------------------------------------------------------------


def build_and_save(base_dir: Path, out: Path, *, base_kind: str = "bert", names=tuple(ADAPTERS),
                   quant: QuantConfig | None = None) -> dict[str, Path]:
    """Add randomized adapters to the base in `base_dir`, check each changes the output, save each."""
    model = AdapterModel(load_base(base_dir)[0])
    for name in names:
        model.add_adapter(name, ADAPTERS[name], labels=LABELS[name], quant=quant)
    randomize_adapters(model)
    model.set_quant(None)
    assert_each_adapter_changes_output(model, names, make_inputs(base_kind))
    model.set_quant(quant)
    return {name: save_adapter(model, name, out / name) for name in names}


def torch_model(base_dir: Path, adapters: dict[str, Path], quant: QuantConfig | None = None) -> AdapterModel:
    """The reference: the base with the saved adapters loaded back, fake-quantized with `quant` (None: float)."""
    model = AdapterModel(load_base(base_dir)[0])
    for name, path in adapters.items():
        load_adapter(model, path, name)
    model.set_quant(quant)
    return model.eval()


def torch_run(model: AdapterModel, feeds: dict[str, torch.Tensor], adapter: str | None) -> dict[str, np.ndarray]:
    model.set_adapter(adapter)
    with torch.no_grad():
        logits, pooled = model(**feeds)
    return {"logits": logits.numpy(), "embeddings": pooled.numpy()}


def onnx_run(bundle: Path, feeds: dict[str, torch.Tensor], adapter: str | None) -> dict[str, np.ndarray]:
    rt = Runtime(bundle, intra_op_threads=1, allow_spinning=False)
    return rt.run({k: v.numpy() for k, v in feeds.items() if k in rt.manifest.inputs}, adapter=adapter)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA (attention + MLP) and a Houlsby bottleneck adapter on the tiny BERT, randomized and saved."""
    return build_and_save(tiny_bert_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bundle(tiny_bert_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """`bundle(mode, precision, *names)`: the bundle exported from `adapters`, exported once per module."""
    root = tmp_path_factory.mktemp("bundles")
    made: dict[tuple, Path] = {}

    def get(mode: str, precision: str, *names: str) -> Path:
        key = (mode, precision, names)
        if key not in made:
            out = root / "-".join((mode, precision, *names))
            export_bundle(str(tiny_bert_dir), {n: adapters[n] for n in names}, mode=mode, precision=precision,
                          out=out, weight_bits=WEIGHT_BITS)
            made[key] = out
        return made[key]

    return get


@pytest.fixture
def feeds() -> dict[str, torch.Tensor]:
    return make_inputs("bert")  # 3 rows of 7 tokens, the last half padding


def manifest(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "manifest.json").read_text())


# --- fp32 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_fp32_merged_bundle_equals_torch(bundle, tiny_bert_dir, adapters, feeds, name: str) -> None:
    out = bundle("merged", "fp32", name)
    want = torch_run(torch_model(tiny_bert_dir, {name: adapters[name]}), feeds, name)
    got = onnx_run(out, feeds, None)
    assert got["logits"].shape == (3, len(LABELS[name]))
    diffs = max_abs(got["logits"], want["logits"]), max_abs(got["embeddings"], want["embeddings"])
    print(f"merged fp32 {name}: max diff to torch, logits {diffs[0]:.2e}, embeddings {diffs[1]:.2e}")
    assert max(diffs) <= FP32_ATOL
    assert manifest(out)["adapters"][0]["labels"] == LABELS[name]


def test_fp32_switchable_bundle_equals_torch_for_every_adapter_and_none(bundle, tiny_bert_dir, adapters, feeds) -> None:
    out = bundle("switchable", "fp32", "lo", "bn")
    model = torch_model(tiny_bert_dir, adapters)
    for name in ("lo", "bn"):
        want, got = torch_run(model, feeds, name), onnx_run(out, feeds, name)
        diffs = max_abs(got["logits"], want["logits"]), max_abs(got["embeddings"], want["embeddings"])
        print(f"switchable fp32 {name}: max diff to torch, logits {diffs[0]:.2e}, embeddings {diffs[1]:.2e}")
        assert max(diffs) <= FP32_ATOL, name
    plain = torch_run(model, feeds, None)
    got = onnx_run(out, feeds, None)
    assert got["logits"].shape == (3, 0)
    print(f"switchable fp32 no adapter: embeddings max diff to the plain base {max_abs(got['embeddings'], plain['embeddings']):.2e}")
    assert max_abs(got["embeddings"], plain["embeddings"]) <= FP32_ATOL
    m = manifest(out)
    assert [a["name"] for a in m["adapters"]] == ["lo", "bn"]
    assert all((out / a["file"]).is_file() and a["sha256"] == m["files"][a["file"]] for a in m["adapters"])


@pytest.mark.parametrize("mode,precision,names", [("merged", "int8", ("lo",)), ("switchable", "int8", ("lo", "bn")),
                                                  ("switchable", "fp32", ("lo", "bn"))])
def test_an_exported_manifest_round_trips_to_identical_json(bundle, mode: str, precision: str,
                                                            names: tuple[str, ...]) -> None:
    out = bundle(mode, precision, *names)
    text = (out / "manifest.json").read_text()
    typed = read_manifest(out)
    assert typed.to_json() == text
    assert typed.task == "sequence-classification" and typed.format_version == 1
    assert typed.quantization is None if precision == "fp32" else typed.quantization.weight_bits == WEIGHT_BITS


def test_switching_adapters_back_and_forth_gives_identical_results(bundle, feeds) -> None:
    rt = Runtime(bundle("switchable", "fp32", "lo", "bn"), intra_op_threads=1, allow_spinning=False)
    x = {k: v.numpy() for k, v in feeds.items()}
    first, other, again = rt.run(x, adapter="lo"), rt.run(x, adapter="bn"), rt.run(x, adapter="lo")
    assert max_abs(first["embeddings"], other["embeddings"]) > MIN_ADAPTER_EFFECT
    for key in ("logits", "embeddings"):
        np.testing.assert_array_equal(first[key], again[key])


# --- int8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,names", [("merged", ("lo",)), ("merged", ("bn",)), ("switchable", ("lo", "bn"))])
def test_int8_manifest_reports_layers_equal_to_fake_quant(bundle, mode: str, names: tuple[str, ...]) -> None:
    m = manifest(bundle(mode, "int8", *names))
    assert m["quantization"]["weight_bits"] == WEIGHT_BITS
    assert m["quantization"]["quantized_matmuls"] == 12  # q, k, v, attention out, intermediate, output; x 2 layers
    runs = list(names) + (["(no adapter)"] if mode == "switchable" else [])
    for run in runs:
        figures = m["validation"][run]
        assert figures["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL, run
        assert figures["vs_fake_quant_torch"]["embeddings"]["worst_cosine"] >= INT8_MIN_COSINE, run
        assert "vs_fp32_torch" in figures


def test_int8_graph_holds_int8_weights_in_integer_matmuls(bundle) -> None:
    proto = onnx.load(str(bundle("merged", "int8", "lo") / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    integer = [n for n in proto.graph.node if n.op_type in ("MatMulInteger", "QAttention")]
    # The fused BERT graph: per layer one QAttention (packed q, k, v) and three MatMulIntegers.
    assert sum(3 if n.op_type == "QAttention" else 1 for n in integer) == 12
    qmax = 2 ** (WEIGHT_BITS - 1) - 1
    for node in integer:
        w = inits[node.input[1]]
        assert w.dtype == np.int8  # stored (in, out); symmetric per output channel: each column reaches qmax
        np.testing.assert_array_equal(np.abs(w.astype(np.int32)).max(axis=0), qmax)
    float_matmul_weights = [n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert all(not w.endswith(".weight_t") or w == "head.weight_t" for w in float_matmul_weights), float_matmul_weights


def _dynamic_quantize(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """ONNX DynamicQuantizeLinear, written from the operator spec: uint8, per tensor, range includes 0."""
    lo, hi = np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max()))
    scale = np.float32((hi - lo) / np.float32(255))
    zero_point = np.float32(np.clip(np.round(-lo / scale), 0, 255))
    q = np.clip(np.round(x / scale) + zero_point, 0, 255)
    return q, scale, zero_point


def test_int8_layer_recomputed_independently_matches_the_graph(bundle, tiny_bert_dir, adapters, feeds) -> None:
    """One merged LoRA layer, re-derived without the exporter: the int8 weight from W0 + (alpha/r) B A of
    the torch model, the activation quantized by the ONNX spec in numpy, the product compared with ORT's."""
    layer = "encoder.layer.0.intermediate.dense"  # q, k, v sit packed in a QAttention: tests/test_export_int8.py
    proto = onnx.load(str(bundle("merged", "int8", "lo") / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    (matmul,) = [n for n in proto.graph.node if n.op_type == "MatMulInteger" and layer in n.input[1]]
    quantize = producer[matmul.input[0]]
    assert quantize.op_type == "DynamicQuantizeLinear"
    x_name = quantize.input[0]
    # MatMulInteger -> Cast -> Mul(by x_scale * w_scale): the layer's float product
    (cast,) = consumers[matmul.output[0]]
    (rescale,) = consumers[cast.output[0]]
    y_name = rescale.output[0]

    model = torch_model(tiny_bert_dir, {"lo": adapters["lo"]})
    wrapped = model.base.get_submodule(layer)
    w = (wrapped.base.weight + wrapped.lora_delta("lo")).detach().numpy()  # (out, in): what merged int8 quantizes
    qmax = 2 ** (WEIGHT_BITS - 1) - 1
    w_scale = np.abs(w).max(axis=1) / np.float32(qmax)  # (out,)
    w_q = np.clip(np.round(w / w_scale[:, None]), -qmax, qmax)
    np.testing.assert_array_equal(inits[matmul.input[1]], w_q.T.astype(np.int8))  # stored (in, out)

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in (x_name, y_name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x, y = sess.run([x_name, y_name], {k: v.numpy() for k, v in feeds.items()})
    x_q, x_scale, x_zp = _dynamic_quantize(x)
    ref = ((x_q - x_zp).astype(np.float64) @ w_q.T.astype(np.float64)) * (float(x_scale) * w_scale.astype(np.float64))
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    print(f"{layer}: int8 graph vs numpy re-computation, max relative error {err:.2e}")
    assert err <= INT8_LAYER_REL_TOL


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_int8_merged_embeddings_track_fake_quant_torch(bundle, tiny_bert_dir, adapters, feeds, name: str) -> None:
    int8 = onnx_run(bundle("merged", "int8", name), feeds, None)
    fp32 = onnx_run(bundle("merged", "fp32", name), feeds, None)
    fq = torch_run(torch_model(tiny_bert_dir, {name: adapters[name]}, QuantConfig(WEIGHT_BITS, mode="merged")), feeds, name)
    cosine = worst_cosine(int8["embeddings"], fq["embeddings"])
    to_fq, to_fp32 = mean_abs(int8["embeddings"], fq["embeddings"]), mean_abs(int8["embeddings"], fp32["embeddings"])
    moved = max_abs(int8["embeddings"], fp32["embeddings"])
    print(f"merged int8 {name}: cosine to fake quant {cosine:.7f}, mean diff to fake quant {to_fq:.2e}, "
          f"to fp32 {to_fp32:.2e} (max {moved:.2e})")
    assert cosine >= INT8_MIN_COSINE
    assert moved >= INT8_VS_FP32_MIN_DIFF  # quantization really happened
    assert to_fq * TRACKS_FAKE_QUANT_FACTOR <= to_fp32


def test_int8_switchable_each_adapter_tracks_its_fake_quant_torch(bundle, tiny_bert_dir, adapters, feeds) -> None:
    """Switchable int8: the base is int8 and the adapter branch float, exactly what mode="switchable" fakes."""
    out = bundle("switchable", "int8", "lo", "bn")
    fq_model = torch_model(tiny_bert_dir, adapters, QuantConfig(WEIGHT_BITS, mode="switchable"))
    fp32_model = torch_model(tiny_bert_dir, adapters)
    for name in ("lo", "bn", None):
        got, fq, fp32 = onnx_run(out, feeds, name), torch_run(fq_model, feeds, name), torch_run(fp32_model, feeds, name)
        cosine = worst_cosine(got["embeddings"], fq["embeddings"])
        to_fq, to_fp32 = mean_abs(got["embeddings"], fq["embeddings"]), mean_abs(got["embeddings"], fp32["embeddings"])
        print(f"switchable int8 {name}: cosine {cosine:.7f}, mean diff to fake quant {to_fq:.2e}, to fp32 {to_fp32:.2e}")
        assert cosine >= INT8_MIN_COSINE, name
        assert max_abs(got["embeddings"], fp32["embeddings"]) >= INT8_VS_FP32_MIN_DIFF, name
        assert to_fq * TRACKS_FAKE_QUANT_FACTOR <= to_fp32, name
        assert got["logits"].shape == fq["logits"].shape
        if name is not None:
            assert worst_cosine(got["logits"], fq["logits"]) >= INT8_MIN_COSINE, name


def test_int8_export_takes_weight_bits_from_the_qat_recipe(tiny_bert_dir, tmp_path: Path) -> None:
    saved = build_and_save(tiny_bert_dir, tmp_path, names=("lo",), quant=QuantConfig(weight_bits=7, mode="merged"))
    m = export_bundle(str(tiny_bert_dir), saved, mode="merged", precision="int8", out=tmp_path / "bundle").to_dict()
    assert m["quantization"]["weight_bits"] == 7
    assert m["quantization"]["weight_bits_from"] == "adapter training recipe"
    assert m["adapters"][0]["trained_with"] == {"weight_bits": 7, "modes": ["merged"]}
    assert "warnings" not in m


# --- other bases and PEFT -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_bases_export_without_token_type_ids(kind: str, tmp_path: Path) -> None:
    base_dir = tmp_path / kind
    make_base(kind).save_pretrained(base_dir)
    write_tokenizer(base_dir)
    saved = build_and_save(base_dir, tmp_path / "adapters", base_kind=kind)
    feeds = make_inputs(kind)
    merged = export_bundle(str(base_dir), {"lo": saved["lo"]}, mode="merged", precision="fp32", out=tmp_path / "m")
    assert merged.inputs == ("input_ids", "attention_mask")
    want = torch_run(torch_model(base_dir, {"lo": saved["lo"]}), feeds, "lo")
    got = onnx_run(tmp_path / "m", feeds, None)
    diffs = max_abs(got["logits"], want["logits"]), max_abs(got["embeddings"], want["embeddings"])
    print(f"{kind} merged fp32: max diff to torch, logits {diffs[0]:.2e}, embeddings {diffs[1]:.2e}")
    assert max(diffs) <= FP32_ATOL

    switchable = export_bundle(str(base_dir), saved, mode="switchable", precision="int8", out=tmp_path / "s",
                               weight_bits=WEIGHT_BITS)
    assert switchable.inputs == ("input_ids", "attention_mask")
    for run in ("lo", "bn", "(no adapter)"):
        err = switchable.validation[run]["int8_layers_vs_fake_quant"]["max_rel_error"]
        print(f"{kind} switchable int8 {run}: worst int8 layer vs fake quant {err:.2e}")
        assert err <= INT8_LAYER_REL_TOL
    rt = Runtime(tmp_path / "s", intra_op_threads=1, allow_spinning=False)
    assert [p["label"] in LABELS["bn"] for p in rt.predict(["the good film", "a bad movie"], adapter="bn")] == [True] * 2


def test_peft_lora_adapter_exports_merged_and_matches_peft(tiny_bert_dir, tmp_path: Path, feeds) -> None:
    peft = pytest.importorskip("peft")
    base, _ = load_base(tiny_bert_dir)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")

    def pooled() -> np.ndarray:
        with torch.no_grad():
            hidden = peft_model(**feeds).last_hidden_state  # (batch, seq, hidden)
        mask = feeds["attention_mask"].unsqueeze(-1).float()  # (batch, seq, 1)
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()  # (batch, hidden)

    want = pooled()
    with peft_model.disable_adapter():
        plain = pooled()
    assert max_abs(want, plain) > MIN_ADAPTER_EFFECT  # init_lora_weights=False: B is not zero
    m = export_bundle(str(tiny_bert_dir), {"peft": tmp_path / "peft"}, mode="merged", precision="fp32", out=tmp_path / "b").to_dict()
    assert m["adapters"][0]["kind"] == "lora"
    got = onnx_run(tmp_path / "b", feeds, None)
    diff = max_abs(got["embeddings"], want)
    print(f"PEFT LoRA merged fp32: max diff to PEFT {diff:.2e}")
    assert diff <= FP32_ATOL


# --- atomicity ----------------------------------------------------------------------------------------


def _fail_writing_adapters(monkeypatch: pytest.MonkeyPatch, calls: list[Path]) -> None:
    """Let validation write its adapter files, then fail on the first one written into the new bundle
    (recording the temporary bundle it was being written into, with model.onnx already there)."""
    real = export_module.write_adapter_file

    def flaky(path: Path, tensors) -> None:
        if Path(path).parent.name == "adapters":
            tmp_bundle = Path(path).parent.parent
            assert (tmp_bundle / "model.onnx").is_file()
            calls.append(tmp_bundle)
            raise OSError("disk full")
        real(path, tensors)

    monkeypatch.setattr(export_module, "write_adapter_file", flaky)


def _fail_quantizing(monkeypatch: pytest.MonkeyPatch, calls: list[Path]) -> None:
    def broken(*args, **kwargs):
        calls.append(Path("quantize"))
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "quantize_graph", broken)


@pytest.mark.parametrize("fail", [_fail_writing_adapters, _fail_quantizing], ids=["writing", "quantizing"])
def test_failed_export_keeps_the_previous_bundle(tiny_bert_dir, adapters, tmp_path: Path, monkeypatch, fail) -> None:
    out = tmp_path / "bundles" / "current"
    export_bundle(str(tiny_bert_dir), {"lo": adapters["lo"]}, mode="merged", precision="fp32", out=out)
    before = snapshot(out)
    calls: list[Path] = []
    fail(monkeypatch, calls)
    with pytest.raises(OSError, match="disk full"):
        export_bundle(str(tiny_bert_dir), adapters, mode="switchable", precision="int8", out=out, weight_bits=WEIGHT_BITS)
    assert calls, "the simulated failure never happened"
    if fail is _fail_writing_adapters:  # it failed inside a half-written temporary bundle beside the old one
        assert calls[0].parent == out.parent and calls[0].name.startswith(".current.tmp-")
    assert snapshot(out) == before
    assert manifest(out)["mode"] == "merged"
    assert sorted(p.name for p in out.parent.iterdir()) == ["current"]  # no temporary or old copy left beside it


def test_export_over_a_bundle_replaces_it(tiny_bert_dir, adapters, tmp_path: Path) -> None:
    out = tmp_path / "bundles" / "current"
    export_bundle(str(tiny_bert_dir), {"lo": adapters["lo"]}, mode="merged", precision="fp32", out=out)
    export_bundle(str(tiny_bert_dir), adapters, mode="switchable", precision="fp32", out=out)
    m = manifest(out)
    assert m["mode"] == "switchable" and snapshot(out).keys() == set(m["files"]) | {"manifest.json"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["current"]


# --- refusals -----------------------------------------------------------------------------------------


def test_merged_mode_refuses_two_adapters(tiny_bert_dir, adapters, tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"merged mode bakes one adapter into the graph, got 2; use mode='switchable'"):
        export_bundle(str(tiny_bert_dir), adapters, mode="merged", precision="fp32", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_adapter_of_another_base_is_refused(tiny_bert_dir, tmp_path: Path) -> None:
    other = AdapterModel(make_base("bert", seed=1))  # same architecture, other random weights
    other.add_adapter("lo", LoraConfig(r=2), labels=["a", "b"])
    path = save_adapter(other, "lo", tmp_path / "lo")
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(path))}: adapter was trained on another base"):
        export_bundle(str(tiny_bert_dir), {"lo": path}, mode="merged", precision="fp32", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "fused", "precision": "fp32"}, r"mode='fused' is not supported; choose from merged, switchable"),
        ({"mode": "merged", "precision": "int4"}, r"precision='int4' is not supported; choose from fp32, int8"),
    ],
)
def test_unknown_mode_or_precision_is_refused(tiny_bert_dir, adapters, tmp_path: Path, kwargs, message: str) -> None:
    with pytest.raises(EdgeloraError, match=message):
        export_bundle(str(tiny_bert_dir), {"lo": adapters["lo"]}, out=tmp_path / "b", **kwargs)


def test_no_adapter_or_a_missing_adapter_dir_is_refused(tiny_bert_dir, tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"adapters is empty; give at least one adapter directory"):
        export_bundle(str(tiny_bert_dir), {}, mode="switchable", precision="fp32", out=tmp_path / "b")
    missing = tmp_path / "nowhere"
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(missing))}: adapter directory does not exist"):
        export_bundle(str(tiny_bert_dir), {"x": missing}, mode="merged", precision="fp32", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("content", ["notes.txt", "manifest.json"], ids=["other-files", "foreign-manifest"])
def test_out_that_is_not_a_bundle_is_refused_first_and_left_alone(tiny_bert_dir, adapters, tmp_path: Path, content,
                                                                   monkeypatch) -> None:
    out = tmp_path / "project"
    out.mkdir()
    (out / content).write_text('{"name": "my web app"}\n')
    (out / "keep.txt").write_text("mine\n")
    before = snapshot(out)
    monkeypatch.setattr(export_module, "load_base", lambda *a, **k: pytest.fail("export work began before --out was checked"))
    with pytest.raises(EdgeloraError, match=rf"^{re.escape(str(out))}: exists and is not a bundle; choose an empty"):
        export_bundle(str(tiny_bert_dir), {"lo": adapters["lo"]}, mode="merged", precision="fp32", out=out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_weight_bits_conflicting_with_the_qat_recipe_is_refused(tiny_bert_dir, tmp_path: Path) -> None:
    saved = build_and_save(tiny_bert_dir, tmp_path, names=("lo",), quant=QuantConfig(weight_bits=7))
    with pytest.raises(EdgeloraError, match=r"weight_bits=8 differs from the 7-bit recipe the adapters were trained with"):
        export_bundle(str(tiny_bert_dir), saved, mode="merged", precision="int8", out=tmp_path / "b", weight_bits=8)
    assert not (tmp_path / "b").exists()
