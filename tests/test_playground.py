"""The playground page (`GET /` of `edgelora serve` on a decoder bundle) as a file: it loads nothing from
elsewhere, every control has a label, and the wheel ships it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from edgelora.runtime.playground import PAGE, playground_html

REPO = Path(__file__).resolve().parent.parent
SKIP_BROWSER = "EDGELORA_SKIP_BROWSER"
PROMPT = "Turn on the fan in the bedroom please"
MAX_TOKENS = 24  # the tiny bundle's context is 96 tokens; the chat-templated prompt takes about 30
STOP_MAX_TOKENS = 60
# The stop test throttles the browser's downloads so the stream cannot finish between its first piece and the
# click: 60 events of ~150 bytes take ~9 s at this rate.
THROTTLE_BYTES_PER_S = 1000
BROWSER_WAIT_S = 60


# -- the page as a file ------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every start tag with its attributes, the text of <style> and <script>, and the labels' targets."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in:
            self.inline.append(data)


def parsed_page() -> _Page:
    page = _Page()
    page.feed(playground_html().decode("utf-8"))
    return page


def test_page_loads_nothing_from_elsewhere() -> None:
    page = parsed_page()
    assert any(tag == "script" for tag, _ in page.tags) and page.inline, "the script and style are inline"
    for tag, attrs in page.tags:
        assert "src" not in attrs, f"<{tag} src=...>: the page must not load files"
        href = attrs.get("href")
        assert href is None or href.startswith("data:"), f"<{tag} href={href!r}>: only data: URIs"
    code = "\n".join(page.inline)
    assert not re.search(r"https?://|@import|url\(", code), "no address, import or url() in the inline CSS/JS"
    # the script talks to this server only, by absolute paths
    assert set(re.findall(r"fetch\(\s*\"([^\"]+)\"", code)) == {"/v1/models"}
    assert {"/v1/chat/completions", "/v1/completions"} <= set(re.findall(r"\"(/v1/[a-z/]+)\"", code))


def test_every_control_has_a_label() -> None:
    page = parsed_page()
    labelled = {attrs["for"] for tag, attrs in page.tags if tag == "label" and attrs.get("for")}
    ids = {attrs["id"] for _, attrs in page.tags if attrs.get("id")}
    assert labelled <= ids, f"labels for missing controls: {sorted(labelled - ids)}"
    controls = [(tag, attrs) for tag, attrs in page.tags if tag in ("input", "select", "textarea", "output")]
    assert len(controls) >= 8
    for tag, attrs in controls:
        assert attrs.get("id") in labelled or attrs.get("aria-labelledby") or attrs.get("aria-label"), \
            f"<{tag} id={attrs.get('id')!r}> has no label"
    html = next(attrs for tag, attrs in page.tags if tag == "html")
    assert html.get("lang") == "en"
    live = {attrs.get("id"): attrs.get("aria-live") for _, attrs in page.tags if attrs.get("aria-live")}
    assert live.get("answer") == "polite" and live.get("status") == "polite", "the answer and status are announced"


def test_wheel_ships_the_page(tmp_path: Path) -> None:
    """A wheel built from the project's files holds the page where `playground_html` reads it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    for room in ("edgelora", "exporters", "runtime"):
        shutil.copytree(REPO / room, src / room, ignore=shutil.ignore_patterns("__pycache__", ".cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("edgelora-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(f"edgelora/runtime/{PAGE}") == playground_html()
