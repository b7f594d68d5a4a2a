"""Handles, job ids, duplicates, cancel and stats through the manager, on every driver.

The driver plays the worker here (`reserve`, `ack` with an `Outcome`), so that each test sees the
manager's and the handle's side of a job's lifecycle exactly; the worker's side (running the job
and writing its outcome) is in tests/test_worker_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Any

import orjson
import pytest

from core.errors import (
    DuplicateJobError,
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobNotFoundError,
    SerializationError,
)
from core.events import EventKind, JobEvent, events
from core.hooks import hooks
from core.queue.drivers import Outcome, ReservedJob
from core.queue.handle import JobHandle
from core.queue.payload import JobLoader
from core.queue.queue_manager import QueueManager, dispatch, queue
from core.status import Status
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(60)


async def take(manager: QueueManager, limit: int = 10) -> list[ReservedJob]:
    driver = await manager.connection()
    return await driver.reserve([manager.settings.queue_default], limit, 30, worker="w-test")


async def finish(manager: QueueManager, job: ReservedJob, outcome: Outcome) -> None:
    job.outcome = outcome
    await (await manager.connection()).ack([job])


def n_of(job: ReservedJob) -> int:
    return int(orjson.loads(job.payload)["data"]["n"])


# -- the handle -----------------------------------------------------------------------------


async def test_dispatch_returns_a_handle_that_is_the_id(manager: QueueManager) -> None:
    handle = await dispatch(RecordJob("log"))
    assert isinstance(handle, JobHandle) and isinstance(handle, str)
    assert len(handle) == 32 and handle == handle.id and type(handle.id) is str
    assert {handle.id: 1}[handle] == 1 and json.dumps([handle]) == f'["{handle.id}"]'
    assert (handle.queue, handle.connection) == (
        manager.settings.queue_default,
        manager.driver().name,
    )
    copy = pickle.loads(pickle.dumps(handle))
    assert copy == handle and (copy.queue, copy.connection) == (handle.queue, handle.connection)
    assert (await copy.status()).status == Status.QUEUED  # usable where it was unpickled
    handles = await manager.bulk([RecordJob("log", n=1), RecordJob("log", n=2)])
    later = await manager.later(60, RecordJob("log", n=3))
    assert all(isinstance(h, JobHandle) for h in [*handles, later])
    assert (await later.status()).status == Status.SCHEDULED


async def test_status_and_result_follow_the_job(manager: QueueManager) -> None:
    handle = await manager.push(RecordJob("log", n=7))
    record = await handle.status()
    assert (record.status, record.attempts, record.job) == (
        Status.QUEUED,
        0,
        "tests.jobs:RecordJob",
    )
    [reserved] = await take(manager)
    record = await handle.status()
    assert (record.status, record.attempts, record.worker) == (Status.RUNNING, 1, "w-test")
    waiter = asyncio.create_task(handle.result(timeout=20))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    acked = time.monotonic()
    await finish(manager, reserved, Outcome(Status.SUCCEEDED, keep=60, result=b'{"sum": 7}'))
    assert await waiter == {"sum": 7}
    assert time.monotonic() - acked < 1.5  # woken by the end, not by a slow poll
    assert (await handle.status()).status == Status.SUCCEEDED
    assert await handle.result() == {"sum": 7}  # again, at once


async def test_result_raises_the_typed_error_of_each_end(manager: QueueManager) -> None:
    failed = await manager.push(RecordJob("log", n=1))
    [reserved] = await take(manager)
    await finish(
        manager,
        reserved,
        Outcome(Status.FAILED, keep=60, error="ValueError: bad input", traceback="Traceback …"),
    )
    with pytest.raises(JobFailedError, match="failed: ValueError: bad input") as caught:
        await failed.result()
    assert type(caught.value) is JobFailedError
    assert (caught.value.job_id, caught.value.error) == (failed.id, "ValueError: bad input")
    assert caught.value.traceback == "Traceback …"

    waiting = await manager.push(RecordJob("log", n=2))
    assert await waiting.cancel() is True
    with pytest.raises(JobCancelledError, match="was cancelled"):
        await waiting.result(timeout=5)
    assert (await waiting.status()).status == Status.CANCELLED
    assert await waiting.cancel() is False  # ended: nothing to cancel

    expiring = RecordJob("log", n=3)
    expiring.ttl = 0.2
    expired = await manager.push(expiring)
    await asyncio.sleep(0.4)  # let the ttl pass: time itself is what is tested
    # Never run: the reserve that meets it hands it back as expired only (#14).
    assert [(job.id, job.expired) for job in await take(manager)] == [(expired.id, True)]
    with pytest.raises(JobExpiredError, match="expired before it started"):
        await expired.result(timeout=5)


async def test_result_times_out_with_the_built_in_error(manager: QueueManager) -> None:
    handle = await manager.push(RecordJob("log"))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"has not ended within 0\.3s") as caught:
        await handle.result(timeout=0.3)
    assert not isinstance(caught.value, JobFailedError)
    assert 0.25 < time.monotonic() - started < 2.5
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0)


async def test_an_unknown_id_is_not_found(manager: QueueManager) -> None:
    handle = manager.job("no-such-job")
    with pytest.raises(JobNotFoundError, match="no job 'no-such-job'"):
        await handle.status()
    with pytest.raises(JobNotFoundError):
        await handle.result(timeout=1)
    assert await handle.cancel() is False
    assert await manager.cancel("no-such-job") is False
    with pytest.raises(LookupError):  # JobNotFoundError is also a LookupError
        await queue.job("no-such-job").status()


async def test_a_handle_is_rebuilt_from_an_id_anywhere(manager: QueueManager) -> None:
    original = await manager.push(RecordJob("log", n=4))
    rebuilt = queue.job(original.id)  # no queue given: the driver finds it
    assert rebuilt == original and rebuilt.queue is None
    assert (await rebuilt.status()).status == Status.QUEUED
    assert rebuilt.queue == manager.settings.queue_default  # learnt from the record
    hinted = manager.job(original.id, queue=manager.settings.queue_default)
    assert (await hinted.status()).id == original.id
    assert await queue.cancel(original.id) is True
    assert (await original.status()).status == Status.CANCELLED
    for bad in ("", "has space", "x" * 191, "tab\there"):
        with pytest.raises(ValueError, match="invalid job id"):
            manager.job(bad)


# -- ids and duplicates ---------------------------------------------------------------------


async def test_a_job_id_set_on_the_job_or_given_to_push_is_used(manager: QueueManager) -> None:
    job = RecordJob("log", n=1)
    job.job_id = "order-42:confirm"
    handle = await manager.push(job)
    assert handle == "order-42:confirm" == job.job_id
    other = RecordJob("log", n=2)
    other.job_id = "ignored"
    assert await manager.push(other, job_id="device/7+a=b@x") == "device/7+a=b@x"
    assert other.job_id == "device/7+a=b@x"  # the kwarg wins, and the job learns its id
    assert (await manager.job("device/7+a=b@x").status()).status == Status.QUEUED
    assert await manager.job("ignored").cancel() is False  # never stored
    long_id = "i" * 190
    assert await manager.push(RecordJob("log", n=3), job_id=long_id) == long_id


async def test_a_bad_job_id_is_refused_naming_where_it_came_from(manager: QueueManager) -> None:
    job = RecordJob("log")
    job.job_id = "white space"
    with pytest.raises(SerializationError, match=r"RecordJob\.job_id must be 1 to 190"):
        await manager.push(job)
    with pytest.raises(SerializationError, match=r"push\(job_id=...\) must be 1 to 190"):
        await manager.push(RecordJob("log"), job_id="x" * 191)
    with pytest.raises(SerializationError, match=r"on_duplicate=\.\.\.\) must be"):
        await manager.push(RecordJob("log"), on_duplicate="skip")  # type: ignore[arg-type]
    assert await manager.size() == 0


async def test_a_waiting_id_is_rejected_or_kept(manager: QueueManager) -> None:
    first = await manager.push(RecordJob("log", n=1), job_id="nightly")
    with pytest.raises(DuplicateJobError, match="job id 'nightly' is taken") as caught:
        await manager.push(RecordJob("log", n=2), job_id="nightly")
    assert caught.value.existing == "nightly"
    kept_job = RecordJob("log", n=3)
    kept = await manager.push(kept_job, job_id="nightly", on_duplicate="keep")
    assert kept == first and kept_job.job_id == "nightly"
    [reserved] = await take(manager)
    assert n_of(reserved) == 1  # the first one's data, stored once
    # Running: still taken.
    with pytest.raises(DuplicateJobError):
        await manager.push(RecordJob("log", n=4), job_id="nightly")
    await finish(manager, reserved, Outcome(Status.SUCCEEDED, keep=60))
    # Ended: the id is free again.
    assert await manager.push(RecordJob("log", n=5), job_id="nightly") == "nightly"


async def test_dispatching_one_instance_twice_makes_two_jobs(manager: QueueManager) -> None:
    job = RecordJob("log")
    first = await manager.push(job)
    second = await manager.push(job)  # wave-1 code does this: a generated id is not reused
    assert first != second and job.job_id == second
    # A job a worker rebuilt, dispatching itself again from handle(): a new job too.
    driver = await manager.connection()
    [reserved] = await take(manager, limit=1)
    loaded = JobLoader(["tests."]).load(reserved.payload, job_id=reserved.id, attempts=1).job
    again = await manager.push(loaded)
    assert again != reserved.id and loaded.job_id == again
    await driver.ack([reserved])
    assert await manager.size() == 2


async def test_unique_key_replace_keeps_the_holder_id(manager: QueueManager) -> None:
    def reading(n: int) -> RecordJob:
        job = RecordJob("log", n=n)
        job.unique_key = "device-9"
        job.on_duplicate = "replace"
        return job

    holder = await manager.push(reading(1))
    newer = reading(2)
    replaced = await manager.push(newer)
    assert replaced == holder and newer.job_id == holder.id
    rejecting = reading(3)
    rejecting.on_duplicate = "reject"
    with pytest.raises(DuplicateJobError, match="unique_key 'device-9' is held by job") as caught:
        await manager.push(rejecting)
    assert caught.value.existing == holder.id
    [reserved] = await take(manager)
    assert (reserved.id, n_of(reserved)) == (holder.id, 2)  # the latest data won


async def test_bulk_stores_the_others_and_then_names_the_duplicates(
    manager: QueueManager,
) -> None:
    await manager.push(RecordJob("log", n=0), job_id="taken")
    jobs = [RecordJob("log", n=n) for n in range(1, 5)]
    jobs[1].job_id = "taken"
    with pytest.raises(DuplicateJobError, match=r"1 of 4 jobs not queued.*'taken'") as caught:
        await manager.bulk(jobs)
    assert caught.value.existing == "taken"
    assert await manager.size() == 4  # the first job and the three others
    stored = {job.job_id for job in jobs} - {"taken"}
    assert len(stored) == 3
    for job_id in stored:
        assert (await manager.job(job_id).status()).status == Status.QUEUED


async def test_at_front_puts_the_job_first(manager: QueueManager) -> None:
    await manager.push(RecordJob("log", n=1))
    await manager.push(RecordJob("log", n=2))
    await manager.push(RecordJob("log", n=3), at_front=True)
    front = RecordJob("log", n=4)
    front.at_front = True
    await manager.push(front)
    reserved = await take(manager)
    assert [n_of(job) for job in reserved] == [4, 3, 1, 2]
    with pytest.raises(SerializationError, match="at_front"):
        await manager.push(RecordJob("log"), at_front="yes")  # type: ignore[arg-type]


# -- hooks, events, stats -------------------------------------------------------------------


async def test_dispatch_hooks_and_events_for_stored_jobs_only(manager: QueueManager) -> None:
    seen: list[tuple[str, str]] = []
    emitted: list[JobEvent] = []

    @hooks.on_dispatch
    async def audit(job: Any, job_id: str) -> None:
        seen.append((type(job).__name__, job_id))

    stop = events.subscribe(emitted.append)
    try:
        created = await manager.push(RecordJob("log"), job_id="hooked")
        await manager.push(RecordJob("log"), job_id="hooked", on_duplicate="keep")
        with pytest.raises(DuplicateJobError):
            await manager.push(RecordJob("log"), job_id="hooked")
        replaced = RecordJob("log")
        replaced.unique_key = "k"
        await manager.push(replaced)
        replaced.on_duplicate = "replace"
        await manager.push(replaced)
    finally:
        stop()
        hooks.clear()
    # Created "hooked"; kept and rejected: no hook; created then replaced: the holder's id.
    assert seen == [("RecordJob", "hooked"), *[("RecordJob", replaced.job_id)] * 2]
    assert [e.kind for e in emitted] == [EventKind.DISPATCHED] * 3
    first = emitted[0]
    assert (first.job_id, first.queue, first.connection, first.job) == (
        created.id,
        manager.settings.queue_default,
        manager.driver().name,
        "tests.jobs:RecordJob",
    )


async def test_stats_count_how_jobs_ended(manager: QueueManager) -> None:
    for n in range(3):
        await manager.push(RecordJob("log", n=n))
    one, two, three = await take(manager)
    await finish(manager, one, Outcome(Status.SUCCEEDED, keep=0))
    await finish(manager, two, Outcome(Status.SUCCEEDED, keep=60))
    await finish(manager, three, Outcome(Status.FAILED, keep=60, error="boom"))
    cancelled = await manager.push(RecordJob("log"))
    await cancelled.cancel()
    [stats] = await manager.stats(manager.settings.queue_default)
    assert (stats.succeeded, stats.failed_recent, stats.cancelled, stats.expired) == (2, 1, 1, 0)
    assert stats.pending == 0
    assert await manager.prune_records() >= 0
