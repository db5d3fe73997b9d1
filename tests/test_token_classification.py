"""Token classification end to end on a tiny random BERT: data (word tags, character spans, builtin:slots),
entity F1 against hand-computed cases, training, export merged/switchable fp32/int8 against torch, word and
entity predictions with offsets, `serve`'s /v1/predict, PEFT TOKEN_CLS adapters, and one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    INT8_MIN_COSINE,
    MIN_ADAPTER_EFFECT,
    TRACKS_FAKE_QUANT_FACTOR,
    assert_one_line_error,
    cli,
    randomize_adapters,
    worst_cosine,
)
from tiny_token import tiny_config, write_slot_bert, write_slot_tokenizer

from edgelora.config import LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.model import load_base
from edgelora.peft_format import save_adapter
from edgelora.runtime import Runtime
from edgelora.runtime.entities import chunks, entity_f1, entity_spans, first_subtokens, words
from edgelora.token_data import (
    IGNORE_INDEX,
    SLOT_TAGS,
    encode_tagged,
    generate_slots,
    load_token_dataset,
    load_token_splits,
)
from edgelora.token_model import TokenAdapterModel, train_token_adapter
from edgelora.tokenize import load_tokenizer
from edgelora.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:.*exceeds the base:UserWarning")

# PEFT's logits vs the fp32 bundle's: the same float ops in another order, relative to the largest logit
# (the bar for "PEFT's own outputs").
PEFT_FP32_REL = 1e-4
MAX_LENGTH = 64
EXAMPLE = "set the dehumidifier in the living room to 21.5 degrees"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def slot_base(tmp_path_factory) -> Path:
    return write_slot_bert(tmp_path_factory.mktemp("slot_bert"))


@pytest.fixture(scope="module")
def trained(slot_base: Path, tmp_path_factory) -> Path:
    """A LoRA + int8 QAT token adapter on the tiny base (head and LoRA B randomized so it moves the logits)."""
    model = TokenAdapterModel(load_base(slot_base)[0])
    model.add_adapter("slots", LoraConfig(r=4), list(SLOT_TAGS), quant=QuantConfig(weight_bits=7))
    randomize_adapters(model, seed=1)
    out = tmp_path_factory.mktemp("adapter") / "slots"
    save_adapter(model, "slots", out)
    return out


# --- words, tags, entities, F1 -------------------------------------------------------------------------------
def test_words_keep_numbers_and_split_punctuation() -> None:
    text = "heat the living-room to 21.5, please!"
    assert [text[a:b] for a, b in words(text)] == ["heat", "the", "living-room", "to", "21.5", ",", "please", "!"]


def test_bio_and_plain_tags_merge_into_entities_with_character_offsets() -> None:
    text = "dim the living room lamp now"
    spans = words(text)
    bio = ["O", "O", "B-room", "I-room", "B-device", "O"]
    assert entity_spans(text, spans, bio, [1, 1, 0.8, 0.6, 0.9, 1]) == [
        {"label": "room", "start": 8, "end": 19, "text": "living room", "score": pytest.approx(0.7)},
        {"label": "device", "start": 20, "end": 24, "text": "lamp", "score": pytest.approx(0.9)},
    ]
    plain = ["O", "O", "room", "room", "device", "O"]
    assert [(e["label"], e["text"]) for e in entity_spans(text, spans, plain)] == [("room", "living room"),
                                                                                  ("device", "lamp")]
    # B- always starts an entity; a stray I- starts one too; a type change ends one (seqeval's default reading)
    assert chunks(["B-a", "B-a", "I-a", "O", "I-b", "I-a", "a", "b"]) == [
        ("a", 0, 1), ("a", 1, 3), ("b", 4, 5), ("a", 5, 7), ("b", 7, 8)]


def test_entity_f1_matches_hand_computed_cases() -> None:
    gold = [["B-room", "I-room", "O", "B-device"], ["O", "B-temperature"]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    # one exact hit of three gold entities; two predicted, one with the wrong end: P = 1/2, R = 1/3, F1 = 0.4
    pred = [["B-room", "O", "O", "B-device"], ["O", "O"]]
    scores = entity_f1(gold, pred)
    assert (scores["correct"], scores["predicted"], scores["gold"]) == (1, 2, 3)
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4)
    # a right span with the wrong type counts for nothing
    assert entity_f1([["B-room"]], [["B-device"]])["f1"] == 0.0
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "gold": 0, "predicted": 0,
                                           "correct": 0}
    with pytest.raises(ValueError, match="2 gold tags but 1 predicted"):
        entity_f1([["O", "O"]], [["O"]])


def test_first_subtoken_of_each_word_from_offsets(slot_base: Path) -> None:
    tok = load_tokenizer(slot_base, MAX_LENGTH)
    enc = tok.encode(EXAMPLE)
    assert enc.tokens[3:7] == ["de", "##hum", "##idi", "##fier"] and enc.tokens[12:15] == ["21", ".", "5"]
    first = first_subtokens(enc.offsets, enc.special_tokens_mask, words(EXAMPLE))
    assert first == [1, 2, 3, 7, 8, 9, 10, 11, 12, 15]
    # a word past the truncation point has no sub-token
    assert first_subtokens([(0, 0), (0, 3), (0, 0)], [1, 0, 1], [(0, 3), (4, 7)]) == [1, -1]


# --- data ----------------------------------------------------------------------------------------------------
def test_spans_and_word_tags_give_the_same_labels(tmp_path: Path, slot_base: Path) -> None:
    spans_file = write_jsonl(tmp_path / "spans.jsonl", [
        {"text": EXAMPLE, "spans": [{"start": 8, "end": 20, "label": "device"},
                                    {"start": 28, "end": 39, "label": "room"},
                                    {"start": 43, "end": 47, "label": "temperature"}]}])
    tags = ["O", "O", "B-device", "O", "O", "B-room", "I-room", "O", "B-temperature", "O"]
    tokens_file = write_jsonl(tmp_path / "tokens.jsonl", [{"tokens": EXAMPLE.split(), "tags": tags}])
    a, b = load_token_dataset(spans_file), load_token_dataset(tokens_file)
    assert a.tag_names(0) == b.tag_names(0) == tags
    assert a.texts == b.texts and a.spans == b.spans
    feeds, labels, first = encode_tagged(load_tokenizer(slot_base, MAX_LENGTH), a.texts, a.spans, a.tags)
    names = a.label_names
    # only each word's first sub-token carries a label; specials, inner sub-tokens and padding are ignored
    labelled = {int(i): names[labels[0, i]] for i in np.flatnonzero(labels[0] != IGNORE_INDEX)}
    assert labelled == dict(zip(first[0], tags))
    assert labels[0, 4] == labels[0, 5] == labels[0, 6] == IGNORE_INDEX  # ##hum ##idi ##fier
    assert labels[0, 13] == labels[0, 14] == IGNORE_INDEX  # "." "5" of 21.5


def test_builtin_slots_is_seeded_and_holds_out_unseen_texts() -> None:
    assert generate_slots(30, 3) == generate_slots(30, 3)
    assert generate_slots(30, 3) != generate_slots(30, 4)
    train, held = load_token_splits("builtin:slots:100", seed=0)
    assert (len(train), len(held)) == (80, 20) and train.label_names == SLOT_TAGS
    assert not set(train.texts) & set(held.texts)
    kinds = {t.split("-", 1)[1] for i in range(len(train)) for t in train.tag_names(i) if t != "O"}
    assert kinds == {"room", "device", "temperature"}


@pytest.mark.parametrize("record, fragment", [
    ({"tokens": ["turn", "on", "lamp"], "tags": ["O", "O"]}, "line 2: 3 tokens but 2 tags; give one tag per token"),
    ({"text": "turn on the lamp", "spans": [{"start": 12, "end": 30, "label": "device"}]},
     r"line 2: spans\[0\] \[12, 30\) lies outside the text of 16 characters"),
    ({"text": "turn on the lamp", "spans": [{"start": 12, "end": 16, "label": "B-device"}]},
     "line 2: spans.0. label 'B-device' must be an entity type"),
    ({"tokens": ["turn", "on"], "tags": ["O", "B-"]}, "line 2: tag 'B-' has no entity type"),
])
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path: Path, record: dict, fragment: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["hi", "kitchen"], "tags": ["O", "B-room"]}, record])
    with pytest.raises(EdgeloraError, match=f"bad.jsonl, {fragment}"):
        load_token_dataset(path)


def test_an_eval_tag_unseen_in_training_is_refused_by_file_and_line(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["the", "kitchen"], "tags": ["O", "B-room"]}] * 5)
    held = write_jsonl(tmp_path / "eval.jsonl", [{"tokens": ["the", "lamp"], "tags": ["O", "B-device"]}])
    with pytest.raises(EdgeloraError, match=r"eval.jsonl, line 1: tag 'B-device' is not one of the training tags"):
        load_token_splits(train, held)


# --- training ------------------------------------------------------------------------------------------------
def test_training_a_few_steps_lowers_the_loss(slot_base: Path) -> None:
    train, held = load_token_splits("builtin:slots:120", seed=0)
    tok = load_tokenizer(slot_base, MAX_LENGTH)
    model = TokenAdapterModel(load_base(slot_base)[0])
    torch.manual_seed(0)
    model.add_adapter("slots", LoraConfig(r=4), list(train.label_names), quant=QuantConfig(weight_bits=7))
    feeds, labels, _ = encode_tagged(tok, train.texts[:32], train.spans[:32], train.tags[:32])
    batch = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def loss() -> float:
        with torch.no_grad():
            return float(model(**batch, labels=torch.from_numpy(labels))[0])

    before = loss()
    result = train_token_adapter(model, "slots", tok, train, held, TrainConfig(epochs=2, batch_size=16, lr=3e-2))
    assert loss() < 0.7 * before
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert 0.0 <= result.best_accuracy <= 1.0 and "eval_f1" in result.history[0]


def test_cli_trains_token_classification_from_word_tags(tmp_path: Path, slot_base: Path, capsys) -> None:
    records = [{"text": r["text"], "spans": r["spans"]} for r in generate_slots(40, 0)]
    data = write_jsonl(tmp_path / "slots.jsonl", records)
    rc, out, err = cli(["train", "--task", "token-classification", "--base", slot_base, "--data", data,
                        "--out", tmp_path / "ad", "--epochs", "1", "--batch-size", "16", "--max-length", "64",
                        "--qat", "int8", "--weight-bits", "7"], capsys)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["task"] == "token-classification" and 0.0 <= summary["eval_entity_f1"] <= 1.0
    extras = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["edgelora"]
    assert extras["task"] == "token-classification" and extras["labels"][0] == "O"


def test_cli_names_the_bad_line(tmp_path: Path, slot_base: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["turn", "on"], "tags": ["O"]}])
    rc, _, err = cli(["train", "--task", "token-classification", "--base", slot_base, "--data", data,
                      "--out", tmp_path / "ad"], capsys)
    assert_one_line_error(rc, err, "bad.jsonl, line 1: 2 tokens but 1 tags")


# --- export and runtime --------------------------------------------------------------------------------------
def _torch_logits(slot_base: Path, adapter: Path, feeds: dict, quantized_for: str | None) -> np.ndarray:
    """The torch model's logits: fp32, or fake-quantized as the int8 export of mode `quantized_for` runs it."""
    import dataclasses

    from edgelora.peft_format import load_adapter

    model = TokenAdapterModel(load_base(slot_base)[0])
    load_adapter(model, adapter)
    model.set_quant(None if quantized_for is None else dataclasses.replace(model.quant, mode=quantized_for))
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()


@pytest.mark.parametrize("mode", ["merged", "switchable"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_exported_bundle_gives_the_torch_per_token_logits(tmp_path: Path, slot_base: Path, trained: Path,
                                                          mode: str, precision: str) -> None:
    from edgelora.exporters.export import export_bundle

    manifest = export_bundle(str(slot_base), {"slots": trained}, mode=mode, precision=precision,
                             out=tmp_path / "bundle", max_length=MAX_LENGTH)
    assert manifest.task == "token-classification" and manifest.outputs[0] == "logits"
    rt = Runtime(tmp_path / "bundle", intra_op_threads=1)
    texts = [EXAMPLE, "turn on the lamp", "keep the guest room at 19 degrees tonight"]
    feeds = rt.tokenize(texts)
    got = rt.run(texts, "slots")["logits"]
    assert got.shape == (*feeds["input_ids"].shape, len(SLOT_TAGS))  # [batch, tokens, labels]
    real = feeds["attention_mask"].astype(bool)
    fp32 = _torch_logits(slot_base, trained, feeds, None)
    assert np.abs(fp32).max() > MIN_ADAPTER_EFFECT
    if precision == "fp32":
        assert np.abs(got - fp32)[real].max() <= PEFT_FP32_REL * max(1.0, np.abs(fp32).max())
        return
    fq = _torch_logits(slot_base, trained, feeds, mode)
    assert worst_cosine(got[real], fq[real]) >= INT8_MIN_COSINE
    to_fq, to_fp32 = np.abs(got - fq)[real].mean(), np.abs(got - fp32)[real].mean()
    assert to_fq * TRACKS_FAKE_QUANT_FACTOR < to_fp32, (to_fq, to_fp32)


def test_predict_tags_words_from_their_first_subtoken_with_offsets(tmp_path: Path, slot_base: Path,
                                                                   trained: Path) -> None:
    from edgelora.exporters.export import export_bundle

    export_bundle(str(slot_base), {"slots": trained}, mode="switchable", precision="fp32", out=tmp_path / "b",
                  max_length=MAX_LENGTH)
    rt = Runtime(tmp_path / "b", intra_op_threads=1)
    (pred,) = rt.predict([EXAMPLE], adapter="slots")
    logits = rt.run([EXAMPLE], "slots")["logits"][0]  # (tokens, labels)
    by_hand = [("set", 0, 3, 1), ("the", 4, 7, 2), ("dehumidifier", 8, 20, 3), ("in", 21, 23, 7),
               ("the", 24, 27, 8), ("living", 28, 34, 9), ("room", 35, 39, 10), ("to", 40, 42, 11),
               ("21.5", 43, 47, 12), ("degrees", 48, 55, 15)]  # (word, start, end, its first sub-token)
    assert [(w["text"], w["start"], w["end"]) for w in pred["words"]] == [t[:3] for t in by_hand]
    for word, (_, _, _, token) in zip(pred["words"], by_hand):
        p = np.exp(logits[token] - logits[token].max())
        assert word["label"] == SLOT_TAGS[int(logits[token].argmax())]
        assert word["score"] == pytest.approx(float(p.max() / p.sum()), rel=1e-5)
    tags = [w["label"] for w in pred["words"]]
    assert pred["entities"] == entity_spans(EXAMPLE, words(EXAMPLE), tags, [w["score"] for w in pred["words"]])
    for e in pred["entities"]:
        assert EXAMPLE[e["start"]:e["end"]] == e["text"]


def test_serve_predict_returns_entities_with_offsets(tmp_path: Path, slot_base: Path, trained: Path) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    import http.client
    import threading
    import time

    from edgelora.exporters.export import export_bundle
    from edgelora.runtime.serve import create_app, listen

    export_bundle(str(slot_base), {"slots": trained}, mode="merged", precision="int8", out=tmp_path / "b",
                  max_length=MAX_LENGTH)
    texts = [EXAMPLE, "turn on the lamp"]
    offline = Runtime(tmp_path / "b", intra_op_threads=1).predict(texts)
    sock = listen("127.0.0.1", 0)
    app = create_app(Runtime(tmp_path / "b", intra_op_threads=1), batching="off")
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.005)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=20)
        conn.request("POST", "/v1/predict", body=json.dumps({"texts": texts}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
        conn.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert status == 200, body
    assert body["predictions"] == json.loads(json.dumps(offline))
    assert all({"label", "start", "end", "text", "score"} == set(e) for p in body["predictions"] for e in p["entities"])


# --- PEFT TOKEN_CLS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> tuple[Path, Path, object]:
    """A BertForTokenClassification base and a stock PEFT TOKEN_CLS LoRA adapter of it (random LoRA B)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import BertForTokenClassification

    root = tmp_path_factory.mktemp("peft_token")
    torch.manual_seed(0)
    config = tiny_config(num_labels=3)
    config.id2label = {0: "O", 1: "B-room", 2: "I-room"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    base = BertForTokenClassification(config).eval()
    base.save_pretrained(root / "base")
    write_slot_tokenizer(root / "base")
    peft_model = get_peft_model(base, PeftLoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8,
                                                     target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
            if "classifier" in name:
                param.normal_(std=0.5)
    peft_model.eval()
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", peft_model


@pytest.mark.parametrize("mode, precision", [("merged", "fp32"), ("switchable", "fp32"), ("merged", "int8")])
def test_peft_token_cls_adapter_gives_peft_logits(tmp_path: Path, peft_adapter, mode: str, precision: str) -> None:
    from edgelora.exporters.export import export_bundle

    base_dir, adapter_dir, peft_model = peft_adapter
    manifest = export_bundle(str(base_dir), {"peft": adapter_dir}, mode=mode, precision=precision,
                             out=tmp_path / "b", max_length=MAX_LENGTH, weight_bits=7 if precision == "int8" else None)
    assert manifest.task == "token-classification"
    rt = Runtime(tmp_path / "b", intra_op_threads=1)
    assert rt.labels("peft") == ("O", "B-room", "I-room")  # from the base config's id2label
    texts = [EXAMPLE, "turn on the kitchen lights"]
    feeds = rt.tokenize(texts)
    got = rt.run(texts, "peft")["logits"]
    with torch.no_grad():
        ref = peft_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        with peft_model.disable_adapter():
            plain = peft_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    real = feeds["attention_mask"].astype(bool)
    assert np.abs(ref - plain)[real].max() > MIN_ADAPTER_EFFECT  # the LoRA matters
    if precision == "fp32":
        assert np.abs(got - ref)[real].max() <= PEFT_FP32_REL * max(1.0, np.abs(ref).max())
    else:
        agree = (got.argmax(-1) == ref.argmax(-1))[real].mean()
        assert agree == 1.0, agree


def test_peft_token_cls_adapter_without_its_classifier_is_refused(tmp_path: Path, peft_adapter) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from edgelora.exporters.export import export_bundle

    base_dir, adapter_dir, _ = peft_adapter
    broken = tmp_path / "adapter"
    shutil.copytree(adapter_dir, broken)
    tensors = {k: v for k, v in load_file(str(broken / "adapter_model.safetensors")).items() if "classifier" not in k}
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(EdgeloraError, match="a TOKEN_CLS adapter without its classifier"):
        export_bundle(str(base_dir), {"peft": broken}, mode="merged", precision="fp32", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_batch_mixing_token_adapters_gives_each_row_its_adapters_tags(tmp_path: Path, slot_base: Path,
                                                                        trained: Path) -> None:
    from edgelora.exporters.export import export_bundle

    model = TokenAdapterModel(load_base(slot_base)[0])
    model.add_adapter("rooms", LoraConfig(r=2), ["O", "B-room", "I-room"], quant=QuantConfig(weight_bits=7))
    randomize_adapters(model, seed=2)
    save_adapter(model, "rooms", tmp_path / "rooms")
    manifest = export_bundle(str(slot_base), {"slots": trained, "rooms": tmp_path / "rooms"}, mode="switchable",
                             precision="fp32", out=tmp_path / "b", max_length=MAX_LENGTH)
    assert "mixed batch (bank)" in manifest.validation
    rt = Runtime(tmp_path / "b", intra_op_threads=1)
    texts = [EXAMPLE, "turn on the lamp", "keep the guest room at 19 degrees tonight"]
    rows = ["slots", "rooms", "slots"]
    mixed = rt.run(texts, adapters=rows)["logits"]
    assert [m.shape[-1] for m in mixed] == [len(SLOT_TAGS), 3, len(SLOT_TAGS)]
    for i, name in enumerate(rows):
        alone = rt.run(texts, name)["logits"][i]
        assert np.abs(mixed[i] - alone).max() <= PEFT_FP32_REL * max(1.0, np.abs(alone).max())
    together = rt.predict(texts, adapters=rows)
    for got, want in zip(together, [rt.predict([t], adapter=a)[0] for t, a in zip(texts, rows)]):
        assert [(w["label"], w["start"], w["end"]) for w in got["words"]] == \
            [(w["label"], w["start"], w["end"]) for w in want["words"]]
        assert [w["score"] for w in got["words"]] == pytest.approx([w["score"] for w in want["words"]], abs=1e-5)


def test_cli_refuses_sequence_only_flags_for_token_classification(tmp_path: Path, slot_base: Path, capsys) -> None:
    rc, _, err = cli(["train", "--task", "token-classification", "--base", slot_base, "--data", "builtin:slots:20",
                      "--qat", "int8", "--smooth", "0.5", "--out", tmp_path / "ad"], capsys)
    assert_one_line_error(rc, err, "--smooth applies to --task classification; drop it for --task token-classification")
    assert not (tmp_path / "ad").exists()


def test_add_adapter_joins_a_token_bundle_and_refuses_a_sequence_adapter(tmp_path: Path, slot_base: Path,
                                                                         trained: Path) -> None:
    from edgelora.exporters.add import add_adapters
    from edgelora.exporters.export import export_bundle
    from edgelora.model import AdapterModel

    export_bundle(str(slot_base), {"slots": trained}, mode="switchable", precision="fp32", out=tmp_path / "b",
                  max_length=MAX_LENGTH)
    model = TokenAdapterModel(load_base(slot_base)[0])
    model.add_adapter("rooms", LoraConfig(r=4), ["O", "B-room", "I-room"], quant=QuantConfig(weight_bits=7))
    randomize_adapters(model, seed=3)
    save_adapter(model, "rooms", tmp_path / "rooms")
    manifest = add_adapters(tmp_path / "b", {"rooms": tmp_path / "rooms"}, base=str(slot_base))
    assert "rooms" in manifest.adapter_names
    rt = Runtime(tmp_path / "b", intra_op_threads=1)
    feeds = rt.tokenize([EXAMPLE])
    ref = _torch_logits(slot_base, tmp_path / "rooms", feeds, None)
    assert np.abs(rt.run([EXAMPLE], "rooms")["logits"] - ref).max() <= PEFT_FP32_REL * max(1.0, np.abs(ref).max())

    sequence = AdapterModel(load_base(slot_base)[0])
    sequence.add_adapter("intent", LoraConfig(r=4), ["on", "off"])
    save_adapter(sequence, "intent", tmp_path / "intent")
    with pytest.raises(EdgeloraError, match="a sequence-classification adapter cannot join bundle .* of task "
                                            "token-classification"):
        add_adapters(tmp_path / "b", {"intent": tmp_path / "intent"}, base=str(slot_base))


def test_our_token_adapter_loads_in_peft_and_gives_our_logits(slot_base: Path, trained: Path) -> None:
    """Saved in PEFT's TOKEN_CLS layout (LoRA under the backbone, `classifier` in modules_to_save), our adapter
    loads with PeftModel.from_pretrained on AutoModelForTokenClassification and gives our fp32 logits."""
    import peft
    from transformers import AutoModelForTokenClassification

    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and "classifier" in config["modules_to_save"]
    task_model = AutoModelForTokenClassification.from_pretrained(slot_base, num_labels=len(SLOT_TAGS)).eval()
    theirs = peft.PeftModel.from_pretrained(task_model, trained).eval()
    tok = load_tokenizer(slot_base, MAX_LENGTH)
    enc = tok.encode_batch([EXAMPLE, "turn on the kitchen lights"])
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    ours = _torch_logits(slot_base, trained, feeds, None)
    with torch.no_grad():
        got = theirs(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(got - ours)[real].max() <= PEFT_FP32_REL * max(1.0, np.abs(ours).max())


def test_add_adapter_takes_a_stock_peft_token_cls_adapter(tmp_path: Path, peft_adapter) -> None:
    """A PEFT TOKEN_CLS adapter (its classifier under modules_to_save) joins a switchable token bundle and
    gives the logits it gives when exported with the bundle."""
    from edgelora.exporters.add import add_adapters
    from edgelora.exporters.export import export_bundle

    base_dir, adapter_dir, _ = peft_adapter
    export_bundle(str(base_dir), {"peft": adapter_dir}, mode="switchable", precision="fp32", out=tmp_path / "b",
                  max_length=MAX_LENGTH)
    manifest = add_adapters(tmp_path / "b", {"again": adapter_dir}, base=str(base_dir))
    assert manifest.entry("again").head == "per-token"
    rt = Runtime(tmp_path / "b", intra_op_threads=1)
    assert rt.labels("again") == rt.labels("peft")
    texts = [EXAMPLE, "turn on the kitchen lights"]
    np.testing.assert_allclose(rt.run(texts, "again")["logits"], rt.run(texts, "peft")["logits"], rtol=0, atol=1e-6)


def test_bench_compares_token_bundles_token_by_token(tmp_path: Path, slot_base: Path, trained: Path) -> None:
    """`bench` on token bundles: texts padded per chunk to different lengths still compare, one row per real
    token, and label agreement is the share of tokens whose tag equals the fp32 bundle's."""
    from edgelora.exporters.export import export_bundle
    from edgelora.runtime import bench

    for precision in ("fp32", "int8"):
        export_bundle(str(slot_base), {"slots": trained}, mode="merged", precision=precision,
                      out=tmp_path / precision, max_length=MAX_LENGTH)
    texts = [EXAMPLE, "lamp off", "turn on the kitchen lights in the guest room", "heat to 20"]
    out = bench.run_benchmark([str(tmp_path / "fp32"), str(tmp_path / "int8")], batches=(3,), seqs=(8,), rounds=1,
                              warmup=0, threads=1, data=(texts, ["O"] * len(texts)))
    rows = {r["label"]: r["fidelity"] for r in out["rows"]}
    fp32, int8 = (Runtime(tmp_path / p, intra_op_threads=1) for p in ("fp32", "int8"))
    want_tags = [np.concatenate([rt.run(texts[i : i + 3])["logits"][rt.tokenize(texts[i : i + 3])["attention_mask"]
                                                                    .astype(bool)].argmax(-1)
                                 for i in (0, 3)]) for rt in (fp32, int8)]
    assert rows["fp32"]["label_agreement"] == 1.0
    assert rows["int8"]["label_agreement"] == pytest.approx(float(np.mean(want_tags[0] == want_tags[1])))
    assert rows["int8"]["rows"] == int(fp32.tokenize(texts)["attention_mask"].sum())
    assert rows["int8"]["accuracy"] is None and "per token" in rows["int8"]["accuracy_note"]
    assert rows["int8"]["output"] == "logits" and 0.9 < rows["int8"]["worst_cosine"] <= 1.0


def test_add_adapter_names_an_unreadable_base_config(tmp_path: Path, peft_adapter) -> None:
    """The label names of a stock PEFT head come from the base's config.json: a broken one is a one-line error."""
    from edgelora.exporters.add import add_adapters
    from edgelora.exporters.export import export_bundle

    base_dir, adapter_dir, _ = peft_adapter
    export_bundle(str(base_dir), {"peft": adapter_dir}, mode="switchable", precision="fp32", out=tmp_path / "b",
                  max_length=MAX_LENGTH)
    broken = tmp_path / "broken-base"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EdgeloraError, match=r"broken-base/config.json: not a readable JSON config; pass base=DIR"):
        add_adapters(tmp_path / "b", {"again": adapter_dir}, base=str(broken), check=False)
