"""Job lifecycle on every driver: status records from push to the end of their keep time.

Driver-level (SPEC12 "Records", "Recent counts and pruning", `at_front`): what `push`, `reserve`,
`release` and `ack` write, what `job_status` and `wait_ended` read back, and where `at_front`
puts a job. The memory driver is the reference; every driver must pass the same tests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from core.queue.drivers import Driver, Outcome, OutgoingJob, create_driver
from core.status import Status
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)

JOB = "tests.jobs:RecordJob"


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, n: int = 0, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", JOB)
    fields.setdefault("max_tries", 3)
    return OutgoingJob(job_id, queue, orjson.dumps({"n": n}), **fields)


def n_of(payload: bytes) -> int:
    return int(orjson.loads(payload)["n"])


async def test_push_writes_a_queued_record(driver: Driver, queue: str) -> None:
    job_id = new_id()
    before = time.time()
    [pushed] = await driver.push([outgoing(job_id, queue)])
    after = time.time()
    assert (pushed.id, pushed.outcome) == (job_id, "created")
    record = await driver.job_status(job_id, queue)
    assert record is not None
    assert (record.id, record.status, str(record)) == (job_id, Status.QUEUED, "queued")
    assert (record.connection, record.queue, record.job) == (driver.name, queue, JOB)
    assert (record.attempts, record.max_tries) == (0, 3)
    assert record.enqueued_at is not None and before - 0.01 <= record.enqueued_at <= after + 0.01
    assert record.due_at is not None and abs(record.due_at - record.enqueued_at) < 0.5
    assert (record.started_at, record.ended_at, record.worker, record.error) == (None, None, "", "")
    assert record.result is None
    # The queue only narrows the search.
    assert await driver.job_status(job_id) == record


async def test_delayed_push_is_scheduled_until_its_due_time(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=60)])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SCHEDULED
    assert record.enqueued_at is not None and record.due_at is not None
    assert 59.5 <= record.due_at - record.enqueued_at <= 60.5


async def test_unknown_ids_have_no_record(driver: Driver, queue: str) -> None:
    job_id = new_id()
    assert await driver.job_status(job_id, queue) is None
    assert await driver.job_status(job_id) is None
    await driver.push([outgoing(job_id, queue)])
    assert await driver.job_status(job_id, f"{queue}-other") is None
    assert await driver.wait_ended(new_id(), queue, 0.1) is None


async def test_reserve_marks_the_job_running_by_its_worker(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    before = time.time()
    [held] = await driver.reserve([queue], 1, lease=30, worker="host:1:abc")
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING
    assert (record.attempts, record.worker) == (1, "host:1:abc")
    assert record.started_at is not None and record.started_at >= before - 0.01
    assert record.ended_at is None
    assert held.attempts == 1


async def test_release_marks_retrying_with_the_error_or_queued_when_refunded(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30, worker="w1")
    before = time.time()
    await driver.release(held, 30, error="ValueError: printer on fire")
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RETRYING
    assert (record.attempts, record.error) == (1, "ValueError: printer on fire")
    assert record.due_at is not None and before + 29.5 <= record.due_at <= time.time() + 30.5

    other = new_id()
    await driver.push([outgoing(other, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == other
    await driver.release(held, refund=True)
    record = await driver.job_status(other, queue)
    assert record is not None and record.status is Status.QUEUED and record.attempts == 0


async def test_a_retried_try_runs_again_and_keeps_counting(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [first] = await driver.reserve([queue], 1, lease=30, worker="w1")
    await driver.release(first, 0, error="boom")
    [second] = await driver.reserve([queue], 1, lease=30, worker="w2")
    assert (second.id, second.attempts) == (job_id, 2)
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING
    assert (record.attempts, record.worker) == (2, "w2")


async def test_ack_writes_the_outcome_with_its_result(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30, worker="w1")
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b'{"total":42,"unit":"\xc2\xb0C"}')
    before = time.time()
    await driver.ack([held])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED and record.ended
    assert record.value() == {"total": 42, "unit": "°C"}
    assert record.ended_at is not None and record.ended_at >= before - 0.01
    assert (record.attempts, record.worker, record.job) == (1, "w1", JOB)
    assert record.started_at is not None and record.started_at <= record.ended_at
    assert await driver.size(queue) == 0


async def test_ack_writes_a_failure_with_error_and_traceback(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(
        Status.FAILED, 60, error="ValueError: bad", traceback="Traceback...\nValueError: bad"
    )
    await driver.ack([held])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.FAILED
    assert (record.error, record.traceback, record.result) == (
        "ValueError: bad",
        "Traceback...\nValueError: bad",
        None,
    )


async def test_ack_in_the_same_round_trip_as_reserve_writes_the_outcome(
    driver: Driver, queue: str
) -> None:
    job_id, other = new_id(), new_id()
    await driver.push([outgoing(job_id, queue, 1), outgoing(other, queue, 2)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"7")
    [nxt] = await driver.reserve([queue], 1, lease=30, ack=[held])
    assert nxt.id == other
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED and record.value() == 7


async def test_ack_without_an_outcome_succeeds_kept_for_the_connection_default(
    backend: Backend, driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.ack([held])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED and record.result is None

    # QUEUE_RESULT_TTL=0: the default keeps nothing.
    settings = backend.settings(queue_result_ttl=0)
    async with create_driver(backend.connection, settings) as keeps_nothing:
        gone = new_id()
        await keeps_nothing.push([outgoing(gone, queue)])
        [held] = await keeps_nothing.reserve([queue], 1, lease=30)
        await keeps_nothing.ack([held])
        assert await keeps_nothing.job_status(gone, queue) is None


async def test_keep_zero_deletes_the_record_at_once(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 0, result=b"1")
    await driver.ack([held])
    assert await driver.job_status(job_id, queue) is None
    assert await driver.job_status(job_id) is None
    assert (await driver.recent(queue)).succeeded == 1  # counted all the same


async def test_a_record_is_gone_once_its_keep_time_ends(driver: Driver, queue: str) -> None:
    short, long = new_id(), new_id()
    await driver.push([outgoing(short, queue, 1), outgoing(long, queue, 2)])
    held = await driver.reserve([queue], 2, lease=30)
    held[0].outcome = Outcome(Status.SUCCEEDED, 0.5, result=b"1")
    held[1].outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack(held)
    assert await driver.job_status(short, queue) is not None
    await asyncio.sleep(0.8)  # the keep time itself is under test
    assert await driver.job_status(short, queue) is None
    assert await driver.prune_records() >= 0
    assert await driver.job_status(short, queue) is None
    kept = await driver.job_status(long, queue)
    assert kept is not None and kept.status is Status.FAILED


async def test_ack_from_a_lapsed_reservation_writes_nothing(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [old] = await driver.reserve([queue], 1, lease=0.1, worker="dead")
    await asyncio.sleep(0.2)  # the lease must expire
    [new] = await driver.reserve([queue], 1, lease=30, worker="alive")
    assert (new.id, new.attempts) == (job_id, 2)
    old.outcome = Outcome(Status.FAILED, 60, error="late")
    await driver.ack([old])
    await driver.release(old, 0, error="late release")
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING
    assert (record.attempts, record.worker, record.error) == (2, "alive", "")
    assert (await driver.recent(queue)).failed == 0
    new.outcome = Outcome(Status.SUCCEEDED, 60, result=b"2")
    await driver.ack([new])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SUCCEEDED and record.value() == 2


async def test_wait_ended_returns_when_the_ack_lands(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    waiters = [asyncio.create_task(driver.wait_ended(job_id, queue, 10)) for _ in range(2)]
    no_queue = asyncio.create_task(driver.wait_ended(job_id, None, 10))
    await asyncio.sleep(0.3)  # the waiters are blocked by now
    assert not any(task.done() for task in [*waiters, no_queue])
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b'"done"')
    acked = time.monotonic()
    await driver.ack([held])
    records = await asyncio.gather(*waiters, no_queue)
    latency = time.monotonic() - acked
    for record in records:
        assert record is not None and record.status is Status.SUCCEEDED
        assert record.value() == "done"
    assert latency < 0.5, f"wait_ended took {latency:.3f}s after the ack"


async def test_wait_ended_returns_the_live_record_at_its_timeout(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    started = time.monotonic()
    record = await driver.wait_ended(job_id, queue, 0.3)
    waited = time.monotonic() - started
    assert record is not None and record.status is Status.QUEUED
    assert 0.29 <= waited < 2.0
    ended = new_id()
    await driver.push([outgoing(ended, queue)])
    # reserve takes the first one; end it, then a wait on it returns at once
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([held])
    started = time.monotonic()
    done = await driver.wait_ended(held.id, queue, 10)
    assert done is not None and done.status is Status.FAILED
    assert time.monotonic() - started < 0.5


async def test_jobs_pushed_without_the_new_fields_have_right_records(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    [pushed] = await driver.push([OutgoingJob(job_id, queue, b'{"n": 1}')])
    assert pushed.id == job_id and pushed.outcome == "created"
    record = await driver.job_status(job_id, queue)
    assert record is not None and (record.status, record.attempts) == (Status.QUEUED, 0)
    assert (record.id, record.queue) == (job_id, queue)
    [held] = await driver.reserve([queue], 1, lease=30)
    record = await driver.job_status(job_id)
    assert record is not None and (record.status, record.attempts) == (Status.RUNNING, 1)
    await driver.release(held, 0, error="E")
    record = await driver.job_status(job_id, queue)
    assert record is not None and (record.status, record.attempts) == (Status.RETRYING, 1)
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.ack([held])
    record = await driver.job_status(job_id, queue)
    assert record is not None and (record.status, record.attempts) == (Status.SUCCEEDED, 2)


async def test_long_ids_are_stored_and_read_back(driver: Driver, queue: str) -> None:
    job_id = "device/" + "a" * 150 + ":reading@2026-12-02T10:00+00=x.y"
    assert len(job_id) <= 190
    await driver.push([outgoing(job_id, queue, check_id=True)])
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == job_id
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    await driver.ack([held])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.id == job_id and record.status is Status.SUCCEEDED


async def test_pushing_an_id_again_without_the_check_starts_it_afresh(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([held])
    [pushed] = await driver.push([outgoing(job_id, queue, 2)])
    assert pushed.outcome == "created"
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.QUEUED
    assert (record.attempts, record.ended_at, record.error) == (0, None, "")
    [again] = await driver.reserve([queue], 1, lease=30)
    assert (again.id, again.attempts, n_of(again.payload)) == (job_id, 1, 2)


async def test_recent_counts_how_jobs_ended_per_queue(driver: Driver, queue: str) -> None:
    ids = [new_id() for _ in range(4)]
    await driver.push([outgoing(job_id, queue, n) for n, job_id in enumerate(ids)])
    held = await driver.reserve([queue], 3, lease=30)
    assert [h.id for h in held] == ids[:3]
    held[0].outcome = Outcome(Status.SUCCEEDED, 0)
    held[1].outcome = None  # succeeded
    held[2].outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack(held)
    assert await driver.cancel(ids[3], queue) is True
    recent = await driver.recent(queue)
    assert (recent.succeeded, recent.failed, recent.cancelled, recent.expired) == (2, 1, 1, 0)
    assert recent.window == 3600
    other = await driver.recent(f"{queue}-other")
    assert (other.succeeded, other.failed, other.cancelled, other.expired) == (0, 0, 0, 0)


async def test_at_front_jobs_go_first_the_latest_first(driver: Driver, queue: str) -> None:
    a, b, c, d = (new_id() for _ in range(4))
    await driver.push([outgoing(a, queue, 1), outgoing(b, queue, 2)])
    await driver.push([outgoing(c, queue, 3, at_front=True)])
    await driver.push([outgoing(d, queue, 4, at_front=True)])
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed) == (4, 0)  # at_front jobs are ready, not delayed
    held = await driver.reserve([queue], 4, lease=30)
    assert [h.id for h in held] == [d, c, a, b]


async def test_a_delayed_at_front_job_goes_first_once_due(driver: Driver, queue: str) -> None:
    a, b, late = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue, 1), outgoing(late, queue, 9, delay=0.3, at_front=True)])
    await driver.push([outgoing(b, queue, 2)])
    assert [h.id for h in await driver.reserve([queue], 1, lease=30)] == [a]
    await asyncio.sleep(0.4)  # until it is due
    held = await driver.reserve([queue], 2, lease=30)
    assert [h.id for h in held] == [late, b]
