"""Claims about Hugging Face `transformers.Trainer` compatibility: our adapters are plain `nn.Module`s and
`AdapterModel.forward` returns the loss first when given `labels`, so a stock Trainer trains an adapter.

The Trainer moves only the adapter and its head (the base stays bit for bit as loaded), the held-out loss
falls, and the trained adapter saves in PEFT's layout, loads back into a fresh model with the same outputs,
and exports to a bundle whose ONNX logits match torch.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # its Trainer also needs accelerate: both are in the dev extras
from conftest import FP32_ATOL, WORDS

from edgelora.config import LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.export import export_bundle
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.tokenize import encode, load_tokenizer
from edgelora.train import accuracy, predict

LABELS = ["alpha", "beta"]
FILLER = [w for w in WORDS if w not in LABELS]
MAX_LENGTH = 32
# Chance is 0.5; this Trainer recipe measured 0.97-1.0 held-out accuracy over seeds 0-2 (held-out loss
# 0.69 before, 0.0004-0.24 after, hence the loss must at least halve).
MIN_ACCURACY = 0.9


def keyword_task(n: int, seed: int) -> list[dict]:
    """Rows {"text", "label"}: filler words with 'alpha' (label 0) or 'beta' (label 1) among them."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), LABELS[i % 2])
        rows.append({"text": " ".join(words), "label": i % 2})
    return rows


class Collator:
    """Trainer's data_collator: rows {"text", "label"} -> the model's feeds plus `labels`."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        feeds = {k: torch.from_numpy(v) for k, v in encode(self.tokenizer, [r["text"] for r in rows]).items()}
        feeds["labels"] = torch.tensor([r["label"] for r in rows])
        return feeds


def trainer_for(model: AdapterModel, tokenizer, out: Path, train_rows: list[dict], eval_rows: list[dict]):
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=32, num_train_epochs=4,
        learning_rate=3e-2, warmup_steps=2, weight_decay=0.01, logging_steps=4, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False, dataloader_pin_memory=False,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                                data_collator=Collator(tokenizer))


def test_trainer_trains_only_the_adapter_and_it_saves_loads_and_exports(tiny_bert_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_bert_dir, MAX_LENGTH)
    train_rows, eval_rows = keyword_task(96, seed=0), keyword_task(32, seed=1)
    eval_texts, eval_labels = [r["text"] for r in eval_rows], [r["label"] for r in eval_rows]
    torch.manual_seed(0)
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0), LABELS)
    model.add_adapter("other", LoraConfig(r=2), LABELS)  # a second adapter, inactive: it must not move
    model.set_adapter("task")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    trainer = trainer_for(model, tokenizer, tmp_path / "trainer", train_rows, eval_rows)
    assert trainer.label_names == ["labels"]  # found in forward's signature
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert accuracy(model, tokenizer, eval_texts, eval_labels) >= MIN_ACCURACY

    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach().cpu(), before[k])}
    trained = {k for k in before if ".lora_A.task." in k or ".lora_B.task." in k or k.startswith("heads.task.")}
    assert moved == trained, sorted(moved ^ trained)[:5]

    adapter_dir = save_adapter(model, "task", tmp_path / "adapter", base_name=str(tiny_bert_dir))
    fresh = AdapterModel(load_base(tiny_bert_dir)[0])
    assert load_adapter(fresh, adapter_dir) == "task"
    logits = predict(model, tokenizer, eval_texts)
    assert np.array_equal(predict(fresh, tokenizer, eval_texts), logits)

    bundle = tmp_path / "bundle"
    export_bundle(tiny_bert_dir, {"task": adapter_dir}, mode="merged", precision="fp32", out=bundle, max_length=MAX_LENGTH)
    onnx_logits = Runtime(bundle, intra_op_threads=1, allow_spinning=False).run(eval_texts, adapter="task")["logits"]
    assert np.abs(onnx_logits - logits).max() <= FP32_ATOL


def test_forward_with_labels_returns_the_loss_first(tokenizer) -> None:
    from conftest import make_base

    model = AdapterModel(make_base("bert"))
    model.add_adapter("task", LoraConfig(r=4), LABELS)
    model.eval()
    feeds = {k: torch.from_numpy(v) for k, v in encode(tokenizer, ["alpha the film", "a beta movie"]).items()}
    labels = torch.tensor([0, 1])
    loss, logits, pooled = model(**feeds, labels=labels)
    plain_logits, plain_pooled = model(**feeds)
    assert torch.equal(logits, plain_logits) and torch.equal(pooled, plain_pooled)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(plain_logits, labels))
    with model.disable_adapter(), pytest.raises(EdgeloraError, match=r"labels were given but no adapter is active"):
        model(**feeds, labels=labels)
