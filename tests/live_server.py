"""A live `edgelora serve` app for tests: a real uvicorn server on 127.0.0.1 and a free port, in a thread, and
the stdlib http.client calls the tests make against it (shared by tests/test_serve.py and
tests/test_openai_serve.py).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from edgelora.runtime.serve import listen


@contextmanager
def running(app) -> Iterator[int]:
    """Serve `app` with uvicorn in a thread on 127.0.0.1 and a free port; yields the port."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.005)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


def interruptible() -> None:
    """`preexec_fn` for a served child the test stops with SIGINT: the default disposition, as in a terminal.
    A shell's background job (how CI or nohup may start pytest) inherits SIGINT ignored, and a child started
    with it ignored keeps ignoring it, as it should; the test stands for a user pressing Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def call(port: int, method: str, path: str, body: object = None, *, raw: bytes | None = None,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], object]:
    """One request; returns status, headers (lower-case names) and the JSON (or text) body."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        if own:
            conn.close()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    parsed = json.loads(text) if headers.get("content-type", "").startswith("application/json") else text
    return resp.status, headers, parsed


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
