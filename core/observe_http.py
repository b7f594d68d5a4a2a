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
import dataclasses
import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence, Sized
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core import metrics as topiq_metrics
from core.errors import ConfigurationError
from core.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from core.health import Health
    from core.mqtt.outcomes import OutcomePublisher
    from core.mqtt.stats import MqttStats
    from core.queue.drivers.base import Driver, FailedStore
    from core.queue.queue_manager import QueueManager
    from core.worker.worker import Worker

__all__ = [
    "EndpointError",
    "HealthLike",
    "app_endpoint",
    "build_app",
    "serve_endpoint",
    "worker_endpoint",
]

logger = logging.getLogger("topiq.metrics")


class HealthLike(Protocol):
    """What `/health` needs of a check's answer (`core.health.Health` is one)."""

    @property
    def ok(self) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


class EndpointError(ConfigurationError):
    """The endpoint cannot listen where it was asked to (port in use, bad address)."""


def build_app(
    render: Callable[[], Awaitable[bytes]],
    health: Callable[[], Awaitable[HealthLike]] | None = None,
) -> Starlette:
    """The Starlette app serving `/metrics` and `/health` (always ok when `health` is None)."""

    async def metrics_page(request: Request) -> Response:
        try:
            body = await render()
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
        log_config=None,  # uvicorn's lines go through the process's own logging (JSON or not)
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


# -- the endpoints of a worker and of the MQTT app --------------------------------------------


async def _open_driver(manager: QueueManager, connection: str) -> Driver | None:
    """The connection's open driver, or None when it cannot be had in time."""
    try:
        return await asyncio.wait_for(manager.connection(connection), topiq_metrics.BACKEND_TIMEOUT)
    except Exception:
        return None


async def _backend_part(
    manager: QueueManager, connection: str, queues: Sequence[str] | None
) -> bytes:
    driver = await _open_driver(manager, connection)
    if driver is None:
        logger.warning("metrics: the %s backend cannot be reached", connection)
        return topiq_metrics.backend_down(connection)

    async def store(driver: Driver) -> FailedStore:
        return await manager.failed_store(driver.name)

    return await topiq_metrics.backend_metrics([driver], queues=queues, stores=store)


async def _health(manager: QueueManager, connection: str, need_workers: bool) -> Health:
    from core.health import Health, check_health

    driver = await _open_driver(manager, connection)
    if driver is None:
        return Health(
            False,
            connection,
            False,
            0,
            f"backend {connection!r} did not answer within {topiq_metrics.BACKEND_TIMEOUT:g} s",
        )
    return await check_health(
        driver, need_workers=need_workers, timeout=topiq_metrics.BACKEND_TIMEOUT
    )


def _running(worker: Worker) -> int:
    running: Sized = getattr(worker, "_running", ())
    return len(running)


def _outcomes(worker: Worker | None) -> OutcomePublisher | None:
    publisher: OutcomePublisher | None = getattr(worker, "_outcomes", None)
    return publisher


def worker_endpoint(worker: Worker, host: str, port: int) -> AbstractAsyncContextManager[int]:
    """`queue:work --metrics-port`: the worker's job counters, the depths of its queues on its
    connection, its running jobs, and `/health` (backend answers, a live worker exists)."""
    topiq_metrics.install()
    manager = worker.manager
    connection = worker.connection

    async def render() -> bytes:
        backend = await _backend_part(manager, connection, worker.options.queues)
        return b"".join(
            (
                topiq_metrics.job_metrics(),
                backend,
                topiq_metrics.worker_metrics(connection, _running(worker)),
                topiq_metrics.outcome_metrics(_outcomes(worker)),
            )
        )

    async def health() -> Health:
        return await _health(manager, connection, need_workers=True)

    return serve_endpoint(host, port, metrics=render, health=health)


def app_endpoint(
    stats: MqttStats,
    manager: QueueManager,
    queues: Sequence[str] | None,
    host: str,
    port: int,
    worker: Callable[[], Worker | None] = lambda: None,
) -> AbstractAsyncContextManager[int]:
    """`serve --metrics-port`: the MQTT app's counters, the jobs it dispatched, the depths of
    `queues` on the default connection (None: every queue it knows), and the running jobs of
    the worker `worker()` returns (`--worker`);
    `/health` is ok while the backend answers and the app is connected to the broker (and,
    with `--worker`, a live worker exists)."""
    topiq_metrics.install()
    connection = manager.connection_name()

    async def render() -> bytes:
        backend = await _backend_part(manager, connection, queues)
        running = worker()
        parts = [
            topiq_metrics.job_metrics(),
            backend,
            topiq_metrics.mqtt_metrics(stats, lambda: _outcomes(running)),
        ]
        if running is not None:
            parts.append(topiq_metrics.worker_metrics(connection, _running(running)))
        return b"".join(parts)

    async def health() -> Health:
        state = await _health(manager, connection, need_workers=worker() is not None)
        if state.ok and not stats.connected:
            return dataclasses.replace(state, ok=False, error="not connected to the MQTT broker")
        return state

    return serve_endpoint(host, port, metrics=render, health=health)
