"""Write files and directories so that a crash or a kill never leaves half of one or loses the previous one.

Everything is written under a temporary sibling name (`.NAME.tmp-PID-XXXX`, same filesystem) and renamed
into place. Leftovers of a killed writer are removed by the next write once their process is gone. Stdlib
only: the runtime (no torch) uses `interrupted_write_note` too.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from edgelora.errors import EdgeloraError

_PROCESS_START = time.time()  # stands in for this process's start where a leftover names no process
_OWNER = re.compile(r"\.(?:tmp|old)-(\d+)(?:-|$)")


def temp_dir_for(target: Path) -> Path:
    """A new empty directory beside `target`, named after this process, with the mode a plain mkdir gives."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
    return tmp


def write_dir_atomic(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory `target` by letting `fill` write into a temporary sibling, then swapping it in."""
    target = Path(target)
    tmp = temp_dir_for(target)
    try:
        fill(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing an existing `target` only now that `new` is whole.

    POSIX cannot swap two directories in one rename, so an existing `target` is first renamed aside to
    `.NAME.old-PID-X` and `new` renamed in. A failure between the two puts the old one back; only a kill
    between them (microseconds) leaves `target` missing, and then the loaders name the aside copy
    (`interrupted_write_note`) and the next successful write removes it.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    clean_stale(target)


def write_file_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Write file `target` through `write(tmp_path)` and an fsync, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (power loss)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    """Write `text` (UTF-8) to file `target` atomically: a reader sees the old file or the whole new one."""
    write_file_atomic(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_writable(target: Path, option: str) -> None:
    """Fail now, not after minutes of work, when nothing can be written where `target` goes.

    Creates `target`'s missing parent directories and a file beside it, and removes them again.
    """
    target = Path(target)
    missing = []
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EdgeloraError(f"{target}: cannot write there ({ancestor} is a file, not a directory); choose another {option}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EdgeloraError(f"{target}: cannot write there ({exc.strerror or exc}); choose another {option}") from None
    finally:
        for directory in missing:  # leave no empty directories behind
            try:
                directory.rmdir()
            except OSError:
                pass


def _owner_gone(path: Path) -> bool:
    match = _OWNER.search(path.name)
    if match and os.name == "posix":
        pid = int(match[1])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by someone else
            return False
        return False
    try:  # no process named (or not POSIX): older than this process means nobody is writing it
        return path.stat().st_mtime < _PROCESS_START
    except OSError:
        return False


def clean_stale(target: Path) -> list[Path]:
    """Remove leftovers of killed writers of `target` (`.NAME.tmp-*`, and `.NAME.old-*` once `target` exists).

    A leftover counts as stale when the process named in it no longer runs. While `target` is missing, an
    `.old-*` copy is the last whole version of an interrupted replace and is kept. Returns what was removed.
    """
    target = Path(target)
    removed = []
    kinds = ("tmp", "old") if target.exists() else ("tmp",)
    for kind in kinds:
        for path in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            if not _owner_gone(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def interrupted_write_note(target: Path) -> str:
    """For a missing `target`: "" or a sentence naming the previous version an interrupted replace left aside."""
    target = Path(target)
    olds = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if target.exists() or not olds:
        return ""
    return f" (a previous write was interrupted; the previous version is at {olds[-1]}: rename it to {target.name})"
