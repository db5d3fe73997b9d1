"""The training loop a user does not have to write: adapter and head only, AdamW, warm-up and decay.

CUDA with bf16 autocast when there is a GPU, CPU otherwise; evaluates on the held-out split every
epoch and keeps the best epoch's weights. Works on any `AdapterModel`, fake-quantized or not.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel
from edgelora.tokenize import encode


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EdgeloraError(f"{name}={value!r} must be a positive integer")
        if not self.lr > 0:
            raise EdgeloraError(f"lr={self.lr!r} must be positive, e.g. 2e-3")
        if self.head_lr is not None and not self.head_lr > 0:
            raise EdgeloraError(f"head_lr={self.head_lr!r} must be positive, or None to use lr")
        if not self.weight_decay >= 0:
            raise EdgeloraError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if not self.max_grad_norm > 0:
            raise EdgeloraError(f"max_grad_norm={self.max_grad_norm!r} must be positive, e.g. 1.0")
        if not 0 <= self.warmup_ratio < 1:
            raise EdgeloraError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise EdgeloraError(f"device={self.device!r} is not supported; choose from auto, cpu, cuda")


@dataclass
class TrainResult:
    best_accuracy: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise EdgeloraError("device=cuda but no CUDA GPU is visible; use --device auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(feeds: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}


@torch.no_grad()
def predict(model: AdapterModel, tokenizer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Logits for `texts` with the active adapter, in eval mode, as a float32 numpy array."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        feeds = _batches(encode(tokenizer, list(texts[i : i + batch_size])), device)
        with _autocast(device):
            logits, _ = model(**feeds)
        out.append(logits.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(model: AdapterModel, tokenizer, texts: Sequence[str], labels: Sequence[int]) -> float:
    logits = predict(model, tokenizer, texts)
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_adapter(
    model: AdapterModel,
    name: str,
    tokenizer,
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    eval_texts: Sequence[str],
    eval_labels: Sequence[int],
    config: TrainConfig = TrainConfig(),
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train adapter `name` (and its head) with everything else frozen; restores the best epoch's weights.

    Args:
        progress: called with a short status line per step; the CLI passes a progress bar.
    """
    if len(train_texts) == 0:
        raise EdgeloraError("the training set is empty")
    model.set_adapter(name)  # refuses an unknown adapter by name
    n_labels = len(model.labels[name])
    for split, texts, labels in (("training", train_texts, train_labels), ("evaluation", eval_texts, eval_labels)):
        if len(texts) != len(labels):
            raise EdgeloraError(f"{len(texts)} {split} texts but {len(labels)} labels; give one label per text")
        bad = [int(y) for y in labels if not 0 <= int(y) < n_labels]
        if bad:
            raise EdgeloraError(
                f"{split} label {bad[0]} is out of range for adapter {name!r} with {n_labels} labels (0..{n_labels - 1})"
            )
    seed_everything(config.seed)
    device = pick_device(config.device)
    model.to(device)
    params = model.trainable_parameters()
    head_params = list(model.heads[name].parameters())
    head_ids = {id(p) for p in head_params}
    groups = [
        {"params": [p for p in params if id(p) not in head_ids], "lr": config.lr},
        {"params": head_params, "lr": config.head_lr or config.lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_texts) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(total * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    order_rng = np.random.default_rng(config.seed)
    labels_np = np.asarray(train_labels)
    result = TrainResult(best_accuracy=-1.0, best_epoch=-1, device=str(device))
    best_state: dict[str, torch.Tensor] | None = None
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = order_rng.permutation(len(train_texts))
        losses = []
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            feeds = _batches(encode(tokenizer, [train_texts[j] for j in idx]), device)
            target = torch.from_numpy(labels_np[idx]).to(device)
            with _autocast(device):
                logits, _ = model(**feeds)
            loss = F.cross_entropy(logits.float(), target)
            if not torch.isfinite(loss):
                raise EdgeloraError(f"loss became {loss.item()} at step {step}; lower --lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(f"epoch {epoch + 1}/{config.epochs} step {step}/{total} loss {loss.item():.4f}")
        acc = accuracy(model, tokenizer, eval_texts, eval_labels) if len(eval_texts) else float("nan")
        result.history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "eval_accuracy": acc})
        if not len(eval_texts) or acc > result.best_accuracy:
            result.best_accuracy, result.best_epoch = acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in _adapter_state(model, name).items()}
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    model.eval()
    return result


def _adapter_state(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    keys = (f".lora_A.{name}.", f".lora_B.{name}.", f".bottleneck.{name}.", f"heads.{name}.")
    return {k: v for k, v in model.state_dict().items() if any(m in k or k.startswith(m) for m in keys)}
