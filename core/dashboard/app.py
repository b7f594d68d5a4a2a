"""The dashboard's Starlette application: `create_app(settings)`.

Pages are rendered on the server from Jinja2 templates (autoescaped); `static/dashboard.js`
re-fetches the page about every second and swaps the elements marked `data-live`. Security
is in `security.py`, the reads in `source.py`, the pages and actions in `views.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.dashboard import views
from core.dashboard.context import HERE, Dashboard
from core.dashboard.security import AuthMiddleware, session_secret
from core.queue.queue_manager import QueueManager
from core.settings import Settings

__all__ = ["create_app"]

#: The session cookie lasts this long (seconds) after the last page.
SESSION_AGE = 12 * 3600

_HEADERS: list[tuple[bytes, bytes]] = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class _SecurityHeaders:
    """Adds the headers above to every response (no framing, no inline script, no cache)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: Settings, manager: QueueManager | None = None) -> Starlette:
    """The dashboard app on `settings`' connections.

    With `manager` (a test's, or an app's own), the dashboard reads through it and leaves it
    open; without, it opens one for its lifetime.
    """
    own = manager is None
    qm = manager if manager is not None else QueueManager(settings)
    dash = Dashboard(settings, qm)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if own:
                await qm.close()

    def bind(
        view: Callable[[Dashboard, Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await view(dash, request)

        return endpoint

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code != 404:
            return Response(exc.detail, status_code=exc.status_code)
        return dash.render(
            request,
            "error.html",
            {"title": "Not found", "message": f"Nothing here: {request.url.path}"},
            404,
        )

    routes = [
        Route("/", bind(views.overview)),
        Route("/queues/{name:path}", bind(views.queue_page), methods=["GET"]),
        Route("/queues/{name:path}", bind(views.queue_action), methods=["POST"]),
        Route("/jobs", bind(views.job_search), methods=["GET"]),
        Route("/jobs/{job_id:path}", bind(views.job_page), methods=["GET"]),
        Route("/jobs/{job_id:path}", bind(views.job_action), methods=["POST"]),
        Route("/workers", bind(views.workers)),
        Route("/failed", bind(views.failed_page), methods=["GET"]),
        Route("/failed", bind(views.failed_action), methods=["POST"]),
        Route("/schedules", bind(views.schedules)),
        Route("/login", bind(views.login), methods=["GET", "POST"]),
        Route("/logout", bind(views.logout), methods=["POST"]),
        Route("/metrics", bind(views.metrics)),
        Route("/health", bind(views.health)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=session_secret(dash.token),
            session_cookie="topiq_dashboard",
            max_age=SESSION_AGE,
            same_site="lax",
        ),
        Middleware(AuthMiddleware, token=dash.token),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: not_found},
    )
    app.state.dashboard = dash
    return app
