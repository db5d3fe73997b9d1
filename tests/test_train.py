"""Claims about edgelora.train: a tiny BERT learns a keyword task with and without int8 QAT, the best
epoch is the one kept, seeded runs repeat exactly, and divergence or bad settings stop with a clear error.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_base, randomize_adapters

import edgelora.train as train_module
from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel
from edgelora.train import TrainConfig, accuracy, predict, train_adapter

LABELS = ["alpha", "beta"]
FILLERS = ["the", "a", "film", "movie", "good", "bad", "is", "was"] + [f"w{i}" for i in range(30)]
FAST = TrainConfig(epochs=5, batch_size=8, lr=3e-2, seed=0, device="cpu")
# Chance is 0.5. LoRA measured a best eval accuracy of 0.94-1.0 over seeds 0-3, float and int7 QAT alike;
# a bottleneck (8 units after each FFN) learns slower in 5 epochs: 0.84-0.91 over the same seeds.
MIN_ACCURACY = {"lora": 0.9, "bottleneck": 0.75}


def keyword_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of 3-7 filler words with 'alpha' (class 0) or 'beta' (class 1) somewhere among them."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLERS, k=rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), LABELS[label])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


TRAIN = keyword_task(64, seed=0)
EVAL = keyword_task(32, seed=1)


def new_model(adapter=LoraConfig(r=4, alpha=8.0), quant: QuantConfig | None = None) -> AdapterModel:
    model = AdapterModel(make_base("bert"))  # make_base seeds torch, so the adapter's init repeats too
    model.add_adapter("task", adapter, LABELS, quant=quant)
    return model


def run(model: AdapterModel, tokenizer, config: TrainConfig = FAST, **kwargs):
    return train_adapter(model, "task", tokenizer, *TRAIN, *EVAL, config=config, **kwargs)


def adapter_state(model: AdapterModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in train_module._adapter_state(model, "task").items()}


@pytest.mark.parametrize(
    "adapter, quant",
    [
        (LoraConfig(r=4, alpha=8.0), None),
        (LoraConfig(r=4, alpha=8.0), QuantConfig(weight_bits=7)),
        (BottleneckConfig(reduction_factor=4), QuantConfig(weight_bits=8, mode="switchable")),
    ],
    ids=["lora-float", "lora-qat-int7", "bottleneck-qat-int8"],
)
def test_learns_a_keyword_task(tokenizer, adapter, quant: QuantConfig | None) -> None:
    model = new_model(adapter, quant)
    steps: list[str] = []
    result = run(model, tokenizer, progress=steps.append)
    assert result.best_accuracy > MIN_ACCURACY[adapter.kind], result.history
    assert accuracy(model, tokenizer, *EVAL) == result.best_accuracy  # the kept weights are the best epoch's
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5] and result.device == "cpu"
    assert len(steps) == 5 * 8 and steps[-1].startswith("epoch 5/5 step 40/40 loss ")
    assert model.quant == quant and not model.training
    # only the adapter and its head moved
    assert all(not p.requires_grad for n, p in model.named_parameters() if "task" not in n)


def test_best_epoch_weights_are_restored(tokenizer, monkeypatch) -> None:
    """Evaluation is scripted to peak at epoch 2: the weights left in the model are epoch 2's, not the last."""
    scripted = iter([0.5, 0.9, 0.6, 0.7])
    snapshots: list[dict[str, torch.Tensor]] = []

    def scripted_accuracy(model, tokenizer, texts, labels) -> float:
        snapshots.append(adapter_state(model))
        return next(scripted)

    monkeypatch.setattr(train_module, "accuracy", scripted_accuracy)
    model = new_model()
    result = run(model, tokenizer, TrainConfig(epochs=4, batch_size=16, lr=1e-2, device="cpu"))
    assert (result.best_epoch, result.best_accuracy) == (2, 0.9)
    final = adapter_state(model)
    assert final.keys() == snapshots[1].keys() and any(".lora_B." in k for k in final)
    assert all(torch.equal(v, snapshots[1][k]) for k, v in final.items())
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in final.items())


def test_seeded_runs_are_identical(tokenizer) -> None:
    first, second = new_model(), new_model()
    r1 = run(first, tokenizer, TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=7, device="cpu"))
    r2 = run(second, tokenizer, TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=7, device="cpu"))
    assert r1.history == r2.history
    s1, s2 = adapter_state(first), adapter_state(second)
    assert all(torch.equal(v, s2[k]) for k, v in s1.items())
    third = new_model()
    run(third, tokenizer, TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=8, device="cpu"))
    assert not all(torch.equal(v, s1[k]) for k, v in adapter_state(third).items())  # the seed matters


def test_predict_gives_one_row_of_logits_per_text(tokenizer) -> None:
    model = new_model()
    randomize_adapters(model)
    logits = predict(model, tokenizer, EVAL[0][:5], batch_size=2)
    assert logits.shape == (5, 2) and logits.dtype == np.float32
    assert np.allclose(logits, predict(model, tokenizer, EVAL[0][:5], batch_size=64), atol=1e-6)


def test_diverging_loss_stops_naming_the_step(tokenizer) -> None:
    model = new_model()
    with pytest.raises(EdgeloraError, match=r"loss became (nan|inf|-inf) at step [1-9]\d*; lower lr \(now 1e\+30\)"):
        run(model, tokenizer, TrainConfig(epochs=2, batch_size=16, lr=1e30, warmup_ratio=0.0, device="cpu"))


def test_nan_in_the_model_stops_at_step_zero(tokenizer) -> None:
    model = new_model()
    with torch.no_grad():
        model.heads["task"].weight[0, 0] = float("nan")
    with pytest.raises(EdgeloraError, match=r"loss became nan at step 0;"):
        run(model, tokenizer)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, r"epochs=0 must be a positive integer"),
        ("batch_size", 2.5, r"batch_size=2.5 must be a positive integer"),
        ("lr", 0.0, r"lr=0.0 must be positive"),
        ("lr", float("nan"), r"lr=nan must be positive"),
        ("head_lr", -1.0, r"head_lr=-1.0 must be positive"),
        ("warmup_ratio", 1.0, r"warmup_ratio=1.0 must be in \[0, 1\)"),
        ("weight_decay", -0.1, r"weight_decay=-0.1 must be >= 0"),
        ("max_grad_norm", 0.0, r"max_grad_norm=0.0 must be positive"),
        ("device", "tpu", r"device='tpu' is not supported; choose from auto, cpu, cuda"),
    ],
)
def test_bad_train_config_is_refused(field: str, value, message: str) -> None:
    with pytest.raises(EdgeloraError, match=message):
        TrainConfig(**{field: value})


def test_bad_data_is_refused(tokenizer) -> None:
    model = new_model()
    with pytest.raises(EdgeloraError, match=r"the training set is empty"):
        train_adapter(model, "task", tokenizer, [], [], *EVAL, config=FAST)
    with pytest.raises(EdgeloraError, match=r"3 training texts but 2 labels"):
        train_adapter(model, "task", tokenizer, ["a", "b", "the"], [0, 1], *EVAL, config=FAST)
    with pytest.raises(EdgeloraError, match=r"training label 2 is out of range for adapter 'task' with 2 labels \(0\.\.1\)"):
        train_adapter(model, "task", tokenizer, ["a", "b"], [0, 2], *EVAL, config=FAST)
    with pytest.raises(EdgeloraError, match=r"32 evaluation texts but 31 labels"):
        train_adapter(model, "task", tokenizer, *TRAIN, EVAL[0], EVAL[1][:-1], config=FAST)
    with pytest.raises(EdgeloraError, match=r"unknown adapter 'nope'"):
        train_adapter(model, "nope", tokenizer, *TRAIN, *EVAL, config=FAST)


# --- the CUDA path's autocast, on CPU ------------------------------------------------------------------
# On a GPU, training runs under torch.autocast(bfloat16) (`train._autocast`); CI has no GPU, so these
# tests run the same autocast on the CPU, where torch supports it for bfloat16 too.


def test_fake_quantizers_under_bf16_autocast_round_in_float32_and_pass_gradients_straight() -> None:
    from edgelora.fake_quant import fake_quantize_activation, fake_quantize_weight, quantize_weight

    torch.manual_seed(0)
    x = (torch.randn(4, 7, 16) * 3).to(torch.bfloat16).requires_grad_()
    w = torch.randn(8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xq, wq = fake_quantize_activation(x), fake_quantize_weight(w, 7)
    # The float32 grids, computed apart: ORT's DynamicQuantizeLinear in numpy float32 on the same values,
    # and the exporter's int8 weights times their scales. A grid rounded in bfloat16 misses them.
    xf = x.detach().float().numpy()
    lo, hi = min(xf.min(), np.float32(0)), max(xf.max(), np.float32(0))
    scale = (hi - lo) / np.float32(255)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    act = ((np.clip(np.round(xf / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)
    assert xq.dtype == torch.bfloat16 and torch.equal(xq, torch.from_numpy(act).to(torch.bfloat16))
    w_int, w_scale = quantize_weight(w.detach(), 7)
    assert wq.dtype == torch.float32 and torch.equal(wq, w_int.float() * w_scale[:, None])
    (xq.float().sum() + wq.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(w.grad, torch.ones_like(w))  # straight through


# One QAT step under bfloat16 autocast against the same step in float32. bfloat16 keeps 8 significant
# bits: the tiny model's loss moved by at most 5.3e-4 relative, and the LoRA gradients (head excluded)
# kept a cosine of 0.9999 or more (measured over the three recipes); the bounds are about 10x those gaps.
BF16_LOSS_REL_TOL = 5e-3
BF16_MIN_GRAD_COSINE = 0.999


@pytest.mark.parametrize("quant", [QuantConfig(weight_bits=7), QuantConfig(weight_bits=7, mode="switchable"),
                                   QuantConfig(weight_bits=8, activations="none")],
                         ids=["merged-int7", "switchable-int7", "weights-only-int8"])
def test_fake_quant_training_step_under_bf16_autocast_matches_float32(tokenizer, quant: QuantConfig) -> None:
    from edgelora.tokenize import encode

    model = new_model(quant=quant)
    randomize_adapters(model)  # B != 0, so every A gets a gradient too
    feeds = {k: torch.from_numpy(v) for k, v in encode(tokenizer, TRAIN[0][:16]).items()}
    labels = torch.tensor(TRAIN[1][:16])
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]

    def step(autocast: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**feeds, labels=labels)[0]
        loss.backward()
        for n, p in lora:  # every LoRA matrix learns (a lost straight-through gradient zeroes them), in float32
            assert p.grad is not None and p.grad.dtype == torch.float32 and float(p.grad.abs().max()) > 0, n
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        return float(loss), torch.cat([p.grad.flatten() for _, p in lora])

    loss32, grad32 = step(False)
    loss16, grad16 = step(True)
    cosine = float(torch.nn.functional.cosine_similarity(grad32, grad16, dim=0))
    print(f"{quant.mode} bf16 autocast: loss rel diff {abs(loss16 - loss32) / loss32:.1e}, LoRA grad cosine {cosine:.5f}")
    assert abs(loss16 - loss32) <= BF16_LOSS_REL_TOL * loss32
    assert cosine >= BF16_MIN_GRAD_COSINE
