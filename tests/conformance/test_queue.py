"""The conformance suite: the same behaviour on every driver (memory, redis, sqlite, mysql)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.errors import JobTimeoutError, PayloadTooLargeError, SerializationError
from core.queue.drivers.base import FailedJob, OutgoingJob
from core.queue.payload import new_job_id
from core.queue.queue_manager import QueueManager
from core.worker.options import StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend
from tests.jobs import (
    FlakyJob,
    RecordJob,
    RetryJob,
    SleepJob,
    SyncHandleJob,
    events,
)

pytestmark = pytest.mark.timeout(60)


def queue_of(manager: QueueManager) -> str:
    return manager.settings.queue_default


async def work(manager: QueueManager, **options: Any) -> Worker:
    """Run an in-process worker on the default queue until its stop condition."""
    options.setdefault("queues", (queue_of(manager),))
    options.setdefault("sleep", 0.05)
    worker = Worker(manager, WorkerOptions(**options))
    await worker.run()
    return worker


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


async def test_jobs_start_in_dispatch_order(manager: QueueManager, log: str) -> None:
    for n in range(20):
        await manager.push(RecordJob(log, n))
    await work(manager, max_jobs=20)
    assert [e["n"] for e in events(log, "run")] == list(range(20))


async def test_bulk_keeps_order_and_size_counts_every_job(manager: QueueManager, log: str) -> None:
    ids = await manager.bulk([RecordJob(log, n) for n in range(50)])
    assert len(set(ids)) == 50
    await manager.later(60, RecordJob(log, 99))
    assert await manager.size() == 51
    [stats] = await manager.stats(queue_of(manager))
    assert (stats.pending, stats.delayed, stats.reserved, stats.failed) == (50, 1, 0, 0)
    await work(manager, max_jobs=50)
    assert [e["n"] for e in events(log, "run")] == list(range(50))
    assert [e["id"] for e in events(log, "run")] == ids
    assert await manager.size() == 1


async def test_attributes_round_trip_without_calling_the_constructor(
    manager: QueueManager, log: str
) -> None:
    data = {
        "text": "héllo ✓",
        "int": 2**53,
        "float": 1.5,
        "flag": True,
        "none": None,
        "items": [1, "two", {"three": [3.0]}],
    }
    await manager.push(RecordJob(log, 7, **data))
    calls = RecordJob.init_calls
    await work(manager, max_jobs=1)
    [run] = events(log, "run")
    assert run["data"] == data
    assert run["n"] == 7
    assert run["attempts"] == 1
    assert RecordJob.init_calls == calls


async def test_later_runs_neither_early_nor_late(manager: QueueManager, log: str) -> None:
    sent = time.time()
    await manager.later(0.6, RecordJob(log, 1))
    await manager.later("300ms", RecordJob(log, 2))
    await work(manager, max_jobs=2)
    runs = {e["n"]: e["t"] - sent for e in events(log, "run")}
    assert 0.6 <= runs[1] < 0.6 + 0.5
    assert 0.3 <= runs[2] < 0.3 + 0.5


async def test_retry_after_gaps_then_success(manager: QueueManager, log: str) -> None:
    job = FlakyJob(log, succeed_on=3)
    job.retry_after = [0.2, 0.4]
    await manager.push(job)
    await work(manager, max_jobs=3)
    tries = events(log, "try")
    assert [t["attempts"] for t in tries] == [1, 2, 3]
    assert tries[1]["t"] - tries[0]["t"] >= 0.2
    assert tries[2]["t"] - tries[1]["t"] >= 0.4
    assert events(log, "done") and not events(log, "failed")
    assert await manager.size() == 0


async def test_failed_is_called_once_after_the_last_try_and_recorded(
    manager: QueueManager, log: str
) -> None:
    job_id = await manager.push(FlakyJob(log, message="printer on fire"))
    await work(manager, max_jobs=3)
    assert [t["attempts"] for t in events(log, "try")] == [1, 2, 3]
    [failed] = events(log, "failed")
    assert failed["error"] == "ValueError: printer on fire on try 3"
    store = await manager.failed_store()
    record = await store.get(job_id)
    assert record is not None
    assert record.queue == queue_of(manager)
    assert record.connection == manager.connection_name()
    assert "ValueError: printer on fire on try 3" in record.exception
    assert "Traceback" in record.exception
    assert record.job_class == "tests.jobs:FlakyJob"
    assert await manager.size() == 0
    [stats] = await manager.stats(queue_of(manager))
    assert stats.failed == 1


async def test_retry_request_is_not_a_failure(manager: QueueManager, log: str) -> None:
    await manager.push(RetryJob(log, succeed_on=2, delay=0.2))
    await work(manager, max_jobs=2)
    tries = events(log, "try")
    assert [t["attempts"] for t in tries] == [1, 2]
    assert tries[1]["t"] - tries[0]["t"] >= 0.2
    assert events(log, "done") and not events(log, "failed")


async def test_timeout_cancels_the_job(manager: QueueManager, log: str) -> None:
    job = SleepJob(log, seconds=30)
    job.timeout = 0.3
    job_id = await manager.push(job)
    started = time.monotonic()
    await work(manager, max_jobs=1)
    assert time.monotonic() - started < 10
    assert events(log, "start") and not events(log, "end")
    [failed] = events(log, "failed")
    assert failed["error"].startswith("JobTimeoutError")
    record = await (await manager.failed_store()).get(job_id)
    assert record is not None and "JobTimeoutError" in record.exception
    assert issubclass(JobTimeoutError, TimeoutError)


async def test_sync_handle_runs_off_the_event_loop(manager: QueueManager, log: str) -> None:
    await manager.push(SyncHandleJob(log))
    await work(manager, max_jobs=1)
    [run] = events(log, "run")
    assert run["thread"] != "MainThread"


async def test_concurrency_runs_jobs_at_once(manager: QueueManager, log: str) -> None:
    await manager.bulk([SleepJob(log, 0.5, n) for n in range(4)])
    started = time.monotonic()
    await work(manager, max_jobs=4, concurrency=4)
    assert time.monotonic() - started < 1.9  # four 0.5 s jobs, not one after another
    assert len(events(log, "end")) == 4


async def test_earlier_queue_is_taken_first(manager: QueueManager, log: str) -> None:
    low, high = f"{queue_of(manager)}-low", f"{queue_of(manager)}-high"
    await manager.bulk([RecordJob(log, n) for n in range(3)], queue=low)
    await manager.bulk([RecordJob(log, n) for n in range(10, 13)], queue=high)
    await work(manager, max_jobs=6, queues=(high, low))
    assert [e["n"] for e in events(log, "run")] == [10, 11, 12, 0, 1, 2]


async def test_bad_payloads_go_to_the_failed_store_and_the_worker_goes_on(
    manager: QueueManager, log: str
) -> None:
    driver = await manager.connection()
    name = queue_of(manager)
    bad = {
        "garbage": b"{not json",
        "unknown": b'{"job": "tests.jobs:NoSuchJob", "data": {}}',
        "outside": b'{"job": "os:system", "data": {}}',
        "not-a-job": b'{"job": "tests.jobs:NotAJob", "data": {}}',
    }
    ids = {reason: new_job_id() for reason in bad}
    await driver.push([OutgoingJob(ids[r], name, raw) for r, raw in bad.items()])
    await manager.push(RecordJob(log, 1))
    await work(manager, max_jobs=5)
    assert [e["n"] for e in events(log, "run")] == [1]
    store = await manager.failed_store()
    reasons = {r: (await store.get(ids[r])) for r in bad}
    assert all(record is not None for record in reasons.values())
    assert "not valid JSON" in reasons["garbage"].exception  # type: ignore[union-attr]
    assert "cannot be imported" in reasons["unknown"].exception  # type: ignore[union-attr]
    assert "outside the allowed modules" in reasons["outside"].exception  # type: ignore[union-attr]
    assert "not a subclass" in reasons["not-a-job"].exception  # type: ignore[union-attr]
    assert await manager.size() == 0


async def test_unstorable_attribute_is_refused_and_nothing_is_queued(
    manager: QueueManager, log: str
) -> None:
    job = RecordJob(log)
    job.when = datetime.now(UTC)  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match=r"RecordJob\.when"):
        await manager.push(job)
    with pytest.raises(SerializationError, match=r"RecordJob\.when"):
        await manager.bulk([RecordJob(log), job])
    big = RecordJob(log, blob="x" * (manager.settings.queue_max_payload_bytes + 1))
    with pytest.raises(PayloadTooLargeError, match="over the limit"):
        await manager.push(big)
    assert await manager.size() == 0


async def test_expired_lease_returns_the_job_to_the_front(manager: QueueManager, log: str) -> None:
    driver = await manager.connection()
    name = queue_of(manager)
    first = await manager.push(RecordJob(log, 1))
    await manager.push(RecordJob(log, 2))
    [held] = await driver.reserve([name], 1, lease=0.2)  # a worker that then dies
    assert held.id == first and held.attempts == 1
    assert await driver.reserve([name], 0, lease=0.2) == []
    await asyncio.sleep(0.3)  # let the lease run out: the thing under test is time itself
    await work(manager, max_jobs=2)
    runs = events(log, "run")
    assert [(e["n"], e["attempts"]) for e in runs] == [(1, 2), (2, 1)]


async def test_job_lost_on_its_last_try_fails_for_good(manager: QueueManager, log: str) -> None:
    driver = await manager.connection()
    job = FlakyJob(log, succeed_on=1)
    job.max_tries = 1
    job_id = await manager.push(job)
    await driver.reserve([queue_of(manager)], 1, lease=0.1)
    await asyncio.sleep(0.2)  # the lease must expire
    await work(manager, max_jobs=1)
    assert not events(log, "try")
    [failed] = events(log, "failed")
    assert failed["error"].startswith("WorkerLostError")
    record = await (await manager.failed_store()).get(job_id)
    assert record is not None and "WorkerLostError" in record.exception


async def test_stale_reservation_cannot_ack_or_release(manager: QueueManager, log: str) -> None:
    driver = await manager.connection()
    name = queue_of(manager)
    await manager.push(RecordJob(log, 1))
    [old] = await driver.reserve([name], 1, lease=0.1)
    await asyncio.sleep(0.2)  # the lease must expire
    [new] = await driver.reserve([name], 1, lease=30)
    assert new.id == old.id and new.attempts == 2
    await driver.ack([old])
    await driver.release(old, 0)
    await driver.extend([(old, 0.01)])
    [stats] = await manager.stats(name)
    assert (stats.pending, stats.reserved) == (0, 1)
    await driver.ack([new])
    assert await manager.size(name) == 0


async def test_refunded_release_goes_first_without_spending_a_try(
    manager: QueueManager, log: str
) -> None:
    driver = await manager.connection()
    name = queue_of(manager)
    first = await manager.push(RecordJob(log, 1))
    await manager.push(RecordJob(log, 2))
    [held] = await driver.reserve([name], 1, lease=30)
    await driver.release(held, refund=True)
    [again] = await driver.reserve([name], 1, lease=30)
    assert (again.id, again.attempts) == (first, 1)


async def test_extend_keeps_a_lease_alive(manager: QueueManager, log: str) -> None:
    driver = await manager.connection()
    name = queue_of(manager)
    await manager.push(RecordJob(log, 1))
    [held] = await driver.reserve([name], 1, lease=0.3)
    await driver.extend([(held, 30)])
    await asyncio.sleep(0.4)  # past the first lease
    assert await driver.reserve([name], 1, lease=30) == []


async def test_a_due_job_goes_to_one_of_many_competing_workers(
    manager: QueueManager, log: str
) -> None:
    await manager.later(0.3, RecordJob(log, 1))
    workers = [
        Worker(manager, WorkerOptions(queues=(queue_of(manager),), sleep=0.05, max_time=1.5))
        for _ in range(8)
    ]
    await asyncio.gather(*(w.run() for w in workers))
    assert len(events(log, "run")) == 1


async def test_max_jobs_and_stop_when_empty(manager: QueueManager, log: str) -> None:
    await manager.bulk([RecordJob(log, n) for n in range(5)])
    worker = Worker(manager, WorkerOptions(queues=(queue_of(manager),), max_jobs=2))
    assert await worker.run() is StopReason.MAX_JOBS
    assert len(events(log, "run")) == 2
    worker = Worker(
        manager, WorkerOptions(queues=(queue_of(manager),), stop_when_empty=True, concurrency=2)
    )
    assert await worker.run() is StopReason.EMPTY
    assert len(events(log, "run")) == 5


async def test_idle_worker_starts_a_new_job_promptly(manager: QueueManager, log: str) -> None:
    worker = Worker(manager, WorkerOptions(queues=(queue_of(manager),), sleep=5.0, max_jobs=1))
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)  # let the worker go idle: this is the situation under test
    sent = time.time()
    await manager.push(RecordJob(log, 1))
    await asyncio.wait_for(running, 10)
    [run] = events(log, "run")
    # Backends that block wake at once; the others within their poll interval.
    bound = 0.5 if (await manager.connection()).blocks else 5.5
    assert run["t"] - sent < bound


async def test_failed_store_operations(manager: QueueManager, backend: Backend) -> None:
    store = await manager.failed_store()
    name = queue_of(manager)
    now = datetime.now(UTC)
    records = [
        FailedJob(
            f"id{i}",
            manager.connection_name(),
            name if i % 2 else "other",
            "{}",
            f"E{i}",
            now - timedelta(days=i),
        )
        for i in range(4)
    ]
    for record in records:
        await store.add(record)
    await store.add(records[0])  # the same id again replaces, not duplicates
    assert await store.count() == 4
    assert await store.count(name) == 2
    assert [r.id for r in await store.list()] == ["id0", "id1", "id2", "id3"]
    assert [r.id for r in await store.list(name)] == ["id1", "id3"]
    assert [r.id for r in await store.list(limit=2, offset=1)] == ["id1", "id2"]
    got = await store.get("id2")
    assert got is not None and got.exception == "E2" and got.queue == "other"
    assert abs((got.failed_at - records[2].failed_at).total_seconds()) < 0.01
    assert await store.forget("id2") is True
    assert await store.forget("id2") is False
    assert await store.get("id2") is None
    assert await store.prune(now - timedelta(hours=36)) == 1  # id3, three days old
    assert await store.flush(name) == 1
    assert await store.flush() == 1
    assert await store.count() == 0


async def test_clear_removes_waiting_jobs(manager: QueueManager, log: str) -> None:
    await manager.bulk([RecordJob(log, n) for n in range(3)])
    await manager.later(60, RecordJob(log, 9))
    driver = await manager.connection()
    assert await driver.clear(queue_of(manager)) == 4
    assert await manager.size() == 0
    assert queue_of(manager) in await driver.queues()


async def test_pushing_a_stored_id_again_starts_it_afresh(manager: QueueManager, log: str) -> None:
    """`queue:retry` re-pushes a failed job's id; a late ack of the old try must not eat it."""
    driver = await manager.connection()
    name = queue_of(manager)
    job_id = await manager.push(RecordJob(log, 1))
    [old] = await driver.reserve([name], 1, lease=30)
    await driver.push([OutgoingJob(job_id, name, old.payload)])
    await driver.ack([old])  # the late ack of the first try
    [stats] = await manager.stats(name)
    assert (stats.pending, stats.reserved) == (1, 0)
    [again] = await driver.reserve([name], 1, lease=30)
    assert (again.id, again.attempts) == (job_id, 1)


async def test_prefetched_jobs_go_back_unspent_and_in_order_on_stop(
    manager: QueueManager, log: str
) -> None:
    await manager.bulk([SleepJob(log, 0.5, n) for n in range(1, 4)])
    worker = await work(manager, concurrency=1, prefetch=2, max_time=0.2, grace=5)
    assert worker.counts.done == 1  # the running job finished within the grace period
    assert [e["n"] for e in events(log, "start")] == [1]
    driver = await manager.connection()
    back = await driver.reserve([queue_of(manager)], 5, lease=30)
    assert [
        (job.attempts, job.payload.count(b'"n":2'), job.payload.count(b'"n":3')) for job in back
    ] == [
        (1, 1, 0),
        (1, 0, 1),
    ]
