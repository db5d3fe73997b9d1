"""Decoder bundles for the generation tests, written by the real exporter (`export_decoder`).

`export_test_decoder(model, tokenizer_dir, out)` exports `model` to a merged fp32 decoder bundle with the
tokenizer files of `tokenizer_dir` (a chat template there, or `chat_template`, travels with it); `adapter`
names a LoRA that is merged in: a zero-B one, so the bundle computes the base's function under that name.
`tiny_llama(vocab_size, seed)` is the tiny random grouped-query-attention Llama (or Qwen2) they use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from edgelora.exporters.decoder_export import export_decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_llama(vocab_size: int, seed: int = 0, context: int = 96, kind: str = "llama") -> nn.Module:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (GQA), eager attention, fp32, eval mode; `kind`
    "qwen2" gives the same shape as a Qwen2 (biases on q/k/v).

    Weights are drawn wider than Hugging Face's default (std 0.2 instead of 0.02) so that the next-token
    logits have clear winners: near-ties would make greedy agreement between two correct fp32
    implementations a matter of summation order.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    torch.manual_seed(seed)
    config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                          initializer_range=0.2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                          pad_token_id=2, attn_implementation="eager")
    return model_class(config).eval()


def _zero_lora(model: nn.Module, directory: Path) -> Path:
    """A PEFT CAUSAL_LM LoRA on q_proj/v_proj with B = 0: a real adapter file that leaves the base unchanged."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    peft_model.save_pretrained(directory)
    return directory


def export_test_decoder(model: nn.Module, tokenizer_dir: Path, out: Path, *, context_length: int | None = None,
                        adapter: str | None = None, chat_template: str | None = None) -> Path:
    """A merged fp32 decoder bundle of `model` at `out`, checked by the exporter against torch.

    `context_length`, where given, must be the model's own (the exporter takes it from the config)."""
    if context_length is not None:
        assert context_length == model.config.max_position_embeddings, "the exporter reads the model's context"
    tok = out.parent / f"{out.name}.tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, tok / name)
    if chat_template is not None:
        config = json.loads((tok / "tokenizer_config.json").read_text()) if (tok / "tokenizer_config.json").is_file() else {}
        (tok / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=chat_template)))
    lora = _zero_lora(model, out.parent / f"{out.name}.{adapter}") if adapter else None
    export_decoder(model, out, adapter=lora, adapter_name=adapter, precision="fp32", tokenizer_dir=tok)
    return out
