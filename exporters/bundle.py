"""Write a bundle directory atomically: model.onnx, adapters/, tokenizer, manifest.json with sha256s.

Everything is written into a temporary sibling directory and renamed into place at the end, so a
failed or killed export never leaves half a bundle and never destroys the previous one; the next export
removes what a killed one left behind (`edgelora.atomic`). Rewriting a bundle (`edgelora add-adapter`)
goes through the same writer, carrying its unchanged files over as hard links.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgelora.atomic import write_dir_atomic
from edgelora.errors import EdgeloraError
from edgelora.runtime.runtime import sha256_file  # the digest the runtime checks on load

BUNDLE_FORMAT = "edgelora-bundle"
BUNDLE_FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json",)


def check_out(out: Path) -> None:
    """Refuse an `out` that exists and is neither empty nor an edgelora bundle: replacing it would delete
    the user's files. A directory counts as a bundle only if its manifest.json says so."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and manifest.get("format") == BUNDLE_FORMAT):
        raise EdgeloraError(f"{out}: exists and is not a bundle; choose an empty or new --out directory")


def write_bundle(out: Path, manifest: dict[str, Any], writers: dict[str, Callable[[Path], None]],
                 tokenizer_dir: Path | None, keep: Mapping[str, str | None] | None = None,
                 format_version: int = BUNDLE_FORMAT_VERSION) -> Path:
    """Create bundle `out` from `writers` (relative path -> function writing that file) and a manifest.

    The manifest gets `files` (sha256 of every file) and each adapter entry its file's sha256.

    Args:
        keep: files of the bundle now at `out` to carry over unchanged (relative path -> the sha256 its
            manifest records, reused rather than recomputed; None for a file the manifest does not list,
            such as the runtime's optimized-graph cache under `.cache/`). They are hard-linked (copied
            where the filesystem cannot link): every writer of bundles replaces files by rename, never
            in place, so the old and new bundle never share a file that changes.
        format_version: the bundle format the manifest declares (decoder bundles: 2).
    """
    out = Path(out)
    check_out(out)
    keep = dict(keep or {})
    written = set(writers) | (set(TOKENIZER_FILES) if tokenizer_dir is not None else set())
    if written & set(keep):  # writing into a hard link would change the old bundle's file in place
        raise ValueError(f"write_bundle: {sorted(written & set(keep))} both kept and written")
    def fill(tmp: Path) -> None:
        for rel in keep:
            _link(out / rel, tmp / rel)
        for rel, write in writers.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        files = {rel: sha for rel, sha in keep.items() if sha is not None}
        for p in tmp.rglob("*"):
            if p.is_file() and p.relative_to(tmp).as_posix() not in keep:
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        files = dict(sorted(files.items()))
        full = dict(manifest, format=BUNDLE_FORMAT, format_version=format_version, files=files)
        for entry in full.get("adapters", []):
            if entry.get("file"):
                entry["sha256"] = files[entry["file"]]
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")  # last: with it, the bundle is whole

    # The temporary sibling also clears what a killed export to `out` left behind (`edgelora.atomic`).
    write_dir_atomic(out, fill)
    return out


def _link(src: Path, dst: Path) -> None:
    """Carry `src` of the old bundle over to `dst` of the new one: a hard link, else a copy."""
    if not src.is_file():
        raise EdgeloraError(f"{src}: the bundle lists this file but it is missing; re-export the bundle")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
