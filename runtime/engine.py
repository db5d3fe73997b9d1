"""Continuous batching for decoder bundles: several generations in flight in one session, each row its own adapter.

A request joins at its prefill while the others decode: the prompts admitted at one step run together
(left-padded) from an empty cache, one chunk of at most `prefill_tokens` tokens per step (each run extends the
cache of the one before, and the decoding rows take their step in between), then each row samples its first
token, and their cache is spliced into the
running batch, left-padded to the longer of the two. Every later step decodes one token for every row in one
session run. A row that finishes (eos, a stop string, max_tokens) or whose client went away leaves at the next
step; the cache then drops the leading columns that only padding fills. Each run asks
`Runtime.row_options(adapters)` for the per-row adapter choice (one adapter's RunOptions, or the bank and
`adapter_ids`).

Why a request's tokens do not depend on its batch-mates: the decoder graph's default attention core sums over
keys in float64 and the int8 graph quantizes activations per row (exporters/decoder_graph.py), so a row's logits
are bit-identical alone and in a left-padded batch; each row samples from its own seeded generator. Greedy and
seeded replies therefore equal `Generator.generate` on the request alone.

Prefill runs ask for the last position's logits only (`logits_to_keep`), not a vocabulary-wide row per prompt
token. A GroupQueryAttention bundle (`attention="gqa"`) decodes into one buffer per cache tensor written in
place (runtime/shared_kv.py) while the batch keeps its rows: the buffers are made when decoding starts, with
room for the steps until the first row must end (the fewest tokens any row has left), and handed back as
plain arrays when a row leaves or joins or the buffers are full; every other step copies no cache. Steps with
an adapter active through RunOptions, or rows mixing adapters, copy the cache: ONNX Runtime 1.32 applies
neither to IOBinding runs (runtime/shared_kv.py).

Memory: the cache of B rows padded to the longest is B x length x `bytes_per_token`. A request is admitted only
while the batch's worst case (rows x the longest prompt + max_tokens) fits `max_kv_bytes`; otherwise it waits
in a bounded queue, and past `queue_limit` waiting requests `submit` raises `Overloaded`. During a copying
step ONNX Runtime holds the past and the present cache at once, so the process's peak is about twice the
budget; shared buffers hold at most the worst case once.

One thread steps the engine (`start`); tests may call `step` themselves instead. Imports no torch.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgelora.errors import EdgeloraError
from edgelora.runtime.batching import Overloaded, check_positive
from edgelora.runtime.bundle import CAUSAL_LM, LOGITS_TO_KEEP
from edgelora.runtime.runtime import Runtime
from edgelora.runtime.sampling import Sampling, next_token
from edgelora.runtime.session import first_line
from edgelora.runtime.shared_kv import SharedKV, bindable, shares_kv
from edgelora.runtime.textstream import Detokenizer, StopText

__all__ = ["Engine", "Job", "Overloaded", "Piece", "Refused", "Usage"]

FINISH_REASONS = ("stop", "length", "cancelled", "error")
RATE_WINDOW_S = 10.0  # tokens/s is measured over the last this many seconds


class Refused(EdgeloraError):
    """A request the engine can never run as asked; `field` names the argument to change ("prompt",
    "max_tokens", "adapter", ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the eos that ended a reply not counted

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Piece:
    """Text a request's reply grew by; the last piece carries why it ended and the token counts."""

    text: str
    finish_reason: str | None = None  # one of FINISH_REASONS on the last piece
    usage: Usage | None = None
    error: str | None = None  # with finish_reason "error": what failed


class Job:
    """One request in the engine: its arguments, the tokens and text so far, and how it ended.

    `sink`, when given, is called with every Piece from the engine's thread (keep it short: hand the piece to
    another thread or loop); a sink that raises cancels its job. `cancel()` makes the request leave the batch
    at the next step.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], adapter: str | None, max_tokens: int,
                 sampling: Sampling, seed: int | None, stop: tuple[str, ...],
                 sink: Callable[[Piece], None] | None) -> None:
        self.prompt_ids, self.adapter, self.max_tokens = prompt_ids, adapter, max_tokens
        self.sampling, self.seed, self.stop = sampling, seed, stop
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.arrived = time.perf_counter()
        self.first_token_s: float | None = None  # arrival to first token
        self._engine, self._sink = engine, sink
        self._done = threading.Event()
        self.cancelled = False

    @property
    def final_length(self) -> int:
        """Tokens this request may hold in the cache at its end: the prompt plus max_tokens."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.token_ids))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Leave the batch (or the queue) at the engine's next step; a finished job ignores it."""
        if not self.done:
            self.cancelled = True
            self._engine._wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _emit(self, text: str, finish_reason: str | None = None, error: str | None = None) -> None:
        self.text += text
        if finish_reason is not None:
            self.finish_reason, self.error = finish_reason, error
        if self._sink is not None and (text or finish_reason is not None):
            try:
                self._sink(Piece(text, finish_reason, self.usage if finish_reason else None, error))
            except Exception:  # noqa: BLE001 - the consumer is gone (e.g. its event loop closed): stop for it
                self._sink = None
                self.cancelled = True
        if finish_reason is not None:
            self._done.set()


class _Row:
    """A job decoding in the batch: its sampler, detokenizer and stop strings, and its cache length."""

    def __init__(self, job: Job, tokenizer) -> None:
        self.job = job
        self.rng = None if job.sampling.greedy else np.random.default_rng(job.seed)
        self.detok = Detokenizer(tokenizer)
        self.stops = StopText(job.stop)
        self.length = len(job.prompt_ids)  # real tokens in the cache once prefilled
        self.moved = 0  # columns its cache moved right since its prefill (padding added before it, less trimmed)
        self.last = -1  # the token fed at the next decode step


class _Prefill:
    """Prompts admitted together, left-padded, being prefilled one chunk per engine step."""

    def __init__(self, jobs: list[Job], pad: int, layers: int, kv_heads: int, head_dim: int, chunk: int) -> None:
        B, T = len(jobs), max(len(j.prompt_ids) for j in jobs)
        self.jobs = jobs
        self.input_ids = np.full((B, T), pad, np.int64)
        self.mask = np.zeros((B, T), np.int64)
        for r, job in enumerate(jobs):
            self.input_ids[r, T - len(job.prompt_ids):] = job.prompt_ids
            self.mask[r, T - len(job.prompt_ids):] = 1
        self.positions = np.clip(np.cumsum(self.mask, axis=1) - 1, 0, None)
        self.present = [np.zeros((B, kv_heads, 0, head_dim), np.float32)] * layers
        self.chunk = chunk  # columns per run: rows x chunk tokens stay within prefill_tokens
        self.done = 0  # columns prefilled so far

    def keep(self, rows: list[int]) -> None:
        """Only these rows go on."""
        self.jobs = [self.jobs[r] for r in rows]
        self.input_ids, self.mask, self.positions = self.input_ids[rows], self.mask[rows], self.positions[rows]
        self.present = [p[rows] for p in self.present]


class Engine:
    """Continuous batching over a decoder bundle's session.

    Example:
        >>> engine = Engine(Runtime("bundles/smollm2-int8"), max_kv_mb=256)          # doctest: +SKIP
        >>> engine.start()                                                           # doctest: +SKIP
        >>> job = engine.submit(engine.prompt_ids("Capital of France?"), max_tokens=16)  # doctest: +SKIP
        >>> job.wait(); job.text                                                     # doctest: +SKIP
        ' The capital of France is Paris.'

    Args:
        runtime: a loaded decoder bundle (task "causal-lm"); only this engine's thread runs its session.
        max_kv_mb: the KV cache budget in MiB (see the module docstring for what it bounds).
        max_rows: rows decoding together at most.
        queue_limit: requests waiting for room at most; `submit` raises Overloaded past it.
        prefill_tokens: prompt tokens (rows x columns) per prefill run at most; longer prompts prefill in
            chunks, one per step, each extending the cache. This bounds how long a prefill holds up the
            decoding rows' next token, and the run's activations; a bundle without `logits_to_keep` (exported
            before it) also returns logits for every position (SmolLM2: 512 x 49,152 floats, 100 MB).
    """

    def __init__(self, runtime: Runtime, *, max_kv_mb: float = 512.0, max_rows: int = 8,
                 queue_limit: int = 64, prefill_tokens: int = 512) -> None:
        if runtime.manifest.task != CAUSAL_LM:
            raise EdgeloraError(f"{runtime.bundle_dir}: task is {runtime.manifest.task!r}; the generation engine "
                                f"serves {CAUSAL_LM!r} bundles only")
        check_positive("max_kv_mb", max_kv_mb, float)
        check_positive("max_rows", max_rows)
        check_positive("queue_limit", queue_limit)
        check_positive("prefill_tokens", prefill_tokens)
        self.runtime = runtime
        self.prefill_tokens = prefill_tokens
        self.generator = runtime.generator()  # tokenizer, chat template and graph checks
        spec = self.spec = runtime.manifest.generation
        self.max_rows, self.queue_limit = max_rows, queue_limit
        self.bytes_per_token = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * 4
        self.max_kv_bytes = int(max_kv_mb * 2**20)
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
        self._outputs = ["logits", *(f"present.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value"))]
        inputs = {i.name for i in runtime.session.get_inputs()}
        self._positions = "position_ids" in inputs
        graph = runtime.manifest.extra.get("graph")
        core = graph.get("attention") if isinstance(graph, dict) else None
        # whether a row's logits are bit-identical alone and batched (exporters/decoder_graph.py ATTENTION_CORES)
        self.batch_invariant = core == "invariant"
        self._cache_index = isinstance(graph, dict) and graph.get("positions") == "cache_index"
        # GroupQueryAttention refuses a run of several rows that extends a cache by more than one token, so a
        # gqa bundle's prompts prefill together only when they fit one run; a prompt alone may take chunks
        self._one_run_batches = core == "gqa"
        # decode steps on one buffer per cache tensor (runtime/shared_kv.py): a gqa bundle's steps with no adapter
        # active through RunOptions (ONNX Runtime 1.32 applies those to runs given feeds only) and no extra feed
        # (a mixed batch's adapter_ids is an overridable initializer, which IOBinding cannot bind)
        self._shares = shares_kv(graph) and bindable(
            runtime.session, ("input_ids", "attention_mask", *(("position_ids",) if self._positions else ())))
        self._base_options = runtime.row_options([None])[0]
        self._kv: SharedKV | None = None  # while set, the cache lives in its buffers and self._past is empty
        self.shared_steps = 0  # decode steps run on the shared buffers (figures, tests)
        optional = {i.name for i in runtime.session.get_overridable_initializers()}
        self._keep_last = {LOGITS_TO_KEEP: np.asarray(1, np.int64)} if LOGITS_TO_KEEP in optional else {}
        if core is not None and not self.batch_invariant:
            warnings.warn(f"{runtime.bundle_dir}: exported with attention core {core!r}, whose float32 sums over the "
                          "keys change with left padding: a request's tokens may differ from its solo run; export "
                          "with the default attention='invariant' for batch-invariant answers",
                          RuntimeWarning, stacklevel=2)
        self._eos = frozenset(spec.eos_token_ids)
        self._pad = spec.pad_token_id if spec.pad_token_id is not None else next(iter(spec.eos_token_ids), 0)
        # waiting jobs (guarded by _cond); the batch below is touched only by the stepping thread
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._rows: list[_Row] = []
        self._filling: _Prefill | None = None  # admitted prompts part way through their prefill
        self._past: list[np.ndarray] = []
        self._mask = np.zeros((0, 0), np.int64)  # (rows, cache columns): 1 real, 0 left padding
        self._thread: threading.Thread | None = None
        self._stopping = False
        # figures for /metrics
        self.tokens_total = 0
        self.prompt_tokens_total = 0
        self.steps = 0
        self.requests: Counter[tuple[str, str]] = Counter()  # (adapter or "", finish reason)
        self.adapter_tokens: Counter[str] = Counter()
        self._recent: deque[tuple[float, int]] = deque()

    # -- requests --------------------------------------------------------------------------------

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of text (with the tokenizer's special tokens) or chat messages (the bundle's template)."""
        return self.generator.prompt_ids(prompt)

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Refused unless a prompt of `prompt_len` tokens with `max_tokens` new ones fits the context and,
        alone, the KV budget."""
        C = self.spec.context_length
        if prompt_len < 1:
            raise Refused("prompt", "prompt has no tokens; pass some text")
        if prompt_len >= C:
            raise Refused("prompt", f"prompt is {prompt_len} tokens, the model's context is {C}: shorten it to at "
                                    f"most {C - 1} tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise Refused("max_tokens", f"max_tokens {max_tokens!r} must be a positive integer")
        if prompt_len + max_tokens > C:
            raise Refused("max_tokens", f"max_tokens {max_tokens} with a {prompt_len}-token prompt exceeds the "
                                        f"model's context of {C} tokens; ask for at most {C - prompt_len}")
        need = (prompt_len + max_tokens) * self.bytes_per_token
        if need > self.max_kv_bytes:
            most = self.max_kv_bytes // self.bytes_per_token - prompt_len
            raise Refused("max_tokens", f"prompt ({prompt_len} tokens) and max_tokens {max_tokens} need "
                                        f"{need / 2**20:.1f} MiB of KV cache, over the server's budget of "
                                        f"{self.max_kv_bytes / 2**20:.1f} MiB; ask for at most {max(most, 0)} tokens")

    def submit(self, prompt_ids: Sequence[int], *, adapter: str | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: str | Sequence[str] = (), sink: Callable[[Piece], None] | None = None) -> Job:
        """Queue one generation; returns its Job at once. Refused (an EdgeloraError naming the argument) for a
        request that can never run, Overloaded when `queue_limit` requests already wait."""
        ids = list(prompt_ids)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise Refused("prompt", "prompt_ids must be token ids (integers)")
        ids = [int(t) for t in ids]
        if adapter is not None and adapter not in self.runtime.adapters:
            have = ", ".join(self.runtime.adapters) or "none"
            raise Refused("adapter", f"no adapter {adapter!r}; available: {have} (or None for the base)")
        vocab = self.spec.vocab_size
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            raise Refused("prompt", f"prompt holds token ids outside the vocabulary [0, {vocab})")
        self.check(len(ids), max_tokens)
        try:
            sampling = Sampling(temperature, top_p, top_k)
        except EdgeloraError as e:
            raise Refused(str(e).split()[0], str(e)) from None
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise Refused("seed", f"seed {seed!r} must be a non-negative integer or None")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) for s in stops):
            raise Refused("stop", f"stop {stop!r}: pass a string or a list of strings")
        job = Job(self, ids, adapter, max_tokens, sampling, seed, stops, sink)
        with self._cond:
            if self._stopping:
                raise Overloaded("the server is stopping")
            if len(self._pending) >= self.queue_limit:
                raise Overloaded(f"{self.queue_limit} requests already wait for room in the batch")
            self._pending.append(job)
            self._cond.notify()
        return job

    # -- figures ---------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return len(self._rows)

    @property
    def prefilling(self) -> int:
        """Requests part way through their prefill."""
        filling = self._filling
        return len(filling.jobs) if filling is not None else 0

    @property
    def queued(self) -> int:
        """Requests waiting for room."""
        return len(self._pending)

    @property
    def kv_bytes(self) -> int:
        """Bytes the cache holds now (the batch's and a prefill's in progress): rows x columns (left padding
        included) x bytes per token."""
        rows, cols = self._mask.shape
        kv = self._kv  # read once: the stepping thread may hand the buffers back meanwhile
        if kv is not None:  # the shared buffers hold their capacity from the start
            cols = max(cols, kv.capacity)
        filling = self._filling
        extra = len(filling.jobs) * filling.done if filling is not None else 0
        return (rows * cols + extra) * self.bytes_per_token

    def _jobs_held(self) -> list[Job]:
        filling = self._filling
        return [r.job for r in list(self._rows)] + (list(filling.jobs) if filling is not None else [])

    @property
    def kv_reserved_bytes(self) -> int:
        """The worst case the budget is checked against: rows (a prefill's included) x the longest prompt +
        max_tokens."""
        jobs = self._jobs_held()
        return len(jobs) * max((j.final_length for j in jobs), default=0) * self.bytes_per_token

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= RATE_WINDOW_S]
        return sum(n for _, n in recent) / RATE_WINDOW_S if recent else 0.0

    # -- the worker thread -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the engine on its own thread until `stop`."""
        if self.alive:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="edgelora-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread; requests still queued or decoding end with finish_reason "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            left, self._pending = list(self._pending), deque()
        for job in left:
            self._end(job, "cancelled")
        for job in self._jobs_held():
            self._end(job, "cancelled")
        self._rows, self._filling, self._past, self._mask = [], None, [], np.zeros((0, 0), np.int64)
        self._kv = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._rows and self._filling is None:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - never let one bad step end the server: fail its rows
                self._fail_all(f"{type(e).__name__}: {e}")

    # -- one step --------------------------------------------------------------------------------

    def step(self) -> bool:
        """Drop cancelled requests; admit the waiting ones that fit (when no prefill is under way) and run one
        chunk of their prefill, joining them to the batch after the last; decode one token for every row.
        Returns whether it ran the session (False: nothing was waiting or decoding)."""
        self._leave([r for r in self._rows if r.job.cancelled], "cancelled")
        if self._filling is None:
            admitted = self._admit()
            if admitted:
                chunk = max(1, self.prefill_tokens // len(admitted))  # a run's tokens: rows x chunk
                spec = self.spec
                self._filling = _Prefill(admitted, self._pad, len(self._past_names), spec.num_kv_heads,
                                         spec.head_dim, chunk)
        filling = self._filling is not None
        if filling:
            self._prefill_chunk()
        decoding = bool(self._rows)
        if decoding:
            self._decode()
        return filling or decoding

    def _admit(self) -> list[Job]:
        """Waiting jobs, first come first served, while the batch's worst case fits the budget and max_rows."""
        admitted: list[Job] = []
        with self._cond:
            for job in [j for j in self._pending if j.cancelled]:
                self._pending.remove(job)
                self._end(job, "cancelled")
            rows = len(self._rows)
            longest = max((r.job.final_length for r in self._rows), default=0)
            prompt, most = 0, 0  # the longest prompt admitted, the most new tokens one of them asks for
            while self._pending:
                job = self._pending[0]
                n, top = rows + len(admitted) + 1, max(longest, job.final_length)
                if n > self.max_rows or n * top * self.bytes_per_token > self.max_kv_bytes:
                    break  # the head waits; nobody overtakes it, so a long request cannot starve
                widest, need = max(prompt, len(job.prompt_ids)), max(most, job.max_tokens)
                if admitted and self._one_run_batches and (len(admitted) + 1) * widest > self.prefill_tokens:
                    break  # it prefills at the next admission, first in line
                if admitted and self._cache_index and widest + need > self.spec.context_length:
                    break  # a row rotates at its index in its prefill run: the widest prompt + its tokens must fit
                admitted.append(self._pending.popleft())
                longest, prompt, most = top, widest, need
        return admitted

    def _run(self, feeds: dict[str, np.ndarray], adapters: list[str | None]) -> tuple[np.ndarray, list[np.ndarray]]:
        options, extra = self.runtime.row_options(adapters)
        values = self._guarded(self.runtime.session.run, self._outputs, {**feeds, **extra}, options)
        return values[0], values[1:]

    def _guarded(self, run, *args):
        """run(*args), an ONNX Runtime failure (ORT raises several unrelated types) as one EdgeloraError line."""
        try:
            return run(*args)
        except EdgeloraError:
            raise
        except Exception as e:  # noqa: BLE001
            raise EdgeloraError(f"{self.runtime.bundle_dir / 'model.onnx'}: run failed ({first_line(e)})") from None

    def _unshare(self) -> None:
        """Hand the shared buffers' cache back as plain arrays (before the batch's rows change)."""
        if self._kv is not None:
            self._past, self._kv = self._kv.cache(), None

    def _prefill_chunk(self) -> None:
        """The next chunk of the prompts being prefilled (left-padded, from an empty cache), extending their
        cache; after the last, their first tokens and the splice into the batch. Decoding rows wait one chunk
        per step, not a whole long prompt."""
        f = self._filling
        gone = [r for r, job in enumerate(f.jobs) if job.cancelled]
        if gone:
            for r in gone:
                self._end(f.jobs[r], "cancelled")
            f.keep([r for r in range(len(f.jobs)) if r not in gone])
            if not f.jobs:
                self._filling = None
                return
        c0, c1 = f.done, min(f.mask.shape[1], f.done + f.chunk)
        feeds = {"input_ids": f.input_ids[:, c0:c1], "attention_mask": f.mask[:, :c1],
                 **dict(zip(self._past_names, f.present)), **self._keep_last}
        if self._positions:
            feeds["position_ids"] = f.positions[:, c0:c1]
        try:
            logits, f.present = self._run(feeds, [j.adapter for j in f.jobs])
        except EdgeloraError as e:
            for job in f.jobs:
                self._end(job, "error", str(e))
            self._filling = None
            return
        f.done = c1
        if c1 < f.mask.shape[1]:
            return
        self._filling = None
        rows = [_Row(job, self.generator.tokenizer) for job in f.jobs]
        self.prompt_tokens_total += sum(len(job.prompt_ids) for job in f.jobs)
        live = self._sample(rows, logits)
        now = time.perf_counter()
        for row in rows:
            row.job.first_token_s = now - row.job.arrived
        keep = [r for r in range(len(rows)) if r in live]
        if not keep:
            return
        present, mask, rows = [p[keep] for p in f.present], f.mask[keep], [rows[r] for r in keep]
        self._unshare()
        if not self._rows:
            self._past, self._mask, self._rows = present, mask, rows
        else:  # left-pad the shorter side so both end at the newest column, then stack the rows
            S, T = self._mask.shape[1], mask.shape[1]
            W = max(S, T)
            self._past = [np.concatenate([_left_pad(old, W - S), _left_pad(new, W - T)])
                          for old, new in zip(self._past, present)]
            for moved, group in ((W - S, self._rows), (W - T, rows)):
                for row in group:
                    row.moved += moved
            self._mask = np.concatenate([np.pad(self._mask, ((0, 0), (W - S, 0))), np.pad(mask, ((0, 0), (W - T, 0)))])
            self._rows = self._rows + rows
        self._trim()

    def _decode(self) -> None:
        """One token for every row in one run."""
        rows = self._rows
        B = len(rows)
        mask = np.concatenate([self._mask, np.ones((B, 1), np.int64)], axis=1)
        feeds = {"input_ids": np.array([[r.last] for r in rows], np.int64), "attention_mask": mask}
        if self._positions:  # tokens before the new one; where the graph rotates at cache indices
            # (positions "cache_index"), less the columns the row's cache moved, so it keeps its keys' rotation
            feeds["position_ids"] = np.array([[r.length - r.moved * self._cache_index] for r in rows], np.int64)
        kv = self._kv
        if kv is not None and kv.length >= kv.capacity:
            self._unshare()
            kv = None
        try:
            options, extra = self.runtime.row_options([r.job.adapter for r in rows])
            if kv is None and self._shares and not extra and options is self._base_options:
                # room for the steps until a row must end, when the rows change and the buffers go back anyway
                left = min(r.job.max_tokens - len(r.job.token_ids) for r in rows)
                kv = self._kv = SharedKV.holding(self.runtime.session, self._past_names, self._outputs[1:],
                                                 self._past, max(1, left))
                self._past = []
            if kv is not None:
                logits = self._guarded(kv.step, feeds, options)
                self.shared_steps += 1
            else:
                logits, *self._past = self._guarded(self.runtime.session.run, self._outputs,
                                                    {**feeds, **dict(zip(self._past_names, self._past)), **extra},
                                                    options)
        except EdgeloraError as e:
            self._fail_all(str(e))
            return
        self._mask = mask
        for r in rows:
            r.length += 1
        live = self._sample(rows, logits)
        self._leave([row for r, row in enumerate(rows) if r not in live], None)

    def _sample(self, rows: list[_Row], logits: np.ndarray) -> set[int]:
        """Each row's next token from its last position; ends the rows that finish. Returns the rows still live."""
        live: set[int] = set()
        made = 0
        for r, row in enumerate(rows):
            job = row.job
            tok = next_token(logits[r, -1], job.sampling, row.rng)
            if tok in self._eos:
                self._finish(row, "stop")
                continue
            made += 1
            job.token_ids.append(tok)
            self.adapter_tokens[job.adapter or ""] += 1
            piece = row.stops.push(row.detok.add(tok))
            row.last = tok
            if row.stops.stopped:
                job._emit(piece)
                self._finish(row, "stop")
            elif len(job.token_ids) >= job.max_tokens:
                job._emit(piece)
                self._finish(row, "length")
            else:
                job._emit(piece)
                live.add(r)
        self.tokens_total += made
        self.steps += 1
        now = time.perf_counter()
        self._recent.append((now, made))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
        return live

    def _finish(self, row: _Row, reason: str) -> None:
        """Release what the detokenizer and the stop strings held back, then end the job."""
        tail = "" if row.stops.stopped else row.stops.push(row.detok.flush())
        tail += row.stops.flush()
        self._end(row.job, reason, text=tail)

    def _end(self, job: Job, reason: str, error: str | None = None, text: str = "") -> None:
        if job.done:
            return
        self.requests[(job.adapter or "", reason)] += 1
        job._emit(text, reason, error)

    def _leave(self, rows: list[_Row], reason: str | None) -> None:
        """Take `rows` out of the batch (ending them with `reason` unless None: already ended)."""
        if not rows:
            return
        gone = {id(r) for r in rows}
        if reason is not None:
            for row in rows:
                self._end(row.job, reason)
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        self._unshare()
        self._rows = [self._rows[i] for i in keep]
        self._past = [p[keep] for p in self._past]
        self._mask = self._mask[keep]
        self._trim()

    def _trim(self) -> None:
        """Drop the leading cache columns that are padding in every row."""
        if not self._rows:
            self._past, self._mask = [], np.zeros((0, 0), np.int64)
            return
        first = int(np.argmax(self._mask.any(axis=0)))
        if first:
            self._past = [p[:, :, first:] for p in self._past]
            self._mask = self._mask[:, first:]
            for row in self._rows:
                row.moved -= first

    def _fail_all(self, message: str) -> None:
        for job in self._jobs_held():
            self._end(job, "error", message)
        self._rows, self._filling, self._past, self._mask = [], None, [], np.zeros((0, 0), np.int64)
        self._kv = None


def _left_pad(cache: np.ndarray, n: int) -> np.ndarray:
    """(rows, heads, seq, dim) with n zero columns before seq."""
    return np.pad(cache, ((0, 0), (0, 0), (n, 0), (0, 0))) if n else cache
