"""The SQL driver's observing primitives where SQL is the point (SQLite and MariaDB): `browse`
walks the claim index (every statement it sends is an index range, no sort of the queue),
pages through lost leases in the order `reserve` hands them out, `history` and `add_history`
are one statement each on `queue_counts` (the shards summed), `prune_records` keeps two hours
of history, `groups` shows a holder whose job is gone as none. The behaviour on every driver
is in tests/conformance/test_observing.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import delete, event, func, select, update

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import GroupInfo, MinuteCounts, OutgoingJob
from core.queue.drivers.database import DatabaseDriver
from tests.database.conftest import settings_for

pytestmark = pytest.mark.timeout(90)
_jobs = t.queue_jobs.c
_counts = t.queue_counts.c


def job(queue: str, **fields: Any) -> OutgoingJob:
    return OutgoingJob(uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:RecordJob", **fields)


@contextmanager
def statements(driver: DatabaseDriver) -> Iterator[list[tuple[str, Any]]]:
    """The SQL (with its parameters) the driver sends while the block runs (its writer engine
    derives from its engine: one listener hears both)."""
    seen: list[tuple[str, Any]] = []
    assert driver._engine is not None
    engine = driver._engine.sync_engine

    def spy(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", spy)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", spy)


def sent(seen: list[tuple[str, Any]]) -> list[str]:
    """The statements but the transaction's own."""
    return [sql for sql, _ in seen if not sql.lstrip().upper().startswith(("BEGIN", "COMMIT"))]


async def lose_leases(driver: DatabaseDriver, queue: str, ids: list[str]) -> None:
    """Make these reserved jobs' leases lapse now, as when their worker died (a second ago)."""
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        await conn.execute(
            update(t.queue_jobs)
            .where(_jobs.queue == queue, _jobs.uuid.in_(ids))
            .values(reserved_until=t.now(-1.0))
        )


async def pages(driver: DatabaseDriver, queue: str, size: int) -> list[str]:
    """Every pending job, read `size` at a time."""
    out: list[str] = []
    while batch := await driver.browse(queue, "pending", len(out), size):
        out += [r.id for r in batch]
    return out


async def test_browse_pages_lost_leases_in_the_order_reserve_hands_them_out(
    driver: DatabaseDriver, queue: str
) -> None:
    """Lost leases sort among the ready jobs (the head of their priority): the pages, read a
    few at a time, list every pending job once in the order one-at-a-time reserves take them."""
    plain = [job(queue) for _ in range(6)]
    ranked = [job(queue, priority=p) for p in (2, 5, -1, 2, -4)]
    doomed = [job(queue) for _ in range(4)]
    await driver.push(doomed)
    taken = await driver.reserve([queue], 4, lease=60)
    assert sorted(h.id for h in taken) == sorted(j.id for j in doomed)
    await driver.push(plain[:3])
    await driver.push(ranked)
    await driver.push([job(queue, at_front=True)])
    await driver.push(plain[3:])
    await driver.push([job(queue, at_front=True)])
    # Two of the four workers die; their jobs are lost leases now, the others still run.
    lost = [taken[1].id, taken[3].id]
    await lose_leases(driver, queue, lost)
    stats = await driver.stats(queue)
    listed = await pages(driver, queue, 3)
    assert len(listed) == stats.pending == 15
    assert set(lost) <= set(listed)
    assert await pages(driver, queue, 50) == listed
    handed: list[str] = []
    while held := await driver.reserve([queue], 1, lease=60):
        handed += [h.id for h in held]
    assert handed == listed
    # Lost leases come after the `at_front` jobs and the higher priorities, before every
    # other priority-0 job.
    assert listed[5:7] == lost


async def test_browse_statements_walk_the_claim_index_without_a_sort(
    driver: DatabaseDriver, queue: str
) -> None:
    """Every statement a browse sends on `queue_jobs` is a range of `queue_jobs_claim` (or the
    page's rows by primary key), with no sort of the rows and no scan of the table."""
    other = f"{queue}-other"
    await driver.push([job(other) for _ in range(300)])  # another queue's rows around
    await driver.push([job(queue, delay=600 + i) for i in range(40)])
    await driver.push([job(queue, priority=i % 3 - 1) for i in range(60)])
    await driver.reserve([queue], 5, lease=60)
    await driver.push([job(queue, delay=30, at_front=True), job(queue, delay=30, priority=4)])
    sent: list[tuple[str, Any]] = []
    for state in ("pending", "delayed", "reserved", "deferred"):
        for offset in (0, 7):
            with statements(driver) as seen:
                await driver.browse(queue, state, offset, 5)  # type: ignore[arg-type]
            sent += seen
    queries = [(sql, params) for sql, params in sent if "FROM queue_jobs" in sql]
    assert len(queries) > 10
    engine = driver._engine
    assert engine is not None
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            for sql, params in queries:
                plan = " | ".join(
                    str(row[-1])
                    for row in await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)
                )
                assert "TEMP B-TREE" not in plan, (sql, plan)
                assert "SCAN queue_jobs" not in plan, (sql, plan)  # SEARCH: a range
                assert "queue_jobs_claim" in plan or "INTEGER PRIMARY KEY" in plan, (sql, plan)
        else:
            for sql, params in queries:
                rows = (await conn.exec_driver_sql(f"EXPLAIN {sql}", params)).mappings().all()
                plan = [dict(row) for row in rows]
                for row in plan:
                    if row["table"] != "queue_jobs":
                        continue
                    assert "filesort" not in str(row["Extra"]), (sql, plan)
                    assert row["type"] != "ALL", (sql, plan)
                    assert row["key"] in ("queue_jobs_claim", "PRIMARY"), (sql, plan)


async def test_history_sums_the_shards_of_each_minute_in_one_select(
    db_url: str, queue: str
) -> None:
    """Two drivers (two shards) add into one minute: one row each in `queue_counts`, one sum
    in `history`; `add_history` and `history` are one statement each."""
    settings = settings_for(db_url)
    async with (
        DatabaseDriver("database", settings) as one,
        DatabaseDriver("database", settings) as two,
    ):
        two._shard = (one._shard + 1) % 1024
        now = life.minute_now()
        with statements(one) as seen:
            await one.add_history(
                [(queue, now, {"started": 2, "run_ms": 30}), (queue, now - 3, {"ran": 1})]
            )
        [insert] = sent(seen)  # one multi-row upsert
        assert insert.lstrip().upper().startswith("INSERT INTO QUEUE_COUNTS")
        await two.add_history([(queue, now, {"started": 5, "bogus": 9})])
        async with one._writer.begin() as conn:  # type: ignore[union-attr]
            shards = await conn.scalar(
                select(func.count(func.distinct(_counts.shard))).where(
                    _counts.queue == queue, _counts.minute == now, _counts.status == "started"
                )
            )
        assert shards == 2
        with statements(two) as seen:
            history = await two.history(queue, 6)
        [read] = sent(seen)
        assert "queue_counts" in read
        if history[-1].minute != now:  # the minute turned between the calls
            history = await two.history(queue, 7)
        by_minute = {m.minute: m for m in history}
        assert by_minute[now] == MinuteCounts(now, started=7, run_ms=30)
        assert by_minute[now - 3] == MinuteCounts(now - 3, ran=1)
        assert by_minute[now - 1] == MinuteCounts(now - 1)


async def test_prune_keeps_two_hours_of_history(driver: DatabaseDriver, queue: str) -> None:
    now = life.minute_now()
    rows = [(queue, now - back, {"started": back + 1}) for back in (0, 60, 119, 120, 121, 300)]
    await driver.add_history(rows)
    await driver.prune_records()
    history = {m.minute: m.started for m in await driver.history(queue, 400)}
    if life.minute_now() != now:  # the minute turned: the edges moved by one
        pytest.skip("the minute turned during the test")
    assert {m: n for m, n in history.items() if n} == {
        now: 1,
        now - 60: 61,
        now - 119: 120,
        now - 120: 121,
    }


async def test_add_history_refuses_malformed_rows_naming_them(
    driver: DatabaseDriver, queue: str
) -> None:
    now = life.minute_now()
    with pytest.raises(ValueError, match="started"):
        await driver.add_history([(queue, now, {"started": -1})])
    with pytest.raises(ValueError, match="minute"):
        await driver.add_history([(queue, "soon", {"started": 1})])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="row 1"):
        await driver.add_history([(queue, now, {"ran": 1}), (queue, now)])  # type: ignore[list-item]
    # Nothing of a refused call is stored.
    assert sum(m.ran for m in await driver.history(queue, 3)) == 0


async def test_groups_show_a_holder_whose_job_is_gone_as_none(
    driver: DatabaseDriver, queue: str
) -> None:
    """A holder acknowledged by the release before groups (its row gone, the turn not
    passed): the group is listed with no holder and its line, until a push or prune
    repairs it."""
    first, second, third = (job(queue, group="dev") for _ in range(3))
    await driver.push([first, second, third])
    async with driver._writer.begin() as conn:  # type: ignore[union-attr]
        await conn.execute(delete(t.queue_jobs).where(_jobs.uuid == first.id))
    assert await driver.groups(queue) == [GroupInfo("dev", "", 2)]
    await driver.prune_records()
    assert await driver.groups(queue) == [GroupInfo("dev", second.id, 1)]


async def test_browse_a_large_queue_answers_deep_pages_fast(
    driver: DatabaseDriver, queue: str
) -> None:
    """20,000 waiting jobs: a page anywhere is read along the index (OFFSET in the index,
    the page's rows alone read in full), well under a second."""
    ids: list[str] = []
    for _ in range(10):
        batch = [job(queue) for _ in range(2000)]
        ids += [j.id for j in batch]
        await driver.push(batch)
    for offset in (0, 10_000, 19_950):
        started = time.perf_counter()
        page = await driver.browse(queue, "pending", offset, 50)
        assert time.perf_counter() - started < 1.0
        assert [r.id for r in page] == ids[offset : offset + 50]
