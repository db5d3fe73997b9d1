"""`edgelora serve`: HTTP inference on a bundle with per-request adapter choice: /v1/predict for encoder bundles,
OpenAI's completions and chat API for decoder bundles. No torch; uvicorn and starlette
load only when the server starts, so the parser builds on a runtime-only install.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from edgelora.cli.common import as_flags
from edgelora.errors import EdgeloraError

if TYPE_CHECKING:
    from edgelora.runtime.runtime import Runtime


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `edgelora serve`."""
    from edgelora.runtime.serve import BATCHING  # torch-free; starlette and uvicorn stay unloaded

    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: physical cores)")
    parser.add_argument("--batching", choices=BATCHING, default="auto",
                        help="merge concurrent requests into one run: auto = fp32 bundles only (int8 answers then "
                             "stay bit-identical to offline predict), on = int8 too, off = never")
    parser.add_argument("--mix-adapters", action=argparse.BooleanOptionalAction, default=True,
                        help="run a merged batch that mixes adapters once, through the bundle's adapter bank, "
                             "where it has one (default; --no-mix-adapters: once per adapter)")
    parser.add_argument("--max-batch", type=int, default=32, help="encoder bundles: texts per merged run (default 32)")
    parser.add_argument("--window-ms", type=float, default=0.0,
                        help="how long a batch waits for more requests (default 0: it takes what queued while "
                             "the worker was busy)")
    parser.add_argument("--queue-limit", type=int, default=256, help="waiting requests before 503 (default 256)")
    parser.add_argument("--max-kv-mb", type=float, default=512.0,
                        help="decoder bundles: KV cache budget in MiB; a request waits (up to --queue-limit of "
                             "them, then 503) until the batch's worst case (rows x longest prompt + max_tokens) "
                             "fits (default 512)")
    parser.add_argument("--max-rows", type=int, default=8,
                        help="decoder bundles: generations decoding together in one batch at most (default 8)")
    parser.add_argument("--max-texts", type=int, default=64, help="texts per request (default 64)")
    parser.add_argument("--max-text-chars", type=int, default=4096, help="characters per text (default 4096)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body bytes (default 1 MiB)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM/SIGINT (default 30)")
    parser.add_argument("--spin", action="store_true", help="let ORT threads spin-wait between runs")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _announce(runtime: Runtime, host: str, port: int) -> None:
    """The one line a user (and tests/test_serve.py) waits for: where the server listens, and what it serves."""
    m = runtime.manifest
    url_host = f"[{host}]" if ":" in host else host
    print(f"edgelora serve: listening on http://{url_host}:{port} ({runtime.bundle_dir}: {m.mode} "
          f"{m.precision}, adapters {', '.join(runtime.adapters) or 'none'})", file=sys.stderr, flush=True)


def serve_command(args: argparse.Namespace) -> int:
    """`edgelora serve`: runs until SIGTERM/SIGINT; EdgeloraError propagates to the CLI."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise EdgeloraError(
            "edgelora serve needs uvicorn and starlette; install them: pip install 'edgelora[serve]'"
        ) from None
    from edgelora.runtime.serve import serve

    phrases = {"pick another host or port": "pick another --host or --port", "max_kv_mb is": "--max-kv-mb is",
               "max_rows is": "--max-rows is", "queue_limit is": "--queue-limit is"}
    with as_flags({}, phrases):
        serve(args.bundle, args.host, args.port, threads=args.threads, spin=args.spin, log_level=args.log_level,
              access_log=args.access_log, graceful_timeout=args.graceful_timeout, on_ready=_announce,
              batching=args.batching, mix_adapters=args.mix_adapters, max_batch=args.max_batch,
              window_ms=args.window_ms, queue_limit=args.queue_limit, max_texts=args.max_texts,
              max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes, max_kv_mb=args.max_kv_mb,
              max_rows=args.max_rows)
    return 0
