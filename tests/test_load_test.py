"""benchmarks/load_test.py end to end on a tiny int8 switchable decoder bundle with 4 adapters: `edgelora serve`
starts, every streamed answer at 1 and 4 concurrent clients (adapters mixed in one batch) equals its solo
greedy run, hung-up clients and the memory phase leave no errors, and the report says so in JSON and markdown.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from decoder_fixture import tiny_llama
from tiny_decoder import train_chat_tokenizer

from edgelora.exporters.decoder_export import export_decoder

REPO = Path(__file__).resolve().parent.parent
VOCAB = 400  # the chat tokenizer's
ADAPTERS = {"a": (1, 4, ["q_proj", "v_proj"]), "b": (2, 2, ["q_proj", "k_proj", "o_proj"]),
            "c": (3, 4, ["v_proj", "o_proj"]), "d": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"])}
LEAK_REQUESTS = 30


def random_lora(base: torch.nn.Module, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A PEFT CAUSAL_LM LoRA with random A and B wide enough to change the greedy tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                           task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_load_test_reports_no_cross_talk_on_a_switchable_bundle(tmp_path: Path) -> None:
    base = tiny_llama(VOCAB, seed=3, context=256)
    adapters = {name: random_lora(base, tmp_path / name, *spec) for name, spec in ADAPTERS.items()}
    bundle = tmp_path / "sw_int8"
    export_decoder(base, bundle, adapters=adapters, mode="switchable", precision="int8",
                   tokenizer_dir=train_chat_tokenizer(tmp_path / "tok"))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "load_test.py"), str(bundle),
                           "--concurrency", "1,4", "--requests", "8", "--leak-requests", str(LEAK_REQUESTS),
                           "--leak-concurrency", "4", "--leak-max-tokens", "4", "--prompts", "1", "--max-tokens",
                           "8", "--threads", "1", "--time-cap-s", "300", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "load_test.json").read_text())
    assert report["adapters"] == list(ADAPTERS)
    by_prompt: dict[str, set[str]] = {}
    for answer in report["solo"]["answers"]:
        by_prompt.setdefault(answer["prompt"], set()).add(answer["text"])
    assert len(by_prompt) == 2 and all(len(texts) >= 3 for texts in by_prompt.values()), \
        "the adapters answer differently, so equal answers are evidence of no cross-talk"
    for level in report["levels"]:
        assert (level["complete"], level["equal_to_solo"], level["error_count"]) == (8, 8, 0), level
    leak = report["leak"]
    assert leak["requests"] == LEAK_REQUESTS and leak["hung_up"] == LEAK_REQUESTS // 10
    assert leak["error_count"] == 0 and leak["equal_to_solo"] == leak["complete"] == LEAK_REQUESTS - leak["hung_up"]
    assert 0 < leak["rss_mb"]["leak_start"] and leak["rss_flat"]
    after = report["server_metrics_after"]
    assert after["edgelora_active_requests"] == after["edgelora_kv_cache_bytes"] == 0, "hung-up rows were freed"
    table = (tmp_path / "out" / "load_test.md").read_text()
    assert "| 4 | 8 |" in table and "flat" in table and "0 active requests" in table
