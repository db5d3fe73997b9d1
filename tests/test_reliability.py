"""Claims about reliability: no work is lost and every bad input gets one clear line.

- Training checkpoints: a run that crashes (in-process) or is killed with SIGKILL (CLI, subprocess) and is
  resumed ends with the same adapter, bit for bit on CPU, as a run that was never interrupted; a loss
  that turns NaN stops naming the step and keeps the last good checkpoint.
- Writes: an export killed while it writes leaves the previous bundle whole (every sha256 as in its
  manifest), and the next export removes what the killed one left; a replace interrupted between its two
  renames is named by the loaders, and a failure there puts the previous version back.
- Bad input: each case in BAD_INPUTS runs through `edgelora.cli.main` and must print exactly one
  `edgelora: error:` line holding its message fragment, exit 2, and never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import WORDS, make_base, make_keyword_task
from safetensors.torch import load_file, save_file

import edgelora.atomic as atomic
from edgelora.cli import main
from edgelora.config import LoraConfig
from edgelora.errors import EdgeloraError
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import save_adapter
from edgelora.train import CHECKPOINT_FILE, CheckpointConfig, TrainConfig, _adapter_state, train_adapter

LABELS = ["alpha", "beta"]
FILLER = [w for w in WORDS if w not in ("alpha", "beta", "good", "bad")]


def keyword_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Texts of filler words with 'alpha' (class 0) or 'beta' (class 1) among them."""
    return make_keyword_task(n, seed, FILLER, LABELS)


def write_jsonl(path: Path, n: int = 60) -> Path:
    texts, labels = keyword_task(n, seed=0)
    path.write_text("".join(json.dumps({"text": t, "label": LABELS[y]}) + "\n" for t, y in zip(texts, labels)))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped): what a killed writer leaves in its names."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, fragment: str) -> None:
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


# --- training: checkpoints and resume -----------------------------------------------------------------------
TRAIN = keyword_task(40, seed=1)  # 5 steps per epoch at batch 8
EVAL = keyword_task(16, seed=2)
CONFIG = TrainConfig(epochs=3, batch_size=8, lr=1e-2, seed=3, device="cpu")


class Crash(Exception):
    """Stands in for a crash: raised from the progress callback after a given step."""


def new_model() -> AdapterModel:
    model = AdapterModel(make_base("bert"))
    model.add_adapter("task", LoraConfig(r=4, alpha=8.0, dropout=0.1), LABELS)  # dropout: the torch RNG matters
    return model


def train(tokenizer, checkpoint: CheckpointConfig | None = None, on_step: Callable[[int, AdapterModel], None] | None = None):
    model = new_model()

    def progress(msg: str) -> None:
        if on_step:
            on_step(int(msg.split("step ")[1].split("/")[0]), model)

    result = train_adapter(model, "task", tokenizer, *TRAIN, *EVAL, config=CONFIG, progress=progress, checkpoint=checkpoint)
    return result, {k: v.detach().clone() for k, v in _adapter_state(model, "task").items()}


def assert_same_training(a, b) -> None:
    (result_a, state_a), (result_b, state_b) = a, b
    assert result_a.history == result_b.history and result_a.best_epoch == result_b.best_epoch
    assert state_a.keys() == state_b.keys() and any(".lora_B." in k for k in state_a)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), "resumed weights differ from the uninterrupted run"


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_dir: Path):
    from edgelora.tokenize import load_tokenizer

    return train(load_tokenizer(tokenizer_dir, max_length=32))


def crash_after(step: int) -> Callable[[int, AdapterModel], None]:
    def on_step(done: int, model: AdapterModel) -> None:
        if done == step:
            raise Crash(step)

    return on_step


# Step 7 is mid-epoch 2 (last checkpoint: step 6, mid-epoch); step 10 ends epoch 2 before its evaluation
# (last checkpoint: step 8); step 15 is the last step (last checkpoint: step 14, before the final epoch end).
@pytest.mark.parametrize("crash_step", [7, 10, 15])
def test_resumed_run_equals_an_uninterrupted_one(tokenizer, uninterrupted, tmp_path: Path, crash_step: int) -> None:
    with pytest.raises(Crash):
        train(tokenizer, CheckpointConfig(tmp_path, every=2), crash_after(crash_step))
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert 0 < saved["step"] < crash_step
    resumed = train(tokenizer, CheckpointConfig(tmp_path, every=2, resume=True))
    assert_same_training(resumed, uninterrupted)
    # the finished run's checkpoint gives the same result again without training
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, resume=True)), uninterrupted)


def test_checkpointing_does_not_change_the_result(tokenizer, uninterrupted, tmp_path: Path) -> None:
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, every=1)), uninterrupted)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tokenizer, uninterrupted, tmp_path: Path) -> None:
    def poison(done: int, model: AdapterModel) -> None:
        if done == 8:  # after the checkpoint of step 8 was saved, the weights turn NaN
            with torch.no_grad():
                next(layer for _, layer in model.adapted_layers()).lora_B["task"].weight.fill_(float("nan"))

    kept = f"the last good checkpoint (step 8) is kept at {tmp_path / CHECKPOINT_FILE}"
    with pytest.raises(EdgeloraError, match=r"loss became nan at step 8; lower --lr") as info:
        train(tokenizer, CheckpointConfig(tmp_path, every=2), poison)
    assert str(info.value).endswith(kept)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 8 and all(torch.isfinite(v).all() for v in saved["adapter"].values())
    assert_same_training(train(tokenizer, CheckpointConfig(tmp_path, every=2, resume=True)), uninterrupted)


def test_diverging_run_never_writes_a_non_finite_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = new_model()
    diverging = TrainConfig(epochs=2, batch_size=8, lr=1e30, warmup_ratio=0.0, device="cpu")
    with pytest.raises(EdgeloraError, match=r"(loss became (nan|inf|-inf)|is no longer finite) at step \d+; lower --lr"):
        train_adapter(model, "task", tokenizer, *TRAIN, *EVAL, config=diverging, checkpoint=CheckpointConfig(tmp_path, every=1))
    if (tmp_path / CHECKPOINT_FILE).exists():
        saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["adapter"].values())


def test_resume_refuses_another_run(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(Crash):
        train(tokenizer, CheckpointConfig(tmp_path, every=2), crash_after(3))
    model = new_model()
    other = TrainConfig(epochs=3, batch_size=8, lr=2e-2, seed=3, device="cpu")
    with pytest.raises(EdgeloraError, match=r"checkpoint is of another run \(different training settings\)"):
        train_adapter(model, "task", tokenizer, *TRAIN, *EVAL, config=other, checkpoint=CheckpointConfig(tmp_path, resume=True))
    with pytest.raises(EdgeloraError, match=r"checkpoint is of another run \(different data\)"):
        train_adapter(model, "task", tokenizer, TRAIN[0][:-2], TRAIN[1][:-2], *EVAL, config=CONFIG,
                      checkpoint=CheckpointConfig(tmp_path, resume=True))


def test_tokenizer_longer_than_the_base_is_refused(tokenizer_dir: Path) -> None:
    from edgelora.tokenize import load_tokenizer

    with pytest.raises(EdgeloraError, match=r"the tokenizer truncates at 100 tokens but the base has 64 positions; "
                                            r"use max_length <= 64"):
        train_adapter(new_model(), "task", load_tokenizer(tokenizer_dir, max_length=100), *TRAIN, *EVAL, config=CONFIG)


@pytest.mark.slow
def test_cli_training_killed_with_sigkill_resumes_to_the_same_adapter(tiny_bert_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI in a subprocess is killed (SIGKILL) after its first checkpoints; `--resume` finishes the job."""
    data = write_jsonl(tmp_path / "train.jsonl")
    args = ["train", "--base", tiny_bert_dir, "--data", data, "--rank", "4", "--dropout", "0.1", "--epochs", "6",
            "--batch-size", "4", "--lr", "1e-2", "--max-length", "16", "--device", "cpu", "--checkpoint-every", "1"]
    killed, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the thread count of this process (conftest)
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", *map(str, args), "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / CHECKPOINT_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.2)  # a few more steps: the kill lands part-way through an epoch, maybe mid-write
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"training ended before the kill (rc {proc.returncode}): {stderr}"
    assert not killed.exists()
    step = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["step"]
    assert 0 < step < 6 * 12, step  # 48 training examples at batch 4: 12 steps per epoch

    rc, _, err = cli([*args, "--out", killed], capsys)  # without --resume: refused, the checkpoint is kept
    assert_one_line_error(rc, err, f"{ckpt / CHECKPOINT_FILE}: a checkpoint of an earlier run is here; pass --resume")
    rc, out, err = cli([*args, "--out", killed, "--resume"], capsys)
    assert rc == 0, err
    assert not ckpt.exists()  # its work is in the adapter now
    rc, out, err = cli([*args, "--out", tmp_path / "straight"], capsys)
    assert rc == 0, err

    resumed, straight = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("killed", "straight"))
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed)
    history = [json.loads((tmp_path / d / "adapter_config.json").read_text())["edgelora"]["training"]["history"]
               for d in ("killed", "straight")]
    assert history[0] == history[1] and len(history[0]) == 6


# --- writes: killed exports, interrupted replaces, stale leftovers -----------------------------------------------
@pytest.fixture(scope="module")
def env(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny base, an adapter "task" saved from it, a switchable fp32 bundle of it and a JSONL data file."""
    from edgelora.exporters.export import export_bundle

    root = tmp_path_factory.mktemp("reliability")
    model = AdapterModel(load_base(tiny_bert_dir)[0])
    model.add_adapter("task", LoraConfig(r=2), labels=["neg", "pos"])
    save_adapter(model, "task", root / "task")
    export_bundle(str(tiny_bert_dir), {"task": root / "task"}, mode="switchable", precision="fp32", out=root / "bundle")
    return Env(base=tiny_bert_dir, adapter=root / "task", bundle=root / "bundle", data=write_jsonl(root / "train.jsonl"),
               root=root)


@dataclass
class Env:
    base: Path
    adapter: Path
    bundle: Path
    data: Path
    root: Path
    tmp: Path | None = None

    def copy(self, what: str) -> Path:
        """A private copy of the base, adapter or bundle to damage."""
        dst = self.tmp / what
        shutil.copytree(getattr(self, what), dst)
        return dst


def assert_bundle_whole(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert all(sha256(path / rel) == digest for rel, digest in manifest["files"].items())
    return manifest


@pytest.mark.slow
def test_export_killed_while_writing_keeps_the_previous_bundle(env: Env, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edgelora.exporters.export import export_bundle

    # A base whose tokenizer.json carries 48 MB of trailing whitespace (still valid JSON): copying and
    # hashing it keeps the export in its writing phase for a tenth of a second or more, long enough to kill.
    base = tmp_path / "base"
    shutil.copytree(env.base, base)
    with open(base / "tokenizer.json", "a") as f:
        f.write(" " * (48 << 20))
    out = tmp_path / "bundles" / "current"
    export_bundle(str(base), {"task": env.adapter}, mode="switchable", precision="fp32", out=out)
    before = {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()}

    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "export", str(base), "--adapter", str(env.adapter),
                             "--mode", "merged", "--precision", "int8", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp_dirs: list[Path] = []
    try:
        deadline = time.monotonic() + 180
        while not tmp_dirs and proc.poll() is None and time.monotonic() < deadline:
            tmp_dirs = list(out.parent.glob(".current.tmp-*"))
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and tmp_dirs, f"the export was not killed while writing: {stderr}"
    assert tmp_dirs[0].name.startswith(f".current.tmp-{proc.pid}-") and tmp_dirs[0].exists()  # a leftover

    manifest = assert_bundle_whole(out)  # the previous bundle, whole: every file's sha256 as in its manifest
    assert manifest["mode"] == "switchable" and manifest["precision"] == "fp32"
    assert {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()} == before
    rc, _, err = cli(["run", out, "--adapter", "task", "--text", "good film", "--threads", "1"], capsys)
    assert rc == 0, err

    export_bundle(str(env.base), {"task": env.adapter}, mode="merged", precision="fp32", out=out)  # the next export
    assert assert_bundle_whole(out)["mode"] == "merged"
    assert sorted(p.name for p in out.parent.iterdir()) == ["current"]  # the killed export's leftover is gone


def test_replace_interrupted_between_its_renames_is_named_and_cleared(env: Env, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL between `target -> .target.old-PID-X` and `new -> target` leaves no `target`: both loaders say
    where the previous version is, and the next successful write removes the copy set aside."""
    from edgelora.exporters.export import export_bundle

    env.tmp = tmp_path
    bundle, adapter = env.copy("bundle"), env.copy("adapter")
    pid = dead_pid()
    bundle_aside = bundle.with_name(f".bundle.old-{pid}-0badf00d")
    adapter_aside = adapter.with_name(f".adapter.old-{pid}-0badf00d")
    os.replace(bundle, bundle_aside)
    os.replace(adapter, adapter_aside)
    note = "a previous write was interrupted; the previous version is at"

    rc, _, err = cli(["run", bundle, "--text", "good"], capsys)
    assert_one_line_error(rc, err, f"{bundle}: bundle directory not found ({note} {bundle_aside}: rename it to bundle)")
    rc, _, err = cli(["export", env.base, "--adapter", f"task={adapter}", "--out", tmp_path / "b2"], capsys)
    assert_one_line_error(rc, err, f"{adapter}: adapter directory does not exist ({note} {adapter_aside}: rename it")

    export_bundle(str(env.base), {"task": adapter_aside}, mode="merged", precision="fp32", out=bundle)
    assert bundle.is_dir() and not bundle_aside.exists()


def test_failure_between_the_renames_puts_the_previous_version_back(env: Env, tmp_path: Path, monkeypatch) -> None:
    env.tmp = tmp_path
    adapter = env.copy("adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    model = AdapterModel(load_base(env.base)[0])
    model.add_adapter("task", LoraConfig(r=2), labels=["neg", "pos"])
    with pytest.raises(OSError, match="I/O error"):
        save_adapter(model, "task", adapter)
    assert calls[0][1].startswith(".adapter.old-") and calls[1][1] == "adapter"
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary, no copy aside


def test_only_leftovers_of_finished_processes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    dead, alive = dead_pid(), os.getppid()
    stale = [tmp_path / f".bundle.tmp-{dead}-abc", tmp_path / f".bundle.old-{dead}-abc", tmp_path / f".bundle.tmp-{dead}-f"]
    live = [tmp_path / f".bundle.tmp-{alive}-abc", tmp_path / f".bundle.tmp-{os.getpid()}-abc", tmp_path / ".other.tmp-1-x"]
    for p in stale[:2] + live:
        p.mkdir()
    stale[2].write_bytes(b"half a file")
    assert sorted(atomic.clean_stale(target)) == sorted(stale)
    assert all(p.exists() for p in live)


# --- bad input: one line each through the CLI ---------------------------------------------------------------------
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


def _train(e: Env, *extra) -> list:
    return ["train", "--base", e.base, "--data", e.data, "--out", e.tmp / "out", "--device", "cpu", "--max-length", "16", *extra]


def _export(e: Env, adapter, *extra) -> list:
    return ["export", e.base, "--adapter", f"task={adapter}", "--precision", "fp32", "--out", e.tmp / "out", *extra]


def _run(bundle, *extra) -> list:
    return ["run", bundle, "--adapter", "task", "--text", "a good film", "--threads", "1", *extra]


def _data(e: Env, name: str, content: str, *extra) -> list:
    path = e.tmp / name
    path.write_text(content)
    return ["train", "--base", e.base, "--data", path, "--out", e.tmp / "out", *extra]


def _notes(e: Env) -> Path:
    (e.tmp / "mine").mkdir()
    (e.tmp / "mine" / "notes.txt").write_text("not an adapter\n")
    return e.tmp / "mine"


def _truncated_base(e: Env) -> list:
    base = e.copy("base")
    _truncate(base / "model.safetensors", 1000)
    return ["train", "--base", base, "--data", e.data, "--out", e.tmp / "out"]


def _corrupt_base_config(e: Env) -> list:
    base = e.copy("base")
    (base / "config.json").write_text('{"model_type": "bert", ')
    return _export(e, e.adapter)[:1] + [base] + _export(e, e.adapter)[2:]


def _base_without_tokenizer(e: Env) -> list:
    base = e.copy("base")
    (base / "tokenizer.json").unlink()
    return ["train", "--base", base, "--data", e.data, "--out", e.tmp / "out"]


def _damaged_bundle(e: Env, damage: Callable[[Path], None], rehash: bool) -> list:
    bundle = e.copy("bundle")
    damage(bundle)
    if rehash:
        _rehash(bundle)
    return _run(bundle)


def _damaged_adapter(e: Env, damage: Callable[[Path], None]) -> list:
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


def _checkpoint_file(e: Env, content: bytes | None) -> Path:
    ckpt = e.tmp / "ckpt"
    ckpt.mkdir()
    if content is not None:
        (ckpt / CHECKPOINT_FILE).write_bytes(content)
    return ckpt


# (id, build(env) -> argv, message fragment: {tmp} and {root} are filled in)
BAD_INPUTS: list[tuple[str, Callable[[Env], list], str]] = [
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
def test_bad_input_gives_one_line(case: str, build, fragment: str, env: Env, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    env.tmp = tmp_path
    argv = build(env)
    capsys.readouterr()
    rc, out, err = cli(argv, capsys)
    assert_one_line_error(rc, err, fragment.format(tmp=tmp_path, root=env.root))
    assert out == ""
    assert not (tmp_path / "out").exists()  # nothing half-written
    if case == "out-is-not-an-adapter":
        assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]  # the user's files are untouched


def test_interrupted_cli_run_resumes_and_refuses_other_settings(env: Env, tmp_path: Path, monkeypatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C after the first epoch's checkpoint: the CLI says how to resume; --resume with another --lr is
    refused by name, with the same arguments it finishes."""
    import edgelora.train as train_module

    args = ["train", "--base", env.base, "--data", env.data, "--out", tmp_path / "a", "--device", "cpu",
            "--epochs", "2", "--batch-size", "16", "--max-length", "16", "--checkpoint-every", "0"]
    real_save = train_module._Saver.save

    def save_then_interrupt(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module._Saver, "save", save_then_interrupt)
    rc, out, err = cli(args, capsys)
    checkpoint = tmp_path / "a.ckpt" / CHECKPOINT_FILE
    assert (rc, out) == (130, "")
    assert err == f"edgelora: interrupted; continue from {checkpoint} with the same command and --resume\n"
    monkeypatch.undo()
    rc, _, err = cli([*args, "--resume", "--lr", "5e-3"], capsys)
    assert_one_line_error(rc, err, f"{checkpoint}: the checkpoint is of another run (different training settings)")
    rc, out, err = cli([*args, "--resume"], capsys)
    assert rc == 0 and err == "", err
    assert json.loads(out)["adapter"] == "a" and not checkpoint.parent.exists()


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


def test_unexpected_error_is_one_line_and_debug_shows_it(env: Env, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    import edgelora.runtime.runtime as runtime_module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(runtime_module, "detect_isa", broken)
    rc, out, err = cli(_run(env.bundle), capsys)
    assert rc == 1 and out == ""
    assert err == "edgelora: error: unexpected ZeroDivisionError: division by zero; run with --debug for the traceback\n"
    for argv in (["--debug", *_run(env.bundle)], [*_run(env.bundle), "--debug"]):  # before or after the verb
        with pytest.raises(ZeroDivisionError):
            main([str(a) for a in argv])


def test_text_longer_than_the_model_is_truncated_with_a_warning(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny base has 64 positions, so the bundle (exported with the default --max-length 128) truncates
    at 64 tokens: a 200-word text runs, and stderr says it was cut."""
    assert json.loads((env.bundle / "manifest.json").read_text())["tokenizer"]["max_length"] == 64
    rc, out, err = cli(["run", env.bundle, "--adapter", "task", "--threads", "1", "--text", " ".join(["good"] * 200),
                        "--text", "a good film"], capsys)
    assert rc == 0, err
    assert err == "edgelora: warning: 1 text longer than the bundle's max_length of 64 tokens truncated to it\n"
    assert [p["text"][:4] for p in json.loads(out)] == ["good", "a go"]
