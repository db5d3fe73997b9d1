"""Claims about data-parallel training: two gloo processes under torchrun train like one process.

One torchrun launch runs this file as its worker (`python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/test_distributed.py OUT`); each rank trains a tiny BERT several times and saves
what it ended with. The tests then check that
- without dropout, 2 processes give the adapter 1 process gives with the same global batch (up to float
  summation order), and the same gradient at the last step, whose one row leaves rank 1 without any;
- the ranks hold the same weights, bit for bit, at the end of every run (dropout or not);
- a 2-process run that crashes and resumes from its checkpoint ends bit for bit where an uninterrupted one
  does (each rank's dropout RNG is restored), and a 1-process resume of that checkpoint is refused;
- `torchrun -m edgelora.cli train` trains, saves one adapter and prints one JSON line (rank 0 only);
- torchrun's variables are read, and bad ones refused by name; shards cover a batch in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, make_base, make_keyword_task, write_tokenizer

from edgelora.cli import main
from edgelora.config import LoraConfig
from edgelora.distributed import Launch, launch_from_env, process_group, shard
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel
from edgelora.train import CHECKPOINT_FILE, CheckpointConfig, TrainConfig, _adapter_state, train_adapter

LABELS = ["alpha", "beta"]
FILLER = [w for w in WORDS if w not in LABELS]
WORLD = 2
CRASH_STEP = 13  # mid-epoch 2 of 10 steps per epoch; the last checkpoint before it is step 12
# 64 examples at global batch 7: 10 steps per epoch, 4 + 3 rows per rank, and a last batch of one row,
# which leaves rank 1 with none (it runs a zero-weighted row). Clipping is out of reach (max norm 1e3), so
# the gradient left in `.grad` after the last step is compared as DDP averaged it: AdamW's update does not
# change when every gradient is scaled alike, so the weights alone would not catch a wrong loss scale.
TRAIN_CONFIG = TrainConfig(epochs=2, batch_size=7, lr=1e-2, max_grad_norm=1e3, seed=5, device="cpu")
# Two processes sum each step's gradient in two parts and all-reduce them; one process sums it in one pass,
# and its matmuls see other batch shapes: float32 reorderings (~1e-7 relative). After 20 AdamW steps the
# weights (size ~0.1, each moved by ~0.08) measured 4e-7 apart at worst; 1e-5 is 25 times that and still
# 1/1000 of one step's update (lr 1e-2), so a lost shard or a mis-weighted uneven batch fails.
WEIGHT_ATOL = 1e-5
# The last step's gradient (taken at weights ~4e-7 apart) measured 6e-7 apart relative to its largest
# entry; 1e-5 leaves 15x, and a loss scaled by a wrong factor (x2 or x0.5 for 2 processes) is off by 0.5.
GRAD_RTOL = 1e-5
LOSS_RTOL = 1e-5


def keyword_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of filler words with 'alpha' (class 0) or 'beta' (class 1) among them."""
    return make_keyword_task(n, seed, FILLER, LABELS)


# A test that waits on a torchrun launch: ~20 s each on the 2-core dev machine, ~35 s when it is busy.
slow = pytest.mark.slow

TRAIN = keyword_task(64, seed=0)
EVAL = keyword_task(16, seed=1)


def new_model(dropout: bool) -> AdapterModel:
    """A tiny BERT with a LoRA adapter; without `dropout`, the base's dropout is off too (deterministic steps)."""
    base = make_base("bert")
    if not dropout:
        for module in base.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    model = AdapterModel(base)
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0, dropout=0.1 if dropout else 0.0), LABELS)
    return model


def train(tokenizer, dropout: bool, checkpoint: CheckpointConfig | None = None, config: TrainConfig = TRAIN_CONFIG):
    model = new_model(dropout)
    result = train_adapter(model, "task", tokenizer, *TRAIN, *EVAL, config=config, checkpoint=checkpoint)
    state = {k: v.detach().clone() for k, v in _adapter_state(model, "task").items()}
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return {"history": result.history, "best_epoch": result.best_epoch, "processes": result.processes,
            "state": state, "grads": grads}


class Crash(Exception):
    """Stands in for a crash on every rank at the same step."""


def crash_at(step: int):
    """Make gradient clipping (called once per step on every rank) raise at `step`; returns the undo."""
    clip = torch.nn.utils.clip_grad_norm_
    calls = [0]

    def clipping(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise Crash(step)
        return clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clipping
    return lambda: setattr(torch.nn.utils, "clip_grad_norm_", clip)


def worker(out: Path) -> None:
    """One rank of the launch: every run's result goes to OUT/<run>-rank<k>.pt."""
    import torch.distributed as dist

    from edgelora.tokenize import load_tokenizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        tokenizer = load_tokenizer(write_tokenizer(out / f"tokenizer-{rank}").parent, max_length=32)
        runs = {"plain": train(tokenizer, dropout=False), "dropout": train(tokenizer, dropout=True)}
        undo = crash_at(CRASH_STEP)
        try:
            train(tokenizer, dropout=True, checkpoint=CheckpointConfig(out / "ckpt", every=3))
        except Crash:
            runs["crashed"] = torch.load(out / "ckpt" / CHECKPOINT_FILE, weights_only=True)["step"]
        finally:
            undo()
        runs["resumed"] = train(tokenizer, dropout=True, checkpoint=CheckpointConfig(out / "ckpt", every=3, resume=True))
        try:
            train(tokenizer, dropout=False, config=TrainConfig(batch_size=1, device="cpu"))
        except EdgeloraError as exc:
            runs["error"] = str(exc)
        try:  # rank 0 alone checks the checkpoint directory; every rank must stop with its message
            train(tokenizer, dropout=True, checkpoint=CheckpointConfig(out / "ckpt", every=3))
        except EdgeloraError as exc:
            runs["refused"] = str(exc)
        for name, run in runs.items():
            torch.save(run, out / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(str(Path(__file__).resolve()), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def load(out: Path, run: str, rank: int):
    return torch.load(out / f"{run}-rank{rank}.pt", weights_only=True)


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@slow
def test_two_processes_train_like_one(launched: Path, tokenizer) -> None:
    one = train(tokenizer, dropout=False)
    two = load(launched, "plain", 0)
    assert one["processes"] == 1 and two["processes"] == WORLD
    assert_equal_states(two["state"], load(launched, "plain", 1)["state"])
    start = new_model(dropout=False).state_dict()
    worst = 0.0
    for key, value in one["state"].items():
        assert not torch.equal(value, start[key]) or ".lora_A." in key, f"{key} did not train"
        worst = max(worst, (value - two["state"][key]).abs().max().item())
    assert worst <= WEIGHT_ATOL, f"2 processes differ from 1 by {worst:.2e} > {WEIGHT_ATOL:.0e}"
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) == len(one["state"])
    for key, grad in one["grads"].items():
        scale = grad.abs().max().item()
        assert scale > 0 and (grad - two["grads"][key]).abs().max().item() <= GRAD_RTOL * scale, key
    assert [h["eval_accuracy"] for h in two["history"]] == [h["eval_accuracy"] for h in one["history"]]
    assert two["best_epoch"] == one["best_epoch"]
    for h1, h2 in zip(one["history"], two["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=LOSS_RTOL)


@slow
def test_ranks_agree_and_a_resumed_run_equals_an_uninterrupted_one(launched: Path) -> None:
    assert load(launched, "crashed", 0) == CRASH_STEP - 1  # resumed from a mid-epoch checkpoint
    uninterrupted = load(launched, "dropout", 0)
    for rank in range(WORLD):
        resumed = load(launched, "resumed", rank)
        assert_equal_states(resumed["state"], uninterrupted["state"])
        assert resumed["history"] == uninterrupted["history"]
        assert_equal_states(load(launched, "dropout", rank)["state"], uninterrupted["state"])


@slow
def test_a_batch_smaller_than_the_processes_is_refused(launched: Path) -> None:
    for rank in range(WORLD):
        message = load(launched, "error", rank)
        assert message == "batch_size=1 is smaller than the 2 processes that share each batch; raise batch_size to 2 or more"


@slow
def test_every_rank_stops_with_rank_zeros_checkpoint_error(launched: Path) -> None:
    for rank in range(WORLD):
        assert load(launched, "refused", rank).startswith(
            f"{launched / 'ckpt' / CHECKPOINT_FILE}: a checkpoint of an earlier run is here; pass resume=True")


@slow
def test_one_process_cannot_resume_a_two_process_checkpoint(launched: Path, tokenizer) -> None:
    checkpoint = CheckpointConfig(launched / "ckpt", resume=True)
    assert checkpoint.path == launched / "ckpt" / CHECKPOINT_FILE and checkpoint.path.is_file()
    with pytest.raises(EdgeloraError, match=r"checkpoint is of another run \(different number of processes\)"):
        train(tokenizer, dropout=True, checkpoint=checkpoint)


@slow
def test_torchrun_cli_trains_and_saves_once(tiny_bert_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": LABELS[y]}) + "\n" for t, y in zip(*TRAIN)))
    out = tmp_path / "adapter"
    proc = torchrun("-m", "edgelora.cli", "train", "--base", str(tiny_bert_dir), "--data", str(data), "--out", str(out),
                    "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--max-length", "16", "--device", "cpu",
                    "--checkpoint-every", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints
    printed = json.loads(lines[0])
    assert printed["out"] == str(out) and printed["device"] == "cpu"
    training = json.loads((out / "adapter_config.json").read_text())["edgelora"]["training"]
    assert training["processes"] == WORLD and training["batch_size"] == 8 and len(training["history"]) == 2
    assert (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter.ckpt").exists()  # the checkpoint went once the adapter was saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "train.jsonl"]


# --- fast: the launch environment and the shards ---------------------------------------------------------
def test_launch_comes_from_torchruns_variables() -> None:
    assert launch_from_env({}) is None  # a plain `edgelora train`
    assert launch_from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None  # --nproc_per_node 1
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"launch variables are incomplete \(RANK=\(unset\), WORLD_SIZE=2, "
                                                 r"LOCAL_RANK=0\); start with: torchrun --nproc_per_node N"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"launch variables are incomplete \(RANK=x,"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 does not fit WORLD_SIZE=2 \(LOCAL_RANK=0\)"),
    ],
)
def test_bad_launch_variables_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(EdgeloraError, match=message):
        launch_from_env(env)


def test_cli_names_bad_launch_variables(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    rc = main(["train", "--data", "builtin:intent:20", "--out", str(tmp_path / "a"), "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("edgelora: error: multi-process launch variables are "
                                                           "incomplete (RANK=(unset), WORLD_SIZE=2, LOCAL_RANK=0)")


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EdgeloraError, match=r"LOCAL_RANK=1 but 1 CUDA GPU\(s\) are visible; use --nproc_per_node 1"):
        with process_group(Launch(1, 2, 1), torch.device("cuda")):
            pass


@pytest.mark.parametrize("size, world", [(7, 2), (1, 2), (8, 3), (2, 2)])
def test_shards_cover_the_batch_in_order(size: int, world: int) -> None:
    batch = np.arange(100, 100 + size)
    parts = [shard(batch, rank, world) for rank in range(world)]
    assert np.array_equal(np.concatenate(parts), batch)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1 and len(parts[0]) == max(map(len, parts))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
