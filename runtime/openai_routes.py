"""OpenAI's API for decoder bundles in `edgelora serve`: GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (server-sent events with `stream: true`), GET /healthz and GET /metrics.

`model` names an adapter of the bundle, or the bundle itself for the plain base, as vLLM serves LoRA adapters;
every request runs in the continuous-batching `Engine` (runtime/engine.py), whose one thread makes every ONNX
Runtime call. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, `param` naming the
request field at fault. A client that goes away (streaming or not) cancels its request: it leaves the batch at
the engine's next step. Starlette is imported only when routes are built or answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

from edgelora.errors import EdgeloraError
from edgelora.runtime.batching import Metrics, Overloaded, _Histogram, _label
from edgelora.runtime.engine import Engine, Job, Piece, Refused
from edgelora.runtime.http_common import ApiError, read_json
from edgelora.runtime.runtime import Runtime

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: see default_max_tokens
MAX_STOPS = 4  # OpenAI accepts up to 4 stop sequences
ROLES = ("system", "developer", "user", "assistant")
# Fields OpenAI defines that this server accepts only at their neutral value (anything else: 400 naming them).
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
           "logit_bias": (None, {}), "parallel_tool_calls": (None,), "tools": (None, []), "tool_choice": (None, "none")}
COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream", "stream_options", "user",
          *NEUTRAL)
FIELDS = {"completions": ("prompt", *COMMON), "chat": ("messages", "max_completion_tokens", *COMMON)}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}


def openai_error(message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> dict:
    """The body of every error answer, as OpenAI writes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(data: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, name, f"{name} must be a number, got {json.dumps(value)}")
    if value < low or value > high or (open_low and value == low):
        where = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise ApiError(400, name, f"{name} is {value!r}; it must be in {where}")
    return float(value)


def _integer(data: dict, name: str, low: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, name, f"{name} must be an integer, got {json.dumps(value)}")
    if value < low:
        raise ApiError(400, name, f"{name} is {value}; it must be at least {low}")
    return value


class OpenAIService:
    """The OpenAI routes over one decoder Runtime and its Engine."""

    def __init__(self, runtime: Runtime, engine: Engine, *, max_body_bytes: int, retry_after_s: int, model: str) -> None:
        self.runtime, self.engine = runtime, engine
        self.max_body_bytes, self.retry_after_s = max_body_bytes, retry_after_s
        self.base = model  # the id of the bundle itself (adapter None)
        self.created = int(time.time())
        self.responses: Counter[tuple[str, int]] = Counter()  # (route, status)
        self.first_token = _Histogram(Metrics.LATENCY_BUCKETS)
        self._jobs: set[Job] = set()  # accepted and not yet ended
        self._watchers: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet ended (queued or decoding)."""
        self._jobs = {j for j in self._jobs if not j.done}
        return len(self._jobs)

    # -- the worker's life -----------------------------------------------------------------------

    async def start(self) -> None:
        self.engine.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    # -- parsing ---------------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [self.base, *self.runtime.adapters]

    def adapter_of(self, model: object) -> str | None:
        if model is None:
            raise ApiError(400, "model", "model is required: the bundle's name or one of its adapters "
                                         f"({', '.join(self.model_ids())})")
        if not isinstance(model, str):
            raise ApiError(400, "model", f"model must be a string, got {json.dumps(model)}")
        if model == self.base:
            return None
        if model in self.runtime.adapters:
            return model
        raise ApiError(404, "model", f"The model '{model}' does not exist; available: {', '.join(self.model_ids())}",
                       code="model_not_found")

    def parse(self, data: object, kind: str) -> tuple[dict, object]:
        """Engine arguments and the prompt (text, token ids or messages) of one request body."""
        if not isinstance(data, dict):
            raise ApiError(400, None, "body must be a JSON object")
        for key in data:
            if key not in FIELDS[kind]:
                raise ApiError(400, key, f"Unrecognized request argument supplied: {key}")
        for key, allowed in NEUTRAL.items():
            if key in data and data[key] not in allowed:
                raise ApiError(400, key, f"{key}={json.dumps(data[key])} is not supported by this server; "
                                         f"omit it or pass {json.dumps(allowed[-1])}")
        args: dict = {"adapter": self.adapter_of(data.get("model"))}
        args["temperature"] = _number(data, "temperature", 1.0, 0.0, 2.0)
        args["top_p"] = _number(data, "top_p", 1.0, 0.0, 1.0, open_low=True)
        args["top_k"] = _integer(data, "top_k", 0) or 0
        args["seed"] = _integer(data, "seed", 0)
        stop = data.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop", f"stop must be a string or a list of strings, got {json.dumps(data['stop'])}")
        if len(stop) > MAX_STOPS:
            raise ApiError(400, "stop", f"stop has {len(stop)} strings; at most {MAX_STOPS} are allowed")
        args["stop"] = stop
        for flag in ("stream",):
            if data.get(flag) is not None and not isinstance(data[flag], bool):
                raise ApiError(400, flag, f"{flag} must be a boolean, got {json.dumps(data[flag])}")
        options = data.get("stream_options")
        if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                    or not isinstance(options.get("include_usage", False), bool)):
            raise ApiError(400, "stream_options", 'stream_options must be {"include_usage": true|false}')
        if kind == "chat":
            max_name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
            prompt = self.messages(data.get("messages"))
        else:
            max_name = "max_tokens"
            prompt = self.prompt(data.get("prompt"))
        args["max_tokens"] = _integer(data, max_name, 1)
        args["max_name"] = max_name
        return args, prompt

    @staticmethod
    def prompt(value: object) -> str | list[int]:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
            value = value[0]  # a batch of one prompt
        if isinstance(value, str):
            if not value:
                raise ApiError(400, "prompt", "prompt is empty; pass some text")
            return value
        if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            raise ApiError(400, "prompt", f"prompt holds {len(value)} prompts; send one per request")
        raise ApiError(400, "prompt", "prompt is required: a string (or a list of token ids)")

    @staticmethod
    def messages(value: object) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise ApiError(400, "messages", "messages is required: a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(value):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise ApiError(400, where, f"{where} must be an object with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ApiError(400, f"{where}.role", f"{where}.role is {json.dumps(role)}; this server takes "
                                                     f"{', '.join(ROLES)}")
            if isinstance(content, list):  # content parts: only text ones
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{where}.content[{j}]", f"{where}.content[{j}] must be "
                                                                      '{"type": "text", "text": "..."}')
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise ApiError(400, f"{where}.content", f"{where}.content must be a string or a list of text parts")
            out.append({"role": "system" if role == "developer" else role, "content": content})
        return out

    def prompt_ids(self, prompt: object, kind: str) -> list[int]:
        field = "messages" if kind == "chat" else "prompt"
        if isinstance(prompt, list) and kind == "completions":
            return list(prompt)
        try:
            return self.engine.prompt_ids(prompt)
        except EdgeloraError as e:
            raise ApiError(400, field, str(e)) from None

    def default_max_tokens(self, kind: str, prompt_len: int) -> int:
        """max_tokens of a request that names none. Completions: OpenAI's 16. Chat: OpenAI gives the rest of
        the context, but the KV budget reserves prompt + max_tokens per request, so a default that large
        would let one request hold the whole budget; a chat gets one row's share of it instead (the budget
        over max_rows, as llama-server splits its context into slots), at least 16 tokens, within the
        context and the whole budget."""
        room = self.engine.spec.context_length - prompt_len
        tokens = self.engine.max_kv_bytes // self.engine.bytes_per_token
        if kind == "completions":
            return max(1, min(COMPLETION_DEFAULT_MAX_TOKENS, room))
        share = max(tokens // self.engine.max_rows - prompt_len, COMPLETION_DEFAULT_MAX_TOKENS)
        return max(1, min(share, room, tokens - prompt_len))

    # -- answering -------------------------------------------------------------------------------

    def error_response(self, e: ApiError, route: str):
        from starlette.responses import JSONResponse

        kind = "invalid_request_error" if e.status < 500 else "server_error"
        code = e.extra.get("code")
        self.responses[(route, e.status)] += 1
        return JSONResponse(openai_error(e.message, e.field, code, kind), status_code=e.status,
                            headers=e.extra.get("headers"))

    async def completions(self, request):
        return await self._answer(request, "completions")

    async def chat(self, request):
        return await self._answer(request, "chat")

    async def _answer(self, request, kind: str):
        from starlette.responses import JSONResponse, StreamingResponse

        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        try:
            data = await read_json(request, self.max_body_bytes)
            args, prompt = self.parse(data, kind)
            ids = self.prompt_ids(prompt, kind)
            max_name = args.pop("max_name")
            if args["max_tokens"] is None:
                args["max_tokens"] = self.default_max_tokens(kind, len(ids))
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[Piece] = asyncio.Queue()
            try:
                job = self.engine.submit(ids, sink=lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p), **args)
            except Refused as e:
                field = {"prompt": "messages" if kind == "chat" else "prompt", "max_tokens": max_name}.get(e.field,
                                                                                                          e.field)
                code = "context_length_exceeded" if "context" in str(e) else None
                raise ApiError(400, field, str(e), code=code) from None
            except Overloaded as e:
                raise ApiError(503, None, f"server busy ({e}); retry after {self.retry_after_s} s",
                               code="server_overloaded", headers={"Retry-After": str(self.retry_after_s)}) from None
        except ApiError as e:
            return self.error_response(e, route)
        self._jobs.add(job)
        # ends on the client's disconnect (cancelling the job) or once the response is complete
        watcher = asyncio.create_task(self._watch(request, job))
        self._watchers.add(watcher)  # the loop keeps only weak references to tasks
        watcher.add_done_callback(self._watchers.discard)
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": data["model"]}
        if data.get("stream"):
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            self.responses[(route, 200)] += 1
            return StreamingResponse(self._events(job, pieces, kind, head, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                piece = await pieces.get()
                if piece.finish_reason is not None:
                    break
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once it ended; stops it if this handler was cancelled
        self._finished(job)
        if piece.finish_reason == "cancelled":  # the engine stopped under it (the server is shutting down)
            self.responses[(route, 503)] += 1
            return JSONResponse(openai_error("the server stopped before the reply was done; retry", None,
                                             "server_overloaded", "server_error"), status_code=503)
        if piece.finish_reason == "error":
            self.responses[(route, 500)] += 1
            return JSONResponse(openai_error(f"generation failed: {piece.error}", None, None, "server_error"),
                                status_code=500)
        usage = _usage(piece)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": job.text}, "logprobs": None,
                      "finish_reason": piece.finish_reason}
            body = {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": job.text, "logprobs": None, "finish_reason": piece.finish_reason}
            body = {**head, "object": "text_completion", "choices": [choice], "usage": usage}
        self.responses[(route, 200)] += 1
        return JSONResponse(body)

    async def _events(self, job: Job, pieces: asyncio.Queue, kind: str, head: dict,
                      include_usage: bool) -> AsyncIterator[str]:
        """The stream's server-sent events; closing it (the client went away) cancels the job."""
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None = None, usage: dict | None = None, first: bool = False) -> str:
            if kind == "chat":
                delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {**head, "object": obj, "choices": [choice]}
            if usage is not None or include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if kind == "chat":
                yield chunk("", first=True)
            while True:
                piece = await pieces.get()
                if piece.finish_reason == "cancelled":
                    return
                if piece.finish_reason == "error":
                    body = openai_error(f"generation failed: {piece.error}", None, None, "server_error")
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                if piece.text:
                    yield chunk(piece.text)
                if piece.finish_reason is not None:
                    usage = _usage(piece)
                    yield chunk(None, piece.finish_reason, usage)
                    if include_usage:  # OpenAI's usage chunk: no choices
                        yield f"data: {json.dumps({**head, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            if job.finish_reason in ("stop", "length"):
                self._finished(job)

    @staticmethod
    async def _watch(request, job: Job) -> None:
        """Cancel `job` when the client disconnects (the body is read by then, so receive() waits for that)."""
        with contextlib.suppress(Exception):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancel()
                    return

    def _finished(self, job: Job) -> None:
        if job.first_token_s is not None:
            self.first_token.observe(job.first_token_s)

    # -- listing, health, metrics ----------------------------------------------------------------

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model(m) for m in self.model_ids()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        name = request.path_params["model"]
        if name not in self.model_ids():
            return self.error_response(ApiError(404, "model", f"The model '{name}' does not exist; available: "
                                                              f"{', '.join(self.model_ids())}", code="model_not_found"),
                                       "/v1/models")
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict:
        m = self.runtime.manifest
        entry = {"id": name, "object": "model", "created": self.created, "owned_by": "edgelora",
                 "root": name, "parent": None if name == self.base else self.base,
                 "max_model_len": self.engine.spec.context_length,
                 "edgelora": {"mode": m.mode, "precision": m.precision, "adapter": None if name == self.base else name}}
        return entry

    async def healthz(self, request):
        from starlette.responses import JSONResponse

        ok = self.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    async def metrics_text(self, request):
        from starlette.responses import Response

        e = self.engine
        name = lambda adapter: adapter or self.base  # noqa: E731
        out = ["# HELP edgelora_generated_tokens_total Tokens generated since the server started.",
               "# TYPE edgelora_generated_tokens_total counter", f"edgelora_generated_tokens_total {e.tokens_total}",
               "# HELP edgelora_prompt_tokens_total Prompt tokens prefilled since the server started.",
               "# TYPE edgelora_prompt_tokens_total counter", f"edgelora_prompt_tokens_total {e.prompt_tokens_total}",
               "# HELP edgelora_tokens_per_second Tokens generated per second over the last 10 s.",
               "# TYPE edgelora_tokens_per_second gauge", f"edgelora_tokens_per_second {e.tokens_per_second():.6g}",
               "# HELP edgelora_engine_steps_total Session runs that sampled tokens (prefills and decode steps).",
               "# TYPE edgelora_engine_steps_total counter", f"edgelora_engine_steps_total {e.steps}",
               "# HELP edgelora_active_requests Requests decoding in the batch now.",
               "# TYPE edgelora_active_requests gauge", f"edgelora_active_requests {e.active}",
               "# HELP edgelora_prefilling_requests Requests part way through their (chunked) prefill.",
               "# TYPE edgelora_prefilling_requests gauge", f"edgelora_prefilling_requests {e.prefilling}",
               "# HELP edgelora_queue_depth Requests waiting for room in the batch.",
               "# TYPE edgelora_queue_depth gauge", f"edgelora_queue_depth {e.queued}",
               "# HELP edgelora_queue_limit Waiting requests before the server answers 503.",
               "# TYPE edgelora_queue_limit gauge", f"edgelora_queue_limit {e.queue_limit}",
               "# HELP edgelora_in_flight_requests HTTP requests accepted and not yet answered.",
               "# TYPE edgelora_in_flight_requests gauge", f"edgelora_in_flight_requests {self.in_flight}",
               "# HELP edgelora_kv_cache_bytes Bytes the KV cache holds now (left padding included).",
               "# TYPE edgelora_kv_cache_bytes gauge", f"edgelora_kv_cache_bytes {e.kv_bytes}",
               "# HELP edgelora_kv_cache_reserved_bytes The batch's worst case the budget is checked against.",
               "# TYPE edgelora_kv_cache_reserved_bytes gauge", f"edgelora_kv_cache_reserved_bytes {e.kv_reserved_bytes}",
               "# HELP edgelora_kv_cache_budget_bytes The KV cache budget (--max-kv-mb).",
               "# TYPE edgelora_kv_cache_budget_bytes gauge", f"edgelora_kv_cache_budget_bytes {e.max_kv_bytes}",
               "# HELP edgelora_requests_total Generations ended, by model (adapter) and finish reason.",
               "# TYPE edgelora_requests_total counter"]
        for (adapter, reason), n in sorted(dict(e.requests).items()):
            out.append(f'edgelora_requests_total{{model="{_label(name(adapter))}",finish_reason="{reason}"}} {n}')
        out += ["# HELP edgelora_model_tokens_total Tokens generated, by model (adapter).",
                "# TYPE edgelora_model_tokens_total counter"]
        for adapter, n in sorted(dict(e.adapter_tokens).items()):
            out.append(f'edgelora_model_tokens_total{{model="{_label(name(adapter))}"}} {n}')
        out += ["# HELP edgelora_responses_total HTTP answers of the generation routes, by route and status.",
                "# TYPE edgelora_responses_total counter"]
        for (route, status), n in sorted(dict(self.responses).items()):
            out.append(f'edgelora_responses_total{{route="{route}",status="{status}"}} {n}')
        out += ["# HELP edgelora_time_to_first_token_seconds Arrival to first token, queueing included.",
                "# TYPE edgelora_time_to_first_token_seconds histogram"]
        out += self.first_token.lines("edgelora_time_to_first_token_seconds")
        return Response("\n".join(out) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(self, request, exc):
        """404/405 and other routing errors in OpenAI's shape."""
        from starlette.responses import JSONResponse

        return JSONResponse(openai_error(f"{request.method} {request.url.path}: {exc.detail}"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    def routes(self) -> list:
        """Starlette routes for this service's endpoints."""
        from starlette.routing import Route

        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]


def _usage(piece: Piece) -> dict:
    u = piece.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
