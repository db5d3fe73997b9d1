"""Claims about the SVD toolkit wired into the product: `extract` recovers a low-rank fine-tune exactly and
picks minimal energy ranks, the tuned model's head comes across as its architecture applies it (a full-rank
extraction gives the tuned task model's logits) or is refused, `reduce` is lossless at the adapter's own rank
and Eckart-Young optimal below it, PiSSA and int8-residual initialisation keep their promises, and every
misuse stops with one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from conftest import FP32_ATOL, HIDDEN, VOCAB_SIZE, make_base, make_inputs, randomize_adapters, write_tokenizer

from edgelora.cli.extract import add_extract_arguments, add_reduce_arguments, extract_command, reduce_command
from edgelora.config import LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.export import export_bundle
from edgelora.extract import extract_adapter, reduce_adapter
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import CONFIG_FILE, load_adapter, save_adapter
from edgelora.runtime import Runtime

# Rank-2 deltas recovered at rank 2: float64 SVD, float32 factors, two float32 layers; measured ~1e-7,
# while the deltas move the encoder output by > MIN_EFFECT.
EXACT_ATOL = 1e-5
MIN_EFFECT = 1e-2
# ||delta - B A||_F of float32 factors against the float64 Eckart-Young prediction, relative to ||delta||_F.
EY_REL_TOL = 1e-5

# Rank-2 deltas with known singular values (|W| ~ 0.6-0.9 in these layers: fine-tune-sized changes).
# At energy 0.85 the minimal ranks are 2, 1, 2, 1 (first sigma^2 share: 0.74, 0.92, 0.74, 0.95).
DELTAS = {
    "encoder.layer.0.attention.self.query": (0.20, 0.12),
    "encoder.layer.1.attention.self.value": (0.20, 0.06),
    "encoder.layer.0.intermediate.dense": (0.25, 0.15),
    "encoder.layer.1.output.dense": (0.22, 0.05),
}
ENERGY = 0.85
ENERGY_RANKS = {"encoder.layer.0.attention.self.query": 2, "encoder.layer.1.attention.self.value": 1,
                "encoder.layer.0.intermediate.dense": 2, "encoder.layer.1.output.dense": 1}
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Unexpected keyword arguments \['edgelora'\]:UserWarning", "ignore::FutureWarning"
)


# --- helpers -------------------------------------------------------------------------------------------
def with_spectrum(out_f: int, in_f: int, s: tuple[float, ...], seed: int) -> torch.Tensor:
    """An (out, in) float32 matrix with singular values `s` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(s), generator=g, dtype=torch.float64))
    return ((U * torch.tensor(s, dtype=torch.float64)) @ V.T).float()


def save_model(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1)


def hidden_of(model: torch.nn.Module, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**feeds).last_hidden_state


def adapted(base_dir: Path, adapter_dir: Path, name: str = "x") -> AdapterModel:
    model = AdapterModel(load_base(base_dir)[0])
    load_adapter(model, adapter_dir, name)
    return model.eval()


def deltas(model: AdapterModel, name: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: layer.lora_delta(name).double() for n, layer in model.adapted_layers() if name in layer.lora_A}


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().double()))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base dir, tuned dir): a tiny BERT and a copy whose DELTAS layers moved by exactly rank-2 deltas."""
    root = tmp_path_factory.mktemp("extract")
    base = make_base("bert")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, spectrum) in enumerate(DELTAS.items()):
            weight = tuned.get_submodule(name).weight
            weight += with_spectrum(*weight.shape, spectrum, seed=i)
    return save_model(base, root / "base"), save_model(tuned, root / "tuned")


@pytest.fixture(scope="module")
def rank2(dirs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapters") / "rank2"
    return out, extract_adapter(dirs[0], dirs[1], out, rank=2)


@pytest.fixture(scope="module")
def by_energy(dirs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapters") / "energy"
    return out, extract_adapter(dirs[0], dirs[1], out, energy=ENERGY)


@pytest.fixture
def feeds() -> dict[str, torch.Tensor]:
    return make_inputs("bert")


# --- extract ---------------------------------------------------------------------------------------------
def test_rank2_extraction_reproduces_the_tuned_encoder(dirs, rank2, feeds) -> None:
    base_dir, tuned_dir = dirs
    out, report = rank2
    want = hidden_of(load_base(tuned_dir)[0], feeds)
    assert (want - hidden_of(load_base(base_dir)[0], feeds)).abs().max() > MIN_EFFECT
    got = hidden_of(adapted(base_dir, out).base, feeds)
    torch.testing.assert_close(got, want, rtol=0, atol=EXACT_ATOL)
    assert {f["layer"] for f in report["layers"]} == set(DELTAS)  # and no other layer
    assert all(f["rank"] == 2 and f["relative_error"] < 1e-6 for f in report["layers"])
    assert report["total"]["compression_ratio"] == pytest.approx(
        sum(o * i for o, i in (f["shape"] for f in report["layers"])) / sum(2 * (o + i) for o, i in (f["shape"] for f in report["layers"])))
    # A BertModel checkpoint has no task head: an embeddings adapter, no invented labels.
    assert report["head"] == {"kind": None, "source": "none: BertModel has no task head", "labels": []}
    assert report["dropped"] == [] and report["warnings"] == []
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["task_type"] is None and config["edgelora"]["labels"] == []


def test_energy_mode_picks_the_minimal_rank_per_layer(dirs, by_energy) -> None:
    out, report = by_energy
    assert {f["layer"]: f["rank"] for f in report["layers"]} == ENERGY_RANKS
    for f in report["layers"]:
        s = torch.tensor(DELTAS[f["layer"]], dtype=torch.float64) ** 2
        kept = float(s[: f["rank"]].sum() / s.sum())
        assert f["energy_kept"] == pytest.approx(kept) and kept >= ENERGY
        assert float(s[: f["rank"] - 1].sum() / s.sum()) < ENERGY  # one fewer would not do
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {n: 1 for n, k in ENERGY_RANKS.items() if k == 1}
    # Loaded back, every layer holds exactly the truncated delta (the per-layer scale r / r_layer folded right).
    model = adapted(dirs[0], out)
    tuned = load_base(dirs[1])[0]
    for name, delta in deltas(model, "x").items():
        assert model.base.get_submodule(name).lora_A["x"].weight.shape[0] == ENERGY_RANKS[name]
        U, S, Vh = torch.linalg.svd(tuned.get_submodule(name).weight.double() - model.base.get_submodule(name).base.weight.double())
        k = ENERGY_RANKS[name]
        assert fro(delta - (U[:, :k] * S[:k]) @ Vh[:k]) < EY_REL_TOL * fro(S)


def test_per_layer_ranks_load_in_peft_unchanged(dirs, by_energy, feeds) -> None:
    out, _ = by_energy
    ours = adapted(dirs[0], out)
    theirs = peft.PeftModel.from_pretrained(load_base(dirs[0])[0], out).eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(theirs(**feeds).last_hidden_state, feeds["attention_mask"]),
                                   ours.encode(**feeds), rtol=0, atol=EXACT_ATOL)


def test_extracted_adapters_export_and_the_bundles_match(dirs, rank2, by_energy, feeds, tmp_path: Path) -> None:
    base_dir, tuned_dir = dirs
    onnx_feeds = {k: v.numpy() for k, v in feeds.items()}
    bundle = tmp_path / "merged"
    manifest = export_bundle(str(base_dir), {"r2": rank2[0]}, mode="merged", precision="fp32", out=bundle)
    assert manifest.task == "embeddings" and manifest.entry("r2").labels == () and manifest.entry("r2").head is None
    with torch.no_grad():
        want = pooled(load_base(tuned_dir)[0](**feeds).last_hidden_state, feeds["attention_mask"]).numpy()
    out = Runtime(bundle, intra_op_threads=1, allow_spinning=False).run(onnx_feeds)
    assert "logits" not in out
    np.testing.assert_allclose(out["embeddings"], want, rtol=0, atol=FP32_ATOL)
    # Per-layer ranks in switchable mode: each slot's width is its own symbolic dimension.
    bundle = tmp_path / "switchable"
    export_bundle(str(base_dir), {"e": by_energy[0], "r2": rank2[0]}, mode="switchable", precision="fp32", out=bundle)
    rt = Runtime(bundle, intra_op_threads=1, allow_spinning=False)
    model = adapted(base_dir, by_energy[0])
    with torch.no_grad():
        want_e = model.encode(**feeds).numpy()
    np.testing.assert_allclose(rt.run(onnx_feeds, adapter="e")["embeddings"], want_e, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(rt.run(onnx_feeds, adapter="r2")["embeddings"], want, rtol=0, atol=FP32_ATOL)


def test_head_and_labels_come_from_a_classification_checkpoint(dirs, feeds, tmp_path: Path) -> None:
    import transformers as tf

    tuned = load_base(dirs[1])[0]
    config = copy.deepcopy(tuned.config)
    config.id2label, config.label2id = {0: "neg", 1: "pos", 2: "neu"}, {"neg": 0, "pos": 1, "neu": 2}
    classifier = tf.BertForSequenceClassification(config).eval()
    classifier.bert.load_state_dict(tuned.state_dict())
    tuned_dir = save_model(classifier, tmp_path / "cls")
    report = extract_adapter(dirs[0], tuned_dir, tmp_path / "a", rank=2)
    model = adapted(dirs[0], tmp_path / "a")
    assert model.labels["x"] == ["neg", "pos", "neu"] and model.head_kind("x") == "bert-pooler"
    assert report["head"] == {"kind": "bert-pooler", "labels": ["neg", "pos", "neu"],
                              "source": "BertForSequenceClassification: bert.pooler.dense, classifier"}
    torch.testing.assert_close(model.heads["x"].weight, classifier.classifier.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.heads["x"].bias, classifier.classifier.bias, rtol=0, atol=0)
    assert report["warnings"] == []  # the head is applied as the tuned model applied it: nothing to warn of
    with torch.no_grad():  # the [CLS] pooler, then the classifier: the tuned model's own logits
        torch.testing.assert_close(model(**feeds)[0], classifier(**feeds).logits, rtol=0, atol=EXACT_ATOL)


def test_bias_and_other_deltas_are_reported_as_dropped(dirs, tmp_path: Path) -> None:
    tuned = load_base(dirs[1])[0]
    with torch.no_grad():
        tuned.encoder.layer[0].attention.self.query.bias += 0.1
        tuned.embeddings.LayerNorm.weight += 0.05
    report = extract_adapter(dirs[0], save_model(tuned, tmp_path / "t"), tmp_path / "a", rank=2)
    dropped = {d["tensor"]: d["what"] for d in report["dropped"]}
    assert dropped == {"encoder.layer.0.attention.self.query.bias": "bias", "embeddings.LayerNorm.weight": "other"}
    assert any(w.startswith("dropped the deltas of 1 biases") for w in report["warnings"])
    assert any("embeddings.LayerNorm.weight" in w for w in report["warnings"])


def test_an_unrelated_base_is_flagged(dirs, tmp_path: Path) -> None:
    other = save_model(make_base("bert", seed=1), tmp_path / "other")
    report = extract_adapter(dirs[0], other, tmp_path / "a", rank=1)
    assert any("is base really the model tuned was fine-tuned from" in w for w in report["warnings"])


def test_cli_commands_print_the_report_and_write_json(dirs, rank2, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    args = parser.parse_args(["--base", str(dirs[0]), "--tuned", str(dirs[1]), "--energy", "0.85",
                              "--out", str(tmp_path / "cli"), "--name", "task", "--json", str(tmp_path / "e.json")])
    assert extract_command(args) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.1.output.dense" in text and "compression" in text
    assert "adapter 'task' (no head: an embeddings adapter) written to" in text
    assert json.loads((tmp_path / "e.json").read_text())["layers"][0]["rank"] == 2
    parser = argparse.ArgumentParser()
    add_reduce_arguments(parser)
    assert reduce_command(parser.parse_args([str(rank2[0]), "--rank", "1", "--out", str(tmp_path / "r1")])) == 0
    assert "rel. error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args([str(rank2[0]), "--rank", "1", "--energy", "0.5", "--out", "x"])


# --- the tuned model's head: honoured exactly, or refused -------------------------------------------------
# A full fine-tune of a tiny task model, extracted at full rank: every delta is carried (float64 SVD, float32
# factors), so the adapter must give the tuned model's logits. Measured ~1e-7 relative to the largest logit;
# 1e-4 leaves room for ONNX Runtime summing in another order, and a head applied to the wrong vector (the
# mean-pooled row, the first token of a decoder) is off by > MIN_EFFECT.
FULL_RANK_REL = 1e-4
# The backbone deltas alone move the logits by 0.4-27% of the largest (measured: BERT 0.36%, DistilBERT 0.57%,
# RoBERTa 0.74%, GPT-2 21%, Llama 27%; LayerNorm absorbs much of random noise): ten times the tolerance at
# least, so an adapter that dropped its LoRA would fail.
LORA_EFFECT_REL = 10 * FULL_RANK_REL
FULL_RANK = 256  # clamped to each layer's smaller side: every component kept
PAD = 0  # GPT-2's pad token: its last-token head finds the last position that is not it
TASK_LABELS = {0: "neg", 1: "neutral", 2: "pos"}
TASK_ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama")


def task_model(arch: str, task: str = "Sequence", num_labels: int = 3, **extra) -> torch.nn.Module:
    """A tiny random `...For{task}Classification` of `arch` (seed 0), labels named by id2label."""
    import transformers as tf

    torch.manual_seed(0)
    names = {i: TASK_LABELS.get(i, f"c{i}") for i in range(num_labels)}
    common = {"num_labels": num_labels, "id2label": names, "label2id": {v: k for k, v in names.items()},
              "vocab_size": VOCAB_SIZE, **extra}
    config = {
        "bert": lambda: tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, **common),
        "roberta": lambda: tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
                                            **common),
        "distilbert": lambda: tf.DistilBertConfig(dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64,
                                                  max_position_embeddings=64, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                                      bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD, **common),
        "llama": lambda: tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=PAD, **common),
    }[arch]()
    auto = getattr(tf, f"AutoModelFor{task}Classification")
    return auto.from_config(config, attn_implementation="eager").eval()


def fine_tune(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A stand-in for full fine-tuning: every backbone projection's weight moves (~25% of its norm) and the
    head moves as a trained head does (BERT's pooler counts as head: BertForSequenceClassification reads it).
    Embeddings, LayerNorm and biases stay: a LoRA carries linear weights only."""
    g = torch.Generator().manual_seed(seed)
    prefix = model.base_model_prefix
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(f"{prefix}.") or name.startswith(f"{prefix}.pooler."):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        for name, module in model.named_modules():
            if name.startswith(f"{prefix}.") and ".pooler" not in name and \
                    type(module).__name__ in ("Linear", "Conv1D"):
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.005)
    return model


def task_feeds(arch: str) -> dict[str, torch.Tensor]:
    """Right-padded rows whose padded positions hold the pad token (RoBERTa's positions and GPT-2's last
    token are found from it)."""
    t = make_inputs(arch if arch != "roberta" else "distilbert", batch=4, seq=9)
    t["input_ids"][t["attention_mask"] == 0] = 1 if arch == "roberta" else PAD
    return t


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def task_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("task_heads")


def tuned_pair(root: Path, arch: str, task: str = "Sequence") -> tuple[Path, Path, torch.nn.Module]:
    """(base dir: the task model's backbone, tuned dir: the whole task model fine-tuned, the tuned model)."""
    base, tuned = root / f"base-{arch}-{task}", root / f"tuned-{arch}-{task}"
    model = task_model(arch, task)
    model.base_model.save_pretrained(base)  # a base as people download it: the backbone, no head
    fine_tune(model).save_pretrained(tuned)
    return base, tuned, model


@pytest.mark.parametrize("arch", TASK_ARCHS)
def test_a_sequence_classifier_comes_across_with_its_architecture_head(task_root: Path, arch: str) -> None:
    from edgelora.heads import ARCH_HEADS

    base, tuned, model = tuned_pair(task_root, arch)
    out = task_root / f"adapter-{arch}"
    report = extract_adapter(base, tuned, out, rank=FULL_RANK)
    assert report["head"]["kind"] == ARCH_HEADS[arch] and report["head"]["labels"] == ["neg", "neutral", "pos"]
    assert report["dropped"] == [] and report["warnings"] == []  # the tuned pooler rides in BERT's head
    feeds = task_feeds(arch)
    with torch.no_grad():
        want = model(**feeds).logits.numpy()
        plain = task_model(arch)  # the base's backbone under the tuned head: what the LoRA must add
        plain.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith(f"{model.base_model_prefix}.") or ".pooler." in k}, strict=False)
        assert rel_diff(plain(**feeds).logits.numpy(), want) > LORA_EFFECT_REL
    ours = adapted(base, out)
    with torch.no_grad():
        got = ours(**feeds)[0].numpy()
    torch_rel = rel_diff(got, want)
    manifest = export_bundle(base, {"x": out}, mode="merged", precision="fp32", out=task_root / f"bundle-{arch}")
    assert manifest.entry("x").head == ARCH_HEADS[arch] and manifest.entry("x").labels == ("neg", "neutral", "pos")
    onnx = Runtime(task_root / f"bundle-{arch}", intra_op_threads=1, allow_spinning=False).run(
        {k: v.numpy() for k, v in feeds.items()})["logits"]
    print(f"{arch}: extracted adapter vs tuned logits, max relative difference: torch {torch_rel:.2e}, "
          f"fp32 bundle {rel_diff(onnx, want):.2e}")
    assert torch_rel < FULL_RANK_REL and rel_diff(onnx, want) < FULL_RANK_REL


def test_a_token_classifier_comes_across_as_a_per_token_head(task_root: Path) -> None:
    from edgelora.token_model import TokenAdapterModel

    base, tuned, model = tuned_pair(task_root, "bert", "Token")
    out = task_root / "adapter-token"
    report = extract_adapter(base, tuned, out, rank=FULL_RANK)
    assert report["head"] == {"kind": "per-token", "labels": ["neg", "neutral", "pos"],
                              "source": "BertForTokenClassification: classifier"}
    assert json.loads((out / CONFIG_FILE).read_text())["task_type"] == "TOKEN_CLS"
    ours = TokenAdapterModel(load_base(base)[0])
    load_adapter(ours, out, "x")
    feeds = task_feeds("bert")
    real = feeds["attention_mask"].bool()
    with torch.no_grad():
        want, got = model(**feeds).logits[real].numpy(), ours.eval()(**feeds)[0][real].numpy()
    print(f"bert token classification: max relative difference {rel_diff(got, want):.2e}")
    assert got.shape == (int(real.sum()), 3) and rel_diff(got, want) < FULL_RANK_REL


def _refused(base: Path, tuned: Path, out: Path, message: str) -> None:
    said: list[str] = []
    with pytest.raises(EdgeloraError, match=message) as err:
        extract_adapter(base, tuned, out, rank=2, progress=said.append)
    assert "\n" not in str(err.value) and str(tuned) in str(err.value)
    assert not any(m.startswith("layer ") for m in said)  # refused before the SVD
    assert not out.exists()


@pytest.mark.parametrize(("build", "message"), [
    (lambda: task_model("bert", "Sequence", num_labels=1),
     r"classifier has 1 output \(a regression head\); extract takes classifiers of at least 2 labels"),
    (lambda: task_model("bert", "Sequence", problem_type="multi_label_classification"),
     r"a BertForSequenceClassification of problem_type 'multi_label_classification': its labels are independent"),
    (lambda: task_model("bert", "Sequence", problem_type="regression"),
     r"of problem_type 'regression': its outputs are values, not class scores"),
    (lambda: __import__("transformers").BertForQuestionAnswering(task_model("bert").config),
     r"a BertForQuestionAnswering \(its checkpoint holds qa_outputs\.bias, qa_outputs\.weight\), whose head "
     r"edgelora does not apply; extract takes a \.\.\.ForSequenceClassification"),
    (lambda: __import__("transformers").BertForMaskedLM(task_model("bert").config),
     r"a BertForMaskedLM \(its checkpoint holds cls\.predictions\..*\), whose head edgelora does not apply"),
])
def test_heads_that_cannot_be_honoured_are_refused_in_one_line(task_root: Path, build, message: str,
                                                                tmp_path: Path) -> None:
    base = tuned_pair(task_root, "bert")[0]
    tuned = tmp_path / "tuned"
    build().save_pretrained(tuned)
    _refused(base, tuned, tmp_path / "a", message)


def test_a_checkpoint_naming_no_architecture_with_a_head_is_refused(task_root: Path, tmp_path: Path) -> None:
    base = tuned_pair(task_root, "bert")[0]
    tuned = tmp_path / "tuned"
    task_model("bert").save_pretrained(tuned)
    config = json.loads((tuned / "config.json").read_text())
    del config["architectures"]
    (tuned / "config.json").write_text(json.dumps(config))
    _refused(base, tuned, tmp_path / "a", r"a model whose config\.json names no architecture \(its checkpoint holds "
                                          r"classifier\.bias, classifier\.weight\), whose head edgelora does not apply")


def test_an_architecture_without_a_known_head_is_refused(tmp_path: Path) -> None:
    import transformers as tf

    config = tf.ElectraConfig(vocab_size=VOCAB_SIZE, embedding_size=HIDDEN, hidden_size=HIDDEN, num_hidden_layers=1,
                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    tf.ElectraModel(config).save_pretrained(tmp_path / "base")
    tf.ElectraForSequenceClassification(config).save_pretrained(tmp_path / "tuned")
    _refused(tmp_path / "base", tmp_path / "tuned", tmp_path / "a",
             r"a ElectraForSequenceClassification, whose head edgelora does not know how to apply; it knows the "
             r"sequence-classification heads of bert, distilbert, gpt2")


def test_a_bert_classifier_over_a_base_without_a_pooler_is_refused(task_root: Path, tmp_path: Path) -> None:
    import transformers as tf

    _, tuned, model = tuned_pair(task_root, "bert")
    base = tf.BertModel(model.config, add_pooling_layer=False)
    base.load_state_dict(model.bert.state_dict(), strict=False)
    base.save_pretrained(tmp_path / "base")
    _refused(tmp_path / "base", tuned, tmp_path / "a",
             r"its bert-pooler head reads the base's pooler, and the base .* has none")


# --- reduce ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank4(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterModel, Path]:
    model = AdapterModel(make_base("bert"))
    model.add_adapter("t", LoraConfig(r=4, alpha=8.0, include_mlp=True), ["a", "b"])
    randomize_adapters(model)
    return model.eval(), save_adapter(model, "t", tmp_path_factory.mktemp("r4") / "t")


def test_reducing_to_the_adapters_own_rank_changes_nothing(rank4, feeds, tmp_path: Path) -> None:
    model, path = rank4
    reduce_adapter(path, tmp_path / "same", rank=4)
    reduced = AdapterModel(make_base("bert"))
    load_adapter(reduced, tmp_path / "same", "t")
    with torch.no_grad(), model.disable_adapter():
        plain = model.encode(**feeds)
    with torch.no_grad():
        want, got = model(**feeds), reduced.eval()(**feeds)
    assert (want[1] - plain).abs().max() > MIN_EFFECT
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=EXACT_ATOL)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=EXACT_ATOL)  # the head travels too


@pytest.mark.parametrize("target", [{"rank": 2}, {"energy": 0.8}])
def test_reducing_below_the_rank_gives_the_eckart_young_error(rank4, target, tmp_path: Path) -> None:
    model, path = rank4
    report = reduce_adapter(path, tmp_path / "low", **target)
    reduced = AdapterModel(make_base("bert"))
    load_adapter(reduced, tmp_path / "low", "t")
    before, after = deltas(model, "t"), deltas(reduced, "t")
    ranks = {f["layer"]: f["rank"] for f in report["layers"]}
    assert set(after) == set(before) and max(ranks.values()) <= 2 if "rank" in target else True
    for name, delta in before.items():
        s = torch.linalg.svdvals(delta)
        k = ranks[name]
        predicted = math.sqrt(float((s[k:] ** 2).sum()))
        assert abs(fro(delta - after[name]) - predicted) < EY_REL_TOL * fro(delta)
        if "energy" in target:
            assert float((s[:k] ** 2).sum() / (s**2).sum()) >= target["energy"] - 1e-9
            assert float((s[: k - 1] ** 2).sum() / (s**2).sum()) < target["energy"]


# --- initialisation --------------------------------------------------------------------------------------
def test_pissa_starts_at_the_base_and_saves_an_adapter_of_the_original_base(feeds, tmp_path: Path) -> None:
    model = AdapterModel(make_base("bert"))
    with torch.no_grad():
        plain = model.encode(**feeds)
    model.add_adapter("p", LoraConfig(r=4, include_mlp=True, init="pissa"), ["a", "b"])
    layer = model.base.encoder.layer[0].attention.self.query
    assert layer.lora_B["p"].weight.abs().max() > 0  # starts on the principal directions, not at zero
    with torch.no_grad():
        torch.testing.assert_close(model.encode(**feeds), plain, rtol=0, atol=EXACT_ATOL)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    target = torch.tensor([0, 1, 1])
    model.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(**feeds)[0], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained_logits, trained = model(**feeds)
    assert (trained - plain).abs().max() > MIN_EFFECT
    save_adapter(model, "p", tmp_path / "p")
    saved = json.loads((tmp_path / "p" / CONFIG_FILE).read_text())
    assert saved["r"] == 8 and saved["edgelora"]["adapter"]["init"] == "default" and saved["edgelora"]["init"] == "pissa"
    fresh = AdapterModel(make_base("bert"))  # the ORIGINAL base: no residual anywhere
    load_adapter(fresh, tmp_path / "p")
    with torch.no_grad():
        logits, got = fresh.eval()(**feeds)
    torch.testing.assert_close(got, trained, rtol=0, atol=EXACT_ATOL)
    torch.testing.assert_close(logits, trained_logits, rtol=0, atol=EXACT_ATOL)
    model.merge()  # merging folds the same delta the saved adapter carries
    with torch.no_grad():
        torch.testing.assert_close(model.encode(**feeds), trained, rtol=0, atol=EXACT_ATOL)


@pytest.mark.parametrize("bits", [8, 7])
def test_int8_residual_init_brings_fake_quant_closer_to_fp32(feeds, bits: int) -> None:
    quant = QuantConfig(weight_bits=bits, mode="switchable")
    reference = AdapterModel(make_base("bert"))
    with torch.no_grad():
        fp32 = reference.encode(**feeds)
    errors = {}
    for init in ("default", "int8-residual"):
        model = AdapterModel(make_base("bert"))
        model.add_adapter("q", LoraConfig(r=16, include_mlp=True, init=init), ["a", "b"], quant=quant)
        with torch.no_grad():
            errors[init] = float((model.encode(**feeds) - fp32).norm() / fp32.norm())
    print(f"int{bits} fake quant vs fp32 at step 0, relative error: {errors}")
    # Rounding error is nearly full-rank noise: rank 16 of 32 takes ~half of its energy (measured ratios
    # 0.75 at 8 bits, 0.56 at 7, with dynamic activations whose own rounding no adapter absorbs).
    assert errors["int8-residual"] < 0.85 * errors["default"]


@pytest.mark.parametrize("quant", [None, QuantConfig(mode="merged")])
def test_int8_residual_init_needs_the_switchable_recipe(quant) -> None:
    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=r"init='int8-residual' fits .* only the switchable int8 recipe keeps"):
        model.add_adapter("q", LoraConfig(r=2, init="int8-residual"), ["a", "b"], quant=quant)
    assert not model.configs


def test_lora_config_checks_init_and_rank_pattern() -> None:
    with pytest.raises(EdgeloraError, match=r"init='svd' is not supported; choose from default, pissa, int8-residual"):
        LoraConfig(init="svd")
    with pytest.raises(EdgeloraError, match=r"rank_pattern\['query'\]=0 must be a positive integer"):
        LoraConfig(rank_pattern={"query": 0})
    config = LoraConfig(r=4, alpha=8.0, rank_pattern={"layer.0.attention.self.query": 2, "query": 1})
    assert config.rank_for("encoder.layer.0.attention.self.query") == 2  # the first key that matches wins
    assert config.rank_for("encoder.layer.1.attention.self.query") == 1
    assert config.rank_for("encoder.layer.1.attention.self.value") == 4
    assert config.scaling_for(2) == 4.0


# --- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "message"), [
    ({"rank": 0}, r"rank=0 must be an integer >= 1"),
    ({"rank": 2.5}, r"rank=2.5 must be an integer >= 1"),
    ({"energy": 0.0}, r"energy=0.0 must be in \(0, 1\]"),
    ({"energy": 1.5}, r"energy=1.5 must be in \(0, 1\]"),
    ({}, r"give exactly one of rank \(components kept\) or energy \(fraction of sigma\^2 kept\)"),
    ({"rank": 2, "energy": 0.9}, r"give exactly one of rank"),
])
def test_bad_rank_or_energy_is_refused(dirs, rank4, target, message: str, tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=message):
        extract_adapter(dirs[0], dirs[1], tmp_path / "a", **target)
    with pytest.raises(EdgeloraError, match=message):
        reduce_adapter(rank4[1], tmp_path / "b", **target)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_other_architectures_and_shapes_are_refused(dirs, tmp_path: Path) -> None:
    import transformers as tf

    distil = save_model(make_base("distilbert"), tmp_path / "distil")
    with pytest.raises(EdgeloraError, match=r"the base is a bert model and the tuned one a distilbert model"):
        extract_adapter(dirs[0], distil, tmp_path / "a", rank=2)
    base = make_base("bert")
    wider = tf.BertModel(tf.BertConfig(**{**base.config.to_dict(), "intermediate_size": 48}))
    with pytest.raises(EdgeloraError, match=r"intermediate\.dense\.weight has shape \(64, 32\) in the base but \(48, 32\)"):
        extract_adapter(dirs[0], save_model(wider, tmp_path / "wide"), tmp_path / "a", rank=2)
    deeper = tf.BertModel(tf.BertConfig(**{**base.config.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(EdgeloraError, match=r"different architectures \(only in tuned: encoder\.layer\.2\."):
        extract_adapter(dirs[0], save_model(deeper, tmp_path / "deep"), tmp_path / "a", rank=2)
    assert not (tmp_path / "a").exists()


def test_no_differing_layer_is_refused(dirs, tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"no adaptable linear layer differs between the base and the tuned model;"):
        extract_adapter(dirs[0], dirs[0], tmp_path / "a", rank=2)
    base = make_base("bert")
    with torch.no_grad():
        base.encoder.layer[0].output.dense.bias += 0.1
    with pytest.raises(EdgeloraError, match=r"no adaptable .* \(only 1 other tensors differ, e\.g\. encoder\.layer\.0\.output\.dense\.bias\)"):
        extract_adapter(dirs[0], save_model(base, tmp_path / "bias"), tmp_path / "a", rank=2)


def test_reduce_refuses_bottleneck_adapters(tmp_path: Path) -> None:
    from edgelora.config import BottleneckConfig

    model = AdapterModel(make_base("bert"))
    model.add_adapter("b", BottleneckConfig(reduction_factor=4), ["a", "b"])
    save_adapter(model, "b", tmp_path / "b")
    with pytest.raises(EdgeloraError, match=r"a bottleneck adapter; reduce truncates LoRA adapters"):
        reduce_adapter(tmp_path / "b", tmp_path / "out", rank=1)


def test_an_adapter_name_the_model_would_refuse_stops_before_any_work(dirs, tmp_path: Path) -> None:
    with pytest.raises(EdgeloraError, match=r"adapter name 'intent\.r2' must be letters, digits, '_' or '-'; choose one with name=NAME"):
        extract_adapter(dirs[0], dirs[1], tmp_path / "intent.r2", rank=2)
