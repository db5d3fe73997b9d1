"""Tiny random decoders and the step loops the decoder graph tests share (tests/test_decoder_export.py,
tests/test_decoder_rowwise.py): a left-padded prefill and greedy decode steps through a graph or through torch's
own cache, the relative error at real positions, and one row run alone and in a padded batch.
"""

from __future__ import annotations

import numpy as np
import torch

from edgelora.exporters.decoder_graph import input_names
from edgelora.exporters.decoder_validate import decode_feeds, position_ids, prefill_feeds, session

DECODE_STEPS = 4


def make_decoder(kind: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny random causal LM, eager attention, eval mode; Qwen2 gets non-zero q/k/v biases."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, num_hidden_layers=layers, max_position_embeddings=64, attn_implementation="eager")
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                   num_key_value_heads=2, tie_word_embeddings=True, **common))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                                   num_key_value_heads=1, tie_word_embeddings=False, **common))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    elif kind == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                       num_key_value_heads=2, sliding_window=48, **common))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return model.eval()


def torch_logits(model: torch.nn.Module, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """torch's logits for each step of `feeds` (a prefill, then one token per step), through its own cache."""
    cache, out = None, []
    with torch.no_grad():
        for f in feeds:
            r = model(**{k: torch.from_numpy(f[k]) for k in ("input_ids", "attention_mask", "position_ids")},
                      cache=cache, use_cache=True)
            cache = r.cache
            out.append(r.logits.numpy())
    return out


def graph_steps(sess, spec, steps: int = DECODE_STEPS, batch: int = 3) -> tuple[list[dict], list[np.ndarray]]:
    """A left-padded prefill and `steps` greedy decode steps through the graph: (feeds, logits) per step."""
    feeds = [prefill_feeds(spec, batch=batch)]
    logits = []
    for _ in range(steps + 1):
        out = sess.run(None, feeds[-1])
        logits.append(out[0])
        if len(logits) <= steps:
            feeds.append(decode_feeds(feeds[-1], out[1:], out[0][:, -1].argmax(-1)))
    return feeds, logits


def rel_error(got: list[np.ndarray], ref: list[np.ndarray], feeds: list[dict]) -> float:
    """Max |difference| at real positions over the largest |logit|, across every step."""
    worst = 0.0
    for g, r, f in zip(got, ref, feeds):
        real = f["attention_mask"][:, -g.shape[1]:].astype(bool)
        worst = max(worst, float(np.abs(g[real] - r[real]).max() / np.abs(r[real]).max()))
    return worst


def alone_and_batched(graph, pad: int, real: int = 40, seed: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Row 0 (`real` tokens) run alone and left-padded by `pad` in a batch with a longer row: the logits of
    its prefill (real positions) and of one decode step, each way."""
    sess = session(graph.model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 128, size=(2, real + pad))
    ids[0, :pad] = 0
    mask = np.ones_like(ids)
    mask[0, :pad] = 0

    def run(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        empty = np.zeros((len(ids), graph.spec.num_kv_heads, 0, graph.spec.head_dim), np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, ids.shape[1]),
                 **{n: empty for n in input_names(2)[3:]}}
        out = sess.run(None, feeds)
        step = sess.run(None, decode_feeds(feeds, out[1:], np.full(len(ids), 7)))[0]
        return [out[0][0, -real:], step[0]]

    return run(ids[:1, pad:], mask[:1, pad:]), run(ids, mask)
