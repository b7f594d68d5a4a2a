"""Cancel and `ttl` expiry on every driver.

Driver-level (SPEC12 "Cancel", the `ttl` rule of "Records"): a waiting job cancelled is gone
with a `cancelled` record; a running one gets a request its worker polls; a job past its `ttl`
is never handed out, its record says `expired`; both are counted and free their unique key.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from core.queue.drivers import Driver, Outcome, OutgoingJob
from core.status import Status

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, n: int = 0, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", "tests.jobs:RecordJob")
    return OutgoingJob(job_id, queue, orjson.dumps({"n": n}), **fields)


# -- cancel --------------------------------------------------------------------------------


async def test_cancel_removes_a_waiting_job(driver: Driver, queue: str) -> None:
    job_id, other = new_id(), new_id()
    await driver.push([outgoing(job_id, queue, 1), outgoing(other, queue, 2)])
    before = time.time()
    assert await driver.cancel(job_id, queue) is True
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.CANCELLED
    assert record.ended_at is not None and record.ended_at >= before - 0.01
    assert await driver.size(queue) == 1
    assert [h.id for h in await driver.reserve([queue], 10, lease=30)] == [other]
    assert (await driver.recent(queue)).cancelled == 1
    assert await driver.cancel(job_id, queue) is False  # ended: nothing to cancel


async def test_cancel_finds_the_job_without_its_queue(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=60)])
    assert await driver.cancel(job_id) is True
    record = await driver.job_status(job_id)
    assert record is not None and record.status is Status.CANCELLED
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (0, 0, 0)


async def test_a_cancelled_scheduled_job_never_runs(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=0.2)])
    assert await driver.cancel(job_id, queue) is True
    await asyncio.sleep(0.3)  # past its due time
    assert await driver.reserve([queue], 10, lease=30) == []


async def test_cancel_of_unknown_or_ended_jobs_is_false(driver: Driver, queue: str) -> None:
    assert await driver.cancel(new_id(), queue) is False
    assert await driver.cancel(new_id()) is False
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.ack([held])
    assert await driver.cancel(job_id, queue) is False
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED


async def test_a_cancelled_record_is_kept_for_the_jobs_failure_ttl(
    driver: Driver, queue: str
) -> None:
    gone, kept = new_id(), new_id()
    await driver.push(
        [outgoing(gone, queue, failure_ttl=0), outgoing(kept, queue, failure_ttl=0.5)]
    )
    assert await driver.cancel(gone, queue) is True
    assert await driver.cancel(kept, queue) is True
    assert await driver.job_status(gone, queue) is None
    assert (await driver.recent(queue)).cancelled == 2
    assert await driver.job_status(kept, queue) is not None
    await asyncio.sleep(0.7)  # the keep time is under test
    await driver.prune_records()
    assert await driver.job_status(kept, queue) is None


async def test_cancel_frees_the_unique_key(driver: Driver, queue: str) -> None:
    first = outgoing(new_id(), queue, 1, unique_key="k")
    await driver.push([first])
    assert await driver.cancel(first.id, queue) is True
    [again] = await driver.push([outgoing(new_id(), queue, 2, unique_key="k")])
    assert again.outcome == "created"


async def test_cancel_of_a_running_job_is_a_request_its_worker_sees(
    driver: Driver, queue: str
) -> None:
    job_id, other = new_id(), new_id()
    await driver.push([outgoing(job_id, queue, 1), outgoing(other, queue, 2)])
    held = await driver.reserve([queue], 2, lease=30, worker="w1")
    assert await driver.cancel_requested(held) == []
    assert await driver.cancel(job_id, queue) is True
    assert await driver.cancel_requested(held) == [job_id]
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING  # until its worker stops it
    assert (await driver.recent(queue)).cancelled == 0
    # The worker cancels the task and acknowledges it as cancelled.
    held[0].outcome = Outcome(Status.CANCELLED, 60, error="cancelled")
    await driver.ack(held)
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.CANCELLED
    assert (await driver.recent(queue)).cancelled == 1
    assert await driver.cancel(job_id, queue) is False


async def test_cancel_requested_then_lease_expired_never_runs_again(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=0.2)  # a worker that then dies
    assert await driver.cancel(job_id, queue) is True
    await asyncio.sleep(0.3)  # the lease must expire
    assert await driver.reserve([queue], 10, lease=30) == []
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.CANCELLED
    assert (await driver.recent(queue)).cancelled == 1
    assert await driver.size(queue) == 0
    await driver.ack([held])  # the lapsed worker's late ack changes nothing
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.CANCELLED


async def test_wait_ended_wakes_on_a_cancel(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    waiter = asyncio.create_task(driver.wait_ended(job_id, queue, 10))
    await asyncio.sleep(0.2)  # the waiter is blocked by now
    assert not waiter.done()
    assert await driver.cancel(job_id, queue) is True
    started = time.monotonic()
    record = await waiter
    assert record is not None and record.status is Status.CANCELLED
    assert time.monotonic() - started < 0.5


# -- ttl ------------------------------------------------------------------------------------


async def test_a_job_not_started_within_its_ttl_expires(driver: Driver, queue: str) -> None:
    late, fresh = new_id(), new_id()
    await driver.push([outgoing(late, queue, 1, ttl=0.2), outgoing(fresh, queue, 2)])
    await asyncio.sleep(0.3)  # past its ttl
    before = time.time()
    held = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in held if not h.expired] == [fresh]
    assert [h.id for h in held if h.expired] == [late]  # handed back as expired (#14)
    record = await driver.job_status(late, queue)
    assert record is not None and record.status is Status.EXPIRED
    assert record.ended_at is not None and record.ended_at >= before - 1
    assert "ttl" in record.error and record.attempts == 0
    assert (await driver.recent(queue)).expired == 1
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (0, 0, 1)


async def test_a_waiting_job_past_its_ttl_reads_expired_before_any_reserve(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, ttl=0.2)])
    await asyncio.sleep(0.3)  # past its ttl
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.EXPIRED
    # Never runnable; a driver that ends it at the reserve hands it back as expired (#14).
    held = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in held if not h.expired] == []
    assert all(h.id == job_id for h in held)
    assert (await driver.recent(queue)).expired == 1


async def test_ttl_counts_from_the_due_time(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=0.3, ttl=1.0)])
    await asyncio.sleep(0.5)  # due, well within its ttl after that
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == job_id


async def test_a_job_started_in_time_never_expires(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, ttl=0.2)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held, 0, error="E")  # a retry is not bound by the ttl
    await asyncio.sleep(0.3)
    [again] = await driver.reserve([queue], 1, lease=30)
    assert (again.id, again.attempts) == (job_id, 2)
    await driver.ack([again])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED
    assert (await driver.recent(queue)).expired == 0


async def test_expiry_frees_the_key_and_keeps_the_record_for_its_failure_ttl(
    driver: Driver, queue: str
) -> None:
    first = outgoing(new_id(), queue, 1, ttl=0.2, unique_key="k", failure_ttl=0)
    await driver.push([first])
    await asyncio.sleep(0.3)  # past its ttl
    assert [h.id for h in await driver.reserve([queue], 10, lease=30) if not h.expired] == []
    assert await driver.job_status(first.id, queue) is None  # failure_ttl 0: nothing kept
    assert (await driver.recent(queue)).expired == 1
    [again] = await driver.push([outgoing(new_id(), queue, 2, unique_key="k")])
    assert again.outcome == "created"


async def test_wait_ended_returns_an_expired_job(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, ttl=0.2)])
    record = await driver.wait_ended(job_id, queue, 5)
    assert record is not None and record.status is Status.EXPIRED
