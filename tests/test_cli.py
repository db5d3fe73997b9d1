"""Claims about the `edgelora` command: every verb has --help, train -> export -> run works end to end on a
tiny base, and a user's mistake prints one `edgelora: error:` line on stderr and exits 2, never a traceback.

Verbs run in-process through `edgelora.cli.main` (fast); one check runs the installed console script in a
subprocess, where a traceback or a stray warning would really reach the user's terminal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, write_jsonl

from edgelora.cli import main

VERBS = ("train", "export", "run", "bench")
# fp32 ONNX Runtime vs eager torch on a tiny BERT: the same arithmetic in another order
FP32_SCORE_ATOL = 1e-5


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def fp32_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A switchable fp32 bundle with one (untrained) LoRA adapter named "task", written through the API."""
    from edgelora.config import LoraConfig
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import save_adapter

    root = tmp_path_factory.mktemp("cli_bundle")
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("task", LoraConfig(r=2), labels=["neg", "pos"])
    save_adapter(model, "task", root / "task")
    export_bundle(str(tiny_bert_dir), {"task": root / "task"}, mode="switchable", precision="fp32", out=root / "bundle")
    return root / "bundle"


# --- help ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[]] + [[verb] for verb in VERBS], ids=["edgelora", *VERBS])
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: edgelora {' '.join(argv)}".rstrip())


# --- the round trip ----------------------------------------------------------------------------------------


def test_train_then_export_then_run(tiny_bert_dir: Path, data_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    adapter, bundle = tmp_path / "sentiment", tmp_path / "bundle"
    # 12 epochs: with --seed now deciding the adapter's initial weights, 8 epochs left seed 0 calling
    # "the film was good" neg; 12 give the expected labels for seeds 0-7 (measured).
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(data_file), "--out", str(adapter),
               "--rank", "4", "--epochs", "12", "--batch-size", "8", "--lr", "2e-2", "--max-length", "16",
               "--qat", "int8", "--weight-bits", "7", "--device", "cpu"])
    trained = json.loads(capsys.readouterr().out)
    assert rc == 0 and trained["adapter"] == "sentiment" and (adapter / "adapter_config.json").is_file()
    assert trained["eval_accuracy"] == 1.0  # one cue word decides the class: the tiny base learns it

    rc = main(["export", str(tiny_bert_dir), "--adapter", str(adapter), "--mode", "switchable",
               "--precision", "int8", "--out", str(bundle)])
    exported = json.loads(capsys.readouterr().out)
    assert rc == 0 and exported["adapters"] == ["sentiment"] and exported["precision"] == "int8"
    assert json.loads((bundle / "manifest.json").read_text())["quantization"]["weight_bits"] == 7  # the QAT recipe

    texts = ["the film was good", "a bad movie", "good", "w3 bad w4"]
    rc = main(["run", str(bundle), "--adapter", "sentiment", "--threads", "1", *sum((["--text", t] for t in texts), [])])
    predictions = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [p["text"] for p in predictions] == texts
    assert [p["label"] for p in predictions] == ["pos", "neg", "pos", "neg"]
    assert all(set(p["scores"]) == {"neg", "pos"} and p["score"] == max(p["scores"].values()) for p in predictions)


# --- mistakes: one line, exit 2 ------------------------------------------------------------------------


def test_run_on_a_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    rc = main(["run", str(missing), "--text", "hello"])
    assert_one_line_error(rc, capsys.readouterr().err, f"{missing}: bundle directory not found")


def test_bench_on_a_missing_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    rc = main(["bench", str(missing), "--rounds", "1", "--warmup", "0"])
    assert_one_line_error(rc, capsys.readouterr().err, f"{missing}: bundle directory not found")


def test_run_with_an_unknown_adapter(fp32_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", str(fp32_bundle), "--adapter", "nope", "--text", "a good film", "--threads", "1"])
    assert_one_line_error(rc, capsys.readouterr().err, "no adapter 'nope'; available: task")


def test_run_with_the_right_adapter_works(tiny_bert_dir: Path, fp32_bundle: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from edgelora.model import AdapterModel, load_base
    from edgelora.peft_format import load_adapter
    from edgelora.tokenize import encode, load_tokenizer

    text = "a good film"
    rc = main(["run", str(fp32_bundle), "--adapter", "task", "--text", text, "--threads", "1"])
    (prediction,) = json.loads(capsys.readouterr().out)
    model = AdapterModel(load_base(tiny_bert_dir)[0]).eval()
    model.set_adapter(load_adapter(model, fp32_bundle.parent / "task"))
    feeds = {k: torch.from_numpy(v) for k, v in encode(load_tokenizer(tiny_bert_dir), [text]).items()}
    with torch.no_grad():
        (probs,) = torch.softmax(model(**feeds)[0], dim=-1).tolist()  # the torch model the bundle was exported from
    assert rc == 0 and prediction["label"] == ("neg", "pos")[probs.index(max(probs))]
    assert prediction["scores"] == pytest.approx(dict(zip(("neg", "pos"), probs)), abs=FP32_SCORE_ATOL)


def test_train_on_a_missing_data_file(tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.jsonl"
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(missing), "--out", str(tmp_path / "a")])
    assert_one_line_error(rc, capsys.readouterr().err, f"{missing}: no such file")
    assert not (tmp_path / "a").exists()


def test_train_with_rank_zero(tiny_bert_dir: Path, data_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "--base", str(tiny_bert_dir), "--data", str(data_file), "--out", str(tmp_path / "a"), "--rank", "0"])
    assert_one_line_error(rc, capsys.readouterr().err, "r=0 must be a positive integer")
    assert not (tmp_path / "a").exists()


def test_export_into_a_directory_that_is_not_a_bundle(tiny_bert_dir: Path, fp32_bundle: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    adapter = fp32_bundle.parent / "task"
    rc = main(["export", str(tiny_bert_dir), "--adapter", str(adapter), "--precision", "fp32", "--out", str(tmp_path)])
    assert_one_line_error(rc, capsys.readouterr().err, f"{tmp_path}: exists and is not a bundle")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_console_script_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    script = shutil.which("edgelora", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "edgelora.cli"]
    missing = tmp_path / "nowhere"
    proc = subprocess.run([*command, "run", str(missing), "--text", "hello"], capture_output=True, text=True, timeout=120)
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, f"{missing}: bundle directory not found")
