"""Training and scoring a causal-LM adapter: the library entry point behind `edgelora train --task causal-lm`.

`train_causal_lm` loads the base, adds a LoRA adapter (q/k/v/o, MLP optional), optionally fake-quantized with
the decoder's blockwise int8 recipe, trains it with `edgelora.train.run_loop` (checkpoints, --resume, torchrun,
the non-finite-loss stop), saves it in PEFT's CAUSAL_LM layout and scores greedy generation on held-out rows.
`evaluate_generation` is the torch reference score a decoder bundle's score is compared with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgelora import causal_data, distributed, generation_tasks
from edgelora.causal_data import ChatExample, TokenizedRows
from edgelora.causal_lm import CausalLMAdapterModel, token_loss
from edgelora.causal_smooth import smooth_decoder
from edgelora.config import LoraConfig, QuantConfig, config_to_dict
from edgelora.errors import EdgeloraError
from edgelora.model import max_positions
from edgelora.train import CheckpointConfig, LoopTask, TrainConfig, run_loop

DECODER_BLOCK = 32  # the blockwise int8 scheme the decoder export uses (MatMulNBits block_size)
QAT_CHOICES = (None, "int8")


def load_tokenizer(path: str | Path):
    """The base's Hugging Face tokenizer (with its chat template), from disk only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgeloraError(f"{path}: could not load the tokenizer ({first}); the base directory needs tokenizer files") from None


INT8_SCHEMES = ("block", "rowwise")
# The rowwise scheme's layers kept on the blockwise grid: the MLP's down projection (Llama-style, GPT-2) and the
# LM head, whose inputs carry the outliers one row scale handles worst (benchmarks/int8_kernels.py --fidelity).
ROWWISE_BLOCK_LAYERS = ("mlp.down_proj", "mlp.c_proj", "lm_head")
# SmoothQuant strength of the rowwise scheme: on SmolLM2 with 7-bit weights it brings the perplexity ratio to fp32
# from 1.077 (unsmoothed, every layer rowwise) to 1.015 (benchmarks/results/int8_kernels_avx2.md).
ROWWISE_ALPHA = 0.5


def decoder_quant(weight_block: int = DECODER_BLOCK, activations: str = "dynamic", mode: str = "merged",
                  scheme: str = "block", weight_bits: int | None = None,
                  smoothing: float | None = ROWWISE_ALPHA) -> QuantConfig:
    """The int8 recipe of a decoder; a row's result never depends on its batch-mates in either scheme.

    Args:
        mode: the bundle the adapter is for, as for encoders: "merged" fake-quantizes W0 + s B A, "switchable"
            W0 alone with the LoRA branch float (what a switchable decoder bundle computes).
        scheme: "block" (the default): every linear MatMulNBits, blockwise weights, activations per row and
            block. "rowwise": per-output-channel weights of `weight_bits` and activations per row
            (MatMulIntegerToFloat, faster on CPUs without VNNI), SmoothQuant `smoothing` on their inputs, with
            down_proj and the LM head left blockwise (ROWWISE_BLOCK_LAYERS).
        weight_bits: rowwise only: 7 or 8; None chooses for this CPU (7 where the u8 x s8 kernel saturates).
    """
    if scheme not in INT8_SCHEMES:
        raise EdgeloraError(f"int8_scheme={scheme!r} is not supported; choose from {', '.join(INT8_SCHEMES)}")
    if not weight_block:
        raise EdgeloraError("causal-LM QAT uses the decoder's blockwise int8 (weight_block=32); weight_block=0 is the "
                            "encoder's per-channel scheme, which the decoder export does not write")
    if scheme == "block":
        if weight_bits not in (None, 8):
            raise EdgeloraError(f"weight_bits={weight_bits}: the block int8 scheme uses 8-bit blocks of 32 "
                                "(MatMulNBits); drop weight_bits or choose int8_scheme='rowwise'")
        return QuantConfig(weight_block=weight_block, activations=activations, mode=mode)
    if weight_bits is None:
        from edgelora.runtime.cpu import detect_isa, recommended_weight_bits

        weight_bits = recommended_weight_bits(detect_isa().isa)
    return QuantConfig(weight_bits=weight_bits, activations="per-row", mode=mode, smoothing=smoothing,
                       weight_block=weight_block, block_layers=ROWWISE_BLOCK_LAYERS)


def _prompt_texts(tokenizer, rows: Sequence[ChatExample]) -> list[str]:
    """What the model is given to answer each row: the chat template with its generation prompt, or the raw prompt."""
    if causal_data.has_chat_template(tokenizer):
        return [tokenizer.apply_chat_template(r.prompt_messages, tokenize=False, add_generation_prompt=True) for r in rows]
    return [r.messages[0][1] for r in rows]


@torch.no_grad()
def generate_answers(model: CausalLMAdapterModel, tokenizer, rows: Sequence[ChatExample], max_new_tokens: int = 48,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers of the active adapter (or the plain base) to each row's prompt, special tokens removed."""
    model.eval()
    device = next(model.parameters()).device
    texts = _prompt_texts(tokenizer, rows)
    templated = causal_data.has_chat_template(tokenizer)
    pad = causal_data.pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    answers: list[str] = []
    for i in range(0, len(texts), batch_size):
        encoded = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts[i : i + batch_size]]
        longest = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for b, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[b, longest - len(e):] = torch.tensor(e)
            mask[b, longest - len(e):] = 1
        out = model.base.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, longest:]:
            answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return answers


def evaluate_generation(model: CausalLMAdapterModel, tokenizer, rows: Sequence[ChatExample], max_new_tokens: int = 48,
                        task: str | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Greedy generation scored against each row's final answer: exact match and, for a builtin task, per-field
    accuracy (`edgelora.generation_tasks.score`). Returns the scores and the answers (`predictions`)."""
    predictions = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    references = [r.reference for r in rows]
    if task is not None:
        scores = generation_tasks.score(task, predictions, references)
    else:
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        scores = {"exact_match": hits / max(1, len(rows))}
    return {**scores, "rows": len(rows), "predictions": predictions}


def eval_loss(model: CausalLMAdapterModel, rows: TokenizedRows, pad: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per answer token over held-out rows (teacher forcing), in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            feeds = causal_data.collate(rows, range(i, min(len(rows), i + batch_size)), pad, device)
            (logits,) = model(feeds["input_ids"], feeds["attention_mask"])
            summed, n = token_loss(logits, feeds["labels"])
            total, count = total + summed.item(), count + n.item()
    return total / max(count, 1.0)


def causal_loop_task(model: CausalLMAdapterModel, name: str, tokenizer, train: TokenizedRows, held_out: TokenizedRows,
                     config: TrainConfig) -> LoopTask:
    """The `run_loop` task of causal-LM training: token loss on answers, held-out loss each epoch (lower wins)."""
    pad = causal_data.pad_id(tokenizer)

    def batch_loss(step_model: torch.nn.Module, rows: np.ndarray, device: torch.device):
        feeds = causal_data.collate(train, rows.tolist(), pad, device)
        (logits,) = step_model(feeds["input_ids"], feeds["attention_mask"])
        return token_loss(logits, feeds["labels"])

    def evaluate() -> tuple[dict[str, float], float]:
        loss = eval_loss(model, held_out, pad)
        return {"eval_loss": loss}, -loss

    def signature(world: int) -> dict[str, Any]:
        data = json.dumps([train.input_ids, train.labels, held_out.input_ids, held_out.labels])
        return {
            **({"number of processes": world} if world > 1 else {}),
            "task": "causal-lm",
            "adapter": name,
            "adapter config": config_to_dict(model.configs[name]),
            "quantization": None if model.quant is None else config_to_dict(model.quant),
            "base": model.base_fingerprint,
            "training settings": dataclasses.asdict(config),
            "data": hashlib.sha256(data.encode()).hexdigest(),  # token ids: the tokenizer and max_length included
        }

    return LoopTask(size=len(train), batch_loss=batch_loss, evaluate=evaluate if len(held_out) else None,
                    empty_metrics={"eval_loss": float("nan")}, signature=signature)


def train_causal_lm(
    base: str | Path,
    data: str | Path,
    eval: str | Path | None = None,
    *,
    out: str | Path,
    name: str = "adapter",
    epochs: int = 1,
    lr: float = 2e-3,
    batch_size: int = 8,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    include_mlp: bool = False,
    qat: str | None = None,
    deploy_mode: str = "merged",
    weight_block: int = DECODER_BLOCK,
    int8_scheme: str = "block",
    weight_bits: int | None = None,
    smoothing: float | None = ROWWISE_ALPHA,
    max_length: int = causal_data.DEFAULT_MAX_LENGTH,
    seed: int = 0,
    eval_fraction: float = 0.2,
    eval_generate: int | None = 64,
    max_new_tokens: int = 48,
    checkpoint: CheckpointConfig | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a LoRA adapter for generation on a frozen causal LM and save it (PEFT CAUSAL_LM layout) to `out`.

    Example:
        >>> report = train_causal_lm("smollm2", "builtin:home-json:2000", out="runs/home", qat="int8")  # doctest: +SKIP
        >>> report["generation"]["exact_match"]  # doctest: +SKIP

    Args:
        data / eval: JSONL files or `builtin:TASK[:N]` (see `edgelora.causal_data.load_splits`).
        qat: "int8" fake-quantizes every linear (q/k/v/o, MLP, LM head) with the decoder's blockwise recipe,
            for the bundle `deploy_mode` names; None trains fp32.
        deploy_mode: with qat, "merged" (training sees Q(W0 + s B A), the tensor a merged export quantizes) or
            "switchable" (Q(W0) plus the float LoRA branch, as a switchable bundle computes).
        int8_scheme / weight_bits / smoothing: with qat, the decoder's int8 scheme (`decoder_quant`): "block",
            or "rowwise" with its weight bits (None: this CPU's) and SmoothQuant alpha (None: unsmoothed), the
            factors computed from the frozen base on fixed text (`edgelora.causal_smooth`) and saved with the
            adapter, so the export applies the very same ones.
        eval_generate: held-out rows to answer greedily after training and score (None: all; 0: none). Each
            costs up to `max_new_tokens` decoding steps.
    Returns a report: data counts (truncated, dropped), steps, seconds, tokens per second, the loss history,
    and the held-out generation scores.
    """
    from edgelora.peft_format import check_adapter_out, save_adapter

    if qat not in QAT_CHOICES:
        raise EdgeloraError(f"qat={qat!r} is not supported; choose int8 or leave it unset for fp32")
    check_adapter_out(out)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device)
    lora = LoraConfig(r=rank, alpha=alpha, dropout=dropout, include_mlp=include_mlp)
    if deploy_mode not in ("merged", "switchable"):
        raise EdgeloraError(f"deploy_mode={deploy_mode!r} is not supported; choose from merged, switchable")
    if deploy_mode != "merged" and qat is None:
        raise EdgeloraError(f"deploy_mode={deploy_mode!r} chooses the int8 fake quantization; add qat='int8' or drop it")
    if qat is None and int8_scheme != "block":
        raise EdgeloraError(f"int8_scheme={int8_scheme!r} chooses the int8 fake quantization; add qat='int8' or drop it")
    quant = (decoder_quant(weight_block, mode=deploy_mode, scheme=int8_scheme, weight_bits=weight_bits,
                           smoothing=smoothing) if qat == "int8" else None)
    train_rows, eval_rows = causal_data.load_splits(data, eval, seed=seed, eval_fraction=eval_fraction)
    model = CausalLMAdapterModel.from_base(str(base))
    tokenizer = load_tokenizer(model.base_path)
    limit = max_positions(model.base)
    if limit is not None and max_length > limit:
        raise EdgeloraError(f"max_length={max_length} exceeds the base's {limit} positions; use max_length <= {limit}")
    train_tok = causal_data.tokenize_examples(tokenizer, train_rows, max_length)
    eval_tok = causal_data.tokenize_examples(tokenizer, eval_rows, max_length)
    if not len(train_tok):
        raise EdgeloraError(f"{data}: no training row keeps an answer token within max_length={max_length}; "
                            "raise max_length")
    model.add_adapter(name, lora, quant=quant)
    if quant is not None and quant.smoothing is not None:  # from the frozen base, before any step
        smooth_decoder(model, tokenizer, quant.smoothing)
    task = causal_loop_task(model, name, tokenizer, train_tok, eval_tok, config)
    started = time.perf_counter()
    result = run_loop(model, name, task, config, progress=progress, checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    builtin = generation_tasks.task_of(str(eval if eval is not None else data))
    if distributed.world()[0] != 0:
        return {"out": str(out), "history": result.history}  # rank 0 saves, scores and reports
    save_adapter(model, name, out, base_name=str(base), extra={"max_length": max_length, "data": str(data)})
    if checkpoint is not None:
        checkpoint.remove()
    steps = -(-len(train_tok) // batch_size) * epochs
    report: dict[str, Any] = {
        "out": str(out),
        "train_rows": len(train_tok), "eval_rows": len(eval_tok),
        "truncated": train_tok.truncated + eval_tok.truncated, "dropped": train_tok.dropped + eval_tok.dropped,
        "steps": steps, "seconds": seconds, "tokens_per_second": train_tok.tokens * epochs / seconds,
        "history": result.history, "best_epoch": result.best_epoch, "device": result.device,
        "qat": qat, **({"int8_scheme": int8_scheme} if qat else {}),
    }
    if eval_generate != 0 and eval_rows:
        rows = eval_rows if eval_generate is None else eval_rows[:eval_generate]
        report["generation"] = evaluate_generation(model, tokenizer, rows, max_new_tokens, task=builtin)
    return report
