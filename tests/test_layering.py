"""Claim: data flows one way, edgelora -> exporters -> runtime, and the runtime runs without torch.

The import graph is read from the source (every `import`, lazy ones inside functions included), so a new
module is checked the day it is added: the runtime imports only the standard library, its runtime
dependencies, `edgelora.errors`, `edgelora.atomic` and itself; the exporters take from the runtime only the
bundle format (`bundle`, `manifest`) and the CPU detection (`cpu`) that picks the int8 weight bits.
A subprocess then imports every runtime module with torch blocked, as a runtime-only install would.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "edgelora.runtime", "exporters": "edgelora.exporters"}  # directory -> installed name

# What a runtime-only install holds (pyproject's core and `serve` dependencies; matplotlib only draws the
# bench chart, imported where it is drawn): nothing else third-party may be imported under runtime/.
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "jinja2", "starlette", "uvicorn", "matplotlib"}
RUNTIME_MAY_IMPORT = ("edgelora.errors", "edgelora.atomic", "edgelora.runtime")
# The bundle format is the exporters' whole contract with the runtime; cpu (torch-free ISA detection) tells
# an export which int8 weight bits this CPU's kernels run without saturating, and which ISA to record.
EXPORTERS_MAY_IMPORT_FROM_RUNTIME = {"edgelora.runtime.bundle", "edgelora.runtime.manifest", "edgelora.runtime.cpu"}


def imported_modules(path: Path, package: str) -> list[tuple[str, int]]:
    """Every module `path` imports, as (dotted name, line): `from pkg import mod` counts as pkg.mod where
    pkg is one of our packages and mod a module of it; relative imports are resolved against `package`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if _is_our_module(sub) else base, node.lineno))
    return found


def _is_our_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "edgelora" or len(parts) < 2:
        return False
    directory = {"runtime": ROOT / "runtime", "exporters": ROOT / "exporters", "cli": ROOT / "edgelora" / "cli"}
    if len(parts) == 2:
        return (ROOT / "edgelora" / f"{parts[1]}.py").is_file() or parts[1] in directory
    return len(parts) == 3 and parts[1] in directory and (directory[parts[1]] / f"{parts[2]}.py").is_file()


def runtime_violations(path: Path) -> list[str]:
    """Imports of a runtime module that a torch-free, training-free install could not satisfy."""
    bad = []
    for name, line in imported_modules(path, PACKAGES["runtime"]):
        top = name.split(".")[0]
        if top == "edgelora":
            ok = any(name == allowed or name.startswith(allowed + ".") for allowed in RUNTIME_MAY_IMPORT)
        else:
            ok = top in sys.stdlib_module_names or top in RUNTIME_THIRD_PARTY
        if not ok:
            bad.append(f"{path.name}:{line} imports {name}")
    return bad


def exporter_violations(path: Path) -> list[str]:
    """Imports of an exporter module that reach into the runtime past the bundle format, or up into the CLI."""
    bad = []
    for name, line in imported_modules(path, PACKAGES["exporters"]):
        if name == "edgelora.runtime" or name.startswith("edgelora.runtime."):
            ok = name in EXPORTERS_MAY_IMPORT_FROM_RUNTIME
        else:
            ok = not (name == "edgelora.cli" or name.startswith("edgelora.cli."))
        if not ok:
            bad.append(f"{path.name}:{line} imports {name}")
    return bad


def test_the_runtime_imports_nothing_of_the_exporters_the_training_side_or_torch() -> None:
    files = sorted((ROOT / "runtime").glob("*.py"))
    assert len(files) > 10  # the glob found the package
    assert [v for f in files for v in runtime_violations(f)] == []


def test_the_exporters_take_only_the_bundle_format_from_the_runtime() -> None:
    files = sorted((ROOT / "exporters").glob("*.py"))
    assert len(files) > 5
    assert [v for f in files for v in exporter_violations(f)] == []


@pytest.mark.parametrize(("package", "source", "line", "module"), [
    ("exporters", "from edgelora.runtime.runtime import Runtime\n", 1, "edgelora.runtime.runtime"),
    ("exporters", "def f():\n    from edgelora.runtime import generate\n", 2, "edgelora.runtime.generate"),
    ("exporters", "from edgelora.runtime.session import load_session\n", 1, "edgelora.runtime.session"),
    ("exporters", "from edgelora.cli import common\n", 1, "edgelora.cli.common"),
    ("runtime", "from edgelora.exporters.add import add_adapters\n", 1, "edgelora.exporters.add"),
    ("runtime", "from ..exporters import export\n", 1, "edgelora.exporters.export"),
    ("runtime", "import json\n\ndef f():\n    import torch\n", 4, "torch"),
    ("runtime", "from edgelora.config import LoraConfig\n", 1, "edgelora.config"),
    ("runtime", "import transformers.models\n", 1, "transformers.models"),
])
def test_a_forbidden_import_is_reported(tmp_path: Path, package: str, source: str, line: int, module: str) -> None:
    """The checks above can fail: each of these, added to a module, is named."""
    path = tmp_path / "added.py"
    path.write_text(source)
    check = exporter_violations if package == "exporters" else runtime_violations
    assert check(path) == [f"added.py:{line} imports {module}"]


@pytest.mark.parametrize(("package", "source"), [
    ("exporters", "from edgelora.runtime.bundle import MODEL_FILE\nfrom edgelora.runtime import cpu, manifest\n"),
    ("exporters", "from .switchable import slot_specs\nfrom edgelora.config import LoraConfig\n"),
    ("runtime", "from edgelora.runtime.bundle import read_manifest\nfrom . import cpu\nimport numpy as np\n"),
    ("runtime", "from edgelora.errors import EdgeloraError\nfrom edgelora.atomic import write_text_atomic\n"),
])
def test_the_allowed_imports_pass(tmp_path: Path, package: str, source: str) -> None:
    path = tmp_path / "added.py"
    path.write_text(source)
    check = exporter_violations if package == "exporters" else runtime_violations
    assert check(path) == []


def test_every_runtime_module_and_the_builtin_data_load_without_torch() -> None:
    """Import every module under runtime/ (and read builtin labelled data through the run CLI) in a process
    where `import torch` fails, as it does on a runtime-only install."""
    modules = [f"edgelora.runtime.{p.stem}" for p in sorted((ROOT / "runtime").glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys; sys.modules['torch'] = None\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "from edgelora.cli import run\n"
            "texts, gold = run.load_labelled('builtin:intent:16')\n"
            "assert len(texts) == len(gold) == 16 and sys.modules['torch'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_no_test_file_imports_another() -> None:
    """Shared helpers live in conftest.py and the tests/tiny_*.py and decoder_fixture.py modules, never in a
    test file: importing one test module from another runs its fixtures' module state twice."""
    offenders = [f"{path.name}:{line} imports {module}" for path in sorted((ROOT / "tests").glob("test_*.py"))
                 for module, line in imported_modules(path, "tests") if module.split(".")[0].startswith("test_")]
    assert not offenders, offenders
