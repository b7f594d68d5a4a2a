"""Adversarial regressions for issue #13 (workflows, limits, schedules), from a hostile review.

Each test names the finding it pins (/work/notes/review13-breakit.md). Tests marked
`KNOWN BUG` failed on the code they were written against; they stay here so the fix is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from core.errors import SerializationError
from core.queue.drivers import Driver, create_driver
from core.queue.drivers.base import Limit, Outcome
from core.queue.queue_manager import QueueManager, WorkflowHandle, batch, chain
from core.schedule import ScheduleError, Scheduler, Schedules
from core.status import Status
from tests.conformance.workflow_support import new_id, outgoing, record_job
from tests.conftest import Backend
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[Driver]:
    async with create_driver(backend.connection, backend.settings()) as opened:
        yield opened


@pytest.fixture
def queue(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])


async def _run_all(driver: Driver, queue: str, ids: list[str], seconds: float) -> list[int]:
    """Reserve and acknowledge (succeeded) until every job ran or `seconds` passed; the order."""
    order: list[int] = []
    deadline = time.monotonic() + seconds
    while len(order) < len(ids) and time.monotonic() < deadline:
        held = await driver.reserve([queue], 10, lease=30)
        order += [ids.index(h.id) for h in held]
        for h in held:
            h.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
        if held:
            await driver.ack(held)
        await asyncio.sleep(0.05)
    return order


# F1 (KNOWN BUG, memory driver): a limit with key "" (the queue's one limit: a job class with
# `rate_limit`/`concurrency_limit` and no `limit_key`) never starts a second job once two or
# more of its jobs are held back; the same key with a name works.
@pytest.mark.parametrize(
    "limit",
    [Limit("", concurrency=1), Limit("", rate=10, period=1.0)],
    ids=["concurrency", "rate"],
)
async def test_queue_wide_limit_runs_every_held_job(
    driver: Driver, queue: str, limit: Limit
) -> None:
    ids = [new_id() for _ in range(4)]
    await driver.push([outgoing(job_id, queue, n, limit=limit) for n, job_id in enumerate(ids)])
    assert await _run_all(driver, queue, ids, seconds=5) == [0, 1, 2, 3]


# F1 (KNOWN BUG, memory driver), the lost-lease variant: a concurrency-limited job of key ""
# whose worker died is never handed out again while another job of the key is held.
async def test_queue_wide_limit_lost_lease_comes_back(driver: Driver, queue: str) -> None:
    a, b = new_id(), new_id()
    limit = Limit("", concurrency=1)
    await driver.push([outgoing(a, queue, limit=limit), outgoing(b, queue, limit=limit)])
    [lapsed] = await driver.reserve([queue], 10, lease=0.2)
    assert lapsed.id == a
    await asyncio.sleep(0.4)  # the lease must run out: time is the behaviour
    held = await driver.reserve([queue], 10, lease=30)
    assert [(h.id, h.attempts) for h in held] == [(a, 2)]


# -- schedules -------------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def manager(backend: Backend) -> AsyncIterator[QueueManager]:
    async with QueueManager(backend.settings()) as opened:
        yield opened


async def _waiting(manager: QueueManager, backend: Backend) -> int:
    stats = await (await manager.connection()).stats(backend.settings().queue_default)
    return stats.pending + stats.delayed


# F2 (KNOWN BUG): a schedule whose job cannot be dispatched (a bad setting on the instance) is
# accepted when the module loads; the docs promise a ScheduleError then. At run time it makes
# `run_due` raise before the schedules declared after it, so those are never enqueued.
def test_schedule_with_undispatchable_job_is_refused_at_declaration() -> None:
    bad = RecordJob("/dev/null")
    bad.rate_limit = "0/second"
    with pytest.raises(ScheduleError, match="rate_limit"):
        Schedules().every("1s", bad, name="bad")


async def test_schedule_with_undispatchable_job_does_not_starve_the_others(
    manager: QueueManager, backend: Backend
) -> None:
    schedules = Schedules()
    bad = RecordJob("/dev/null")
    bad.rate_limit = "0/second"
    start = float(int(time.time())) + 0.5
    clock = _Clock(start)
    items = []
    with contextlib.suppress(ScheduleError):  # refused at declaration is the better fix
        items.append(schedules.every("1s", bad, name=f"bad-{new_id()}"))
    items.append(schedules.every("1s", RecordJob("/dev/null"), name=f"good-{new_id()}"))
    scheduler = Scheduler(manager, items, clock=clock)
    await scheduler.run_due()
    for _ in range(3):
        clock.now += 1
        with contextlib.suppress(SerializationError):
            await scheduler.run_due()
    assert await _waiting(manager, backend) == 3  # the good schedule's three ticks


# F6 (KNOWN BUG): a wall clock that steps forward, then is corrected back (NTP; an IoT gateway
# that booted with a wrong clock), silences an interval schedule for the size of the step: the
# cursor and the marker stay at the future tick, and a restarted scheduler reads that marker.
@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_schedule_keeps_ticking_after_the_clock_is_corrected_back(
    manager: QueueManager, backend: Backend, restart: bool
) -> None:
    item = Schedules().every("10s", RecordJob("/dev/null"), name=f"jump-{new_id()}")
    start = float(int(time.time()) // 10 * 10) + 0.5
    clock = _Clock(start)
    scheduler = Scheduler(manager, [item], clock=clock)
    await scheduler.run_due()
    clock.now = start + 86400  # the clock steps a day ahead...
    await scheduler.run_due()
    clock.now = start + 10  # ...and is corrected
    if restart:
        scheduler = Scheduler(manager, [item], clock=clock)
        await scheduler.run_due()
    before = await _waiting(manager, backend)
    for _ in range(3):
        clock.now += 10
        await scheduler.run_due()
    assert await _waiting(manager, backend) == before + 3


# -- duplicates inside a workflow --------------------------------------------------------------


# F7 (KNOWN BUG, redis driver): a dependency named twice (a workflow whose two members are the
# same job, e.g. both `job_id="k", on_duplicate="keep"`) is counted twice by Redis: the record
# shows total 2 and ends `succeeded` with 1 still pending; memory (the reference) and SQL count
# it once, and Redis lists it twice in `waiting_for`.
async def test_a_dependency_named_twice_counts_once(driver: Driver, queue: str) -> None:
    x, record, dependent = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(x, queue),
            record_job(record, queue, "batch", [x, x]),
            outgoing(dependent, queue, depends_on=[x, x]),
        ]
    )
    waiting = await driver.job_status(dependent, queue)
    assert waiting is not None and waiting.waiting_for == (x,)
    [held] = await driver.reserve([queue], 5, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    await driver.ack([held])
    ended = await driver.job_status(record, queue)
    assert ended is not None and ended.status is Status.SUCCEEDED
    assert ended.progress is not None
    assert (ended.progress.total, ended.progress.pending) == (1, 0)


# -- nested workflows ----------------------------------------------------------------------------


# F11 (KNOWN BUG, redis and SQL drivers): cancelling a workflow does not reach the members of a
# workflow nested in it. Redis: the nested chain's jobs run after the cancel (the nested record
# ends `succeeded`). SQL: the nested record is ended `cancelled` like a waiting job, with a
# progress that counts none of its members, the outer `finally_` runs at once, and the nested
# jobs then run anyway. Memory (the reference) cancels them all.
async def test_cancel_reaches_the_members_of_a_nested_workflow(manager: QueueManager) -> None:
    inner = chain(RecordJob("/dev/null", 1), RecordJob("/dev/null", 2))
    handle = await manager.push_workflow(
        batch([inner, RecordJob("/dev/null", 3)], finally_=RecordJob("/dev/null", 9))
    )
    nested = handle.jobs[0]
    assert isinstance(nested, WorkflowHandle) and handle.finally_job is not None
    assert await handle.cancel()
    driver = await manager.connection()
    ran: list[str] = []
    for _ in range(5):
        held = await driver.reserve([manager.settings.queue_default], 10, lease=30)
        if not held:
            break
        ran += [h.id for h in held]
        for h in held:
            h.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
        await driver.ack(held)
    assert ran == [handle.finally_job.id]  # only the callback: no member runs after a cancel
    for member in nested.jobs:
        assert (await member.status()).status is Status.CANCELLED
    inner_record = await nested.status()
    assert inner_record.status is Status.CANCELLED
    assert inner_record.progress is not None and inner_record.progress.cancelled == 2


# F11 (KNOWN BUG, redis and SQL drivers), without any cancel call: a batch (cancel_on_failure,
# the default) whose plain member fails first must cancel the nested chain's waiting jobs; on
# Redis and SQL they run, and on SQL the batch's `finally_` runs before the nested chain ends.
async def test_a_failing_member_cancels_a_nested_workflow(manager: QueueManager) -> None:
    first = RecordJob("/dev/null", 3)
    first.priority = 10  # handed out first
    inner = chain(RecordJob("/dev/null", 1), RecordJob("/dev/null", 2))
    handle = await manager.push_workflow(batch([inner, first], finally_=RecordJob("/dev/null", 9)))
    assert handle.finally_job is not None
    driver = await manager.connection()
    queue = manager.settings.queue_default
    [failing] = await driver.reserve([queue], 1, lease=30)
    assert failing.id == handle.jobs[1].id
    failing.outcome = Outcome(Status.FAILED, 60, error="boom")
    await driver.ack([failing])
    ran: list[str] = []
    for _ in range(5):
        held = await driver.reserve([queue], 10, lease=30)
        if not held:
            break
        ran += [h.id for h in held]
        for h in held:
            h.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
        await driver.ack(held)
    assert ran == [handle.finally_job.id]


# -- priorities ----------------------------------------------------------------------------------


# F13 (KNOWN BUG, SQL driver): a refunded job that was pushed `at_front` goes back before every
# priority on SQL; memory (the reference) and Redis put it at the head of its own priority level,
# as SPEC13 says of refunds ("go to the head of their priority level"), as they do for a lost lease.
async def test_a_refunded_at_front_job_goes_to_the_head_of_its_priority_level(
    driver: Driver, queue: str
) -> None:
    front, high, plain = new_id(), new_id(), new_id()
    await driver.push([outgoing(front, queue, at_front=True, max_tries=5)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.push([outgoing(high, queue, priority=5), outgoing(plain, queue)])
    await driver.release(held, 0, refund=True)
    got = await driver.reserve([queue], 3, lease=30)
    assert [h.id for h in got] == [high, front, plain]
