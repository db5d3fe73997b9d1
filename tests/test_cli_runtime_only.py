"""Claim: a runtime-only install (onnxruntime, numpy, tokenizers; no torch) runs `edgelora run`, `bench` and `serve`.

Each command runs as `python -m edgelora.cli` in a subprocess whose `sitecustomize` makes `import torch` fail, in
that process and in every process it starts (bench workers), as it would where torch is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_bundle import TEXTS, make_bundle  # the torch-free tiny-bundle builder

# Importing a blocked module raises ImportError, as a missing package does.
NO_TORCH = "import sys\nsys.modules['torch'] = None\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("no-torch")
    (site / "sitecustomize.py").write_text(NO_TORCH)
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def edgelora(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelora.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_torch_is_really_blocked(env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr


def test_run_classifies_text_without_torch(env: dict[str, str], tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "switchable", "int8").path
    proc = edgelora(env, "run", str(bundle), "--adapter", "topic", "--text", TEXTS[0], "--text", TEXTS[2],
                    "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == [TEXTS[0], TEXTS[2]]
    assert all(set(r["scores"]) == {"art", "sport", "news"} and r["label"] == max(r["scores"], key=r["scores"].get)
               for r in rows)


def test_bench_times_bundles_without_torch(env: dict[str, str], tmp_path: Path) -> None:
    fp32, int8 = (make_bundle(tmp_path, "merged", p).path for p in ("fp32", "int8"))
    proc = edgelora(env, "bench", str(fp32), str(int8), "--batch", "1", "--seq", "4", "--rounds", "1",
                    "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert [s["kind"] for s in result["speedups"]] == ["int8/fp32"]
    assert fp32.name in proc.stdout and int8.name in proc.stdout


def test_serve_gets_as_far_as_the_bundle_without_torch(env: dict[str, str], tmp_path: Path) -> None:
    # past the parser and the server's imports (uvicorn, starlette) to loading the bundle, which is not there
    proc = edgelora(env, "serve", str(tmp_path / "nowhere"), "--port", "0")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("edgelora: error: ") and "bundle directory not found" in proc.stderr
