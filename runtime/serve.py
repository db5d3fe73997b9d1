"""HTTP inference for one bundle (`edgelora serve`): per-request adapter choice, micro-batched on one worker.

Requests land on a bounded asyncio queue; `MicroBatcher` takes what waits there (optionally holding a short
window, up to `max_batch` texts) and hands it, as one run or one per adapter, to the one worker thread that
makes every ONNX Runtime call (ORT parallelizes inside a run). Starlette and uvicorn are imported only when an app or a
server is built, so the CLI's parser (edgelora/cli/serve.py) builds on a runtime-only install; nothing here
imports torch.

What an answer equals (the batching rule, `batching=` of `create_app`; figures measured on this project's
all-MiniLM-L6-v2 bundles, AVX2, ORT 1.32):
- A request that runs alone gets bit for bit what `Runtime.predict(texts, adapter=name)` gives offline on
  the same machine: the worker makes exactly that call. "off" runs every request alone, and so does the
  default "auto" on int8 bundles.
- Merged requests share one run, and the run's batch changes every row's numbers:
  - fp32: float rounding only (ORT's kernels sum in another order at another batch size; one text's
    logits moved 1.4e-6 between batch 1 and 7). Scores stay within `FP32_MERGE_ATOL` of the offline ones
    (measured at most 1.1e-6) and labels agree unless two scores tie within it. "auto" merges fp32 bundles.
  - int8: dynamic activation quantization takes one scale per tensor over every row of the run, so a
    request's scores depend on what its batch-mates said: merging moved scores by up to 0.68 and flipped
    6-9% of labels, about as much as int8 differs from fp32 itself (0.48, 6%). "auto" never merges int8;
    "on" does, for throughput, where answers that depend on concurrent traffic are acceptable.
  Offline predict has the same property (`predict(a + b)` differs from `predict(a)` in int8), so the
  reference for a request is always `predict` on that request's texts alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeloraError
from edgelora.runtime.runtime import Runtime

BATCHING = ("auto", "on", "off")
# Merged fp32 runs against each request alone: measured at most 1.1e-6 on all-MiniLM-L6-v2 (fp32 logits
# move by ~1e-6 when the batch size changes); 1e-5 leaves room for other CPUs' kernels.
FP32_MERGE_ATOL = 1e-5
REQUEST_FIELDS = ("texts", "adapter")
_MISSING = object()


class Overloaded(Exception):
    """The request queue is full (or the server is stopping); the client should retry later."""


def merges_requests(batching: str, precision: str | None) -> bool:
    """Whether requests are merged into shared runs: "on" always, "auto" for fp32 bundles only, "off" never."""
    if batching not in BATCHING:
        raise EdgeloraError(f"batching is {batching!r}; choose from {', '.join(BATCHING)}")
    return batching == "on" or (batching == "auto" and precision == "fp32")


def _positive(name: str, value: object, kind: type = int) -> None:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value <= 0 or (kind is float and not math.isfinite(value)):
        raise EdgeloraError(f"{name} is {value!r}; pass a positive {'number' if kind is float else 'integer'}")


# -- metrics ---------------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {total}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.sum:.9g}", f"{name}_count{suffix} {self.count}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and histograms of one server, rendered in Prometheus text format. Touched only on the event loop."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.batch_texts = _Histogram(self.BATCH_BUCKETS)
        self.batch_requests = _Histogram(self.BATCH_BUCKETS)
        self.run_seconds = _Histogram(self.LATENCY_BUCKETS)

    def answered(self, adapter: str, status: int, seconds: float | None) -> None:
        """Count one /v1/predict answer; `seconds` (server-side latency) only for predictions given."""
        self.requests[(adapter, status)] += 1
        if seconds is not None:
            self.latency.setdefault(adapter, _Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def ran(self, texts: int, requests: int, seconds: float) -> None:
        """Record one session run of `texts` rows serving `requests` requests."""
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.run_seconds.observe(seconds)

    def render(self, *, queue_depth: int, queue_limit: int, in_flight: int) -> str:
        out = ["# HELP edgelora_requests_total /v1/predict answers by adapter (empty: none named) and status.",
               "# TYPE edgelora_requests_total counter"]
        for (adapter, status), n in sorted(self.requests.items()):
            out.append(f'edgelora_requests_total{{adapter="{_label(adapter)}",status="{status}"}} {n}')
        out += ["# HELP edgelora_request_duration_seconds Time from request arrival to predictions ready, by adapter.",
                "# TYPE edgelora_request_duration_seconds histogram"]
        for adapter, hist in sorted(self.latency.items()):
            out += hist.lines("edgelora_request_duration_seconds", f'adapter="{_label(adapter)}"')
        out += ["# HELP edgelora_batch_size Texts per session run.", "# TYPE edgelora_batch_size histogram"]
        out += self.batch_texts.lines("edgelora_batch_size")
        out += ["# HELP edgelora_batch_requests Requests merged into one session run.",
                "# TYPE edgelora_batch_requests histogram"]
        out += self.batch_requests.lines("edgelora_batch_requests")
        out += ["# HELP edgelora_run_duration_seconds Wall time of one session run, tokenization included.",
                "# TYPE edgelora_run_duration_seconds histogram"]
        out += self.run_seconds.lines("edgelora_run_duration_seconds")
        out += ["# HELP edgelora_queue_depth Requests waiting for the worker.", "# TYPE edgelora_queue_depth gauge",
                f"edgelora_queue_depth {queue_depth}",
                "# HELP edgelora_queue_limit Requests the queue holds before answering 503.",
                "# TYPE edgelora_queue_limit gauge", f"edgelora_queue_limit {queue_limit}",
                "# HELP edgelora_in_flight_requests Requests accepted and not yet answered.",
                "# TYPE edgelora_in_flight_requests gauge", f"edgelora_in_flight_requests {in_flight}"]
        return "\n".join(out) + "\n"


# -- micro-batching --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    texts: list[str]
    adapter: str
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Runs requests on one worker thread, merging those that arrive within `window_ms` of each other.

    Example (inside a running event loop):
        >>> batcher = MicroBatcher(Runtime("bundle"), max_batch=32, window_ms=2)   # doctest: +SKIP
        >>> await batcher.start()                                                  # doctest: +SKIP
        >>> await batcher.submit(["great film"], "sentiment")                      # doctest: +SKIP
        [{'label': 'pos', 'score': 0.97, 'scores': {...}}]

    Args:
        runtime: the loaded bundle; only its `predict` is called, and only from the worker thread.
        max_batch: texts per merged run. A request with more texts still runs, alone, in
            `Runtime.predict`'s own chunks.
        window_ms: how long the first waiting request holds the batch open for others. 0 (the default)
            takes only what queued while the worker was busy: under load that is where batches come from,
            and a window idles the worker. Measured on all-MiniLM-L6-v2 (2 cores): 2 ms cost 2-3 ms of
            latency at 1 client and gained nothing measurable at 4 or 16.
        queue_limit: requests waiting at most; `submit` raises Overloaded past it.
        merge: merge requests of one adapter into one run (see the module docstring for what that changes);
            False runs each request alone, bit for bit as `Runtime.predict` offline.
        mix: with `merge`, also merge requests for different adapters into one run, each row through its
            own adapter (`Runtime.predict(adapters=...)`), where the bundle has an adapter bank
            (`Runtime.mixes_in_one_run`); otherwise a batch runs once per adapter. Measured on the
            all-MiniLM-L6-v2 int8 bank bundle, 16 clients, two adapters: 3-10% more requests/s than once
            per adapter and a lower p95; the same at 4 clients.
        metrics: where each run's size and time are recorded.
    """

    def __init__(self, runtime: Runtime, *, max_batch: int = 32, window_ms: float = 0.0, queue_limit: int = 256,
                 merge: bool = True, mix: bool = True, metrics: Metrics | None = None) -> None:
        _positive("max_batch", max_batch)
        _positive("queue_limit", queue_limit)
        if not isinstance(window_ms, (int, float)) or isinstance(window_ms, bool) or not 0 <= window_ms <= 1000:
            raise EdgeloraError(f"window_ms is {window_ms!r}; pass a number of milliseconds from 0 to 1000")
        self.runtime = runtime
        self.max_batch = max_batch
        self.window = window_ms / 1000
        self.queue_limit = queue_limit
        self.merge = merge
        self.mix = bool(merge and mix and getattr(runtime, "mixes_in_one_run", False))
        self.metrics = metrics or Metrics()
        self._queue: asyncio.Queue[_Job] | None = None
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._busy = False  # a batch is being collected or run

    @property
    def depth(self) -> int:
        """Requests waiting for the worker (not counting the run in progress)."""
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Create the queue and the worker on the running loop."""
        self._queue = asyncio.Queue(self.queue_limit)
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgelora-infer")
        self._closing = False
        self._task = asyncio.create_task(self._loop(), name="edgelora-batcher")

    def submit(self, texts: list[str], adapter: str) -> asyncio.Future:
        """Queue one request; the future gives its predictions. Raises Overloaded when the queue is full."""
        if self._queue is None or self._closing:
            raise Overloaded("the server is stopping")
        job = _Job(list(texts), adapter, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue_limit} requests already waiting") from None
        self._arrived.set()
        return job.future

    async def stop(self) -> None:
        """Finish what is queued, then end the worker. uvicorn calls this after in-flight requests are answered."""
        self._closing = True
        if self._task is None:
            return
        while self.alive and (self._busy or self._queue.qsize()):
            await asyncio.sleep(0.01)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():  # only if the loop died: fail what it left
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Overloaded("the server stopped"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)  # waits for a run in progress
        self._task = None

    async def _next(self, deadline: float | None = None) -> _Job | None:
        while True:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            self._arrived.clear()
            if deadline is None:
                await self._arrived.wait()
                continue
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                return None

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """`first` plus whatever fits in max_batch texts until the window closes; returns the batch and a carry."""
        batch, texts = [first], len(first.texts)
        if not self.merge:
            return batch, None
        deadline = first.arrived + self.window  # under load `first` waited already: no extra wait
        while texts < self.max_batch:
            job = await self._next(deadline)
            if job is None:
                break
            if texts + len(job.texts) > self.max_batch:
                return batch, job
            batch.append(job)
            texts += len(job.texts)
        return batch, None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else await self._next()
            self._busy = True
            batch, carry = await self._collect(first)
            groups: dict[str | None, list[_Job]] = {}
            for job in batch:
                groups.setdefault(None if self.mix else job.adapter, []).append(job)
            for group in groups.values():  # one run per group; each group's answers leave as soon as it ends
                t0 = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self._run, group)
                except Exception as e:  # noqa: BLE001 - the requests get a 500 naming it; the server keeps serving
                    results = [e] * len(group)
                self.metrics.ran(sum(len(j.texts) for j in group), len(group), time.perf_counter() - t0)
                for job, result in zip(group, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            self._busy = carry is not None

    def _run(self, group: list[_Job]) -> list:
        """Worker thread: one predict call for the group; a request alone makes exactly the offline call."""
        if len(group) == 1:
            return [self.runtime.predict(group[0].texts, adapter=group[0].adapter)]
        texts = [t for job in group for t in job.texts]
        rows = [job.adapter for job in group for _ in job.texts]
        if len(set(rows)) == 1:
            preds = self.runtime.predict(texts, adapter=rows[0], batch_size=len(texts))
        else:  # one run, each row through its own adapter (the bundle's adapter bank)
            preds = self.runtime.predict(texts, adapters=rows, batch_size=len(texts))
        out, start = [], 0
        for job in group:
            out.append(preds[start : start + len(job.texts)])
            start += len(job.texts)
        return out


# -- the HTTP app ----------------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int, field: str | None, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.extra = status, field, message, extra


def _error_body(field: str | None, message: str, **extra: object) -> dict:
    return {"error": {"field": field, "message": message, **extra}}


class _Service:
    """Request handling for one Runtime: parsing, limits, adapter resolution, metrics."""

    def __init__(self, runtime: Runtime, batcher: MicroBatcher, *, max_texts: int, max_text_chars: int,
                 max_body_bytes: int, retry_after_s: int, model: str) -> None:
        self.runtime, self.batcher, self.metrics = runtime, batcher, batcher.metrics
        self.max_texts, self.max_text_chars, self.max_body_bytes = max_texts, max_text_chars, max_body_bytes
        self.retry_after_s = retry_after_s
        self.model = model
        self.in_flight = 0
        self.default_adapter = runtime.adapters[0] if runtime.manifest.mode == "merged" and runtime.adapters else None
        self.labels = {name: list(runtime.labels(name)) for name in runtime.adapters}

    def available(self) -> str:
        return ", ".join(self.runtime.adapters) or "none"

    async def read_json(self, request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise _ApiError(400, "Content-Length", f"Content-Length {declared!r} is not a byte count")
            if int(declared) > self.max_body_bytes:
                raise _ApiError(413, "body", f"body is {declared} bytes, at most {self.max_body_bytes} allowed")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _ApiError(413, "body", f"body is over {self.max_body_bytes} bytes, the most allowed")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except UnicodeDecodeError:
            raise _ApiError(400, "body", "body is not UTF-8 JSON") from None
        except json.JSONDecodeError as e:
            where = f"{e.msg} at line {e.lineno} column {e.colno}"
            raise _ApiError(400, "body", f"body is not valid JSON ({where})") from None

    def parse(self, data: object) -> tuple[list[str], str]:
        if not isinstance(data, dict):
            raise _ApiError(400, "body", 'body must be a JSON object {"texts": [...], "adapter": name or null}')
        for key in data:
            if key not in REQUEST_FIELDS:
                raise _ApiError(422, key, f"unknown field {key!r}; the fields are {', '.join(REQUEST_FIELDS)}")
        texts = data.get("texts", _MISSING)
        if texts is _MISSING:
            raise _ApiError(422, "texts", "texts is required: a list of strings")
        if not isinstance(texts, list) or not texts:
            raise _ApiError(422, "texts", f"texts must be a non-empty list of strings, got {type(texts).__name__}"
                            + (" []" if texts == [] else ""))
        if len(texts) > self.max_texts:
            raise _ApiError(413, "texts",
                            f"{len(texts)} texts, at most {self.max_texts} per request; split the request")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise _ApiError(422, f"texts[{i}]", f"texts[{i}] must be a string, got {type(text).__name__}")
            if len(text) > self.max_text_chars:
                raise _ApiError(413, f"texts[{i}]",
                                f"texts[{i}] has {len(text)} characters, at most {self.max_text_chars} allowed")
        adapter = data.get("adapter")
        if adapter is None:
            if self.default_adapter is None:
                raise _ApiError(422, "adapter", f"this bundle has no default adapter; pass one of {self.available()}",
                                available=list(self.runtime.adapters))
            adapter = self.default_adapter
        if not isinstance(adapter, str):
            raise _ApiError(422, "adapter", f"adapter must be a string or null, got {type(adapter).__name__}")
        if adapter not in self.runtime.adapters:
            raise _ApiError(404, "adapter", f"no adapter {adapter!r}; available: {self.available()}",
                            available=list(self.runtime.adapters))
        if not self.labels[adapter]:
            raise _ApiError(422, "adapter", f"adapter {adapter!r} has no labels (no task head) to predict")
        return texts, adapter

    async def predict(self, request):
        from starlette.responses import JSONResponse

        t0 = time.perf_counter()
        adapter, seconds = "", None
        try:
            texts, adapter = self.parse(await self.read_json(request))
            future = self.batcher.submit(texts, adapter)
            self.in_flight += 1
            try:
                preds = await future
            finally:
                self.in_flight -= 1
        except _ApiError as e:
            response = JSONResponse(_error_body(e.field, e.message, **e.extra), status_code=e.status)
        except Overloaded as e:
            response = JSONResponse(_error_body(None, f"server busy ({e}); retry after {self.retry_after_s} s"),
                                    status_code=503, headers={"Retry-After": str(self.retry_after_s)})
        except Exception as e:  # noqa: BLE001 - a failed run: one line to the client, the server keeps serving
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            response = JSONResponse(_error_body(None, f"inference failed: {first}"), status_code=500)
        else:
            try:  # JSONResponse refuses NaN: a bundle can give it for a text with no tokens
                response = JSONResponse({"predictions": preds, "adapter": adapter, "model": self.model})
                seconds = time.perf_counter() - t0
            except ValueError:
                response = JSONResponse(_error_body(None, "inference gave a non-finite score (NaN or inf); "
                                                          "check the texts, e.g. one with no tokens"), status_code=500)
        self.metrics.answered(adapter, response.status_code, seconds)
        return response

    async def adapters(self, request):
        from starlette.responses import JSONResponse

        m = self.runtime.manifest
        return JSONResponse({
            "model": self.model, "mode": m.mode, "precision": m.precision,
            "default": self.default_adapter,
            "adapters": [{"name": a, "labels": labels} for a, labels in self.labels.items()],
            "batching": {"merge": self.batcher.merge, "mix_adapters": self.batcher.mix,
                         "max_batch": self.batcher.max_batch,
                         "window_ms": self.batcher.window * 1000},
        })

    async def healthz(self, request):
        from starlette.responses import JSONResponse

        ok = self.batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped"}, status_code=200 if ok else 503)

    async def metrics_text(self, request):
        from starlette.responses import Response

        text = self.metrics.render(queue_depth=self.batcher.depth, queue_limit=self.batcher.queue_limit,
                                   in_flight=self.in_flight)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(
    runtime: Runtime,
    *,
    max_batch: int = 32,
    window_ms: float = 0.0,
    queue_limit: int = 256,
    max_texts: int = 64,
    max_text_chars: int = 4096,
    max_body_bytes: int = 1 << 20,
    batching: str = "auto",
    mix_adapters: bool = True,
    retry_after_s: int = 1,
):
    """A Starlette app serving `runtime`: GET /v1/adapters, POST /v1/predict, GET /healthz, GET /metrics.

    Example:
        >>> app = create_app(Runtime("bundles/minilm-int8"), window_ms=2)   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8080)                    # doctest: +SKIP

    Args:
        max_batch, window_ms, queue_limit: see `MicroBatcher`; a full queue answers 503 with Retry-After.
        max_texts, max_text_chars, max_body_bytes: request limits, answered 413 naming the field.
        batching: "auto" merges requests on fp32 bundles only, "on" on int8 too, "off" never; see the
            module docstring for what merging changes in the answers.
        mix_adapters: merged batches that mix adapters run once through the bundle's adapter bank,
            instead of once per adapter (see `MicroBatcher`).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    for name, value in (("max_texts", max_texts), ("max_text_chars", max_text_chars),
                        ("max_body_bytes", max_body_bytes), ("retry_after_s", retry_after_s)):
        _positive(name, value)
    merge = merges_requests(batching, runtime.manifest.precision)
    batcher = MicroBatcher(runtime, max_batch=max_batch, window_ms=window_ms, queue_limit=queue_limit, merge=merge,
                           mix=mix_adapters)
    service = _Service(runtime, batcher, max_texts=max_texts, max_text_chars=max_text_chars,
                       max_body_bytes=max_body_bytes, retry_after_s=retry_after_s,
                       model=Path(runtime.bundle_dir).resolve().name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    async def http_error(request, exc: HTTPException):
        return JSONResponse(_error_body(None, f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app = Starlette(
        routes=[
            Route("/v1/adapters", service.adapters, methods=["GET"]),
            Route("/v1/predict", service.predict, methods=["POST"]),
            Route("/healthz", service.healthz, methods=["GET"]),
            Route("/metrics", service.metrics_text, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.batcher = batcher
    app.state.service = service
    return app


# -- running a server ------------------------------------------------------------------------------


def listen(host: str = "127.0.0.1", port: int = 8080) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one), or one EdgeloraError line saying why not."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
        # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it each response's
        # body waits for the client's delayed ACK of its headers (40 ms on Linux)
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
        return sock
    except (OSError, OverflowError) as e:
        if sock is not None:
            sock.close()
        why = getattr(e, "strerror", None) or str(e)
        raise EdgeloraError(f"{host}:{port}: cannot listen ({why}); pick another --host or --port") from None


def run_app(app, sock: socket.socket, *, log_level: str = "info", access_log: bool = False,
            graceful_timeout: float = 30.0) -> None:
    """Serve `app` on `sock` with uvicorn until SIGTERM or SIGINT.

    On the signal uvicorn stops accepting, lets in-flight requests finish (up to `graceful_timeout`
    seconds), stops the worker, and then re-raises the signal, so the process ends as that signal asks
    (SIGINT: KeyboardInterrupt; SIGTERM: exit status 143). Signals are caught only on the main thread.
    """
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run(sockets=[sock])


def serve(bundle: str | os.PathLike, host: str = "127.0.0.1", port: int = 8080, *, threads: int | None = None,
          spin: bool = False, log_level: str = "info", access_log: bool = False, graceful_timeout: float = 30.0,
          on_ready: Callable[[Runtime, str, int], None] | None = None, **app_options) -> None:
    """Load a bundle and serve it until SIGTERM/SIGINT; `app_options` go to `create_app`.

    Args:
        spin: let ORT's pool threads spin between runs. Off by default: the event loop and the clients'
            connections need the cores between runs.
        on_ready: called with the runtime and the bound host and port once the socket listens.
    """
    runtime = Runtime(bundle, intra_op_threads=threads, allow_spinning=spin)
    app = create_app(runtime, **app_options)
    sock = listen(host, port)
    if on_ready is not None:
        bound = sock.getsockname()
        on_ready(runtime, bound[0], bound[1])
    run_app(app, sock, log_level=log_level, access_log=access_log, graceful_timeout=graceful_timeout)
