"""Claims about the bundle format (edgelora.runtime.bundle): manifests round-trip to the same JSON, old ones
still load, decoder manifests are checked field by field, newer formats are refused, and reading needs no torch.

The bundles here hold placeholder files: the format's checks (fields, sha256s) never load the model.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.errors import EdgeloraError
from edgelora.runtime.bundle import (
    CAUSAL_LM,
    EMBEDDINGS,
    FORMAT_VERSION,
    SEQUENCE_CLASSIFICATION,
    AdapterEntry,
    BaseInfo,
    Generation,
    Manifest,
    TokenizerSpec,
    decoder_inputs,
    decoder_outputs,
    read_manifest,
    write_bundle,
)

LAYERS = 2


def encoder_manifest(mode: str = "switchable", labels: tuple[str, ...] = ("neg", "pos")) -> Manifest:
    entries = (AdapterEntry.create("sentiment", kind="lora", labels=labels, switchable=mode == "switchable",
                                   source_sha256="ab" * 32),)
    return Manifest(mode=mode, precision="fp32", task=SEQUENCE_CLASSIFICATION if labels else EMBEDDINGS,
                    base=BaseInfo(name="tiny", fingerprint="0" * 64, architecture="bert", hidden_size=8),
                    inputs=("input_ids", "attention_mask"), outputs=("logits", "embeddings"),
                    tokenizer=TokenizerSpec(file="tokenizer.json", max_length=16), adapters=entries,
                    validation={"sentiment": {"vs_fp32_torch": {"logits": {"max_abs_diff": 1e-6}}}})


def decoder_manifest() -> Manifest:
    generation = Generation(num_layers=LAYERS, num_kv_heads=3, head_dim=64, context_length=2048,
                            eos_token_ids=(2,), bos_token_id=1, pad_token_id=None,
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    entries = (AdapterEntry.create("chat", kind="lora", labels=(), switchable=True),)
    return Manifest(mode="switchable", precision="int8", task=CAUSAL_LM, base=BaseInfo(name="smollm2"),
                    inputs=decoder_inputs(LAYERS), outputs=decoder_outputs(LAYERS),
                    tokenizer=TokenizerSpec(file="tokenizer.json", max_length=2048), adapters=entries,
                    generation=generation)


def make(tmp_path: Path, manifest: Manifest, name: str = "b") -> Path:
    """Write `manifest` with placeholder model and adapter files and a tokenizer directory, as exporters do."""
    tok = tmp_path / f"{name}-tokenizer"
    tok.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tok / file).write_text(f"{file}\n")
    writers = {"model.onnx": lambda p: p.write_bytes(b"graph")}
    for entry in manifest.adapters:
        if entry.file:
            writers[entry.file] = lambda p, n=entry.name: p.write_bytes(n.encode())
    out = tmp_path / name
    write_bundle(out, manifest, writers, tok)
    return out


def edited(bundle: Path, edit) -> Path:
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    (bundle / "manifest.json").write_text(json.dumps(data))
    return bundle


@pytest.mark.parametrize("make_manifest", [encoder_manifest, decoder_manifest], ids=["encoder", "decoder"])
def test_a_manifest_round_trips_to_identical_json(make_manifest, tmp_path: Path) -> None:
    bundle = make(tmp_path, make_manifest())
    text = (bundle / "manifest.json").read_text()
    manifest = read_manifest(bundle)
    assert manifest.to_json() == text
    assert Manifest.from_dict(json.loads(text)) == manifest


def test_written_manifests_carry_task_files_and_sha256s(tmp_path: Path) -> None:
    manifest = read_manifest(make(tmp_path, encoder_manifest()))
    assert manifest.task == SEQUENCE_CLASSIFICATION and manifest.format_version == 1
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "adapters/sentiment.onnx_adapter"}
    assert manifest.adapters[0].sha256 == manifest.files["adapters/sentiment.onnx_adapter"]
    assert manifest.adapters[0].labels == ("neg", "pos")


def test_decoder_bundles_are_format_version_2_with_the_chat_template_files(tmp_path: Path) -> None:
    bundle = make(tmp_path, decoder_manifest())
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["format_version"] == 2 and data["task"] == CAUSAL_LM
    assert {"tokenizer_config.json", "chat_template.jinja"} <= set(data["files"])
    assert data["adapters"][0]["labels"] == []
    generation = read_manifest(bundle).generation
    assert generation.eos_token_ids == (2,) and generation.num_kv_heads == 3 and generation.pad_token_id is None


def test_encoder_bundles_copy_only_the_tokenizer(tmp_path: Path) -> None:
    files = read_manifest(make(tmp_path, encoder_manifest())).files
    assert "tokenizer_config.json" not in files and "chat_template.jinja" not in files


@pytest.mark.parametrize(("labels", "task"), [(("neg", "pos"), SEQUENCE_CLASSIFICATION), ((), EMBEDDINGS)])
def test_a_manifest_from_before_task_loads_with_the_inferred_task(labels, task, tmp_path: Path) -> None:
    bundle = edited(make(tmp_path, encoder_manifest(labels=labels)), lambda m: m.pop("task"))
    assert "task" not in json.loads((bundle / "manifest.json").read_text())
    assert read_manifest(bundle).task == task


def test_a_manifest_of_a_newer_format_is_refused_with_the_upgrade_line(tmp_path: Path) -> None:
    bundle = edited(make(tmp_path, encoder_manifest()), lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(EdgeloraError, match=rf"^\S+manifest\.json: written by a newer edgelora \(format_version 3, "
                                            rf"this one reads up to 2\); upgrade edgelora$"):
        read_manifest(bundle)


def _set(key: str, value):
    return lambda m: m["generation"].update({key: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("generation"), r"generation is None, expected a mapping for task 'causal-lm'"),
        (lambda m: m["generation"].pop("num_kv_heads"), r"generation\.num_kv_heads is 'missing', expected a positive"),
        (_set("num_layers", 0), r"generation\.num_layers is 0, expected a positive integer"),
        (_set("head_dim", "64"), r"generation\.head_dim is '64', expected a positive integer"),
        (_set("eos_token_ids", [1.5]), r"generation\.eos_token_ids is \[1\.5\], expected a list of token ids"),
        (_set("eos_token_ids", 2), r"generation\.eos_token_ids is 2, expected a list of token ids"),
        (_set("bos_token_id", -1), r"generation\.bos_token_id is -1, expected a token id or null"),
        (_set("chat_template", ["x"]), r"generation\.chat_template is \['x'\], expected a Jinja template string"),
        (_set("num_layers", 3), r"a causal-lm bundle of 3 layers lacks inputs/outputs \['past_key_values\.2\.key'"),
        (lambda m: m.update(format_version=1), r"task 'causal-lm' needs format_version 2, found 1"),
        (lambda m: m.update(task="translation"), r"task is 'translation', expected 'sequence-classification' or"),
    ],
    ids=["no-generation", "missing-field", "zero-layers", "string", "no-eos", "eos-not-list", "negative-id",
         "template-not-text", "cache-inputs", "old-version", "unknown-task"],
)
def test_a_bad_decoder_manifest_gives_one_line(edit, message, tmp_path: Path) -> None:
    bundle = edited(make(tmp_path, decoder_manifest()), edit)
    with pytest.raises(EdgeloraError, match=r"^\S+manifest\.json: " + message + r".*; re-export the bundle$") as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value)


def test_an_encoder_manifest_with_a_generation_record_is_refused(tmp_path: Path) -> None:
    bundle = edited(make(tmp_path, encoder_manifest()), lambda m: m.update(generation={"num_layers": 1}))
    with pytest.raises(EdgeloraError, match=r"generation is \{'num_layers': 1\}, expected null: only task 'causal-lm'"):
        read_manifest(bundle)


def test_unknown_keys_are_kept(tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["notes"] = {"by": "a later edgelora"}
        m["adapters"][0]["dataset"] = "sst2"

    manifest = read_manifest(edited(make(tmp_path, encoder_manifest()), edit))
    assert manifest.extra == {"notes": {"by": "a later edgelora"}}
    assert manifest.to_dict()["adapters"][0]["dataset"] == "sst2"
    assert dataclasses.replace(manifest, files={}).to_dict()["notes"] == {"by": "a later edgelora"}


def test_the_writer_refuses_a_manifest_the_reader_would_refuse(tmp_path: Path) -> None:
    no_generation = dataclasses.replace(decoder_manifest(), generation=None)
    with pytest.raises(EdgeloraError, match=r"manifest\.json: generation is None, expected a mapping for task"):
        make(tmp_path, no_generation)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["", "../up", "a b", "x/y"])
def test_an_adapter_name_that_is_no_file_name_is_refused(name: str) -> None:
    with pytest.raises(EdgeloraError, match=r"adapter name .* must be letters, digits, '_' or '-'"):
        AdapterEntry.create(name, kind="lora", labels=(), switchable=True)


def test_reading_a_bundle_never_imports_torch(tmp_path: Path) -> None:
    bundle = make(tmp_path, decoder_manifest())
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgelora.runtime.bundle import read_manifest\n"
            f"m = read_manifest({str(bundle)!r})\n"
            "assert m.task == 'causal-lm' and sys.modules['torch'] is None\n"
            "print(m.generation.num_layers)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(LAYERS)
