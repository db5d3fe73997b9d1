"""TEST FIXTURE ONLY: a stand-in decoder exporter, until the real one (branch `decoder`) is merged.

`export_test_decoder(model, tokenizer_dir, out)` writes a decoder bundle by the decoder contract (inputs
input_ids, attention_mask, position_ids, past_key_values.{i}.key|value; outputs logits, present.{i}.key|value;
manifest task "causal-lm", format_version 2, a `generation` record, the tokenizer files) from any
transformers causal LM, through `torch.onnx.export` (TorchScript, dynamo=False) of a wrapper that builds a
DynamicCache from the explicit past tensors. fp32 only, no checks beyond the contract: the runtime tests
need graphs, not an exporter.

`tiny_llama(vocab_size, seed)` is the tiny random grouped-query-attention Llama (or Qwen2) the generation
tests use.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from edgelora.runtime.bundle import CAUSAL_LM, AdapterEntry, Generation, Manifest, write_bundle

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


class _WithPast(nn.Module):
    """The contract's flat signature around a transformers causal LM: explicit past tensors in, presents out."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_test_decoder(model: nn.Module, tokenizer_dir: Path, out: Path, *, context_length: int,
                        adapter: str | None = None, eos_token_ids: tuple[int, ...] = (2,),
                        chat_template: str | None = None) -> Path:
    """A merged fp32 decoder bundle of `model` at `out` (see the module docstring)."""
    c = model.config
    L, kv, hd = c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    past_names = [f"past_key_values.{i}.{t}" for i in range(L) for t in ("key", "value")]
    present_names = [f"present.{i}.{t}" for i in range(L) for t in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names]
    outputs = ["logits", *present_names]
    batch, past, seq = 2, 3, 4
    example = (
        torch.randint(3, c.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        *[torch.randn(batch, kv, past, hd) for _ in past_names],
    )
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past_seq"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total_seq"} for n in present_names})

    def write_model(path: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on the cache's Python-side branches
            torch.onnx.export(_WithPast(model, L), example, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=17, dynamo=False)

    def copier(name: str):
        return lambda path: shutil.copyfile(tokenizer_dir / name, path)

    writers = {"model.onnx": write_model}
    writers.update({n: copier(n) for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()})
    manifest = Manifest(
        task=CAUSAL_LM, mode="merged", precision="fp32", inputs=tuple(inputs), outputs=tuple(outputs),
        adapters=(AdapterEntry.create(adapter, kind="lora", labels=(), switchable=False),) if adapter else (),
        generation=Generation(num_layers=L, num_kv_heads=kv, head_dim=hd, vocab_size=c.vocab_size,
                              context_length=context_length, eos_token_ids=tuple(eos_token_ids),
                              bos_token_id=c.bos_token_id, pad_token_id=c.pad_token_id, chat_template=chat_template),
    )
    write_bundle(out, manifest, writers, tokenizer_dir=None)
    return out
