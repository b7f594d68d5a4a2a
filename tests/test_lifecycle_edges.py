"""Edges of the job lifecycle found by trying to break it (issue #12 review), on every driver."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_tables as t
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.redis import RedisDriver
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conftest import _backend
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(60)

TEN_YEARS = 10 * 365 * 86400


@pytest.mark.parametrize("delay", [1e300, 1e12, "99999999 days"])
async def test_a_delay_past_the_year_9999_is_refused_at_dispatch(
    manager: QueueManager, delay: float | str
) -> None:
    # Before: SQL raised a bare OverflowError from the driver, Redis stored the job with a due
    # time that `queue:job` could not print.
    with pytest.raises(ValueError, match=r"invalid delay .*9999"):
        await manager.later(delay, RecordJob("log"))
    with pytest.raises(ValueError, match=r"invalid delay .*9999"):
        await manager.bulk([RecordJob("a"), RecordJob("b")], delay=delay)
    assert await manager.size() == 0


async def test_a_long_delay_within_range_is_kept(manager: QueueManager) -> None:
    before = time.time()
    handle = await manager.later(TEN_YEARS, RecordJob("log"))
    record = await handle.status()
    assert record.status == Status.SCHEDULED
    assert record.due_at is not None
    assert before + TEN_YEARS - 5 <= record.due_at <= time.time() + TEN_YEARS + 5


@pytest.fixture(params=["sqlite", "mysql"])
async def sql_manager(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[QueueManager]:
    backend = next(_backend(request.param, request, tmp_path))
    async with QueueManager(backend.settings()) as qm:
        yield qm


async def test_a_lying_failure_ttl_column_does_not_wedge_the_queue(
    sql_manager: QueueManager,
) -> None:
    """A row whose failure_ttl column was written by hand past the longest keep (3650 days)
    is expired with that keep time; it used to make every reserve of its queue fail
    (OverflowError), so that no job of the queue ran again."""
    doomed = await sql_manager.push(RecordJob("doomed"))
    other = await sql_manager.push(RecordJob("other"))
    driver = await sql_manager.connection()
    assert isinstance(driver, DatabaseDriver)

    async def lie_about(conn: AsyncConnection) -> None:
        await conn.execute(
            update(t.queue_jobs)
            .where(t.queue_jobs.c.uuid == doomed.id)
            .values(failure_ttl=1e308, expires_at=datetime(2000, 1, 1))
        )

    await driver._run("test", lie_about)
    queue = sql_manager.settings.queue_default
    reserved = await driver.reserve([queue], 10, 30, worker="w-test")
    assert [job.id for job in reserved if not job.expired] == [other.id]
    assert [job.id for job in reserved if job.expired] == [doomed.id]  # handed back (#14)
    record = await doomed.status()
    assert record.status == Status.EXPIRED


@pytest.fixture
async def redis_manager(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[QueueManager]:
    backend = next(_backend("redis", request, tmp_path))
    async with QueueManager(backend.settings()) as qm:
        yield qm


@pytest.mark.parametrize(
    "lie",
    [
        {"failure_ttl": "forever"},
        {"failure_ttl": "1e308"},
        {"failure_ttl": "inf"},
        {"due_at": "yesterday"},
    ],
)
async def test_a_lying_redis_record_does_not_wedge_the_queue(
    redis_manager: QueueManager, lie: dict[str, str]
) -> None:
    """The same on Redis: reserve.lua expired the job with `PEXPIRE rec <failure_ttl>` and did
    arithmetic on its due_at: a record field that is not a number, or a keep past the longest
    (3650 days), failed every reserve of the queue."""
    queue = redis_manager.settings.queue_default
    doomed = RecordJob("doomed")
    doomed.ttl = 60
    doomed_handle = await redis_manager.push(doomed)
    other = await redis_manager.push(RecordJob("other"))
    driver = await redis_manager.connection()
    assert isinstance(driver, RedisDriver)
    record_key = driver.keys(queue).record(doomed_handle.id)
    # Its ttl ran out long ago (epoch ms), and another field lies.
    await driver.client.hset(record_key, mapping={"expires_at": 1, **lie})
    reserved = await driver.reserve([queue], 10, 30, worker="w-test")
    assert [job.id for job in reserved if not job.expired] == [other.id]
    assert [job.id for job in reserved if job.expired] == [doomed_handle.id]  # handed back (#14)
    assert await driver.client.hget(record_key, "status") == b"expired"
    error = await driver.client.hget(record_key, "error")
    assert error.startswith(b"not started within its ttl of ")
    assert 0 < await driver.client.pttl(record_key) <= 3650 * 86400 * 1000


async def test_a_redis_record_with_a_garbled_expires_at_runs_its_job(
    redis_manager: QueueManager,
) -> None:
    queue = redis_manager.settings.queue_default
    job = RecordJob("garbled")
    job.ttl = 60
    handle = await redis_manager.push(job)
    driver = await redis_manager.connection()
    assert isinstance(driver, RedisDriver)
    await driver.client.hset(driver.keys(queue).record(handle.id), "expires_at", "soon")
    reserved = await driver.reserve([queue], 10, 30, worker="w-test")
    assert [job.id for job in reserved] == [handle.id]


@pytest.mark.parametrize("lie", ["forever", "1e308", "inf", "nan"])
async def test_a_lying_redis_failure_ttl_does_not_break_cancel(
    redis_manager: QueueManager, lie: str
) -> None:
    """cancel.lua kept the record for `PEXPIRE rec <failure_ttl>`: a field that is not a
    usable number made the cancel of that job fail."""
    queue = redis_manager.settings.queue_default
    handle = await redis_manager.push(RecordJob("cancel-me"))
    driver = await redis_manager.connection()
    assert isinstance(driver, RedisDriver)
    record_key = driver.keys(queue).record(handle.id)
    await driver.client.hset(record_key, "failure_ttl", lie)
    assert await handle.cancel() is True
    assert await driver.reserve([queue], 10, 30, worker="w-test") == []
    ttl = await driver.client.pttl(record_key)
    if lie == "nan":
        assert ttl == -2  # kept for 0 s: gone
    else:
        assert await driver.client.hget(record_key, "status") == b"cancelled"
        assert 0 < ttl <= 3650 * 86400 * 1000


@pytest.mark.parametrize("moment", [1e300, -1e20, float("inf"), float("nan")])
def test_a_time_no_calendar_holds_is_shown_not_fatal(moment: float) -> None:
    """`queue:job` formats the times of a record: one written by hand must not crash it."""
    from core.commands._common import stamp, when

    assert "not a valid time" in when(moment)
    assert "not a valid time" in stamp(moment)


@pytest.mark.parametrize("lie", ["forever", "inf", "1e308", "nan"])
async def test_a_lying_redis_failure_ttl_does_not_break_the_release_of_a_cancelled_job(
    redis_manager: QueueManager, lie: str
) -> None:
    """release.lua ended a job cancelled while it ran with `PEXPIRE rec <failure_ttl>`: a field
    that is not a usable number made the worker's release fail."""
    queue = redis_manager.settings.queue_default
    handle = await redis_manager.push(RecordJob("cancel-running"))
    driver = await redis_manager.connection()
    assert isinstance(driver, RedisDriver)
    [held] = await driver.reserve([queue], 1, 30, worker="w-test")
    record_key = driver.keys(queue).record(handle.id)
    await driver.client.hset(record_key, "failure_ttl", lie)
    assert await handle.cancel() is True
    await driver.release(held, error="cancelled")
    assert await driver.reserve([queue], 10, 30, worker="w-test") == []
    ttl = await driver.client.pttl(record_key)
    if lie == "nan":
        assert ttl == -2  # kept for 0 s: gone
    else:
        assert await driver.client.hget(record_key, "status") == b"cancelled"
        assert 0 < ttl <= 3650 * 86400 * 1000
