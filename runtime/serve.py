"""HTTP inference for one bundle (`edgelora serve`): the Starlette app, its socket and the uvicorn server.

The rooms: runtime/batching.py queues requests and runs them on the one worker thread (`MicroBatcher`; its
docstring says what merging requests does to the answers), runtime/encoder_routes.py answers the encoder
routes (/v1/predict, /v1/adapters, /healthz, /metrics), runtime/http_common.py holds what every route shares
(errors, body limits). `create_app` puts them together. Starlette and uvicorn are imported only when an app
or a server is built, so the CLI's parser (edgelora/cli/serve.py) builds on a runtime-only install; nothing
here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

from edgelora.errors import EdgeloraError
from edgelora.runtime.batching import (
    BATCHING,
    FP32_MERGE_ATOL,
    Metrics,
    MicroBatcher,
    Overloaded,
    check_positive,
    merges_requests,
)
from edgelora.runtime.bundle import CAUSAL_LM
from edgelora.runtime.encoder_routes import REQUEST_FIELDS, EncoderService
from edgelora.runtime.http_common import error_body
from edgelora.runtime.runtime import Runtime

# re-exported: `edgelora.runtime.serve` stays the one import for the server's parts
__all__ = ["BATCHING", "FP32_MERGE_ATOL", "REQUEST_FIELDS", "Metrics", "MicroBatcher", "Overloaded", "create_app",
           "listen", "merges_requests", "run_app", "serve"]


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
    max_kv_mb: float = 512.0,
    max_rows: int = 8,
):
    """A Starlette app serving `runtime`: GET /v1/adapters, POST /v1/predict, GET /healthz, GET /metrics for an
    encoder bundle; OpenAI's /v1/models, /v1/completions, /v1/chat/completions (runtime/openai_routes.py) with
    /healthz, /metrics and the playground page at / (runtime/playground.py) for a decoder bundle (task
    "causal-lm").

    Example:
        >>> app = create_app(Runtime("bundles/minilm-int8"), window_ms=2)   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8080)                    # doctest: +SKIP

    Args:
        max_batch, window_ms, queue_limit: see `MicroBatcher`; a full queue answers 503 with Retry-After.
        max_texts, max_text_chars, max_body_bytes: request limits, answered 413 naming the field.
        batching: "auto" merges requests on fp32 bundles only, "on" on int8 too, "off" never; see
            runtime/batching.py's docstring for what merging changes in the answers.
        mix_adapters: merged batches that mix adapters run once through the bundle's adapter bank,
            instead of once per adapter (see `MicroBatcher`).
        max_kv_mb, max_rows: a decoder bundle's KV cache budget in MiB and the rows decoding together at most
            (see `Engine`); `queue_limit` requests wait for room, beyond them the answer is 503.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    for name, value in (("max_texts", max_texts), ("max_text_chars", max_text_chars),
                        ("max_body_bytes", max_body_bytes), ("retry_after_s", retry_after_s)):
        check_positive(name, value)
    model = Path(runtime.bundle_dir).resolve().name
    if runtime.manifest.task == CAUSAL_LM:
        from edgelora.runtime.engine import Engine
        from edgelora.runtime.openai_routes import OpenAIService

        engine = Engine(runtime, max_kv_mb=max_kv_mb, max_rows=max_rows, queue_limit=queue_limit)
        worker = service = OpenAIService(runtime, engine, max_body_bytes=max_body_bytes, retry_after_s=retry_after_s,
                                         model=model)
        http_error = service.http_error
    else:
        merge = merges_requests(batching, runtime.manifest.precision)
        worker = MicroBatcher(runtime, max_batch=max_batch, window_ms=window_ms, queue_limit=queue_limit,
                              merge=merge, mix=mix_adapters)
        service = EncoderService(runtime, worker, max_texts=max_texts, max_text_chars=max_text_chars,
                                 max_body_bytes=max_body_bytes, retry_after_s=retry_after_s, model=model)

        async def http_error(request, exc: HTTPException):
            return JSONResponse(error_body(None, f"{request.method} {request.url.path}: {exc.detail}"),
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    routes = service.routes()
    if runtime.manifest.task == CAUSAL_LM:
        from edgelora.runtime.playground import playground_route

        routes.append(playground_route())  # GET /: the playground page
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.batcher = worker if isinstance(worker, MicroBatcher) else None
    app.state.engine = getattr(service, "engine", None)  # a decoder bundle's continuous-batching Engine
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
        raise EdgeloraError(f"{host}:{port}: cannot listen ({why}); pick another host or port") from None


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
