"""Dispatching jobs: `QueueManager`, and the module-level `queue` and `dispatch` facade.

    from core.queue.queue_manager import dispatch, queue

    await dispatch(SendMail(to="a@example.com"))
    await queue.later("10 minutes", Report(kind="daily"))

The facade forwards to a default manager that configures itself from the settings on first use
(or takes the one the app or worker installs with `set_default_manager`) and closes its
connections when the event loop that opened them shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self

from core.delays import Delay, parse_delay
from core.errors import ConfigurationError, SerializationError, UnloadableJobError
from core.job import Job
from core.queue.drivers import Driver, FailedStore, OutgoingJob, QueueStats, create_driver
from core.queue.payload import encode, new_job_id, unloadable_reason, validate_queue
from core.settings import QueueConnection, Settings

__all__ = [
    "QueueManager",
    "dispatch",
    "get_default_manager",
    "queue",
    "set_default_manager",
]


class QueueManager:
    """Sends jobs to queues and answers questions about them, on any configured connection.

    Use as `async with QueueManager(settings) as manager:`; connections open on first use and
    close on exit.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self._drivers: dict[str, Driver] = {}
        self._opened: set[str] = set()
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Jobs queued through this manager (read by the MQTT app's counters).
        self.dispatched = 0
        #: Job classes a worker can import (checked once per class).
        self._loadable: set[type[Job]] = set()

    # -- connections -------------------------------------------------------------------

    def connection_name(self, name: str | None = None) -> str:
        """The connection `name` names, or the default one; `ConfigurationError` if unknown."""
        if name is None:
            return self.settings.queue_connection.value
        try:
            return QueueConnection(name).value
        except ValueError:
            known = ", ".join(c.value for c in QueueConnection)
            raise ConfigurationError(
                f"unknown queue connection {name!r}: must be one of {known}"
            ) from None

    def driver(self, name: str | None = None) -> Driver:
        """The driver of a connection (created on first use, not necessarily open)."""
        name = self.connection_name(name)
        driver = self._drivers.get(name)
        if driver is None:
            driver = self._drivers[name] = self._create(name)
        return driver

    def _create(self, name: str) -> Driver:
        if name == QueueConnection.SYNC:
            from core.queue.drivers.sync import SyncDriver

            return SyncDriver(name, self.settings, manager=self)
        return create_driver(name, self.settings, name)

    async def connection(self, name: str | None = None) -> Driver:
        """The open driver of a connection."""
        self._check_loop()
        name = self.connection_name(name)
        driver = self.driver(name)
        if name not in self._opened:
            if self._open_lock is None:
                self._open_lock = asyncio.Lock()
            async with self._open_lock:
                if name not in self._opened:
                    await driver.open()
                    self._opened.add(name)
        return driver

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            # The loop that opened our connections is gone (a second `asyncio.run`): its
            # connections cannot be used or closed from here, so start afresh.
            self._drivers.clear()
            self._opened.clear()
            self._open_lock = None
            self._loop = loop

    async def failed_store(self, connection: str | None = None) -> FailedStore:
        """The store where jobs failing on `connection` are recorded."""
        name = QueueConnection(self.connection_name(connection))
        target = self.settings.failed_connection_for[name]
        return (await self.connection(target.value)).failed_store()

    async def close(self) -> None:
        """Close every open connection."""
        drivers = [self._drivers[name] for name in self._opened if name in self._drivers]
        self._opened.clear()
        for driver in drivers:
            await driver.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- dispatching -------------------------------------------------------------------

    def _target(self, job: Job, queue: str | None, connection: str | None) -> tuple[str, str]:
        if not isinstance(job, Job):
            raise SerializationError(
                f"only core.job.Job instances can be dispatched, got {type(job).__name__}"
            )
        if queue is None:
            queue = job.queue if job.queue != Job.queue else self.settings.queue_default
        conn = self.connection_name(connection or job.connection)
        cls = type(job)
        if cls not in self._loadable and conn != QueueConnection.SYNC:
            # Refused here rather than failed on the worker: nothing is queued that no worker
            # can import. `sync` runs the job inline, in this process, so any class goes.
            reason = unloadable_reason(cls, self.settings.queue_allowed_modules)
            if reason is not None:
                raise UnloadableJobError(reason)
            self._loadable.add(cls)
        return conn, validate_queue(queue)

    def _outgoing(self, job: Job, queue: str, delay: float) -> OutgoingJob:
        job_id = new_job_id()
        payload = encode(
            job, job_id=job_id, queue=queue, max_bytes=self.settings.queue_max_payload_bytes
        )
        job.job_id = job_id
        return OutgoingJob(job_id, queue, payload, delay)

    async def push(
        self,
        job: Job,
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
    ) -> str:
        """Queue `job` and return its id. Nothing is queued if the job cannot be stored."""
        conn, name = self._target(job, queue, connection)
        outgoing = self._outgoing(job, name, parse_delay(delay) if delay is not None else 0.0)
        driver = await self.connection(conn)
        await driver.push([outgoing])
        self.dispatched += 1
        return outgoing.id

    async def later(
        self, delay: Delay, job: Job, queue: str | None = None, connection: str | None = None
    ) -> str:
        """Queue `job` to run after `delay` (seconds, "10 minutes", timedelta or datetime)."""
        return await self.push(job, queue, connection, delay=delay)

    async def bulk(
        self,
        jobs: Iterable[Job],
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
    ) -> list[str]:
        """Queue many jobs with one round trip per connection; returns their ids in order.

        Every job is encoded before anything is sent, so one bad job queues none of them.
        """
        seconds = parse_delay(delay) if delay is not None else 0.0
        groups: dict[str, list[OutgoingJob]] = defaultdict(list)
        ids: list[str] = []
        for job in jobs:
            conn, name = self._target(job, queue, connection)
            outgoing = self._outgoing(job, name, seconds)
            groups[conn].append(outgoing)
            ids.append(outgoing.id)
        for conn, batch in groups.items():
            driver = await self.connection(conn)
            await driver.push(batch)
            self.dispatched += len(batch)
        return ids

    # -- inspecting --------------------------------------------------------------------

    async def size(self, queue: str | None = None, connection: str | None = None) -> int:
        """Jobs of `queue` not yet finished: pending, delayed and reserved."""
        driver = await self.connection(connection)
        return await driver.size(validate_queue(queue or self.settings.queue_default))

    async def stats(
        self, queue: str | None = None, connection: str | None = None
    ) -> list[QueueStats]:
        """Counts per queue (every queue the connection has seen, or just `queue`)."""
        driver = await self.connection(connection)
        store = await self.failed_store(connection)
        names: Sequence[str] = [queue] if queue else await driver.queues()
        out = []
        for name in names:
            stats = await driver.stats(name)
            failed = await store.count(name)
            out.append(
                QueueStats(driver.name, name, stats.pending, stats.delayed, stats.reserved, failed)
            )
        return out


# -- the default manager and the facade ---------------------------------------------------

_default: QueueManager | None = None


def set_default_manager(manager: QueueManager | None) -> None:
    """Make `manager` the one `dispatch` and `queue` use (the app and worker call this)."""
    global _default
    _default = manager


def get_default_manager() -> QueueManager:
    """The default manager, configured from the settings on first use."""
    global _default
    if _default is None:
        _default = QueueManager()
    return _default


async def _close_with_loop(manager: QueueManager) -> AsyncIterator[None]:
    # asyncio.run() finalises async generators before closing its loop, which runs this
    # `finally` there: connections opened by the facade close with the loop that owns them.
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await manager.close()


class _Facade:
    """`queue`: the default manager's methods, reachable before any manager exists."""

    _closers: dict[int, AsyncIterator[None]] = {}

    async def _manager(self) -> QueueManager:
        manager = get_default_manager()
        loop = asyncio.get_running_loop()
        if id(loop) not in self._closers:
            closer = _close_with_loop(manager)
            await anext(closer)
            self._closers.clear()
            self._closers[id(loop)] = closer
        return manager

    async def push(self, job: Job, *args: Any, **kwargs: Any) -> str:
        return await (await self._manager()).push(job, *args, **kwargs)

    async def later(self, delay: Delay, job: Job, *args: Any, **kwargs: Any) -> str:
        return await (await self._manager()).later(delay, job, *args, **kwargs)

    async def bulk(self, jobs: Iterable[Job], *args: Any, **kwargs: Any) -> list[str]:
        return await (await self._manager()).bulk(jobs, *args, **kwargs)

    async def size(self, queue: str | None = None, connection: str | None = None) -> int:
        return await (await self._manager()).size(queue, connection)

    async def stats(
        self, queue: str | None = None, connection: str | None = None
    ) -> list[QueueStats]:
        return await (await self._manager()).stats(queue, connection)


queue = _Facade()


async def dispatch(job: Job, *, delay: Delay | None = None) -> str:
    """Queue `job` on its own queue and connection; returns the job id."""
    return await queue.push(job, delay=delay)
