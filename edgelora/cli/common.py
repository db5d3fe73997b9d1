"""What the verbs of the `edgelora` command share: the progress bar, JSON files, and library errors in flag words.

Only the CLI prints; library code reports progress through a callback and mistakes as `EdgeloraError`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError


# Without a terminal (nohup, a container, CI) progress is a log line at most this often (seconds), and the
# last count; a phase that starts (`describe` with another first word) is logged at once. Nothing is logged
# in a command's first LOG_EVERY_S seconds: quick commands stay quiet and a quick mistake stays one line.
LOG_EVERY_S = 5.0


class Progress:
    """A bar on a terminal's stderr (tqdm where installed, else a plain one), log lines when not a terminal.

    `total` None: a spinner-like bar whose description says what is happening (`describe`). A log or a pipe
    gets no bar debris but, once the work has run `LOG_EVERY_S` seconds, a line every `LOG_EVERY_S` seconds: `DESC: done/total UNIT (pct%) MESSAGE,
    RATE UNIT/s, ETA m:ss` (`lines` names the unit, steps by default), or `DESC: MESSAGE (+elapsed)`.
    """

    def __init__(self, total: int | None, desc: str, lines: str | None = None) -> None:
        self.total, self.desc, self.lines, self.n = total, desc, lines or "steps", 0
        self._tty = sys.stderr.isatty()
        self._start = time.monotonic()
        self._origin: tuple[int, float] | None = None  # (done, time) the rate is measured from
        self._logged_at: float | None = None  # when the last log line was written
        self._phase = ""
        self._tqdm = None
        if self._tty:
            try:
                from tqdm import tqdm
            except ImportError:  # runtime-only installs have no tqdm: the plain bar below
                pass
            else:
                self._tqdm = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update_to(self, done: int, message: str = "", total: int | None = None) -> None:
        """Set the count of finished units (a resumed run starts part-way) and what is running now; `total`
        sets the count of units where it became known late."""
        if total is not None and total != self.total:
            self.total = total
            if self._tqdm is not None:
                self._tqdm.total = total
        step, self.n = done - self.n, done
        now = time.monotonic()
        if self._origin is None:  # a resumed run's first count is not work done in this process
            self._origin = (done, now) if step > 1 else (done - step, self._start)
        if self._tqdm is not None:
            if message:
                self._tqdm.set_postfix_str(message, refresh=False)
            self._tqdm.update(step)
        elif self._tty and self.total:
            bar = "#" * (30 * done // self.total)
            sys.stderr.write(f"\r[{bar:<30}] {done}/{self.total} {message:<40}")
            sys.stderr.flush()
        elif not self._tty and now - self._start >= LOG_EVERY_S and (
                self._logged_at is None or now - self._logged_at >= LOG_EVERY_S
                or (self.total is not None and done >= self.total)):
            self._log(self._status(done, message, now), now)

    def _status(self, done: int, message: str, now: float) -> str:
        """`done/total unit (pct%) message, rate unit/s, ETA m:ss`: what a log line says about the count."""
        count = f"{done}/{self.total} {self.lines} ({100 * done // self.total}%)" if self.total else f"{done} {self.lines}"
        origin_done, origin_time = self._origin or (0, self._start)
        elapsed = now - origin_time
        rate = (done - origin_done) / elapsed if elapsed > 0 and done > origin_done else None
        speed = f", {rate:.3g} {self.lines}/s" if rate else ""
        eta = ""
        if rate and self.total:
            left = max(0.0, (self.total - done) / rate)
            eta = f", ETA {int(left // 60)}:{int(left % 60):02d}"
        return f"{count}{' ' + message if message else ''}{speed}{eta}"

    def _log(self, text: str, now: float) -> None:
        self._logged_at = now
        sys.stderr.write(f"{self.desc}: {text}\n")
        sys.stderr.flush()

    def describe(self, message: str) -> None:
        """Say what a bar without a total is doing now (logged at once when a new phase starts, else at most
        every `LOG_EVERY_S` seconds, when stderr is not a terminal)."""
        if self._tqdm is not None:
            self._tqdm.set_description_str(f"{self.desc}: {message}")
        elif not self._tty:
            now = time.monotonic()
            phase, self._phase = self._phase, message.split(" ", 1)[0]
            if now - self._start >= LOG_EVERY_S and (phase != self._phase or self._logged_at is None
                                                     or now - self._logged_at >= LOG_EVERY_S):
                self._log(f"{message} (+{now - self._start:.0f} s)", now)

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
