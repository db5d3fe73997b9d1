"""`edgelora serve` on loopback: answers against offline `Runtime.predict` under concurrent load, every 4xx,
503 on a full queue, graceful shutdown on SIGTERM, and the micro-batcher's grouping on its own.

Servers are real uvicorn servers on 127.0.0.1 and a free port, in a thread (or, for SIGTERM, a process of
their own), serving the tiny bundles of test_runtime; clients use the stdlib's http.client.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tiny_bundle import TEXTS, WORDS, SlowRuntime, make_bundle, write_manifest

from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from live_server import call, interruptible, metric, running  # noqa: E402 - after the skip: it needs uvicorn
from edgelora.runtime.serve import (  # noqa: E402 - after the skip: these need starlette at call time
    FP32_MERGE_ATOL,
    MicroBatcher,
    create_app,
    listen,
    merges_requests,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*truncated to it:RuntimeWarning")

LOAD_REQUESTS = 200
LOAD_CLIENTS = 16
LOAD_TIME_CAP_S = 30.0


# -- helpers ---------------------------------------------------------------------------------------


def random_requests(adapters: list[str | None], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = WORDS[2:] + ["zzz"]  # one unknown word
    return [{"texts": [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 4))],
             "adapter": rng.choice(adapters)} for _ in range(n)]


def load(port: int, requests: list[dict]) -> list[tuple[int, object]]:
    """LOAD_CLIENTS threads, each on its own keep-alive connection, share `requests`; answers in order."""
    answers: list[tuple[int, object] | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_TIME_CAP_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LOAD_TIME_CAP_S)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                status, _, body = call(port, "POST", "/v1/predict", requests[i], conn=conn)
                answers[i] = (status, body)
        finally:
            conn.close()

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        for f in [pool.submit(client) for _ in range(LOAD_CLIENTS)]:
            f.result()
    assert all(a is not None for a in answers), "the load did not finish within its time cap"
    return answers  # type: ignore[return-value]


def make_int8_bundle(root: Path):
    """The tiny merged bundle with its head MatMul dynamically quantized (per-tensor uint8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tiny = make_bundle(root, "merged", "int8")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" notice
    quantize_dynamic(tiny.path / "model.onnx", tiny.path / "model.onnx", op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    write_manifest(tiny.path, json.loads((tiny.path / "manifest.json").read_text()))
    return tiny


@pytest.fixture(scope="module")
def switchable_path(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("serve"), "switchable").path


# -- answers under load ----------------------------------------------------------------------------


def test_merged_fp32_answers_match_offline_predict_under_load(switchable_path: Path) -> None:
    requests = random_requests(["sentiment", "topic"], LOAD_REQUESTS)
    offline = Runtime(switchable_path, intra_op_threads=1)
    expected = [offline.predict(r["texts"], adapter=r["adapter"]) for r in requests]
    app = create_app(Runtime(switchable_path, intra_op_threads=1), batching="on", window_ms=5, max_batch=16)
    with running(app) as port:
        answers = load(port, requests)
        _, _, metrics = call(port, "GET", "/metrics")
    for req, want, (status, body) in zip(requests, expected, answers):
        assert status == 200, body
        assert body["adapter"] == req["adapter"] and body["model"] == switchable_path.name
        assert len(body["predictions"]) == len(want)
        for got, ref in zip(body["predictions"], want):
            assert got["label"] == ref["label"]
            assert got["scores"] == pytest.approx(ref["scores"], abs=FP32_MERGE_ATOL)
    runs = metric(metrics, "edgelora_batch_requests_count")
    assert runs < LOAD_REQUESTS, "no two requests were merged: the load test did not exercise micro-batching"
    assert metric(metrics, "edgelora_batch_requests_sum") == LOAD_REQUESTS
    assert metric(metrics, 'edgelora_requests_total{adapter="topic",status="200"}') == sum(
        r["adapter"] == "topic" for r in requests)


def test_int8_answers_are_bit_identical_to_offline_predict_under_load(tmp_path: Path) -> None:
    tiny = make_int8_bundle(tmp_path)
    offline = Runtime(tiny.path, intra_op_threads=1)
    # The premise: on this bundle a request's scores depend on its batch-mates (one activation scale per run).
    assert offline.predict(TEXTS[:2])[0] != offline.predict(TEXTS[:1])[0]
    requests = random_requests([None, "sentiment"], LOAD_REQUESTS, seed=1)
    expected = [offline.predict(r["texts"], adapter=r["adapter"]) for r in requests]
    app = create_app(Runtime(tiny.path, intra_op_threads=1), window_ms=5)  # batching="auto": int8 never merges
    with running(app) as port:
        answers = load(port, requests)
        _, _, metrics = call(port, "GET", "/metrics")
    for want, (status, body) in zip(expected, answers):
        assert status == 200, body
        assert body["predictions"] == want  # exact: floats survive the JSON round trip
        assert body["adapter"] == "sentiment"  # null resolves to the merged bundle's adapter
    assert metric(metrics, "edgelora_batch_requests_count") == LOAD_REQUESTS  # one request per run


def test_a_lone_request_is_not_held_by_delayed_acks(switchable_path: Path) -> None:
    # Without TCP_NODELAY on the accepted sockets each response's body waited for the client's delayed ACK
    # of its headers: 40+ ms per request on Linux loopback for a model that runs in well under 1 ms.
    app = create_app(Runtime(switchable_path, intra_op_threads=1), window_ms=0)
    body = {"texts": ["the good film"], "adapter": "topic"}
    with running(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            assert call(port, "POST", "/v1/predict", body, conn=conn)[0] == 200
            times.append(time.perf_counter() - t0)
        conn.close()
    assert sorted(times)[10] < 0.025, f"median {sorted(times)[10] * 1000:.1f} ms"


# -- bad requests ----------------------------------------------------------------------------------

BAD = [
    # (name, body or raw bytes, status, field)
    ("malformed JSON", b'{"texts": ["a"', 400, "body"),
    ("not UTF-8", b'\xff\xfe', 400, "body"),
    ("not an object", ["good film"], 400, "body"),
    ("unknown field", {"texts": ["a"], "adaptor": "topic"}, 422, "adaptor"),
    ("no texts", {"adapter": "topic"}, 422, "texts"),
    ("texts a string", {"texts": "good film", "adapter": "topic"}, 422, "texts"),
    ("texts empty", {"texts": [], "adapter": "topic"}, 422, "texts"),
    ("a text not a string", {"texts": ["a", 3], "adapter": "topic"}, 422, "texts[1]"),
    ("too many texts", {"texts": ["a"] * 5, "adapter": "topic"}, 413, "texts"),
    ("text too long", {"texts": ["a" * 51], "adapter": "topic"}, 413, "texts[0]"),
    ("body too large", {"texts": ["a"], "adapter": "topic", "pad": " " * 3000}, 413, "body"),
    ("unknown adapter", {"texts": ["a"], "adapter": "nope"}, 404, "adapter"),
    ("no default adapter", {"texts": ["a"]}, 422, "adapter"),
    ("adapter not a string", {"texts": ["a"], "adapter": 1}, 422, "adapter"),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(switchable_path: Path) -> None:
    rt = Runtime(switchable_path, intra_op_threads=1)
    app = create_app(rt, max_texts=4, max_text_chars=50, max_body_bytes=2048)
    good = {"texts": ["the good film"], "adapter": "topic"}
    with running(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for name, body, status, field in BAD:
            raw = body if isinstance(body, bytes) else None
            got, _, answer = call(port, "POST", "/v1/predict", None if raw else body, raw=raw)
            assert (got, answer["error"]["field"]) == (status, field), f"{name}: {answer}"
            assert answer["error"]["message"]
            if name == "unknown adapter":
                assert answer["error"]["available"] == ["sentiment", "topic"]
                assert "available: sentiment, topic" in answer["error"]["message"]
            assert call(port, "POST", "/v1/predict", good, conn=conn)[0] == 200, f"not serving after {name}"
        chunked = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # no Content-Length: counted as read
        chunked.request("POST", "/v1/predict", body=iter([b'{"texts": ["', b"a" * 1500, b"a" * 1500, b'"]}']),
                        encode_chunked=True, headers={"Content-Type": "application/json"})
        response = chunked.getresponse()
        assert (response.status, json.loads(response.read())["error"]["field"]) == (413, "body")
        chunked.close()
        assert call(port, "POST", "/v1/predict", good, conn=conn)[0] == 200
        assert call(port, "GET", "/nowhere")[0] == 404
        assert call(port, "GET", "/v1/predict")[0] == 405
        status, _, listing = call(port, "GET", "/v1/adapters")
        assert status == 200 and listing["adapters"] == [{"name": "sentiment", "labels": ["neg", "pos"]},
                                                         {"name": "topic", "labels": ["art", "sport", "news"]}]
        assert listing["default"] is None and listing["batching"]["merge"] is True  # fp32, batching auto
        assert call(port, "GET", "/healthz")[:3:2] == (200, {"status": "ok"})
        status, headers, metrics = call(port, "GET", "/metrics")
        conn.close()
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(metrics, 'edgelora_requests_total{adapter="",status="422"}') == 7
    assert metric(metrics, 'edgelora_requests_total{adapter="",status="413"}') == 4
    assert metric(metrics, 'edgelora_requests_total{adapter="topic",status="200"}') == len(BAD) + 1
    assert metric(metrics, 'edgelora_request_duration_seconds_count{adapter="topic"}') == len(BAD) + 1
    assert metric(metrics, 'edgelora_request_duration_seconds_bucket{adapter="topic",le="+Inf"}') == len(BAD) + 1
    assert metric(metrics, "edgelora_queue_depth") == 0 and metric(metrics, "edgelora_in_flight_requests") == 0


def test_a_full_queue_answers_503_with_retry_after(switchable_path: Path) -> None:
    rt = SlowRuntime(switchable_path, intra_op_threads=1)
    app = create_app(rt, queue_limit=1, batching="off")
    body = {"texts": ["the good film"], "adapter": "sentiment"}
    want = Runtime(switchable_path, intra_op_threads=1).predict(body["texts"], adapter="sentiment")
    with running(app) as port:
        with ThreadPoolExecutor(6) as pool:  # one runs, one waits, the rest find the queue full
            answers = list(pool.map(lambda _: call(port, "POST", "/v1/predict", body), range(6)))
        statuses = sorted(a[0] for a in answers)
        assert statuses.count(503) >= 1 and set(statuses) == {200, 503}, statuses
        for status, headers, answer in answers:
            if status == 503:
                assert headers["retry-after"] == "1" and "retry after 1 s" in answer["error"]["message"]
            else:
                assert answer["predictions"] == want
        assert call(port, "POST", "/v1/predict", body)[0] == 200  # drained: serving again


_SIGTERM_SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from tiny_bundle import SlowRuntime
from edgelora.runtime.serve import create_app, listen, run_app
SlowRuntime.delay = 1.5
app = create_app(SlowRuntime({bundle!r}, intra_op_threads=1))
sock = listen("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
run_app(app, sock, log_level="warning")
"""


def test_sigterm_finishes_the_in_flight_request_then_exits(switchable_path: Path) -> None:
    code = _SIGTERM_SERVER.format(tests=str(Path(__file__).parent), bundle=str(switchable_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        body = {"texts": ["a bad movie"], "adapter": "topic"}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, port, "POST", "/v1/predict", body)
            deadline = time.monotonic() + 10
            while metric(call(port, "GET", "/metrics")[2], "edgelora_in_flight_requests") < 1:
                assert time.monotonic() < deadline, "the request never got in flight"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(ConnectionRefusedError):  # stopped accepting while the request runs
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            assert not pending.done()
            status, _, answer = pending.result(timeout=10)
        assert status == 200
        assert answer["predictions"] == Runtime(switchable_path, intra_op_threads=1).predict(
            body["texts"], adapter="topic")
        assert proc.wait(timeout=10) == -signal.SIGTERM, proc.stderr.read()  # uvicorn re-raises the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_command_announces_its_address_and_stops_on_sigint(switchable_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "serve", str(switchable_path), "--port", "0",
                             "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        line = proc.stderr.readline()
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+) \(.*switchable fp32, adapters sentiment, topic\)",
                          line)
        assert found, line
        status, _, listing = call(int(found.group(1)), "GET", "/v1/adapters")
        assert status == 200 and listing["model"] == switchable_path.name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the micro-batcher alone -----------------------------------------------------------------------


class RecordingRuntime:
    """Stands in for Runtime: records each predict call (from the worker thread) and labels rows by text."""

    adapters = ("a", "b")
    mixes_in_one_run = False

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], object, dict]] = []
        self.threads: set[int] = set()

    def predict(self, texts, adapter=None, *, adapters=None, **kwargs):
        self.threads.add(threading.get_ident())
        self.calls.append((tuple(texts), adapters if adapters is not None else adapter, kwargs))
        per_row = adapters if adapters is not None else [adapter] * len(texts)
        return [{"label": f"{a}:{t}"} for a, t in zip(per_row, texts)]


def _batch(runtime: RecordingRuntime, jobs: list[tuple[list[str], str]], *, gap_s: float = 0.0, **options):
    async def main():
        batcher = MicroBatcher(runtime, **options)
        await batcher.start()
        futures = []
        for texts, adapter in jobs:
            futures.append(batcher.submit(texts, adapter))
            if gap_s:
                await asyncio.sleep(gap_s)
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    return asyncio.run(main())


def test_batcher_merges_per_adapter_and_routes_each_answer_back() -> None:
    rt = RecordingRuntime()
    jobs = [(["x"], "a"), (["y"], "b"), (["z", "w"], "a"), (["v"], "b"), (["u"], "a")]
    results = _batch(rt, jobs, window_ms=100)
    assert results == [[{"label": f"{a}:{t}"} for t in texts] for texts, a in jobs]
    assert [c[:2] for c in rt.calls] == [(("x", "z", "w", "u"), "a"), (("y", "v"), "b")]
    assert len(rt.threads) == 1 and threading.get_ident() not in rt.threads  # one worker thread, not the loop's


def test_batcher_mixes_adapters_in_one_run_only_where_the_bundle_has_a_bank() -> None:
    jobs = [(["x"], "a"), (["y"], "b"), (["z"], "a")]
    rt = RecordingRuntime()
    rt.mixes_in_one_run = True
    results = _batch(rt, jobs, window_ms=100, mix=True)
    assert [c[:2] for c in rt.calls] == [(("x", "y", "z"), ["a", "b", "a"])]
    assert results == [[{"label": "a:x"}], [{"label": "b:y"}], [{"label": "a:z"}]]
    no_bank = RecordingRuntime()
    _batch(no_bank, jobs, window_ms=100, mix=True)
    assert [c[:2] for c in no_bank.calls] == [(("x", "z"), "a"), (("y",), "b")]


def test_batcher_respects_max_batch_and_the_window() -> None:
    rt = RecordingRuntime()
    _batch(rt, [(["1", "2"], "a"), (["3", "4"], "a"), (["5"], "a"), (["6", "7", "8", "9"], "a")],
           window_ms=100, max_batch=3)
    # 1,2 + 3,4 would exceed 3 texts; 5 joins 3,4; a request over max_batch still runs, alone
    assert [c[0] for c in rt.calls] == [("1", "2"), ("3", "4", "5"), ("6", "7", "8", "9")]
    late = RecordingRuntime()
    _batch(late, [(["1"], "a"), (["2"], "a")], gap_s=0.05, window_ms=0)  # 2 arrives after 1 ran
    assert [c[0] for c in late.calls] == [("1",), ("2",)]
    held = RecordingRuntime()
    _batch(held, [(["1"], "a"), (["2"], "a")], gap_s=0.05, window_ms=500)  # the window holds 1 for 2
    assert [c[0] for c in held.calls] == [("1", "2")]


def test_without_merging_each_request_makes_the_offline_call() -> None:
    rt = RecordingRuntime()
    _batch(rt, [(["x"], "a"), (["y", "z"], "a"), (["w"], "b")], window_ms=100, merge=False)
    assert rt.calls == [(("x",), "a", {}), (("y", "z"), "a", {}), (("w",), "b", {})]  # predict(texts, adapter=)


def test_batching_rule_and_option_checks() -> None:
    assert merges_requests("auto", "fp32") and not merges_requests("auto", "int8")
    assert merges_requests("on", "int8") and not merges_requests("off", "fp32")
    assert not merges_requests("auto", None)  # unknown precision: never merge
    with pytest.raises(EdgeloraError, match=r"batching is 'sometimes'; choose from auto, on, off"):
        merges_requests("sometimes", "fp32")
    with pytest.raises(EdgeloraError, match=r"max_batch is 0; pass a positive integer"):
        MicroBatcher(RecordingRuntime(), max_batch=0)
    with pytest.raises(EdgeloraError, match=r"window_ms is -1"):
        MicroBatcher(RecordingRuntime(), window_ms=-1)


# -- import hygiene and CLI glue -------------------------------------------------------------------


def test_serve_imports_no_torch_and_parses_arguments_without_starlette() -> None:
    code = ("import sys, argparse; sys.modules['torch'] = None; sys.modules['starlette'] = None\n"
            "from edgelora.cli import serve\n"
            "p = argparse.ArgumentParser(); serve.add_serve_arguments(p)\n"
            "args = p.parse_args(['B', '--port', '0', '--batching', 'off'])\n"
            "assert (args.port, args.batching, args.host) == (0, 'off', '127.0.0.1')\n"
            "try:\n    serve.serve_command(args)\nexcept serve.EdgeloraError as e:\n    print(e)\n"
            "assert sys.modules['torch'] is None")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "install them: pip install 'edgelora[serve]'" in proc.stdout


def test_a_port_in_use_is_one_clear_error() -> None:
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(EdgeloraError, match=rf"127.0.0.1:{port}: cannot listen \(.*\); pick another"):
            listen("127.0.0.1", port)
    finally:
        taken.close()
