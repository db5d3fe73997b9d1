"""Claims about switchable bundles: one int8 base, many float adapters, chosen per call or per row.

Each adapter of a switchable int8 bundle reproduces its own fake-quant torch model (base int8, branch
float); no adapter is the plain base; a batch mixing adapters runs once through the adapter bank and
gives each row what it gets alone (exactly in fp32; in int8 within the int8 rounding that any batch's
shared activation scale brings, and exactly what fake-quant torch gives on the same mixed batch);
adapters join an existing bundle without re-exporting its base; switching never makes a new session.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import (FP32_ATOL, INT8_MIN_COSINE, MIN_ADAPTER_EFFECT, TRACKS_FAKE_QUANT_FACTOR, VOCAB_SIZE,
                      WEIGHT_BITS, assert_each_adapter_changes_output, make_base, make_inputs, max_abs, mean_abs,
                      randomize_adapters, snapshot, unread_initializers, worst_cosine)
from safetensors.torch import load_file, save_file

import edgelora.exporters.switchable as switchable_module
from edgelora.cli import run as cli_run
from edgelora.cli.export import add_adapter_arguments, add_adapter_command
from edgelora.config import BottleneckConfig, LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters import validate
from edgelora.exporters.add import add_adapters
from edgelora.exporters.export import export_bundle
from edgelora.exporters.switchable import BANK_FILE, mixed_torch_outputs, read_adapter_file
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.runtime import Runtime

# A mixed batch vs its rows run one by one, fp32: the bank's zero padding adds exact zeros and each row's
# attention and pooling see only that row, so only summation order differs (measured ~2e-7).
MIXED_FP32_ATOL = 1e-5
# int8, a row in a mixed batch vs the same row alone. ORT quantizes activations per tensor over the
# whole batch, so a row's activation scale (and rounding) depends on its batch-mates, in any int8 batch.
# Each of the two results lies within the int8 quantization error e of the row's fp32 result, so they
# differ by at most about 2e; e is measured here as the largest |int8 alone - fp32 alone| over the rows
# (1.5e-3 to 3.3e-3 on these toy bases). Measured over 12 random mixed batches and 8 adapter seeds: 0.3e
# to 0.6e. A row through the wrong adapter moves far more; the test checks that too.
INT8_BATCH_FACTOR = 2.0

ADAPTERS = {
    "lo": LoraConfig(r=4, alpha=8.0, include_mlp=True),
    "bn": BottleneckConfig(reduction_factor=4, placement="houlsby", activation="gelu"),
    "lo8": LoraConfig(r=8, alpha=8.0),  # attention only, another rank
}
LABELS = {"lo": ["neg", "pos"], "bn": ["x", "y", "z"], "lo8": ["a", "b", "c", "d"]}  # three label counts
ROWS = ["lo", "bn", None, "lo8", "lo", "bn"]  # a mixed batch: every adapter, one twice, and the plain base


# --- helpers -----------------------------------------------------------------------------------------


def save_randomized(base_dir: Path, out: Path, names=tuple(ADAPTERS)) -> dict[str, Path]:
    """Randomized adapters on the base in `base_dir`, each checked to change the output, saved."""
    torch.manual_seed(0)  # LoRA A and the heads draw from torch's global generator: not from earlier tests
    model = AdapterModel(load_base(base_dir)[0])
    for name in names:
        model.add_adapter(name, ADAPTERS[name], labels=LABELS[name])
    randomize_adapters(model)
    assert_each_adapter_changes_output(model, names, make_inputs("bert"))
    return {name: save_adapter(model, name, out / name) for name in names}


def torch_model(base_dir: Path, adapters: dict[str, Path], precision: str) -> AdapterModel:
    """The reference: the saved adapters on the base, fake-quantized as switchable int8 deploys them."""
    model = AdapterModel(load_base(base_dir)[0])
    for name, path in adapters.items():
        load_adapter(model, path, name)
    model.set_quant(QuantConfig(WEIGHT_BITS, mode="switchable") if precision == "int8" else None)
    return model.eval()


def numpy_feeds(batch: int = len(ROWS)) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in make_inputs("bert", batch=batch).items()}


def row(feeds: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i : i + 1] for k, v in feeds.items()}


def torch_run(model: AdapterModel, feeds: dict[str, np.ndarray], adapter: str | None) -> dict[str, np.ndarray]:
    model.set_adapter(adapter)
    with torch.no_grad():
        logits, pooled = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return {"logits": logits.numpy(), "embeddings": pooled.numpy()}


def runtime(bundle: Path) -> Runtime:
    return Runtime(bundle, intra_op_threads=1, allow_spinning=False)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_randomized(tiny_bert_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def bundles(tiny_bert_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Switchable fp32 and int8 bundles of all three adapters, by precision."""
    root = tmp_path_factory.mktemp("bundles")
    for precision in ("fp32", "int8"):
        export_bundle(str(tiny_bert_dir), adapters, mode="switchable", precision=precision, out=root / precision,
                      weight_bits=WEIGHT_BITS)
    return {p: root / p for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def references(tiny_bert_dir: Path, adapters: dict[str, Path]) -> dict[str, AdapterModel]:
    return {p: torch_model(tiny_bert_dir, adapters, p) for p in ("fp32", "int8")}


# --- one adapter per call ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*ADAPTERS, None])
def test_each_adapter_matches_its_torch_reference(bundles, references, name: str | None) -> None:
    feeds = numpy_feeds()
    fp32 = runtime(bundles["fp32"]).run(feeds, adapter=name)
    want = torch_run(references["fp32"], feeds, name)
    assert fp32["logits"].shape == (len(ROWS), len(LABELS.get(name, [])))
    assert max(max_abs(fp32["logits"], want["logits"]), max_abs(fp32["embeddings"], want["embeddings"])) <= FP32_ATOL

    int8 = runtime(bundles["int8"]).run(feeds, adapter=name)
    fq = torch_run(references["int8"], feeds, name)
    cosine = worst_cosine(int8["embeddings"], fq["embeddings"])
    to_fq, to_fp32 = mean_abs(int8["embeddings"], fq["embeddings"]), mean_abs(int8["embeddings"], want["embeddings"])
    print(f"int8 {name}: cosine to fake quant {cosine:.7f}, mean diff to fake quant {to_fq:.2e}, to fp32 {to_fp32:.2e}")
    assert cosine >= INT8_MIN_COSINE
    assert to_fq * TRACKS_FAKE_QUANT_FACTOR <= to_fp32  # base int8, branch float: what mode="switchable" fakes
    if name is not None:
        assert worst_cosine(int8["logits"], fq["logits"]) >= INT8_MIN_COSINE


def test_no_adapter_is_the_plain_base(bundles, tiny_bert_dir) -> None:
    feeds = numpy_feeds()
    plain = torch_run(AdapterModel(load_base(tiny_bert_dir)[0]).eval(), feeds, None)
    rt = runtime(bundles["fp32"])
    got = rt.run(feeds)
    assert got["logits"].shape == (len(ROWS), 0)
    assert max_abs(got["embeddings"], plain["embeddings"]) <= FP32_ATOL
    for name in ADAPTERS:  # and every adapter really moves it
        assert max_abs(rt.run(feeds, adapter=name)["embeddings"], plain["embeddings"]) >= MIN_ADAPTER_EFFECT


def test_bert_switchable_graphs_fuse_attention_and_keep_the_branches(bundles) -> None:
    """The tests above and below run on these fused graphs: one ONNX Attention (opset 23) per layer, fed by
    one packed q, k, v projection (int8: one MatMulInteger) plus one packed LoRA branch in float, split in three."""
    for precision, bundle in bundles.items():
        fusions = json.loads((bundle / "manifest.json").read_text())["fusions"]
        assert fusions["applied"]["ai.onnx.Attention"] == 2, fusions["note"]
        assert fusions["multi_head_attention_layers"]["Attention_1"] == [
            f"encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")]
        proto = onnx.load(str(bundle / "model.onnx"))
        ops = Counter(n.op_type for n in proto.graph.node)
        assert ops["Attention"] == 2 and not ops["MultiHeadAttention"] and not ops["Softmax"] and not ops["Transpose"], ops
        assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 23
        assert unread_initializers(proto) == []  # no dead weight shipped
        assert ops["Split"] == 2 and len(json.loads((bundle / "manifest.json").read_text())["slots"]["packed"]) == 2
        if precision == "int8":  # every linear int8, q, k and v packed into one per layer
            assert ops["MatMulInteger"] == 8 and not ops["QAttention"]


def test_a_bundle_needing_a_newer_onnxruntime_says_so_in_one_line(bundles, monkeypatch) -> None:
    manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
    assert manifest["requires"] == {"onnxruntime": "1.23"}
    monkeypatch.setattr(ort, "__version__", "1.22.1")
    with pytest.raises(EdgeloraError, match=r"^\S+/model\.onnx needs onnxruntime>=1\.23 \(installed: 1\.22\.1\); "
                                            r"pip install -U 'onnxruntime>=1\.23'$"):
        Runtime(bundles["int8"])


def test_a_malformed_requires_field_is_refused_in_one_line(bundles, tmp_path: Path) -> None:
    import shutil

    bundle = Path(shutil.copytree(bundles["int8"], tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for bad in ("1.23", {"onnxruntime": 1.23}, {"onnxruntime": "latest"}):
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "requires": bad}))
        with pytest.raises(EdgeloraError, match=r"manifest\.json: requires is .*, expected null or "
                                                r"\{'onnxruntime': 'MAJOR\.MINOR'\}; re-export the bundle$"):
            Runtime(bundle)


def test_the_int8_layer_check_covers_each_fused_attention(bundles) -> None:
    proto = onnx.load(str(bundles["int8"] / "model.onnx"))
    feeds = validate.generated_feeds(VOCAB_SIZE, ("input_ids", "attention_mask", "token_type_ids"))
    options, _adapter = validate.adapter_run_options(str(bundles["int8"] / "adapters" / "lo8.onnx_adapter"))
    good, worst = validate.layerwise_error(proto, feeds, {}, WEIGHT_BITS, options)  # no int8 layers: the fused nodes
    node = next(n for n in proto.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("scale", 0.5))  # now it computes another attention
    bad, bad_worst = validate.layerwise_error(proto, feeds, {}, WEIGHT_BITS, options)
    print(f"Attention vs its recomputation: {good:.2e} as exported, {bad:.2e} with another scale")
    assert worst.startswith("Attention_") and good <= validate.INT8_LAYER_REL_TOL
    assert bad_worst == node.name and bad > 100 * validate.INT8_LAYER_REL_TOL


# --- one adapter per row ----------------------------------------------------------------------------


def test_mixed_batch_equals_its_rows_run_one_by_one_fp32(bundles) -> None:
    rt = runtime(bundles["fp32"])
    feeds = numpy_feeds()
    mixed = rt.run(feeds, adapters=ROWS)
    worst = 0.0
    for i, name in enumerate(ROWS):
        alone = rt.run(row(feeds, i), adapter=name)
        assert mixed["logits"][i].shape == (len(LABELS.get(name, [])),)
        worst = max(worst, max_abs(mixed["logits"][i], alone["logits"][0]),
                    max_abs(mixed["embeddings"][i], alone["embeddings"][0]))
    print(f"fp32 mixed batch vs rows alone: max diff {worst:.2e}")
    assert worst <= MIXED_FP32_ATOL


def test_mixed_batch_int8_is_fake_quant_torch_on_the_same_batch(bundles, references) -> None:
    """The exact int8 claim: the bank computes, row by row, what fake-quant torch computes for the same
    mixed batch, activation scales shared over the batch included."""
    feeds = numpy_feeds()
    got = runtime(bundles["int8"]).run(feeds, adapters=ROWS)
    fq_logits, fq_pooled = mixed_torch_outputs(references["int8"], feeds, ROWS)
    fp32_logits, fp32_pooled = mixed_torch_outputs(references["fp32"], feeds, ROWS)
    cosine = worst_cosine(got["embeddings"], fq_pooled)
    to_fq, to_fp32 = mean_abs(got["embeddings"], fq_pooled), mean_abs(got["embeddings"], fp32_pooled)
    print(f"int8 mixed batch: cosine to fake quant {cosine:.7f}, mean diff to fake quant {to_fq:.2e}, to fp32 {to_fp32:.2e}")
    assert cosine >= INT8_MIN_COSINE
    assert to_fq * TRACKS_FAKE_QUANT_FACTOR <= to_fp32
    for i, name in enumerate(ROWS):
        assert got["logits"][i].shape == fq_logits[i].shape
        if name is not None:
            assert worst_cosine(got["logits"][i], fq_logits[i]) >= INT8_MIN_COSINE, name


def test_mixed_batch_int8_rows_stay_within_int8_rounding_of_running_alone(bundles) -> None:
    int8, fp32 = runtime(bundles["int8"]), runtime(bundles["fp32"])
    feeds = numpy_feeds()
    mixed = int8.run(feeds, adapters=ROWS)
    alone = [int8.run(row(feeds, i), adapter=name) for i, name in enumerate(ROWS)]
    exact = [fp32.run(row(feeds, i), adapter=name) for i, name in enumerate(ROWS)]
    error = max(max(max_abs(a["embeddings"], e["embeddings"]), max_abs(a["logits"], e["logits"]))
                for a, e in zip(alone, exact))  # the int8 quantization error of the rows run alone
    moved = max(max(max_abs(mixed["embeddings"][i], a["embeddings"][0]), max_abs(mixed["logits"][i], a["logits"][0]))
                for i, a in enumerate(alone))
    # What a row would show under the wrong adapter (the plain base): the bound must be far below it.
    wrong = min(max_abs(a["embeddings"], int8.run(row(feeds, i))["embeddings"])
                for i, (a, name) in enumerate(zip(alone, ROWS)) if name is not None)
    print(f"int8 mixed batch vs rows alone: max diff {moved:.2e}; int8 error of rows alone {error:.2e}; "
          f"a row without its adapter moves {wrong:.2e}")
    assert INT8_BATCH_FACTOR * error < wrong / 2
    assert moved <= INT8_BATCH_FACTOR * error


def test_heads_with_different_label_counts_in_one_mixed_batch(bundles) -> None:
    rt = runtime(bundles["fp32"])
    texts = ["the good film", "a bad movie", "alpha beta", "is was the", "w1 w2 w3 w4 w5"]
    names = ["lo8", "lo", "bn", "lo", "lo8"]
    preds = rt.predict(texts, adapters=names)
    assert [list(p["scores"]) for p in preds] == [LABELS[n] for n in names]
    for text, name, pred in zip(texts, names, preds):
        (alone,) = rt.predict(text, adapter=name)
        assert pred["label"] == alone["label"]
        np.testing.assert_allclose(list(pred["scores"].values()), list(alone["scores"].values()), atol=MIXED_FP32_ATOL)
    with pytest.raises(EdgeloraError, match=r"no labels without an adapter"):
        rt.predict(texts[:2], adapters=["lo", None])


def test_a_mixed_batch_is_one_session_run_and_switching_never_makes_a_session(bundles, monkeypatch) -> None:
    rt = runtime(bundles["int8"])
    session = rt.session
    cache = sorted((bundles["int8"] / ".cache").glob("*.opt.onnx"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    made: list[object] = []
    real_init = ort.InferenceSession.__init__
    monkeypatch.setattr(ort.InferenceSession, "__init__", lambda self, *a, **k: (made.append(a), real_init(self, *a, **k))[1])
    calls: list[dict] = []
    real_run = session.run
    monkeypatch.setattr(session, "run", lambda names, feeds, options=None: (calls.append(feeds), real_run(names, feeds, options))[1])
    feeds = numpy_feeds()
    for name in ["lo", "bn", None, "lo8", "lo", None, "bn"]:
        rt.run(feeds, adapter=name)
    assert len(calls) == 7
    rt.run(feeds, adapters=ROWS)  # loads the bank on first use: a RunOptions, not a session
    rt.run(feeds, adapters=list(reversed(ROWS)))
    assert len(calls) == 9 and "adapter_ids" in calls[-1]
    assert made == [] and rt.session is session
    assert [p.stat().st_mtime_ns for p in cache] == stamps  # nothing re-optimized or re-saved


def test_the_bank_holds_every_adapter_zero_padded_and_a_zero_entry_last(bundles) -> None:
    manifest = json.loads((bundles["fp32"] / "manifest.json").read_text())
    assert manifest["bank"] == {"file": BANK_FILE, "adapters": [*ADAPTERS, None]}
    bank = read_adapter_file(bundles["fp32"] / BANK_FILE)
    for i, name in enumerate(ADAPTERS):
        own = read_adapter_file(bundles["fp32"] / "adapters" / f"{name}.onnx_adapter")
        for slot, value in bank.items():
            entry = value[i]
            if slot in own:
                inner = tuple(slice(0, d) for d in own[slot].shape[1:])
                np.testing.assert_array_equal(entry[inner], own[slot][0])
                padding = entry.copy()
                padding[inner] = 0
                assert not padding.any(), (name, slot)
            else:
                assert not entry.any(), (name, slot)
    assert not any(value[-1].any() for value in bank.values())


def test_a_bundle_without_a_bank_runs_a_mixed_batch_once_per_adapter(tmp_path: Path) -> None:
    """Switchable bundles from before adapter banks (2-D slots, no adapter_ids) still take adapters=."""
    from tiny_bundle import TEXTS, make_bundle

    rt = runtime(make_bundle(tmp_path, "switchable").path)
    assert not rt.mixes_in_one_run
    names = ["topic", "sentiment", None]
    mixed = rt.run(TEXTS, adapters=names)
    for i, name in enumerate(names):
        alone = rt.run([TEXTS[i]], adapter=name)
        np.testing.assert_allclose(mixed["logits"][i], alone["logits"][0], atol=MIXED_FP32_ATOL)
        np.testing.assert_allclose(mixed["embeddings"][i], alone["embeddings"][0], atol=MIXED_FP32_ATOL)


def test_run_command_takes_one_adapter_per_text(bundles, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli_run.add_run_arguments(parser)
    args = parser.parse_args([str(bundles["fp32"]), "--text", "the good film", "--text", "a bad movie",
                              "--adapters", "lo8,bn", "--threads", "1"])
    assert cli_run.run_command(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(o["adapter"], list(o["scores"])) for o in out] == [("lo8", LABELS["lo8"]), ("bn", LABELS["bn"])]
    with pytest.raises(EdgeloraError, match=r"--adapters names 1 adapters for 2 texts"):
        cli_run.run_command(parser.parse_args([str(bundles["fp32"]), "--text", "a", "--text", "b", "--adapters", "lo"]))


# --- adding adapters to a bundle ----------------------------------------------------------------------


@pytest.fixture
def wide(tiny_bert_dir, adapters, tmp_path: Path) -> Path:
    """An int8 bundle of "lo8" (attention LoRA) with LoRA slots on every attention and MLP projection."""
    out = tmp_path / "wide"
    export_bundle(str(tiny_bert_dir), {"lo8": adapters["lo8"]}, mode="switchable", precision="int8", out=out,
                  weight_bits=WEIGHT_BITS, lora_slots="attention+mlp")
    return out


def test_added_adapter_matches_torch_and_joins_the_bank(wide, adapters, references) -> None:
    model_before = snapshot(wide)["model.onnx"]
    manifest = add_adapters(wide, {"lo": adapters["lo"]}).to_dict()
    assert [a["name"] for a in manifest["adapters"]] == ["lo8", "lo"]
    assert manifest["bank"]["adapters"] == ["lo8", "lo", None]
    assert manifest["validation"]["lo"]["vs_fake_quant_torch"]["embeddings"]["worst_cosine"] >= INT8_MIN_COSINE
    assert snapshot(wide)["model.onnx"] == model_before  # the base is not re-exported
    rt = runtime(wide)  # verifies every sha256 in the new manifest
    assert rt.adapters == ("lo8", "lo")
    feeds = numpy_feeds()
    reference = references["int8"]
    got, fq = rt.run(feeds, adapter="lo"), torch_run(reference, feeds, "lo")
    assert worst_cosine(got["embeddings"], fq["embeddings"]) >= INT8_MIN_COSINE
    assert worst_cosine(got["logits"], fq["logits"]) >= INT8_MIN_COSINE
    rows = ["lo", "lo8", None, "lo", "lo8", None]
    mixed = rt.run(feeds, adapters=rows)
    _, fq_pooled = mixed_torch_outputs(reference, feeds, rows)
    assert worst_cosine(mixed["embeddings"], fq_pooled) >= INT8_MIN_COSINE


def test_added_adapter_can_replace_one_by_name_and_the_cli_says_so(wide, adapters, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_adapter_arguments(parser)
    args = parser.parse_args([str(wide), "--adapter", f"lo8={adapters['lo']}", "--no-check"])
    with pytest.raises(EdgeloraError, match=r"already has an adapter 'lo8'; write NEW_NAME=.* or pass --replace"):
        add_adapter_command(args)
    assert add_adapter_command(parser.parse_args([str(wide), "--adapter", f"lo8={adapters['lo']}", "--replace"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == ["lo8"] and out["adapters"] == ["lo8"] and out["bank"] == BANK_FILE
    assert runtime(wide).labels("lo8") == tuple(LABELS["lo"])


def test_a_bottleneck_adapter_joins_a_bundle_with_bottleneck_slots(bundles, adapters, tmp_path: Path) -> None:
    import shutil

    bundle = Path(shutil.copytree(bundles["fp32"], tmp_path / "copy"))
    manifest = add_adapters(bundle, {"bn2": adapters["bn"]}).to_dict()  # checked against fp32 torch on the way
    assert manifest["validation"]["bn2"]["vs_fp32_torch"]["embeddings"]["max_abs_diff"] <= FP32_ATOL
    rt = runtime(bundle)
    feeds = numpy_feeds(2)
    feeds = {k: np.concatenate([v[:1], v[:1], v[1:]]) for k, v in feeds.items()}  # rows 0 and 1 the same text
    mixed = rt.run(feeds, adapters=["bn2", "bn", "lo"])
    np.testing.assert_array_equal(mixed["logits"][0], mixed["logits"][1])
    np.testing.assert_array_equal(mixed["embeddings"][0], mixed["embeddings"][1])
    with pytest.raises(EdgeloraError, match=r"lora_slots='everything' is not supported; choose from adapters, attention"):
        export_bundle(str(bundle), {"lo": adapters["lo"]}, mode="switchable", precision="fp32", out=tmp_path / "x",
                      lora_slots="everything")


def test_an_added_lora_with_per_layer_ranks_gets_each_layers_scaling(bundles, tiny_bert_dir, tmp_path: Path) -> None:
    """LoRA scales by alpha / r per layer, so with `rank_pattern` the query layers (rank 2) scale twice as much
    as the others (rank 4): add-adapter folds each layer's own scaling into B, as export does."""
    import shutil

    bundle = Path(shutil.copytree(bundles["fp32"], tmp_path / "copy"))
    torch.manual_seed(1)
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("rp", LoraConfig(r=4, alpha=8.0, include_mlp=True, rank_pattern={"query": 2}), labels=["a", "b"])
    randomize_adapters(model)
    path = save_adapter(model, "rp", tmp_path / "rp")
    add_adapters(bundle, {"rp": path}, check=False)
    feeds = numpy_feeds()
    got = runtime(bundle).run(feeds, adapter="rp")
    want = torch_run(torch_model(tiny_bert_dir, {"rp": path}, "fp32"), feeds, "rp")
    assert max_abs(got["embeddings"], want["embeddings"]) <= FP32_ATOL
    assert max_abs(got["logits"], want["logits"]) <= FP32_ATOL


def _foreign(tmp_path: Path, base_dir: Path, adapters, wide: Path) -> tuple[Path, Path]:
    other = AdapterModel(make_base("bert", seed=1))  # same architecture, other weights
    other.add_adapter("lo", LoraConfig(r=2), labels=["a", "b"])
    return save_adapter(other, "lo", tmp_path / "foreign"), wide


def _wrong_shape(tmp_path: Path, base_dir: Path, adapters, wide: Path) -> tuple[Path, Path]:
    path = tmp_path / "wrong"
    path.mkdir()
    (path / "adapter_config.json").write_text((adapters["lo8"] / "adapter_config.json").read_text())
    tensors = load_file(str(adapters["lo8"] / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("layer.0.attention.self.query.lora_A.weight"))
    tensors[key] = torch.zeros(8, 33)  # (r, in) with in = 33, not the base's 32
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path, wide


def _merged(tmp_path: Path, base_dir: Path, adapters, wide: Path) -> tuple[Path, Path]:
    out = tmp_path / "merged"
    export_bundle(str(base_dir), {"lo8": adapters["lo8"]}, mode="merged", precision="fp32", out=out)
    return adapters["lo"], out


def _no_slot(tmp_path: Path, base_dir: Path, adapters, wide: Path) -> tuple[Path, Path]:
    out = tmp_path / "narrow"  # LoRA slots on attention only: where "lo8" has LoRA
    export_bundle(str(base_dir), {"lo8": adapters["lo8"]}, mode="switchable", precision="fp32", out=out)
    return adapters["lo"], out  # "lo" adapts the MLP too


@pytest.mark.parametrize(
    "make,message",
    [
        (_foreign, r"{adapter}: adapter was trained on another base \(fingerprint \w+…\) than bundle {bundle} holds"),
        (_wrong_shape, r"{adapter}: base_model\.model\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight has "
                       r"shape \(33, 8\), which does not fit bundle {bundle}'s input .*; the adapter is for another base"),
        (_merged, r"{bundle}: a merged bundle has its adapter baked into model\.onnx; adapters can be added only"),
        (_no_slot, r"{adapter}: adapter targets layer encoder\.layer\.0\.intermediate\.dense with LoRA, which has no "
                   r"LoRA slot in bundle {bundle} \(LoRA slots: 8 layers, e\.g\. .*\); re-export the bundle with "
                   r"lora_slots='attention\+mlp'"),
    ],
    ids=["foreign-base", "wrong-shape", "merged-bundle", "layer-without-slot"],
)
def test_add_adapter_refuses_what_does_not_fit_and_keeps_the_bundle(make, message, tiny_bert_dir, adapters, wide,
                                                                    tmp_path: Path) -> None:
    adapter, bundle = make(tmp_path, tiny_bert_dir, adapters, wide)
    before = snapshot(bundle)
    pattern = "^" + message.format(adapter=re.escape(str(adapter)), bundle=re.escape(str(bundle)))
    with pytest.raises(EdgeloraError, match=pattern):
        add_adapters(bundle, {"new": adapter}, check=False)
    assert snapshot(bundle) == before


def test_failed_add_leaves_the_bundle_as_it_was(wide, adapters, monkeypatch) -> None:
    before = snapshot(wide)

    def broken(path: Path, tensors) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(switchable_module, "write_adapter_file", broken)
    with pytest.raises(OSError, match="disk full"):
        add_adapters(wide, {"lo": adapters["lo"]}, check=False)
    assert snapshot(wide) == before
    assert sorted(p.name for p in wide.parent.iterdir()) == ["wide"]  # no temporary copy left beside it
