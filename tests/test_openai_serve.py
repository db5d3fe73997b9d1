"""`edgelora serve` on a decoder bundle speaks OpenAI's API: the official `openai` client, unchanged, gets
plain and streamed completions and chats equal to offline generation, concurrent requests do not change each
other's tokens, bad requests get OpenAI-shaped 4xx errors naming the field, a full server answers 503 with
Retry-After, and a client that goes away frees its row at once.

Servers are real uvicorn servers on 127.0.0.1 and a free port (tests/test_serve.py's `running`), serving the
tiny decoder bundles of tests/served_decoder.py.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from served_decoder import CONTEXT, PROMPTS, tiny_adapter_bundle, tiny_switchable_bundle

from edgelora.errors import EdgeloraError
from edgelora.runtime import Runtime

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from live_server import call, interruptible, metric, running  # noqa: E402 - after the skips: they need uvicorn

from edgelora.runtime.serve import create_app  # noqa: E402

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lights off in the kitchen"}]
ERROR_KEYS = {"message", "type", "param", "code"}
CANCEL_WITHIN_S = 2.0  # a closed connection must free its row well before the slowed request could finish


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai")


@pytest.fixture(scope="module")
def bundle(root) -> Path:
    return tiny_adapter_bundle(root, "demo")


@pytest.fixture(scope="module")
def runtime(bundle) -> Runtime:
    return Runtime(bundle, intra_op_threads=1)


@pytest.fixture(scope="module")
def server(bundle):
    """One server for the tests that only read answers; yields (port, app)."""
    app = create_app(Runtime(bundle, intra_op_threads=1))
    with running(app) as port:
        yield port, app


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def offline(runtime: Runtime, prompt, max_tokens: int, **kwargs) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of the same request run alone, offline."""
    gen = runtime.generator()
    text = gen.generate(prompt, max_new_tokens=max_tokens, **kwargs)
    return text, gen.stats.prompt_tokens[0], len(gen.stats.token_ids[0])


def test_models_lists_the_base_and_each_adapter(server, bundle) -> None:
    port, _ = server
    ids = [m.id for m in client(port).models.list()]
    assert ids == [bundle.name, "demo"]
    demo = client(port).models.retrieve("demo")
    assert demo.id == "demo" and demo.owned_by == "edgelora"
    status, _, body = call(port, "GET", "/v1/models/nope")
    assert status == 404 and set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("model", ["demo", None], ids=["adapter", "base"])
def test_the_openai_client_gets_offline_generation_plain_and_streamed(server, runtime, bundle, model) -> None:
    port, _ = server
    c = client(port)
    name = model or bundle.name
    text, p, n = offline(runtime, PROMPTS[2], 24)
    r = c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=24, temperature=0)
    assert r.choices[0].text == text and r.model == name and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (p, n, p + n)
    assert r.choices[0].finish_reason == ("length" if n == 24 else "stop")
    chunks = list(c.completions.create(model=name, prompt=PROMPTS[2], max_tokens=24, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text and len(chunks) > 3
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].choices[0].finish_reason is not None

    chat_text, p, n = offline(runtime, CHAT, 30)
    r = c.chat.completions.create(model=name, messages=CHAT, max_tokens=30, temperature=0)
    assert r.choices[0].message.content == chat_text and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (p, n)
    chunks = list(c.chat.completions.create(model=name, messages=CHAT, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_text
    assert chunks[-2].choices[0].finish_reason in ("length", "stop") and chunks[-2].usage.completion_tokens == n
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == p + n  # OpenAI's usage chunk


def test_sampling_seed_and_stop_reach_the_engine(server, runtime) -> None:
    port, _ = server
    c = client(port)
    kwargs = dict(temperature=0.9, top_p=0.9, seed=11)
    text, _, _ = offline(runtime, PROMPTS[0], 20, **kwargs)
    r = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=20, **kwargs)
    assert r.choices[0].text == text
    full, _, _ = offline(runtime, PROMPTS[1], 30)
    stop = full[10:12]
    r = c.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_the_stream_is_server_sent_events_ending_with_done(server) -> None:
    port, _ = server
    status, headers, body = call(port, "POST", "/v1/completions",
                                 {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 5, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["usage"]["completion_tokens"] >= 1 and last["choices"][0]["finish_reason"]


def test_concurrent_requests_each_equal_their_solo_run(server, runtime) -> None:
    port, app = server
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + 7 * i) for i in range(8)]
    want = [offline(runtime, p, n)[0] for p, n in jobs]
    steps = app.state.engine.steps

    def one(job):
        prompt, n = job
        return client(port).completions.create(model="demo", prompt=prompt, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    assert [a.choices[0].text for a in answers] == want
    tokens = sum(a.usage.completion_tokens for a in answers)
    assert app.state.engine.steps - steps < tokens  # the premise: rows shared steps


def test_requests_for_different_adapters_share_the_batch_and_each_gets_its_own(root) -> None:
    bundle = tiny_switchable_bundle(root, "int8")
    rt = Runtime(bundle, intra_op_threads=1)
    app = create_app(Runtime(bundle, intra_op_threads=1))
    models = [bundle.name, "a", "b"]
    jobs = [(models[i % 3], PROMPTS[i % len(PROMPTS)], 12 + 3 * i) for i in range(9)]
    want = [offline(rt, [{"role": "user", "content": p}], n, adapter=None if m == bundle.name else m)[0]
            for m, p, n in jobs]
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert len({offline(rt, chat, 12, adapter=a)[0] for a in (None, "a", "b")}) == 3  # adapters change the replies
    with running(app) as port:
        assert [m.id for m in client(port).models.list()] == models
        steps = app.state.engine.steps

        def one(job):
            model, prompt, n = job
            return client(port).chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                        max_tokens=n, temperature=0)

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(one, jobs))
        assert [a.choices[0].message.content for a in answers] == want
        assert app.state.engine.steps - steps < sum(a.usage.completion_tokens for a in answers)
        text = call(port, "GET", "/metrics")[2]
    for model in models:
        assert metric(text, f'edgelora_model_tokens_total{{model="{model}"}}') == sum(
            a.usage.completion_tokens for a, (m, _, _) in zip(answers, jobs) if m == model)


def test_without_max_tokens_a_chat_gets_one_rows_share_of_the_kv_budget(bundle, runtime) -> None:
    spec = runtime.manifest.generation
    bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    prompt = len(runtime.generator().prompt_ids(CHAT))
    share = prompt + 20  # tokens per row: 20 new ones after the prompt
    app = create_app(Runtime(bundle, intra_op_threads=1), max_kv_mb=2 * share * bytes_per_token / 2**20, max_rows=2)
    with running(app) as port:
        r = client(port).chat.completions.create(model="demo", messages=CHAT, temperature=0)
        plain = client(port).completions.create(model="demo", prompt=PROMPTS[0], temperature=0)
    assert r.choices[0].message.content == offline(runtime, CHAT, 20)[0]
    assert r.usage.completion_tokens <= 20 and plain.usage.completion_tokens <= 16  # OpenAI's completions default
    assert plain.choices[0].text == offline(runtime, PROMPTS[0], 16)[0]


BAD = [
    # (route, body, status, param, code)
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("completions", {"prompt": "hi"}, 400, "model", None),
    ("completions", {"model": 3, "prompt": "hi"}, 400, "model", None),
    ("completions", {"model": "demo"}, 400, "prompt", None),
    ("completions", {"model": "demo", "prompt": ""}, 400, "prompt", None),
    ("completions", {"model": "demo", "prompt": ["a", "b"]}, 400, "prompt", None),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"model": "demo", "prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens",
     "context_length_exceeded"),
    ("completions", {"model": "demo", "prompt": "light " * CONTEXT}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"model": "demo", "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"model": "demo", "prompt": "hi", "temperature": 2.5}, 400, "temperature", None),
    ("completions", {"model": "demo", "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"model": "demo", "prompt": "hi", "seed": 1.5}, 400, "seed", None),
    ("completions", {"model": "demo", "prompt": "hi", "stop": [1]}, 400, "stop", None),
    ("completions", {"model": "demo", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("completions", {"model": "demo", "prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("completions", {"model": "demo", "prompt": "hi", "n": 2}, 400, "n", None),
    ("completions", {"model": "demo", "prompt": "hi", "temprature": 0}, 400, "temprature", None),
    ("chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages", None),
    ("chat/completions", {"model": "demo", "messages": []}, 400, "messages", None),
    ("chat/completions", {"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role", None),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ("chat/completions", {"model": "demo", "messages": [{"role": "user", "content": "light " * CONTEXT}]}, 400,
     "messages", "context_length_exceeded"),
    ("chat/completions", {"model": "demo", "messages": CHAT, "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("chat/completions", {"model": "nope", "messages": CHAT}, 404, "model", "model_not_found"),
]


def test_bad_requests_get_openai_shaped_errors_naming_the_field(server) -> None:
    port, _ = server
    for route, body, status, param, code in BAD:
        got, _, answer = call(port, "POST", f"/v1/{route}", body)
        assert got == status and set(answer["error"]) == ERROR_KEYS, (body, answer)
        error = answer["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), (body, error)
        assert error["message"]
    status, _, answer = call(port, "POST", "/v1/completions", raw=b'{"model": "demo", ')
    assert status == 400 and answer["error"]["param"] == "body" and "not valid JSON" in answer["error"]["message"]
    status, _, answer = call(port, "GET", "/v1/nowhere")
    assert status == 404 and set(answer["error"]) == ERROR_KEYS
    with pytest.raises(openai.NotFoundError) as e:  # the client reads the shape as OpenAI's own
        client(port).chat.completions.create(model="nope", messages=CHAT)
    assert e.value.body["param"] == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client(port).completions.create(model="demo", prompt="hi", max_tokens=CONTEXT)
    assert e.value.body["param"] == "max_tokens" and "context" in e.value.message
    assert client(port).completions.create(model="demo", prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_a_full_server_answers_503_with_retry_after(bundle) -> None:
    rt = Runtime(bundle, intra_op_threads=1)
    ids = rt.generator().prompt_ids(PROMPTS[0])
    spec = rt.manifest.generation
    bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
    app = create_app(rt, max_kv_mb=(len(ids) + 8) * bytes_per_token / 2**20, queue_limit=1)  # room for one
    engine = app.state.engine
    release = threading.Event()
    body = {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    with running(app) as port:
        # a request whose first piece holds the engine's thread: the batch stays full while we look
        holder = engine.submit(ids, max_tokens=8, sink=lambda _piece: release.wait(30))
        try:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(call, port, "POST", "/v1/completions", body)
                _wait_until(lambda: engine.queued == 1, 10)
                status, headers, answer = call(port, "POST", "/v1/completions", body)
                assert status == 503 and headers["retry-after"] == "1"
                assert (answer["error"]["code"], answer["error"]["type"]) == ("server_overloaded", "server_error")
                assert "retry after 1 s" in answer["error"]["message"]
                with pytest.raises(openai.InternalServerError) as e:  # what the client makes of it (retries off)
                    client(port).completions.create(**body)
                assert e.value.status_code == 503
                assert metric(call(port, "GET", "/metrics")[2], "edgelora_queue_depth") == 1
                release.set()
                status, _, answer = waiting.result(timeout=30)
        finally:
            release.set()
        assert status == 200 and holder.wait(10)
        assert answer["choices"][0]["text"] == holder.text  # it waited, then ran as it runs alone
        assert call(port, "POST", "/v1/completions", body)[0] == 200  # drained: serving again


class SlowDecoder(Runtime):
    """A real decoder Runtime whose every session run waits `delay` seconds first: a request of 100 tokens
    then takes seconds, so whether a cancelled one left early is plain to see."""

    delay = 0.03

    def row_options(self, adapters):
        time.sleep(self.delay)
        return super().row_options(adapters)


def _wait_until(predicate, seconds: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < seconds, "timed out"
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_goes_away_frees_its_row_at_once(bundle, stream) -> None:
    app = create_app(SlowDecoder(bundle, intra_op_threads=1))
    engine = app.state.engine
    body = {"model": "demo", "prompt": PROMPTS[2], "max_tokens": 100, "temperature": 0, "stream": stream,
            "stop": "\x00never"}
    with running(app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        _wait_until(lambda: engine.active == 1, 10)
        if stream:
            response = conn.getresponse()
            assert response.status == 200 and response.read(6) == b"data: "
        conn.sock.shutdown(2)
        conn.close()
        took = _wait_until(lambda: engine.active == 0, CANCEL_WITHIN_S)
        assert took < CANCEL_WITHIN_S
        assert dict(engine.requests) == {("demo", "cancelled"): 1}
        assert engine.tokens_total < 100  # it left long before its end
        _wait_until(lambda: metric(call(port, "GET", "/metrics")[2], "edgelora_in_flight_requests") == 0, 5)


class FailingDecoder(Runtime):
    """A real decoder Runtime whose session runs fail from the `fail_from`-th on, as a broken bundle would."""

    fail_from = 2
    runs = 0

    def row_options(self, adapters):
        self.runs += 1
        if self.runs >= self.fail_from:
            raise EdgeloraError(f"{self.bundle_dir / 'model.onnx'}: run failed (simulated)")
        return super().row_options(adapters)


def test_a_failed_run_ends_its_requests_with_500_and_the_server_keeps_serving(bundle) -> None:
    rt = FailingDecoder(bundle, intra_op_threads=1)
    app = create_app(rt)
    body = {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    with running(app) as port:
        status, _, answer = call(port, "POST", "/v1/completions", body)  # prefill runs, the first decode fails
        assert status == 500 and answer["error"]["type"] == "server_error"
        assert "run failed (simulated)" in answer["error"]["message"]
        rt.runs = 0
        status, _, text = call(port, "POST", "/v1/completions", {**body, "stream": True})
        events = [e for e in text.split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "run failed (simulated)" in json.loads(events[-2][len("data: "):])["error"]["message"]
        rt.fail_from = 10**9
        assert call(port, "POST", "/v1/completions", body)[0] == 200
        _wait_until(lambda: app.state.engine.active == 0, 5)  # the row leaves right after its last piece
        assert app.state.engine.alive


def test_metrics_and_health(server) -> None:
    port, app = server
    c = client(port)
    c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    _wait_until(lambda: app.state.engine.active == 0, 5)  # the row leaves right after its last piece
    status, _, text = call(port, "GET", "/metrics")
    assert status == 200
    assert metric(text, "edgelora_generated_tokens_total") == app.state.engine.tokens_total > 0
    assert metric(text, "edgelora_tokens_per_second") > 0
    assert metric(text, "edgelora_kv_cache_bytes") == 0 and metric(text, "edgelora_active_requests") == 0
    assert metric(text, "edgelora_prefilling_requests") == 0
    assert metric(text, "edgelora_kv_cache_budget_bytes") == 512 * 2**20
    assert metric(text, 'edgelora_model_tokens_total{model="demo"}') >= 4
    assert metric(text, 'edgelora_responses_total{route="/v1/completions",status="200"}') >= 1
    assert re.search(r'^edgelora_requests_total\{model="demo",finish_reason="(length|stop)"\} \d+$', text, re.M)
    assert metric(text, "edgelora_time_to_first_token_seconds_count") >= 1
    assert call(port, "GET", "/healthz")[:3:2] == (200, {"status": "ok"})


def test_the_command_serves_a_decoder_bundle_with_a_kv_budget(bundle, capsys) -> None:
    from edgelora.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--max-kv-mb" in help_text and "--max-rows" in help_text
    assert main(["serve", str(bundle), "--max-kv-mb", "0"]) != 0
    assert "--max-kv-mb is 0.0; pass a positive number" in capsys.readouterr().err
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "serve", str(bundle), "--port", "0",
                             "--threads", "1", "--log-level", "warning", "--max-kv-mb", "4", "--max-rows", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", proc.stderr.readline())
        assert found
        port = int(found.group(1))
        r = client(port).chat.completions.create(model="demo", messages=CHAT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        assert metric(call(port, "GET", "/metrics")[2], "edgelora_kv_cache_budget_bytes") == 4 * 2**20
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
