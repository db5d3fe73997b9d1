"""Scoring text with a decoder bundle (`Generator.score` / `perplexity`, torch-free): the log-probability of
each token from the bundle's logits equals torch's on the same weights — the fp32 graph against the model,
the int8 graph against its blockwise fake-quant model — and perplexity is exp of torch's token-mean cross
entropy over all the texts. Bundles come from `export_decoder` on a tiny random Llama with the tests' word-level
tokenizer ([CLS] text [SEP]) and a one-line chat template."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tokenizer

from edgelora.errors import EdgeloraError
from edgelora.exporters.decoder_export import export_decoder
from edgelora.exporters.decoder_validate import fake_quant_model
from edgelora.runtime.generate import Generator

FP32_LOGPROB_ATOL = 2e-5  # fp32 graph vs torch (measured: under 1e-6)
INT8_LOGPROB_ATOL = 2e-5  # int8 graph vs the fake-quant model (measured: under 1e-6; vs the fp32 model: 2e-2)
PPL_REL_TOL = 1e-4
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}beta{% endif %}"
TEXTS = ["the film is good", "alpha beta w3 w7 w7 w12 the movie was bad", "a w40 w41 w42 w43 w44 w45 w46 w47 w48"]
PAIRS = [("the film", "is good w5"), ("w1 w2 w3", "alpha")]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                            tie_word_embeddings=True, initializer_range=0.1, attn_implementation="eager")
    return tf.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[SEP]"}))
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture(scope="module", params=["fp32", "int8"])
def case(request, model, tok_dir, tmp_path_factory) -> tuple[Generator, torch.nn.Module, float]:
    out = tmp_path_factory.mktemp("bundle") / request.param
    export_decoder(model, out, tokenizer_dir=tok_dir, precision=request.param)
    reference = model if request.param == "fp32" else fake_quant_model(model).eval()
    atol = FP32_LOGPROB_ATOL if request.param == "fp32" else INT8_LOGPROB_ATOL
    return Generator(out, intra_op_threads=1), reference, atol


def torch_logprobs(model: torch.nn.Module, ids: list[int], first: int) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= first, from torch's logits and cross entropy."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = torch.nn.functional.cross_entropy(logits[first - 1 : -1], torch.tensor(ids[first:]), reduction="none")
    return -nll.numpy()


def test_text_logprobs_equal_torch(case) -> None:
    gen, reference, atol = case
    for text in TEXTS:
        ids = gen.tokenizer.encode(text).ids
        got = gen.score(None, text)
        assert ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP]: the special tokens are part of the text scored
        assert got.tokens == len(ids) - 1
        np.testing.assert_allclose(got.logprobs, torch_logprobs(reference, ids, 1), rtol=0, atol=atol)


def test_int8_scores_are_the_quantized_model_not_the_fp32_one(model, case) -> None:
    gen, reference, atol = case
    if reference is model:
        pytest.skip("the fp32 bundle's reference is the model itself")
    ids = gen.tokenizer.encode(TEXTS[1]).ids
    assert np.abs(gen.score(None, TEXTS[1]).logprobs - torch_logprobs(model, ids, 1)).max() > 100 * atol


def test_completion_logprobs_follow_the_prompt_as_generate_sees_it(case) -> None:
    gen, reference, atol = case
    for prompt, completion in [*PAIRS, ([{"role": "user", "content": "the film"}], "is good")]:
        head = gen.prompt_ids(prompt)
        tail = gen.tokenizer.encode(completion, add_special_tokens=False).ids
        got = gen.score(prompt, completion)
        assert got.tokens == len(tail)
        np.testing.assert_allclose(got.logprobs, torch_logprobs(reference, head + tail, len(head)), rtol=0, atol=atol)
    chat = gen.prompt_ids([{"role": "user", "content": "the film"}])
    assert chat == gen.tokenizer.encode("the film beta", add_special_tokens=False).ids  # the template's own tokens


def test_perplexity_is_exp_of_token_mean_cross_entropy_over_all_texts(case) -> None:
    gen, reference, atol = case
    nll, count = 0.0, 0
    for text in TEXTS:
        ids = gen.tokenizer.encode(text).ids
        lp = torch_logprobs(reference, ids, 1)
        nll, count = nll - lp.sum(), count + lp.size
    for prompt, completion in PAIRS:
        head = gen.prompt_ids(prompt)
        lp = torch_logprobs(reference, head + gen.tokenizer.encode(completion, add_special_tokens=False).ids, len(head))
        nll, count = nll - lp.sum(), count + lp.size
    got = gen.perplexity([*TEXTS, *PAIRS])
    assert got == pytest.approx(math.exp(nll / count), rel=PPL_REL_TOL + atol)
    assert gen.score(None, TEXTS[0]).perplexity == pytest.approx(math.exp(-torch_logprobs(
        reference, gen.tokenizer.encode(TEXTS[0]).ids, 1).mean()), rel=PPL_REL_TOL + atol)
    assert 1.0 < got < 128.0 * 4  # a random model: near the vocabulary size, never below certainty


def test_scoring_refuses_bad_input_in_one_line(case) -> None:
    gen, _, _ = case
    with pytest.raises(EdgeloraError, match="completion is empty"):
        gen.score("the film", "")
    with pytest.raises(EdgeloraError, match="context_length is 24"):
        gen.score(None, " ".join(["w1"] * 30))
    with pytest.raises(EdgeloraError, match="non-empty list"):
        gen.perplexity("the film is good")
    with pytest.raises(EdgeloraError, match="not adapter 'other'"):
        gen.score(None, "the film", adapter="other")
