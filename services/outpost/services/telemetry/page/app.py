"""The status page's ASGI app (starlette): the page, the JSON it polls, /metrics and /healthz.

Every script and style the page loads is served from ``static/`` (uPlot vendored under
``static/vendor/``), and the Content-Security-Policy forbids the browser anything else, so the page
works with no internet and never leaks a request off the gateway.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outpost.services.telemetry.page.live import LiveView
from outpost.services.telemetry.page.prom import exposition, registry_for
from outpost.services.telemetry.page.settings import PageSettings

STATIC = Path(__file__).parent / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""uPlot sizes its elements with inline styles; nothing else is allowed beyond the gateway."""


class _Headers:
    """Security headers on every response (pure ASGI: no buffering of the body)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            await send(message)

        await self.app(scope, receive, send_with)


class _OrjsonResponse(JSONResponse):
    def render(self, content: object) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def make_app(view: LiveView, page: PageSettings) -> Starlette:
    registry = registry_for(view)

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def live(_: Request) -> Response:
        doc = view.snapshot()
        doc["poll_ms"] = int(page.poll_s * 1000)
        return _OrjsonResponse(doc, headers={"cache-control": "no-store"})

    async def metrics(_: Request) -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        connected = view.bus.connected
        return JSONResponse(
            {"ok": connected, "broker_connected": connected}, status_code=200 if connected else 503
        )

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/live", live),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(_Headers)],
    )
