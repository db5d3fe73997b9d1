"""`edgelora train --task token-classification`: a LoRA or bottleneck adapter with a per-token head, trained
on word tags or labelled character spans (`edgelora.token_data`), saved as a PEFT-layout directory.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from edgelora.errors import EdgeloraError


def train_tokens(args: argparse.Namespace, rank: int) -> int:
    """The token-classification train verb in one process (rank 0 draws progress, saves and prints)."""
    from edgelora.cli.common import Progress
    from edgelora.cli.train import (
        _adapter_config,
        _base_and_tokenizer,
        _checked_outputs,
        _interruptible,
        _resolve_bits,
    )
    from edgelora.config import QuantConfig, check_recipe
    from edgelora.model import load_base  # noqa: F401 - the base loads through _base_and_tokenizer
    from edgelora.peft_format import save_adapter
    from edgelora.token_data import load_token_splits
    from edgelora.token_model import TokenAdapterModel, train_token_adapter
    from edgelora.train import TrainConfig, seed_everything

    name = args.name or Path(args.out).name
    weight_bits = _resolve_bits(args.weight_bits)
    for flag, given in (("--activations static", args.activations == "static"), ("--smooth", args.smooth is not None),
                        ("--text-field", args.text_field != "text"), ("--label-field", args.label_field != "label"),
                        ("--head architecture", args.head != "mean-pooled")):
        if given:
            raise EdgeloraError(f"{flag} applies to --task classification; drop it for --task token-classification")
    if args.activations != "dynamic" and args.qat != "int8":
        raise EdgeloraError(f"--activations {args.activations} applies to int8 training; add --qat int8")
    if args.max_length < 1:
        raise EdgeloraError(f"--max-length {args.max_length} must be a positive number of tokens, e.g. 128")
    checkpoint = _checked_outputs(args)
    train_ds, eval_ds = load_token_splits(args.data, args.eval, seed=args.seed)
    config = _adapter_config(args)
    quant = (QuantConfig(weight_bits=weight_bits, mode=args.deploy_mode, activations=args.activations)
             if args.qat == "int8" else None)
    check_recipe(config, quant)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               device=args.device)
    base, tokenizer, max_length = _base_and_tokenizer(args.base, args.max_length)
    model = TokenAdapterModel(base)
    seed_everything(args.seed)
    model.add_adapter(name, config, list(train_ds.label_names), quant=quant)
    bar = Progress(train_config.epochs * -(-len(train_ds) // train_config.batch_size), f"train {name}") \
        if rank == 0 else None

    def progress(msg: str) -> None:
        if bar is not None:
            step = re.search(r"step (\d+)/", msg)
            loss = msg.partition(" loss ")[2]
            bar.update_to(int(step[1]) if step else bar.n + 1, "loss " + loss if loss else "")

    result = _interruptible(lambda: train_token_adapter(model, name, tokenizer, train_ds, eval_ds, train_config,
                                                        progress, checkpoint), checkpoint, rank, bar)
    if result is None:
        return 130
    if rank != 0:
        return 0
    training = {"data": str(args.data), "train_size": len(train_ds), "eval_size": len(eval_ds),
                "best_eval_f1": result.best_accuracy, "best_epoch": result.best_epoch, "history": result.history,
                "device": result.device, "max_length": max_length, "processes": result.processes,
                "batch_size": train_config.batch_size}
    save_adapter(model, name, args.out, base_name=str(args.base), extra={"training": training})
    checkpoint.remove()
    print(json.dumps({"adapter": name, "out": str(args.out), "task": "token-classification",
                      "eval_entity_f1": result.best_accuracy, "best_epoch": result.best_epoch,
                      "device": result.device}))
    return 0
