"""Claims about switchable decoder bundles (exporters/decoder_switchable.py, the LoRA slots of decoder_graph.py,
the per-row path of runtime/generate.py).

Tiny random Llama (grouped-query attention, tied embeddings) and Qwen2 (q/k/v biases) bases with two PEFT
LoRA adapters of different ranks and targets: the fp32 graph with an adapter gives PEFT's torch logits; an
adapter switched in equals the merged bundle of that adapter; a batch mixing adapters and the plain base row
by row gives each row what it gives alone (bit for bit in fp32, the same greedy tokens in int8), in one
session run per step; `add-adapter` puts a later adapter in without touching the base; bad adapters and
unknown names are refused in one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from decoder_fixture import tiny_llama
from edgelora.errors import EdgeloraError
from edgelora.exporters.add import add_adapters
from edgelora.exporters.decoder_export import export_decoder
from edgelora.exporters.decoder_validate import FP32_REL_TOL, INT8_LAYER_REL_TOL, position_ids
from edgelora.runtime import Runtime
from edgelora.runtime.bundle import ADAPTER_IDS, BANK_FILE, MODEL_FILE, read_manifest
from tiny_decoder import train_chat_tokenizer

VOCAB = 400  # the chat tokenizer's
PROMPTS = ("Turn on the kitchen lights", "What time is the meeting with Anna tomorrow", "hello")
# Switchable (W0 x + s B A x) against merged ((W0 + s B A) x) in fp32: the same sums in another order; the
# rounding of W0 + s B A alone moves logits by ~1e-7 of their size, a wrong scaling or a missing slot by 1e-2.
MERGED_REL_TOL = 1e-5
NEW_TOKENS = 8


def _lora(base: torch.nn.Module, out: Path, seed: int, r: int, targets: list[str], alpha: int | None = None) -> Path:
    """A PEFT CAUSAL_LM LoRA with random A and B (so it changes the output), saved at `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                                                           task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():  # PEFT's random B is tiny; make the adapter move the logits clearly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save_pretrained(out)
    return out


def _base(kind: str) -> torch.nn.Module:
    model = tiny_llama(VOCAB, seed=3, kind=kind)
    if kind == "qwen2":
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_chat_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory: pytest.TempPathFactory, tok: Path) -> dict:
    """A base, adapters a (q/v, rank 4) and b (q/k/o + MLP up, rank 2), and fp32 and int8 switchable bundles."""
    d = tmp_path_factory.mktemp(f"sw_{request.param}")
    base = _base(request.param)
    a = _lora(base, d / "a", 1, 4, ["q_proj", "v_proj"])
    b = _lora(base, d / "b", 2, 2, ["q_proj", "k_proj", "o_proj", "up_proj"])
    bundles = {p: d / f"sw_{p}" for p in ("fp32", "int8")}
    for precision, out in bundles.items():
        export_decoder(base, out, adapters={"a": a, "b": b}, mode="switchable", precision=precision, tokenizer_dir=tok)
    return {"kind": request.param, "base": base, "a": a, "b": b, "bundles": bundles, "dir": d}


def _ids(rt: Runtime, prompt: str) -> list[int]:
    return rt.generator().prompt_ids(prompt)


def _steps(rt: Runtime, prompts, adapters, steps: int = 3, forced: list[list[int]] | None = None):
    """Prefill and `steps` decode steps through the session, one run each, row i with adapters[i]: the logits
    of every run (real positions only) and the greedy tokens (or `forced` tokens) fed back."""
    ids = [_ids(rt, p) for p in prompts]
    B, T = len(ids), max(len(i) for i in ids)
    mask = np.zeros((B, T), np.int64)
    input_ids = np.zeros((B, T), np.int64)
    for r, p in enumerate(ids):
        input_ids[r, T - len(p):] = p
        mask[r, T - len(p):] = 1
    spec = rt.manifest.generation
    names = [f"past_key_values.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
    past = {n: np.zeros((B, spec.num_kv_heads, 0, spec.head_dim), np.float32) for n in names}
    options, extra = rt.row_options(adapters)
    logits, tokens = [], []
    for step in range(steps + 1):
        feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids(mask, input_ids.shape[1]),
                 **past, **extra}
        out = rt.session.run(None, feeds, options)
        real = mask[:, -input_ids.shape[1]:].astype(bool)
        logits.append([out[0][r][real[r]] for r in range(B)])
        past = dict(zip(names, out[1:]))
        nxt = out[0][:, -1].argmax(-1) if forced is None else np.array([f[step] for f in forced])
        tokens.append(nxt)
        input_ids = nxt.reshape(B, 1).astype(np.int64)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
    return logits, np.stack(tokens, 1)


def _peft_logits(base: torch.nn.Module, adapter: Path | None, prompt_ids: list[int]) -> np.ndarray:
    from peft import PeftModel

    model = base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids])).logits[0].numpy()


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_adapter_changes_the_output(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["fp32"])
    plain = _steps(rt, PROMPTS[:1], [None], steps=0)[0][0][0]
    for name in ("a", "b"):
        assert _rel(_steps(rt, PROMPTS[:1], [name], steps=0)[0][0][0], plain) > 1e-2


def test_switchable_fp32_equals_peft_with_each_adapter(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["fp32"])
    ids = _ids(rt, PROMPTS[1])
    for name in ("a", "b", None):
        got = _steps(rt, PROMPTS[1:2], [name], steps=0)[0][0][0]
        ref = _peft_logits(setup["base"], setup[name] if name else None, ids)
        assert _rel(got, ref) <= FP32_REL_TOL, name


def test_switchable_adapter_equals_its_merged_bundle(setup: dict, tmp_path: Path, tok: Path) -> None:
    sw = Runtime(setup["bundles"]["fp32"])
    for name in ("a", "b"):
        export_decoder(setup["base"], tmp_path / f"merged_{name}", adapter=setup[name], adapter_name=name,
                       precision="fp32", tokenizer_dir=tok)
        merged = Runtime(tmp_path / f"merged_{name}")
        for prompt in PROMPTS:
            got, tokens = _steps(sw, [prompt], [name])
            ref, _ = _steps(merged, [prompt], [name], forced=[list(tokens[0])])
            assert max(_rel(g[0], r[0]) for g, r in zip(got, ref)) <= MERGED_REL_TOL
            assert sw.generate(prompt, adapter=name, max_new_tokens=NEW_TOKENS) == \
                merged.generate(prompt, adapter=name, max_new_tokens=NEW_TOKENS)


def test_mixed_batch_rows_are_bit_identical_to_alone_in_fp32(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["fp32"])
    rows = ["a", "b", None, "b"]
    prompts = [*PROMPTS, PROMPTS[0]]
    options, extra = rt.row_options(rows)
    assert set(extra) == {ADAPTER_IDS} and list(extra[ADAPTER_IDS]) == [0, 1, 2, 1]  # one run, through the bank
    mixed, tokens = _steps(rt, prompts, rows)
    for r, (prompt, name) in enumerate(zip(prompts, rows)):
        alone, alone_tokens = _steps(rt, [prompt], [name])
        assert list(alone_tokens[0]) == list(tokens[r])
        for step in range(len(mixed)):
            np.testing.assert_array_equal(mixed[step][r], alone[step][0])


def test_uniform_batch_rows_are_bit_identical_to_alone_in_fp32(setup: dict) -> None:
    """All rows on one adapter run its own file, not the bank: still each row's own result (the LoRA matmuls
    run per row in both)."""
    rt = Runtime(setup["bundles"]["fp32"])
    _options, extra = rt.row_options(["b"] * 3)
    assert extra == {}
    batch, _ = _steps(rt, PROMPTS, ["b"] * 3)
    for r, prompt in enumerate(PROMPTS):
        alone, _ = _steps(rt, [prompt], ["b"])
        for step in range(len(batch)):
            np.testing.assert_array_equal(batch[step][r], alone[step][0])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_generate_batch_mixing_adapters_gives_each_row_its_solo_reply(setup: dict, precision: str) -> None:
    rt = Runtime(setup["bundles"][precision])
    rows = ["a", None, "b"]
    solo = [rt.generate(p, adapter=n, max_new_tokens=NEW_TOKENS) for p, n in zip(PROMPTS, rows)]
    assert rt.generator().generate_batch(list(PROMPTS), adapters=rows, max_new_tokens=NEW_TOKENS) == solo
    assert len(set(solo)) == 3  # three different replies: the rows really differ


def test_int8_mixed_batch_greedy_tokens_equal_alone(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["int8"])
    rows = ["b", "a", None]
    _, tokens = _steps(rt, PROMPTS, rows, steps=5)
    for r, (prompt, name) in enumerate(zip(PROMPTS, rows)):
        assert list(_steps(rt, [prompt], [name], steps=5)[1][0]) == list(tokens[r])


def test_stream_with_an_adapter_concatenates_to_generate(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["int8"])
    pieces = list(rt.stream(PROMPTS[0], adapter="b", max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == rt.generate(PROMPTS[0], adapter="b", max_new_tokens=NEW_TOKENS)


def test_manifest_records_adapters_bank_slots_and_checks(setup: dict) -> None:
    for precision, bundle in setup["bundles"].items():
        m = read_manifest(bundle)
        assert (m.mode, m.precision, m.adapter_names) == ("switchable", precision, ("a", "b"))
        assert m.bank.file == BANK_FILE and m.bank.adapters == ("a", "b", None)
        assert all((bundle / a.file).is_file() for a in m.adapters)
        assert m.validation["mixed batch (bank)"]["max_rel_error_vs_alone"] == 0.0
        # attention q/k/v/o by default, and the MLP pack gate|up because b adapts up_proj
        slots = set(m.slots["lora"])
        assert {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"} <= slots
        assert "model.layers.0.mlp.down_proj" not in slots
        if precision == "int8":
            assert m.validation["a"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL
            assert m.quantization.recipe["mode"] == "switchable"


def test_plain_switchable_bundle_is_the_base(setup: dict, tmp_path: Path, tok: Path) -> None:
    """No adapter: the plain base, with empty slots on every attention projection for adapters added later."""
    export_decoder(setup["base"], tmp_path / "plain", mode="switchable", precision="fp32", tokenizer_dir=tok)
    export_decoder(setup["base"], tmp_path / "merged", precision="fp32", tokenizer_dir=tok)
    plain, merged = Runtime(tmp_path / "plain"), Runtime(tmp_path / "merged")
    assert plain.adapters == () and len(read_manifest(tmp_path / "plain").slots["lora"]) == 8
    got, ref = _steps(plain, PROMPTS[:1], [None])[0], _steps(merged, PROMPTS[:1], [None])[0]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g[0], r[0])  # zero-rank branches add exact zeros


@pytest.mark.parametrize("precision", ["fp32", "int8-rowwise"])
def test_add_adapter_round_trip(setup: dict, tmp_path: Path, tok: Path, precision: str) -> None:
    """Export with a, add b later: the bundle equals one exported with both; the base graph is untouched. A
    rowwise int8 bundle's check rebuilds the fake-quant reference with the SmoothQuant factors read back from
    its graph (computed from the base at export: neither adapter carries any)."""
    base_dir = tmp_path / "base"
    setup["base"].save_pretrained(base_dir)
    b_attn = _lora(setup["base"], tmp_path / "b_attn", 5, 3, ["k_proj", "o_proj"])
    out = tmp_path / "later"
    precision, _, scheme = precision.partition("-")
    kw = {"mode": "switchable", "precision": precision, "tokenizer_dir": tok, "int8_scheme": scheme or None}
    export_decoder(setup["base"], out, adapters={"a": setup["a"]}, **kw)
    model_bytes = (out / MODEL_FILE).read_bytes()
    m = add_adapters(out, {"b": b_attn}, base=base_dir)
    assert m.adapter_names == ("a", "b") and m.bank.adapters == ("a", "b", None)
    assert (out / MODEL_FILE).read_bytes() == model_bytes
    if precision == "fp32":
        assert m.validation["b"]["vs_fp32_torch"]["max_rel_error"] <= FP32_REL_TOL
    else:
        assert m.quantization.int8_scheme == "rowwise" and m.quantization.smoothing_digest
        # the fake-quant reference with the graph's own factors: the int8 graph matches it to float rounding
        # (measured 4e-7 relative; a reference without the factors is off by 0.11, cosine 0.988)
        got = m.validation["b"]["vs_fake_quant_torch"]
        assert got["max_rel_error"] <= 1e-4 and got["top1_agreement"] == 1.0, got
    both = tmp_path / "both"
    export_decoder(setup["base"], both, adapters={"a": setup["a"], "b": b_attn}, **kw)
    later, together = Runtime(out), Runtime(both)
    for rows in (["b"], ["a", "b", None]):
        prompts = list(PROMPTS[: len(rows)])
        for g, r in zip(_steps(later, prompts, rows)[0], _steps(together, prompts, rows)[0]):
            for x, y in zip(g, r):
                np.testing.assert_array_equal(x, y)


def test_add_adapter_without_a_slot_is_refused(setup: dict, tmp_path: Path, tok: Path) -> None:
    out = tmp_path / "attn"
    export_decoder(setup["base"], out, adapters={"a": setup["a"]}, mode="switchable", precision="fp32",
                   tokenizer_dir=tok)
    mlp = _lora(setup["base"], tmp_path / "mlp", 6, 2, ["down_proj"])
    with pytest.raises(EdgeloraError, match=r"down_proj with LoRA, which has no LoRA slot .*attention\+mlp"):
        add_adapters(out, {"mlp": mlp}, check=False)
    assert read_manifest(out).adapter_names == ("a",)


def _other_base_adapter(setup: dict, tmp_path: Path) -> Path:
    """An adapter of the right shapes whose config says it was trained on another base (edgelora's fingerprint)."""
    path = _lora(setup["base"], tmp_path / "foreign", 7, 2, ["q_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    config["edgelora"] = {"base_fingerprint": "0" * 64}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_bad_adapters_are_refused_in_one_line(setup: dict, tmp_path: Path, tok: Path) -> None:
    foreign = _other_base_adapter(setup, tmp_path)
    config = copy.deepcopy(setup["base"].config)
    config.hidden_size, config.head_dim = 96, 24  # the same layer names, other shapes
    wide = _lora(type(setup["base"])(config).eval(), tmp_path / "wide", 8, 2, ["q_proj"])
    cases = [
        (foreign, r"trained on another base"),
        (wide, r"has shape .* but this base needs"),
    ]
    for path, pattern in cases:
        with pytest.raises(EdgeloraError, match=pattern) as err:
            export_decoder(setup["base"], tmp_path / "x", adapters={"a": setup["a"], "bad": path}, mode="switchable",
                           precision="fp32", tokenizer_dir=tok)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
        assert not (tmp_path / "x").exists()
    bundle = setup["bundles"]["fp32"]
    with pytest.raises(EdgeloraError, match="trained on another base") as err:
        add_adapters(bundle, {"foreign": foreign}, check=False)
    assert "\n" not in str(err.value)
    with pytest.raises(EdgeloraError, match=r"does not fit .*the adapter is for another base") as err:
        add_adapters(bundle, {"wide": wide}, check=False)
    assert "\n" not in str(err.value)


def test_unknown_adapter_and_bad_rows_are_refused_in_one_line(setup: dict) -> None:
    rt = Runtime(setup["bundles"]["fp32"])
    for call, pattern in [
        (lambda: rt.generate("hi", adapter="nope"), r"no adapter 'nope'; available: 'a', 'b'"),
        (lambda: rt.generator().generate_batch(["hi", "yo"], adapters=["a", "nope"]), r"no adapter 'nope'"),
        (lambda: rt.generator().generate_batch(["hi", "yo"], adapters=["a"]), r"1 adapters for 2 prompts"),
        (lambda: rt.generator().generate_batch(["hi"], adapter="a", adapters=["a"]), r"not both"),
        (lambda: rt.row_options(["a", "zzz"]), r"no adapter 'zzz'"),
    ]:
        with pytest.raises(EdgeloraError, match=pattern) as err:
            call()
        assert "\n" not in str(err.value)


def test_standalone_generator_loads_a_switchable_bundle(setup: dict) -> None:
    from edgelora.runtime.generate import Generator

    gen = Generator(setup["bundles"]["fp32"])
    rt = Runtime(setup["bundles"]["fp32"])
    assert gen.generate(PROMPTS[0], adapter="a", max_new_tokens=NEW_TOKENS) == \
        rt.generate(PROMPTS[0], adapter="a", max_new_tokens=NEW_TOKENS)
    assert gen.generate_batch(list(PROMPTS[:2]), adapters=["b", "a"], max_new_tokens=4) == \
        [rt.generate(p, adapter=n, max_new_tokens=4) for p, n in zip(PROMPTS[:2], ["b", "a"])]
    with pytest.raises(EdgeloraError, match="needs its adapters' run_options too"):
        Generator(setup["bundles"]["fp32"], session=rt.session)  # would otherwise run the plain base for "a"


def test_graph_keeps_one_packed_base_matmul_per_projection(setup: dict) -> None:
    model = onnx.load(str(setup["bundles"]["int8"] / MODEL_FILE))
    ops = [n.op_type for n in model.graph.node]
    layers = setup["base"].config.num_hidden_layers
    assert ops.count("MatMulNBits") == 4 * layers + 1  # q|k|v, o, gate|up, down per layer, and the LM head
    inputs = {i.name for i in model.graph.input}
    assert ADAPTER_IDS in inputs and "model.base.model.layers.0.self_attn.k_proj.lora_A" in inputs


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_gpt2_conv1d_switchable_passes_its_checks(tmp_path: Path, precision: str) -> None:
    """GPT-2's packed c_attn (a Conv1D, PEFT's fan_in_fan_out) gets one slot; fp32 equals PEFT's torch logits."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=1)).eval()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                          task_type="CAUSAL_LM", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "a")
    m = export_decoder(base, tmp_path / "b", adapters={"a": tmp_path / "a"}, mode="switchable", precision=precision)
    assert m.slots["lora"][:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    assert m.validation["mixed batch (bank)"]["max_rel_error_vs_alone"] == 0.0
    if precision == "fp32":
        assert m.validation["a"]["vs_fp32_torch"]["max_rel_error"] <= FP32_REL_TOL
    else:
        assert m.validation["a"]["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL


def _trained_with(path: Path, recipe, factors=None) -> Path:
    """Mark a PEFT adapter as QAT-trained with `recipe` (and SmoothQuant `factors`), as training saves it."""
    from edgelora import smooth
    from edgelora.config import config_to_dict

    config = json.loads((path / "adapter_config.json").read_text())
    config.setdefault("edgelora", {})["quantization"] = json.loads(json.dumps(config_to_dict(recipe)))
    (path / "adapter_config.json").write_text(json.dumps(config))
    if factors:
        smooth.save_factors(factors, path)
    return path


def test_add_adapter_to_a_smoothed_rowwise_bundle_takes_its_factors_or_none(tmp_path: Path, tok: Path) -> None:
    """Into a rowwise bundle smoothed with the base's factors: an adapter trained with them, or trained fp32,
    goes in; one trained rowwise without smoothing (another int8 recipe than the bundle's) is refused in one line.
    A recipe leaving the LM head rowwise and smoothed has its head's factor read back from the graph too."""
    import dataclasses

    from edgelora.causal_smooth import base_factors
    from edgelora.causal_train import decoder_quant, load_tokenizer

    base = _base("llama")
    base.save_pretrained(tmp_path / "base")
    recipe = dataclasses.replace(decoder_quant(scheme="rowwise", weight_bits=7, mode="switchable"),
                                 block_layers=("mlp.down_proj",))  # the LM head rowwise, smoothed
    factors = base_factors(base, recipe, load_tokenizer(tok))
    assert "lm_head" in factors  # the premise of the head's case
    trained = _trained_with(_lora(base, tmp_path / "t", 1, 4, ["q_proj", "v_proj"]), recipe, factors)
    out = tmp_path / "sw"
    export_decoder(base, out, adapters={"t": trained}, mode="switchable", precision="int8", tokenizer_dir=tok)
    unsmoothed = _trained_with(_lora(base, tmp_path / "u", 2, 2, ["q_proj", "k_proj"]),
                               dataclasses.replace(recipe, smoothing=None))
    with pytest.raises(EdgeloraError, match=r"u: trained without SmoothQuant but bundle .* smooths its int8 inputs"):
        add_adapters(out, {"u": unsmoothed}, base=tmp_path / "base")
    plain = _lora(base, tmp_path / "p", 3, 2, ["q_proj", "o_proj"])
    m = add_adapters(out, {"p": plain}, base=tmp_path / "base")
    # against the reference with every factor, the head's included (without it: 2e-2 relative)
    assert m.validation["p"]["vs_fake_quant_torch"]["max_rel_error"] <= 1e-4, m.validation["p"]


@pytest.mark.parametrize("order", ["trained-first", "plain-first"])
def test_a_smoothed_and_a_plain_adapter_go_in_together_in_either_order(tmp_path: Path, tok: Path, order: str) -> None:
    """Exported or added together, an adapter trained rowwise with the base's SmoothQuant factors and one trained
    fp32 make the same bundle whichever comes first (the fp32 one's LoRA reads the unsmoothed input)."""
    from edgelora.causal_smooth import base_factors
    from edgelora.causal_train import decoder_quant, load_tokenizer

    base = _base("llama")
    base.save_pretrained(tmp_path / "base")
    recipe = decoder_quant(scheme="rowwise", weight_bits=7, mode="switchable")
    trained = _trained_with(_lora(base, tmp_path / "t", 1, 4, ["q_proj", "v_proj"]), recipe,
                            base_factors(base, recipe, load_tokenizer(tok)))
    plain = _lora(base, tmp_path / "p", 3, 2, ["q_proj", "o_proj"])
    both = {"t": trained, "p": plain} if order == "trained-first" else {"p": plain, "t": trained}
    m = export_decoder(base, tmp_path / "both", adapters=both, mode="switchable", precision="int8", tokenizer_dir=tok)
    assert m.quantization.int8_scheme == "rowwise" and m.quantization.smoothing_digest
    first = tmp_path / "first"
    export_decoder(base, first, adapters={"f": _lora(base, tmp_path / "f", 9, 2, ["v_proj"])}, mode="switchable",
                   precision="int8", int8_scheme="rowwise", tokenizer_dir=tok)
    added = add_adapters(first, both, base=tmp_path / "base")
    assert added.adapter_names == ("f", *both)
    assert all(added.validation[n]["vs_fake_quant_torch"]["max_rel_error"] <= 1e-4 for n in both), added.validation


def test_an_unreadable_recipe_is_one_line_naming_the_adapter_config(tmp_path: Path, tok: Path) -> None:
    """A bad `edgelora.quantization` in an adapter's config, at export and at add-adapter alike: one line naming
    the file and what is wrong."""
    base = _base("llama")
    base.save_pretrained(tmp_path / "base")
    bad = _lora(base, tmp_path / "bad", 1, 2, ["q_proj"])
    config = json.loads((bad / "adapter_config.json").read_text())
    config["edgelora"] = {"quantization": {"weight_bits": 5, "activations": "per-row"}}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    import re

    source = re.escape(str(bad / "adapter_config.json"))
    message = rf"^{source}: weight_bits=5 "
    with pytest.raises(EdgeloraError, match=message):
        export_decoder(base, tmp_path / "x", adapters={"bad": bad}, mode="switchable", precision="int8",
                       tokenizer_dir=tok)
    out = tmp_path / "sw"
    export_decoder(base, out, mode="switchable", precision="int8", int8_scheme="rowwise", tokenizer_dir=tok)
    with pytest.raises(EdgeloraError, match=message):
        add_adapters(out, {"bad": bad}, base=tmp_path / "base")
    config["edgelora"] = {"quantization": {"weight_bit": 8}}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeloraError, match=rf"^{source}: unreadable quantization recipe"):
        add_adapters(out, {"bad": bad}, base=tmp_path / "base")
