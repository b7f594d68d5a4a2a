"""The small HTTP endpoint of a worker or the MQTT app: `/metrics` and `/health`.

    async with serve_endpoint("127.0.0.1", 9100, metrics=render, health=check):
        ...  # the process's own work

A Starlette app on uvicorn, in the caller's event loop (no thread, no second process); it
leaves the process's signal handling alone. `metrics` returns the exposition text;
`health` returns an object with `ok` and `to_dict()` (`core.health.Health`): `/health` answers
200 with its JSON when ok, 503 otherwise. The port is bound before `serve_endpoint` yields, so
a port already in use fails at start with `EndpointError` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core.errors import ConfigurationError
from core.metrics import CONTENT_TYPE

__all__ = ["EndpointError", "HealthLike", "build_app", "serve_endpoint"]

logger = logging.getLogger("topiq.metrics")


class HealthLike(Protocol):
    """What `/health` needs of a check's answer (`core.health.Health` is one)."""

    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


class EndpointError(ConfigurationError):
    """The endpoint cannot listen where it was asked to (port in use, bad address)."""


def build_app(
    metrics: Callable[[], Awaitable[bytes]],
    health: Callable[[], Awaitable[HealthLike]] | None = None,
) -> Starlette:
    """The Starlette app serving `/metrics` and `/health` (always ok when `health` is None)."""

    async def metrics_page(request: Request) -> Response:
        try:
            body = await metrics()
        except Exception as exc:  # a scrape never takes the process down
            logger.exception("metrics: the scrape failed")
            return PlainTextResponse(f"scrape failed: {type(exc).__name__}\n", status_code=500)
        return Response(body, media_type=CONTENT_TYPE)

    async def health_page(request: Request) -> Response:
        if health is None:
            return JSONResponse({"ok": True})
        try:
            state = await health()
        except Exception as exc:
            logger.exception("health: the check failed")
            return JSONResponse(
                {"ok": False, "error": f"the check failed: {type(exc).__name__}"},
                status_code=503,
            )
        return JSONResponse(state.to_dict(), status_code=200 if state.ok else 503)

    return Starlette(
        routes=[
            Route("/metrics", metrics_page, methods=["GET"]),
            Route("/health", health_page, methods=["GET"]),
        ]
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`, or an `EndpointError` saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EndpointError(f"--metrics-host {host}: not an address to listen on ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EndpointError(
                f"--metrics-port {port}: the port is already in use on {host} "
                "(another process listens there; choose another port)"
            ) from None
        raise EndpointError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve_endpoint(
    host: str,
    port: int,
    *,
    metrics: Callable[[], Awaitable[bytes]],
    health: Callable[[], Awaitable[HealthLike]] | None = None,
) -> AsyncIterator[int]:
    """Serve `/metrics` and `/health` on `host:port` while the block runs; yields the port
    (the one chosen when `port` is 0).

    Raises:
        EndpointError: the address cannot be listened on (e.g. the port is in use).
    """
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    config = uvicorn.Config(
        build_app(metrics, health),
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    # uvicorn's parts one by one rather than `serve()`, which would take over the process's
    # signal handlers (the worker and the app keep their own).
    try:
        await server.startup(sockets=[sock])
    except BaseException:
        sock.close()
        raise
    loop_task = asyncio.create_task(server.main_loop(), name="topiq-metrics-endpoint")
    logger.info("metrics and health on http://%s:%d/metrics and /health", host, bound)
    try:
        yield bound
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(loop_task), 3.0)
            await asyncio.wait_for(server.shutdown(sockets=[sock]), 3.0)
        except Exception:
            logger.warning("the metrics endpoint did not stop cleanly", exc_info=True)
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            sock.close()
