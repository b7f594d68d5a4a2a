"""One `push` of many jobs that carry their own ids (`check_id`), on every driver: the outcomes
and the queue order are those of pushing the jobs one after the other. The database driver
decides such a run in a few statements for the lot (`sql_lifecycle.push_checked_many`); these
pin that it decides as its per-job path does. Two dispatchers pushing the same ids at once
store each id once (sqlite, mysql), and so does a batch that meets an id another dispatcher
stored after the batch looked its ids up (mysql: SQLite has one writer at a time).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, event, insert

from core.queue.drivers import Driver, Outcome, OutgoingJob, Pushed
from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conftest import Backend, _backend

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return uuid.uuid4().hex


def by_id(job_id: str, queue: str, n: int, on_duplicate: Any = "reject", **f: Any) -> OutgoingJob:
    return OutgoingJob(
        job_id,
        queue,
        orjson.dumps({"n": n}),
        job="tests.jobs:RecordJob",
        check_id=True,
        on_duplicate=on_duplicate,
        **f,
    )


async def take_all(driver: Driver, queue: str) -> list[tuple[str, int, int]]:
    """(id, n, attempts) of every ready job, in order."""
    held = await driver.reserve([queue], 100, 30)
    return [(h.id, int(orjson.loads(h.payload)["n"]), h.attempts) for h in held]


async def until_expired(driver: Driver, job_id: str, queue: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        record = await driver.job_status(job_id, queue)
        if record is not None and record.status is Status.EXPIRED:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} never read as expired")


async def test_a_batch_of_ids_is_decided_as_one_push_after_the_other(
    driver: Driver, queue: str
) -> None:
    running, ended, waiting = new_id(), new_id(), new_id()
    await driver.push([by_id(running, queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.push([by_id(ended, queue, 2)])
    [done] = await driver.reserve([queue], 1, lease=30)
    done.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([done])
    await driver.push([by_id(waiting, queue, 3)])
    new, other, kept = new_id(), f"{queue}-other", new_id()

    pushed = await driver.push(
        [
            by_id(new, queue, 10),
            by_id(waiting, queue, 11, "replace"),
            by_id(new, queue, 12),  # a duplicate of a job of this same push
            by_id(new, queue, 14, "replace"),
            by_id(running, queue, 15, "replace"),  # running: never replaced
            by_id(ended, queue, 16),  # ended: the id is free, its record dropped
            by_id(kept, queue, 17, "keep"),
            by_id(kept, queue, 18, "keep"),
            by_id(new, other, 19),  # ids are per queue
            by_id(waiting, queue, 20),
        ]
    )

    assert pushed == [
        Pushed(new, "created"),
        Pushed(waiting, "replaced"),
        Pushed(new, "duplicate"),
        Pushed(new, "replaced"),
        Pushed(running, "kept"),
        Pushed(ended, "created"),
        Pushed(kept, "created"),
        Pushed(kept, "kept"),
        Pushed(new, "created"),
        Pushed(waiting, "duplicate"),
    ]
    record = await driver.job_status(ended, queue)
    assert record is not None and record.status is Status.QUEUED
    assert (record.attempts, record.error, record.ended_at) == (0, "", None)
    assert (await driver.recent(queue)).coalesced == 2
    assert await take_all(driver, queue) == [
        (waiting, 11, 1),
        (new, 14, 1),
        (ended, 16, 1),
        (kept, 17, 1),
    ]
    assert await take_all(driver, other) == [(new, 19, 1)]
    await driver.ack([held])


async def test_an_expired_holder_met_in_a_batch_is_ended_and_the_job_stored_in_its_turn(
    driver: Driver, queue: str, backend: Backend, request: pytest.FixtureRequest
) -> None:
    if backend.connection == "redis":
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="the redis driver answers a job whose holder expired (unwritten) as a "
                "duplicate, even pushed alone; the other drivers free the id",
            )
        )
    expired, before, after = new_id(), new_id(), new_id()
    await driver.push([by_id(expired, queue, 1, ttl=0.1)])
    await until_expired(driver, expired, queue)
    pushed = await driver.push(
        [
            by_id(before, queue, 2),
            by_id(expired, queue, 3),
            by_id(before, queue, 4, "replace"),
            by_id(after, queue, 5),
            by_id(expired, queue, 6, "replace"),
        ]
    )
    assert pushed == [
        Pushed(before, "created"),
        Pushed(expired, "created"),
        Pushed(before, "replaced"),
        Pushed(after, "created"),
        Pushed(expired, "replaced"),
    ]
    assert (await driver.recent(queue)).expired == 1
    assert await take_all(driver, queue) == [(before, 4, 1), (expired, 6, 1), (after, 5, 1)]


async def test_a_batch_of_ids_all_waiting_stores_nothing(driver: Driver, queue: str) -> None:
    ids = [new_id() for _ in range(30)]
    await driver.push([by_id(job_id, queue, n) for n, job_id in enumerate(ids)])
    again = await driver.push([by_id(job_id, queue, 100 + n) for n, job_id in enumerate(ids)])
    assert again == [Pushed(job_id, "duplicate") for job_id in ids]
    assert await take_all(driver, queue) == [(job_id, n, 1) for n, job_id in enumerate(ids)]


# -- competing dispatchers (the database driver) --------------------------------------------


@pytest.fixture(params=["sqlite", "mysql"])
def sql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


async def test_two_managers_pushing_the_same_ids_at_once_store_each_once(
    sql_backend: Backend,
) -> None:
    settings = sql_backend.settings()
    queue = str(sql_backend.overrides["queue_default"])
    async with QueueManager(settings) as one, QueueManager(settings) as two:
        first, second = await one.connection(), await two.connection()
        await first.size(queue)  # both connected, the tables made
        await second.size(queue)
        for round_ in range(5):
            ids = [f"race-{round_}-{n}" for n in range(50)]
            a, b = await asyncio.gather(
                first.push([by_id(job_id, queue, 1) for job_id in ids]),
                second.push([by_id(job_id, queue, 2) for job_id in ids]),
            )
            for job_id, mine, theirs in zip(ids, a, b, strict=True):
                assert {mine.outcome, theirs.outcome} == {"created", "duplicate"}, job_id
                assert mine.id == theirs.id == job_id
        assert await first.size(queue) == 250
        taken = await take_all(first, queue) + await take_all(first, queue)
        taken += await take_all(first, queue)
        assert sorted(job_id for job_id, _, _ in taken) == sorted(
            f"race-{r}-{n}" for r in range(5) for n in range(50)
        )


async def test_an_id_stored_by_another_dispatcher_after_the_look_is_a_duplicate(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The batch looked its ids up and found them free; another dispatcher stores one of them
    before the batch's insert: that insert keeps nothing and each job is pushed on its own."""
    backend = next(_backend("mysql", request, tmp_path))
    queue = str(backend.overrides["queue_default"])
    url = str(backend.overrides["db_url"]).replace("mysql+aiomysql", "mysql+pymysql")
    other = create_engine(url)
    theirs = by_id("taken-3", queue, 99)
    injected: list[str] = []

    def store_theirs(*args: Any) -> None:
        statement = str(args[2])
        if not injected and statement.startswith("INSERT INTO queue_jobs"):
            injected.append(statement)
            with other.begin() as conn:  # committed before this insert runs
                conn.execute(insert(t.queue_jobs).values(**life.job_row(theirs, t.now())))

    async with QueueManager(backend.settings()) as manager:
        driver: Any = await manager.connection()
        await driver.size(queue)
        engine = driver._engine.sync_engine
        event.listen(engine, "before_cursor_execute", store_theirs)
        try:
            ids = [f"taken-{n}" for n in range(10)]
            pushed = await driver.push([by_id(job_id, queue, n) for n, job_id in enumerate(ids)])
        finally:
            event.remove(engine, "before_cursor_execute", store_theirs)
            other.dispose()
        assert injected, "the batch never inserted"
        assert pushed == [
            Pushed(job_id, "duplicate" if job_id == "taken-3" else "created") for job_id in ids
        ]
        assert await driver.size(queue) == 10
        # Theirs is stored with its own (later) time: it comes last.
        assert await take_all(driver, queue) == [
            (job_id, n, 1) for n, job_id in enumerate(ids) if job_id != "taken-3"
        ] + [("taken-3", 99, 1)]
