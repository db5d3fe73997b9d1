"""Claims about static activation quantization: observers, calibration, the ranges in the adapter, the export.

Observers record what they should; `calibrate` gives every quantized layer the range of its own input;
the (scale, zero_point) pairs save with the adapter and load back bit for bit, PEFT still loads the LoRA;
a static int8 bundle puts them in the graph as constants (QuantizeLinear), passes the layer-by-layer check
against the static fake quantizer and reproduces the fake-quantized torch model; and a row's result no
longer depends on its batch-mates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import peft
import pytest
import torch
from conftest import INT8_MIN_COSINE, VOCAB_SIZE, make_base, make_inputs, randomize_adapters
from onnx import numpy_helper

from edgelora.cli import main
from edgelora.calibrate import ActivationObserver, ObserverConfig, calibrate, freeze, static_layers, static_qparams
from edgelora.config import LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters import validate
from edgelora.exporters.add import add_adapters
from edgelora.exporters.export import export_bundle
from edgelora.exporters.onnx_graph import export_graph
from edgelora.exporters.quantize import quantize_graph
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.tokenize import encode
from edgelora.train import TrainConfig, train_adapter

STATIC = QuantConfig(weight_bits=7, activations="static")  # 7-bit: no AVX2 saturation, figures hold on any CPU
LABELS = ["neg", "pos"]
# One row run alone vs within a batch, static bundle: the same constants and integers, only the kernels'
# blocking over another batch shape differs (measured ~2e-7 on these toy bases).
BATCH_INDEPENDENT_ATOL = 1e-5
# The same comparison under dynamic quantization: the batch-mates move the per-tensor range and so every
# rounding; measured ~4e-3 here, so 1e-4 is far above static's float noise and far below dynamic's effect.
DYNAMIC_BATCH_EFFECT = 1e-4


def calibration_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_inputs("bert", batch=4, seed=10 + i) for i in range(n)]


def static_model(base=None, quant: QuantConfig = STATIC, calibrated: bool = True, **kwargs) -> AdapterModel:
    model = AdapterModel(make_base("bert") if base is None else base)
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), LABELS, quant=quant)
    randomize_adapters(model)
    if calibrated:
        calibrate(model, calibration_batches(), **kwargs)
    return model.eval()


def layer_inputs(model: AdapterModel, batches) -> dict[str, list[torch.Tensor]]:
    """Every adapted layer's input over `batches`, recorded by forward pre-hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, []).append(args[0].detach()))
             for n, layer in model.adapted_layers()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- observers ---------------------------------------------------------------------------------------------


def test_minmax_observer_keeps_the_extremes_of_every_batch() -> None:
    obs = ActivationObserver(ObserverConfig("minmax"))
    for x in (torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.1, 0.2])):
        obs.observe(x)
    assert int(obs.batches) == 3
    assert [float(v) for v in obs.observed_range()] == [-1.0, 2.0]
    assert obs.qparams() == (float(np.float32(3.0) / np.float32(255)), 85)  # zero point round(1 / (3/255)) = 85


def test_moving_average_observer_follows_pytorchs_rule() -> None:
    c = 0.25
    obs = ActivationObserver(ObserverConfig("moving_average", averaging_constant=c))
    obs.observe(torch.tensor([-1.0, 1.0]))  # the first batch sets the average
    obs.observe(torch.tensor([-3.0, 5.0]))  # then avg += c * (batch extreme - avg)
    lo, hi = (float(v) for v in obs.observed_range())
    assert (lo, hi) == (-1.0 + c * (-3.0 + 1.0), 1.0 + c * (5.0 - 1.0))
    assert [float(obs.min_val), float(obs.max_val)] == [-3.0, 5.0]  # the plain extremes are kept too


def test_percentile_observer_clips_the_outliers_of_each_batch() -> None:
    obs = ActivationObserver(ObserverConfig("percentile", percentile=99.0))
    batches = [torch.cat([torch.linspace(-1, 1, 999), torch.tensor([1e3])]) for _ in range(2)]
    batches[1] = batches[1] * 2
    for x in batches:
        obs.observe(x)
    lo, hi = (float(v) for v in obs.observed_range())
    # the 99th and 1st percentile points of each batch, averaged: the 1e3 outlier is left out
    expect_hi = np.mean([float(torch.kthvalue(x, 991).values) for x in batches])
    expect_lo = np.mean([float(torch.kthvalue(x, 10).values) for x in batches])
    assert hi == pytest.approx(expect_hi, rel=1e-6) and lo == pytest.approx(expect_lo, rel=1e-6)
    assert hi < 3.0 and float(obs.max_val) == 2e3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "histogram"}, r"observer kind='histogram' is not supported; choose from minmax, moving_average"),
    ({"averaging_constant": 0.0}, r"averaging_constant=0.0 must be in \(0, 1\]"),
    ({"percentile": 40.0}, r"percentile=40.0 must be in \(50, 100\]"),
])
def test_bad_observer_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(EdgeloraError, match=message):
        ObserverConfig(**kwargs)


# --- calibration ----------------------------------------------------------------------------------------------


def test_calibration_records_each_layers_own_input_range() -> None:
    model = static_model(calibrated=False)
    batches = calibration_batches()
    report = calibrate(model, batches)
    assert report.as_dict() == {"observer": {"kind": "minmax", "averaging_constant": 0.01, "percentile": 99.99},
                                "batches": 3, "qat_observe_steps": 0, "layers": len(model.quantizable_names())}
    # Calibration runs the activations float (as post-training calibration does): the reference is the
    # same model with weights fake-quantized and activations untouched.
    reference = static_model(quant=QuantConfig(weight_bits=7, activations="none"), calibrated=False)
    seen = layer_inputs(reference, batches)
    for name, layer in static_layers(model):
        obs = layer.act_observer
        assert obs.frozen and int(obs.batches) == 3
        lo = min(float(x.min()) for x in seen[name])
        hi = max(float(x.max()) for x in seen[name])
        assert [float(v) for v in obs.observed_range()] == [lo, hi], name
    # layers that read the same tensor hold the same range: one QuantizeLinear serves them in the graph
    qp = static_qparams(model)
    assert qp[ATT.format(0, "query")] == qp[ATT.format(0, "key")] == qp[ATT.format(0, "value")]


ATT = "encoder.layer.{}.attention.self.{}"


def test_layers_kept_fp32_get_no_observer() -> None:
    skip = "encoder.layer.1.output.dense"
    model = static_model(quant=QuantConfig(weight_bits=7, activations="static", skip_layers=(skip,)))
    names = {n for n, _ in static_layers(model)}
    assert skip not in names and len(names) == len(model.quantizable_names()) - 1
    assert dict(model.adapted_layers())[skip].act_observer is None


def test_static_forward_before_calibration_is_refused() -> None:
    model = static_model(calibrated=False)
    with pytest.raises(EdgeloraError, match=r"activations='static' needs calibrated input ranges; run "
                                            r"edgelora.calibrate.calibrate\(model, batches\) first"):
        model(**make_inputs("bert"))


def test_calibrating_a_model_without_a_static_recipe_is_refused() -> None:
    model = static_model(quant=QuantConfig(weight_bits=7), calibrated=False)
    with pytest.raises(EdgeloraError, match=r"calibrate\(\) needs a static int8 recipe, the model has "
                                            r"activations='dynamic'; set one with model.set_quant"):
        calibrate(model, calibration_batches())


def test_calibrating_on_no_batches_leaves_no_observer() -> None:
    model = static_model(calibrated=False)
    with pytest.raises(EdgeloraError, match=r"calibrate\(\) got no batches"):
        calibrate(model, [])
    assert all(layer.act_observer is None for _, layer in static_layers(model))


def test_observers_keep_observing_the_first_qat_steps_then_freeze() -> None:
    model = static_model(qat_steps=2)
    query = dict(model.adapted_layers())[ATT.format(0, "query")].act_observer
    start = query.qparams()
    loud = {**make_inputs("bert", batch=4, seed=30)}
    model.eval()
    model(**loud)  # evaluation passes never move the ranges
    assert query.qparams() == start and int(query.steps_left) == 2
    model.train()
    for _ in range(2):
        with torch.no_grad():
            model.base.embeddings.word_embeddings.weight.mul_(3.0)  # the inputs widen, as QAT may move them
        model(**loud)
    widened = query.qparams()
    assert widened[0] > start[0] and query.frozen
    with torch.no_grad():
        model.base.embeddings.word_embeddings.weight.mul_(3.0)
    model(**loud)  # frozen: a third training pass changes nothing
    assert query.qparams() == widened


def test_training_ends_with_frozen_observers_that_saw_the_first_steps(tokenizer) -> None:
    base = make_base("bert")
    model = AdapterModel(base)
    model.add_adapter("lo", LoraConfig(r=2), LABELS, quant=STATIC)
    texts = [f"the film was {w}" for w in ("good", "bad") * 8]
    labels = [0, 1] * 8
    calibrate(model, [encode(tokenizer, texts[:4])], qat_steps=3)
    train_adapter(model, "lo", tokenizer, texts, labels, texts[:4], labels[:4],
                  TrainConfig(epochs=1, batch_size=4, device="cpu"))
    observers = [layer.act_observer for _, layer in static_layers(model)]
    assert all(o.frozen and int(o.batches) == 1 + 3 for o in observers)


# --- the ranges in the adapter -------------------------------------------------------------------------------


def test_ranges_save_with_the_adapter_and_load_back_bit_for_bit(tmp_path: Path) -> None:
    model = static_model()
    feeds = make_inputs("bert")
    with torch.no_grad():
        want = model(**feeds)
    path = save_adapter(model, "lo", tmp_path / "lo")
    extras = json.loads((path / "adapter_config.json").read_text())["edgelora"]
    assert extras["quantization"]["activations"] == "static"
    saved = extras["static_activations"]
    assert saved["observer"]["kind"] == "minmax" and saved["batches_observed"] == 3
    assert set(saved["layers"]) == set(model.quantizable_names())

    loaded = AdapterModel(make_base("bert"))
    load_adapter(loaded, path)
    assert loaded.quant.activations == "static"
    assert static_qparams(loaded) == static_qparams(model)
    for (_, a), (_, b) in zip(static_layers(loaded), static_layers(model)):
        assert torch.equal(a.act_observer.scale, b.act_observer.scale)  # float32, bit for bit
        assert a.act_observer.frozen
    with torch.no_grad():
        got = loaded.eval()(**feeds)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_peft_still_loads_a_static_adapters_lora(tmp_path: Path) -> None:
    model = static_model()
    path = save_adapter(model, "lo", tmp_path / "lo")
    feeds = make_inputs("bert")
    peft_model = peft.PeftModel.from_pretrained(make_base("bert"), path).eval()
    model.set_quant(None)  # PEFT knows no fake quantization: compare the float models
    with torch.no_grad():
        hidden = peft_model(**feeds).last_hidden_state
        mask = feeds["attention_mask"].unsqueeze(-1).float()
        got = (hidden * mask).sum(1) / mask.sum(1)
        want = model.encode(**feeds)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # float32 reassociation only


def _edit(path: Path, change) -> None:
    cfg = path / "adapter_config.json"
    data = json.loads(cfg.read_text())
    change(data["edgelora"])
    cfg.write_text(json.dumps(data))


@pytest.mark.parametrize(("change", "message"), [
    (lambda e: e.pop("static_activations"), r"the recipe has activations='static' but no calibrated ranges \('static_activations'\)"),
    (lambda e: e["static_activations"]["layers"].pop("encoder.layer.0.attention.self.key"),
     r"no static range for layer 'encoder.layer.0.attention.self.key'; calibrate and save the adapter again"),
    (lambda e: e["static_activations"]["layers"].__setitem__("pooler.dense", {"scale": 0.1, "zero_point": 3}),
     r"static range for 'pooler.dense', which is not a quantized layer of this base"),
    (lambda e: e["static_activations"]["layers"]["encoder.layer.0.output.dense"].__setitem__("scale", -1.0),
     r"static scale of 'encoder.layer.0.output.dense' is -1.0; it must be a positive float32"),
    (lambda e: e["static_activations"]["layers"]["encoder.layer.0.output.dense"].__setitem__("zero_point", 300),
     r"static zero_point of 'encoder.layer.0.output.dense' is 300; it must be an integer in \[0, 255\]"),
], ids=["no_ranges", "missing_layer", "unknown_layer", "bad_scale", "bad_zero_point"])
def test_bad_saved_ranges_are_refused_naming_the_file(tmp_path: Path, change, message) -> None:
    path = save_adapter(static_model(), "lo", tmp_path / "lo")
    _edit(path, change)
    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=rf"adapter_config.json: {message}"):
        load_adapter(model, path)
    assert "lo" not in model.configs  # nothing half-loaded


def test_a_second_adapter_calibrated_apart_is_refused(tmp_path: Path) -> None:
    first = save_adapter(static_model(), "lo", tmp_path / "first")
    other = AdapterModel(make_base("bert"))
    other.add_adapter("two", LoraConfig(r=2), LABELS, quant=STATIC)
    calibrate(other, [make_inputs("bert", batch=2, seed=99)])
    second = save_adapter(other, "two", tmp_path / "second")
    model = AdapterModel(make_base("bert"))
    load_adapter(model, first)
    with pytest.raises(EdgeloraError, match=r"already holds another adapter's static activation range; adapters "
                                            r"calibrated apart cannot share one static int8 graph"):
        load_adapter(model, second)


# --- the static int8 export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_adapter(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = static_model(base=load_base(tiny_bert_dir)[0])
    return save_adapter(model, "lo", tmp_path_factory.mktemp("static") / "lo")


@pytest.fixture(scope="module")
def static_bundles(tiny_bert_dir: Path, static_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static_bundles")
    out = {}
    for key, mode, fusions in (("fused", "merged", None), ("unfused", "merged", ()), ("switchable", "switchable", None)):
        out[key] = root / key
        export_bundle(str(tiny_bert_dir), {"lo": static_adapter}, mode=mode, precision="int8", out=out[key],
                      fusions=fusions)
    return out


def reference(tiny_bert_dir: Path, adapter: Path) -> AdapterModel:
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(model, adapter, "lo")
    return model.eval()


def graph(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"))


@pytest.mark.parametrize("key", ["fused", "unfused", "switchable"])
def test_static_bundle_writes_the_calibrated_qparams_as_constants(static_bundles, tiny_bert_dir, static_adapter,
                                                                  key: str) -> None:
    proto = graph(static_bundles[key])
    ops = [n.op_type for n in proto.graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    expected = set(static_qparams(reference(tiny_bert_dir, static_adapter)).values())
    found = {(float(inits[n.input[1]]), int(inits[n.input[2]])) for n in quantizers}
    assert found == expected  # each distinct layer input quantized once, with its calibrated constants
    assert len(quantizers) == len(expected)
    if key == "fused":
        assert ops.count("QAttention") == 2 and ops.count("MatMulIntegerToFloat") == 2 * 3  # Wo, FFN in, FFN out
    elif key == "unfused":
        assert ops.count("MatMulIntegerToFloat") == 2 * 6
    else:  # switchable: q, k, v packed into one projection per layer (switchable_pack)
        assert ops.count("MatMulIntegerToFloat") == 2 * 4


@pytest.mark.parametrize("key", ["fused", "unfused", "switchable"])
def test_static_bundle_matches_the_static_fake_quant_model(static_bundles, tiny_bert_dir, static_adapter,
                                                           key: str) -> None:
    manifest = json.loads((static_bundles[key] / "manifest.json").read_text())
    layerwise = manifest["validation"]["lo"]["int8_layers_vs_fake_quant"]["max_rel_error"]
    assert layerwise <= validate.INT8_LAYER_REL_TOL
    feeds = make_inputs("bert", batch=4, seed=3)
    rt = Runtime(static_bundles[key], intra_op_threads=1, allow_spinning=False)
    got = rt.run({k: v.numpy() for k, v in feeds.items()}, adapter="lo")["embeddings"]
    with torch.no_grad():
        want = reference(tiny_bert_dir, static_adapter)(**feeds)[1].numpy()
    assert validate.worst_cosine(got, want) >= INT8_MIN_COSINE


def test_manifest_records_the_activation_mode_and_calibration(static_bundles) -> None:
    quant = json.loads((static_bundles["fused"] / "manifest.json").read_text())["quantization"]
    assert quant["recipe"]["activations"] == "static" and "activations static" in quant["scheme"]
    acts = quant["activations"]
    assert acts["mode"] == "static" and acts["observer"]["kind"] == "minmax" and acts["batches_observed"] == 3
    assert len(acts["qparams"]) == 12 and all(0 <= zp <= 255 for _, zp in acts["qparams"].values())


def test_layerwise_check_catches_a_wrong_static_scale(tiny_bert_dir, static_adapter) -> None:
    model = reference(tiny_bert_dir, static_adapter)
    g = export_graph(model, mode="merged", adapter="lo")
    layers = quantize_graph(g.model, g.weights, 7, static=static_qparams(model))
    feeds = validate.generated_feeds(VOCAB_SIZE, g.feeds)
    good, _ = validate.layerwise_error(g.model, feeds, layers, 7)
    assert good <= validate.INT8_LAYER_REL_TOL
    target = next(n for n in g.model.graph.node if n.op_type == "QuantizeLinear")
    for init in g.model.graph.initializer:
        if init.name == target.input[1]:  # a scale 1% off: the integers no longer match the fake quantizer's
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    bad, _ = validate.layerwise_error(g.model, feeds, layers, 7)
    assert bad > 100 * validate.INT8_LAYER_REL_TOL


def test_a_rows_result_does_not_depend_on_its_batch_mates(static_bundles, tiny_bert_dir, tmp_path: Path) -> None:
    feeds = {k: v.numpy() for k, v in make_inputs("bert", batch=4, seq=7, seed=5).items()}
    alone = {k: v[:1] for k, v in feeds.items()}

    def drift(bundle: Path) -> float:
        rt = Runtime(bundle, intra_op_threads=1, allow_spinning=False)
        together = rt.run(feeds, adapter="lo")["embeddings"][:1]
        return float(np.abs(rt.run(alone, adapter="lo")["embeddings"] - together).max())

    assert drift(static_bundles["fused"]) <= BATCH_INDEPENDENT_ATOL
    dynamic = AdapterModel(load_base(tiny_bert_dir)[0])
    dynamic.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), LABELS, quant=QuantConfig(weight_bits=7))
    randomize_adapters(dynamic)
    export_bundle(str(tiny_bert_dir), {"lo": save_adapter(dynamic, "lo", tmp_path / "lo")}, mode="merged",
                  precision="int8", out=tmp_path / "dynamic")
    assert drift(tmp_path / "dynamic") > DYNAMIC_BATCH_EFFECT  # the effect static removes is real here


def test_adding_an_adapter_to_a_static_bundle_is_refused(static_bundles, static_adapter) -> None:
    with pytest.raises(EdgeloraError, match=r"its int8 activation ranges are static, calibrated with the adapters it "
                                            r"was exported with; export a new bundle"):
        add_adapters(static_bundles["switchable"], {"more": static_adapter}, check=False)


def test_freeze_stops_observation_by_hand() -> None:
    model = static_model(qat_steps=100)
    freeze(model)
    assert all(layer.act_observer.frozen for _, layer in static_layers(model))


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_trains_static_and_export_follows_the_adapters_recipe(tiny_bert_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"the film was {w} w{i}", "label": w}) + "\n"
                            for i, w in enumerate(["good", "bad"] * 12)))
    adapter, bundle = tmp_path / "sentiment", tmp_path / "bundle"
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(data), "--out", str(adapter), "--rank", "2",
               "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--qat", "int8", "--weight-bits", "7",
               "--activations", "static", "--calib-batches", "2", "--observer", "moving_average",
               "--observe-steps", "1", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    extras = json.loads((adapter / "adapter_config.json").read_text())["edgelora"]
    assert extras["quantization"]["activations"] == "static"
    assert extras["training"]["calibration"]["batches"] == 2 and extras["training"]["calibration"]["qat_observe_steps"] == 1
    assert extras["static_activations"]["observer"]["kind"] == "moving_average"
    assert extras["static_activations"]["batches_observed"] == 2 + 1 and not extras["static_activations"]["still_observing"]

    rc = main(["export", str(tiny_bert_dir), "--adapter", str(adapter), "--out", str(bundle)])  # no activation flag
    assert rc == 0, capsys.readouterr().err
    quant = json.loads((bundle / "manifest.json").read_text())["quantization"]
    assert quant["activations"]["mode"] == "static" and quant["recipe"]["activations"] == "static"


@pytest.mark.parametrize(("extra", "message"), [
    (["--activations", "static"], "--activations static applies to int8 training; add --qat int8"),
    (["--qat", "int8", "--activations", "static", "--calib-batches", "0"],
     "--calib-batches 0 must be a positive number of batches"),
    (["--qat", "int8", "--activations", "static", "--observe-steps", "-1"],
     "--observe-steps -1 must be 0 (freeze after calibration) or more steps"),
])
def test_cli_refuses_bad_static_flags(tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      extra: list[str], message: str) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"the film was {w}", "label": w}) + "\n" for w in ["good", "bad"] * 4))
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(data), "--out", str(tmp_path / "a"),
               "--epochs", "1", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("edgelora: error: ") and message in err and len(err.splitlines()) == 1, err


def test_an_observer_restored_mid_qat_keeps_observing_for_the_steps_it_had_left() -> None:
    """forward reads Python copies of the phase (no device sync); loading a state dict must refresh them."""
    torch.manual_seed(0)
    obs = ActivationObserver()
    obs.observe(torch.randn(64))
    obs.start(qat_steps=3)
    obs.train()
    obs(torch.randn(64))  # 2 observed passes left
    restored = ActivationObserver()
    restored.load_state_dict(obs.state_dict())
    restored.train()
    assert not restored.frozen and int(restored.steps_left) == 2
    restored(torch.randn(64) * 5)
    assert not restored.frozen
    restored(torch.randn(64))
    frozen_copy = ActivationObserver()
    frozen_copy.load_state_dict(restored.state_dict())  # the buffers say frozen too, not only the mirror
    assert restored.frozen and frozen_copy.frozen and int(restored.batches) == 4
