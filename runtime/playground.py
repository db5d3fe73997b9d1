"""The playground page of `edgelora serve` for decoder bundles (`GET /`): pick an adapter, type a prompt, watch
the answer stream. The page is one static file shipped beside this module (package data of edgelora.runtime),
with its CSS and script inline; it talks only to the server's own OpenAI routes. Starlette is imported only
when the route is built.
"""

from __future__ import annotations

from importlib import resources

PAGE = "playground.html"

# The browser may load nothing from elsewhere: the page's inline style and script, and requests to this server.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")


def playground_html() -> bytes:
    """The page's bytes, read from the installed package."""
    return resources.files("edgelora.runtime").joinpath(PAGE).read_bytes()


def playground_route():
    """A Starlette route answering `GET /` with the page (read once, when the route is built)."""
    from starlette.responses import Response
    from starlette.routing import Route

    body = playground_html()
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
               "X-Content-Type-Options": "nosniff"}

    async def page(request) -> Response:
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    return Route("/", page, methods=["GET"])
