"""Claims about `edgelora calibrate`, static post-training quantization from the command line.

A plain adapter (trained without fake quantization) gets activation ranges calibrated on its own training
batches, the same ones `train --activations static` would draw; its weights and head stay as trained; the
static int8 bundle exported from it reproduces the static fake-quant torch model; and a user's mistake
(an adapter already calibrated, another int8 recipe, --out over the input, bad counts) is one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import (INT8_MIN_COSINE, make_base, make_inputs, randomize_adapters, snapshot, worst_cosine, write_jsonl,
                      write_tokenizer)
from safetensors.torch import load_file

from edgelora.calibrate import ObserverConfig, calibrate, static_qparams, text_batches
from edgelora.cli import main
from edgelora.config import LoraConfig, QuantConfig
from edgelora.data import load_splits
from edgelora.exporters import validate
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.tokenize import load_tokenizer

LABELS = ["neg", "pos"]  # write_jsonl's labels
CALIB = ["--calib-batches", "3", "--batch-size", "8", "--max-length", "16", "--seed", "1"]


def save_trained(base_dir: Path, out: Path, quant: QuantConfig | None = None) -> Path:
    """A LoRA adapter with random (non-zero) B on every projection, saved as `train` would save it."""
    model = AdapterModel(load_base(base_dir)[0])
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0, include_mlp=True), LABELS, quant=quant)
    randomize_adapters(model)
    return save_adapter(model, "task", out)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("calib_data") / "train.jsonl")


@pytest.fixture(scope="module")
def plain(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_trained(tiny_bert_dir, tmp_path_factory.mktemp("plain") / "task")


@pytest.fixture(scope="module")
def calibrated(tiny_bert_dir: Path, plain: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibrated") / "task-static"
    rc = main(["calibrate", str(plain), "--base", str(tiny_bert_dir), "--data", str(data_file), "--out", str(out),
               "--weight-bits", "7", *CALIB])
    assert rc == 0
    return out


def run_calibrate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["calibrate", *args])
    return rc, capsys.readouterr().err


def test_calibrate_adds_a_static_recipe_and_leaves_the_trained_weights(calibrated: Path, plain: Path) -> None:
    extras = json.loads((calibrated / "adapter_config.json").read_text())["edgelora"]
    assert extras["quantization"] == {"weight_bits": 7, "activations": "static", "mode": "merged", "skip_layers": [],
                                      "smoothing": None}
    assert extras["calibration"]["batches"] == 3 and extras["calibration"]["after_training"]
    assert extras["static_activations"]["batches_observed"] == 3 and len(extras["static_activations"]["layers"]) == 12
    before, after = load_file(str(plain / WEIGHTS_FILE)), load_file(str(calibrated / WEIGHTS_FILE))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ranges_are_the_api_calibration_on_the_seeded_training_batches(calibrated: Path, plain: Path,
                                                                       tiny_bert_dir: Path, data_file: Path) -> None:
    """The CLI draws the training split and batches the way `train --activations static` does (load_splits
    and text_batches with --seed) and calibrates the trained adapter on them: the API gives the same ranges."""
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(model, plain)
    model.set_quant(QuantConfig(weight_bits=7, activations="static"))
    train_ds, _ = load_splits(str(data_file), None, seed=1)
    batches = text_batches(load_tokenizer(tiny_bert_dir, 16), train_ds.texts, 3, 8, seed=1)
    calibrate(model, batches, ObserverConfig("minmax"))
    saved = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(saved, calibrated)
    assert static_qparams(saved) == static_qparams(model)


def test_static_bundle_from_a_calibrated_adapter_matches_static_fake_quant(calibrated: Path, tiny_bert_dir: Path,
                                                                           tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", str(tiny_bert_dir), "--adapter", f"task={calibrated}", "--precision", "int8",
                 "--max-length", "16", "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["activations"]["mode"] == "static"
    assert manifest["validation"]["task"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= validate.INT8_LAYER_REL_TOL
    ops = {n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops  # constant scales, none computed per call
    feeds = make_inputs("bert", batch=4, seed=3)
    got = Runtime(bundle, intra_op_threads=1, allow_spinning=False).run(
        {k: v.numpy() for k, v in feeds.items()}, adapter="task")["embeddings"]
    reference = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(reference, calibrated)
    with torch.no_grad():
        want = reference.eval()(**feeds)[1].numpy()
        reference.set_quant(None)
        fp32 = reference(**feeds)[1].numpy()
    assert not np.allclose(want, fp32, atol=1e-4)  # the static quantizer really changes the output being matched
    assert worst_cosine(got, want) >= INT8_MIN_COSINE


def test_with_eval_data_all_of_data_is_the_training_split(plain: Path, tiny_bert_dir: Path, data_file: Path,
                                                         tmp_path: Path) -> None:
    """`train --eval FILE` trains on the whole of --data; calibrate with the same --eval draws from all of it."""
    out = tmp_path / "with-eval"
    assert main(["calibrate", str(plain), "--base", str(tiny_bert_dir), "--data", str(data_file), "--eval",
                 str(data_file), "--out", str(out), "--weight-bits", "7", *CALIB]) == 0
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(model, plain)
    model.set_quant(QuantConfig(weight_bits=7, activations="static"))
    train_ds, _ = load_splits(str(data_file), str(data_file), seed=1)
    calibrate(model, text_batches(load_tokenizer(tiny_bert_dir, 16), train_ds.texts, 3, 8, seed=1), ObserverConfig("minmax"))
    saved = AdapterModel(load_base(tiny_bert_dir)[0])
    load_adapter(saved, out)
    assert static_qparams(saved) == static_qparams(model)


def test_a_dynamic_qat_adapter_keeps_its_recipe_and_gains_static_ranges(tiny_bert_dir: Path, data_file: Path,
                                                                        tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    qat = save_trained(tiny_bert_dir, tmp_path / "qat", QuantConfig(weight_bits=7, mode="switchable"))
    rc, err = run_calibrate(capsys, str(qat), "--base", str(tiny_bert_dir), "--data", str(data_file),
                            "--out", str(tmp_path / "out"), *CALIB)
    assert rc == 0, err
    recipe = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["edgelora"]["quantization"]
    assert (recipe["weight_bits"], recipe["mode"], recipe["activations"]) == (7, "switchable", "static")


@pytest.mark.parametrize(("extra", "message"), [
    (["--calib-batches", "0"], "--calib-batches 0 must be a positive number of batches"),
    (["--batch-size", "0"], "--batch-size 0 must be a positive number of texts"),
    (["--max-length", "0"], "--max-length 0 must be a positive number of tokens"),
    (["--weight-bits", "6"], "--weight-bits 6 is not supported; choose 7, 8 or auto"),
])
def test_bad_counts_are_refused(plain: Path, tiny_bert_dir: Path, data_file: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    rc, err = run_calibrate(capsys, str(plain), "--base", str(tiny_bert_dir), "--data", str(data_file),
                            "--out", str(tmp_path / "out"), *extra)
    assert rc == 2 and err.startswith("edgelora: error: ") and message in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_out_equal_to_the_input_is_refused_and_the_adapter_kept(plain: Path, tiny_bert_dir: Path, data_file: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(plain)
    rc, err = run_calibrate(capsys, str(plain), "--base", str(tiny_bert_dir), "--data", str(data_file),
                            "--out", str(plain / ".." / plain.name))
    assert rc == 2 and "is ADAPTER_DIR itself; write the calibrated adapter to a new directory" in err, err
    assert snapshot(plain) == before


def test_an_adapter_with_static_ranges_is_refused(calibrated: Path, tiny_bert_dir: Path, data_file: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_calibrate(capsys, str(calibrated), "--base", str(tiny_bert_dir), "--data", str(data_file),
                            "--out", str(tmp_path / "again"))
    assert rc == 2 and f"{calibrated}: already has static activation ranges; export it as it is" in err, err


@pytest.mark.parametrize("extra", [["--weight-bits", "8"], ["--deploy-mode", "merged"]])
def test_calibrating_a_qat_adapter_for_another_recipe_is_refused(tiny_bert_dir: Path, data_file: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 extra: list[str]) -> None:
    qat = save_trained(tiny_bert_dir, tmp_path / "qat", QuantConfig(weight_bits=7, mode="switchable"))
    rc, err = run_calibrate(capsys, str(qat), "--base", str(tiny_bert_dir), "--data", str(data_file),
                            "--out", str(tmp_path / "out"), *extra)
    assert rc == 2 and "trained with --qat int8 for 7-bit weights, switchable mode" in err, err
    assert "drop --weight-bits and --deploy-mode" in err and not (tmp_path / "out").exists()


def test_data_of_another_task_is_refused(plain: Path, tiny_bert_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": f"good bad {w} {i}", "label": w}) + "\n"
                             for i, w in enumerate(["yes", "no"] * 10)))
    rc, err = run_calibrate(capsys, str(plain), "--base", str(tiny_bert_dir), "--data", str(other),
                            "--out", str(tmp_path / "out"))
    assert rc == 2 and "has labels ['no', 'yes'] but" in err and "trained on ['neg', 'pos']" in err, err


def test_an_adapter_for_another_base_is_refused(plain: Path, data_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    other_base = tmp_path / "other_base"
    make_base("bert", seed=1).save_pretrained(other_base)
    write_tokenizer(other_base)
    rc, err = run_calibrate(capsys, str(plain), "--base", str(other_base), "--data", str(data_file),
                            "--out", str(tmp_path / "out"), *CALIB)
    assert rc == 2 and "adapter was trained on another base" in err, err
