"""Tiny decoder bundles for the serving tests (engine, OpenAI routes): a random grouped-query-attention Llama
over the small chat tokenizer of tests/tiny_decoder.py, exported by the real exporter in fp32 and int8.

The vocabulary is 400 tokens, so a step's logits stay small and the tests fast; the weights are drawn wide
(tests/decoder_fixture.py) so greedy tokens have clear winners.
"""

from __future__ import annotations

from pathlib import Path

from decoder_fixture import export_test_decoder, tiny_llama
from tiny_decoder import train_chat_tokenizer

from edgelora.exporters.decoder_export import export_decoder

VOCAB = 400  # the chat tokenizer's
CONTEXT = 128
PROMPTS = ["turn on the kitchen light", "set the alarm for seven", "play some music in the bedroom please now",
           "what", "dim the lights in the living room to twenty percent and close the blinds"]


def chat_tokenizer(root: Path) -> Path:
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_chat_tokenizer(tok)
    return tok


def tiny_decoder_bundle(root: Path, precision: str = "fp32", seed: int = 0) -> Path:
    """A merged decoder bundle (no adapter) of the tiny Llama at root/<precision>; its tokenizer beside it.
    `precision` "int8-rowwise" is int8 with the rowwise scheme."""
    out = root / precision
    precision, _, scheme = precision.partition("-")
    export_decoder(tiny_llama(VOCAB, seed=seed, context=CONTEXT), out, precision=precision,
                   tokenizer_dir=chat_tokenizer(root), int8_scheme=scheme or None)
    return out


def random_lora(base, out: Path, seed: int, r: int, targets: list[str], std: float = 0.3) -> Path:
    """A PEFT CAUSAL_LM LoRA with random A and B (B drawn with `std`, wide enough to change the greedy tokens),
    saved at `out`."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                           task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)
    model.save_pretrained(out)
    return out


def tiny_switchable_bundle(root: Path, precision: str = "fp32", seed: int = 0, attention: str = "invariant") -> Path:
    """A switchable bundle of the tiny Llama with adapters "a" (q/v, rank 4) and "b" (q/k/o and MLP up, rank 2),
    at root/switchable-<precision> (-<attention> unless the default core)."""
    base = tiny_llama(VOCAB, seed=seed, context=CONTEXT)
    a = root / "lora-a"
    b = root / "lora-b"
    if not a.is_dir():
        random_lora(base, a, 1, 4, ["q_proj", "v_proj"])
        random_lora(base, b, 2, 2, ["q_proj", "k_proj", "o_proj", "up_proj"])
    out = root / (f"switchable-{precision}" + ("" if attention == "invariant" else f"-{attention}"))
    precision, _, scheme = precision.partition("-")
    export_decoder(base, out, adapters={"a": a, "b": b}, mode="switchable", precision=precision,
                   tokenizer_dir=chat_tokenizer(root), int8_scheme=scheme or None, attention=attention)
    return out


def tiny_adapter_bundle(root: Path, adapter: str = "demo", seed: int = 0) -> Path:
    """A merged fp32 bundle of the same tiny Llama with a zero LoRA named `adapter` baked in."""
    return export_test_decoder(tiny_llama(VOCAB, seed=seed, context=CONTEXT), chat_tokenizer(root),
                               root / f"merged-{adapter}", adapter=adapter)
