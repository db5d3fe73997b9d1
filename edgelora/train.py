"""The training loop a user does not have to write: adapter and head only, AdamW, warm-up and decay.

CUDA with bf16 autocast when there is a GPU, CPU otherwise; evaluates on the held-out split every
epoch and keeps the best epoch's weights. Works on any `AdapterModel`, fake-quantized or not.
With a `CheckpointConfig` it saves everything the loop depends on (adapter, head, optimizer, schedule,
every RNG, the epoch's data order and position, best-so-far) atomically, and a resumed run ends with
the same weights, bit for bit on CPU, as one that was never interrupted.
Inside a torch.distributed process group (`torchrun`, see `edgelora.distributed`) it trains data-parallel:
every process takes its shard of each global batch, DistributedDataParallel averages the gradients, and
rank 0 alone evaluates, reports progress and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from edgelora import distributed, smooth
from edgelora.atomic import check_writable, write_file_atomic
from edgelora.config import config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.layers import ADAPTER_KEYS
from edgelora.model import AdapterModel, max_positions
from edgelora.tokenize import encode

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "edgelora-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `train_adapter`.

    Args:
        batch_size: examples per optimizer step, in all: under torchrun each of N processes takes about
            batch_size / N of them, so N processes take the steps (and follow the schedule) one process would.
        seed: data order, and dropout on rank 0; process k draws its dropout from seed + k.
    """

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


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often `train_adapter` saves the state it needs to resume.

    Args:
        dir: directory holding `checkpoint.pt` (created; the file is replaced atomically at every save).
        every: steps between saves, besides the save at the end of every epoch; 0 saves at epoch ends only.
        resume: continue from the checkpoint in `dir`. Without it an existing checkpoint is refused, never
            overwritten: it is work an interrupted run would lose.
    """

    dir: str | Path
    every: int = 50
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise EdgeloraError(f"checkpoint every={self.every!r} must be a whole number of steps >= 0 (0: epoch ends only)")

    @property
    def path(self) -> Path:
        return Path(self.dir) / CHECKPOINT_FILE

    def check(self) -> None:
        """Refuse early what `train_adapter` would refuse: resuming nothing, or starting over a checkpoint."""
        if Path(self.dir).exists() and not Path(self.dir).is_dir():
            raise EdgeloraError(f"{self.dir}: exists and is not a directory; choose another checkpoint dir")
        check_writable(self.path, "checkpoint dir")
        if self.resume and not self.path.is_file():
            raise EdgeloraError(f"{self.path}: no checkpoint to resume from; run with resume=False to start training")
        if not self.resume and self.path.is_file():
            raise EdgeloraError(
                f"{self.path}: a checkpoint of an earlier run is here; pass resume=True to continue it, "
                f"or delete {self.dir} to start over"
            )

    def remove(self) -> None:
        """Delete the checkpoint (once its result is saved elsewhere), and its directory if nothing else is in it."""
        self.path.unlink(missing_ok=True)
        try:
            Path(self.dir).rmdir()
        except OSError:  # missing, or holds the user's other files: leave it
            pass


@dataclass
class TrainResult:
    best_accuracy: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"
    processes: int = 1


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise EdgeloraError("device=cuda but no CUDA GPU is visible; use device='auto' or 'cpu'")
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
    checkpoint: CheckpointConfig | None = None,
) -> TrainResult:
    """Train adapter `name` (and its head) with everything else frozen; restores the best epoch's weights.

    Example:
        >>> train_adapter(model, "intent", tok, texts, labels, eval_texts, eval_labels,
        ...               checkpoint=CheckpointConfig("runs/intent.ckpt", resume=True))  # doctest: +SKIP

    Args:
        progress: called with a short status line per step (on rank 0 only); the CLI passes a progress bar.
        checkpoint: save resumable state there (and resume from it with `resume=True`). The checkpoint
            must come from the same model, adapter, data, settings and number of processes; anything else
            is refused by name. Under torchrun all processes read it and rank 0 writes it.
    """
    if len(train_texts) == 0:
        raise EdgeloraError("the training set is empty")
    rank, world = distributed.world()
    if config.batch_size < world:
        raise EdgeloraError(f"batch_size={config.batch_size} is smaller than the {world} processes that share each "
                            f"batch; raise batch_size to {world} or more")
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
    limit = max_positions(model.base)
    truncation = getattr(tokenizer, "truncation", None) or {}
    if limit is not None and truncation.get("max_length", 0) > limit:
        raise EdgeloraError(
            f"the tokenizer truncates at {truncation['max_length']} tokens but the base has {limit} positions; "
            f"use max_length <= {limit}"
        )
    labels_np = np.asarray(train_labels)

    def batch_loss(step_model: torch.nn.Module, rows: np.ndarray, device: torch.device):
        feeds = _batches(encode(tokenizer, [train_texts[j] for j in rows]), device)
        target = torch.from_numpy(labels_np[rows]).to(device)
        with _autocast(device):
            logits, _ = step_model(**feeds)
        return F.cross_entropy(logits.float(), target, reduction="sum"), torch.tensor(float(len(rows)), device=device)

    def evaluate() -> tuple[dict[str, float], float]:
        acc = accuracy(model, tokenizer, eval_texts, eval_labels)
        return {"eval_accuracy": acc}, acc

    task = LoopTask(
        size=len(train_texts),
        batch_loss=batch_loss,
        evaluate=evaluate if len(eval_texts) else None,
        empty_metrics={"eval_accuracy": float("nan")},
        signature=lambda world: _signature(model, name, tokenizer, train_texts, train_labels, eval_texts, eval_labels,
                                           config, world),
        head_params=list(model.heads[name].parameters())
        + (list(model.head_dense[name].parameters()) if name in model.head_dense else []),
    )
    return run_loop(model, name, task, config, progress=progress, checkpoint=checkpoint)


@dataclass(frozen=True)
class LoopTask:
    """What `run_loop` needs from a task (classification here, causal LM in `edgelora.causal_train`).

    Args:
        size: number of training rows; the loop draws batches of row indices from it.
        batch_loss: (model, row indices, device) -> (summed loss over the rows' targets, number of targets
            as a float tensor): the loss of a batch is their ratio, and under torchrun the ratio of the sums over
            processes, so a batch gives the same gradient however its rows are shared out.
        evaluate: rank 0's held-out evaluation after each epoch: (metrics for the history, a score where higher
            is better, which picks the best epoch); None when there is no held-out set.
        empty_metrics: the history's metrics when `evaluate` is None.
        signature: (number of processes) -> what the run's result depends on; a resumed checkpoint must match.
        head_params: parameters trained at `TrainConfig.head_lr` (a classification head), none for causal LMs.
    """

    size: int
    batch_loss: Callable[[torch.nn.Module, np.ndarray, torch.device], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[], tuple[dict[str, float], float]] | None
    empty_metrics: dict[str, float]
    signature: Callable[[int], dict[str, Any]]
    head_params: list[torch.nn.Parameter] = field(default_factory=list)


def run_loop(model: AdapterModel, name: str, task: LoopTask, config: TrainConfig,
             progress: Callable[[str], None] | None = None, checkpoint: CheckpointConfig | None = None) -> TrainResult:
    """The training loop every task shares: AdamW with warm-up and linear decay, gradient clipping, a stop at a
    non-finite loss, held-out evaluation each epoch keeping the best epoch's weights, checkpoints and --resume,
    DistributedDataParallel under torchrun. `train_adapter` and `train_causal_lm` check their inputs and call it."""
    rank, world = distributed.world()
    if checkpoint is not None:
        distributed.on_rank0(checkpoint.check)
    seed_everything(config.seed + rank)  # dropout differs per process; the data order (order_rng) is shared
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (set by process_group)
    model.to(device)
    params = model.trainable_parameters()
    head_params = [p for p in task.head_params if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    groups = [
        {"params": [p for p in params if id(p) not in head_ids], "lr": config.lr},
        {"params": head_params, "lr": config.head_lr or config.lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(task.size / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, int(total * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    order_rng = np.random.default_rng(config.seed)
    result = TrainResult(best_accuracy=-1.0, best_epoch=-1, device=str(device), processes=world)
    loop = _Loop()
    saver = None
    if checkpoint is not None:
        saver = _Saver(checkpoint, task.signature(world))
        if checkpoint.resume:
            saver.restore(model, name, optimizer, scheduler, order_rng, loop, result)
    step_model: torch.nn.Module = model
    if world > 1 and any(layer.act_observer is not None and not layer.act_observer.frozen
                         for _, layer in model.adapted_layers()):
        raise EdgeloraError("static activation observers still observing would learn a different range on each "
                            "process; calibrate with qat_steps=0 when training on several")
    if world > 1:
        # Gradients are averaged for the parameters that require them (the active adapter and head); the frozen
        # base is copied from rank 0 once, here, and its buffers never change, so none are re-sent per step.
        # Every trainable parameter takes part in every forward: find_unused_parameters stays off.
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                             broadcast_buffers=False)
    while loop.epoch < config.epochs:
        step_model.train()
        if loop.order is None:
            loop.order, loop.batch, loop.losses = order_rng.permutation(task.size), 0, []
        while loop.batch < steps_per_epoch:
            idx = loop.order[loop.batch * config.batch_size : (loop.batch + 1) * config.batch_size]
            rows = idx if world == 1 else distributed.shard(idx, rank, world)
            # A last batch with fewer rows than processes leaves some without any: they run one row weighted 0,
            # so every process still joins the gradient all-reduce.
            weight = 1.0 if len(rows) else 0.0
            rows = rows if len(rows) else idx[:1]
            summed, count = task.batch_loss(step_model, rows, device)
            if world == 1:
                loss = reported = summed / count.clamp(min=1.0)
            else:
                # DDP divides the summed gradients by the number of processes; scaling this process's summed loss
                # by world / (the global batch's number of targets) makes the result the gradient of the global
                # batch's mean loss, as one process computes it, however unevenly the rows are shared.
                summed = summed * weight
                targets = distributed.all_sum(count * weight).clamp(min=1.0)
                loss = summed * (world / targets)
                reported = distributed.all_sum(summed) / targets  # the global batch's mean loss, on every rank
            if not torch.isfinite(reported):
                raise EdgeloraError(f"loss became {reported.item()} at step {loop.step}; lower lr (now {config.lr})"
                                    + (saver.kept_note() if saver else ""))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loop.losses.append(reported.item())
            loop.step += 1
            loop.batch += 1
            if saver and checkpoint.every and loop.step % checkpoint.every == 0 and loop.batch < steps_per_epoch:
                saver.save(model, name, optimizer, scheduler, order_rng, loop, result)
            if progress and rank == 0:
                progress(f"epoch {loop.epoch + 1}/{config.epochs} step {loop.step}/{total} loss {reported.item():.4f}")
        metrics, score = dict(task.empty_metrics), float("nan")
        if rank == 0 and task.evaluate is not None:
            metrics, score = task.evaluate()
        if world > 1:
            metrics, score = distributed.broadcast((metrics, score))  # every process keeps the same best epoch
        result.history.append({"epoch": loop.epoch + 1, "train_loss": float(np.mean(loop.losses)), **metrics})
        if task.evaluate is None or score > result.best_accuracy:
            result.best_accuracy, result.best_epoch = score, loop.epoch + 1
            loop.best_state = {k: v.detach().clone() for k, v in _adapter_state(model, name).items()}
        loop.epoch, loop.order, loop.batch, loop.losses = loop.epoch + 1, None, 0, []
        if saver:  # every epoch end; the last one holds the finished run until the caller has saved the adapter
            saver.save(model, name, optimizer, scheduler, order_rng, loop, result)
    del step_model  # removes DDP's gradient hooks from the parameters
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state, strict=False)
    model.eval()
    return result


# --- checkpoints ---------------------------------------------------------------------------------------
@dataclass
class _Loop:
    """Where the loop is: the epoch in progress (0-based), its data order and the next batch in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    order: np.ndarray | None = None
    losses: list[float] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None


def _signature(model, name, tokenizer, train_texts, train_labels, eval_texts, eval_labels, config,
               world: int = 1) -> dict[str, Any]:
    """What a run's result depends on besides the checkpointed state; a resume must match it exactly."""
    data = json.dumps([list(train_texts), [int(y) for y in train_labels], list(eval_texts), [int(y) for y in eval_labels]])
    # Each process draws its own dropout: a checkpoint holds one RNG state per process, so the count must match.
    # A single process writes no such key, so its checkpoints read as they always have.
    processes = {"number of processes": world} if world > 1 else {}
    return {
        **processes,
        "adapter": name,
        "adapter config": config_to_dict(model.configs[name]),
        "quantization": None if model.quant is None else config_to_dict(model.quant),
        "labels": list(model.labels[name]),
        # an architecture head (edgelora.heads) trains other weights; ours stays out, as checkpoints had it
        **({"head": model.head_kind(name)} if model.head_kind(name) not in (None, "mean-pooled") else {}),
        "base": model.base_fingerprint,
        "training settings": dataclasses.asdict(config),
        "data": hashlib.sha256(data.encode()).hexdigest(),
        "tokenizer": {"truncation": getattr(tokenizer, "truncation", None),
                      "vocab": tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size") else None},
        # SmoothQuant factors are set before training, outside the checkpointed state: a resume recomputes
        # them, and must land on the very same ones (another --calib-batches would not).
        "smoothing factors": smooth.factors_digest(smooth.current_factors(model)),
    }


def _rng_state(order_rng: np.random.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),  # plain types: the file loads with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "order": order_rng.bit_generator.state,
    }


def _set_rng_state(state: dict[str, Any], order_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    order_rng.bit_generator.state = state["order"]


class _Saver:
    def __init__(self, checkpoint: CheckpointConfig, signature: dict[str, Any]) -> None:
        self.checkpoint = checkpoint
        self.signature = signature
        self.saved_step: int | None = None

    def kept_note(self) -> str:
        if self.saved_step is None:
            return ""
        return f"; the last good checkpoint (step {self.saved_step}) is kept at {self.checkpoint.path}"

    def save(self, model, name, optimizer, scheduler, order_rng, loop: _Loop, result: TrainResult) -> None:
        """Called on every process (the weights are the same on all; the RNG states are gathered); rank 0 writes."""
        adapter = {k: v.detach().to("cpu", copy=True) for k, v in _adapter_state(model, name).items()}
        bad = next((k for k, v in adapter.items() if not torch.isfinite(v).all()), None)
        if bad is not None:  # never replace a good checkpoint with a diverged one
            raise EdgeloraError(f"adapter weight {bad} is no longer finite at step {loop.step}; lower lr"
                                + self.kept_note())
        rank, world = distributed.world()
        rng = _rng_state(order_rng)
        rank_rng = distributed.gather(rng) if world > 1 else None
        if rank != 0:
            self.saved_step = loop.step
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "signature": self.signature,
            "step": loop.step,
            "epoch": loop.epoch,
            "batch": loop.batch,
            "order": None if loop.order is None else torch.from_numpy(np.asarray(loop.order, dtype=np.int64)),
            "losses": list(loop.losses),
            "best_state": None if loop.best_state is None else {k: v.detach().cpu() for k, v in loop.best_state.items()},
            "best_accuracy": result.best_accuracy,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "adapter": adapter,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            **({"rank_rng": rank_rng} if rank_rng is not None else {}),
        }
        write_file_atomic(self.checkpoint.path, lambda tmp: torch.save(payload, tmp))
        self.saved_step = loop.step

    def restore(self, model, name, optimizer, scheduler, order_rng, loop: _Loop, result: TrainResult) -> None:
        path = self.checkpoint.path
        again = f"delete {self.checkpoint.dir} to start over"
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise EdgeloraError(f"{path}: unreadable checkpoint ({first}); {again}") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise EdgeloraError(f"{path}: not an edgelora checkpoint; {again}")
        if payload.get("version") != CHECKPOINT_VERSION:
            raise EdgeloraError(f"{path}: checkpoint version {payload.get('version')!r}, this edgelora reads "
                                f"{CHECKPOINT_VERSION}; finish it with the edgelora that wrote it, or {again}")
        theirs = payload["signature"]
        differ = [k for k in sorted(set(theirs) | set(self.signature)) if theirs.get(k) != self.signature.get(k)]
        if differ:
            raise EdgeloraError(f"{path}: the checkpoint is of another run (different {', '.join(differ)}); resume "
                                f"with the same base, adapter, data and settings, or {again}")
        model.load_state_dict(payload["adapter"], strict=False)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        rank, world = distributed.world()
        _set_rng_state(payload["rank_rng"][rank] if world > 1 else payload["rng"], order_rng)
        loop.step, loop.epoch, loop.batch = payload["step"], payload["epoch"], payload["batch"]
        loop.order = None if payload["order"] is None else payload["order"].numpy()
        loop.losses = list(payload["losses"])
        loop.best_state = payload["best_state"]
        result.best_accuracy, result.best_epoch = payload["best_accuracy"], payload["best_epoch"]
        result.history = list(payload["history"])
        self.saved_step = loop.step


def _adapter_state(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    # Static activation observers (edgelora/calibrate.py) go with the adapter: they may still observe in QAT.
    keys = (*(f"{marker}{name}." for marker in ADAPTER_KEYS), f"heads.{name}.", f"head_dense.{name}.", ".act_observer.")
    return {k: v for k, v in model.state_dict().items() if any(m in k or k.startswith(m) for m in keys)}
