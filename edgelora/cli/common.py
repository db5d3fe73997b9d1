"""What the verbs of the `edgelora` command share: the progress bar, JSON files, and library errors in flag words.

Only the CLI prints; library code reports progress through a callback and mistakes as `EdgeloraError`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError


class Progress:
    """A bar on a terminal's stderr (tqdm where installed, else a plain one), lines every tenth when not a terminal.

    `total` None: a spinner-like bar whose description says what is happening (`describe`). A log or a pipe
    gets no bar debris: nothing, or with `lines` (a unit name) at most ten `DESC: done/total UNIT` lines.
    """

    def __init__(self, total: int | None, desc: str, lines: str | None = None) -> None:
        self.total, self.desc, self.lines, self.n = total, desc, lines, 0
        self._tty = sys.stderr.isatty()
        self._tqdm = None
        if self._tty:
            try:
                from tqdm import tqdm
            except ImportError:  # runtime-only installs have no tqdm: the plain bar below
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update_to(self, done: int, message: str = "") -> None:
        """Set the count of finished units (a resumed run starts part-way) and what is running now."""
        step, self.n = done - self.n, done
        if self._tqdm is not None:
            if message:
                self._tqdm.set_postfix_str(message, refresh=False)
            self._tqdm.update(step)
        elif self._tty and self.total:
            bar = "#" * (30 * done // self.total)
            sys.stderr.write(f"\r[{bar:<30}] {done}/{self.total} {message:<40}")
            sys.stderr.flush()
        elif self.lines and self.total and (done == self.total or done % max(1, self.total // 10) == 0):
            sys.stderr.write(f"{self.desc}: {done}/{self.total} {self.lines}\n")
            sys.stderr.flush()

    def describe(self, message: str) -> None:
        """Say what a bar without a total is doing now."""
        if self._tqdm is not None:
            self._tqdm.set_description_str(f"{self.desc}: {message}")

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._tty and self.total and self.n:
            sys.stderr.write("\n")
            sys.stderr.flush()


def write_json(obj: Any, path: str | Path) -> None:
    """`obj` as indented JSON, written atomically (a reader sees the old file or the whole new one)."""
    from edgelora.atomic import write_text_atomic

    write_text_atomic(Path(path), json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def as_flags(fields: Mapping[str, str], phrases: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a library error in the words of the command line: `field=value` as `--flag value`.

    Library errors name the config field or parameter (`smoothing=1.5 must be ...`), which a Python caller
    sets; the CLI user set a flag (`--smooth 1.5 must be ...`). `phrases` rewrites whole phrases first, for
    messages that name a field without a value.
    """
    try:
        yield
    except EdgeloraError as exc:
        message = flag_words(str(exc), fields, phrases)
        if message == str(exc):
            raise
        raise EdgeloraError(message) from exc


def flag_words(message: str, fields: Mapping[str, str], phrases: Mapping[str, str] | None = None) -> str:
    """`message` in the words of the command line (what `as_flags` does to errors; for warnings the library returns)."""
    for phrase, flag_phrase in (phrases or {}).items():
        message = message.replace(phrase, flag_phrase)
    for field, flag in fields.items():
        # field='text' or field=value (up to a space or the punctuation that ends a clause)
        message = re.sub(rf"(?<![\w.-]){re.escape(field)}=(?:'([^']*)'|([^\s,;:()]+))",
                         lambda m, flag=flag: f"{flag} {m[1] if m[1] is not None else m[2]}", message)
    return message
