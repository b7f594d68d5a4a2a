"""Where the dashboard's numbers come from: the drivers of the configured connections.

Every read is bounded (`paged`, counts from `stats`), so a page costs the same on a queue of ten
jobs and on one of 100,000 waiting and 10,000 failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from core.errors import TopiqError
from core.queue import failed_retry
from core.queue.drivers.base import (
    Driver,
    FailedJob,
    FailedStore,
    MinuteCounts,
)
from core.queue.queue_manager import RECENT_WINDOW, QueueManager
from core.settings import QueueConnection, Settings

__all__ = [
    "CONNECT_TIMEOUT",
    "OVERVIEW_CONCURRENCY",
    "OVERVIEW_PAGE",
    "Overview",
    "QueueRow",
    "Source",
    "configured_connections",
    "retry_records",
]

#: Seconds a page waits for a backend to open before it says it cannot reach it.
CONNECT_TIMEOUT: Final = 10.0
#: Failed records read per round trip when a search or "retry all" walks the store.
PAGE: Final = 500
#: A text search in the failed store reads at most this many records (newest first).
SEARCH_LIMIT: Final = 10_000
#: Queues per overview page (`?offset=` pages on): a sender can make up thousands of names.
OVERVIEW_PAGE: Final = 50
#: Queue rows read at once per connection, over every overview being served (each row is 4
#: reads; a Redis pool of 100 connections fails fast, not slow, when more are in flight, and
#: several open pages refresh every second).
OVERVIEW_CONCURRENCY: Final = 8


def configured_connections(settings: Settings) -> list[str]:
    """The connections the dashboard offers: QUEUE_CONNECTION first, then Redis and the
    database when the settings enable them, and where failed jobs are kept."""
    names = [settings.queue_connection.value]
    if (
        settings.enable_redis
        or settings.redis_url
        or settings.redis_cluster_nodes
        or settings.redis_sentinels
    ):
        names.append(QueueConnection.REDIS.value)
    if settings.enable_mysql or (
        settings.db_url is not None and settings.db_url.get_secret_value()
    ):
        names.append(QueueConnection.DATABASE.value)
    names.append(settings.failed_connection_for[settings.queue_connection].value)
    return list(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One queue on the overview."""

    name: str
    pending: int
    delayed: int
    reserved: int
    deferred: int
    failed: int
    succeeded: int  # ended so over the last hour
    ended: int  # ended any way over the last hour
    wait: float | None  # mean dispatch-to-start over the hour, seconds
    paused: bool
    history: list[MinuteCounts]

    @property
    def throughput(self) -> float:
        """Jobs ended per minute over the last hour."""
        return self.ended / (RECENT_WINDOW / 60)


@dataclass(frozen=True, slots=True)
class Overview:
    """One page of the overview: its rows, where it starts and how many queues there are."""

    rows: list[QueueRow]
    offset: int
    total: int
    limit: int


class Source:
    """The dashboard's view of the backends, through one `QueueManager` opened on demand."""

    def __init__(self, manager: QueueManager) -> None:
        self.manager = manager
        self.settings = manager.settings
        self.connections = configured_connections(self.settings)
        self._gates: dict[str, asyncio.Semaphore] = {}

    def connection_name(self, given: str | None) -> str | None:
        """The connection `?connection=` names (default QUEUE_CONNECTION); `None` if it is
        not one the dashboard offers."""
        if not given:
            return self.connections[0]
        return given if given in self.connections else None

    async def driver(self, name: str) -> Driver:
        """The open driver of a connection, or `ConnectionError` naming it."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self.manager.connection(name)
        except TimeoutError:
            raise ConnectionError(
                f"cannot reach the {name} connection: no answer within {CONNECT_TIMEOUT:g}s"
            ) from None

    async def store(self, name: str) -> FailedStore:
        """The failed-job store of a connection (it may live on another backend)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self.manager.failed_store(name)
        except TimeoutError:
            raise ConnectionError(
                f"cannot reach the failed-job store of {name}: no answer within "
                f"{CONNECT_TIMEOUT:g}s"
            ) from None

    async def queue_row(
        self, driver: Driver, store: FailedStore, queue: str, paused: set[str] | None = None
    ) -> QueueRow:
        """Counts, the last hour and the paused flag of one queue (`paused`: the queues known
        to be paused, read once for a whole page; `None` reads this queue's flag)."""
        stats, failed, recent, history, flags = await asyncio.gather(
            driver.stats(queue),
            store.count(queue),
            driver.recent(queue, RECENT_WINDOW),
            driver.history(queue, 60),
            driver.paused([queue]) if paused is None else _known(paused),
        )
        waited = sum(m.waited for m in history)
        wait_ms = sum(m.wait_ms for m in history)
        return QueueRow(
            name=queue,
            pending=stats.pending,
            delayed=stats.delayed,
            reserved=stats.reserved,
            deferred=stats.deferred,
            failed=failed,
            succeeded=recent.succeeded,
            ended=recent.succeeded + recent.failed + recent.cancelled + recent.expired,
            wait=wait_ms / waited / 1000 if waited else None,
            paused=queue in flags,
            history=history,
        )

    async def overview(self, name: str, offset: int = 0, limit: int = OVERVIEW_PAGE) -> Overview:
        """One page of the queues the connection has seen, by name: at most
        `OVERVIEW_CONCURRENCY` rows of a connection read at once (over all the requests being
        served), the paused flags in one call."""
        driver = await self.driver(name)
        store = await self.store(name)
        queues = sorted(await driver.queues())
        page = queues[offset : offset + limit]
        paused = await driver.paused(page) if page else set()
        gate = self._gates.setdefault(name, asyncio.Semaphore(OVERVIEW_CONCURRENCY))

        async def row(queue: str) -> QueueRow:
            async with gate:
                return await self.queue_row(driver, store, queue, paused)

        rows = list(await asyncio.gather(*(row(q) for q in page)))
        return Overview(rows=rows, offset=offset, total=len(queues), limit=limit)

    async def search_failed(
        self, store: FailedStore, queue: str | None, text: str, offset: int, limit: int
    ) -> tuple[list[FailedJob], int, bool]:
        """Failed records of `queue` whose class or exception contains `text` (any case).

        Returns the page, how many matched, and whether the whole store was read (a search
        reads at most `SEARCH_LIMIT` records, newest first).
        """
        needle = text.lower()
        matches: list[FailedJob] = []
        read = 0
        while read < SEARCH_LIMIT:
            page = await store.list(queue, limit=PAGE, offset=read)
            read += len(page)
            matches.extend(
                r for r in page if needle in r.job_class.lower() or needle in r.exception.lower()
            )
            if len(page) < PAGE:
                return matches[offset : offset + limit], len(matches), True
        return matches[offset : offset + limit], len(matches), False

    async def every_failed(
        self, store: FailedStore, queue: str | None, text: str
    ) -> list[FailedJob]:
        """Every record the filter shows (read before anything changes, so a job that fails
        again at once is not retried twice by one press)."""
        if text:
            return (await self.search_failed(store, queue, text, 0, SEARCH_LIMIT))[0]
        return await failed_retry.every_record(store, queue, PAGE)


async def _known(paused: set[str]) -> set[str]:
    return paused


async def retry_records(
    source: Source, store: FailedStore, records: Sequence[FailedJob]
) -> tuple[list[str], list[str]]:
    """Put failed records back on their queues as `queue:retry` does; returns (retried,
    skipped: claimed by another retry or changed since they were read)."""
    retried: list[str] = []
    skipped: list[str] = []
    for start in range(0, len(records), PAGE):
        moved, passed = await failed_retry.retry_records(
            store, records[start : start + PAGE], source.driver
        )
        retried += moved
        skipped += passed
    return retried, skipped


#: What a page shows when a backend fails (its message, without any secret).
BACKEND_ERRORS: Final = (TopiqError, OSError, ConnectionError, TimeoutError)
