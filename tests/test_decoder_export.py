"""Claims about the decoder export (exporters/decoder_graph.py, decoder_validate.py, decoder_export.py).

Tiny random Llama (grouped-query attention, tied embeddings), Qwen2 (q/k/v biases, ragged K: hidden 48 and
MLP 80 are not multiples of 32), Mistral and GPT-2 (Conv1D, LayerNorm, learned positions) bases: the fp32 graph gives torch's logits over a left-padded
prefill and several decode steps through its cache; the int8 graph equals the fake-quant model layer by
layer; a row's int8 logits do not change with its batch; a merged LoRA adapter gives PEFT's own logits;
bad adapters and unsupported bases are refused in one line; the bundle is whole and atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tiny_decoder_graph import DECODE_STEPS, alone_and_batched, graph_steps, make_decoder, rel_error, torch_logits

from edgelora.errors import EdgeloraError
from edgelora.exporters import decoder_export
from edgelora.exporters.decoder_export import export_decoder, merge_lora
from edgelora.exporters.decoder_graph import build_decoder_graph, input_names, output_names
from edgelora.exporters.decoder_validate import (
    FP32_REL_TOL,
    INT8_LAYER_REL_TOL,
    fake_quant_model,
    layerwise_error,
    prefill_feeds,
    session,
)

@pytest.mark.parametrize("attention", ["invariant", "ops", "onnx", "gqa"])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_fp32_graph_equals_torch_over_decode_steps(kind: str, attention: str) -> None:
    model = make_decoder(kind)
    if attention == "gqa" and kind == "qwen2":  # head_dim 12: ORT's kernel takes multiples of 8 only
        with pytest.raises(EdgeloraError, match="head_dim a multiple of 8, this base has 12"):
            build_decoder_graph(model, "fp32", attention)
        return
    graph = build_decoder_graph(model, "fp32", attention)
    assert graph.input_names == input_names(2) and graph.output_names == output_names(2)
    feeds, logits = graph_steps(session(graph.model), graph.spec)
    assert feeds[0]["attention_mask"][:, 0].tolist() == [1, 0, 0]  # rows really are left-padded
    err = rel_error(logits, torch_logits(model, feeds), feeds)
    assert err <= FP32_REL_TOL, f"{kind}: relative error {err:.2e}"
    last = feeds[-1]
    assert last["past_key_values.0.key"].shape == (3, graph.spec.num_kv_heads, 12 + DECODE_STEPS - 1, graph.spec.head_dim)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_int8_graph_matches_fake_quant_layer_by_layer(kind: str) -> None:
    model = make_decoder(kind)
    graph = build_decoder_graph(model, "int8")
    assert sum(n.op_type == "MatMulNBits" for n in graph.model.graph.node) == len(graph.quantized) == 2 * 4 + 1  # qkv, o, gate|up, down; head
    assert not any(n.op_type == "MatMul" and "matmul" in n.name for n in graph.model.graph.node)
    feeds, logits = graph_steps(session(graph.model), graph.spec, steps=2)
    err, layer = layerwise_error(graph, feeds)
    assert err <= INT8_LAYER_REL_TOL, f"{layer}: relative error {err:.2e}"
    # end to end, the int8 graph follows the fake-quant model, not the float one
    fq_err = rel_error(logits, torch_logits(fake_quant_model(model), feeds), feeds)
    fp_err = rel_error(logits, torch_logits(model, feeds), feeds)
    assert fq_err < 1e-4 < fp_err, (fq_err, fp_err)


def test_gqa_core_int8_matches_fake_quant_and_the_default_core() -> None:
    """GroupQueryAttention (one node a layer) changes only the attention's float32 rounding."""
    model = make_decoder("llama")
    graph = build_decoder_graph(model, "int8", attention="gqa")
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.model.graph.node) == 2
    feeds, logits = graph_steps(session(graph.model), graph.spec, steps=2)
    err, layer = layerwise_error(graph, feeds)
    assert err <= INT8_LAYER_REL_TOL, f"{layer}: relative error {err:.2e}"
    fq_err = rel_error(logits, torch_logits(fake_quant_model(model), feeds), feeds)
    assert fq_err < 1e-4, fq_err


def test_gqa_core_is_not_batch_invariant() -> None:
    """Why "gqa" is an option and not the default: its float32 sums over a left-padded key axis round
    differently alone and batched, so a row's logits move in the last bits (the serving engine's batches need
    the default core). If this fails, ORT's kernel became order-stable and "gqa" could be the default.
    In float32, where nothing amplifies a last-bit difference (int8's activation rounding can flip a step of
    the quantization grid: 1e-5 to 8e-4 of the logits' range at these paddings, for "ops" too): a wrong mask
    or a wrong rotary position moves the logits by a sizeable fraction of their range, rounding by ~2e-7."""
    graph = build_decoder_graph(make_decoder("llama"), "fp32", attention="gqa")
    for pad in (1, 3, 13):
        alone, batched = alone_and_batched(graph, pad)
        assert not np.array_equal(alone[0], batched[0])
        for a, b in zip(alone, batched):
            assert np.abs(a - b).max() < 1e-5 * np.abs(a).max(), pad  # rounding, not a wrong mask or position


def test_gqa_positions_of_a_finished_row_stay_in_the_rotary_table() -> None:
    """Generator appends a 0 to the mask of a row that has finished while the others decode on: the gqa core's
    positions count only a row's left padding, so a long batch never asks the kernel for a position past the
    rotary table (context 64 here), and the live row decodes as it would alone."""
    graph = build_decoder_graph(make_decoder("llama"), "fp32", attention="gqa")
    sess, spec = session(graph.model), graph.spec
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 128, 10), rng.integers(5, 128, 6)]

    def decode(rows: list[np.ndarray], finish_after: int | None) -> list[np.ndarray]:
        B, T = len(rows), max(map(len, rows))
        ids, mask = np.zeros((B, T), np.int64), np.zeros((B, T), np.int64)
        for r, p in enumerate(rows):
            ids[r, T - len(p):], mask[r, T - len(p):] = p, 1
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        past = {n: np.zeros((B, spec.num_kv_heads, 0, spec.head_dim), np.float32) for n in input_names(2)[3:]}
        out = []
        while mask.shape[1] < 64:
            logits, *present = sess.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past})
            out.append(logits[0, -1])
            past = dict(zip(input_names(2)[3:], present))
            live = np.ones((B, 1), np.int64)
            if finish_after is not None and len(out) > finish_after:
                live[1:] = 0  # the second row has finished: Generator masks its new columns
            ids, mask, pos = logits[:, -1].argmax(-1)[:, None], np.concatenate([mask, live], axis=1), pos[:, -1:] + 1
        return out

    batched, alone = decode(prompts, finish_after=2), decode(prompts[:1], finish_after=None)
    assert len(batched) == len(alone) == 64 - 10  # up to the table's last position, no error on the way
    for a, b in zip(alone, batched):
        assert np.abs(a - b).max() < 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_row_is_bit_identical_alone_and_in_a_padded_batch(precision: str) -> None:
    graph = build_decoder_graph(make_decoder("llama"), precision)  # the default core: "invariant"
    for pad in (1, 3, 7, 13):
        alone, batched = alone_and_batched(graph, pad)
        assert all(np.array_equal(a, b) for a, b in zip(alone, batched)), f"left padding {pad} changed the row"


def _core_graph(spec) -> onnx.ModelProto:
    """The default attention core alone: q (B, S, Hq, D) over k / v (B, Hkv, T, D) under the graph's own mask."""
    from onnx import TensorProto, helper

    from edgelora.exporters.decoder_graph import IR_VERSION, OPSET, _attention_ops, _Builder, _mask

    b = _Builder()
    context = _attention_ops(b, "q", "k", "v", _mask(b), spec, "attn", wide=True)
    io = helper.make_tensor_value_info
    inputs = [io("input_ids", TensorProto.INT64, ["B", "S"]), io("attention_mask", TensorProto.INT64, ["B", "T"]),
              io("q", TensorProto.FLOAT, ["B", "S", spec.num_heads, spec.head_dim]),
              *(io(n, TensorProto.FLOAT, ["B", spec.num_kv_heads, "T", spec.head_dim]) for n in "kv")]
    graph = helper.make_graph(b.nodes, "core", inputs, [io(context, TensorProto.FLOAT, None)], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize("threads", [1, 2])
def test_the_default_core_gives_a_row_the_same_bits_alone_and_padded_at_long_context(threads: int) -> None:
    """The core's matmuls take a KV head's G query heads and S new tokens as the rows of one GEMM. Past ONNX
    Runtime's GEMM blocks (hundreds of keys), at 1 and 2 threads, with 1 or 5 new tokens against a batch-mate's
    24 (other row counts, so other kernels' row tiling): a row's context is still bit-identical alone and
    left-padded, for SmolLM2's 9 query / 3 KV heads and for a group of one (GPT-2's plain heads)."""
    import onnxruntime as ort

    from edgelora.exporters.decoder_graph import DecoderSpec

    rng = np.random.default_rng(0)
    for heads, kv_heads in ((9, 3), (4, 4)):
        spec = DecoderSpec("llama", 1, heads * 16, heads, kv_heads, 16, 64, 4096, 1e-5, 0.25)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sess = ort.InferenceSession(_core_graph(spec).SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
        for real, pad, new in ((700, 3, 1), (1100, 301, 5), (530, 1, 1)):
            T, S = real + pad, 24  # the batch-mate's new tokens set the batch's S; the row's are its last `new`
            q = rng.standard_normal((2, S, heads, 16)).astype(np.float32)
            k, v = (rng.standard_normal((2, kv_heads, T, 16)).astype(np.float32) for _ in range(2))
            mask = np.ones((2, T), np.int64)
            mask[0, :pad] = 0

            def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
                ids = np.zeros(q.shape[:2], np.int64)
                return sess.run(None, {"input_ids": ids, "attention_mask": mask, "q": q, "k": k, "v": v})[0]

            batched = run(q, k, v, mask)[0, -new:]
            alone = run(q[:1, -new:], k[:1, :, pad:], v[:1, :, pad:], mask[:1, pad:])[0]
            assert np.array_equal(alone, batched), (heads, kv_heads, real, pad, new)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_logits_to_keep_gives_the_last_positions_bit_identical(precision: str) -> None:
    """The optional input keeps every position by default (scoring), or only the last N (generation)."""
    graph = build_decoder_graph(make_decoder("llama"), precision)
    assert graph.optional_inputs == ["logits_to_keep"]
    sess = session(graph.model)
    feeds = prefill_feeds(graph.spec, batch=3)
    full = sess.run(None, feeds)
    S = feeds["input_ids"].shape[1]
    assert full[0].shape[1] == S
    for keep in (1, 5, S, S + 9):
        cut = sess.run(None, {**feeds, "logits_to_keep": np.asarray(keep, np.int64)})
        assert np.array_equal(cut[0], full[0][:, -min(keep, S):]), keep
        assert all(np.array_equal(a, b) for a, b in zip(cut[1:], full[1:]))  # the cache is the same


def test_float32_attention_core_is_not_batch_invariant() -> None:
    """Why the default core sums over keys in float64: in float32, left padding moves a row's keys to other
    indices, ORT's reductions round differently and the row's logits change. If this fails, ORT's float32
    kernels became order-stable: the "ops" core would then do."""
    graph = build_decoder_graph(make_decoder("llama"), "int8", attention="ops")
    alone, batched = alone_and_batched(graph, pad=3)
    assert not np.array_equal(alone[0], batched[0])
    assert np.abs(alone[0] - batched[0]).max() < 1e-3 * np.abs(alone[0]).max()  # rounding, not a wrong mask


# --- merged LoRA --------------------------------------------------------------------------------------


def _peft_adapter(model: torch.nn.Module, out: Path, targets: list[str], seed: int = 1, **extra) -> torch.nn.Module:
    """A PEFT LoRA (CAUSAL_LM) on `model` with random non-zero B, saved to `out`; returns the PEFT model."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 task_type="CAUSAL_LM", **extra))
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    peft_model.save_pretrained(out)
    return peft_model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_lora_equals_peft(tmp_path: Path, rslora: bool) -> None:
    base = make_decoder("llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "lm_head"]
    peft_model = _peft_adapter(base, tmp_path / "adapter", targets, use_rslora=rslora)
    manifest = export_decoder(base, tmp_path / "bundle", adapter=tmp_path / "adapter").to_dict()
    assert manifest["adapters"][0]["layers"] == 2 * 6 + 1 and manifest["adapters"][0]["use_rslora"] == rslora
    sess = session(onnx.load(str(tmp_path / "bundle" / "model.onnx")))
    feeds, logits = graph_steps(sess, build_decoder_graph(base).spec, steps=2)
    with_adapter, without = torch_logits(peft_model, feeds), torch_logits(base, feeds)
    assert rel_error(without, with_adapter, feeds) > 1e-2  # the adapter really changes the output
    assert rel_error(logits, with_adapter, feeds) <= FP32_REL_TOL
    # `base` itself was left alone (its logits above are the plain ones), its embeddings still tied
    assert base.lm_head.weight is base.model.embed_tokens.weight


def test_merged_lora_on_gpt2_conv1d_equals_peft(tmp_path: Path) -> None:
    base = make_decoder("gpt2")
    peft_model = _peft_adapter(base, tmp_path / "adapter", ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    manifest = export_decoder(base, tmp_path / "bundle", adapter=tmp_path / "adapter").to_dict()
    assert manifest["adapters"][0]["layers"] == 2 * 4  # c_proj matches in attn and mlp
    sess = session(onnx.load(str(tmp_path / "bundle" / "model.onnx")))
    feeds, logits = graph_steps(sess, build_decoder_graph(base).spec, steps=2)
    with_adapter = torch_logits(peft_model, feeds)
    assert rel_error(torch_logits(base, feeds), with_adapter, feeds) > 1e-2
    assert rel_error(logits, with_adapter, feeds) <= FP32_REL_TOL


def test_merged_lora_int8_export_passes_its_checks(tmp_path: Path) -> None:
    base = make_decoder("qwen2")
    _peft_adapter(base, tmp_path / "adapter", ["q_proj", "v_proj", "up_proj"])
    manifest = export_decoder(base, tmp_path / "bundle", adapter=tmp_path / "adapter", precision="int8").to_dict()
    report = manifest["validation"]
    assert report["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL
    assert report["vs_fake_quant_torch"]["worst_cosine"] > 0.999
    assert manifest["quantization"]["quantized_matmuls"] == 9


def test_adapter_for_another_base_is_refused(tmp_path: Path) -> None:
    base = make_decoder("llama")
    _peft_adapter(make_decoder("llama", layers=3), tmp_path / "deep", ["q_proj"])  # a layer the base lacks
    with pytest.raises(EdgeloraError, match=r"adapter_model.safetensors: base_model\.model\.model\.layers\.2\.self_attn"
                                            r"\.q_proj\.lora_A\.weight targets .* not a linear layer of this base"):
        export_decoder(base, tmp_path / "b1", adapter=tmp_path / "deep")
    _peft_adapter(make_decoder("qwen2"), tmp_path / "narrow", ["q_proj"])  # hidden 48, not 64
    with pytest.raises(EdgeloraError, match=r"adapter_model.safetensors: .*q_proj\.lora_A\.weight \(4, 48\) .* do not "
                                            r"fit model\.layers\.0\.self_attn\.q_proj \(64x64\)"):
        export_decoder(base, tmp_path / "b2", adapter=tmp_path / "narrow")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_adapter_of_another_task_or_variant_is_refused(tmp_path: Path) -> None:
    base = make_decoder("llama")
    _peft_adapter(base, tmp_path / "a", ["q_proj"])
    config = tmp_path / "a" / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps(dict(data, task_type="SEQ_CLS")))
    with pytest.raises(EdgeloraError, match=r"adapter_config.json: task_type 'SEQ_CLS' is not a causal-LM adapter"):
        merge_lora(base, tmp_path / "a")
    config.write_text(json.dumps(dict(data, use_dora=True)))
    with pytest.raises(EdgeloraError, match=r"adapter_config.json: DoRA is not supported"):
        merge_lora(base, tmp_path / "a")
    config.write_text(json.dumps(dict(data, edgelora={"base_fingerprint": "0" * 64})))
    with pytest.raises(EdgeloraError, match=r"adapter was trained on another base"):
        merge_lora(base, tmp_path / "a")


def test_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    import transformers as tf

    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=4, max_position_embeddings=64))
    with pytest.raises(EdgeloraError, match=r"^decoder export supports model types llama, mistral, qwen2, gpt2; this "
                                            r"base is 'opt'$"):
        export_decoder(opt, tmp_path / "b")
    odd = make_decoder("gpt2")
    odd.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(EdgeloraError, match=r"^decoder export supports plain GPT-2; this one has "
                                            r"scale_attn_by_inverse_layer_idx$"):
        export_decoder(odd, tmp_path / "b")
    with pytest.raises(EdgeloraError, match=r"precision='int4' is not supported; choose from fp32, int8"):
        export_decoder(make_decoder("llama"), tmp_path / "b", precision="int4")


# --- the bundle -----------------------------------------------------------------------------------------


def test_bundle_holds_graph_tokenizer_and_generation_record(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>"}))
    (tok / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    model = make_decoder("llama")
    model.generation_config.eos_token_id = [2, 5]
    manifest = export_decoder(model, tmp_path / "bundle", tokenizer_dir=tok, precision="int8").to_dict()
    on_disk = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == 2 and manifest["task"] == "causal-lm" and manifest["mode"] == "merged"
    assert sorted(manifest["files"]) == ["chat_template.jinja", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert manifest["inputs"] == input_names(2) and manifest["outputs"] == output_names(2)
    assert manifest["generation"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 128,
                                      "context_length": 64, "eos_token_ids": [2, 5], "bos_token_id": 1,
                                      "pad_token_id": None, "chat_template": "{{ messages[0]['content'] }}"}
    assert manifest["quantization"]["weight_bits"] == 8 and manifest["quantization"]["block_size"] == 32
    assert manifest["validation"]["int8_layers_vs_fake_quant"]["matmuls"] == 9


def test_failed_export_keeps_the_previous_bundle(tmp_path: Path) -> None:
    base = make_decoder("llama")
    export_decoder(base, tmp_path / "bundle")
    before = (tmp_path / "bundle" / "manifest.json").read_bytes()
    _peft_adapter(make_decoder("qwen2"), tmp_path / "wrong", ["q_proj"])
    with pytest.raises(EdgeloraError, match="do not fit"):
        export_decoder(base, tmp_path / "bundle", adapter=tmp_path / "wrong")
    assert (tmp_path / "bundle" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "wrong"]


def test_large_graph_goes_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decoder_export, "PROTOBUF_LIMIT", 0)  # as a > 2 GB graph would
    model = make_decoder("llama")
    manifest = export_decoder(model, tmp_path / "bundle").to_dict()
    assert sorted(manifest["files"]) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "bundle" / "model.onnx").stat().st_size < 100_000
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds, logits = graph_steps(sess, build_decoder_graph(model).spec, steps=1)
    assert rel_error(logits, torch_logits(model, feeds), feeds) <= FP32_REL_TOL


def test_int8_export_reports_perplexity_on_plain_text_against_fp32_torch(tmp_path: Path) -> None:
    """The int8 manifest's perplexity figures: fp32 is the torch model's own next-token cross entropy over the
    tokenized texts (recomputed here), int8 the graph's, and ratio their quotient."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from edgelora.exporters.decoder_validate import PERPLEXITY_TEXTS

    words = sorted({w for t in PERPLEXITY_TEXTS for w in t.replace(",", " ").replace(".", " ").split()})[:126]
    tok = Tokenizer(WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    model = make_decoder("llama")
    report = export_decoder(model, tmp_path / "b", tokenizer_dir=tmp_path / "tok", precision="int8").validation
    ppl = report["perplexity_vs_fp32_torch"]
    losses, count = 0.0, 0
    for text in PERPLEXITY_TEXTS:
        ids = torch.tensor([tok.encode(text).ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        losses += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert ppl["tokens"] == count and ppl["texts"] == len(PERPLEXITY_TEXTS)
    assert ppl["fp32"] == pytest.approx(float(np.exp(losses / count)), rel=1e-6)
    assert ppl["ratio"] == pytest.approx(ppl["int8"] / ppl["fp32"]) and ppl["int8"] != ppl["fp32"]
