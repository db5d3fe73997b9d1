"""What every HTTP route of `edgelora serve` shares: the error a route raises, the JSON error body, and
reading a request's JSON body within a size limit. Starlette objects are only passed in, never imported here.
"""

from __future__ import annotations

import json


class ApiError(Exception):
    """A request the server refuses: the HTTP status, the request field at fault (None: the whole request)
    and one line saying what to change; `extra` goes into the error body beside them."""

    def __init__(self, status: int, field: str | None, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.extra = status, field, message, extra


def error_body(field: str | None, message: str, **extra: object) -> dict:
    """The JSON every error answer carries: {"error": {"field": ..., "message": ..., ...}}."""
    return {"error": {"field": field, "message": message, **extra}}


async def read_json(request, max_body_bytes: int) -> object:
    """The request's body parsed as JSON; ApiError 400 if it is not JSON, 413 past `max_body_bytes`
    (checked against Content-Length first, then while the body streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "Content-Length", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > max_body_bytes:
            raise ApiError(413, "body", f"body is {declared} bytes, at most {max_body_bytes} allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, "body", f"body is over {max_body_bytes} bytes, the most allowed")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except UnicodeDecodeError:
        raise ApiError(400, "body", "body is not UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise ApiError(400, "body", f"body is not valid JSON ({where})") from None
