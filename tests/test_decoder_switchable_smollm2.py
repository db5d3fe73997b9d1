"""A switchable int8 bundle of the real model, SmolLM2-135M-Instruct, with one random LoRA (slow: one export of
270 MB checked against torch, and 24-token runs).

With no adapter it is the plain int8 base graph, bit for bit (int8 SmolLM2 itself answers the France prompt
wrongly, merged or switchable: fp32 says Paris); the adapter moves its logits; a batch mixing the adapter and
the plain base row by row decodes, for every row, the greedy tokens that row decodes alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgelora.exporters.decoder_export import export_decoder
from edgelora.exporters.decoder_graph import build_decoder_graph
from edgelora.runtime import Runtime

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about a lighthouse in winter."}],
    [{"role": "system", "content": "You turn requests into JSON."},
     {"role": "user", "content": "Switch off the kitchen lights at 10 pm."}],
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    from edgelora.model import load_causal_lm

    out = tmp_path_factory.mktemp("smollm2_switchable")
    model, _ = load_causal_lm("smollm2")
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
    with torch.no_grad():  # small enough to keep the model's answers, large enough to move them
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.004)
    peft.save_pretrained(out / "a")
    del peft
    export_decoder("smollm2", out / "int8", adapters={"a": out / "a"}, mode="switchable", precision="int8")
    (out / "plain.onnx").write_bytes(build_decoder_graph(model, "int8").model.SerializeToString())  # no slots
    return out / "int8"


def _prefill(rt: Runtime, prompt) -> dict[str, np.ndarray]:
    ids = rt.generator().prompt_ids(prompt)
    spec = rt.manifest.generation
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    return {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
            **{f"past_key_values.{i}.{kv}": empty for i in range(spec.num_layers) for kv in ("key", "value")}}


def test_plain_switchable_int8_is_the_plain_int8_graph(bundle: Path) -> None:
    rt = Runtime(bundle)
    feeds = _prefill(rt, PROMPTS[0])
    plain = ort.InferenceSession(str(bundle.parent / "plain.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(rt.session.run(["logits"], feeds)[0], plain.run(["logits"], feeds)[0])


def test_export_checks_hold_on_the_real_model(bundle: Path) -> None:
    v = Runtime(bundle).manifest.validation
    assert v["mixed batch (bank)"]["max_rel_error_vs_alone"] == 0.0
    assert v["a"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= 1e-4


def test_mixed_batch_decodes_what_each_row_decodes_alone(bundle: Path) -> None:
    rt = Runtime(bundle)
    gen = rt.generator()
    rows = ["a", None, "a"]
    solo = []
    for prompt, name in zip(PROMPTS, rows):
        rt.generate(prompt, adapter=name, max_new_tokens=NEW_TOKENS)
        solo.append(list(gen.stats.token_ids[0]))
    gen.generate_batch(PROMPTS, adapters=rows, max_new_tokens=NEW_TOKENS)
    assert [list(t) for t in gen.stats.token_ids] == solo


def test_the_adapter_moves_the_logits(bundle: Path) -> None:
    rt = Runtime(bundle)
    feeds = _prefill(rt, PROMPTS[0])
    logits = {}
    for name in ("a", None):
        options, extra = rt.row_options([name])
        logits[name] = rt.session.run(["logits"], {**feeds, **extra}, options)[0]
    assert np.abs(logits["a"] - logits[None]).max() > 1e-3 * np.abs(logits[None]).max()
