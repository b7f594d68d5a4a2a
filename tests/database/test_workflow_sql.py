"""The SQL driver's workflow machinery (schema version 4), where SQL is the point: the claim
of prioritized jobs follows its index (EXPLAIN on SQLite and MariaDB: no sort, no scan of the
queue), the priority-0 part is the same range as before, a dependent is released once when
its last two dependencies end at once on two connections, limits and markers live in their
tables. The behaviour itself is in tests/conformance/test_workflow_*.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Dependency, Limit, Outcome, OutgoingJob
from core.queue.drivers.database import DatabaseDriver
from core.status import Status
from tests.database.conftest import settings_for

pytestmark = pytest.mark.timeout(90)


def job(queue: str, **fields: Any) -> OutgoingJob:
    return OutgoingJob(uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:RecordJob", **fields)


class Explained:
    """Runs each statement given to `execute` after asking the database for its plan."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn, self.dialect = conn, conn.dialect
        self.plans: list[list[str]] = []

    async def execute(self, query: Any, *args: Any) -> Any:
        bound = query.params(**args[0]) if args else query
        sql = str(bound.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True}))
        if self.dialect.name == "sqlite":
            rows = (await self.conn.execute(text("EXPLAIN QUERY PLAN " + sql))).all()
            self.plans.append([str(row[-1]) for row in rows])
        else:
            rows = (await self.conn.execute(text("EXPLAIN " + sql))).mappings().all()
            self.plans.append([f"{row['key']} | {row['Extra']}" for row in rows])
        return await self.conn.execute(query, *args)


@pytest.fixture
async def filled(driver: DatabaseDriver, queue: str) -> AsyncIterator[DatabaseDriver]:
    """A queue of 3,000 jobs: priorities -3..3, some delayed, some running."""
    for part in range(3):
        await driver.push(
            [
                job(queue, priority=(i % 7) - 3, delay=60 if i % 5 == 0 else 0)
                for i in range(part * 1000, (part + 1) * 1000)
            ]
        )
    await driver.reserve([queue], 50, lease=30)
    yield driver
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        await conn.execute(t.queue_jobs.delete().where(t.queue_jobs.c.queue == queue))


async def test_every_part_of_the_claim_follows_the_claim_index(
    filled: DatabaseDriver, queue: str
) -> None:
    async with filled._writer.begin() as conn:  # type: ignore[union-attr]
        spy = Explained(conn)
        rows = await t.claim(spy, queue, t.now(), 10)  # type: ignore[arg-type]
    assert len(rows) == 10 and all((row.priority or 0) == 3 for row in rows)
    [plan] = spy.plans
    joined = "\n".join(plan)
    if filled._writer.dialect.name == "sqlite":  # type: ignore[union-attr]
        searches = [line for line in plan if line.startswith("SEARCH")]
        assert len(searches) == 3, joined
        assert all(
            "USING INDEX queue_jobs_claim (queue=? AND reserved_until" in s for s in searches
        )
        assert "TEMP B-TREE" not in joined and "SCAN queue_jobs" not in joined, joined
    else:
        assert len(plan) == 3 and all(line.startswith("queue_jobs_claim |") for line in plan)
        assert "filesort" not in joined and "temporary" not in joined, joined


async def test_the_plain_path_reads_only_what_it_hands_out(
    driver: DatabaseDriver, queue: str
) -> None:
    """Priority-0 jobs only: the prioritized parts find nothing in their ranges (MariaDB's
    ANALYZE counts the rows each part read; SQLite's plan is the same range search)."""
    await driver.push([job(queue) for _ in range(2000)])
    if driver._writer.dialect.name == "sqlite":  # type: ignore[union-attr]
        pytest.skip("SQLite reports no row counts; the plan is checked above")
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        captured: list[str] = []

        class Analyzed(Explained):
            async def execute(self, query: Any, *args: Any) -> Any:
                bound = query.params(**args[0]) if args else query
                sql = str(
                    bound.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True})
                )
                captured.append(sql)
                return await self.conn.execute(query, *args)

        await t.claim(Analyzed(conn), queue, t.now(), 10)  # type: ignore[arg-type]
        rows = (await conn.execute(text("ANALYZE " + captured[0]))).mappings().all()
    read = [float(row["r_rows"] or 0) for row in rows]
    assert read == [0.0, 10.0, 0.0], rows
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        await conn.execute(t.queue_jobs.delete().where(t.queue_jobs.c.queue == queue))


async def test_a_dependent_of_two_jobs_ending_at_once_is_released_once(
    db_url: str, queue: str
) -> None:
    settings = settings_for(db_url)
    async with (
        DatabaseDriver("database", settings) as one,
        DatabaseDriver("database", settings) as two,
    ):
        for _ in range(5):
            a, b = job(queue), job(queue)
            dependents = [
                job(queue, depends_on=(Dependency(a.id), Dependency(b.id))) for _ in range(20)
            ]
            await one.push([a, b, *dependents])
            [held_a] = await one.reserve([queue], 1, lease=30)
            [held_b] = await two.reserve([queue], 1, lease=30)
            for held in (held_a, held_b):
                held.outcome = Outcome(Status.SUCCEEDED, 60)
            await asyncio.gather(one.ack([held_a]), two.ack([held_b]))
            taken = await one.reserve([queue], 100, lease=30)
            assert sorted(h.id for h in taken) == sorted(d.id for d in dependents)
            assert await one.reserve([queue], 100, lease=30) == []
            for held in taken:
                held.outcome = Outcome(Status.SUCCEEDED, 0)
            await one.ack(taken)
        async with one._writer.begin() as conn:  # type: ignore[union-attr]
            deps = t.queue_dependencies.c
            left = await conn.scalar(select(func.count()).where(deps.job_queue == queue))
        assert left == 0  # the dependency rows go with the dependent's deferral


async def test_limit_state_and_markers_live_in_their_tables(
    driver: DatabaseDriver, queue: str
) -> None:
    limit = Limit("api", rate=2, period=1.0, concurrency=1)
    pushed = await driver.push([job(queue, limit=limit) for _ in range(2)])
    [held] = await driver.reserve([queue], 10, lease=30)
    assert held.id == pushed[0].id
    async with driver._engine.connect() as conn:  # type: ignore[union-attr]
        limits = t.queue_limits.c
        row = (
            await conn.execute(
                select(limits.tat, limits.running).where(
                    limits.queue == queue, limits.limit_key == "api"
                )
            )
        ).one()
        held_row = (
            await conn.execute(
                select(t.queue_jobs.c.held, t.queue_jobs.c.attempts).where(
                    t.queue_jobs.c.uuid == pushed[1].id
                )
            )
        ).one()
    assert row.running == f'["{held.id}"]' and row.tat > 0
    assert (held_row.held, held_row.attempts) == (1, 0)  # held by its rate first, no try
    await driver.set_marker(f"m-{queue}", "42", ttl=0.2)
    assert await driver.get_marker(f"m-{queue}") == "42"
    await asyncio.sleep(0.3)  # the marker's ttl is the behaviour
    assert await driver.get_marker(f"m-{queue}") is None


def test_priority_times_keep_every_priority_apart() -> None:
    from core.queue.drivers.base import MAX_PRIORITY

    highs = [t.priority_time(p) for p in (MAX_PRIORITY, MAX_PRIORITY - 1, 2, 1)]
    lows = [t.priority_time(p) for p in (-1, -2, -MAX_PRIORITY + 1, -MAX_PRIORITY)]
    assert highs == sorted(highs) and lows == sorted(lows)
    assert highs[0] > datetime(1000, 1, 1) and highs[-1] < t.FRONT
    assert lows[0] >= t.PRIO_LOW and lows[-1] < t.PRIO_LOW_END < t.DEFERRED
    assert all(t.is_priority_time(moment) for moment in highs + lows)


async def test_clear_resolves_what_waits_on_the_cleared_jobs_batch_by_batch(
    driver: DatabaseDriver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages of 3 rows: the 20 cleared jobs with dependents take seven of them.
    monkeypatch.setattr(life, "PRUNE_BATCH", 3)
    other = f"{queue}-other"
    running, plain = job(queue), [job(queue) for _ in range(5)]
    firsts = [job(queue) for _ in range(10)]
    # Deferred in the cleared queue, on a cleared job: resolved first, it would be cancelled
    # with a record of its own (rule "succeeded"); cleared, it leaves none.
    seconds = [job(queue, depends_on=(Dependency(a.id),)) for a in firsts]
    await driver.push([running])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.push([*firsts, *seconds, *plain])
    on_second = [job(other, depends_on=(Dependency(b.id, queue),)) for b in seconds]
    ended = [job(other, depends_on=(Dependency(a.id, queue),), rule="ended") for a in firsts]
    on_running = job(other, depends_on=(Dependency(running.id, queue),))
    record = OutgoingJob(
        uuid.uuid4().hex,
        other,
        b"",
        kind="batch",
        depends_on=tuple(Dependency(a.id, queue) for a in firsts),
        rule="ended",
    )
    await driver.push([*on_second, *ended, on_running, record])

    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(str(args[2]))

    engine = driver._writer.sync_engine  # type: ignore[union-attr]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert await driver.clear(queue) == 25
    finally:
        event.remove(engine, "before_cursor_execute", seen)

    for cleared in (*firsts, *seconds, *plain):
        assert await driver.job_status(cleared.id, queue) is None
    for dependent, second in zip(on_second, seconds, strict=True):
        status = await driver.job_status(dependent.id, other)
        assert status is not None
        assert (status.status, status.error) == (
            Status.CANCELLED,
            f"dependency {second.id} cancelled",
        )
    for dependent in ended:
        status = await driver.job_status(dependent.id, other)
        assert status is not None and status.status is Status.QUEUED
    batch = await driver.job_status(record.id, other)
    assert batch is not None
    assert (batch.status, batch.error) == (Status.CANCELLED, "10 of 10 members cancelled")
    waiting = await driver.job_status(on_running.id, other)
    assert waiting is not None and waiting.status is Status.DEFERRED
    assert waiting.waiting_for == (running.id,)
    assert (await driver.recent(other)).cancelled == 10
    assert (await driver.recent(queue)).cancelled == 0
    async with driver._engine.connect() as conn:  # type: ignore[union-attr]
        deps, records = t.queue_dependencies.c, t.queue_job_records.c
        left = await conn.scalar(select(func.count()).where(deps.job_queue == queue))
        kept = await conn.scalar(select(func.count()).where(records.queue == queue))
    assert (left, kept) == (0, 0)  # no dependency rows, no records of the cleared jobs
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred, stats.reserved) == (0, 0, 1)

    pages = [s for s in statements if "LIMIT" in s and "dependents IS NOT NULL" in s]
    assert len(pages) == 8  # 7 full or partial pages, then the empty one

    # The running job was not cleared: its dependent goes on waiting for it.
    held.outcome = Outcome(Status.SUCCEEDED, 60)
    await driver.ack([held])
    released = await driver.job_status(on_running.id, other)
    assert released is not None and released.status is Status.QUEUED


async def test_prune_deletes_the_limit_rows_of_idle_keys_only(
    driver: DatabaseDriver, queue: str
) -> None:
    # A rate far in the future (1 start a day) keeps "slow"; a running job keeps "busy";
    # the keys whose jobs ended, with no rate left to wait for, go.
    idle = [Limit(f"cust:{i}", concurrency=1) for i in range(3)]
    busy, slow = Limit("busy", concurrency=1), Limit("slow", rate=1, period=86400.0)
    pushed = await driver.push([job(queue, limit=lim) for lim in [*idle, busy, slow]])
    got = await driver.reserve([queue], 10, lease=30)
    assert {h.id for h in got} == {p.id for p in pushed}
    await driver.ack([h for h in got if h.id != pushed[3].id])
    limits = t.queue_limits.c

    async def keys() -> set[str]:
        async with driver._engine.connect() as conn:  # type: ignore[union-attr]
            query = select(limits.limit_key).where(limits.queue == queue)
            return {str(k) for k in (await conn.scalars(query)).all()}

    assert await keys() == {"cust:0", "cust:1", "cust:2", "busy", "slow"}
    await driver.prune_records()
    assert await keys() == {"busy", "slow"}
    # A pruned key works as before: its next job starts and is counted against it.
    again, _ = await driver.push([job(queue, limit=idle[0]), job(queue, limit=idle[0])])
    [started] = await driver.reserve([queue], 10, lease=30)
    assert started.id == again.id  # the second is held by the key's concurrency of 1
    assert await keys() == {"cust:0", "busy", "slow"}
