"""benchmarks/decoder_ab.py refuses a bad variant in one line naming it and the fix, before any child runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decoder_ab  # noqa: E402


def _bundle(root: Path, attention: str) -> Path:
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"graph": {"attention": attention}}))
    return root


@pytest.mark.parametrize("opts, message", [
    (":keep=2,kv=shared", None),
    (":keep", "option 'keep'; options are keep=N and kv=copy|shared"),
    (":spin=1", "option 'spin=1'; options are keep=N and kv=copy|shared"),
    (":keep=two", "keep=two; pass a count of positions"),
    (":kv=paged", "kv=paged; pass kv=copy or kv=shared"),
])
def test_variants_are_checked_before_timing(tmp_path: Path, opts: str, message: str | None, capsys) -> None:
    gqa = _bundle(tmp_path / "gqa", "gqa")
    parser = argparse.ArgumentParser()
    if message is None:
        assert decoder_ab.variant(parser, f"{gqa}{opts}") == (str(gqa), ("2", "shared"))
        return
    with pytest.raises(SystemExit):
        decoder_ab.variant(parser, f"{gqa}{opts}")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{gqa}{opts}: {message}" in err


def test_a_shared_cache_needs_a_gqa_bundle_and_a_bundle_needs_a_manifest(tmp_path: Path, capsys) -> None:
    invariant = _bundle(tmp_path / "inv", "invariant")
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        decoder_ab.variant(parser, f"{invariant}:kv=shared")
    assert "kv=shared needs a bundle exported with attention='gqa'; drop kv=shared" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decoder_ab.variant(parser, str(tmp_path / "nowhere"))
    assert f"{tmp_path / 'nowhere' / 'manifest.json'} not found; pass a decoder bundle directory" in capsys.readouterr().err


def test_decoder_loops_names_what_it_needs(tmp_path: Path, capsys) -> None:
    """benchmarks/decoder_loops.py (ours and ORT GenAI's graph in one loop): each missing input is one line."""
    import decoder_loops

    with pytest.raises(SystemExit):
        decoder_loops.main(["--ours", str(tmp_path), "--genai", str(tmp_path)])
    assert f"--ours {tmp_path}: no manifest.json there; pass a bundle exported with attention='gqa'" in capsys.readouterr().err
    inv = _bundle(tmp_path / "inv", "invariant")
    with pytest.raises(SystemExit):
        decoder_loops.main(["--ours", str(inv), "--genai", str(tmp_path)])
    assert f"--ours {inv}: not exported with attention='gqa'; export it with --attention gqa" in capsys.readouterr().err
    gqa = _bundle(tmp_path / "gqa", "gqa")
    with pytest.raises(SystemExit):
        decoder_loops.main(["--ours", str(gqa), "--genai", str(tmp_path / "genai")])
    assert "no genai_config.json there; pass ORT GenAI's model-builder output" in capsys.readouterr().err


def test_engine_ab_times_the_engine_with_and_without_its_shared_cache(tmp_path: Path, capsys) -> None:
    """benchmarks/engine_ab.py: a bad variant is one line before any child runs; on a gqa bundle the shipped
    engine decodes on shared buffers and the copy variants do not."""
    import engine_ab
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    with pytest.raises(SystemExit):
        engine_ab.main([str(tmp_path)])
    assert f"{tmp_path}: manifest.json not found; pass a decoder bundle directory" in capsys.readouterr().err
    out = tmp_path / "gqa"
    export_decoder(tiny_llama(VOCAB, context=128), out, attention="gqa", tokenizer_dir=chat_tokenizer(tmp_path))
    with pytest.raises(SystemExit):
        engine_ab.main([str(out), "--variants", "shared,paged"])
    assert "--variants shared,paged: choose from shared, copy, copy-all" in capsys.readouterr().err
    engine_ab.main([str(out), "--prompt", "24", "--rows", "2", "--steps", "3", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    steps = {line.split()[0]: int(line.split()[-1]) for line in lines[1:]}
    assert steps["shared"] == 3 + 3 and steps["copy"] == steps["copy-all"] == 0, lines  # warm-up, then 3 steps


@pytest.mark.parametrize("shared", [True, False])
def test_one_decode_loop_times_both_cache_paths(tmp_path: Path, shared: bool) -> None:
    """decoder_ab.decode_times, the loop decoder_ab.py and decoder_loops.py share: a prefill per pass and a
    time per decode step, on a gqa bundle with the cache copied or in one buffer per tensor."""
    from decoder_fixture import tiny_llama
    from served_decoder import VOCAB, chat_tokenizer

    from edgelora.exporters.decoder_export import export_decoder

    out = tmp_path / "gqa"
    export_decoder(tiny_llama(VOCAB, context=128), out, attention="gqa", tokenizer_dir=chat_tokenizer(tmp_path))
    prefills, steps = decoder_ab.decode_times(out / "model.onnx", 1, 12, 5, 2, keep=1, shared=shared, vocab=VOCAB)
    assert len(prefills) == 2 and len(steps) == 2 * 5 and all(t > 0 for t in prefills + steps)
