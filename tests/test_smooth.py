"""Claims about SmoothQuant: the factors, the function they preserve, the error they remove, and the export.

Smoothing divides a layer's int8 input by s per channel and multiplies the weight's columns by s, so in
real numbers nothing changes; only the int8 rounding does. Training fake-quantizes Q(x/s) Q(W s) and the
exported graph computes the same with a Mul in front of the quantizer, checked layer by layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from conftest import (INT8_LAYER_REL_TOL, KEYWORD_CONFIG, KEYWORD_EVAL, KEYWORD_LABELS, KEYWORD_TRAIN, WEIGHT_BITS,
                      Crash, assert_one_line_error, crash_after, make_inputs, randomize_adapters, write_jsonl)
from torch import nn

from edgelora.config import LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.export import export_bundle
from edgelora.extract import reduce_adapter
from edgelora.fake_quant import fake_quantize_activation, fake_quantize_weight, quantize_weight
from edgelora.layers import AdaptedLinear
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.smooth import SMOOTHING_FILE, current_factors, smooth_model, smoothing_factors

# x/s times W s against x W in float32: one extra rounding per product (measured ~1e-7 relative).
REAL_NUMBERS_RTOL = 1e-5
# int8 ONNX against the fake-quant torch model end to end on the tiny base: measured 0.99999994 (merged) and
# 1.0 (switchable); the same export with another adapter's factors measured 0.99996, so 1e-5 tells them apart.
INT8_SMOOTHED_MIN_COSINE = 1 - 1e-5
ALPHA = 0.5


def smoothed_model(base_dir: Path, alpha: float = ALPHA, mode: str = "merged") -> AdapterModel:
    model = AdapterModel(load_base(base_dir)[0])
    quant = QuantConfig(weight_bits=WEIGHT_BITS, mode=mode, smoothing=alpha)
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["neg", "pos"], quant=quant)
    smooth_model(model, [make_inputs("bert", batch=4, seed=s) for s in range(2)], alpha)
    randomize_adapters(model)
    return model.eval()


def test_layers_reading_one_tensor_share_factors_that_follow_the_formula(tiny_bert_dir: Path) -> None:
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.set_quant(QuantConfig(weight_bits=WEIGHT_BITS))
    model.set_quant(None)
    feeds = [make_inputs("bert", batch=4, seed=s) for s in range(2)]
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda mod, args, n=name: seen.__setitem__(n, torch.maximum(seen.get(n, torch.zeros(args[0].shape[-1])),
                                                                    args[0].abs().flatten(0, -2).amax(0))))
        for name, layer in model.adapted_layers()]
    with torch.no_grad():
        for f in feeds:
            model(**f)
    for h in hooks:
        h.remove()
    factors = smoothing_factors(model, feeds, ALPHA)
    layers = dict(model.adapted_layers())
    prefix = "encoder.layer.0.attention.self."
    q, k, v = (factors[prefix + p] for p in ("query", "key", "value"))
    assert torch.equal(q, k) and torch.equal(q, v)
    w_max = torch.stack([layers[prefix + p].base.weight.abs().amax(0) for p in ("query", "key", "value")]).amax(0)
    expected = seen[prefix + "query"].pow(ALPHA) / w_max.pow(1 - ALPHA)
    torch.testing.assert_close(q, expected, rtol=1e-6, atol=0)
    out = "encoder.layer.0.output.dense"  # reads the GELU output alone: its own factors
    assert factors[out].shape == (layers[out].in_features,) and not torch.equal(factors[out][:4], q[:4])


def test_smoothing_leaves_the_real_number_product_unchanged() -> None:
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(16, 8))
    x = torch.randn(5, 16)
    s = torch.rand(16) * 10 + 0.1
    layer.set_smoothing(s)
    y = (x * layer.smooth_inv) @ layer.smoothed_weight(layer.base.weight).T + layer.base.bias
    torch.testing.assert_close(y, layer.base(x), rtol=REAL_NUMBERS_RTOL, atol=1e-6)


def test_smoothing_cuts_the_int8_error_of_an_outlier_channel() -> None:
    """One input channel 50x the rest (a LayerNorm outlier): per-tensor uint8 spends its levels on it."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(256, 64)
    x[:, 3] *= 50.0
    exact = linear(x).detach()

    def int8_error(layer: AdaptedLinear) -> float:
        layer.quant = QuantConfig(weight_bits=8)
        with torch.no_grad():
            return float((layer(x) - exact).norm() / exact.norm())

    plain = AdaptedLinear(linear)
    before = int8_error(plain)
    smoothed = AdaptedLinear(linear)
    w_max = linear.weight.detach().abs().amax(0)
    smoothed.set_smoothing(x.abs().amax(0).pow(ALPHA) / w_max.pow(1 - ALPHA))
    after = int8_error(smoothed)
    assert after < before / 3, (before, after)


def test_smoothed_layer_fake_quantizes_the_smoothed_operands() -> None:
    torch.manual_seed(1)
    layer = AdaptedLinear(nn.Linear(12, 6))
    layer.quant = QuantConfig(weight_bits=WEIGHT_BITS)
    layer.set_smoothing(torch.rand(12) + 0.5)
    x = torch.randn(3, 12)
    expected = torch.nn.functional.linear(
        fake_quantize_activation(x * layer.smooth_inv),
        fake_quantize_weight(layer.base.weight * layer.smooth, WEIGHT_BITS), layer.base.bias)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("mode", ["merged", "switchable"])
def test_smoothed_int8_export_matches_fake_quant(tiny_bert_dir: Path, tmp_path: Path, mode: str) -> None:
    model = smoothed_model(tiny_bert_dir, mode=mode)
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    assert (adapter / SMOOTHING_FILE).is_file()
    out = tmp_path / "bundle"
    manifest = export_bundle(tiny_bert_dir, {"lo": adapter}, mode=mode, precision="int8", out=out).to_dict()
    quant = manifest["quantization"]
    assert quant["smoothing"]["from"] == "adapter training recipe" and quant["recipe"]["smoothing"] == ALPHA
    graph = onnx.load(str(out / "model.onnx")).graph
    assert sum(n.name.endswith(tuple(f"_SmoothMul_{i}" for i in range(64))) for n in graph.node) >= 2
    # Every int8 layer (QAttention included) equals the fake-quant product of its smoothed input.
    figures = manifest["validation"]["lo"]["int8_layers_vs_fake_quant"]
    assert figures["max_rel_error"] <= INT8_LAYER_REL_TOL, figures
    inits = {i.name: i for i in graph.initializer}
    # The graph's Mul constants are the very float32 1/s the fake quantizer multiplied by, one per shared input.
    in_graph = {numpy_helper.to_array(inits[n.input[1]]).tobytes() for n in graph.node if "_SmoothMul_" in n.name}
    assert in_graph == {layer.smooth_inv.numpy().tobytes() for _, layer in model.adapted_layers()}
    layer = dict(model.adapted_layers())["encoder.layer.0.output.dense"]
    weight = layer.base.weight + (layer.lora_delta("lo") if mode == "merged" else 0)
    q, _ = quantize_weight(layer.smoothed_weight(weight).detach(), WEIGHT_BITS)
    stored = numpy_helper.to_array(inits["model.base.encoder.layer.0.output.dense.weight_q"]).T  # (out, in)
    assert np.array_equal(stored, q.numpy())  # the int8 grid of W diag(s), not of W
    feeds = make_inputs("bert", batch=3, seed=7)
    reloaded = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(reloaded, adapter, "lo")
    reloaded.eval()
    with torch.no_grad():
        want = reloaded(**feeds)[1].numpy()
    rt = Runtime(out, intra_op_threads=1, allow_spinning=False)
    got = rt.run({k: v.numpy() for k, v in feeds.items()}, adapter="lo")["embeddings"]
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= INT8_SMOOTHED_MIN_COSINE


def test_factors_round_trip_with_the_adapter(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = smoothed_model(tiny_bert_dir)
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    again = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(again, adapter, "lo")
    held, saved = current_factors(model), current_factors(again)
    assert set(held) == set(saved) and all(torch.equal(held[k], saved[k]) for k in held)
    assert json.loads((adapter / "adapter_config.json").read_text())["edgelora"]["quantization"]["smoothing"] == ALPHA


def test_reducing_the_rank_keeps_the_factors(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = smoothed_model(tiny_bert_dir)
    reduced = tmp_path / "lo-r2"
    reduce_adapter(save_adapter(model, "lo", tmp_path / "lo"), reduced, rank=2)
    again = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(again, reduced, "lo")  # refuses an adapter whose recipe says smoothing but has no factors
    held, kept = current_factors(model), current_factors(again)
    assert set(held) == set(kept) and all(torch.equal(held[k], kept[k]) for k in held)


def test_post_training_smoothing_at_export(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("lo", LoraConfig(r=4, alpha=8.0), labels=["neg", "pos"])
    randomize_adapters(model)
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    manifest = export_bundle(tiny_bert_dir, {"lo": adapter}, mode="merged", precision="int8", out=tmp_path / "b",
                             smooth_alpha=0.6).to_dict()
    smoothing = manifest["quantization"]["smoothing"]
    assert smoothing["alpha"] == 0.6 and smoothing["from"].startswith("export")
    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    muls = [n for n in graph.node if "_SmoothMul_" in n.name]
    # One Mul per distinct int8 input: per layer, q/k/v sharing one (the fused attention's input).
    assert smoothing["layers"] == 12 and len(muls) == 2 * 4, (smoothing, [n.name for n in muls])


def test_smoothing_mismatches_are_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    smoothed = save_adapter(smoothed_model(tiny_bert_dir), "lo", tmp_path / "smoothed")
    plain_model = AdapterModel(load_base(tiny_bert_dir)[0])
    plain_model.add_adapter("pl", LoraConfig(r=4), labels=["a", "b"], quant=QuantConfig(weight_bits=WEIGHT_BITS))
    plain = save_adapter(plain_model, "pl", tmp_path / "plain")
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(model, smoothed, "lo")
    with pytest.raises(EdgeloraError, match="trained with smoothing=None but the adapters already loaded use 0.5"):
        load_adapter(model, plain, "pl")
    assert "pl" not in model.configs
    with pytest.raises(EdgeloraError, match="differs from the smoothing"):
        export_bundle(tiny_bert_dir, {"lo": smoothed}, mode="merged", precision="int8", out=tmp_path / "b",
                      smooth_alpha=0.9)
    with pytest.raises(EdgeloraError, match="smooth_alpha applies to int8"):
        export_bundle(tiny_bert_dir, {"lo": smoothed}, mode="merged", precision="fp32", out=tmp_path / "c",
                      smooth_alpha=0.5)
    (smoothed / SMOOTHING_FILE).unlink()
    with pytest.raises(EdgeloraError, match="disagree on smoothing"):
        load_adapter(AdapterModel(load_base(tiny_bert_dir)[0]), smoothed, "lo")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5"])
def test_quant_config_refuses_a_bad_alpha(alpha) -> None:
    with pytest.raises(EdgeloraError, match="smoothing=.* between 0 and 1"):
        QuantConfig(smoothing=alpha)


# --- the command line ------------------------------------------------------------------------------------


def test_cli_trains_with_smoothing_and_exports_with_chosen_fusions_and_fp32_layers(
        tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    from edgelora.cli import main

    data = write_jsonl(tmp_path / "train.jsonl")
    adapter, bundle = tmp_path / "sm", tmp_path / "bundle"
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(data), "--out", str(adapter), "--rank", "4",
               "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--qat", "int8", "--weight-bits", "7",
               "--smooth", "0.7", "--calib-batches", "2", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    config = json.loads((adapter / "adapter_config.json").read_text())["edgelora"]
    assert config["quantization"]["smoothing"] == 0.7 and config["training"]["smoothing"]["batches"] == 2
    keep = "encoder.layer.0.output.dense"
    rc = main(["export", str(tiny_bert_dir), "--adapter", str(adapter), "--precision", "int8", "--fusions", "none",
               "--keep-fp32", keep, "--out", str(bundle)])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["fusions"]["applied"] == {} and manifest["quantization"]["fp32_layers"] == [keep]
    assert manifest["quantization"]["smoothing"]["from"] == "adapter training recipe"


@pytest.mark.parametrize("args, fragment", [
    (["--fusions", "attention,bogus"], "--fusions 'attention,bogus': choose from"),
    (["--keep-fp32", ","], "--keep-fp32 ',': give 'auto'"),
    (["--keep-fp32", "auto", "--target-cosine", "2"], "--target-cosine 2.0 must be in (0, 1]"),
    (["--smooth", "0.5", "--precision", "fp32"], "--smooth applies to int8"),
    (["--smooth", "1.5"], "--smooth 1.5 must be between 0 and 1"),
    (["--target-cosine", "0.99"], "--target-cosine is the goal of --keep-fp32 auto"),
])
def test_cli_export_flag_mistakes_are_one_line(tiny_bert_dir: Path, tmp_path: Path, args: list[str], fragment: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:

    from edgelora.cli import main

    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("lo", LoraConfig(r=2), labels=["a", "b"])
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    rc = main(["export", str(tiny_bert_dir), "--adapter", str(adapter), *args, "--out", str(tmp_path / "b")])
    assert_one_line_error(rc, capsys.readouterr().err, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--smooth", "0.5"], "--smooth applies to int8 training"),
    (["--qat", "int8", "--smooth", "-0.5"], "--smooth -0.5 must be between 0 and 1"),
    (["--qat", "int8", "--observer", "percentile"], "--observer and --observe-steps set how static ranges"),
    (["--qat", "int8", "--deploy-mode", "switchable", "--init", "int8-residual", "--smooth", "0.5"],
     "--smooth with --init int8-residual"),
])
def test_cli_train_smooth_mistakes_are_one_line(tiny_bert_dir: Path, tmp_path: Path, args: list[str], fragment: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:

    from edgelora.cli import main

    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(write_jsonl(tmp_path / "d.jsonl")),
               "--out", str(tmp_path / "a"), *args])
    assert_one_line_error(rc, capsys.readouterr().err, fragment)


def test_post_training_smoothing_of_a_static_adapter_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Static ranges were calibrated on unsmoothed inputs: smoothing them afterwards would void them."""
    from edgelora.calibrate import calibrate

    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("lo", LoraConfig(r=2), labels=["a", "b"],
                      quant=QuantConfig(weight_bits=WEIGHT_BITS, activations="static"))
    calibrate(model, [make_inputs("bert", batch=4, seed=0)])
    adapter = save_adapter(model, "lo", tmp_path / "lo")
    with pytest.raises(EdgeloraError, match="calibrated on unsmoothed inputs"):
        export_bundle(tiny_bert_dir, {"lo": adapter}, mode="merged", precision="int8", out=tmp_path / "b",
                      smooth_alpha=0.5)


# --- resume ------------------------------------------------------------------------------------------------


def test_resume_keeps_the_smoothing_factors_and_refuses_others(tokenizer, tmp_path: Path) -> None:
    """The factors live outside the checkpointed state: a resume recomputes them and must land on the same."""
    from edgelora.train import CheckpointConfig, _adapter_state, train_adapter

    def run(alpha: float, checkpoint: CheckpointConfig | None = None, on_step=None):
        from conftest import make_base

        model = AdapterModel(make_base("bert"))
        model.add_adapter("task", LoraConfig(r=4, alpha=8.0, dropout=0.1), KEYWORD_LABELS,
                          quant=QuantConfig(weight_bits=WEIGHT_BITS, smoothing=alpha))
        smooth_model(model, [make_inputs("bert", batch=4, seed=0)], alpha)

        def progress(msg: str) -> None:
            if on_step:
                on_step(int(msg.split("step ")[1].split("/")[0]), model)

        train_adapter(model, "task", tokenizer, *KEYWORD_TRAIN, *KEYWORD_EVAL, config=KEYWORD_CONFIG, progress=progress,
                      checkpoint=checkpoint)
        return {k: v.detach().clone() for k, v in _adapter_state(model, "task").items()}

    whole = run(ALPHA)
    with pytest.raises(Crash):
        run(ALPHA, CheckpointConfig(tmp_path, every=2), crash_after(7))
    with pytest.raises(EdgeloraError, match=r"another run \(different .*smoothing factors"):
        run(0.9, CheckpointConfig(tmp_path, every=2, resume=True))
    resumed = run(ALPHA, CheckpointConfig(tmp_path, every=2, resume=True))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_add_adapter_needs_the_bundles_smoothing(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The factors are baked into the int8 base graph: an added adapter must have trained with the same ones."""
    from edgelora.exporters.add import add_adapters

    first = smoothed_model(tiny_bert_dir, mode="switchable")
    first_dir = save_adapter(first, "lo", tmp_path / "lo")
    bundle = tmp_path / "bundle"
    export_bundle(tiny_bert_dir, {"lo": first_dir}, mode="switchable", precision="int8", out=bundle,
                  lora_slots="attention+mlp")
    same = AdapterModel(load_base(tiny_bert_dir)[0])  # another task, the same factors (same base, same feeds)
    same.add_adapter("two", LoraConfig(r=4, alpha=8.0, include_mlp=True), labels=["x", "y", "z"],
                     quant=QuantConfig(weight_bits=WEIGHT_BITS, mode="switchable", smoothing=ALPHA))
    smooth_model(same, [make_inputs("bert", batch=4, seed=s) for s in range(2)], ALPHA)
    randomize_adapters(same, seed=5)
    manifest = add_adapters(bundle, {"two": save_adapter(same, "two", tmp_path / "two")}).to_dict()
    assert [a["name"] for a in manifest["adapters"]] == ["lo", "two"]
    other = save_adapter(smoothed_model(tiny_bert_dir, alpha=0.9, mode="switchable"), "lo", tmp_path / "other")
    with pytest.raises(EdgeloraError, match="trained with other SmoothQuant factors than bundle"):
        add_adapters(bundle, {"three": other})
    plain_model = AdapterModel(load_base(tiny_bert_dir)[0])
    plain_model.add_adapter("pl", LoraConfig(r=4), labels=["a", "b"],
                            quant=QuantConfig(weight_bits=WEIGHT_BITS, mode="switchable"))
    with pytest.raises(EdgeloraError, match="trained without SmoothQuant but bundle .* smooths"):
        add_adapters(bundle, {"pl": save_adapter(plain_model, "pl", tmp_path / "plain")})


def test_factors_for_another_shape_are_refused_naming_the_file(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = save_adapter(smoothed_model(tiny_bert_dir), "lo", tmp_path / "lo")
    factors = load_file(str(adapter / SMOOTHING_FILE))
    name = sorted(factors)[0]
    save_file({**factors, name: factors[name][:-1].contiguous()}, str(adapter / SMOOTHING_FILE))
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    with pytest.raises(EdgeloraError, match=rf"{SMOOTHING_FILE}: smoothing factors must be \d+ positive numbers"):
        load_adapter(model, adapter, "lo")
    assert "lo" not in model.configs and current_factors(model) == {}
