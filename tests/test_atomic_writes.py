"""Writes that lose nothing: an export killed while it writes leaves the previous bundle whole (every sha256
as in its manifest) and the next export removes what the killed one left; a replace interrupted between its
two renames is named by the loaders, and a failure there puts the previous version back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Workspace, assert_one_line_error, cli, dead_pid, sha256

import edgelora.atomic as atomic
from edgelora.config import LoraConfig
from edgelora.model import AdapterModel, load_base
from edgelora.peft_format import save_adapter


def assert_bundle_whole(path: Path) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert all(sha256(path / rel) == digest for rel, digest in manifest["files"].items())
    return manifest


@pytest.mark.slow
def test_export_killed_while_writing_keeps_the_previous_bundle(workspace: Workspace, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edgelora.exporters.export import export_bundle

    # A base whose tokenizer.json carries 48 MB of trailing whitespace (still valid JSON): copying and
    # hashing it keeps the export in its writing phase for a tenth of a second or more, long enough to kill.
    base = tmp_path / "base"
    shutil.copytree(workspace.base, base)
    with open(base / "tokenizer.json", "a") as f:
        f.write(" " * (48 << 20))
    out = tmp_path / "bundles" / "current"
    export_bundle(str(base), {"task": workspace.adapter}, mode="switchable", precision="fp32", out=out)
    before = {p.relative_to(out).as_posix(): sha256(p) for p in out.rglob("*") if p.is_file()}

    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "export", str(base), "--adapter", str(workspace.adapter),
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

    export_bundle(str(workspace.base), {"task": workspace.adapter}, mode="merged", precision="fp32", out=out)  # the next export
    assert assert_bundle_whole(out)["mode"] == "merged"
    assert sorted(p.name for p in out.parent.iterdir()) == ["current"]  # the killed export's leftover is gone


def test_replace_interrupted_between_its_renames_is_named_and_cleared(workspace: Workspace, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL between `target -> .target.old-PID-X` and `new -> target` leaves no `target`: both loaders say
    where the previous version is, and the next successful write removes the copy set aside."""
    from edgelora.exporters.export import export_bundle

    workspace.tmp = tmp_path
    bundle, adapter = workspace.copy("bundle"), workspace.copy("adapter")
    pid = dead_pid()
    bundle_aside = bundle.with_name(f".bundle.old-{pid}-0badf00d")
    adapter_aside = adapter.with_name(f".adapter.old-{pid}-0badf00d")
    os.replace(bundle, bundle_aside)
    os.replace(adapter, adapter_aside)
    note = "a previous write was interrupted; the previous version is at"

    rc, _, err = cli(["run", bundle, "--text", "good"], capsys)
    assert_one_line_error(rc, err, f"{bundle}: bundle directory not found ({note} {bundle_aside}: rename it to bundle)")
    rc, _, err = cli(["export", workspace.base, "--adapter", f"task={adapter}", "--out", tmp_path / "b2"], capsys)
    assert_one_line_error(rc, err, f"{adapter}: adapter directory does not exist ({note} {adapter_aside}: rename it")

    export_bundle(str(workspace.base), {"task": adapter_aside}, mode="merged", precision="fp32", out=bundle)
    assert bundle.is_dir() and not bundle_aside.exists()


def test_failure_between_the_renames_puts_the_previous_version_back(workspace: Workspace, tmp_path: Path, monkeypatch) -> None:
    workspace.tmp = tmp_path
    adapter = workspace.copy("adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    model = AdapterModel(load_base(workspace.base)[0])
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
