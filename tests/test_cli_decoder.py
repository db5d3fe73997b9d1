"""The decoder path through the command line, as a user types it: `train --task causal-lm`, `export` (routed to
the decoder exporter by the adapter's CAUSAL_LM task), `generate`, and the flags each refuses in one line.

The base is a tiny random Llama saved with its chat tokenizer (tests/tiny_decoder.py); the checks compare the
bundle with the torch model the adapter was trained into, not with fixed strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, cli
from tiny_decoder import lm_dir, train_chat_tokenizer

from edgelora.causal_lm import CausalLMAdapterModel
from edgelora.peft_format import load_adapter
from edgelora.runtime import Runtime

TRAIN = ["--task", "causal-lm", "--data", "builtin:home-json:24", "--batch-size", "8", "--eval-generate", "2",
         "--max-new-tokens", "4"]
FP32_LOGIT_TOL = 1e-4  # the exporter's own fp32 check: same weights, only summation order differs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_decoder")
    tok = train_chat_tokenizer(root / "tok")
    return {"root": root, "base": lm_dir(root, "llama", tok)}


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    from edgelora.cli import main

    torch.set_num_threads(1)
    out = workspace["root"] / "adapters" / "home"
    assert main(["train", *TRAIN, "--base", str(workspace["base"]), "--qat", "int8", "--out", str(out)]) == 0
    return out


def test_train_causal_lm_reports_and_saves_a_causal_adapter(trained, capsys) -> None:
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["edgelora"]["quantization"]["weight_block"] == 32


def test_export_routes_a_causal_adapter_to_a_decoder_bundle_that_equals_torch(workspace, trained, capsys) -> None:
    out = workspace["root"] / "bundles" / "fp32"
    rc, stdout, err = cli(["export", workspace["base"], "--adapter", f"home={trained}", "--precision", "fp32",
                           "--out", out], capsys)
    assert rc == 0, err
    printed = json.loads(stdout)
    assert (printed["task"], printed["mode"], printed["adapters"]) == ("causal-lm", "merged", ["home"])
    model = CausalLMAdapterModel.from_base(str(workspace["base"]))
    load_adapter(model, trained)
    model.set_quant(None)  # the fp32 bundle is the float model with the adapter merged
    ids = torch.tensor([[5, 17, 33, 8, 90, 12]])
    with torch.no_grad():
        want = model.base(input_ids=ids).logits.numpy()
    session = Runtime(out).session
    L = Runtime(out).manifest.generation
    empty = np.zeros((1, L.num_kv_heads, 0, L.head_dim), np.float32)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(6, dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(L.num_layers) for kv in ("key", "value")}}
    got = session.run(["logits"], feeds)[0]
    assert np.abs(got - want).max() <= FP32_LOGIT_TOL * np.abs(want).max()
    rc, stdout, err = cli(["generate", out, "--prompt", "turn on the kitchen light", "--max-new-tokens", "5",
                           "--adapter", "home"], capsys)
    assert rc == 0, err
    assert stdout.strip() == Runtime(out).generate([{"role": "user", "content": "turn on the kitchen light"}],
                                                   adapter="home", max_new_tokens=5).strip()


def test_switchable_export_generate_and_add_adapter_from_the_command_line(workspace, trained, tmp_path, capsys) -> None:
    """`export --mode switchable` with two adapters, `generate --adapter`, then `add-adapter` a third: each
    adapter's reply through the CLI is the library's, and the merged-recipe QAT adapters carry a warning."""
    out = tmp_path / "sw8"
    rc, stdout, err = cli(["export", workspace["base"], "--adapter", f"home={trained}", "--adapter", f"twin={trained}",
                           "--mode", "switchable", "--precision", "int8", "--out", out], capsys)
    assert rc == 0, err
    printed = json.loads(stdout)
    assert (printed["mode"], printed["adapters"]) == ("switchable", ["home", "twin"])
    rt = Runtime(out)
    assert any("fake-quantized for merged deployment" in w for w in rt.manifest.warnings)
    prompt = [{"role": "user", "content": "turn on the kitchen light"}]
    for name in ("home", "twin"):
        rc, stdout, err = cli(["generate", out, "--prompt", "turn on the kitchen light", "--max-new-tokens", "5",
                               "--adapter", name], capsys)
        assert rc == 0, err
        assert stdout.strip() == rt.generate(prompt, adapter=name, max_new_tokens=5).strip()
    rc, stdout, err = cli(["add-adapter", out, "--adapter", f"third={trained}", "--base", workspace["base"]], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["adapters"] == ["home", "twin", "third"]
    again = Runtime(out)
    assert again.generate(prompt, adapter="third", max_new_tokens=5) == rt.generate(prompt, adapter="home",
                                                                                     max_new_tokens=5)
    rc, _, err = cli(["generate", out, "--prompt", "hi", "--adapter", "nope"], capsys)
    assert_one_line_error(rc, err, "no adapter 'nope'")


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--kind", "bottleneck"], "--kind applies to --task classification"),
    (["--smooth", "0.5"], "--smooth applies to --int8-scheme rowwise for causal-lm"),
    (["--weight-bits", "7"], "--weight-bits 7: causal-lm int8 uses 8-bit blocks of 32"),
    (["--int8-scheme", "rowwise"], "--int8-scheme rowwise chooses the int8 fake quantization; add --qat int8"),
    (["--qat", "int8", "--int8-scheme", "rowwise", "--smooth", "2"], "--smooth 2.0 must be between 0 and 1"),
])
def test_train_causal_lm_refuses_classification_flags(workspace, tmp_path, capsys, extra, fragment) -> None:
    rc, _, err = cli(["train", *TRAIN, "--base", workspace["base"], "--out", tmp_path / "x", *extra], capsys)
    assert_one_line_error(rc, err, fragment)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--slots", "attention"], "--slots applies to switchable bundles"),
    (["--fusions", "none"], "--fusions applies to encoder bundles"),
    (["--weight-bits", "8"], "--weight-bits 8 applies to the rowwise int8 scheme; drop it or pass --precision int8 "
                             "and --int8-scheme rowwise"),
])
def test_export_causal_lm_refuses_encoder_flags(workspace, trained, tmp_path, capsys, extra, fragment) -> None:
    rc, _, err = cli(["export", workspace["base"], "--adapter", trained, "--out", tmp_path / "b", *extra], capsys)
    assert_one_line_error(rc, err, fragment)


def test_export_attention_gqa_writes_a_gqa_graph_and_encoders_refuse_it(workspace, tmp_path, capsys) -> None:
    out = tmp_path / "gqa"
    rc, stdout, err = cli(["export", workspace["base"], "--task", "causal-lm", "--precision", "fp32",
                           "--attention", "gqa", "--out", out], capsys)
    assert rc == 0, err
    import onnx

    layers = Runtime(out).manifest.generation.num_layers  # the runtime loads the bundle
    assert sum(n.op_type == "GroupQueryAttention" for n in onnx.load(str(out / "model.onnx")).graph.node) == layers
    graph = json.loads((out / "manifest.json").read_text())["graph"]
    assert graph["attention"] == "gqa"
    head_dim = Runtime(out).manifest.generation.head_dim
    # ORT's rotary inside GroupQueryAttention takes head_dim multiples of 16; others rotate at position_ids first
    assert graph["positions"] == ("cache_index" if head_dim % 16 == 0 else "position_ids"), head_dim
    assert json.loads(stdout)["validation"]["vs_fp32_torch"]["max_rel_error"] <= FP32_LOGIT_TOL
    rc, _, err = cli(["export", "minilm", "--task", "classification", "--adapter", str(tmp_path / "none"),
                      "--attention", "gqa", "--out", tmp_path / "enc"], capsys)
    assert_one_line_error(rc, err, "--attention applies to causal-lm bundles")


def test_switchable_recipe_trains_and_exports_without_a_warning(workspace, tmp_path, capsys) -> None:
    """`--qat int8 --deploy-mode switchable`: training fake-quantizes the base alone (LoRA float), the recipe a
    switchable decoder bundle computes, so its export carries no recipe warning and passes the int8 checks."""
    out = tmp_path / "home_sw"
    rc, _, err = cli(["train", *TRAIN, "--base", workspace["base"], "--qat", "int8", "--deploy-mode", "switchable",
                      "--out", out], capsys)
    assert rc == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["edgelora"]["quantization"]["mode"] == "switchable"
    rc, stdout, err = cli(["export", workspace["base"], "--adapter", f"home={out}", "--mode", "switchable",
                           "--precision", "int8", "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    manifest = Runtime(tmp_path / "b").manifest
    assert manifest.warnings is None
    assert manifest.entry("home").trained_with["modes"] == ["switchable"]
    rc, _, err = cli(["train", *TRAIN, "--base", workspace["base"], "--deploy-mode", "switchable", "--out",
                      tmp_path / "x"], capsys)
    assert_one_line_error(rc, err, "--deploy-mode switchable chooses the int8 fake quantization; add --qat int8")


# The rowwise int8 bundle against the torch model it was trained as, relative to the largest |logit|: the same
# integers on both sides (tests/test_decoder_rowwise.py), float sums in another order, ~1e-6 measured here.
ROWWISE_LOGIT_TOL = 1e-4


def _logits(session, manifest, ids: torch.Tensor) -> np.ndarray:
    L = manifest.generation
    empty = np.zeros((1, L.num_kv_heads, 0, L.head_dim), np.float32)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(L.num_layers) for kv in ("key", "value")}}
    return session.run(["logits"], feeds)[0]


def test_rowwise_trains_and_exports_as_trained_and_the_plain_base_shares_its_factors(workspace, tmp_path, capsys):
    """`--int8-scheme rowwise` at training: the adapter saves the recipe and SmoothQuant factors; its export takes
    the scheme without the flag and computes the trained model's logits; the plain base's rowwise export has the
    very same factors (both from the frozen base on fixed text), so adapters and base can share a bundle."""
    from edgelora import smooth

    adapter = tmp_path / "home_rw"
    rc, _, err = cli(["train", *TRAIN, "--base", workspace["base"], "--qat", "int8", "--int8-scheme", "rowwise",
                      "--weight-bits", "7", "--out", adapter], capsys)
    assert rc == 0, err
    quant = json.loads((adapter / "adapter_config.json").read_text())["edgelora"]["quantization"]
    assert (quant["activations"], quant["weight_bits"], quant["smoothing"], quant["weight_block"]) == ("per-row", 7, 0.5, 32)
    assert quant["block_layers"] == ["lm_head", "mlp.c_proj", "mlp.down_proj"]
    factors = smooth.load_factors(adapter)
    assert factors and not any("down_proj" in n or "lm_head" in n for n in factors)
    out = tmp_path / "merged"
    rc, _, err = cli(["export", workspace["base"], "--adapter", f"home={adapter}", "--out", out], capsys)
    assert rc == 0, err
    manifest = Runtime(out).manifest
    assert manifest.quantization.int8_scheme == "rowwise" and manifest.quantization.weight_bits == 7
    assert manifest.quantization.smoothing_digest == smooth.factors_digest(factors)
    model = CausalLMAdapterModel.from_base(str(workspace["base"]))
    load_adapter(model, adapter)  # the fake-quant model training ended with, factors included
    ids = torch.tensor([[5, 17, 33, 8, 90, 12]])
    with torch.no_grad():
        want = model(ids)[0].numpy()
    got = _logits(Runtime(out).session, manifest, ids)
    assert np.abs(got - want).max() <= ROWWISE_LOGIT_TOL * np.abs(want).max()
    rc, _, err = cli(["export", workspace["base"], "--task", "causal-lm", "--int8-scheme", "rowwise",
                      "--out", tmp_path / "base"], capsys)
    assert rc == 0, err
    assert Runtime(tmp_path / "base").manifest.quantization.smoothing_digest == smooth.factors_digest(factors)
    rc, _, err = cli(["export", workspace["base"], "--adapter", f"home={adapter}", "--int8-scheme", "block",
                      "--out", tmp_path / "x"], capsys)
    assert_one_line_error(rc, err, "was trained with the rowwise int8 scheme; export it with --int8-scheme rowwise")
    rc, _, err = cli(["export", workspace["base"], "--adapter", f"home={adapter}", "--precision", "fp32",
                      "--int8-scheme", "rowwise", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(rc, err, "--int8-scheme rowwise applies to int8 exports; drop it or pass --precision int8")
    rc, _, err = cli(["export", "minilm", "--task", "classification", "--int8-scheme", "rowwise",
                      "--out", tmp_path / "enc"], capsys)
    assert_one_line_error(rc, err, "--int8-scheme applies to causal-lm bundles")
    rc, _, err = cli(["train", "--data", "builtin:intent", "--int8-scheme", "rowwise", "--out", tmp_path / "enc"], capsys)
    assert_one_line_error(rc, err, "--int8-scheme applies to --task causal-lm; drop it for --task classification")


def test_rowwise_switchable_export_and_add_adapter(workspace, trained, tmp_path, capsys) -> None:
    """An adapter trained for a switchable rowwise bundle exports into one that passes the mixed-batch check; a
    block-trained adapter is refused there and by `add-adapter` in one line; `add-adapter` takes another adapter
    trained with the bundle's factors, checked against the fake-quant model with them."""
    adapter = tmp_path / "sw_rw"
    rc, _, err = cli(["train", *TRAIN, "--base", workspace["base"], "--qat", "int8", "--int8-scheme", "rowwise",
                      "--deploy-mode", "switchable", "--out", adapter], capsys)
    assert rc == 0, err
    out = tmp_path / "sw"
    rc, stdout, err = cli(["export", workspace["base"], "--adapter", f"home={adapter}", "--mode", "switchable",
                           "--out", out], capsys)
    assert rc == 0, err
    manifest = Runtime(out).manifest
    assert manifest.quantization.int8_scheme == "rowwise" and manifest.warnings is None
    assert json.loads(stdout)["validation"]["mixed batch (bank)"]["max_rel_error_vs_alone"] == 0.0
    rc, _, err = cli(["export", workspace["base"], "--adapter", f"home={trained}", "--mode", "switchable",
                      "--int8-scheme", "rowwise", "--out", tmp_path / "x"], capsys)
    assert_one_line_error(rc, err, "was trained with the block int8 scheme")
    rc, _, err = cli(["add-adapter", out, "--adapter", f"block={trained}", "--base", workspace["base"]], capsys)
    assert_one_line_error(rc, err, f"{trained}: adapter was trained with the block int8 scheme, bundle {out} is "
                                   "rowwise; retrain it with the rowwise scheme or export a new bundle with it")
    rc, _, err = cli(["add-adapter", out, "--adapter", f"more={adapter}", "--base", workspace["base"]], capsys)
    assert rc == 0, err
    manifest = Runtime(out).manifest
    assert manifest.adapter_names == ("home", "more")
    assert manifest.validation["more"]["vs_fake_quant_torch"]["max_rel_error"] <= 1e-4, manifest.validation["more"]
    gen = Runtime(out).generator()
    assert gen.generate("turn on the light", "more", max_new_tokens=6) == \
        gen.generate("turn on the light", "home", max_new_tokens=6)  # the same weights under two names
