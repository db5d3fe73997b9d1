"""Claim: causal-LM training under torchrun (two gloo processes) trains like one process.

Rows differ in length, so the two shards of a batch hold different numbers of answer tokens: the loop must
weight each process's summed loss by the global token count (not average per process) for the gradient to be
the one-process gradient. One torchrun launch runs this file as its worker (`... tests/test_causal_distributed.py
TOKENIZER_DIR OUT`); the test compares rank 0's adapter and last gradient with a one-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_decoder import make_lm, train_chat_tokenizer

from edgelora import generation_tasks
from edgelora.causal_data import ChatExample, tokenize_examples
from edgelora.causal_lm import CausalLMAdapterModel
from edgelora.causal_train import causal_loop_task, load_tokenizer
from edgelora.config import LoraConfig
from edgelora.train import TrainConfig, _adapter_state, run_loop

WORLD = 2
# 21 rows at global batch 5: 5 steps per epoch, shards of 3 + 2 rows and a last batch of one row (rank 1 runs
# a zero-weighted row). Clipping out of reach, so the last gradient is compared as DDP averaged it.
CONFIG = TrainConfig(epochs=2, batch_size=5, lr=1e-2, max_grad_norm=1e3, seed=3, device="cpu")
# As in test_distributed.py: two processes sum in another order (float32, ~1e-7 relative); 1e-5 is far below
# one step's update (lr 1e-2) and a loss weighted per process instead of per token is off by ~10%.
WEIGHT_ATOL = 1e-5
GRAD_RTOL = 1e-4


def train(tok) -> dict:
    rows = [ChatExample.from_prompt(p, c) for p, c in generation_tasks.make_pairs("meeting", 21, 0)]
    train_rows, held = tokenize_examples(tok, rows, 96), tokenize_examples(tok, rows[:3], 96)
    model = CausalLMAdapterModel(make_lm("llama", 400))
    model.add_adapter("a", LoraConfig(r=4))
    result = run_loop(model, "a", causal_loop_task(model, "a", tok, train_rows, held, CONFIG), CONFIG)
    return {"state": {k: v.detach().clone() for k, v in _adapter_state(model, "a").items()},
            "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None},
            "history": result.history, "processes": result.processes}


def worker(tok_dir: Path, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        torch.save(train(load_tokenizer(tok_dir)), out / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_train_a_causal_lm_like_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    tok_dir = train_chat_tokenizer(tmp_path / "tok")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), str(tok_dir), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    one = train(load_tokenizer(tok_dir))
    assert one["processes"] == 1 and two[0]["processes"] == WORLD
    assert all(torch.equal(two[0]["state"][k], two[1]["state"][k]) for k in one["state"])
    worst = max((one["state"][k] - two[0]["state"][k]).abs().max().item() for k in one["state"])
    assert worst <= WEIGHT_ATOL, worst
    for key, grad in one["grads"].items():
        scale = grad.abs().max().item()
        assert scale > 0 and (grad - two[0]["grads"][key]).abs().max().item() <= GRAD_RTOL * scale, key
    for h1, h2 in zip(one["history"], two[0]["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
