"""A tiny causal LM directory for tests: random Llama (grouped-query attention, tied embeddings) or Qwen2 (q/k/v
bias) weights saved with `save_pretrained`, and a small byte-level BPE tokenizer trained here on the generation
tasks' own text, with a ChatML chat template. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgelora import generation_tasks

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_chat_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p + " " + c for t in generation_tasks.GENERATION_TASKS for p, c in generation_tasks.make_pairs(t, 300, 0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=CHATML)
    hf.save_pretrained(directory)
    return directory


def make_lm(arch: str, vocab: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, **common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **common))
    model.config._attn_implementation = "eager"
    return model.eval()


def lm_dir(tmp_path: Path, arch: str, tok_dir: Path) -> Path:
    """A saved tiny causal LM with the chat tokenizer: a base directory `train_causal_lm` loads."""
    d = tmp_path / f"tiny_{arch}"
    make_lm(arch, 400).save_pretrained(d)
    for f in tok_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


