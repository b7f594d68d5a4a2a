"""The in-memory driver's IoT rules (SPEC14 §1-4): groups, bounded queues, counts, expired
jobs handed back. The reference the other drivers are judged against."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from core.queue.drivers.base import Dependency, Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.memory import MemoryDriver
from core.status import Status
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(30)

Q = "telemetry"


@pytest.fixture
async def driver() -> AsyncIterator[MemoryDriver]:
    async with MemoryDriver("memory", make_settings(queue_connection="memory")) as opened:
        yield opened


def job(job_id: str, n: int = 0, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", "tests.jobs:RecordJob")
    return OutgoingJob(job_id, Q, orjson.dumps({"n": n}), **fields)


def ids(jobs: list[ReservedJob]) -> list[str]:
    return [j.id for j in jobs if not j.expired]


async def take(driver: MemoryDriver, limit: int = 10, lease: float = 30) -> list[ReservedJob]:
    return await driver.reserve([Q], limit, lease)


async def status(driver: MemoryDriver, job_id: str) -> Status:
    record = await driver.job_status(job_id, Q)
    assert record is not None
    return record.status


# -- groups --------------------------------------------------------------------------------


async def test_one_job_per_group_in_turn_the_rest_in_line(driver: MemoryDriver) -> None:
    await driver.push([job(f"a{i}", i, group="dev-a") for i in range(3)] + [job("b0", group="b")])
    held = await take(driver)
    assert ids(held) == ["a0", "b0"]
    stats = await driver.stats(Q)
    assert (stats.pending, stats.delayed, stats.reserved) == (2, 0, 2)
    record = await driver.job_status("a1", Q)
    assert record is not None and record.status is Status.QUEUED and record.group == "dev-a"
    assert await take(driver) == []
    await driver.ack([held[0]])
    assert ids(await take(driver)) == ["a1"]
    ended = await driver.job_status("a0", Q)
    assert ended is not None and ended.status is Status.SUCCEEDED and ended.group == "dev-a"


async def test_the_next_job_queues_behind_jobs_already_ready(driver: MemoryDriver) -> None:
    await driver.push([job(f"a{i}", group="a") for i in range(100)])
    [a0] = await take(driver, 1)
    await driver.push([job("b0", group="b"), job("plain")])
    await driver.ack([a0])  # a1 became ready now: behind b0 and plain
    assert ids(await take(driver)) == ["b0", "plain", "a1"]


async def test_an_ended_holder_passes_the_turn_however_it_ended(driver: MemoryDriver) -> None:
    await driver.push([job(f"a{i}", group="a") for i in range(4)])
    [a0] = await take(driver)
    a0.outcome = Outcome(Status.FAILED, 60, error="boom")
    await driver.ack([a0])
    [a1] = await take(driver)
    a1.outcome = Outcome(Status.CANCELLED, 60)
    await driver.ack([a1])
    assert await driver.cancel("a2", Q) is True  # waiting holder cancelled
    assert ids(await take(driver)) == ["a3"]


async def test_retry_refund_and_lost_lease_keep_the_turn(driver: MemoryDriver) -> None:
    await driver.push([job("a0", group="a"), job("a1", group="a")])
    [a0] = await take(driver)
    await driver.release(a0, error="again")
    assert await status(driver, "a0") is Status.RETRYING
    [again] = await take(driver)
    assert again.id == "a0" and again.attempts == 2
    await driver.release(again, refund=True)
    [again] = await take(driver, lease=0.05)
    assert again.id == "a0" and again.attempts == 2
    await asyncio.sleep(0.1)  # the lease runs out: a0 is ready again, still in turn
    [again] = await take(driver)
    assert again.id == "a0" and again.attempts == 3
    await driver.release(again, delay=0.05)
    assert await take(driver) == []  # a1 waits while a0 is retrying
    await asyncio.sleep(0.1)
    [again] = await take(driver)
    assert again.id == "a0"
    await driver.ack([again])
    assert ids(await take(driver)) == ["a1"]


async def test_a_line_job_cancelled_leaves_the_line(driver: MemoryDriver) -> None:
    await driver.push([job(f"a{i}", group="a") for i in range(3)])
    assert await driver.cancel("a1", Q) is True
    assert await status(driver, "a1") is Status.CANCELLED
    assert (await driver.stats(Q)).pending == 2
    [a0] = await take(driver)
    await driver.ack([a0])
    assert ids(await take(driver)) == ["a2"]


async def test_the_next_job_waits_for_its_own_due_time(driver: MemoryDriver) -> None:
    await driver.push([job("a0", group="a"), job("a1", group="a", delay=0.3)])
    assert await status(driver, "a1") is Status.QUEUED
    [a0] = await take(driver)
    await driver.ack([a0])
    assert await status(driver, "a1") is Status.SCHEDULED
    assert await take(driver) == []
    await driver.wait([Q], 2)
    assert ids(await take(driver)) == ["a1"]


async def test_expired_holder_is_handed_back_and_passes_the_turn(driver: MemoryDriver) -> None:
    await driver.push([job("a0", 7, group="a", ttl=0.05), job("a1", group="a")])
    await asyncio.sleep(0.1)
    held = await take(driver, 1)
    gone = [j for j in held if j.expired]
    assert ids(held) == ["a1"]
    assert [(j.id, j.attempts, j.payload) for j in gone] == [("a0", 0, orjson.dumps({"n": 7}))]
    assert await status(driver, "a0") is Status.EXPIRED
    assert (await driver.recent(Q)).expired == 1


async def test_a_line_job_past_its_ttl_expires_when_it_takes_the_turn(
    driver: MemoryDriver,
) -> None:
    await driver.push([job("a0", group="a"), job("a1", group="a", ttl=0.05), job("a2", group="a")])
    [a0] = await take(driver)
    await asyncio.sleep(0.1)
    await driver.ack([a0])
    held = await take(driver)
    assert ids(held) == ["a2"]
    assert [j.id for j in held if j.expired] == ["a1"]


async def test_a_dependent_joins_the_line_when_released(driver: MemoryDriver) -> None:
    await driver.push(
        [job("x"), job("d", group="a", depends_on=(Dependency("x", Q),)), job("a0", group="a")]
    )
    held = await take(driver)
    assert ids(held) == ["x", "a0"]
    assert await status(driver, "d") is Status.DEFERRED
    await driver.push([job("a1", group="a")])
    await driver.ack([held[0]])  # x ends: d joins the line behind a1
    assert await status(driver, "d") is Status.QUEUED
    await driver.ack([held[1]])
    [a1] = await take(driver)
    assert a1.id == "a1"
    await driver.ack([a1])
    assert ids(await take(driver)) == ["d"]


async def test_a_released_dependent_of_an_empty_group_takes_the_turn(
    driver: MemoryDriver,
) -> None:
    await driver.push([job("x"), job("d", group="a", depends_on=(Dependency("x", Q),))])
    [x] = await take(driver)
    await driver.push([job("a0", group="a")])  # the group is empty: a0 takes the turn
    await driver.ack([x])  # d joins the line
    assert ids(await take(driver)) == ["a0"]


async def test_replace_keeps_a_line_jobs_place(driver: MemoryDriver) -> None:
    kw: dict[str, Any] = {"group": "a", "unique_key": "k", "on_duplicate": "replace"}
    await driver.push([job("a0", group="a"), job("a1", 1, **kw), job("a2", group="a")])
    [pushed] = await driver.push([job("new", 9, **kw)])
    assert (pushed.id, pushed.outcome) == ("a1", "replaced")
    assert (await driver.recent(Q)).coalesced == 1
    [a0] = await take(driver)
    await driver.ack([a0])
    [a1] = await take(driver)
    assert (a1.id, a1.payload) == ("a1", orjson.dumps({"n": 9}))


async def test_priority_places_the_holder_not_the_line(driver: MemoryDriver) -> None:
    await driver.push([job("a0", group="a"), job("a1", group="a", priority=5), job("p")])
    assert ids(await take(driver)) == ["a0", "p"]


async def test_clear_removes_lines_and_a_running_holder_keeps_the_turn(
    driver: MemoryDriver,
) -> None:
    await driver.push([job(f"a{i}", group="a") for i in range(3)] + [job("b0", group="b")])
    [a0] = await take(driver, 1)
    assert await driver.clear(Q) == 3  # a1, a2, b0
    assert await driver.job_status("a1", Q) is None
    await driver.push([job("a3", group="a"), job("b1", group="b")])
    assert ids(await take(driver)) == ["b1"]  # a3 waits for the running a0
    await driver.ack([a0])
    assert ids(await take(driver)) == ["a3"]


# -- bounded queues ------------------------------------------------------------------------


async def test_a_full_queue_rejects(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 2}
    pushed = await driver.push([job(f"j{i}", **bound) for i in range(3)])
    assert [p.outcome for p in pushed] == ["created", "created", "full"]
    assert pushed[2].id == "j2"
    assert await driver.job_status("j2", Q) is None
    assert (await driver.recent(Q)).rejected == 1
    assert ids(await take(driver, 1)) == ["j0"]  # running jobs do not count
    assert (await driver.push([job("j3", **bound)]))[0].outcome == "created"


async def test_drop_oldest_drops_the_head_of_the_ready_list(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 2, "overflow": "drop_oldest"}
    await driver.push([job("p", priority=3, **bound), job("j0", **bound)])
    [pushed] = await driver.push([job("j1", **bound)])
    assert pushed.outcome == "created"
    record = await driver.job_status("j0", Q)
    assert record is not None and record.status is Status.CANCELLED
    assert record.error == f"dropped: queue {Q} is full (2 waiting)"
    counts = await driver.recent(Q)
    assert (counts.dropped, counts.cancelled) == (1, 0)
    [pushed] = await driver.push([job("j2", **bound)])  # j1 dropped
    [pushed] = await driver.push([job("j3", **bound)])  # j2 dropped
    assert ids(await take(driver)) == ["p", "j3"]


async def test_drop_oldest_without_a_candidate_is_full(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 1, "overflow": "drop_oldest"}
    await driver.push([job("p", priority=1, **bound)])
    [pushed] = await driver.push([job("j", **bound)])
    assert pushed.outcome == "full"
    assert (await driver.recent(Q)).rejected == 1


async def test_drop_oldest_drops_the_groups_line_first(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 3, "overflow": "drop_oldest"}
    await driver.push([job("x", **bound), job("a0", group="a", **bound)])
    await driver.push([job("a1", group="a", **bound)])
    [pushed] = await driver.push([job("a2", group="a", **bound)])
    assert pushed.outcome == "created"
    assert await status(driver, "a1") is Status.CANCELLED
    assert await status(driver, "x") is Status.QUEUED
    held = await take(driver)
    assert ids(held) == ["x", "a0"]
    await driver.ack(held)
    assert ids(await take(driver)) == ["a2"]


async def test_a_dropped_holder_passes_the_turn(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 2, "overflow": "drop_oldest"}
    await driver.push([job("a0", group="a", **bound), job("a1", group="a", **bound)])
    [pushed] = await driver.push([job("b0", group="b", **bound)])  # a's line not involved
    assert pushed.outcome == "created"
    assert await status(driver, "a0") is Status.CANCELLED
    # The new job is stored first, then a0 dropped: a1 became ready after b0.
    assert ids(await take(driver)) == ["b0", "a1"]


async def test_pushes_that_add_nothing_are_never_refused(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 1, "unique_key": "k", "on_duplicate": "replace"}
    await driver.push([job("j0", **bound)])
    [pushed] = await driver.push([job("j1", **bound)])
    assert pushed.outcome == "replaced"
    counts = await driver.recent(Q)
    assert (counts.coalesced, counts.rejected, counts.dropped) == (1, 0, 0)


async def test_a_dependent_of_a_dropped_job_is_resolved(driver: MemoryDriver) -> None:
    bound: dict[str, Any] = {"max_length": 1, "overflow": "drop_oldest"}
    await driver.push([job("j0", **bound)])
    [pushed] = await driver.push([job("d", depends_on=(Dependency("j0", Q),), **bound)])
    assert pushed.outcome == "created"
    record = await driver.job_status("d", Q)
    assert record is not None and record.status is Status.CANCELLED
    assert record.error == "dependency j0 cancelled"


async def test_many_groups_cost_little(driver: MemoryDriver) -> None:
    n = 20000
    await driver.push([job(uuid.uuid4().hex, group=f"d{i % 1000}", max_length=n) for i in range(n)])
    done = 0
    while True:
        held = await take(driver, 100)
        if not held:
            break
        await driver.ack(held)
        done += len(held)
    assert done == n
    assert not driver._queue(Q).groups


async def test_the_sync_driver_never_runs_a_job_it_expired() -> None:
    from core.queue.drivers.sync import SyncDriver

    async with SyncDriver("sync", make_settings(queue_connection="sync")) as sync:
        # Not a loadable payload: running it would raise; expiring it must not.
        [pushed] = await sync.push([OutgoingJob("late", Q, b"not a payload", ttl=1e-9)])
        assert pushed.outcome == "created"
        record = await sync.job_status("late", Q)
        assert record is not None and record.status is Status.EXPIRED
