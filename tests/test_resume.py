"""Training checkpoints: a run that crashes (in-process), is killed with SIGKILL (CLI, subprocess) or is
interrupted with Ctrl-C and is resumed ends with the same adapter, bit for bit on CPU, as a run that was
never interrupted; a loss that turns NaN stops naming the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (KEYWORD_CONFIG, KEYWORD_EVAL, KEYWORD_LABELS, KEYWORD_TRAIN, Crash, Workspace,
                      assert_one_line_error, cli, crash_after, make_base, write_keyword_jsonl)
from safetensors.torch import load_file

from edgelora.config import LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel
from edgelora.train import CHECKPOINT_FILE, CheckpointConfig, TrainConfig, _adapter_state, train_adapter


def new_model() -> AdapterModel:
    model = AdapterModel(make_base("bert"))
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0, dropout=0.1), KEYWORD_LABELS)  # dropout: the torch RNG matters
    return model


def train(tokenizer, checkpoint: CheckpointConfig | None = None, on_step: Callable[[int, AdapterModel], None] | None = None):
    model = new_model()

    def progress(msg: str) -> None:
        if on_step:
            on_step(int(msg.split("step ")[1].split("/")[0]), model)

    result = train_adapter(model, "task", tokenizer, *KEYWORD_TRAIN, *KEYWORD_EVAL, config=KEYWORD_CONFIG, progress=progress,
                           checkpoint=checkpoint)
    return result, {k: v.detach().clone() for k, v in _adapter_state(model, "task").items()}


def assert_same_training(a, b) -> None:
    (result_a, state_a), (result_b, state_b) = a, b
    assert result_a.history == result_b.history and result_a.best_epoch == result_b.best_epoch
    assert state_a.keys() == state_b.keys() and any(".lora_B." in k for k in state_a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), "resumed weights differ from the uninterrupted run"


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_dir: Path):
    from edgelora.tokenize import load_tokenizer

    return train(load_tokenizer(tokenizer_dir, max_length=32))


# Step 7 is mid-epoch 2 (last checkpoint: step 6, mid-epoch); step 10 ends epoch 2 before its evaluation
# (last checkpoint: step 8); step 15 is the last step (last checkpoint: step 14, before the final epoch end).
@pytest.mark.parametrize("crash_step", [7, 10, 15])
def test_resumed_run_equals_an_uninterrupted_one(tokenizer, uninterrupted, tmp_path: Path, crash_step: int) -> None:
    with pytest.raises(Crash):
        train(tokenizer, CheckpointConfig(tmp_path, every=2), crash_after(crash_step))
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert 0 < saved["step"] < crash_step
    resumed = train(tokenizer, CheckpointConfig(tmp_path, every=2, resume=True))
    assert_same_training(resumed, uninterrupted)
    # the finished run's checkpoint gives the same result again without training
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, resume=True)), uninterrupted)


def test_checkpointing_does_not_change_the_result(tokenizer, uninterrupted, tmp_path: Path) -> None:
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, every=1)), uninterrupted)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tokenizer, uninterrupted, tmp_path: Path) -> None:
    def poison(done: int, model: AdapterModel) -> None:
        if done == 8:  # after the checkpoint of step 8 was saved, the weights turn NaN
            with torch.no_grad():
                next(layer for _, layer in model.adapted_layers()).lora_B["task"].weight.fill_(float("nan"))

    kept = f"the last good checkpoint (step 8) is kept at {tmp_path / CHECKPOINT_FILE}"
    with pytest.raises(EdgeloraError, match=r"loss became nan at step 8; lower lr") as info:
        train(tokenizer, CheckpointConfig(tmp_path, every=2), poison)
    assert str(info.value).endswith(kept)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 8 and all(torch.isfinite(v).all() for v in saved["adapter"].values())
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, every=2, resume=True)), uninterrupted)


def test_diverging_run_never_writes_a_non_finite_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = new_model()
    diverging = TrainConfig(epochs=2, batch_size=8, lr=1e30, warmup_ratio=0.0, device="cpu")
    with pytest.raises(EdgeloraError, match=r"(loss became (nan|inf|-inf)|is no longer finite) at step \d+; lower lr"):
        train_adapter(model, "task", tokenizer, *KEYWORD_TRAIN, *KEYWORD_EVAL, config=diverging,
                      checkpoint=CheckpointConfig(tmp_path, every=1))
    if (tmp_path / CHECKPOINT_FILE).exists():
        saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["adapter"].values())


def test_resume_refuses_another_run(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        train(tokenizer, CheckpointConfig(tmp_path, every=2), crash_after(3))
    model = new_model()
    other = TrainConfig(epochs=3, batch_size=8, lr=2e-2, seed=3, device="cpu")
    with pytest.raises(EdgeloraError, match=r"checkpoint is of another run \(different training settings\)"):
        train_adapter(model, "task", tokenizer, *KEYWORD_TRAIN, *KEYWORD_EVAL, config=other,
                      checkpoint=CheckpointConfig(tmp_path, resume=True))
    with pytest.raises(EdgeloraError, match=r"checkpoint is of another run \(different data\)"):
        train_adapter(model, "task", tokenizer, KEYWORD_TRAIN[0][:-2], KEYWORD_TRAIN[1][:-2], *KEYWORD_EVAL,
                      config=KEYWORD_CONFIG,
                      checkpoint=CheckpointConfig(tmp_path, resume=True))


def test_tokenizer_longer_than_the_base_is_refused(tokenizer_dir: Path) -> None:
    from edgelora.tokenize import load_tokenizer

    with pytest.raises(EdgeloraError, match=r"the tokenizer truncates at 100 tokens but the base has 64 positions; "
                                            r"use max_length <= 64"):
        train_adapter(new_model(), "task", load_tokenizer(tokenizer_dir, max_length=100), *KEYWORD_TRAIN, *KEYWORD_EVAL,
                      config=KEYWORD_CONFIG)


@pytest.mark.slow
def test_cli_training_killed_with_sigkill_resumes_to_the_same_adapter(tiny_bert_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI in a subprocess is killed (SIGKILL) after its first checkpoints; `--resume` finishes the job."""
    data = write_keyword_jsonl(tmp_path / "train.jsonl")
    args = ["train", "--base", tiny_bert_dir, "--data", data, "--rank", "4", "--dropout", "0.1", "--epochs", "6",
            "--batch-size", "4", "--lr", "1e-2", "--max-length", "16", "--device", "cpu", "--checkpoint-every", "1"]
    killed, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the thread count of this process (conftest)
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", *map(str, args), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.2)  # a few more steps: the kill lands part-way through an epoch, maybe mid-write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"training ended before the kill (rc {proc.returncode}): {stderr}"
    assert not killed.exists()
    step = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 0 < step < 6 * 12, step  # 48 training examples at batch 4: 12 steps per epoch

    rc, _, err = cli([*args, "--out", killed], capsys)  # without --resume: refused, the checkpoint is kept
    assert_one_line_error(rc, err, f"{ckpt / CHECKPOINT_FILE}: a checkpoint of an earlier run is here; pass --resume")
    rc, out, err = cli([*args, "--out", killed, "--resume"], capsys)
    assert rc == 0, err
    assert not ckpt.exists()  # its work is in the adapter now
    rc, out, err = cli([*args, "--out", tmp_path / "straight"], capsys)
    assert rc == 0, err

    resumed, straight = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("killed", "straight"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    history = [json.loads((tmp_path / d / "adapter_config.json").read_text())["edgelora"]["training"]["history"]
               for d in ("killed", "straight")]
    assert history[0] == history[1] and len(history[0]) == 6


def test_interrupted_cli_run_resumes_and_refuses_other_settings(workspace: Workspace, tmp_path: Path, monkeypatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C after the first epoch's checkpoint: the CLI says how to resume; --resume with another --lr is
    refused by name, with the same arguments it finishes."""
    import edgelora.train as train_module

    args = ["train", "--base", workspace.base, "--data", workspace.data, "--out", tmp_path / "a", "--device", "cpu",
            "--epochs", "2", "--batch-size", "16", "--max-length", "16", "--checkpoint-every", "0"]
    real_save = train_module._Saver.save

    def save_then_interrupt(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module._Saver, "save", save_then_interrupt)
    rc, out, err = cli(args, capsys)
    checkpoint = tmp_path / "a.ckpt" / CHECKPOINT_FILE
    assert (rc, out) == (130, "")
    *progress, last = err.splitlines()  # without a terminal, progress is logged as lines before it
    assert last == f"edgelora: interrupted; continue from {checkpoint} with the same command and --resume"
    assert all(line.startswith("train a: ") for line in progress), err
    monkeypatch.undo()
    rc, _, err = cli([*args, "--resume", "--lr", "5e-3"], capsys)
    assert_one_line_error(rc, err, f"{checkpoint}: the checkpoint is of another run (different training settings)")
    rc, out, err = cli([*args, "--resume"], capsys)
    assert rc == 0 and all(line.startswith("train a: ") for line in err.splitlines()), err
    assert json.loads(out)["adapter"] == "a" and not checkpoint.parent.exists()
