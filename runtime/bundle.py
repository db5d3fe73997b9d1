"""The bundle format, in one place: a bundle's files, reading it (checked) and writing it (atomic).

A bundle is a directory: `manifest.json`, `model.onnx`, `adapters/<name>.onnx_adapter` and the adapter
bank in switchable mode, and the tokenizer files. The exporters write bundles through `write_bundle`, the
runtime reads them through `read_manifest`. The names and typed records of manifest.json live in
`edgelora.runtime.manifest` and are re-exported here, so this module is the one place exporters import
the format from. Imports no torch and nothing from the training side, so a CPU deployment reads bundles
as exporters write them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from edgelora.atomic import interrupted_write_note, write_dir_atomic
from edgelora.errors import EdgeloraError
from edgelora.runtime.manifest import (
    ADAPTER_IDS,
    ADAPTER_NAME,
    ADAPTER_NAME_RULE,
    ADAPTERS_DIR,
    BANK_FILE,
    CAUSAL_LM,
    DECODER_FORMAT_VERSION,
    DECODER_TOKENIZER_FILES,
    EMBEDDINGS,
    ENCODER_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    HEADS,
    LOGITS_TO_KEEP,
    MANIFEST_FILE,
    MEAN_POOLED,
    MODEL_FILE,
    MODES,
    PER_TOKEN,
    PRECISIONS,
    SEQUENCE_CLASSIFICATION,
    TASKS,
    TOKEN_CLASSIFICATION,
    TOKENIZER_FILE,
    TOKENIZER_FILES,
    AdapterEntry,
    Bank,
    BaseInfo,
    Generation,
    Manifest,
    Quantization,
    Requires,
    TokenizerSpec,
    adapter_file,
    decoder_inputs,
    decoder_outputs,
    encoder_task,
    format_version_for,
)

__all__ = [
    "ADAPTERS_DIR", "ADAPTER_IDS", "ADAPTER_NAME", "ADAPTER_NAME_RULE", "BANK_FILE", "CAUSAL_LM",
    "DECODER_FORMAT_VERSION", "DECODER_TOKENIZER_FILES", "EMBEDDINGS", "ENCODER_FORMAT_VERSION", "FORMAT",
    "FORMAT_VERSION", "HEADS", "LOGITS_TO_KEEP", "MANIFEST_FILE", "MEAN_POOLED", "MODEL_FILE", "MODES", "PER_TOKEN", "PRECISIONS", "SEQUENCE_CLASSIFICATION", "TASKS",
    "TOKENIZER_FILE", "TOKENIZER_FILES", "TOKEN_CLASSIFICATION", "AdapterEntry", "Bank", "BaseInfo", "Generation",
    "Manifest", "Quantization", "Requires", "TokenizerSpec", "adapter_file", "check_out", "decoder_inputs",
    "decoder_outputs", "encoder_task", "format_version_for", "read_manifest", "sha256_file", "write_bundle",
]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: the digest bundle manifests record for every file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



# --- reading -------------------------------------------------------------------------------------------------


def read_manifest(bundle_dir: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest.json; with `verify`, also every listed file's sha256.

    Raises EdgeloraError (one line naming the file) on a missing directory or manifest, invalid JSON,
    a foreign format, a newer format_version, a malformed field, or a missing or altered file.
    """
    bundle = Path(bundle_dir)
    if not bundle.exists():
        raise EdgeloraError(
            f"{bundle}: bundle directory not found{interrupted_write_note(bundle)}; pass the directory `edgelora export` wrote"
        )
    if not bundle.is_dir():
        raise EdgeloraError(f"{bundle}: not a directory; a bundle is a directory with manifest.json and model.onnx")
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise EdgeloraError(f"{path}: missing; this is not an edgelora bundle (re-export it with `edgelora export`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EdgeloraError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); re-export the bundle") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeloraError(f"{path}: cannot read it ({e}); check the file") from None
    manifest = Manifest.from_dict(data, path)
    if verify:
        _verify_files(bundle, manifest, path)
    return manifest


def _verify_files(bundle: Path, m: Manifest, path: Path) -> None:
    needed = [MODEL_FILE]
    if m.tokenizer is not None:
        needed.append(m.tokenizer.file)
    for a in m.adapters:
        if m.mode == "switchable":
            needed.append(a.file)
            if a.sha256 and a.sha256 != m.files.get(a.file):
                raise EdgeloraError(f"{path}: adapter {a.name!r} sha256 disagrees with 'files'; re-export the bundle")
    if m.mode == "switchable" and m.bank is not None:
        needed.append(m.bank.file)
    for rel in needed:
        if rel not in m.files:
            raise EdgeloraError(f"{path}: 'files' lists no sha256 for {rel}; re-export the bundle")
    for rel, digest in m.files.items():
        f = bundle / rel
        if not f.is_file():
            raise EdgeloraError(f"{f}: missing (listed in manifest.json); the bundle is incomplete, re-export it")
        if sha256_file(f) != str(digest).lower():
            raise EdgeloraError(
                f"{f}: sha256 does not match manifest.json (changed or corrupt); restore the file or re-export"
            )


# --- writing -------------------------------------------------------------------------------------------------


def check_out(out: Path) -> None:
    """Refuse an `out` that exists and is neither empty nor an edgelora bundle: replacing it would delete
    the user's files. A directory counts as a bundle only if its manifest.json says so."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        data = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise EdgeloraError(f"{out}: exists and is not a bundle; choose an empty or new directory for out")


def write_bundle(out: Path, manifest: Manifest, writers: Mapping[str, Callable[[Path], None]],
                 tokenizer_dir: Path | None, keep: Mapping[str, str | None] | None = None) -> Manifest:
    """Create bundle `out` from `writers` (relative path -> function writing that file) and a manifest;
    returns the manifest written, with `files` (sha256 of every file) and each adapter's sha256 filled in.

    Everything is written into a temporary sibling directory and renamed into place at the end, so a failed
    or killed export never leaves half a bundle and never destroys the previous one (`edgelora.atomic`).

    Args:
        tokenizer_dir: the base's directory, whose tokenizer files are copied (for task "causal-lm" also
            its tokenizer_config.json and chat_template.jinja, where present); None: no tokenizer files.
        keep: files of the bundle now at `out` to carry over unchanged (relative path -> the sha256 its
            manifest records, reused rather than recomputed; None for a file the manifest does not list,
            such as the runtime's optimized-graph cache under `.cache/`). They are hard-linked (copied
            where the filesystem cannot link): every writer of bundles replaces files by rename, never
            in place, so the old and new bundle never share a file that changes.
    """
    out = Path(out)
    check_out(out)
    keep = dict(keep or {})
    names = DECODER_TOKENIZER_FILES if manifest.task == CAUSAL_LM else TOKENIZER_FILES
    tokenizer_files = [n for n in names if (tokenizer_dir / n).is_file()] if tokenizer_dir is not None else []
    written = set(writers) | set(tokenizer_files)
    if written & set(keep):  # writing into a hard link would change the old bundle's file in place
        raise ValueError(f"write_bundle: {sorted(written & set(keep))} both kept and written")
    final: list[Manifest] = []

    def fill(tmp: Path) -> None:
        for rel in keep:
            _link(out / rel, tmp / rel)
        for rel, write in writers.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        for name in tokenizer_files:
            shutil.copyfile(tokenizer_dir / name, tmp / name)
        files = {rel: sha for rel, sha in keep.items() if sha is not None}
        for p in tmp.rglob("*"):
            if p.is_file() and p.relative_to(tmp).as_posix() not in keep:
                files[p.relative_to(tmp).as_posix()] = sha256_file(p)
        files = dict(sorted(files.items()))
        adapters = tuple(dataclasses.replace(a, sha256=files[a.file]) if a.file else a for a in manifest.adapters)
        done = dataclasses.replace(manifest, adapters=adapters, files=files, format=FORMAT,
                                   format_version=max(manifest.format_version, format_version_for(manifest.task)))
        text = done.to_json()
        Manifest.from_dict(json.loads(text), out / MANIFEST_FILE)  # write only what the reader accepts
        (tmp / MANIFEST_FILE).write_text(text)  # last: with it, the bundle is whole
        final.append(done)

    write_dir_atomic(out, fill)
    return final[0]


def _link(src: Path, dst: Path) -> None:
    """Carry `src` of the old bundle over to `dst` of the new one: a hard link, else a copy."""
    if not src.is_file():
        raise EdgeloraError(f"{src}: the bundle lists this file but it is missing; re-export the bundle")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
