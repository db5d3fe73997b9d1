"""Bad input gets one clear line: each case in BAD_INPUTS runs through `edgelora.cli.main` and must print
exactly one `edgelora: error:` line holding its message fragment, exit 2, and never a traceback; argparse
mistakes exit 2 with usage, and an unexpected failure is one line unless --debug asks for the traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Workspace, assert_one_line_error, cli, sha256
from safetensors.torch import load_file, save_file

from edgelora.cli import main
from edgelora.train import CHECKPOINT_FILE


def _json_edit(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _rehash(bundle: Path) -> None:
    """Make manifest.json agree with the files again, so the damage reaches the loader behind the sha256 check."""
    def edit(m: dict) -> None:
        m["files"] = {rel: sha256(bundle / rel) for rel in m["files"]}
        for a in m["adapters"]:
            if a.get("file"):
                a["sha256"] = m["files"][a["file"]]

    _json_edit(bundle / "manifest.json", edit)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _train(e: Workspace, *extra) -> list:
    return ["train", "--base", e.base, "--data", e.data, "--out", e.tmp / "out", "--device", "cpu", "--max-length", "16", *extra]


def _export(e: Workspace, adapter, *extra) -> list:
    return ["export", e.base, "--adapter", f"task={adapter}", "--precision", "fp32", "--out", e.tmp / "out", *extra]


def _run(bundle, *extra) -> list:
    return ["run", bundle, "--adapter", "task", "--text", "a good film", "--threads", "1", *extra]


def _data(e: Workspace, name: str, content: str, *extra) -> list:
    path = e.tmp / name
    path.write_text(content)
    return ["train", "--base", e.base, "--data", path, "--out", e.tmp / "out", *extra]


def _notes(e: Workspace) -> Path:
    (e.tmp / "mine").mkdir()
    (e.tmp / "mine" / "notes.txt").write_text("not an adapter\n")
    return e.tmp / "mine"


def _truncated_base(e: Workspace) -> list:
    base = e.copy("base")
    _truncate(base / "model.safetensors", 1000)
    return ["train", "--base", base, "--data", e.data, "--out", e.tmp / "out"]


def _corrupt_base_config(e: Workspace) -> list:
    base = e.copy("base")
    (base / "config.json").write_text('{"model_type": "bert", ')
    return _export(e, e.adapter)[:1] + [base] + _export(e, e.adapter)[2:]


def _base_without_tokenizer(e: Workspace) -> list:
    base = e.copy("base")
    (base / "tokenizer.json").unlink()
    return ["train", "--base", base, "--data", e.data, "--out", e.tmp / "out"]


def _damaged_bundle(e: Workspace, damage: Callable[[Path], None], rehash: bool) -> list:
    bundle = e.copy("bundle")
    damage(bundle)
    if rehash:
        _rehash(bundle)
    return _run(bundle)


def _damaged_adapter(e: Workspace, damage: Callable[[Path], None]) -> list:
    adapter = e.copy("adapter")
    damage(adapter)
    return _export(e, adapter)


def _another_base(a: Path) -> None:
    _json_edit(a / "adapter_config.json", lambda c: c["edgelora"].update(base_fingerprint="0" * 64))


def _another_rank(a: Path) -> None:
    _json_edit(a / "adapter_config.json", lambda c: (c.update(r=4), c["edgelora"]["adapter"].update(r=4)))


def _another_width(a: Path) -> None:
    tensors = load_file(a / "adapter_model.safetensors")
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    tensors[key] = tensors[key][:, :16].contiguous()
    save_file(tensors, a / "adapter_model.safetensors")


def _checkpoint_file(e: Workspace, content: bytes | None) -> Path:
    ckpt = e.tmp / "ckpt"
    ckpt.mkdir()
    if content is not None:
        (ckpt / CHECKPOINT_FILE).write_bytes(content)
    return ckpt


# (id, build(workspace) -> argv, message fragment: {tmp} and {root} are filled in)
BAD_INPUTS: list[tuple[str, Callable[[Workspace], list], str]] = [
    # paths that do not exist, and directories that are something else
    ("base-missing", lambda e: ["train", "--base", e.tmp / "nope", "--data", e.data, "--out", e.tmp / "out"],
     "{tmp}/nope: base model directory does not exist"),
    ("base-is-not-a-model", lambda e: _export(e, e.adapter)[:1] + [e.root] + _export(e, e.adapter)[2:],
     "{root}: not a Hugging Face model directory (no config.json)"),
    ("adapter-missing", lambda e: _export(e, e.tmp / "nope"), "{tmp}/nope: adapter directory does not exist"),
    ("adapter-is-a-bundle", lambda e: _export(e, e.bundle), "{root}/bundle: not an adapter directory (no adapter_config.json)"),
    ("bundle-is-an-adapter", lambda e: _run(e.adapter), "{root}/task/manifest.json: missing; this is not an edgelora bundle"),
    ("bundle-is-a-file", lambda e: _run(e.data), "{root}/train.jsonl: not a directory; a bundle is a directory"),
    ("out-is-not-an-adapter", lambda e: _train(e, "--out", _notes(e)),
     "{tmp}/mine: exists and is not an adapter directory; choose an empty or new --out"),
    ("out-is-a-file", lambda e: _train(e, "--out", e.data),
     "{root}/train.jsonl: exists and is not an adapter directory"),
    ("data-missing", lambda e: ["train", "--base", e.base, "--data", e.tmp / "x.jsonl", "--out", e.tmp / "out"],
     "{tmp}/x.jsonl: no such file"),
    ("data-is-a-directory", lambda e: ["train", "--base", e.base, "--data", e.root, "--out", e.tmp / "out"],
     "{root}: is a directory; pass a .jsonl or .csv file"),
    # damaged files
    ("base-weights-truncated", _truncated_base, "{tmp}/base: could not load the base model (Error while deserializing header"),
    ("base-config-corrupt", _corrupt_base_config, "{tmp}/base: could not load the base model (It looks like the config file"),
    ("base-without-tokenizer", _base_without_tokenizer, "{tmp}/base/tokenizer.json: missing; edgelora needs the model's fast tokenizer"),
    ("onnx-truncated", lambda e: _damaged_bundle(e, lambda b: _truncate(b / "model.onnx", 500), rehash=False),
     "{tmp}/bundle/model.onnx: sha256 does not match manifest.json (changed or corrupt)"),
    ("onnx-truncated-rehashed", lambda e: _damaged_bundle(e, lambda b: _truncate(b / "model.onnx", 500), rehash=True),
     "{tmp}/bundle/model.onnx: onnxruntime cannot load it (INVALID_PROTOBUF"),
    ("onnx-adapter-changed", lambda e: _damaged_bundle(e, lambda b: _flip_last_byte(b / "adapters/task.onnx_adapter"), False),
     "{tmp}/bundle/adapters/task.onnx_adapter: sha256 does not match manifest.json"),
    ("onnx-adapter-truncated-rehashed",
     lambda e: _damaged_bundle(e, lambda b: _truncate(b / "adapters/task.onnx_adapter", 40), rehash=True),
     "{tmp}/bundle/adapters/task.onnx_adapter: not a valid .onnx_adapter file"),
    ("manifest-truncated", lambda e: _damaged_bundle(e, lambda b: _truncate(b / "manifest.json", 50), rehash=False),
     "{tmp}/bundle/manifest.json: not valid JSON"),
    ("safetensors-truncated", lambda e: _damaged_adapter(e, lambda a: _truncate(a / "adapter_model.safetensors", 100)),
     "{tmp}/adapter/adapter_model.safetensors: corrupt or truncated safetensors file"),
    ("adapter-config-truncated", lambda e: _damaged_adapter(e, lambda a: _truncate(a / "adapter_config.json", 30)),
     "{tmp}/adapter/adapter_config.json: corrupt JSON"),
    # adapters that do not fit, bundles from the future
    ("adapter-of-another-base", lambda e: _damaged_adapter(e, _another_base), "{tmp}/adapter: adapter was trained on another base"),
    ("adapter-of-another-rank", lambda e: _damaged_adapter(e, _another_rank), "has shape (2, 32) but this base needs (4, 32)"),
    ("adapter-of-another-shape", lambda e: _damaged_adapter(e, _another_width), "has shape (2, 16) but this base needs (2, 32)"),
    ("adapter-of-unknown-kind",
     lambda e: _damaged_adapter(e, lambda a: _json_edit(a / "adapter_config.json", lambda c: c["edgelora"]["adapter"].update(kind="prefix"))),
     "{tmp}/adapter/adapter_config.json: unknown adapter kind 'prefix'; choose from lora, bottleneck"),
    ("adapter-from-a-newer-edgelora",
     lambda e: _damaged_adapter(e, lambda a: _json_edit(a / "adapter_config.json", lambda c: c["edgelora"].update(format_version=99))),
     "{tmp}/adapter/adapter_config.json: written by a newer edgelora (format 99)"),
    ("bundle-from-a-newer-edgelora",
     lambda e: _damaged_bundle(e, lambda b: _json_edit(b / "manifest.json", lambda m: m.update(format_version=99)), False),
     "{tmp}/bundle/manifest.json: written by a newer edgelora (format_version 99"),
    ("bundle-of-another-format",
     lambda e: _damaged_bundle(e, lambda b: _json_edit(b / "manifest.json", lambda m: m.update(format="onnx-zoo")), False),
     "{tmp}/bundle/manifest.json: format is 'onnx-zoo', not 'edgelora-bundle'"),
    # datasets
    ("data-empty", lambda e: _data(e, "empty.jsonl", ""), "{tmp}/empty.jsonl: file is empty (no examples)"),
    ("data-malformed-json", lambda e: _data(e, "bad.jsonl", '{"text": "a", "label": "x"}\n{"text": \n'),
     "{tmp}/bad.jsonl, line 2: malformed JSON"),
    ("data-label-missing", lambda e: _data(e, "nolabel.jsonl", '{"text": "a good film"}\n'),
     "{tmp}/nolabel.jsonl, line 1: missing field 'label'"),
    ("data-one-class", lambda e: _data(e, "one.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n'),
     "{tmp}/one.jsonl: only one class ('x') found"),
    ("data-csv-without-label-column", lambda e: _data(e, "d.csv", "text,stars\na good film,5\n"),
     "{tmp}/d.csv, line 1: no column 'label' in the header"),
    ("eval-label-unseen-in-training",
     lambda e: _data(e, "eval.jsonl", '{"text": "w1 w2", "label": "gamma"}\n')[:4] + [e.data, "--eval", e.tmp / "eval.jsonl",
                                                                                    "--out", e.tmp / "out"],
     "{tmp}/eval.jsonl, line 1: label 'gamma' is not one of the training labels (alpha, beta)"),
    # nonsense options
    ("rank-0", lambda e: _train(e, "--rank", "0"), "r=0 must be a positive integer"),
    ("alpha-negative", lambda e: _train(e, "--alpha", "-1"), "alpha=-1.0 must be positive"),
    ("dropout-1.5", lambda e: _train(e, "--dropout", "1.5"), "dropout=1.5 must be in [0, 1)"),
    ("epochs-0", lambda e: _train(e, "--epochs", "0"), "epochs=0 must be a positive integer"),
    ("batch-size-0", lambda e: _train(e, "--batch-size", "0"), "batch_size=0 must be a positive integer"),
    ("lr-negative", lambda e: _train(e, "--lr", "-0.1"), "lr=-0.1 must be positive"),
    ("weight-bits-9", lambda e: _train(e, "--weight-bits", "9"), "--weight-bits 9 is not supported; choose 7, 8 or auto"),
    ("train-max-length-0", lambda e: _train(e, "--max-length", "0"), "--max-length 0 must be a positive number of tokens"),
    ("reduction-factor-0", lambda e: _train(e, "--kind", "bottleneck", "--reduction-factor", "0"),
     "reduction_factor=0 must be a positive integer"),
    ("targets-match-nothing", lambda e: _train(e, "--targets", "nope"), "target_modules=('nope',) matched no linear layer"),
    ("checkpoint-every-negative", lambda e: _train(e, "--checkpoint-every", "-1"),
     "checkpoint every=-1 must be a whole number of steps >= 0"),
    ("export-max-length-0", lambda e: _export(e, e.adapter, "--max-length", "0"), "--max-length 0 must be a positive number"),
    ("export-adapter-twice", lambda e: _export(e, e.adapter, "--adapter", f"task={e.adapter}"), "the name 'task' is given twice"),
    ("run-threads-0", lambda e: _run(e.bundle, "--threads", "0"), "intra_op_threads is 0"),
    ("run-unknown-adapter", lambda e: _run(e.bundle)[:2] + ["--adapter", "nope", "--text", "x"], "no adapter 'nope'; available: task"),
    ("run-nothing-to-classify", lambda e: ["run", e.bundle], "run: nothing to classify; pass --text TEXT or --file FILE"),
    # checkpoints
    ("resume-without-checkpoint", lambda e: _train(e, "--resume", "--checkpoint-dir", _checkpoint_file(e, None)),
     "{tmp}/ckpt/checkpoint.pt: no checkpoint to resume from"),
    ("start-over-a-checkpoint", lambda e: _train(e, "--checkpoint-dir", _checkpoint_file(e, b"x")),
     "{tmp}/ckpt/checkpoint.pt: a checkpoint of an earlier run is here; pass --resume to continue it, or delete"),
    ("checkpoint-corrupt", lambda e: _train(e, "--resume", "--checkpoint-dir", _checkpoint_file(e, b"PK\x03\x04")),
     "{tmp}/ckpt/checkpoint.pt: unreadable checkpoint"),
    ("checkpoint-dir-is-a-file", lambda e: _train(e, "--checkpoint-dir", e.data), "{root}/train.jsonl: exists and is not a directory"),
    ("checkpoint-dir-unwritable", lambda e: _train(e, "--checkpoint-dir", e.data / "ckpt"),
     "{root}/train.jsonl/ckpt/checkpoint.pt: cannot write there ({root}/train.jsonl is a file, not a directory); "
     "choose another --checkpoint-dir"),
    ("out-unwritable", lambda e: _train(e, "--out", e.data / "adapter"),
     "{root}/train.jsonl/adapter: cannot write there ({root}/train.jsonl is a file, not a directory); choose another --out"),
]


@pytest.mark.parametrize("case, build, fragment", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_line(case: str, build, fragment: str, workspace: Workspace, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    workspace.tmp = tmp_path
    argv = build(workspace)
    capsys.readouterr()
    rc, out, err = cli(argv, capsys)
    assert_one_line_error(rc, err, fragment.format(tmp=tmp_path, root=workspace.root))
    assert out == ""
    assert not (tmp_path / "out").exists()  # nothing half-written
    if case == "out-is-not-an-adapter":
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # the user's files are untouched


def test_argparse_mistakes_exit_2_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "x.jsonl", "--out", "o", "--rank", "abc"])
    assert info.value.code == 2
    assert "argument --rank: invalid int value: 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["export", "base", "--out", "o", "--mode", "fused"])
    assert info.value.code == 2 and "argument --mode: invalid choice: 'fused'" in capsys.readouterr().err


def test_no_verb_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: edgelora") and "train" in captured.err


def test_unexpected_error_is_one_line_and_debug_shows_it(workspace: Workspace, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    import edgelora.runtime.runtime as runtime_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(runtime_module, "detect_isa", broken)
    rc, out, err = cli(_run(workspace.bundle), capsys)
    assert rc == 1 and out == ""
    assert err == "edgelora: error: unexpected ZeroDivisionError: division by zero; run with --debug for the traceback\n"
    for argv in (["--debug", *_run(workspace.bundle)], [*_run(workspace.bundle), "--debug"]):  # before or after the verb
        with pytest.raises(ZeroDivisionError):
            main([str(a) for a in argv])


def test_text_longer_than_the_model_is_truncated_with_a_warning(workspace: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny base has 64 positions, so the bundle (exported with the default --max-length 128) truncates
    at 64 tokens: a 200-word text runs, and stderr says it was cut."""
    assert json.loads((workspace.bundle / "manifest.json").read_text())["tokenizer"]["max_length"] == 64
    rc, out, err = cli(["run", workspace.bundle, "--adapter", "task", "--threads", "1", "--text", " ".join(["good"] * 200),
                        "--text", "a good film"], capsys)
    assert rc == 0, err
    assert err == "edgelora: warning: 1 text longer than the bundle's max_length of 64 tokens truncated to it\n"
    assert [p["text"][:4] for p in json.loads(out)] == ["good", "a go"]


def test_first_line_strips_only_what_onnx_runtime_adds() -> None:
    """ORT's '[ONNXRuntimeError] : N :' prefix goes; one of our messages, already readable (and quoting ORT's
    ' : ' separated text inside), stays whole; an empty message gives the exception's type."""
    from edgelora.errors import EdgeloraError
    from edgelora.runtime.session import first_line

    assert first_line(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Invalid rank for input: x\nmore")) \
        == "INVALID_ARGUMENT : Invalid rank for input: x"
    ours = "/b/model.onnx: run failed (INVALID_ARGUMENT : Invalid rank : x); re-export the bundle"
    assert first_line(EdgeloraError(ours)) == ours
    assert first_line(ValueError("")) == "ValueError"
