"""The SVD toolkit measured on all-MiniLM-L6-v2: what a rank-k LoRA keeps of a full fine-tune, and what
int8-residual initialisation buys an adapter under int8.

1. Fully fine-tune MiniLM (every encoder weight and a head on the mean-pooled embedding) on the demo's
   intent task (`builtin:intent:2000`, 8 classes, held-out paraphrases), briefly, on the CPU.
2. Extract the delta of every adaptable linear at ranks 1..64 and at full rank (one SVD per layer, then
   truncated); per rank: relative reconstruction error and energy kept of the deltas, and held-out accuracy
   of base + extracted LoRA + the fine-tuned head, paired against full rank (does truncation remove noise,
   or information?). Rank 0 is the head on the untouched base.
3. int8 (fake quantization, switchable recipe: base Q(W), adapter float) with init "int8-residual" against
   "default": at step 0 on the fine-tuned model (the adapter only absorbs rounding: its accuracy is the
   int8 model's), and after briefly training a LoRA on the base.

    python benchmarks/svd_rank.py [--out runs/svd_rank] [--train-examples N] [--epochs 2]

Measured on 2 shared CPU cores: 11 minutes at the defaults (1600 training examples, 2 epochs; the
brief int8 LoRA trainings are most of it), under 2 minutes with --train-examples 640.

Writes svd_rank.json and svd_rank.png to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgelora.atomic import write_file_atomic, write_text_atomic
from edgelora.config import LoraConfig, QuantConfig
from edgelora.data import load_splits
from edgelora.extract import Extraction, add_extracted_adapter, extract_lora
from edgelora.model import AdapterModel, hidden_size, load_base
from edgelora.tokenize import encode, load_tokenizer
from edgelora.train import TrainConfig, predict, seed_everything, train_adapter

INIT_RANK = 16  # rank of the int8-residual / default LoRA in part 3
FULL_RANK = 10**6  # clamped to each layer's smaller side: the exact, complete factorisation


def _pooled(encoder: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = encoder(**feeds).last_hidden_state  # (batch, seq, hidden)
    mask = feeds["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def full_finetune(base, tok, texts, labels, n_labels: int, epochs: int, lr: float, head_lr: float, seed: int):
    """Every encoder weight and a linear head on the mean-pooled embedding, AdamW, warm-up then linear decay."""
    seed_everything(seed)
    tuned = copy.deepcopy(base).train()
    for p in tuned.parameters():
        p.requires_grad_(True)
    head = torch.nn.Linear(hidden_size(base), n_labels)
    opt = torch.optim.AdamW([{"params": tuned.parameters(), "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                            weight_decay=0.01)
    batch = 32
    steps = epochs * math.ceil(len(texts) / batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm)))
    rng = np.random.default_rng(seed)
    y_all = np.asarray(labels)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            feeds = {k: torch.from_numpy(v) for k, v in encode(tok, [texts[j] for j in idx]).items()}
            loss = F.cross_entropy(head(_pooled(tuned, feeds)), torch.from_numpy(y_all[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(tuned.parameters()) + list(head.parameters()), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    return tuned.eval(), head.eval(), losses


def truncate(ext: Extraction, k: int) -> Extraction:
    """The rank-k extraction from a full-rank one: its factors split sqrt(sigma) evenly, so sigma_i is the
    product of the norms of A's row i and B's column i, and the first k of each are the rank-k truncation."""
    fits, factors = [], {}
    for f in ext.fits:
        A, B = ext.factors[f.layer]
        kk = min(k, A.shape[0])
        sigma = A.double().norm(dim=1) * B.double().norm(dim=0)
        err = math.sqrt(float((sigma[kk:] ** 2).sum()))
        total = f.delta_norm**2
        fits.append(type(f)(f.layer, f.shape, kk, 1 - err**2 / total, err / f.delta_norm, f.delta_norm, f.base_norm))
        factors[f.layer] = (A[:kk].clone(), B[:, :kk].clone())
    return Extraction(fits, factors, ext.dropped)


def predictions(model: AdapterModel, tok, texts) -> np.ndarray:
    return predict(model, tok, texts).argmax(-1)


def paired(correct: np.ndarray, ref: np.ndarray) -> dict:
    """Rank k against full rank on the same examples: b = right only here, c = right only at full rank.
    |b - c| beyond ~2 sqrt(b + c) (McNemar, normal approximation) is more than sampling noise."""
    b, c = int((correct & ~ref).sum()), int((~correct & ref).sum())
    return {"only_here": b, "only_full": c, "z": (b - c) / math.sqrt(b + c) if b + c else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/svd_rank")
    parser.add_argument("--data", default="builtin:intent:2000")
    parser.add_argument("--train-examples", type=int, default=None,
                        help="subsample of the training split, to save time (default: all of it, 1600)")
    parser.add_argument("--eval-examples", type=int, default=None, help="held-out examples used (default: all)")
    parser.add_argument("--train-eval-examples", type=int, default=256, help="training examples re-scored per rank")
    parser.add_argument("--epochs", type=int, default=2, help="full fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=2e-3)
    parser.add_argument("--lora-epochs", type=int, default=1, help="epochs of the brief LoRA training in part 3")
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = {}
    t0 = time.perf_counter()

    train_ds, eval_ds = load_splits(args.data, seed=args.seed)
    if args.eval_examples is not None:
        eval_ds = type(eval_ds)(eval_ds.texts[: args.eval_examples], eval_ds.labels[: args.eval_examples],
                                eval_ds.label_names)
    pick = np.random.default_rng(args.seed).permutation(len(train_ds))[: args.train_examples]
    train_texts = [train_ds.texts[i] for i in pick]
    train_labels = [train_ds.labels[i] for i in pick]
    labels = list(train_ds.label_names)
    eval_y = np.asarray(eval_ds.labels)
    seen = slice(0, args.train_eval_examples)
    seen_y = np.asarray(train_labels[seen])
    base, base_path = load_base("minilm")
    tok = load_tokenizer(base_path, 64)

    # 1. full fine-tune
    t = time.perf_counter()
    tuned, head, losses = full_finetune(base, tok, train_texts, train_labels, len(labels), args.epochs, args.lr,
                                        args.head_lr, args.seed)
    clock["full_finetune_s"] = time.perf_counter() - t
    print(f"full fine-tune: {len(losses)} steps in {clock['full_finetune_s']:.0f} s, loss {losses[0]:.3f} -> "
          f"{np.mean(losses[-5:]):.3f}", flush=True)
    head_wb = (head.weight.detach(), head.bias.detach())

    # 2. extraction at every rank
    t = time.perf_counter()
    model = AdapterModel(copy.deepcopy(base))
    full = extract_lora(model, tuned, rank=FULL_RANK)
    clock["svd_s"] = time.perf_counter() - t
    dropped = full.dropped
    ranks = [int(r) for r in args.ranks.split(",")] + [max(f.rank for f in full.fits)]
    rows = []
    t = time.perf_counter()

    def score(name: str) -> tuple[np.ndarray, np.ndarray]:
        model.set_adapter(name)
        return (predictions(model, tok, eval_ds.texts) == eval_y,
                predictions(model, tok, train_texts[seen]) == seen_y)

    ref = AdapterModel(tuned)  # the fine-tuned encoder, no adapter: what extraction approximates
    tuned_eval = predict_pooled(ref, head, tok, eval_ds.texts) == eval_y
    tuned_seen = predict_pooled(ref, head, tok, train_texts[seen]) == seen_y

    for k in [0] + ranks:
        name = f"r{k}"
        if k == 0:  # the fine-tuned head on the untouched base: a LoRA of one zero component
            ext = truncate(full, 1)
            ext.factors = {n: (a, b * 0) for n, (a, b) in ext.factors.items()}
        else:
            ext = truncate(full, k)
        add_extracted_adapter(model, name, ext, labels, head_wb)
        correct, seen_ok = score(name)
        s = ext.summary() if k else {"relative_error": 1.0, "energy_kept": 0.0, "lora_params": 0, "compression_ratio": None}
        rows.append({"rank": k, "full": k == ranks[-1], "relative_error": s["relative_error"],
                     "energy_kept": s["energy_kept"], "lora_params": s["lora_params"],
                     "compression_ratio": s["compression_ratio"],
                     "mean_layer_relative_error": float(np.mean([f.relative_error for f in ext.fits])) if k else 1.0,
                     "heldout_accuracy": float(correct.mean()), "train_accuracy": float(seen_ok.mean()),
                     "_correct": correct})
        model.delete_adapter(name)
        print(f"rank {k:>4}: delta rel. error {rows[-1]['relative_error']:.3f}, held-out acc "
              f"{rows[-1]['heldout_accuracy']:.4f}, train acc {rows[-1]['train_accuracy']:.4f}", flush=True)
    full_correct = rows[-1]["_correct"]
    for r in rows:
        r["vs_full"] = paired(r.pop("_correct"), full_correct)
    clock["rank_sweep_s"] = time.perf_counter() - t

    # 3. int8-residual init vs default
    t = time.perf_counter()
    int8 = {"rank": INIT_RANK, "step0_on_finetuned": {}, "brief_lora": {}}
    for bits in (8, 7):
        for init in ("default", "int8-residual"):
            m = AdapterModel(copy.deepcopy(tuned))
            seed_everything(args.seed)
            m.add_adapter("q", LoraConfig(r=INIT_RANK, include_mlp=True, init=init), labels,
                          quant=QuantConfig(weight_bits=bits, mode="switchable"))
            with torch.no_grad():
                m.heads["q"].weight.copy_(head_wb[0])
                m.heads["q"].bias.copy_(head_wb[1])
            acc = float((predictions(m, tok, eval_ds.texts) == eval_y).mean())
            entry = {"heldout_accuracy": acc, "embedding_rel_error_vs_fp32": emb_error(m, ref, tok, eval_ds.texts[:64])}
            # The adapter can absorb weight rounding only: the same model with activations left float.
            m.set_quant(QuantConfig(weight_bits=bits, activations="none", mode="switchable"))
            entry["embedding_rel_error_weights_only"] = emb_error(m, ref, tok, eval_ds.texts[:64])
            int8["step0_on_finetuned"][f"int{bits}/{init}"] = entry
            print(f"step 0, fine-tuned model, int{bits} {init}: acc {acc:.4f}, embedding error vs fp32 "
                  f"{entry['embedding_rel_error_vs_fp32']:.2e} (weights only {entry['embedding_rel_error_weights_only']:.2e})",
                  flush=True)
    int8["step0_on_finetuned"]["fp32"] = {"heldout_accuracy": float(tuned_eval.mean())}
    plain = AdapterModel(copy.deepcopy(base))
    for init in ("default", "int8-residual"):
        m = AdapterModel(copy.deepcopy(base))
        seed_everything(args.seed)
        m.add_adapter("t", LoraConfig(r=INIT_RANK, include_mlp=True, init=init), labels,
                      quant=QuantConfig(weight_bits=7, mode="switchable"))
        step0 = emb_error(m, plain, tok, eval_ds.texts[:64])
        res = train_adapter(m, "t", tok, train_texts, train_labels, eval_ds.texts, eval_ds.labels,
                            TrainConfig(epochs=args.lora_epochs, batch_size=32, lr=2e-3, seed=args.seed, device="cpu"))
        int8["brief_lora"][f"int7/{init}"] = {"step0_embedding_rel_error_vs_fp32": step0,
                                              "heldout_accuracy_int8_fake_quant": res.best_accuracy,
                                              "history": res.history}
        print(f"brief LoRA int7 {init}: step-0 embedding error {step0:.2e}, acc after {args.lora_epochs} epoch(s) "
              f"{res.best_accuracy:.4f}", flush=True)
    clock["int8_init_s"] = time.perf_counter() - t
    clock["total_s"] = time.perf_counter() - t0

    result = {
        "base": "all-MiniLM-L6-v2",
        "data": args.data, "train_examples": len(train_texts), "heldout_examples": len(eval_ds),
        "train_rescored": len(seen_y), "epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr,
        "threads": args.threads, "final_loss": float(np.mean(losses[-5:])),
        "tuned": {"heldout_accuracy": float(tuned_eval.mean()), "train_accuracy": float(tuned_seen.mean())},
        "layers": len(full.fits),
        "dropped": {"count": len(dropped), "largest": sorted(dropped, key=lambda d: -d["relative"])[:5]},
        "ranks": rows,
        "int8_init": int8,
        "seconds": clock,
    }
    write_text_atomic(out / "svd_rank.json", json.dumps(result, indent=2) + "\n")
    plot(result, out / "svd_rank.png")
    print(f"wrote {out / 'svd_rank.json'} and {out / 'svd_rank.png'} in {clock['total_s']:.0f} s")


@torch.no_grad()
def predict_pooled(ref: AdapterModel, head: torch.nn.Linear, tok, texts) -> np.ndarray:
    out = []
    for i in range(0, len(texts), 64):
        feeds = {k: torch.from_numpy(v) for k, v in encode(tok, list(texts[i : i + 64])).items()}
        out.append(head(ref.eval().encode(**feeds)).argmax(-1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def emb_error(model: AdapterModel, reference: AdapterModel, tok, texts) -> float:
    """||pooled(model) - pooled(reference)|| / ||pooled(reference)|| on `texts` (reference without adapters)."""
    feeds = {k: torch.from_numpy(v) for k, v in encode(tok, list(texts)).items()}
    previous = reference.active
    reference.set_adapter(None)
    want = reference.eval().encode(**feeds)
    reference.set_adapter(previous)
    got = model.eval().encode(**feeds)
    return float((got - want).norm() / want.norm())


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["ranks"]
    full_rank = rows[-1]["rank"]
    xs = [r["rank"] if r["rank"] else 0.5 for r in rows]  # rank 0 drawn at 0.5 on the log axis
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    ax1.plot(xs, [r["relative_error"] for r in rows], "o-", label="relative error ||Δ - BA|| / ||Δ||")
    ax1.plot(xs, [r["energy_kept"] for r in rows], "s--", label="energy kept")
    ticks = (xs, ["0"] + [str(r["rank"]) for r in rows[1:-1]] + [f"full\n({full_rank})"])
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(*ticks)
    ax1.set_xlabel("rank")
    ax1.set_title(f"reconstruction of the fine-tune's deltas ({result['layers']} layers)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [r["heldout_accuracy"] for r in rows], "o-", label="extracted LoRA, held-out")
    ax2.plot(xs, [r["train_accuracy"] for r in rows], "s--", label="extracted LoRA, training examples")
    ax2.axhline(result["tuned"]["heldout_accuracy"], color="C0", ls=":", label="full fine-tune, held-out")
    ax2.axhline(result["tuned"]["train_accuracy"], color="C1", ls=":", label="full fine-tune, training")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(*ticks)
    ax2.set_xlabel("rank (0: the fine-tuned head on the untouched base)")
    ax2.set_title(f"accuracy ({result['heldout_examples']} held-out, {result['train_rescored']} training)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    step0 = result["int8_init"]["step0_on_finetuned"]
    brief = result["int8_init"]["brief_lora"]
    names = [k for k in step0 if k != "fp32"]
    ax3.bar(range(len(names)), [step0[k]["heldout_accuracy"] for k in names], color=["C0", "C1"] * 2)
    ax3.axhline(step0["fp32"]["heldout_accuracy"], color="k", ls=":", label="fp32")
    for i, k in enumerate(brief):
        ax3.bar(len(names) + i, brief[k]["heldout_accuracy_int8_fake_quant"], color=["C0", "C1"][i], hatch="//")
    ax3.set_xticks(range(len(names) + len(brief)),
                   [f"{k}\nstep 0" for k in names] + [f"{k}\nbrief LoRA" for k in brief], fontsize=7)
    lo = min([step0[k]["heldout_accuracy"] for k in step0] + [brief[k]["heldout_accuracy_int8_fake_quant"] for k in brief])
    ax3.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax3.set_title(f"int8 fake quant: init default vs int8-residual (r={result['int8_init']['rank']})")
    ax3.legend()
    fig.tight_layout()
    write_file_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


if __name__ == "__main__":
    main()
