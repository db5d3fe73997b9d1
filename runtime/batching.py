"""Micro-batching for the server: one worker thread makes every ONNX Runtime call, fed from a bounded queue.

Requests land on a bounded asyncio queue; `MicroBatcher` takes what waits there (optionally holding a short
window, up to `max_batch` texts) and hands it, as one run or one per adapter, to the one worker thread that
makes every ONNX Runtime call (ORT parallelizes inside a run). `Metrics` counts what it ran and what the
server answered, in Prometheus text. Nothing here knows HTTP (runtime/serve.py builds the app).

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
import math
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edgelora.errors import EdgeloraError
from edgelora.runtime.runtime import Runtime

BATCHING = ("auto", "on", "off")
# Merged fp32 runs against each request alone: measured at most 1.1e-6 on all-MiniLM-L6-v2 (fp32 logits
# move by ~1e-6 when the batch size changes); 1e-5 leaves room for other CPUs' kernels.
FP32_MERGE_ATOL = 1e-5


class Overloaded(Exception):
    """The request queue is full (or the server is stopping); the client should retry later."""


def merges_requests(batching: str, precision: str | None) -> bool:
    """Whether requests are merged into shared runs: "on" always, "auto" for fp32 bundles only, "off" never."""
    if batching not in BATCHING:
        raise EdgeloraError(f"batching is {batching!r}; choose from {', '.join(BATCHING)}")
    return batching == "on" or (batching == "auto" and precision == "fp32")


def check_positive(name: str, value: object, kind: type = int) -> None:
    """EdgeloraError naming `name` unless `value` is a positive integer (`kind` float: a positive finite number)."""
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
        check_positive("max_batch", max_batch)
        check_positive("queue_limit", queue_limit)
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
