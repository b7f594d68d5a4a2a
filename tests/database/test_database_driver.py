"""The database driver's primitives on SQLite and MariaDB: the memory driver's semantics."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from core.errors import ConfigurationError, ConnectionLostError
from core.job import Job
from core.queue.drivers.base import FailedJob, OutgoingJob, ReservedJob, WorkerInfo
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.sql_migrations import LATEST_VERSION
from core.queue.queue_manager import QueueManager
from core.worker.options import StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.database.conftest import mysql_url, settings_for

pytestmark = pytest.mark.timeout(60)


def jobs(queue: str, count: int, delay: float = 0.0) -> list[OutgoingJob]:
    return [
        OutgoingJob(uuid.uuid4().hex, queue, f'{{"n": {n}}}'.encode(), delay) for n in range(count)
    ]


def ids(reserved: list[ReservedJob]) -> list[str]:
    return [job.id for job in reserved]


async def counts(driver: DatabaseDriver, queue: str) -> tuple[int, int, int]:
    stats = await driver.stats(queue)
    return stats.pending, stats.delayed, stats.reserved


async def test_fifo_limit_attempts_and_ack(driver: DatabaseDriver, queue: str) -> None:
    pushed = jobs(queue, 5)
    await driver.push(pushed)
    first = await driver.reserve([queue], 2, lease=30)
    assert ids(first) == [pushed[0].id, pushed[1].id]
    assert [job.attempts for job in first] == [1, 1]
    assert first[0].payload == b'{"n": 0}' and first[0].queue == queue
    assert await counts(driver, queue) == (3, 0, 2)
    rest = await driver.reserve([queue], 10, lease=30, ack=first)  # ack and claim at once
    assert ids(rest) == [job.id for job in pushed[2:]]
    assert await driver.size(queue) == 3
    await driver.ack(rest)
    assert await driver.size(queue) == 0
    assert await driver.reserve([queue], 10, lease=30) == []


async def test_earlier_queues_first(driver: DatabaseDriver, queue: str) -> None:
    low, high = jobs(f"{queue}-low", 2), jobs(f"{queue}-high", 2)
    await driver.push(low + high)
    got = await driver.reserve([f"{queue}-high", f"{queue}-low"], 3, lease=30)
    assert ids(got) == [high[0].id, high[1].id, low[0].id]


async def test_delayed_job_becomes_ready_at_its_time(driver: DatabaseDriver, queue: str) -> None:
    [late] = jobs(queue, 1, delay=0.4)
    pushed = time.monotonic()
    await driver.push([late])
    assert await counts(driver, queue) == (0, 1, 0)
    assert await driver.reserve([queue], 1, lease=30) == []
    # Wakes when the job is due, not after its 5 s: measured from the push (a loaded machine
    # may spend most of the delay on the calls above, and the wait is then short).
    await driver.wait([queue], timeout=5)
    assert 0.35 < time.monotonic() - pushed < 4.5
    [got] = await driver.reserve([queue], 1, lease=30)
    assert (got.id, got.attempts) == (late.id, 1)


async def test_wait_sleeps_its_timeout_when_nothing_is_due(
    driver: DatabaseDriver, queue: str
) -> None:
    started = time.monotonic()
    await driver.wait([queue], timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.5
    started = time.monotonic()
    await driver.wait([queue], timeout=0)
    assert time.monotonic() - started < 0.1


async def test_expired_lease_goes_to_the_front(driver: DatabaseDriver, queue: str) -> None:
    pushed = jobs(queue, 3)
    await driver.push(pushed)
    [held] = await driver.reserve([queue], 1, lease=0.1)
    await asyncio.sleep(0.25)  # the lease must run out: time itself is under test
    assert await counts(driver, queue) == (3, 0, 0)  # an expired lease counts as pending
    got = await driver.reserve([queue], 3, lease=30)
    assert ids(got) == [job.id for job in pushed]
    assert [job.attempts for job in got] == [2, 1, 1]
    await driver.ack([held])  # stale: the job was taken again
    assert await driver.size(queue) == 3


async def test_stale_reservation_changes_nothing(driver: DatabaseDriver, queue: str) -> None:
    await driver.push(jobs(queue, 1))
    [old] = await driver.reserve([queue], 1, lease=0.1)
    await asyncio.sleep(0.25)
    [new] = await driver.reserve([queue], 1, lease=30)
    assert new.id == old.id and new.attempts == 2
    await driver.ack([old])
    await driver.release(old, refund=True)
    await driver.extend([(old, 0.01)])
    assert await counts(driver, queue) == (0, 0, 1)
    await asyncio.sleep(0.05)
    assert await driver.reserve([queue], 1, lease=30) == []  # the live lease was not shortened
    await driver.ack([new])
    assert await driver.size(queue) == 0


async def test_release_back_front_and_later(driver: DatabaseDriver, queue: str) -> None:
    a, b, c = jobs(queue, 3)
    await driver.push([a, b, c])
    [held_a] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held_a)  # a spent try: behind the others
    assert ids(await driver.reserve([queue], 3, lease=30, ack=[])) == [b.id, c.id, a.id]


async def test_refund_goes_first_without_spending_a_try(driver: DatabaseDriver, queue: str) -> None:
    a, b = jobs(queue, 2)
    await driver.push([a, b])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held, refund=True)
    [again] = await driver.reserve([queue], 1, lease=30)
    assert (again.id, again.attempts) == (a.id, 1)


async def test_release_with_delay_waits(driver: DatabaseDriver, queue: str) -> None:
    await driver.push(jobs(queue, 1))
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held, 0.3)
    assert await counts(driver, queue) == (0, 1, 0)
    assert await driver.reserve([queue], 1, lease=30) == []
    await asyncio.sleep(0.35)
    [again] = await driver.reserve([queue], 1, lease=30)
    assert again.attempts == 2


async def test_extend_renews_each_lease(driver: DatabaseDriver, queue: str) -> None:
    await driver.push(jobs(queue, 2))
    first, second = await driver.reserve([queue], 2, lease=0.2)
    await driver.extend([(first, 30), (second, 0.3)])
    await asyncio.sleep(0.35)
    [back] = await driver.reserve([queue], 2, lease=30)
    assert (back.id, back.attempts) == (second.id, 2)


async def test_a_due_job_goes_to_exactly_one_of_many_drivers(db_url: str, queue: str) -> None:
    # Separate drivers have separate connection pools, like separate worker processes.
    drivers = [DatabaseDriver("database", settings_for(db_url)) for _ in range(4)]
    for each in drivers:
        await each.open()
    try:
        pushed = jobs(queue, 150) + jobs(queue, 50, delay=0.2)
        await drivers[0].push(pushed)

        async def take(driver: DatabaseDriver) -> list[str]:
            taken: list[str] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and await driver.size(queue):
                got = await driver.reserve([queue], 7, lease=30)
                taken.extend(ids(got))
                await driver.ack(got)
            return taken

        results = await asyncio.gather(*(take(each) for each in drivers))
        everything = [job_id for taken in results for job_id in taken]
        assert sorted(everything) == sorted(job.id for job in pushed)
    finally:
        for each in drivers:
            await each.close()


async def test_stats_size_queues_and_clear(driver: DatabaseDriver, queue: str) -> None:
    await driver.push(jobs(queue, 3) + jobs(queue, 2, delay=60))
    [held] = await driver.reserve([queue], 1, lease=30)
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.failed) == (2, 2, 1, 0)
    assert stats.connection == "database" and await driver.size(queue) == 5
    assert await driver.clear(queue) == 4  # the reserved job stays with its worker
    assert await counts(driver, queue) == (0, 0, 1)
    await driver.ack([held])
    assert queue in await driver.queues()  # an emptied queue is still known


async def test_pushing_a_stored_id_again_replaces_it(driver: DatabaseDriver, queue: str) -> None:
    [one] = jobs(queue, 1)
    await driver.push([one])
    await driver.push([*jobs(queue, 2), one])  # one id stored already, in a batch: the rare path
    assert await driver.size(queue) == 3


async def test_failed_store(driver: DatabaseDriver, queue: str) -> None:
    store = driver.failed_store()
    now = datetime.now(UTC)
    made = [
        FailedJob(uuid.uuid4().hex, "database", queue, "{}", f"E{n}", now - timedelta(hours=n))
        for n in range(3)
    ]
    for record in reversed(made):
        await store.add(record)
    await store.add(made[2])  # replaces, does not duplicate
    assert await store.count(queue) == 3
    assert [r.id for r in await store.list(queue)] == [r.id for r in made]
    assert [r.id for r in await store.list(queue, limit=1, offset=1)] == [made[1].id]
    got = await store.get(made[1].id)
    assert got is not None and got.exception == "E1" and got.failed_at.tzinfo is not None
    assert abs((got.failed_at - made[1].failed_at).total_seconds()) < 0.002
    # prune is not per queue: on a shared database it may remove other runs' old records too.
    assert await store.prune(now - timedelta(minutes=90)) >= 1
    assert await store.get(made[2].id) is None
    assert await store.count(queue) == 2
    assert await store.forget(made[1].id) is True
    assert await store.forget(made[1].id) is False
    assert await store.flush(queue) == 1
    assert await store.count(queue) == 0


async def test_workers_and_restart(driver: DatabaseDriver) -> None:
    worker_id = f"host:1:{uuid.uuid4().hex[:6]}"
    info = WorkerInfo(worker_id, "host", 1, "database", ("a",), 4, 1.0, 2.0, 3, ("j",))
    await driver.report_worker(info, ttl=30)
    await driver.report_worker(info, ttl=30)  # an upsert
    assert info in await driver.workers()
    await driver.remove_worker(worker_id)
    assert info not in await driver.workers()
    await driver.report_worker(info, ttl=0.05)
    await asyncio.sleep(0.1)
    assert info not in await driver.workers()
    # Times long past: the signal is global to the database, and a test run next to this one
    # must not see its workers asked to restart.
    await driver.request_restart(1234.5)
    await driver.request_restart(2345.25)  # an upsert
    assert await driver.restart_requested_at() == 2345.25


class NoopJob(Job):
    """Does nothing: the worker's and the driver's overhead is what is measured."""

    async def handle(self) -> None:
        pass


async def test_worker_drains_a_batch_with_concurrency(db_url: str, queue: str) -> None:
    settings = settings_for(db_url, queue_default=queue)
    async with QueueManager(settings) as manager:
        await manager.bulk([NoopJob() for _ in range(300)])
        worker = Worker(
            manager,
            WorkerOptions(queues=(queue,), concurrency=32, stop_when_empty=True, sleep=0.05),
        )
        assert await worker.run() is StopReason.EMPTY
        assert worker.processed == 300
        assert await manager.size(queue) == 0


@pytest.mark.mysql
@pytest.mark.slow
async def test_sixteen_mebibyte_payload_round_trip(queue: str) -> None:
    async with DatabaseDriver("database", settings_for(mysql_url())) as driver:
        blob = b'{"data": "' + b"x" * (16 * 1024 * 1024) + b'"}'
        [job] = jobs(queue, 1)
        await driver.push([OutgoingJob(job.id, queue, blob)])
        [got] = await driver.reserve([queue], 1, lease=30)
        assert got.payload == blob
        await driver.ack([got])


@pytest.mark.mysql
async def test_recovers_when_the_server_drops_its_connections(queue: str) -> None:
    async with DatabaseDriver("database", settings_for(mysql_url())) as driver:
        engine = driver._engine
        assert engine is not None
        async with engine.connect() as conn:  # the pooled connection the next call will reuse
            victim = await conn.scalar(text("SELECT CONNECTION_ID()"))
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT CONNECTION_ID()")) == victim
        killer = DatabaseDriver("database", settings_for(mysql_url()))
        async with killer:
            assert killer._engine is not None
            async with killer._engine.connect() as conn:
                await conn.execute(text(f"KILL {int(victim)}"))
        await driver.push(jobs(queue, 1))  # the dead connection is replaced, no error
        assert await driver.size(queue) == 1
        await driver.clear(queue)


async def test_unreachable_server_is_connection_lost_without_the_password() -> None:
    settings = settings_for("mysql+aiomysql://topiq:s3cret-pw@127.0.0.1:9/topiq")
    with pytest.raises(ConnectionLostError) as caught:
        await DatabaseDriver("database", settings).open()
    assert "s3cret-pw" not in str(caught.value)
    assert "127.0.0.1:9" in str(caught.value)


async def test_driver_refuses_an_old_schema_without_auto_migrate(tmp_path: Path) -> None:
    settings = settings_for(f"sqlite+aiosqlite:///{tmp_path}/q.sqlite3", db_auto_migrate=False)
    with pytest.raises(
        ConfigurationError,
        match=rf"version 0, .* needs {LATEST_VERSION}: run `python main.py queue:migrate`",
    ):
        await DatabaseDriver("database", settings).open()
