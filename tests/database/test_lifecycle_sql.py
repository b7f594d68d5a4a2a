"""The job lifecycle on SQLite and MariaDB, where the tables show it: uniqueness decided under
competing dispatchers (one engine each), `at_front` delays kept on the claim index, how many
statements the hot path runs, records written with the ack, pruning, and a cancel request
outliving its lease. The behaviour every driver shares is in tests/conformance."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select

from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob, Pushed, ReservedJob
from core.queue.drivers.database import DatabaseDriver
from core.status import Status
from tests.database.conftest import settings_for

pytestmark = pytest.mark.timeout(60)


def job(queue: str, n: int = 0, **options: Any) -> OutgoingJob:
    job_id = options.pop("id", uuid.uuid4().hex)
    return OutgoingJob(job_id, queue, f'{{"n": {n}}}'.encode(), job="tests.jobs:Echo", **options)


@asynccontextmanager
async def drivers(url: str, count: int) -> AsyncIterator[list[DatabaseDriver]]:
    """`count` drivers on one database, each with its own engine (its own connections)."""
    opened = [DatabaseDriver("database", settings_for(url)) for _ in range(count)]
    for driver in opened:
        await driver.open()
    try:
        yield opened
    finally:
        for driver in opened:
            await driver.close()


@contextmanager
def statements(driver: DatabaseDriver) -> Iterator[list[str]]:
    """The SQL statements `driver` sends while the block runs (BEGIN/COMMIT left out)."""
    seen: list[str] = []
    engine = driver._engine
    assert engine is not None

    def record(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if sql.split()[0].upper() not in ("BEGIN", "COMMIT", "ROLLBACK"):
            seen.append(sql)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def rows(driver: DatabaseDriver, table: Any, *where: Any) -> int:
    assert driver._engine is not None
    async with driver._engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table).where(*where)) or 0)


# -- competing dispatchers --------------------------------------------------------------------


@pytest.mark.parametrize("on_duplicate", ["reject", "keep", "replace"])
async def test_competing_dispatchers_store_one_job_per_key(
    db_url: str, queue: str, on_duplicate: str
) -> None:
    """Four dispatchers (four engines) push the same key at once, 20 rounds: one job each."""
    async with drivers(db_url, 4) as four:
        for round_ in range(20):
            key = f"dev-{round_}"
            pushed = await asyncio.gather(
                *(
                    d.push([job(queue, n, unique_key=key, on_duplicate=on_duplicate)])  # type: ignore[arg-type]
                    for n, d in enumerate(four)
                )
            )
            outcomes = sorted(p[0].outcome for p in pushed)
            later = {"reject": "duplicate", "keep": "kept", "replace": "replaced"}[on_duplicate]
            assert outcomes == sorted(["created"] + [later] * 3), outcomes
            holders = {p[0].id for p in pushed}
            assert len(holders) == 1
        assert await four[0].size(queue) == 20


async def test_competing_dispatchers_store_one_job_per_id(db_url: str, queue: str) -> None:
    async with drivers(db_url, 4) as four:
        for _ in range(20):
            job_id = uuid.uuid4().hex
            pushed = await asyncio.gather(
                *(
                    d.push([job(queue, n, id=job_id, check_id=True, on_duplicate="keep")])
                    for n, d in enumerate(four)
                )
            )
            assert sorted(p[0].outcome for p in pushed) == ["created", "kept", "kept", "kept"]
        assert await four[0].size(queue) == 20


async def test_a_successor_while_the_holder_runs_and_only_one(db_url: str, queue: str) -> None:
    async with drivers(db_url, 4) as four:
        [first] = await four[0].push([job(queue, 0, unique_key="k")])
        [running] = await four[0].reserve([queue], 1, lease=30)
        pushed = await asyncio.gather(
            *(d.push([job(queue, n, unique_key="k")]) for n, d in enumerate(four, 1))
        )
        created = [p[0] for p in pushed if p[0].outcome == "created"]
        assert len(created) == 1 and created[0].id != first.id == running.id
        assert sorted(p[0].outcome for p in pushed).count("duplicate") == 3


# -- at_front ---------------------------------------------------------------------------------


async def test_a_delayed_at_front_job_counts_as_delayed_and_wakes_the_wait(
    driver: DatabaseDriver, queue: str
) -> None:
    await driver.push([job(queue, 1, delay=30)])
    [late] = await driver.push([job(queue, 3, delay=2.0, at_front=True)])
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (0, 2, 0)
    status = await driver.job_status(late.id, queue)
    assert status is not None and status.status is Status.SCHEDULED
    assert status.due_at is not None and status.due_at > time.time()
    started = time.monotonic()
    await driver.wait([queue], timeout=8)  # wakes when it is due, not after 8 s
    assert 0.5 < time.monotonic() - started < 5
    [taken] = await driver.reserve([queue], 3, lease=30)
    assert taken.id == late.id
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (0, 1, 1)


async def test_a_delayed_at_front_job_is_first_once_due(driver: DatabaseDriver, queue: str) -> None:
    [late] = await driver.push([job(queue, 0, delay=1.0, at_front=True)])
    ready = await driver.push([job(queue, n) for n in range(1, 3)])
    [early] = await driver.push([job(queue, 3, at_front=True)])
    assert [j.id for j in await driver.reserve([queue], 1, lease=30)] == [early.id]
    await asyncio.sleep(1.1)  # a time, not an event: the delay itself is under test
    taken = await driver.reserve([queue], 3, lease=30)
    assert [j.id for j in taken] == [late.id, ready[0].id, ready[1].id]


async def test_at_front_jobs_are_a_stack_before_every_other(
    driver: DatabaseDriver, queue: str
) -> None:
    [plain] = await driver.push([job(queue, 0)])
    [a, b] = await driver.push([job(queue, 1, at_front=True), job(queue, 2, at_front=True)])
    [c] = await driver.push([job(queue, 3, at_front=True)])
    assert (await driver.stats(queue)).pending == 4
    status = await driver.job_status(a.id, queue)
    assert status is not None and status.status is Status.QUEUED
    assert status.due_at is not None and abs(status.due_at - time.time()) < 5
    taken = await driver.reserve([queue], 4, lease=30)
    assert [j.id for j in taken] == [c.id, b.id, a.id, plain.id]


# -- the hot path -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 10])
async def test_reserve_and_ack_run_as_many_statements_for_one_job_as_for_ten(
    driver: DatabaseDriver, queue: str, count: int
) -> None:
    """Claim: SELECT + UPDATE. Ack with records: the delete (RETURNING on MariaDB and
    SQLite), one INSERT of records, one counter upsert: per batch, never per job."""
    await driver.push([job(queue, n) for n in range(count)])
    with statements(driver) as claim:
        taken = await driver.reserve([queue], count, lease=30, worker="w")
    assert len(taken) == count and len(claim) == 2, claim
    for held in taken:
        held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"[1]")
    with statements(driver) as ack:
        await driver.ack(taken)
    assert len(ack) == 3, ack
    assert await rows(driver, t.queue_job_records, t.queue_job_records.c.queue == queue) == count
    await driver.push([job(queue, n) for n in range(count)])
    taken = await driver.reserve([queue], count, lease=30)
    for held in taken:
        held.outcome = Outcome(Status.SUCCEEDED, 0)  # keep nothing: no INSERT of records
    with statements(driver) as unkept:
        await driver.reserve([queue], count, lease=30, ack=taken)
    assert len(unkept) == 3, unkept  # delete, claim (nothing left to update), counters
    assert await rows(driver, t.queue_job_records, t.queue_job_records.c.queue == queue) == count


async def test_a_lapsed_ack_writes_nothing(driver: DatabaseDriver, queue: str) -> None:
    [pushed] = await driver.push([job(queue)])
    [first] = await driver.reserve([queue], 1, lease=0.05)
    await asyncio.sleep(0.1)
    [second] = await driver.reserve([queue], 1, lease=30, worker="w2")
    first.outcome = Outcome(Status.FAILED, 60, error="late")
    await driver.ack([first])
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.RUNNING and status.worker == "w2"
    assert (await driver.recent(queue)).failed == 0
    await driver.ack([second])
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.SUCCEEDED
    assert (await driver.recent(queue)).succeeded == 1


# -- cancel, ttl ------------------------------------------------------------------------------


async def test_a_cancel_request_outliving_its_lease_ends_the_job(
    driver: DatabaseDriver, queue: str
) -> None:
    [pushed] = await driver.push([job(queue, failure_ttl=30)])
    [held] = await driver.reserve([queue], 1, lease=1.0, worker="w1")
    assert await driver.cancel(pushed.id, queue) is True
    assert await driver.cancel_requested([held]) == [pushed.id]
    await asyncio.sleep(1.1)  # the worker died: its lease runs out
    assert await driver.reserve([queue], 1, lease=30) == []
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.CANCELLED and status.attempts == 1
    assert await driver.size(queue) == 0
    assert (await driver.recent(queue)).cancelled == 1
    assert await driver.cancel(pushed.id, queue) is False


async def test_release_keeps_the_error_and_a_refund_reads_queued(
    driver: DatabaseDriver, queue: str
) -> None:
    [pushed] = await driver.push([job(queue)])
    [held] = await driver.reserve([queue], 1, lease=30, worker="w")
    await driver.release(held, 60, error="ValueError: nope")
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.RETRYING
    assert status.error == "ValueError: nope" and status.due_at is not None
    assert status.due_at > time.time() + 50
    [pushed2] = await driver.push([job(queue)])
    [held2] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held2, refund=True)
    status = await driver.job_status(pushed2.id, queue)
    assert status is not None and status.status is Status.QUEUED and status.attempts == 0


# -- pruning ----------------------------------------------------------------------------------


async def test_prune_deletes_expired_records_old_counters_and_free_keys(
    driver: DatabaseDriver, queue: str
) -> None:
    pushed = await driver.push([job(queue, n, unique_key=f"k{n}") for n in range(3)])
    taken = await driver.reserve([queue], 3, lease=30)
    taken[0].outcome = Outcome(Status.SUCCEEDED, 0.05)
    taken[1].outcome = Outcome(Status.SUCCEEDED, 3600)
    taken[2].outcome = Outcome(Status.FAILED, 3600, error="E")
    await driver.ack(taken)
    assert driver._engine is not None
    old = int(time.time() // 60) - 3 * 60
    async with driver._engine.begin() as conn:  # a counter from three hours ago
        await conn.execute(
            t.queue_counts.insert().values(
                queue=queue, minute=old, status="succeeded", shard=0, count=7
            )
        )
    await asyncio.sleep(0.1)
    keys = t.queue_unique_keys.c
    assert await rows(driver, t.queue_unique_keys, keys.queue == queue) == 3
    assert await driver.prune_records() >= 1
    records = t.queue_job_records.c
    kept = await rows(driver, t.queue_job_records, records.queue == queue)
    assert kept == 2
    assert await driver.job_status(pushed[0].id, queue) is None
    status = await driver.job_status(pushed[2].id, queue)
    assert status is not None and status.status is Status.FAILED and status.error == "E"
    counts = t.queue_counts.c
    assert await rows(driver, t.queue_counts, counts.queue == queue, counts.minute == old) == 0
    assert (await driver.recent(queue)).succeeded == 2
    assert await rows(driver, t.queue_unique_keys, keys.queue == queue) == 0


async def test_prune_leaves_keys_held_by_waiting_jobs_or_unique_for(
    driver: DatabaseDriver, queue: str
) -> None:
    await driver.push([job(queue, 1, unique_key="waiting")])
    await driver.push([job(queue, 2, unique_key="for", unique_for=3600)])
    [_, held] = await driver.reserve([queue], 2, lease=30)
    await driver.ack([held])
    await driver.prune_records()
    keys = t.queue_unique_keys.c
    assert await rows(driver, t.queue_unique_keys, keys.queue == queue) == 2
    [again] = await driver.push([job(queue, 3, unique_key="for", unique_for=3600)])
    assert again == Pushed(held.id, "duplicate")


async def test_a_record_past_its_keep_time_reads_as_gone_before_the_prune(
    driver: DatabaseDriver, queue: str
) -> None:
    [pushed] = await driver.push([job(queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 1.0)
    await driver.ack([held])
    assert await driver.job_status(pushed.id) is not None
    await asyncio.sleep(1.1)
    assert await driver.job_status(pushed.id) is None


async def test_an_expired_job_is_reaped_by_the_claim_with_its_record(
    driver: DatabaseDriver, queue: str
) -> None:
    [pushed] = await driver.push([job(queue, ttl=0.05, failure_ttl=60, unique_key="u")])
    await asyncio.sleep(0.1)
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.EXPIRED  # before any worker saw it
    [handed] = await driver.reserve([queue], 5, lease=30)  # handed back only to report it
    assert (handed.id, handed.expired, handed.attempts) == (pushed.id, True, 0)
    assert await driver.reserve([queue], 5, lease=30) == []
    status = await driver.job_status(pushed.id, queue)
    assert status is not None and status.status is Status.EXPIRED
    assert status.error == "not started within its ttl of 0.05s"
    assert (await driver.recent(queue)).expired == 1
    [after] = await driver.push([job(queue, unique_key="u")])
    assert after.outcome == "created"  # the key is free again


async def test_ids_up_to_190_characters_in_the_failed_store_too(
    driver: DatabaseDriver, queue: str
) -> None:
    from datetime import UTC, datetime

    from core.queue.drivers.base import FailedJob

    job_id = "a:" + "x" * 188
    await driver.push([job(queue, id=job_id, check_id=True)])
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == job_id
    store = driver.failed_store()
    await store.add(FailedJob(job_id, "database", queue, "{}", "E", datetime.now(UTC)))
    assert (await store.get(job_id)) is not None
    await driver.ack([ReservedJob(job_id, queue, b"", 1, Outcome(Status.FAILED, 60))])
    status = await driver.job_status(job_id)
    assert status is not None and status.status is Status.FAILED
    assert driver._engine is not None
    async with driver._engine.begin() as conn:  # nothing left behind in queue_jobs
        left = await conn.scalar(select(func.count()).where(t.queue_jobs.c.uuid == job_id))
    assert left == 0
