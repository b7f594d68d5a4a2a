"""The SQL driver's IoT-native machinery (schema version 5), where SQL is the point: two
connections ending and pushing into one group at once never make two of its jobs claimable
(the group row orders them), the plain path touches no group or bound table, the head of a
line is found on its index, clear and prune keep `queue_groups` small, a holder acknowledged
without passing the turn (the release before) is repaired. The behaviour itself is in
tests/conformance/test_iot_*.py."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import delete, event, func, select, text

from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.database import DatabaseDriver
from core.status import Status
from tests.database.conftest import settings_for

pytestmark = pytest.mark.timeout(90)
_jobs = t.queue_jobs.c
_groups = t.queue_groups.c


def job(queue: str, **fields: Any) -> OutgoingJob:
    return OutgoingJob(uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:RecordJob", **fields)


async def out_of_line(driver: DatabaseDriver, queue: str, group: str) -> int:
    """Jobs of the group stored out of its line: claimable, scheduled or running."""
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        query = select(func.count()).where(
            _jobs.queue == queue, _jobs.group_key == group, _jobs.group_seq.is_(None)
        )
        return int(await conn.scalar(query) or 0)


@contextmanager
def statements(driver: DatabaseDriver) -> Iterator[list[str]]:
    """The SQL the driver sends while the block runs."""
    seen: list[str] = []
    engine = driver._writer.sync_engine  # type: ignore[union-attr]

    def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", spy)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", spy)


async def test_two_connections_ending_and_pushing_at_once_keep_one_job_in_turn(
    db_url: str, queue: str
) -> None:
    """Two workers on their own connections acknowledge, reserve and push into the same
    groups at once, round after round: never two jobs of a group out of its line, never two
    of a group held at once, and every job runs once, in push order per group."""
    settings = settings_for(db_url)
    groups = ["g0", "g1", "g2"]
    pushed: dict[str, list[str]] = {g: [] for g in groups}
    ran: dict[str, list[str]] = {g: [] for g in groups}
    rng = random.Random(14)
    async with (
        DatabaseDriver("database", settings) as one,
        DatabaseDriver("database", settings) as two,
    ):

        async def push(driver: DatabaseDriver, count: int) -> None:
            batch = [job(queue, group=rng.choice(groups)) for _ in range(count)]
            for item in batch:
                pushed[item.group].append(item.id)  # before the push: order of the call
            await driver.push(batch)

        held: dict[DatabaseDriver, list[ReservedJob]] = {one: [], two: []}

        async def work(driver: DatabaseDriver) -> None:
            done, held[driver] = held[driver], []
            for item in done:
                item.outcome = Outcome(Status.SUCCEEDED, 0)
            taken = await driver.reserve([queue], 10, lease=30, ack=done)
            held[driver] = [h for h in taken if not h.expired]

        def group_of(job_id: str) -> str:
            return next(g for g in groups if job_id in pushed[g])

        await push(one, 6)
        for _ in range(40):
            # Pushes go one connection after the other, so that their order is known.
            await asyncio.gather(work(one), work(two), push(one, rng.randint(0, 3)))
            running = [h.id for h in held[one] + held[two]]
            by_group = [group_of(i) for i in running]
            assert len(by_group) == len(set(by_group)), running  # one job per group at once
            for job_id in running:
                ran[group_of(job_id)].append(job_id)
            for group in groups:
                assert await out_of_line(one, queue, group) <= 1
        for _ in range(60):  # drain
            await asyncio.gather(work(one), work(two))
            for job_id in (h.id for h in held[one] + held[two]):
                ran[group_of(job_id)].append(job_id)
            if not held[one] and not held[two] and await one.size(queue) == 0:
                break
    assert ran == pushed  # each once, in push order within its group


async def test_a_plain_push_and_reserve_touch_no_group_or_bound_table(
    driver: DatabaseDriver, queue: str
) -> None:
    await driver.push([job(queue)])  # the queue's name is stored: later pushes skip that
    with statements(driver) as seen:
        await driver.push([job(queue) for _ in range(5)])
        held = await driver.reserve([queue], 10, lease=30)
        await driver.ack(held)
    joined = "\n".join(seen)
    assert "queue_groups" not in joined and "queue_names" not in joined, joined
    assert "count(" not in joined.lower(), joined
    bounded = job(queue, max_length=100)
    with statements(driver) as seen:
        await driver.push([bounded])
    assert any("queue_names" in s for s in seen)  # only a bounded push locks its queue


async def test_a_grouped_push_locks_only_its_group(driver: DatabaseDriver, queue: str) -> None:
    with statements(driver) as seen:
        await driver.push([job(queue, group="a"), job(queue, group="a")])
    groups = [s for s in seen if "queue_groups" in s]
    assert groups and not any("queue_names" in s and "FOR UPDATE" in s for s in seen)


async def test_the_head_of_a_line_is_found_on_its_index(driver: DatabaseDriver, queue: str) -> None:
    await driver.push([job(queue, group=f"d{i % 50}") for i in range(1000)])
    query = (
        select(_jobs.id)
        .where(_jobs.queue == queue, _jobs.group_key == "d7", _jobs.group_seq.is_not(None))
        .order_by(_jobs.group_seq)
        .limit(1)
    )
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        if conn.dialect.name == "sqlite":
            plan = [str(r[-1]) for r in (await conn.execute(text("EXPLAIN QUERY PLAN " + sql)))]
        else:
            rows = (await conn.execute(text("EXPLAIN " + sql))).mappings().all()
            plan = [f"{row['key']} | {row['Extra']}" for row in rows]
        await conn.execute(delete(t.queue_jobs).where(_jobs.queue == queue))
        await conn.execute(delete(t.queue_groups).where(_groups.queue == queue))
    joined = "\n".join(plan)
    assert "queue_jobs_group_line" in joined, joined
    assert "TEMP B-TREE" not in joined and "filesort" not in joined, joined


async def test_clear_and_prune_keep_the_group_table_small(
    driver: DatabaseDriver, queue: str
) -> None:
    await driver.push([job(queue, group=f"d{i % 20}") for i in range(60)])
    [running] = await driver.reserve([queue], 1, lease=30)

    async def group_rows() -> dict[str, str | None]:
        async with driver._writer.begin() as conn:  # type: ignore[union-attr]
            query = select(_groups.group_key, _groups.holder).where(_groups.queue == queue)
            return {str(g): h for g, h in (await conn.execute(query)).all()}

    assert len(await group_rows()) == 20
    await driver.clear(queue)
    kept = await group_rows()
    assert kept == {"d0": running.id}  # only the running holder's group is left
    await driver.ack([running])
    assert await group_rows() == {"d0": None}  # empty: pruned later
    await driver.prune_records()
    assert await group_rows() == {}
    # A group made again starts afresh.
    first, second = job(queue, group="d0"), job(queue, group="d0")
    await driver.push([first, second])
    assert [h.id for h in await driver.reserve([queue], 10, lease=30)] == [first.id]


async def test_a_holder_gone_without_passing_the_turn_is_repaired(
    driver: DatabaseDriver, queue: str
) -> None:
    """The release before version 5 acknowledges a grouped job by deleting its row only: the
    next push into the group, or the next prune, hands the turn on."""
    for repair in ("push", "prune"):
        group = f"g-{repair}"
        holder, waiting = job(queue, group=group), job(queue, group=group)
        await driver.push([holder, waiting])
        [held] = await driver.reserve([queue], 10, lease=30)
        assert held.id == holder.id
        async with driver._writer.begin() as conn:  # type: ignore[union-attr]
            await conn.execute(delete(t.queue_jobs).where(_jobs.uuid == holder.id))
        assert await driver.reserve([queue], 10, lease=30) == []  # stuck until repaired
        later = job(queue, group=group)
        if repair == "push":
            await driver.push([later])
        else:
            await driver.prune_records()
        [next_one] = await driver.reserve([queue], 10, lease=30)
        assert next_one.id == waiting.id  # the line's order is kept
        next_one.outcome = Outcome(Status.SUCCEEDED, 0)
        await driver.ack([next_one])
        rest = await driver.reserve([queue], 10, lease=30)
        assert [h.id for h in rest] == ([later.id] if repair == "push" else [])
        await driver.ack(rest)


async def test_concurrent_bounded_pushes_on_two_connections_keep_the_bound(
    db_url: str, queue: str
) -> None:
    settings = settings_for(db_url)
    async with (
        DatabaseDriver("database", settings) as one,
        DatabaseDriver("database", settings) as two,
    ):

        async def flood(driver: DatabaseDriver) -> list[str]:
            outcomes = []
            for _ in range(15):
                [p] = await driver.push([job(queue, max_length=8, group=random.choice("ab"))])
                outcomes.append(p.outcome)
            return outcomes

        first, second = await asyncio.gather(flood(one), flood(two))
        assert (first + second).count("created") == 8
        assert (await one.stats(queue)).pending == 8
        assert (await one.recent(queue)).rejected == 22
        await one.clear(queue)


async def test_a_failed_job_sent_back_by_retry_rejoins_its_group(
    driver: DatabaseDriver, queue: str
) -> None:
    from core.queue.drivers.base import FailedJob

    first, second, third = (job(queue, group="dev") for _ in range(3))
    await driver.push([first, second])
    [held] = await driver.reserve([queue], 10, lease=30)
    held.outcome = Outcome(Status.FAILED, 3600, error="boom")
    await driver.ack([held])  # failed for good: the turn passes to `second`
    store = driver.failed_store()
    await store.add(
        FailedJob(first.id, "database", queue, '{"id": "x"}', "boom", failed_at=_utcnow())
    )
    [record] = [r for r in await store.list(queue) if r.id == first.id]
    assert await driver.retry_failed([record]) == [first.id]  # `second` holds the turn
    status = await driver.job_status(first.id, queue)
    assert status is not None and status.group == "dev" and str(status) == "queued"
    await driver.push([third])
    order = []
    for _ in range(3):
        [taken] = await driver.reserve([queue], 10, lease=30)
        order.append(taken.id)
        await driver.ack([taken])
    assert order == [second.id, first.id, third.id]  # the line's tail at its retry


def _utcnow() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_the_bound_counts_on_the_claim_index(driver: DatabaseDriver, queue: str) -> None:
    """The waiting count of a bounded push: each part a range of `queue_jobs_claim`, read
    from the index alone except the real-time leases nobody holds (few rows)."""
    from core.queue.drivers import sql_groups

    await driver.push(
        [job(queue, priority=(i % 3) - 1, delay=60 if i % 4 == 0 else 0) for i in range(300)]
    )
    await driver.reserve([queue], 20, lease=30)
    seen: list[str] = []

    class Spy:
        def __init__(self, conn: Any) -> None:
            self.conn, self.dialect = conn, conn.dialect

        async def execute(self, query: Any, *args: Any) -> Any:
            seen.append(
                str(query.compile(dialect=self.dialect, compile_kwargs={"literal_binds": True}))
            )
            return await self.conn.execute(query, *args)

    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        counted = await sql_groups.waiting(Spy(conn), queue, 1000)  # type: ignore[arg-type]
        stats = await driver.stats(queue)
        assert counted == stats.pending + stats.delayed == 280
        [sql] = seen
        if conn.dialect.name == "sqlite":
            plan = [str(r[-1]) for r in (await conn.execute(text("EXPLAIN QUERY PLAN " + sql)))]
            searches = [line for line in plan if line.startswith("SEARCH queue_jobs")]
            assert len(searches) == 4 and all("queue_jobs_claim" in s for s in searches), plan
            assert sum("COVERING INDEX" in s for s in searches) == 3, plan
        else:
            rows = (await conn.execute(text("EXPLAIN " + sql))).mappings().all()
            keys = [row["key"] for row in rows if row["table"] == "queue_jobs"]
            assert keys == ["queue_jobs_claim"] * 4, rows
        await conn.execute(delete(t.queue_jobs).where(_jobs.queue == queue))


async def test_an_at_front_line_job_goes_to_the_head_when_it_takes_the_turn(
    driver: DatabaseDriver, queue: str
) -> None:
    """As in the memory driver: `at_front` is kept while the job waits in its line and
    applied when it takes the turn (before the jobs ready then)."""
    holder, urgent = job(queue, group="dev"), job(queue, group="dev", at_front=True)
    await driver.push([holder, urgent])
    [held] = await driver.reserve([queue], 1, lease=30)
    others = [job(queue) for _ in range(3)]
    await driver.push(others)
    await driver.ack([held])
    taken = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in taken] == [urgent.id, *(o.id for o in others)]
    await driver.ack(taken)


async def test_a_push_with_dependencies_is_checked_against_the_bound(
    driver: DatabaseDriver, queue: str
) -> None:
    """As in the memory driver: the push of a deferred job is checked (it is not counted as
    waiting while deferred), its release never is."""
    from core.queue.drivers.base import Dependency

    first = job(queue)
    await driver.push([first, job(queue)])
    deferred = job(queue, depends_on=(Dependency(first.id),), max_length=2)
    [refused] = await driver.push([deferred])
    assert refused.outcome == "full"
    assert await driver.job_status(deferred.id, queue) is None
    deferred = job(queue, depends_on=(Dependency(first.id),), max_length=3)
    [stored] = await driver.push([deferred])
    assert stored.outcome == "created"
    assert (await driver.stats(queue)).deferred == 1
    await driver.clear(queue)
