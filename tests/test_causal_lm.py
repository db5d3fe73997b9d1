"""Causal-LM adapters: the loss mask, training (loss falls, resume is bit-identical), blockwise int8 QAT, PEFT
CAUSAL_LM interop both ways, data errors, the synthetic generation tasks and their scores.

Bases are tiny random Llama (grouped-query attention, tied embeddings) and Qwen2 (q/k/v bias) models with a
small byte-level BPE tokenizer trained here on the tasks' own text, with a ChatML chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgelora import causal_data, generation_tasks
from edgelora.causal_data import ChatExample, encode_example, tokenize_examples
from edgelora.causal_lm import IGNORE_INDEX, CausalLMAdapterModel, token_loss
from edgelora.causal_train import causal_loop_task, decoder_quant, evaluate_generation, load_tokenizer, train_causal_lm
from edgelora.config import LoraConfig, QuantConfig
from edgelora.errors import EdgeloraError
from edgelora.fake_quant import fake_quantize_activation_blockwise, fake_quantize_weight_blockwise
from edgelora.peft_format import load_adapter, save_adapter
from edgelora.train import CheckpointConfig, TrainConfig, _adapter_state, run_loop
from tiny_decoder import lm_dir, make_lm, train_chat_tokenizer

ARCHS = ("llama", "qwen2")
LOGIT_TOL = 1e-5  # fp32, same weights, only summation order may differ between PEFT's layer and ours


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_chat_tokenizer(tmp_path_factory.mktemp("chat_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def randomize_lora(model, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapted_layers():
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


def batch(tok, rows, max_length=128):
    t = tokenize_examples(tok, rows, max_length)
    return causal_data.collate(t, range(len(t)), causal_data.pad_id(tok))


ROWS = [ChatExample.from_prompt(p, c) for p, c in generation_tasks.make_pairs("home-json", 6, 1)]


# --- the loss mask ----------------------------------------------------------------------------------------------
def test_labels_cover_exactly_each_answer_and_its_end_of_turn(tok):
    example = ChatExample((("system", "be brief"), ("user", "turn on the kitchen lights"),
                           ("assistant", '{"device": "light"}'), ("user", "and the garage?"), ("assistant", "done")))
    ids, labels = encode_example(tok, example)
    text = tok.apply_chat_template(example.as_dicts(), tokenize=False)
    assert tok.decode(ids) == text  # the ids are the rendered chat, nothing added
    labelled = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in labelled)
    # Token by token: the labelled runs are the two answers, each followed by <|im_end|>, and nothing else.
    runs, run = [], []
    for i in range(len(ids)):
        if labels[i] != IGNORE_INDEX:
            run.append(ids[i])
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    assert [tok.decode(r) for r in runs] == ['{"device": "light"}<|im_end|>', "done<|im_end|>"]
    assert sum(y != IGNORE_INDEX for y in labels) == sum(len(r) for r in runs)


def test_prompt_completion_without_chat_template_is_plain_text_ending_in_eos(tok_dir):
    plain = load_tokenizer(tok_dir)
    plain.chat_template = None
    ids, labels = encode_example(plain, ChatExample.from_prompt("lights on:", ' {"x": 1}'))
    assert plain.decode(ids) == 'lights on: {"x": 1}<|im_end|>'
    assert plain.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX]) == ' {"x": 1}<|im_end|>'
    with pytest.raises(EdgeloraError, match="no chat template"):
        encode_example(plain, ChatExample((("system", "s"), ("user", "u"), ("assistant", "a"))))


def test_truncation_is_counted_and_rows_without_answer_dropped(tok):
    full = [len(encode_example(tok, r)[0]) for r in ROWS]
    cut = min(full) - 3  # every row cut inside its answer
    rows = tokenize_examples(tok, ROWS, cut)
    assert (rows.truncated, rows.dropped, len(rows)) == (len(ROWS), 0, len(ROWS))
    assert all(len(ids) == cut for ids in rows.input_ids)
    first_label = min(next(i for i, y in enumerate(encode_example(tok, r)[1]) if y != IGNORE_INDEX) for r in ROWS)
    rows = tokenize_examples(tok, ROWS, first_label)  # the answers all fall off
    assert (rows.truncated, rows.dropped, len(rows)) == (len(ROWS), len(ROWS), 0)


@pytest.mark.parametrize("line, match", [
    ("{not json", r"rows\.jsonl:2: invalid JSON"),
    ("[1, 2]", r"rows\.jsonl:2: expected a JSON object"),
    ('{"text": "a"}', r"rows\.jsonl:2: row has neither"),
    ('{"prompt": "a"}', r"rows\.jsonl:2: \"prompt\" and \"completion\" must both be strings"),
    ('{"prompt": "a", "completion": "  "}', r"rows\.jsonl:2: \"completion\" is empty"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', r"rows\.jsonl:2: messages\[0\] has role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"rows\.jsonl:2: the last message must be"),
    ('{"messages": [{"role": "user"}]}', r"rows\.jsonl:2: messages\[0\] must be an object with a string"),
    ('{"messages": []}', r"rows\.jsonl:2: \"messages\" must be a non-empty list"),
])
def test_malformed_rows_are_one_line_errors_naming_file_and_line(tmp_path, line, match):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    with pytest.raises(EdgeloraError, match=match) as info:
        causal_data.read_jsonl(path)
    assert "\n" not in str(info.value)


def test_data_sources_missing_empty_and_unknown_builtin(tmp_path):
    with pytest.raises(EdgeloraError, match="no such file"):
        causal_data.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(EdgeloraError, match="empty.jsonl: no rows"):
        causal_data.read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(EdgeloraError, match="unknown builtin generation task"):
        causal_data.load_splits("builtin:poetry:10")
    with pytest.raises(EdgeloraError, match="not a positive integer"):
        causal_data.load_splits("builtin:home-json:ten")


def test_file_split_holds_out_a_seeded_fraction(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(10)))
    train, held = causal_data.load_splits(path, seed=3, eval_fraction=0.2)
    assert (len(train), len(held)) == (8, 2)
    assert {r.reference for r in train}.isdisjoint({r.reference for r in held})
    assert causal_data.load_splits(path, seed=3)[1] == held


# --- the model --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_equals_transformers_own_and_untrained_adapter_is_the_base(arch, tok):
    base = make_lm(arch, 400)
    feeds = batch(tok, ROWS[:3])
    with torch.no_grad():
        reference = base(**feeds)
        model = CausalLMAdapterModel(base)
        model.add_adapter("a", LoraConfig(r=4))
        loss, logits = model(**feeds)
    assert torch.equal(logits, reference.logits)  # B starts at zero: the model is the base
    torch.testing.assert_close(loss, reference.loss, rtol=1e-6, atol=0)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in model.adapted_layers()})
    assert targets == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_token_loss_counts_only_labelled_next_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [1, 2, IGNORE_INDEX, 6, 0]])
    summed, count = token_loss(logits, labels)
    pairs = [(0, 0, 3), (0, 1, 4), (1, 0, 2), (1, 2, 6), (1, 3, 0)]  # (row, position, next token)
    expected = sum(-F.log_softmax(logits[b, t], -1)[y] for b, t, y in pairs)
    assert count.item() == len(pairs)
    torch.testing.assert_close(summed, expected)


def test_several_adapters_one_active_and_errors(tok):
    model = CausalLMAdapterModel(make_lm("llama", 400))
    model.add_adapter("a", LoraConfig(r=4))
    model.add_adapter("b", LoraConfig(r=2, include_mlp=True))
    randomize_lora(model)
    feeds = batch(tok, ROWS[:2])
    with torch.no_grad():
        out = {n: model.set_adapter(n) or model(feeds["input_ids"], feeds["attention_mask"])[0] for n in ("a", "b", None)}
    assert not torch.allclose(out["a"], out["b"]) and not torch.allclose(out["a"], out[None])
    assert any(n.endswith("mlp.down_proj") for n, l in model.adapted_layers() if "b" in l.lora_A)
    with pytest.raises(EdgeloraError, match="takes no labels"):
        model.add_adapter("c", LoraConfig(), labels=["x", "y"])
    with pytest.raises(EdgeloraError, match="no language-model head"):
        import transformers as tf

        CausalLMAdapterModel(tf.LlamaModel(make_lm("llama", 400).config))
    model.delete_adapter("b")
    assert sorted(model.configs) == ["a"]


def test_hf_trainer_trains_only_the_active_lora(tmp_path, tok):
    import transformers

    torch.set_num_threads(1)
    rows = tokenize_examples(tok, [ChatExample.from_prompt(p, c) for p, c in generation_tasks.make_pairs("home-json", 32, 0)])
    pad = causal_data.pad_id(tok)
    model = CausalLMAdapterModel(make_lm("qwen2", 400))
    model.add_adapter("other", LoraConfig(r=2))
    model.add_adapter("a", LoraConfig(r=8, include_mlp=True))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4, learning_rate=1e-2,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, remove_unused_columns=False,
        dataloader_pin_memory=False, logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=list(range(len(rows))),
                                   data_collator=lambda index: causal_data.collate(rows, index, pad))
    assert trainer.label_names == ["labels"]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert moved and all(".lora_A.a." in k or ".lora_B.a." in k for k in moved), sorted(moved)[:5]


# --- QAT --------------------------------------------------------------------------------------------------------
def test_quant_config_weight_block_is_validated():
    assert QuantConfig(weight_block=32).weight_block == 32
    for bad, match in ((24, "power of two"), (8, "power of two"), (True, "power of two")):
        with pytest.raises(EdgeloraError, match=match):
            QuantConfig(weight_block=bad)
    with pytest.raises(EdgeloraError, match="needs weight_bits=8"):
        QuantConfig(weight_block=32, weight_bits=7)
    with pytest.raises(EdgeloraError, match="not 'static'"):
        QuantConfig(weight_block=32, activations="static")
    with pytest.raises(EdgeloraError, match="blockwise int8"):
        decoder_quant(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_qat_layer_computes_the_quantizers_merged_weight(arch, tok):
    model = CausalLMAdapterModel(make_lm(arch, 400))
    model.add_adapter("a", LoraConfig(r=4), quant=QuantConfig(weight_block=32))
    randomize_lora(model)
    names = dict(model.adapted_layers())
    assert "lm_head" in names and names["lm_head"].quant.weight_block == 32  # every linear, LM head included
    layer = names["model.layers.0.self_attn.q_proj"]
    merged = layer.base.weight + layer.lora_delta("a")
    torch.testing.assert_close(layer._fake_quant_weight(merged), fake_quantize_weight_blockwise(merged, 32), rtol=0, atol=0)
    x = torch.randn(3, 5, layer.in_features)
    expected = F.linear(fake_quantize_activation_blockwise(x, 32), fake_quantize_weight_blockwise(merged, 32),
                        layer.base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # A row's output does not depend on its batch-mates (per-row activation blocks).
    torch.testing.assert_close(layer(x[1:2]), layer(x)[1:2], rtol=0, atol=0)


def test_int8_residual_init_fits_the_blockwise_rounding_error():
    model = CausalLMAdapterModel(make_lm("llama", 400))
    model.add_adapter("a", LoraConfig(r=8, init="int8-residual", include_mlp=True),
                      quant=QuantConfig(weight_block=32, mode="switchable"))
    layer = dict(model.adapted_layers())["model.layers.0.mlp.down_proj"]  # 64 inputs: two blocks per row
    w0 = layer.base.weight
    q = fake_quantize_weight_blockwise(w0, 32)
    # The branch absorbs the blockwise error (measured 0.69 of it left; fitting the per-channel error leaves 1.00).
    assert (q + layer.lora_delta("a") - w0).norm() < 0.8 * (q - w0).norm()


# --- training ---------------------------------------------------------------------------------------------------
def _loop(model, tok, rows, eval_rows, config, **kwargs):
    train = tokenize_examples(tok, rows, 96)
    held = tokenize_examples(tok, eval_rows, 96)
    return run_loop(model, "a", causal_loop_task(model, "a", tok, train, held, config), config, **kwargs)


@pytest.mark.parametrize("arch, qat", [("llama", False), ("qwen2", False), ("llama", True)])
def test_a_few_steps_reduce_the_loss(arch, qat, tok):
    torch.set_num_threads(1)
    pairs = generation_tasks.make_pairs("home-json", 32, 0)
    rows = [ChatExample.from_prompt(p, c) for p, c in pairs]
    model = CausalLMAdapterModel(make_lm(arch, 400))
    model.add_adapter("a", LoraConfig(r=8, include_mlp=True), quant=decoder_quant() if qat else None)
    result = _loop(model, tok, rows, rows[:8], TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup_ratio=0.0))
    losses = [h["train_loss"] for h in result.history]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]


class _Stop(Exception):
    pass


def test_resume_is_bit_identical(tmp_path, tok):
    torch.set_num_threads(1)
    rows = [ChatExample.from_prompt(p, c) for p, c in generation_tasks.make_pairs("meeting", 24, 0)]
    config = TrainConfig(epochs=2, batch_size=8, lr=5e-3)

    def fresh():
        model = CausalLMAdapterModel(make_lm("llama", 400))
        model.add_adapter("a", LoraConfig(r=4, dropout=0.1), quant=decoder_quant())
        return model

    whole = fresh()
    _loop(whole, tok, rows, rows[:4], config)

    def stop_at_4(line: str) -> None:
        if "step 4/" in line:
            raise _Stop
    interrupted = fresh()
    with pytest.raises(_Stop):
        _loop(interrupted, tok, rows, rows[:4], config, progress=stop_at_4, checkpoint=CheckpointConfig(tmp_path, every=2))
    resumed = fresh()
    _loop(resumed, tok, rows, rows[:4], config, checkpoint=CheckpointConfig(tmp_path, resume=True))
    want, got = _adapter_state(whole, "a"), _adapter_state(resumed, "a")
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)
    other = CausalLMAdapterModel(make_lm("llama", 400))
    other.add_adapter("a", LoraConfig(r=8))
    with pytest.raises(EdgeloraError, match="another run"):
        _loop(other, tok, rows, rows[:4], config, checkpoint=CheckpointConfig(tmp_path, resume=True))


def test_train_causal_lm_saves_a_causal_adapter_and_reports(tmp_path, tok_dir):
    torch.set_num_threads(1)
    base = lm_dir(tmp_path, "llama", tok_dir)
    report = train_causal_lm(base, "builtin:home-json:40", out=tmp_path / "out", epochs=1, batch_size=8, qat="int8",
                             eval_generate=3, max_new_tokens=4)
    assert (report["train_rows"], report["eval_rows"], report["steps"]) == (32, 8, 4)
    assert report["generation"]["rows"] == 3 and len(report["generation"]["predictions"]) == 3
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["edgelora"]["task"] == "causal-lm"
    assert config["edgelora"]["quantization"]["weight_block"] == 32
    with pytest.raises(EdgeloraError, match="qat='int4'"):
        train_causal_lm(base, "builtin:home-json:40", out=tmp_path / "o2", qat="int4")
    with pytest.raises(EdgeloraError, match="exceeds the base's 256 positions"):
        train_causal_lm(base, "builtin:home-json:40", out=tmp_path / "o3", max_length=1000)


# --- PEFT interop -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ours_loads_in_peft_with_our_logits(arch, tmp_path, tok):
    from peft import PeftModel

    model = CausalLMAdapterModel(make_lm(arch, 400))
    model.add_adapter("a", LoraConfig(r=4, alpha=8, include_mlp=True))
    randomize_lora(model)
    feeds = batch(tok, ROWS[:3])
    with torch.no_grad():
        ours = model(feeds["input_ids"], feeds["attention_mask"])[0]
        with model.disable_adapter():
            plain = model(feeds["input_ids"], feeds["attention_mask"])[0]
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the output
    save_adapter(model, "a", tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(make_lm(arch, 400), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_peft_causal_lm_lora_loads_in_ours_with_peft_logits(arch, tmp_path, tok):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    peft_model = get_peft_model(make_lm(arch, 400), PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval()
    feeds = batch(tok, ROWS[:3])
    with torch.no_grad():
        theirs = peft_model(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"]).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"]).logits
    assert (theirs - plain).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "peft")
    model = CausalLMAdapterModel(make_lm(arch, 400))
    name = load_adapter(model, tmp_path / "peft", "stock")
    with torch.no_grad():
        ours = model(feeds["input_ids"], feeds["attention_mask"])[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGIT_TOL)
    assert name == "stock" and sum("stock" in layer.lora_A for _, layer in model.adapted_layers()) == 8


def test_adapter_of_another_task_is_refused(tmp_path, tok):
    from conftest import make_base

    from edgelora.model import AdapterModel

    model = CausalLMAdapterModel(make_lm("llama", 400))
    model.add_adapter("a", LoraConfig(r=4))
    save_adapter(model, "a", tmp_path / "causal")
    encoder = AdapterModel(make_base("llama"))
    with pytest.raises(EdgeloraError, match="a causal-lm adapter cannot load into a classification model"):
        load_adapter(encoder, tmp_path / "causal", check_base=False)


# --- tasks and scores -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", generation_tasks.GENERATION_TASKS)
def test_tasks_are_seeded_and_held_out_is_disjoint_with_unseen_phrasings(task):
    train = generation_tasks.make_pairs(task, 400, 0)
    assert train == generation_tasks.make_pairs(task, 400, 0) and train != generation_tasks.make_pairs(task, 400, 1)
    held = generation_tasks.make_pairs(task, 200, 0, "eval", exclude={p for p, _ in train})
    assert {p for p, _ in train}.isdisjoint({p for p, _ in held})
    heldout_words = {"porch", "guest room", "kindly", "Zoe", "Rahul", "pricing", "offsite", "Saturday"}
    seen = " ".join(p + c for p, c in train)
    assert not any(w in seen for w in heldout_words)
    assert any(w in p + c for p, c in held for w in heldout_words)
    scores = generation_tasks.score(task, [c for _, c in held], [c for _, c in held])
    assert scores["exact_match"] == scores["field_accuracy"] == 1.0


def test_home_json_scores_fields_and_counts_unparsable_as_all_wrong():
    ref = generation_tasks.home_json({"device": "light", "room": "kitchen", "action": "set", "value": 30})
    preds = ['{"device":"light","room":"kitchen","action":"set","value":30}',  # other whitespace: exact
             '{"device": "light", "room": "hallway", "action": "set", "value": 30}',  # one field wrong
             '{"device": "light", "room": "kitchen"',  # unparsable
             '["light"]']  # JSON but not an object
    s = generation_tasks.score("home-json", preds, [ref] * 4)
    assert s["exact_match"] == 0.25
    assert s["field_accuracy"] == pytest.approx((4 + 3) / 16)
    assert s["field_room"] == 0.25 and s["field_device"] == 0.5 and s["parsable"] == 0.5


def test_meeting_scores_the_fixed_sentence():
    ref = generation_tasks.meeting_note({"person": "Anna", "day": "Friday", "time": "15:00", "topic": "the budget"})
    s = generation_tasks.score("meeting", [ref, ref.replace("15:00", "03:00"), "Anna, Friday, 3pm"], [ref] * 3)
    assert s["exact_match"] == pytest.approx(1 / 3) and s["field_time"] == pytest.approx(1 / 3)
    assert s["field_person"] == pytest.approx(2 / 3)
    with pytest.raises(EdgeloraError, match="one per reference"):
        generation_tasks.score("meeting", [ref], [])


def test_evaluate_generation_decodes_greedily_per_row(tok):
    torch.set_num_threads(1)
    model = CausalLMAdapterModel(make_lm("llama", 400))
    rows = ROWS[:3]
    together = evaluate_generation(model, tok, rows, max_new_tokens=5, task="home-json", batch_size=3)
    alone = [evaluate_generation(model, tok, [r], max_new_tokens=5, batch_size=1)["predictions"][0] for r in rows]
    assert together["predictions"] == alone  # left padding changes no row's answer
    assert together["rows"] == 3 and together["exact_match"] == 0.0


# --- the real model ---------------------------------------------------------------------------------------------
# SmolLM2 on home-json, 80 rows (10 steps of 8), lr 5e-3, 1 thread on a shared 2-core machine: held-out exact match
# 0.0 for the plain base (it never writes the schema) and 0.5 after training (field accuracy 0.84) in
# benchmarks/causal_train_speed.py; requiring +0.25 leaves room for run-to-run change and still fails a LoRA that
# learned nothing. ~2.5 minutes on a busy 2-core machine.
SMOLLM2_MIN_GAIN = 0.25


@pytest.mark.slow
def test_smollm2_lora_improves_held_out_exact_match(tmp_path):
    data, held_source = "builtin:home-json:80", "builtin:home-json:16"
    model = CausalLMAdapterModel.from_base("smollm2")
    tok = load_tokenizer(model.base_path)
    _, held = causal_data.load_splits(data, held_source)
    plain = evaluate_generation(model, tok, held, 32, task="home-json")
    del model
    report = train_causal_lm("smollm2", data, held_source, out=tmp_path / "home", epochs=1, batch_size=8, lr=5e-3,
                             max_length=96, eval_generate=None, max_new_tokens=32)
    assert report["steps"] == 10 and report["generation"]["rows"] == len(held) == 16
    assert report["generation"]["exact_match"] >= plain["exact_match"] + SMOLLM2_MIN_GAIN, (report["generation"], plain)
    assert report["generation"]["field_accuracy"] > plain["field_accuracy"]


# --- training meets export --------------------------------------------------------------------------------------
# Our fake-quant model against the decoder export's int8 graph (branch `decoder`; skipped until it is merged):
# measured 1.8e-7 apart on logits of size ~0.6 (fp32: 1.2e-7). A flipped int8 rounding moves a logit by ~1e-3
# of its scale; a quantizer that differs (per-channel vs blockwise, another rounding) moves it far more.
BUNDLE_ATOL = 1e-4


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_qat_adapter_exports_to_a_bundle_computing_our_logits(precision, tmp_path, tok_dir):
    decoder_export = pytest.importorskip("edgelora.exporters.decoder_export")
    import onnxruntime as ort

    torch.set_num_threads(1)
    base = lm_dir(tmp_path, "llama", tok_dir)
    train_causal_lm(base, "builtin:home-json:32", out=tmp_path / "adapter", epochs=1, lr=1e-2, qat="int8", eval_generate=0)
    decoder_export.export_decoder(str(base), tmp_path / "bundle", adapter=tmp_path / "adapter", precision=precision)
    model = CausalLMAdapterModel.from_base(str(base))
    load_adapter(model, tmp_path / "adapter")
    if precision == "fp32":
        model.set_quant(None)
    tok = load_tokenizer(base)
    text = tok.apply_chat_template([{"role": "user", "content": "dim the kitchen lights to 30 percent"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = np.array([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ours = model(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long))[0].numpy()
        with model.disable_adapter():
            plain = model(torch.from_numpy(ids), torch.ones(ids.shape, dtype=torch.long))[0].numpy()
    assert np.abs(ours - plain).max() > 1e-3  # the trained adapter changes the output
    g = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["generation"]
    feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64), "position_ids": np.arange(ids.shape[1])[None]}
    for i in range(g["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, g["num_kv_heads"], 0, g["head_dim"]), np.float32)
    (theirs,) = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx")).run(["logits"], feeds)
    assert np.abs(theirs - ours).max() <= BUNDLE_ATOL
