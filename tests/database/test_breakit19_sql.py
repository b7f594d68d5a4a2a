"""Break-it tests for issue #19's acknowledgement fast path (commits 712d20c, 4f1fe8e).

Each test here showed a defect of the first version, fixed since: the fast path now runs on
SQLite only (one writer), and MySQL/MariaDB take the general path, whose DELETE ... RETURNING
(or SELECT ... FOR UPDATE) reads and removes each row at one moment.

The fast path (`sql_lifecycle._ack_plain`) copies the records of plain successes with one
INSERT ... SELECT, then deletes the rows with a second statement. Its docstring says the copy
locks the rows it reads, "as every INSERT ... SELECT in InnoDB". The driver runs MariaDB at
READ COMMITTED (`sql_migrations.create_engine`), where InnoDB reads the SELECT side of an
INSERT ... SELECT as a consistent read, without locks: between the two statements another
worker's claim can take a row whose lease ran out, and the acknowledgement then commits a
`succeeded` record for a job that is running again (and that may never succeed).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from sqlalchemy import select

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.database import DatabaseDriver
from core.status import Status
from tests.database.conftest import mysql_url, settings_for

pytestmark = pytest.mark.timeout(60)


def job(queue: str) -> OutgoingJob:
    return OutgoingJob(uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:Echo", max_tries=3)


class _Between:
    """An `AsyncConnection` stand-in that runs `hook` right after the first statement the
    acknowledgement executes (the first version's record copy; now the DELETE ... RETURNING
    that takes the rows), before the statements that follow it."""

    def __init__(self, conn: Any, hook: Callable[[], Awaitable[None]]) -> None:
        self._conn = conn
        self._hook = hook
        self.fired = False
        self.task: asyncio.Task[None] | None = None

    @property
    def dialect(self) -> Any:
        return self._conn.dialect

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        result = await self._conn.execute(statement, *args, **kwargs)
        if not self.fired:
            self.fired = True
            # The other worker acts while this transaction is open: its statements reach the
            # server now, and wait for (or pass over) the rows this one holds. Not awaited
            # here: this transaction goes on, as it would in its own process.
            self.task = asyncio.create_task(self._hook())
            await asyncio.sleep(0.2)  # time for them to reach the server: no event tells
        return result

    async def settled(self) -> None:
        """The other worker's step, once this transaction has ended."""
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def mysql_pair() -> AsyncIterator[tuple[DatabaseDriver, DatabaseDriver]]:
    """Two drivers (two workers' processes: two engines) on the MariaDB test database."""
    url = mysql_url()
    async with (
        DatabaseDriver("database", settings_for(url)) as first,
        DatabaseDriver("database", settings_for(url)) as second,
    ):
        yield first, second


async def _records(driver: DatabaseDriver, job_id: str) -> list[Any]:
    assert driver._engine is not None
    c = t.queue_job_records.c
    async with driver._engine.connect() as conn:
        return list((await conn.execute(select(t.queue_job_records).where(c.uuid == job_id))).all())


async def _lapsed(driver: DatabaseDriver, queue: str) -> ReservedJob:
    """A job reserved under a lease that has already run out."""
    await driver.push([job(queue)])
    [held] = await driver.reserve([queue], 1, 0.02, worker="worker-a")
    await asyncio.sleep(0.1)  # a lease is a time: nothing to await but its end
    return held


@pytest.mark.mysql
async def test_a_stale_ack_racing_a_claim_writes_no_succeeded_record(
    mysql_pair: tuple[DatabaseDriver, DatabaseDriver],
    monkeypatch: pytest.MonkeyPatch,
    queue: str,
) -> None:
    a, b = mysql_pair
    stale = await _lapsed(a, queue)
    taken: list[ReservedJob] = []

    async def claim_meanwhile() -> None:
        # Worker B, another process, claims while worker A's ack is between its statements.
        taken.extend(await b.reserve([queue], 1, 60.0, worker="worker-b"))

    plain = life.ack_rows
    hooks: list[_Between] = []

    async def between(conn: Any, jobs: Sequence[ReservedJob], *args: Any) -> Any:
        hooked = _Between(conn, claim_meanwhile)
        hooks.append(hooked)
        return await plain(hooked, jobs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(life, "ack_rows", between)
    await a.ack([stale])  # A's try succeeded, but its lease had run out
    monkeypatch.undo()
    assert hooks and hooks[0].fired
    await hooks[0].settled()

    if not taken:
        # B's claim passed over the row A was acknowledging: A's ack ended the job. Correct.
        status = await a.job_status(stale.id)
        assert status is not None and status.status is Status.SUCCEEDED
        return
    # B holds the job: A's late ack must have left no record (as the general path does).
    [again] = taken
    assert again.id == stale.id and again.attempts == stale.attempts + 1
    assert await _records(a, stale.id) == [], "a 'succeeded' record for a job still running"
    # B's try fails for good, keeping nothing (failure_ttl 0): nothing may say it succeeded.
    again.outcome = Outcome(Status.FAILED, 0.0, error="boom")
    await b.ack([again])
    status = await a.job_status(stale.id)
    assert status is None or status.status is not Status.SUCCEEDED, status


@pytest.mark.mysql
async def test_a_row_the_fast_ack_deletes_has_its_record(
    mysql_pair: tuple[DatabaseDriver, DatabaseDriver],
    monkeypatch: pytest.MonkeyPatch,
    queue: str,
) -> None:
    a, b = mysql_pair
    pushed = OutgoingJob(
        uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:Echo", max_tries=3, priority=5
    )
    await a.push([pushed])
    [stale] = await a.reserve([queue], 1, 0.02, worker="worker-a")
    await asyncio.sleep(0.1)  # the lease runs out
    [again] = await b.reserve([queue], 1, 60.0, worker="worker-b")
    assert again.attempts == stale.attempts + 1

    async def refund_meanwhile() -> None:
        # Worker B is stopped and gives its try back (refund): the try count is A's again.
        await b.release(again, refund=True)

    plain = life.ack_rows

    hooks: list[_Between] = []

    async def between(conn: Any, jobs: Sequence[ReservedJob], *args: Any) -> Any:
        hooks.append(_Between(conn, refund_meanwhile))
        return await plain(hooks[-1], jobs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(life, "ack_rows", between)
    await a.ack([stale])  # A's late ack of its successful try
    monkeypatch.undo()
    await hooks[0].settled()

    if await a.size(queue) == 1:
        return  # the refunded job was left to run again: nothing lost, nothing wrong
    # The ack ended the job (the memory driver accepts it too: the try count matches again).
    # Then, as on every other path, it must be readable as succeeded for its result ttl.
    status = await a.job_status(pushed.id)
    assert status is not None and status.status is Status.SUCCEEDED, status
