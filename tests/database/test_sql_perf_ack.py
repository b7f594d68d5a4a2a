"""The database driver's hot path (issue #19): a batch of jobs that succeeded with nothing to
keep beside their rows is acknowledged without reading the rows (the database copies each
record from its row), and a reserve carrying the acknowledgements of a batch runs as many
statements for 8 jobs as for 32. What is checked here is what the tables show: the copied
record is the record the general path writes, and the statement count does not grow with
the batch. The behaviour every driver shares is in tests/conformance."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import select

from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.database import DatabaseDriver
from core.status import Status
from tests.database.test_lifecycle_sql import statements

pytestmark = pytest.mark.timeout(60)

#: The columns a record's writer decides (the rest name the job or come from the outcome).
_SAME = ("connection", "job", "status", "attempts", "max_tries", "worker", "kind", "progress")


def job(queue: str, **options: Any) -> OutgoingJob:
    return OutgoingJob(
        uuid.uuid4().hex, queue, b'{"n": 1}', job="tests.jobs:Echo", max_tries=3, **options
    )


async def records(driver: DatabaseDriver, queue: str) -> dict[str, Any]:
    assert driver._engine is not None
    records = t.queue_job_records.c
    async with driver._engine.connect() as conn:
        found = (
            await conn.execute(select(t.queue_job_records).where(records.queue == queue))
        ).all()
    return {row.uuid: row for row in found}


async def reserve_all(driver: DatabaseDriver, queue: str, n: int) -> list[ReservedJob]:
    taken = await driver.reserve([queue], n, 60.0, worker="perf-worker")
    assert len(taken) == n
    return taken


@pytest.mark.parametrize(
    "options",
    [{}, {"at_front": True}, {"priority": 5}, {"delay": 0.001}],
    ids=["plain", "at_front", "priority", "delayed"],
)
async def test_a_copied_record_is_the_record_the_general_path_writes(
    driver: DatabaseDriver, queue: str, options: dict[str, Any]
) -> None:
    pushed = [job(queue, **options), job(queue, **options)]
    await driver.push(pushed)
    if options.get("delay"):
        taken: list[ReservedJob] = []
        for _ in range(200):  # due within milliseconds: look until both are handed out
            taken += await driver.reserve([queue], 2 - len(taken), 60.0, worker="perf-worker")
            if len(taken) == 2:
                break
        assert len(taken) == 2
    else:
        taken = await reserve_all(driver, queue, 2)
    copied, general = taken
    # An error on a success is never written by a worker; it only sends this job down the
    # general path (records built from the rows read back), beside the copied one.
    general.outcome = Outcome(Status.SUCCEEDED, 3600.0, error="general path")
    await driver.ack([copied, general])

    found = await records(driver, queue)
    assert set(found) == {copied.id, general.id}
    a, b = found[copied.id], found[general.id]
    for name in _SAME:
        assert getattr(a, name) == getattr(b, name), name
    assert a.status == "succeeded" and a.attempts == 1 and a.worker == "perf-worker"
    assert a.result is None and a.error is None and a.traceback is None and a.info is None
    assert a.priority == b.priority == options.get("priority")
    assert (
        a.enqueued_at == b.enqueued_at or abs((a.enqueued_at - b.enqueued_at).total_seconds()) < 1
    )
    assert a.due_at is not None and b.due_at is not None
    assert abs((a.due_at - b.due_at).total_seconds()) < 1
    assert a.started_at == b.started_at  # reserved in one claim
    assert a.keep_until > a.ended_at
    assert await driver.size(queue) == 0


async def test_a_job_with_a_result_or_a_group_takes_the_general_path_in_the_same_batch(
    driver: DatabaseDriver, queue: str
) -> None:
    plain, kept, grouped = job(queue), job(queue), job(queue, group="device-1")
    await driver.push([plain, kept, grouped])
    taken = {j.id: j for j in await reserve_all(driver, queue, 3)}
    taken[kept.id].outcome = Outcome(Status.SUCCEEDED, 3600.0, result=b'{"ok": 1}')
    await driver.ack(list(taken.values()))

    found = await records(driver, queue)
    assert set(found) == {plain.id, kept.id, grouped.id}
    assert found[kept.id].result == '{"ok": 1}'
    assert found[grouped.id].group_key == "device-1"
    assert found[plain.id].result is None
    assert await driver.size(queue) == 0
    # The group's turn was passed on: a new job of the group is handed out at once.
    follower = job(queue, group="device-1")
    await driver.push([follower])
    [next_one] = await reserve_all(driver, queue, 1)
    assert next_one.id == follower.id


async def test_an_ack_after_the_lease_was_taken_over_changes_nothing(
    driver: DatabaseDriver, queue: str
) -> None:
    await driver.push([job(queue)])
    [first] = await driver.reserve([queue], 1, 0.05, worker="perf-worker")
    again: list[ReservedJob] = []
    for _ in range(200):  # the lease runs out within 50 ms
        again = await driver.reserve([queue], 1, 60.0, worker="perf-worker")
        if again:
            break
    assert [j.id for j in again] == [first.id] and again[0].attempts == 2
    await driver.ack([first])  # the first try's late acknowledgement
    assert await records(driver, queue) == {}
    assert await driver.size(queue) == 1
    await driver.ack(again)
    assert set(await records(driver, queue)) == {first.id}
    assert await driver.size(queue) == 0


async def test_statements_per_reserve_do_not_grow_with_the_batch(
    driver: DatabaseDriver, queue: str
) -> None:
    counts = []
    for size in (8, 32):
        await driver.push([job(queue) for _ in range(2 * size)])
        held = await reserve_all(driver, queue, size)
        with statements(driver) as seen:
            more = await driver.reserve([queue], size, 60.0, held, worker="perf-worker")
        assert len(more) == size
        await driver.ack(more)
        counts.append(len(seen))
    assert counts[0] == counts[1]
    # Copy the records, delete the rows, claim, reserve, count the ends.
    assert counts[1] <= 5, counts
