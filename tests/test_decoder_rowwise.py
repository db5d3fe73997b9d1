"""Claims about the rowwise int8 scheme of decoders (edgelora.fake_quant rowwise, exporters/decoder_graph.py,
exporters/decoder_int8.py): the graph's per-row quantizer gives the fake quantizer's integers bit for bit;
every rowwise and blockwise matmul of an exported graph equals its fake-quant product, and the logits follow
the fake-quant model (the training path, SmoothQuant included) across Llama, Qwen2 and GPT-2 and both attention
cores; a row is bit-identical alone and in a batch; the recipe saves with the adapter and exports as trained;
wrong combinations are one-line errors; the block scheme is untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from tiny_decoder_graph import alone_and_batched, graph_steps, make_decoder, rel_error, torch_logits

from edgelora.causal_train import ROWWISE_BLOCK_LAYERS, decoder_quant
from edgelora.config import QuantConfig, config_to_dict, layer_recipe, scheme_of
from edgelora.errors import EdgeloraError
from edgelora.exporters.decoder_graph import RowwisePlan, _Builder, _row_quantized, _rowwise_matmul, build_decoder_graph
from edgelora.exporters.decoder_int8 import choose_int8
from edgelora.exporters.decoder_validate import (
    INT8_LAYER_REL_TOL,
    fake_quant_model,
    fake_quant_product,
    layerwise_error,
    session,
)
from edgelora.fake_quant import fake_quantize_activation_rowwise, quantize_activation_rowwise
from edgelora.runtime.cpu import detect_isa, int8_saturates, recommended_weight_bits

BITS = recommended_weight_bits(detect_isa().isa)  # 7 where the u8 x s8 kernel saturates (this AVX2 machine)
# End to end, logits of the int8 graph vs the fake-quant torch model, relative to the largest |logit|: the same
# integers, float sums in another order (measured ~3e-7 on these 2-layer models); an ulp can flip one
# activation's rounding, which moves a logit ~1e-5 here, while the float model is ~1e-3 away and a wrong
# quantizer, scale or smoothing factor shows at 1e-2.
E2E_REL_TOL = 1e-4


def _graph(nodes_of, inputs: list[tuple[str, list]], outputs: list[tuple[str, int]], threads: int = 1):
    """A session of the nodes `nodes_of(builder)` writes, with float inputs and the named outputs."""
    b = _Builder()
    nodes_of(b)
    graph = helper.make_graph(b.nodes, "rowwise", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 11
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(rows: int = 9, k: int = 96, seed: int = 0) -> np.ndarray:
    """Rows of every kind: ordinary, an outlier channel, all zero, tiny, and exact .5 ties after scaling."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (rows, k)).astype(np.float32)
    x[1, 5] = 80.0  # an outlier: the row's other values collapse onto few levels
    x[2] = 0.0
    x[3] *= 1e-20
    x[4] = np.arange(k, dtype=np.float32) / 2 - 12  # multiples of 0.5 under a scale of ...
    x[4, 0] = 127.0  # ... exactly 1: x * (127 / 127) lands on .5 ties, which round half to even
    return x


def test_graph_row_quantizer_gives_the_fake_quantizers_integers_bit_for_bit() -> None:
    x = _activations()
    sess = _graph(lambda b: _row_quantized(b, "x", 96), [("x", ["m", 96])],
                  [("x.rowq", TensorProto.UINT8), ("x.rowq.scale", TensorProto.FLOAT)])
    q, scale = sess.run(None, {"x": x})
    want_q, want_scale = quantize_activation_rowwise(torch.from_numpy(x))
    np.testing.assert_array_equal(q.astype(np.int32) - 128, want_q.numpy().astype(np.int32))
    np.testing.assert_array_equal(scale, want_scale.numpy())
    assert (q[2] == 128).all() and float(fake_quantize_activation_rowwise(torch.from_numpy(x))[2].abs().max()) == 0.0
    assert set(np.unique(np.abs(want_q.numpy()[4, 1:] - x[4, 1:]))) <= {0.0, 0.5}  # ties were there, rounded to even
    assert (want_q.numpy()[4, 1:] % 2 == 0)[np.abs(want_q.numpy()[4, 1:] - x[4, 1:]) == 0.5].all()


def test_inputs_of_other_leading_dims_quantize_in_one_graph() -> None:
    """The layers' input (m, k) and a shorter one (as the LM head's after logits_to_keep) in one graph: each gets
    a zero point of its own rows' shape, and both give the fake quantizer's integers."""
    x, y = _activations(9, 96), np.random.default_rng(1).normal(0, 3, (2, 96)).astype(np.float32)

    def nodes(b):
        _row_quantized(b, "x", 96)
        _row_quantized(b, "y", 96)

    sess = _graph(nodes, [("x", ["m", 96]), ("y", ["n", 96])],
                  [("x.rowq", TensorProto.UINT8), ("y.rowq", TensorProto.UINT8)])
    qx, qy = sess.run(None, {"x": x, "y": y})
    for q, v in ((qx, x), (qy, y)):
        np.testing.assert_array_equal(q.astype(np.int32) - 128,
                                      quantize_activation_rowwise(torch.from_numpy(v))[0].numpy().astype(np.int32))


SATURATES = int8_saturates(detect_isa().isa)
GRIDS = [(7, False), (8, True), pytest.param(8, False, marks=pytest.mark.skipif(
    SATURATES, reason="8-bit int8 grids saturate this CPU's u8 x s8 kernel (the uint8 grid is for it)"))]


@pytest.mark.parametrize(("bits", "unsigned"), GRIDS, ids=["7-int8", "8-uint8", "8-int8"])
@pytest.mark.parametrize("smoothed", [False, True])
@pytest.mark.parametrize("shape", [(5, 64, 96), (1, 576, 576), (16, 1536, 576), (3, 48, 100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rowwise_matmul_equals_its_fake_quant_product(shape: tuple[int, int, int], smoothed: bool, bits: int,
                                                      unsigned: bool) -> None:
    """7-bit int8 grids (u8 x s8) everywhere; 8-bit grids as uint8 at zero point 128 (u8 x u8, which never
    saturates) everywhere, and as int8 where u8 x s8 does not saturate (VNNI; on AVX2 every 8-bit int8 case
    here fails)."""
    m, n, k = shape
    torch.manual_seed(m + n + k)
    w = torch.randn(n, k) * 0.05
    s = torch.rand(k) + 0.5 if smoothed else None
    x = _activations(m, k) if m > 4 else np.random.default_rng(1).normal(0, 1, (m, k)).astype(np.float32)
    quantized: dict = {}
    sess = _graph(lambda b: _rowwise_matmul(b, "x", "lin", w, bits, s, quantized, unsigned), [("x", ["m", k])],
                  [("lin.matmul", TensorProto.FLOAT), ("lin.smoothed" if smoothed else "x", TensorProto.FLOAT)])
    y, seen = sess.run(None, {"x": x})
    ref = fake_quant_product(quantized["lin"], torch.from_numpy(seen))
    err = float((torch.from_numpy(y) - ref).abs().max() / ref.abs().max())
    assert err <= INT8_LAYER_REL_TOL, err
    if smoothed:  # the graph's smoothed input is x * (1/s) exactly as AdaptedLinear computes it
        np.testing.assert_array_equal(seen, (torch.from_numpy(x) * (1.0 / s)).numpy())


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rowwise_matmul_row_is_the_same_alone_and_batched(threads: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(1536, 576) * 0.05
    sess = _graph(lambda b: _rowwise_matmul(b, "x", "lin", w, BITS, None, {}), [("x", ["m", 576])],
                  [("lin.matmul", TensorProto.FLOAT)], threads)
    x = np.random.default_rng(2).normal(0, 1, (33, 576)).astype(np.float32)
    batched = sess.run(None, {"x": x})[0]
    for i in (0, 7, 32):
        np.testing.assert_array_equal(sess.run(None, {"x": x[i:i + 1]})[0][0], batched[i])


def test_rowwise_gradient_is_straight_through() -> None:
    x = torch.randn(3, 4, 40, requires_grad=True)
    g = torch.randn(3, 4, 40)
    fake_quantize_activation_rowwise(x).backward(g)
    assert torch.equal(x.grad, g)


def _factors(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random SmoothQuant factors, shared as training shares them: q|k|v, gate|up (GPT-2: c_attn), o apart."""
    gen = torch.Generator().manual_seed(seed)
    quant = decoder_quant(scheme="rowwise", weight_bits=BITS)
    groups: dict[str, torch.Tensor] = {}
    factors = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D") or name == "lm_head":
            continue
        if layer_recipe(quant, name).weight_block:  # block_layers: never smoothed
            continue
        k = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]
        group = name.rsplit(".", 1)[0] + ("" if name.endswith(("o_proj", "attn.c_proj")) else ".shared")
        factors[name] = groups.setdefault(group, torch.rand(k, generator=gen) + 0.5)
    return factors


CASES = [("llama", "invariant"), ("llama", "gqa"), ("qwen2", "invariant"), ("gpt2", "invariant")]


@pytest.mark.parametrize("kind,attention", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_rowwise_graph_matches_fake_quant_layer_by_layer_and_end_to_end(kind: str, attention: str) -> None:
    model = make_decoder(kind)
    plan = RowwisePlan(decoder_quant(scheme="rowwise", weight_bits=BITS), _factors(model))
    graph = build_decoder_graph(model, "int8", attention, rowwise=plan)
    ops = [n.op_type for n in graph.model.graph.node]
    layers = 2
    assert ops.count("MatMulIntegerToFloat") == 3 * layers  # q|k|v, o, gate|up (GPT-2: c_attn, c_proj, c_fc)
    assert ops.count("MatMulNBits") == layers + 1  # down_proj and the LM head
    assert sum(n.name.endswith(".rowq.amax/ReduceMax") for n in graph.model.graph.node) == 3 * layers  # one per input
    assert ops.count("Mul") >= 3 * layers * 2  # the smoothing Mul and the row-scale Mul of each rowwise matmul
    assert sorted({q.kind for q in graph.quantized.values()}) == ["block", "rowwise"]
    feeds, logits = graph_steps(session(graph.model), graph.spec, steps=2)
    err, layer = layerwise_error(graph, feeds)
    assert err <= INT8_LAYER_REL_TOL, f"{layer}: relative error {err:.2e}"
    fq_err = rel_error(logits, torch_logits(fake_quant_model(model, plan), feeds), feeds)
    fp_err = rel_error(logits, torch_logits(model, feeds), feeds)
    assert fq_err < E2E_REL_TOL < fp_err, (fq_err, fp_err)
    # and not the block scheme's model: the reference really is the rowwise recipe
    assert rel_error(logits, torch_logits(fake_quant_model(model), feeds), feeds) > E2E_REL_TOL


def test_a_rowwise_row_is_bit_identical_alone_and_in_a_padded_batch() -> None:
    model = make_decoder("llama")
    graph = build_decoder_graph(model, "int8", rowwise=RowwisePlan(decoder_quant(scheme="rowwise", weight_bits=BITS),
                                                                 _factors(model)))
    for pad in (1, 3, 7, 13):
        alone, batched = alone_and_batched(graph, pad)
        assert all(np.array_equal(a, b) for a, b in zip(alone, batched)), f"left padding {pad} changed the row"


def test_the_recipe_names_its_scheme_and_each_layers_part() -> None:
    quant = decoder_quant(scheme="rowwise", weight_bits=7)
    assert scheme_of(quant) == "rowwise" and quant.smoothing == 0.5 and quant.block_layers == tuple(sorted(ROWWISE_BLOCK_LAYERS))
    for name in ("model.layers.3.mlp.down_proj", "lm_head", "transformer.h.0.mlp.c_proj"):
        assert layer_recipe(quant, name) == QuantConfig(weight_block=32)  # the block scheme's own recipe
    q_proj = layer_recipe(quant, "model.layers.3.self_attn.q_proj")
    assert (q_proj.activations, q_proj.weight_block, q_proj.weight_bits) == ("per-row", 0, 7)
    assert layer_recipe(quant, "transformer.h.0.attn.c_proj").activations == "per-row"
    saved = json.loads(json.dumps(config_to_dict(quant)))
    assert QuantConfig(**saved) == quant


def test_the_block_scheme_saves_and_exports_as_before() -> None:
    quant = decoder_quant()
    assert config_to_dict(quant) == {"weight_bits": 8, "activations": "dynamic", "mode": "merged", "skip_layers": (),
                                     "smoothing": None, "weight_block": 32}
    assert scheme_of(quant) == "block" and layer_recipe(quant, "lm_head") is quant
    graph = build_decoder_graph(make_decoder("llama"), "int8")
    ops = {n.op_type for n in graph.model.graph.node}
    assert "MatMulNBits" in ops and "MatMulIntegerToFloat" not in ops
    assert not any(".rowq" in n.name for n in graph.model.graph.node)


@pytest.mark.parametrize("fields,message", [
    ({"activations": "per-row", "weight_block": 32}, r"^weight_block=32 with activations='per-row' applies to block_layers"),
    ({"block_layers": ["lm_head"]}, r"^block_layers=\['lm_head'\] applies to activations='per-row'"),
    ({"activations": "per-row", "block_layers": ["lm_head"]}, r"^block_layers=\['lm_head'\] keeps those layers blockwise "
                                                              r"and needs weight_block"),
    ({"activations": "per-row", "weight_block": 32, "block_layers": "lm_head"}, r"^block_layers='lm_head' must be a list"),
    ({"activations": "per-row", "weight_block": 24, "block_layers": ["lm_head"]}, r"^weight_block=24 must be 0"),
    ({"activations": "rowwise"}, r"^activations='rowwise' is not supported; choose from dynamic, static, none, per-row"),
])
def test_bad_rowwise_recipes_are_one_line_errors(fields: dict, message: str) -> None:
    with pytest.raises(EdgeloraError, match=message) as info:
        QuantConfig(**fields)
    assert "\n" not in str(info.value)


def test_bad_scheme_choices_are_one_line_errors() -> None:
    with pytest.raises(EdgeloraError, match=r"^int8_scheme='row' is not supported; choose from block, rowwise$"):
        decoder_quant(scheme="row")
    with pytest.raises(EdgeloraError, match=r"^weight_bits=7: the block int8 scheme uses 8-bit blocks"):
        decoder_quant(weight_bits=7)
    with pytest.raises(EdgeloraError, match=r"^int8_scheme='rowwise' applies to int8 exports"):
        choose_int8({}, "rowwise", "fp32", "merged")


def _adapter_with_recipe(tmp_path: Path, quant: QuantConfig | None, name: str = "a") -> Path:
    """A directory holding only an adapter config whose `edgelora.quantization` is `quant`."""
    d = tmp_path / name
    d.mkdir()
    extras = {"quantization": None if quant is None else config_to_dict(quant)}
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "edgelora": extras}))
    return d


def test_an_export_takes_the_scheme_its_adapters_were_trained_with(tmp_path: Path) -> None:
    block = _adapter_with_recipe(tmp_path, decoder_quant(), "block")
    rowwise = _adapter_with_recipe(tmp_path, decoder_quant(scheme="rowwise", weight_bits=7, smoothing=None), "row")
    fp32 = _adapter_with_recipe(tmp_path, None, "fp32")
    assert choose_int8({}, None, "int8", "merged").scheme == "block"  # the default stays block
    assert choose_int8({"x": fp32}, "rowwise", "int8", "merged").scheme == "rowwise"  # fp32-trained: as asked
    chosen = choose_int8({"x": rowwise}, None, "int8", "switchable")
    assert chosen.scheme == "rowwise" and chosen.recipe.mode == "switchable" and chosen.recipe.weight_bits == 7
    with pytest.raises(EdgeloraError, match=r"block: adapter 'x' was trained with the block int8 scheme; export it with "
                                            r"int8_scheme='block' or retrain it with int8_scheme='rowwise'$"):
        choose_int8({"x": block}, "rowwise", "int8", "merged")
    with pytest.raises(EdgeloraError, match=r"^the adapters were trained with different int8 schemes \(block, rowwise\)"):
        choose_int8({"x": block, "y": rowwise}, None, "int8", "switchable")


@pytest.mark.parametrize(("scheme", "flags", "warns"), [("rowwise", "avx2", True),
                                                        ("rowwise", "avx2 avx512f avx512bw avx512_vnni", False),
                                                        ("block", "avx2", False)])
def test_8bit_rowwise_bundle_on_a_saturating_cpu_warns(tmp_path: Path, monkeypatch, scheme: str, flags: str,
                                                       warns: bool) -> None:
    """Rowwise bundles run MLAS's u8 x s8 kernel (MatMulIntegerToFloat): 8-bit weights exported for a VNNI CPU
    saturate on one without, as encoder bundles do; block bundles (MatMulNBits) make no such claim."""
    import warnings

    from served_decoder import tiny_decoder_bundle

    from edgelora.runtime import Runtime

    out = tiny_decoder_bundle(tmp_path, "int8-rowwise" if scheme == "rowwise" else "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["quantization"]["weight_bits"] = 8
    (out / "manifest.json").write_text(json.dumps(manifest))
    fake = detect_isa(f"flags : {flags}\n", machine="x86_64")
    monkeypatch.setattr("edgelora.runtime.runtime.detect_isa", lambda: fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Runtime(out, intra_op_threads=1)
    assert any("saturates" in str(w.message) for w in caught) is warns


def test_an_8bit_rowwise_export_for_a_saturating_cpu_is_exact_and_never_warns(tmp_path: Path, monkeypatch) -> None:
    """weight_bits=8 exported on a CPU whose u8 x s8 kernel saturates (AVX2 here, patched in on others) writes
    every rowwise grid uint8 at zero point 128 (u8 x u8): the export's layer check passes on this CPU whatever its
    ISA, the bundle requires an ONNX Runtime whose u8 x u8 dispatch is right on VNNI and AMX (1.25), and loading
    it where u8 x s8 saturates warns of nothing; weight_bits outside the rowwise scheme, or not 7 or 8, is one
    line."""
    import warnings

    import onnx
    from decoder_fixture import tiny_llama
    from served_decoder import CONTEXT, VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder
    from edgelora.runtime import Runtime

    fake = detect_isa("flags : avx2\n", machine="x86_64")
    monkeypatch.setattr("edgelora.runtime.cpu.detect_isa", lambda *a, **k: fake)
    out = tmp_path / "r8"
    m = export_decoder(tiny_llama(VOCAB, context=CONTEXT), out, precision="int8", int8_scheme="rowwise",
                       weight_bits=8, tokenizer_dir=chat_tokenizer(tmp_path))
    assert m.quantization.weight_bits == 8 and m.quantization.extra["weight_type"] == "uint8"
    assert m.requires.onnxruntime == "1.25"
    assert m.validation["int8_layers_vs_fake_quant"]["max_rel_error"] <= INT8_LAYER_REL_TOL
    graph = onnx.load(str(out / "model.onnx")).graph
    types = {t.name: t.data_type for t in graph.initializer}
    rowwise = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert rowwise and all(types[n.input[1]] == TensorProto.UINT8 and len(n.input) == 6 for n in rowwise)
    monkeypatch.setattr("edgelora.runtime.runtime.detect_isa", lambda: fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime(out, intra_op_threads=1)
    base = tiny_llama(VOCAB, context=CONTEXT)
    for kwargs, message in (({"int8_scheme": "block"}, "weight_bits=8 applies to the rowwise int8 scheme"),
                            ({"int8_scheme": "rowwise", "weight_bits": 6}, "weight_bits=6 is not supported; choose 7 or 8")):
        with pytest.raises(EdgeloraError, match=message):
            export_decoder(base, tmp_path / "x", precision="int8", **{"weight_bits": 8, **kwargs})


def test_the_grids_benchmark_measures_each_kernel_against_the_exact_product(capsys) -> None:
    """benchmarks/rowwise_grids.py: the 7-bit int8 and the 8-bit uint8 grids are exact here whatever the ISA
    (the error column is what shows a saturating kernel), one line per row count."""
    import re
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rowwise_grids

    rowwise_grids.main(["--k", "64", "--n", "48", "--rows", "1,3", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].startswith("M=1:") and lines[2].startswith("M=3:"), lines
    for line in lines[1:]:
        errors = dict(re.findall(r"(\S+) [\d.]+ ms \([\d.]+x, err ([\d.e+-]+)\)", line))
        assert float(errors["u8s8-7"]) < 1e-6 and float(errors["u8u8-8"]) < 1e-6, line
