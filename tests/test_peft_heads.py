"""Claims about stock PEFT adapters of each task type: a bundle gives PEFT's own outputs, with the head
PEFT saved applied as the architecture's ...ForSequenceClassification applies it; adapters without a head
make embeddings bundles; what cannot be honoured is refused in one line; our architecture-head adapters
load in PEFT and give our logits.

Each base is a tiny randomly initialised `...ForSequenceClassification` saved as the base directory, so
its config names the labels (id2label) and its checkpoint holds what the task model takes from the base
(BERT's pooler). The PEFT model is built from that directory as a PEFT user builds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers as tf
from conftest import HIDDEN, VOCAB_SIZE, make_inputs

from edgelora.config import LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.exporters.export import export_bundle
from edgelora.heads import ARCH_HEADS, HEAD_KINDS
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import WEIGHTS_FILE, load_adapter, save_adapter
from edgelora.runtime import Runtime
from edgelora.runtime.manifest import HEADS, MEAN_POOLED

LABELS = {0: "neg", 1: "neutral", 2: "pos"}
PAD = 0  # the pad token of the decoder bases: last-token heads find the last position that is not it
# The bar: a fp32 bundle equals PEFT's logits within 1e-4 relative to the largest logit (ONNX
# Runtime and torch sum in other orders; measured below 1e-6 on these tiny bases).
FP32_REL = 1e-4
# int8 changes every projection's rounding; the checks export runs (embeddings cosine >= 0.95 to the fake-
# quant model) hold, and a classifier must keep PEFT's decisions where PEFT is not itself near a tie.
INT8_MIN_MARGIN = 0.05  # rows whose top-2 PEFT logits are closer than this may flip under any rounding
# Below this the adapter or the head would not be what makes the bundle's logits: guards against a test
# that passes because LoRA is zero or the head is the base's own.
MIN_EFFECT = 1e-2
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Unexpected keyword arguments \['edgelora'\]:UserWarning", "ignore::FutureWarning",
    "ignore::UserWarning",
)


def seq_cls_model(arch: str, num_labels: int = 3) -> torch.nn.Module:
    """A tiny random ...ForSequenceClassification of `arch` (seed 0), labels named by id2label."""
    torch.manual_seed(0)
    common = {"num_labels": num_labels, "id2label": {i: LABELS.get(i, f"c{i}") for i in range(num_labels)},
              "label2id": {LABELS.get(i, f"c{i}"): i for i in range(num_labels)}}
    small = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 64}
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            **small, **common)
        return tf.BertForSequenceClassification(cfg)
    if arch == "roberta":
        cfg = tf.RobertaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               pad_token_id=1, **{**small, "max_position_embeddings": 70}, **common)
        return tf.RobertaForSequenceClassification(cfg)
    if arch == "distilbert":
        cfg = tf.DistilBertConfig(dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64, **small, **common)
        return tf.DistilBertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                            bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD, **common)
        return tf.GPT2ForSequenceClassification(cfg)
    llama = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "pad_token_id": PAD, **small, **common}
    if arch == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**llama))
    if arch == "qwen2":
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**llama))
    raise ValueError(arch)


ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2")
TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
           "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


def feeds_for(arch: str) -> dict[str, np.ndarray]:
    """A right-padded batch (the last row half padding) whose padded positions hold the pad token."""
    t = make_inputs("bert" if arch == "bert" else arch, batch=4, seq=9)
    t["input_ids"][t["attention_mask"] == 0] = PAD if arch not in ("roberta",) else 1
    return {k: v.numpy() for k, v in t.items()}


def base_dir(tmp: Path, arch: str) -> Path:
    directory = tmp / f"base-{arch}"
    if not directory.exists():
        seq_cls_model(arch).save_pretrained(directory)
    return directory


def peft_seq_cls(tmp: Path, arch: str, **lora) -> tuple[Path, torch.nn.Module]:
    """A stock PEFT SEQ_CLS adapter trained (here: randomised) on the task model of base_dir(arch); its head
    moved away from the base's so that only the adapter's head can give PEFT's logits."""
    base = base_dir(tmp, arch)
    task_model = tf.AutoModelForSequenceClassification.from_pretrained(base).eval()
    model = peft.get_peft_model(task_model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                            target_modules=TARGETS[arch], init_lora_weights=False,
                                                            **lora))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:  # the adapter's own copy of the head
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    out = tmp / f"peft-{arch}"
    model.save_pretrained(out)
    return out, model


def peft_logits(model: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft_heads")


def test_the_manifest_and_the_model_name_the_same_head_kinds() -> None:
    assert tuple(HEAD_KINDS) == HEADS


# --- PEFT SEQ_CLS -> bundle -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "switchable"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_seq_cls_bundle_gives_peft_logits(tmp: Path, arch: str, mode: str) -> None:
    adapter, model = peft_seq_cls(tmp, arch)
    feeds = feeds_for(arch)
    want = peft_logits(model, feeds)
    with model.disable_adapter():
        assert np.abs(peft_logits(model, feeds) - want).max() > MIN_EFFECT  # the LoRA and head matter
    bundle = export_bundle(base_dir(tmp, arch), {"cls": adapter}, mode=mode, precision="fp32",
                           out=tmp / f"b-{arch}-{mode}")
    entry = bundle.entry("cls")
    assert entry.head == ARCH_HEADS[arch] and entry.labels == ("neg", "neutral", "pos")
    rt = Runtime(tmp / f"b-{arch}-{mode}")
    got = rt.run(feeds, "cls" if mode == "switchable" else None)["logits"]
    assert got.shape == want.shape
    assert rel_diff(got, want) < FP32_REL, f"{arch} {mode}: {rel_diff(got, want):.2e} relative to PEFT"


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_seq_cls_int8_bundle_keeps_peft_decisions(tmp: Path, arch: str) -> None:
    adapter, model = peft_seq_cls(tmp, arch)
    feeds = feeds_for(arch)
    want = peft_logits(model, feeds)
    export_bundle(base_dir(tmp, arch), {"cls": adapter}, mode="switchable", precision="int8", weight_bits=7,
                  out=tmp / f"b8-{arch}")
    got = Runtime(tmp / f"b8-{arch}").run(feeds, "cls")["logits"]
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > INT8_MIN_MARGIN
    assert clear.sum() >= 2, "too few rows with a clear decision to test"
    assert (got.argmax(1) == want.argmax(1))[clear].all()


def test_labels_come_from_the_adapter_before_the_base_config(tmp: Path) -> None:
    adapter, _ = peft_seq_cls(tmp, "distilbert")
    ours = AdapterModel(load_base(base_dir(tmp, "distilbert"))[0])
    load_adapter(ours, adapter, "cls")
    assert ours.labels["cls"] == ["neg", "neutral", "pos"]  # id2label of the base's config
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    named = tmp / "named"
    named.mkdir()
    (named / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes())
    (named / "adapter_config.json").write_text(json.dumps({**cfg, "edgelora": {"labels": ["a", "b", "c"]}}))
    load_adapter(ours, named, "named")
    assert ours.labels["named"] == ["a", "b", "c"]


# --- FEATURE_EXTRACTION and no task type -> embeddings ---------------------------------------------------------------


@pytest.mark.parametrize("task_type", ["FEATURE_EXTRACTION", None])
def test_peft_feature_extraction_makes_an_embeddings_bundle(tmp: Path, task_type: str | None) -> None:
    base = base_dir(tmp, "bert")
    backbone = tf.AutoModel.from_pretrained(base).eval()
    model = peft.get_peft_model(backbone, peft.LoraConfig(task_type=task_type, r=4, target_modules=["query", "value"],
                                                         init_lora_weights=False)).eval()
    path = tmp / f"fe-{task_type}"
    model.save_pretrained(path)
    feeds = feeds_for("bert")
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    manifest = export_bundle(base, {"emb": path}, mode="merged", precision="fp32", hidden_state=True,
                             out=tmp / f"fe-bundle-{task_type}")
    assert manifest.task == "embeddings" and manifest.outputs == ("embeddings", "last_hidden_state")
    assert manifest.entry("emb").labels == () and manifest.entry("emb").head is None
    out = Runtime(tmp / f"fe-bundle-{task_type}").run(feeds)
    assert "logits" not in out
    real = feeds["attention_mask"].astype(bool)
    assert rel_diff(out["last_hidden_state"][real], hidden[real]) < FP32_REL
    m = feeds["attention_mask"][..., None]
    assert rel_diff(out["embeddings"], (hidden * m).sum(1) / m.sum(1)) < FP32_REL


def test_embeddings_bundle_switchable_has_no_logits(tmp: Path) -> None:
    base = base_dir(tmp, "bert")
    model = peft.get_peft_model(tf.AutoModel.from_pretrained(base), peft.LoraConfig(
        task_type="FEATURE_EXTRACTION", r=4, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp / "fe-sw")
    manifest = export_bundle(base, {"emb": tmp / "fe-sw"}, mode="switchable", precision="int8", weight_bits=7,
                             out=tmp / "fe-sw-bundle")
    assert manifest.outputs == ("embeddings",)
    rt = Runtime(tmp / "fe-sw-bundle")
    feeds = feeds_for("bert")
    assert set(rt.run(feeds, "emb")) == {"embeddings"}
    assert set(rt.run(feeds, adapters=["emb", None, "emb", None])) == {"embeddings"}


# --- refusals -------------------------------------------------------------------------------------------


def test_a_head_the_base_checkpoint_cannot_complete_is_refused(tmp: Path) -> None:
    """A BERT checkpoint without its pooler: transformers gives the task model a random pooler, so PEFT's
    own logits change from load to load; exporting them with any pooler would be a stand-in."""
    base = tmp / "no-pooler"
    seq_cls_model("bert").bert.save_pretrained(base)  # BertModel: pooler kept
    bare = tf.BertModel(tf.BertConfig.from_pretrained(base), add_pooling_layer=False)
    bare.load_state_dict(tf.BertModel.from_pretrained(base).state_dict(), strict=False)
    bare.save_pretrained(base)
    adapter, _ = peft_seq_cls(tmp, "bert")
    with pytest.raises(EdgeloraError, match=r"does not hold bert\.pooler\.dense .* has none, so transformers gives "
                                             r"the task model a random one .*modules_to_save=\['classifier', 'pooler'\]"):
        export_bundle(base, {"cls": adapter}, mode="merged", precision="fp32", out=tmp / "never")
    assert not (tmp / "never").exists()


def test_extra_modules_to_save_are_refused(tmp: Path) -> None:
    base = base_dir(tmp, "bert")
    task_model = tf.AutoModelForSequenceClassification.from_pretrained(base)
    model = peft.get_peft_model(task_model, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"],
                                                            modules_to_save=["classifier", "LayerNorm"]))
    model.save_pretrained(tmp / "extra")
    ours = AdapterModel(load_base(base)[0])
    with pytest.raises(EdgeloraError, match=r"adapter_model\.safetensors: holds .*LayerNorm.* and \d+ more, which is "
                                             r"neither LoRA nor a classification head edgelora applies"):
        load_adapter(ours, tmp / "extra")
    assert not ours.configs


def test_a_regression_head_is_refused(tmp: Path) -> None:
    base = tmp / "regression-base"
    seq_cls_model("bert", num_labels=1).save_pretrained(base)
    model = peft.get_peft_model(tf.AutoModelForSequenceClassification.from_pretrained(base),
                                peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    model.save_pretrained(tmp / "regression")
    with pytest.raises(EdgeloraError, match=r"classifier has 1 output \(a regression head\)"):
        load_adapter(AdapterModel(load_base(base)[0]), tmp / "regression")


@pytest.mark.parametrize("task_type", ["QUESTION_ANS", "SEQ_2_SEQ_LM"])
def test_other_task_types_are_refused(tmp: Path, task_type: str) -> None:
    adapter, _ = peft_seq_cls(tmp, "bert")
    other = tmp / f"other-{task_type}"
    other.mkdir(exist_ok=True)
    (other / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes())
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": task_type}))
    with pytest.raises(EdgeloraError, match=rf"task_type '{task_type}' is not supported; edgelora exports SEQ_CLS"):
        load_adapter(AdapterModel(load_base(base_dir(tmp, "bert"))[0]), other)


def test_switchable_adapters_with_different_heads_are_refused(tmp: Path) -> None:
    adapter, _ = peft_seq_cls(tmp, "bert")
    ours = AdapterModel(load_base(base_dir(tmp, "bert"))[0])
    ours.add_adapter("mine", LoraConfig(r=2), ["x", "y"])
    mine = save_adapter(ours, "mine", tmp / "mine")
    with pytest.raises(EdgeloraError, match=r"adapters with different heads \(peft: bert-pooler, mine: mean-pooled\) "
                                             r"cannot share a switchable graph"):
        export_bundle(base_dir(tmp, "bert"), {"peft": adapter, "mine": mine}, mode="switchable", precision="fp32",
                      out=tmp / "never-mixed")


# --- ours -> PEFT, and the manifest's head ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_our_architecture_head_adapter_loads_in_peft(tmp: Path, arch: str) -> None:
    base = base_dir(tmp, arch)
    ours = AdapterModel(load_base(base)[0])
    ours.add_adapter("task", LoraConfig(r=4, alpha=8.0), ["neg", "neutral", "pos"], head=ARCH_HEADS[arch])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:  # the adapter's LoRA and head (BERT's pooler stays the base's)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = save_adapter(ours, "task", tmp / f"ours-{arch}")
    feeds = feeds_for(arch)
    with torch.no_grad():
        want = ours(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    task_model = tf.AutoModelForSequenceClassification.from_pretrained(base).eval()
    before = peft_logits(task_model, feeds)
    loaded = peft.PeftModel.from_pretrained(task_model, path).eval()
    got = peft_logits(loaded, feeds)
    assert np.abs(before - want).max() > MIN_EFFECT
    assert rel_diff(got, want) < FP32_REL, f"{arch}: {rel_diff(got, want):.2e} relative to ours"


def test_our_mean_pooled_head_is_recorded_and_old_manifests_mean_it(tmp: Path) -> None:
    base = base_dir(tmp, "bert")
    ours = AdapterModel(load_base(base)[0])
    ours.add_adapter("mine", LoraConfig(r=2), ["x", "y"])
    export_bundle(base, {"mine": save_adapter(ours, "mine", tmp / "mine-mp")}, mode="merged", precision="fp32",
                  out=tmp / "mp")
    manifest = json.loads((tmp / "mp" / "manifest.json").read_text())
    assert manifest["adapters"][0]["head"] == MEAN_POOLED
    del manifest["adapters"][0]["head"]
    from edgelora.runtime.manifest import Manifest

    assert Manifest.from_dict(manifest).entry("mine").head == MEAN_POOLED


def test_trained_with_the_architecture_head_loads_in_peft(workspace, tmp_path: Path, capsys) -> None:
    """`edgelora train --head architecture`: the adapter PEFT loads on AutoModelForSequenceClassification
    gives our logits, and its bundle records the head."""
    from conftest import cli

    rc, _out, err = cli(["train", "--base", workspace.base, "--data", workspace.data, "--out", tmp_path / "arch",
                         "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--head", "architecture",
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    ours = AdapterModel(load_base(workspace.base)[0])
    load_adapter(ours, tmp_path / "arch", "arch")
    assert ours.head_kind("arch") == "bert-pooler"
    feeds = {k: v for k, v in feeds_for("bert").items()}
    with torch.no_grad():
        want = ours(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    task_model = tf.AutoModelForSequenceClassification.from_pretrained(workspace.base, num_labels=2).eval()
    got = peft_logits(peft.PeftModel.from_pretrained(task_model, tmp_path / "arch").eval(), feeds)
    assert rel_diff(got, want) < FP32_REL
    manifest = export_bundle(workspace.base, {"arch": tmp_path / "arch"}, mode="merged", precision="fp32",
                             out=tmp_path / "bundle")
    assert manifest.entry("arch").head == "bert-pooler"


def test_an_architecture_without_a_known_head_is_refused() -> None:
    from edgelora.heads import architecture_head

    with pytest.raises(EdgeloraError, match=r"head 'architecture': edgelora knows the sequence-classification heads "
                                             r"of .*, not mpnet's; use head 'mean-pooled'"):
        architecture_head("mpnet")


def test_cli_exports_and_runs_an_embeddings_bundle(workspace, tmp_path: Path, capsys) -> None:
    from conftest import cli

    model = peft.get_peft_model(tf.AutoModel.from_pretrained(workspace.base), peft.LoraConfig(
        task_type="FEATURE_EXTRACTION", r=2, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "fe")
    rc, out, err = cli(["export", workspace.base, "--adapter", f"emb={tmp_path / 'fe'}", "--precision", "fp32",
                        "--hidden-state", "--out", tmp_path / "bundle"], capsys)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["task"] == "embeddings" and manifest["outputs"] == ["embeddings", "last_hidden_state"]
    rc, out, err = cli(["run", tmp_path / "bundle", "--text", "the good film", "--text", "bad"], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["text"] for r in rows] == ["the good film", "bad"]
    want = Runtime(tmp_path / "bundle").run(["the good film", "bad"])["embeddings"]
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), want, rtol=0, atol=1e-6)


def test_add_adapter_refuses_heads_the_bundle_does_not_compute(tmp: Path) -> None:
    from edgelora.exporters.add import add_adapters

    base = base_dir(tmp, "bert")
    ours = AdapterModel(load_base(base)[0])
    ours.add_adapter("mine", LoraConfig(r=2), ["x", "y"])
    mine = save_adapter(ours, "mine", tmp / "mine-add")
    export_bundle(base, {"mine": mine}, mode="switchable", precision="fp32", out=tmp / "sw-mean")
    adapter, _ = peft_seq_cls(tmp, "bert")
    with pytest.raises(EdgeloraError, match=r"add-adapter takes adapters whose head is one linear layer \(mean-pooled, "
                                             r"last-token, per-token\) or none, this one has an architecture's \(PEFT "
                                             r"SEQ_CLS\) head; export a new bundle"):
        add_adapters(tmp / "sw-mean", {"peft": adapter}, check=False)
    model = peft.get_peft_model(tf.AutoModel.from_pretrained(base), peft.LoraConfig(
        task_type="FEATURE_EXTRACTION", r=2, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp / "fe-add")
    export_bundle(base, {"emb": tmp / "fe-add"}, mode="switchable", precision="fp32", out=tmp / "sw-emb")
    with pytest.raises(EdgeloraError, match=r"its mean-pooled head cannot run in bundle .*sw-emb, whose graph applies "
                                             r"no head; export a new bundle"):
        add_adapters(tmp / "sw-emb", {"mine": mine}, check=False)


def test_add_adapter_takes_a_stock_last_token_classifier(tmp: Path) -> None:
    """A switchable bundle of GPT-2's last-token head takes a later stock SEQ_CLS adapter of that base (its head,
    `score`, is one linear layer without bias) and gives PEFT's logits, labels from the base config."""
    from edgelora.exporters.add import add_adapters

    adapter, model = peft_seq_cls(tmp, "gpt2")
    export_bundle(base_dir(tmp, "gpt2"), {"cls": adapter}, mode="switchable", precision="fp32", out=tmp / "sw-gpt2")
    manifest = add_adapters(tmp / "sw-gpt2", {"later": adapter}, base=base_dir(tmp, "gpt2"))
    assert manifest.entry("later").head == "last-token"
    assert manifest.entry("later").labels == ("neg", "neutral", "pos")
    feeds = feeds_for("gpt2")
    got = Runtime(tmp / "sw-gpt2").run(feeds, "later")["logits"]
    assert rel_diff(got, peft_logits(model, feeds)) < FP32_REL


def test_an_unknown_head_kind_is_refused() -> None:
    from conftest import make_base

    model = AdapterModel(make_base("bert"))
    with pytest.raises(EdgeloraError, match=r"head 'cls-token' is not one of mean-pooled, bert-pooler, roberta, "
                                             r"distilbert, last-token"):
        model.add_adapter("x", LoraConfig(r=2), ["a", "b"], head="cls-token")
    assert not model.configs


def test_a_base_without_a_pooler_loads_the_same_every_time(tmp: Path) -> None:
    """RoBERTa checkpoints hold no pooler: a random one at each load made the fingerprint differ per load, so
    our adapters trained on RoBERTa could not be exported."""
    from edgelora.model import fingerprint

    first, _ = load_base(base_dir(tmp, "roberta"))
    assert first.pooler is None
    assert fingerprint(first) == fingerprint(load_base(base_dir(tmp, "roberta"))[0])
    ours = AdapterModel(first)
    ours.add_adapter("task", LoraConfig(r=2), ["a", "b"], head="roberta")
    path = save_adapter(ours, "task", tmp / "roberta-ours")
    manifest = export_bundle(base_dir(tmp, "roberta"), {"task": path}, mode="merged", precision="fp32",
                             out=tmp / "roberta-ours-bundle")
    assert manifest.entry("task").head == "roberta"


def test_a_switchable_bundle_mixes_a_peft_classifier_and_an_embeddings_adapter(tmp: Path) -> None:
    adapter, model = peft_seq_cls(tmp, "bert")
    base = base_dir(tmp, "bert")
    fe = peft.get_peft_model(tf.AutoModel.from_pretrained(base), peft.LoraConfig(
        task_type="FEATURE_EXTRACTION", r=2, target_modules=["query"], init_lora_weights=False)).eval()
    fe.save_pretrained(tmp / "fe-mix")
    export_bundle(base, {"cls": adapter, "emb": tmp / "fe-mix"}, mode="switchable", precision="fp32",
                  out=tmp / "mixed")
    rt = Runtime(tmp / "mixed")
    feeds = feeds_for("bert")
    want = peft_logits(model, feeds)
    with torch.no_grad():
        hidden = fe(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    m = feeds["attention_mask"][..., None]
    out = rt.run(feeds, adapters=["cls", "emb", "cls", "emb"])
    assert [row.shape for row in out["logits"]] == [(3,), (0,), (3,), (0,)]
    assert rel_diff(np.stack([out["logits"][0], out["logits"][2]]), want[[0, 2]]) < FP32_REL
    pooled = (hidden * m).sum(1) / m.sum(1)
    assert rel_diff(out["embeddings"][[1, 3]], pooled[[1, 3]]) < FP32_REL


def test_labels_for_an_adapter_without_a_head_are_refused() -> None:
    from conftest import make_base

    model = AdapterModel(make_base("bert"))
    model.add_adapter("emb", LoraConfig(r=2), [])
    feeds = make_inputs("bert")
    assert model(**feeds)[0].shape == (3, 0)
    with pytest.raises(EdgeloraError, match=r"labels were given but adapter 'emb' has no head"):
        model(**feeds, labels=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_token_cls_on_a_decoder_base_round_trips(tmp: Path, arch: str) -> None:
    """...ForTokenClassification of a decoder: GPT-2 names its token head `classifier`, Llama `score`. A stock
    TOKEN_CLS adapter of either exports to PEFT's logits, and ours load in PEFT with our logits."""
    from edgelora.token_model import TokenAdapterModel

    base = base_dir(tmp, arch)
    task_model = tf.AutoModelForTokenClassification.from_pretrained(base).eval()
    model = peft.get_peft_model(task_model, peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                            target_modules=TARGETS[arch], init_lora_weights=False))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.eval()
    model.save_pretrained(tmp / f"tok-{arch}")
    feeds = feeds_for(arch)
    real = feeds["attention_mask"].astype(bool)
    want = peft_logits(model, feeds)
    export_bundle(base, {"tok": tmp / f"tok-{arch}"}, mode="merged", precision="fp32", out=tmp / f"tok-b-{arch}")
    got = Runtime(tmp / f"tok-b-{arch}").run(feeds)["logits"]
    assert rel_diff(got[real], want[real]) < FP32_REL

    ours = TokenAdapterModel(load_base(base)[0])
    load_adapter(ours, tmp / f"tok-{arch}", "mine")
    save_adapter(ours, "mine", tmp / f"tok-ours-{arch}")
    theirs = peft.PeftModel.from_pretrained(tf.AutoModelForTokenClassification.from_pretrained(base),
                                            tmp / f"tok-ours-{arch}").eval()
    assert rel_diff(peft_logits(theirs, feeds)[real], want[real]) < FP32_REL
