"""The encoder routes of `edgelora serve`: POST /v1/predict (labels and scores for texts, per-request adapter),
GET /v1/adapters, GET /healthz and GET /metrics, for a classification bundle behind a `MicroBatcher`.

`create_app` (runtime/serve.py) mounts `EncoderService.routes()`; other APIs mount their own routes beside
them. Starlette is imported only when a route answers or the routes are built, so importing this needs none.
"""

from __future__ import annotations

import time

from edgelora.runtime.batching import MicroBatcher, Overloaded
from edgelora.runtime.http_common import ApiError, error_body, read_json
from edgelora.runtime.runtime import Runtime
from edgelora.runtime.session import first_line

REQUEST_FIELDS = ("texts", "adapter")
_MISSING = object()


class EncoderService:
    """The encoder routes of one Runtime: request parsing, limits, adapter resolution, metrics."""

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

    def parse(self, data: object) -> tuple[list[str], str]:
        if not isinstance(data, dict):
            raise ApiError(400, "body", 'body must be a JSON object {"texts": [...], "adapter": name or null}')
        for key in data:
            if key not in REQUEST_FIELDS:
                raise ApiError(422, key, f"unknown field {key!r}; the fields are {', '.join(REQUEST_FIELDS)}")
        texts = data.get("texts", _MISSING)
        if texts is _MISSING:
            raise ApiError(422, "texts", "texts is required: a list of strings")
        if not isinstance(texts, list) or not texts:
            raise ApiError(422, "texts", f"texts must be a non-empty list of strings, got {type(texts).__name__}"
                            + (" []" if texts == [] else ""))
        if len(texts) > self.max_texts:
            raise ApiError(413, "texts",
                            f"{len(texts)} texts, at most {self.max_texts} per request; split the request")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ApiError(422, f"texts[{i}]", f"texts[{i}] must be a string, got {type(text).__name__}")
            if len(text) > self.max_text_chars:
                raise ApiError(413, f"texts[{i}]",
                                f"texts[{i}] has {len(text)} characters, at most {self.max_text_chars} allowed")
        adapter = data.get("adapter")
        if adapter is None:
            if self.default_adapter is None:
                raise ApiError(422, "adapter", f"this bundle has no default adapter; pass one of {self.available()}",
                                available=list(self.runtime.adapters))
            adapter = self.default_adapter
        if not isinstance(adapter, str):
            raise ApiError(422, "adapter", f"adapter must be a string or null, got {type(adapter).__name__}")
        if adapter not in self.runtime.adapters:
            raise ApiError(404, "adapter", f"no adapter {adapter!r}; available: {self.available()}",
                            available=list(self.runtime.adapters))
        if not self.labels[adapter]:
            raise ApiError(422, "adapter", f"adapter {adapter!r} has no labels (no task head) to predict")
        return texts, adapter

    async def predict(self, request):
        from starlette.responses import JSONResponse

        t0 = time.perf_counter()
        adapter, seconds = "", None
        try:
            texts, adapter = self.parse(await read_json(request, self.max_body_bytes))
            future = self.batcher.submit(texts, adapter)
            self.in_flight += 1
            try:
                preds = await future
            finally:
                self.in_flight -= 1
        except ApiError as e:
            response = JSONResponse(error_body(e.field, e.message, **e.extra), status_code=e.status)
        except Overloaded as e:
            response = JSONResponse(error_body(None, f"server busy ({e}); retry after {self.retry_after_s} s"),
                                    status_code=503, headers={"Retry-After": str(self.retry_after_s)})
        except Exception as e:  # noqa: BLE001 - a failed run: one line to the client, the server keeps serving
            first = first_line(e)
            response = JSONResponse(error_body(None, f"inference failed: {first}"), status_code=500)
        else:
            try:  # JSONResponse refuses NaN: a bundle can give it for a text with no tokens
                response = JSONResponse({"predictions": preds, "adapter": adapter, "model": self.model})
                seconds = time.perf_counter() - t0
            except ValueError:
                response = JSONResponse(error_body(None, "inference gave a non-finite score (NaN or inf); "
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

    def routes(self) -> list:
        """Starlette routes for this service's endpoints."""
        from starlette.routing import Route

        return [
            Route("/v1/adapters", self.adapters, methods=["GET"]),
            Route("/v1/predict", self.predict, methods=["POST"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]
