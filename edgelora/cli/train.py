"""`edgelora train` and `edgelora calibrate`: an adapter trained (or calibrated) on a frozen base, saved as a
PEFT-layout directory. Torch loads inside the commands, so building the parser stays cheap without it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from edgelora.cli.common import Progress, as_flags
from edgelora.errors import EdgeloraError

TASKS = ("classification", "causal-lm", "token-classification")
# Per task: base, epochs, batch size, learning rate, max length (the causal-lm ones measured on SmolLM2's home-json
# task: 30 steps of 8 reach 0.83 exact match held out; benchmarks/causal_train_speed.py)
DEFAULTS = {"classification": ("minilm", 3, 32, 2e-3, 128), "causal-lm": ("smollm2", 1, 8, 5e-3, 96),
            "token-classification": ("minilm", 3, 32, 2e-3, 128)}
# Flags the causal-lm task does not take, with the value that means "not given".
CLASSIFICATION_ONLY = {"kind": "lora", "targets": None, "activations": "dynamic",
                       "init": "default", "rslora": False, "text_field": "text", "label_field": "label",
                       "head": "mean-pooled"}

# The config fields and library parameters a train or calibrate error may name, as the flags that set them.
FLAGS = {"smoothing": "--smooth", "init": "--init", "batches": "--calib-batches"}
PHRASES = {"smoothing with init=": "--smooth with init=",
           "add the adapter with quant=QuantConfig(mode='switchable')": "add --qat int8 --deploy-mode switchable"}
# Phrases of the library's errors (edgelora.train, .distributed, .peft_format, .calibrate) that name what a Python
# caller passes, in the flags of train and calibrate; applied to every error of those verbs.
COMMAND_PHRASES = {
    "deploy_mode='switchable' chooses the int8 fake quantization; add qat='int8' or drop it":
        "--deploy-mode switchable chooses the int8 fake quantization; add --qat int8 or drop it",
    "choose another checkpoint dir": "choose another --checkpoint-dir",
    "run with resume=False to start training": "run without --resume to start training",
    "pass resume=True to continue it": "pass --resume to continue it",
    "use device='auto' or 'cpu'": "use --device auto or cpu",
    "or device='cpu'": "or --device cpu",
    "raise batch_size to ": "use --batch-size ",
    "calibrate with qat_steps=0 when": "calibrate with qat_steps=0 (CLI: --observe-steps 0) when",
    "; lower lr": "; lower --lr",
    "choose an empty or new directory for out": "choose an empty or new --out directory",
    "retrain with QuantConfig.smoothing": "retrain with --smooth",
    "train with activations='dynamic'": "train with --activations dynamic",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora train`."""
    p.description = ("Train one adapter and save it as a PEFT-layout directory. Data-parallel on N GPUs (or N CPU "
                     "processes): torchrun --nproc_per_node N -m edgelora.cli train ...")
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (a head over labelled texts), causal-lm (generation: JSONL of "
                        "{prompt, completion} or {messages}, loss on the answers only) or token-classification "
                        "(a tag per word: JSONL of {tokens, tags} or {text, spans}, or builtin:slots[:N])")
    p.add_argument("--base", default=None,
                   help="Hugging Face model directory, or 'minilm' (embedded all-MiniLM-L6-v2, the classification "
                        "default) or 'smollm2' (embedded SmolLM2-135M-Instruct, the causal-lm default)")
    p.add_argument("--data", required=True,
                   help="train data: .jsonl/.csv with text and label, or builtin:intent|sentiment[:N]; causal-lm: "
                        ".jsonl of prompt/completion or messages, or builtin:home-json|meeting[:N]")
    p.add_argument("--eval", default=None, help="held-out data (default: a seeded split of --data)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument("--name", default=None, help="adapter name (default: the --out folder name)")
    p.add_argument("--kind", choices=("lora", "bottleneck"), default="lora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (update scaled by alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.add_argument("--targets", default=None, help="comma-separated module names to adapt (default: attention Wq,Wk,Wv,Wo)")
    p.add_argument("--include-mlp", action="store_true", help="also adapt the feed-forward projections")
    p.add_argument("--head", choices=("mean-pooled", "architecture"), default="mean-pooled",
                   help="classification head: ours mean-pools the tokens; 'architecture' is the base's own "
                        "...ForSequenceClassification head (BERT's pooler, RoBERTa's, DistilBERT's pre-classifier, "
                        "the last token of decoders), so the adapter loads in PEFT on AutoModelForSequenceClassification")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck width = hidden / factor")
    p.add_argument("--placement", choices=("houlsby", "pfeiffer"), default="pfeiffer")
    p.add_argument("--qat", choices=("int8", "none"), default="none", help="int8-aware fake quantization while training")
    p.add_argument("--weight-bits", default="auto", help="7, 8 or auto (7 where this CPU's int8 kernel saturates)")
    p.add_argument("--int8-scheme", choices=("block", "rowwise"), default=None,
                   help="causal-lm with --qat int8: block (MatMulNBits everywhere, the default) or rowwise (per-row "
                        "activations, per-channel --weight-bits weights, SmoothQuant --smooth (default 0.5); "
                        "down_proj and the LM head stay block: faster on CPUs without VNNI)")
    p.add_argument("--deploy-mode", choices=("merged", "switchable"), default="merged",
                   help="the export mode the fake quantizer prepares for")
    p.add_argument("--activations", choices=("dynamic", "static", "none"), default="dynamic",
                   help="with --qat int8: activations quantized per call (dynamic), with ranges calibrated before "
                        "training (static: constant scales in the graph, no per-call min/max), or not at all")
    p.add_argument("--calib-batches", type=int, default=8, metavar="N",
                   help="--activations static: training batches the observers see before training")
    p.add_argument("--observer", choices=("minmax", "moving_average", "percentile"), default="minmax",
                   help="--activations static: how the observed values become a range")
    p.add_argument("--observe-steps", type=int, default=0, metavar="K",
                   help="--activations static: keep observing the first K training steps, then freeze (0: freeze "
                        "after calibration)")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="with --qat int8: SmoothQuant, moving activation outliers into the weights with migration "
                        "strength ALPHA in [0, 1] (0.7 measured best on MiniLM), factors from --calib-batches batches")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (default 3; causal-lm 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per optimizer step in all (default 32; causal-lm 8); under torchrun each of N "
                        "processes takes 1/N of them")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3; causal-lm 5e-3)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default 128; causal-lm 96)")
    p.add_argument("--eval-generate", type=int, default=64, metavar="N",
                   help="causal-lm: held-out prompts answered greedily and scored after training (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="causal-lm: tokens per scored answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where resumable state is saved while training (default: OUT.ckpt beside --out); "
                        "deleted once the adapter is saved")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="save every N steps, besides the save at each epoch end (0: epoch ends only)")
    p.add_argument("--init", choices=("default", "pissa", "int8-residual"), default="default",
                   help="LoRA start: zero B (default), the top-r SVD part of W (pissa), or the best rank-r fit "
                        "of W - Q8(W) (int8-residual; needs --qat int8 --deploy-mode switchable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint, with the same arguments; "
                        "the result equals an uninterrupted run's")


def _checkpoint_dir(args: argparse.Namespace) -> Path:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir)
    out = Path(args.out)
    return out.with_name(out.name + ".ckpt") if out.name else Path(str(out.resolve()) + ".ckpt")


def train_command(args: argparse.Namespace) -> int:
    with as_flags({}, COMMAND_PHRASES):
        return _train_command(args)


def _train_command(args: argparse.Namespace) -> int:
    from edgelora.distributed import launch_from_env, process_group
    from edgelora.train import pick_device

    _fill_task_defaults(args)
    from edgelora.cli.train_tokens import train_tokens

    run = {"causal-lm": _train_causal, "token-classification": train_tokens}.get(args.task, _train)
    launch = launch_from_env()  # set by torchrun: one process per GPU (or CPU worker)
    if launch is None:
        return run(args, rank=0)
    with process_group(launch, pick_device(args.device)), warnings.catch_warnings():
        if launch.rank != 0:
            warnings.simplefilter("ignore")  # rank 0 says it once
        return run(args, rank=launch.rank)


def _checked_outputs(args: argparse.Namespace):
    """The run's CheckpointConfig, once --out and the checkpoint are known to be usable: before minutes of
    loading and training, an --out that holds other files or cannot be written, a checkpoint to resume that
    is not there, or one a fresh start would overwrite, each stop the verb. Under torchrun one process probes
    the directories and all stop on its error."""
    from edgelora.atomic import check_writable
    from edgelora.distributed import on_rank0
    from edgelora.peft_format import check_adapter_out
    from edgelora.train import CheckpointConfig

    checkpoint = CheckpointConfig(_checkpoint_dir(args), every=args.checkpoint_every, resume=args.resume)

    def check_outputs() -> None:
        check_adapter_out(args.out)
        check_writable(Path(args.out), "--out")
        checkpoint.check()

    on_rank0(check_outputs)
    return checkpoint


def _interruptible(train, checkpoint, rank: int, bar):
    """Run `train()`, closing the progress bar; after Ctrl-C with a checkpoint on disk, say how to resume it and
    return None (the verb exits 130)."""
    try:
        return train()
    except KeyboardInterrupt:
        if checkpoint.path.is_file() and rank == 0:
            print(f"edgelora: interrupted; continue from {checkpoint.path} with the same command and --resume",
                  file=sys.stderr)
            return None
        raise
    finally:
        if bar is not None:
            bar.close()


def _fill_task_defaults(args: argparse.Namespace) -> None:
    """The task's defaults for what was not given; causal-lm refuses the classification-only flags by name."""
    if args.task != "causal-lm" and args.int8_scheme is not None:
        raise EdgeloraError(f"--int8-scheme applies to --task causal-lm; drop it for --task {args.task}")
    if args.task == "causal-lm":
        given = [k for k, unset in CLASSIFICATION_ONLY.items() if getattr(args, k) != unset]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise EdgeloraError(f"{flag} applies to --task classification; drop it for --task causal-lm "
                                "(LoRA on q/k/v/o, --include-mlp for the MLP, --qat int8 for the blockwise recipe)")
    base, epochs, batch_size, lr, max_length = DEFAULTS[args.task]
    for key, value in (("base", base), ("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                       ("max_length", max_length)):
        if getattr(args, key) is None:
            setattr(args, key, value)


def _train_causal(args: argparse.Namespace, rank: int) -> int:
    """`edgelora train --task causal-lm`: a LoRA for generation, trained with the decoder's int8 recipe on --qat."""
    from edgelora.causal_train import train_causal_lm

    from edgelora.causal_train import ROWWISE_ALPHA

    name = args.name or Path(args.out).name
    scheme = args.int8_scheme or "block"
    if args.int8_scheme is not None and args.qat != "int8":
        raise EdgeloraError(f"--int8-scheme {args.int8_scheme} chooses the int8 fake quantization; add --qat int8 or drop it")
    if scheme == "block" and args.weight_bits not in ("auto", "8"):
        raise EdgeloraError(f"--weight-bits {args.weight_bits}: causal-lm int8 uses 8-bit blocks of 32 (MatMulNBits); "
                            "drop --weight-bits, or add --int8-scheme rowwise")
    if scheme == "block" and args.smooth is not None:
        raise EdgeloraError("--smooth applies to --int8-scheme rowwise for causal-lm; add --int8-scheme rowwise or drop it")
    if args.weight_bits not in ("auto", "7", "8"):
        raise EdgeloraError(f"--weight-bits {args.weight_bits!r}: choose 7, 8 or auto")
    if args.smooth is not None:
        from edgelora.config import check_smoothing

        with as_flags({"smoothing": "--smooth"}):
            check_smoothing(args.smooth)
    if args.max_length < 1:
        raise EdgeloraError(f"--max-length {args.max_length} must be a positive number of tokens, e.g. 96")
    checkpoint = _checked_outputs(args)
    bar = Progress(None, f"train {name}") if rank == 0 else None

    def progress(msg: str) -> None:
        if bar is None:
            return
        step = re.search(r"step (\d+)/(\d+)", msg)
        if step:  # the count of steps is known once the data is read
            loss = msg.partition(" loss ")[2]
            bar.update_to(int(step[1]), "loss " + loss if loss else "", total=int(step[2]))
        else:
            bar.describe(msg)

    report = _interruptible(lambda: train_causal_lm(args.base, args.data, args.eval, out=args.out, name=name, epochs=args.epochs,
                                 lr=args.lr, batch_size=args.batch_size, rank=args.rank, alpha=args.alpha,
                                 dropout=args.dropout, include_mlp=args.include_mlp,
                                 qat="int8" if args.qat == "int8" else None, deploy_mode=args.deploy_mode,
                                 int8_scheme=scheme,
                                 weight_bits=None if args.weight_bits == "auto" or scheme == "block" else int(args.weight_bits),
                                 smoothing=ROWWISE_ALPHA if args.smooth is None else args.smooth,
                                 max_length=args.max_length,
                                 seed=args.seed, eval_generate=args.eval_generate, max_new_tokens=args.max_new_tokens,
                                 checkpoint=checkpoint, device=args.device, progress=progress),
                            checkpoint, rank, bar)
    if report is None:
        return 130
    if rank != 0:
        return 0
    scores = {k: v for k, v in (report.get("generation") or {}).items() if k != "predictions"}
    print(json.dumps({"adapter": name, "out": str(args.out), "task": "causal-lm", "steps": report["steps"],
                      "seconds": round(report["seconds"], 1), "eval_loss": (report["history"] or [{}])[-1].get("eval_loss"),
                      "generation": scores}))
    return 0


def _train(args: argparse.Namespace, rank: int) -> int:
    """The train verb in one process; under torchrun, rank 0 alone draws progress, saves and prints."""
    from edgelora.calibrate import check_calib_batches
    from edgelora.config import QuantConfig, check_recipe
    from edgelora.data import load_splits
    from edgelora.heads import MEAN_POOLED, architecture_head
    from edgelora.model import AdapterModel, model_type
    from edgelora.peft_format import save_adapter
    from edgelora.train import TrainConfig, seed_everything, train_adapter

    name = args.name or Path(args.out).name
    weight_bits = _resolve_bits(args.weight_bits)  # checked even without --qat: a typo should not pass silently
    if args.activations != "static" and (args.observer != "minmax" or args.observe_steps):
        raise EdgeloraError("--observer and --observe-steps set how static ranges are calibrated; add "
                            "--activations static or drop them")
    if args.activations != "dynamic" and args.qat != "int8":
        raise EdgeloraError(f"--activations {args.activations} applies to int8 training; add --qat int8")
    if args.activations == "static":
        with as_flags(FLAGS):
            check_calib_batches(args.calib_batches)
    if args.activations == "static" and args.observe_steps < 0:
        raise EdgeloraError(f"--observe-steps {args.observe_steps} must be 0 (freeze after calibration) or more steps")
    if args.max_length < 1:
        raise EdgeloraError(f"--max-length {args.max_length} must be a positive number of tokens, e.g. 128")
    checkpoint = _checked_outputs(args)
    train_ds, eval_ds = load_splits(args.data, args.eval, seed=args.seed, text_field=args.text_field, label_field=args.label_field)
    config = _adapter_config(args)
    if args.smooth is not None and args.qat != "int8":
        raise EdgeloraError("--smooth applies to int8 training; add --qat int8")
    with as_flags(FLAGS, PHRASES):
        quant = (QuantConfig(weight_bits=weight_bits, mode=args.deploy_mode, activations=args.activations,
                             smoothing=args.smooth)
                 if args.qat == "int8" else None)
        check_recipe(config, quant)  # before minutes of loading: what add_adapter would refuse after them
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)
    base, tokenizer, max_length = _base_and_tokenizer(args.base, args.max_length)
    model = AdapterModel(base)
    head = MEAN_POOLED if args.head == "mean-pooled" else architecture_head(model_type(base))
    seed_everything(args.seed)  # the adapter's initial weights follow --seed too
    model.add_adapter(name, config, list(train_ds.label_names), quant=quant, head=head)
    smoothing = _smooth(args, model, tokenizer, train_ds.texts) if args.smooth is not None else None
    calibration = _calibrate(args, model, tokenizer, train_ds.texts) if args.activations == "static" else None
    bar = None
    if rank == 0:
        bar = Progress(train_config.epochs * -(-len(train_ds) // train_config.batch_size), f"train {name}")

    def progress(msg: str) -> None:
        if bar is not None:
            step = re.search(r"step (\d+)/", msg)
            loss = msg.partition(" loss ")[2]
            bar.update_to(int(step[1]) if step else bar.n + 1, "loss " + loss if loss else "")  # resumed: part-way

    result = _interruptible(lambda: train_adapter(model, name, tokenizer, train_ds.texts, train_ds.labels,
                                                  eval_ds.texts, eval_ds.labels, train_config, progress, checkpoint),
                            checkpoint, rank, bar)
    if result is None:
        return 130
    if rank != 0:
        return 0
    training = {"data": str(args.data), "train_size": len(train_ds), "eval_size": len(eval_ds),
                "best_eval_accuracy": result.best_accuracy, "best_epoch": result.best_epoch,
                "history": result.history, "device": result.device, "max_length": max_length,
                "processes": result.processes, "batch_size": train_config.batch_size,
                **({"calibration": calibration} if calibration else {}),
                **({"smoothing": smoothing} if smoothing else {})}
    save_adapter(model, name, args.out, base_name=str(args.base), extra={"training": training})
    checkpoint.remove()  # its work is in --out now
    print(json.dumps({"adapter": name, "out": str(args.out), "eval_accuracy": result.best_accuracy,
                      "best_epoch": result.best_epoch, "device": result.device}))
    return 0


def _adapter_config(args: argparse.Namespace):
    """The LoRA or bottleneck config the encoder tasks' flags describe (--kind, --rank, --targets, ...)."""
    from edgelora.config import BottleneckConfig, LoraConfig

    if args.kind == "lora":
        targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else None
        return LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, use_rslora=args.rslora,
                          target_modules=targets, include_mlp=args.include_mlp, init=args.init)
    return BottleneckConfig(reduction_factor=args.reduction_factor, placement=args.placement)


def _base_and_tokenizer(base_arg: str, max_length: int):
    """(base, tokenizer, max_length): the base model, and its tokenizer truncating to what its position table holds."""
    from edgelora.model import load_base, max_positions
    from edgelora.tokenize import load_tokenizer

    base, base_path = load_base(base_arg)
    fitting = min(max_length, max_positions(base) or max_length)  # no text past the position table
    tokenizer = load_tokenizer(base_path, fitting)  # a missing tokenizer is an error before any warning
    if fitting < max_length:
        warnings.warn(f"--max-length {max_length} exceeds the base's {fitting} positions; texts are truncated "
                      f"to {fitting} tokens")
    return base, tokenizer, fitting


def _calibrate(args: argparse.Namespace, model, tokenizer, texts) -> dict:
    """Static activations: fill every layer's observer from --calib-batches batches of the training texts."""
    from edgelora.calibrate import ObserverConfig, calibrate, text_batches
    from edgelora.distributed import world

    if args.observe_steps and world()[1] > 1:
        raise EdgeloraError("--observe-steps needs one process: under torchrun each process would observe its own "
                            "shard and the ranges would differ; use --observe-steps 0")
    batches = text_batches(tokenizer, texts, args.calib_batches, args.batch_size, seed=args.seed)
    return calibrate(model, batches, ObserverConfig(kind=args.observer), qat_steps=args.observe_steps).as_dict()


def _smooth(args: argparse.Namespace, model, tokenizer, texts) -> dict:
    """SmoothQuant factors from --calib-batches batches of the training texts, set before training starts."""
    from edgelora.calibrate import text_batches
    from edgelora.smooth import smooth_model

    # Same seed on every torchrun process: each computes the same factors from the same batches.
    batches = text_batches(tokenizer, texts, args.calib_batches, args.batch_size, seed=args.seed)
    return smooth_model(model, batches, args.smooth)


def _resolve_bits(value: str) -> int:
    if value == "auto":
        from edgelora.runtime.cpu import detect_isa, recommended_weight_bits

        return recommended_weight_bits(detect_isa().isa)
    if value not in ("7", "8"):
        raise EdgeloraError(f"--weight-bits {value} is not supported; choose 7, 8 or auto")
    return int(value)


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora calibrate`."""
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="a trained adapter without static ranges (e.g. --qat none)")
    p.add_argument("--data", required=True, help="the adapter's training data (.jsonl/.csv or builtin:NAME[:N]); "
                                                 "calibration draws from its training split")
    p.add_argument("--eval", default=None, help="the held-out data training was given, if any (then all of --data "
                                                "is the training split, as in train)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--out", required=True, help="adapter directory to write with the ranges (not ADAPTER_DIR)")
    p.add_argument("--base", default="minilm", help="Hugging Face model directory, or 'minilm'")
    p.add_argument("--calib-batches", type=int, default=8, metavar="N", help="training batches the observers see")
    p.add_argument("--observer", choices=("minmax", "moving_average", "percentile"), default="minmax",
                   help="how the observed values become a range")
    p.add_argument("--weight-bits", default=None, help="7, 8 or auto (default: the adapter's int8 recipe, else auto)")
    p.add_argument("--deploy-mode", choices=("merged", "switchable"), default=None,
                   help="the export mode to calibrate for (default: the adapter's int8 recipe, else merged)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the adapter's training --seed: the same training split")
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(observe_steps=0)  # for _calibrate: nothing trains here, the ranges freeze at once


def calibrate_command(args: argparse.Namespace) -> int:
    """Static post-training quantization: a trained adapter plus activation ranges calibrated on its training text,
    saved as a new adapter that `edgelora export --precision int8` turns into a static int8 bundle.

    The same --data, --eval and --seed as training give the batches `train --activations static` would calibrate on,
    so the two differ only in whether the adapter trained against the quantizer (QAT) or not (PTQ):

        edgelora train --data d.jsonl --qat none --out plain
        edgelora calibrate plain --data d.jsonl --weight-bits 7 --out plain-static
        edgelora export minilm --adapter plain-static --precision int8 --out bundle
    """
    with as_flags({}, COMMAND_PHRASES):
        return _calibrate_command(args)


def _calibrate_command(args: argparse.Namespace) -> int:
    import dataclasses

    from edgelora.atomic import check_writable
    from edgelora.calibrate import check_calib_batches
    from edgelora.config import QuantConfig, config_to_dict
    from edgelora.data import load_splits
    from edgelora.model import AdapterModel
    from edgelora.peft_format import check_adapter_out, load_adapter, read_adapter, save_adapter

    source, out = Path(args.adapter), Path(args.out)
    if out.resolve() == source.resolve():
        raise EdgeloraError(f"--out {out} is ADAPTER_DIR itself; write the calibrated adapter to a new directory")
    with as_flags(FLAGS):
        check_calib_batches(args.calib_batches)
    if args.batch_size < 1:
        raise EdgeloraError(f"--batch-size {args.batch_size} must be a positive number of texts, e.g. 32")
    if args.max_length < 1:
        raise EdgeloraError(f"--max-length {args.max_length} must be a positive number of tokens, e.g. 128")
    extras = read_adapter(source)[0].get("edgelora") or {}
    held = QuantConfig(**extras["quantization"]) if extras.get("quantization") else None
    if held is not None and held.activations == "static":
        raise EdgeloraError(f"{source}: already has static activation ranges; export it as it is "
                            "(edgelora export --precision int8)")
    bits = _resolve_bits(args.weight_bits or ("auto" if held is None else str(held.weight_bits)))
    mode = args.deploy_mode or ("merged" if held is None else held.mode)
    if held is not None and (held.weight_bits, held.mode) != (bits, mode):
        raise EdgeloraError(f"{source}: trained with --qat int8 for {held.weight_bits}-bit weights, {held.mode} mode; "
                            f"calibrating for {bits}-bit, {mode} would deploy other weights than it learned: drop "
                            "--weight-bits and --deploy-mode")
    recipe = (QuantConfig(weight_bits=bits, mode=mode, activations="static") if held is None
              else dataclasses.replace(held, activations="static"))  # keeps its skip_layers and smoothing
    check_adapter_out(out)
    check_writable(out, "--out")
    train_ds, _ = load_splits(args.data, args.eval, seed=args.seed, text_field=args.text_field,
                              label_field=args.label_field)
    if extras.get("labels") and sorted(extras["labels"]) != sorted(train_ds.label_names):
        raise EdgeloraError(f"--data {args.data} has labels {sorted(train_ds.label_names)} but {source} was trained on "
                            f"{sorted(extras['labels'])}; calibrate with the adapter's training data")
    base, tokenizer, _ = _base_and_tokenizer(args.base, args.max_length)
    model = AdapterModel(base)
    name = load_adapter(model, source)
    model.set_quant(recipe)
    calibration = {**_calibrate(args, model, tokenizer, train_ds.texts), "after_training": True,
                   "data": str(args.data), "seed": args.seed, "batch_size": args.batch_size}
    save_adapter(model, name, out, base_name=str(args.base),
                 extra={**({"training": extras["training"]} if "training" in extras else {}), "calibration": calibration})
    print(json.dumps({"adapter": name, "out": str(out), "recipe": config_to_dict(recipe), "calibration": calibration}))
    return 0
