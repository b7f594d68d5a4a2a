"""The worker's side of the job lifecycle: one try's order of hooks, middleware, `handle`,
`succeeded`/`failed` (the same on a worker and on `sync`), results kept with the
acknowledgement, events, cancel of running jobs (in process on every driver, and in real worker
processes on each server), `result()` across processes, and pruning."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import JobCancelledError, JobFailedError, JobNotFoundError
from core.events import EventKind, JobEvent, events
from core.hooks import hooks
from core.job import Job
from core.queue.handle import JobHandle
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.worker.options import ExitCode, StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, make_settings
from tests.jobs import FlakyJob
from tests.jobs import events as logged
from tests.lifecycle_jobs import CancelMeJob, OrderJob, ResultJob, ThreadSleepJob
from tests.processes import WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


@pytest.fixture
def heard() -> Iterator[list[JobEvent]]:
    """Every lifecycle event emitted during the test."""
    got: list[JobEvent] = []
    stop = events.subscribe(got.append)
    try:
        yield got
    finally:
        stop()


@pytest.fixture
def app_hooks(log: str) -> Iterator[None]:
    """Application hooks that record each call in the test's log."""
    from tests.jobs import record

    def before(job: Job) -> None:
        record(log, event="before_run", attempts=job.attempts)

    async def after(job: Job, status: Status, value: Any) -> None:
        shown = value if not isinstance(value, BaseException) else type(value).__name__
        record(log, event=f"after_run {status}", attempts=job.attempts, value=shown)

    def failure(job: Job, exception: BaseException) -> None:
        record(log, event="on_failure", attempts=job.attempts)

    hooks.before_run(before)
    hooks.after_run(after)
    hooks.on_failure(failure)
    try:
        yield
    finally:
        hooks.clear()


async def wait_for_event(heard: list[JobEvent], kind: EventKind, count: int = 1) -> None:
    """Wait until `count` events of `kind` were emitted (listeners run on this loop)."""
    arrived = asyncio.Event()

    def check(_: JobEvent | None = None) -> None:
        if sum(1 for e in heard if e.kind == kind) >= count:
            arrived.set()

    stop = events.subscribe(check)
    try:
        check()
        await asyncio.wait_for(arrived.wait(), 30)
    finally:
        stop()


@contextlib.asynccontextmanager
async def running(manager: QueueManager, **options: Any) -> AsyncIterator[Worker]:
    """An in-process worker on the default queue, stopped (and waited for) on exit."""
    options.setdefault("queues", (manager.settings.queue_default,))
    options.setdefault("sleep", 0.05)
    options.setdefault("handle_signals", False)
    options.setdefault("grace", 5.0)
    worker = Worker(manager, WorkerOptions(**options))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def work(manager: QueueManager, **options: Any) -> Worker:
    """Run an in-process worker on the default queue until no job is left."""
    options.setdefault("queues", (manager.settings.queue_default,))
    options.setdefault("sleep", 0.05)
    options.setdefault("handle_signals", False)
    options.setdefault("stop_when_empty", True)
    worker = Worker(manager, WorkerOptions(**options))
    await asyncio.wait_for(worker.run(), 30)
    return worker


def steps(log: str) -> list[str]:
    return [f"{e['event']} #{e['attempts']}" for e in logged(log)]


SUCCESS_ORDER = [
    "before_run #1",
    "outer in #1",
    "inner in #1",
    "handle #1",
    "inner out #1",
    "outer out #1",
    "succeeded #1",
    "after_run succeeded #1",
]
RETRY_THEN_FAIL_ORDER = [
    "before_run #1",
    "outer in #1",
    "inner in #1",
    "handle #1",
    "outer out #1",  # inner records only on the way out of a success
    "after_run retrying #1",
    "before_run #2",
    "outer in #2",
    "inner in #2",
    "handle #2",
    "outer out #2",
    "failed #2",
    "on_failure #2",
    "after_run failed #2",
]


# -- the order of one try, on a worker and on `sync` ---------------------------------------


@pytest.mark.parametrize("runner", ["worker", "sync"])
async def test_a_try_runs_hooks_middleware_handle_then_succeeded_then_after_run(
    runner: str, log: str, app_hooks: None
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        if runner == "sync":
            handle = await manager.push(OrderJob(log), connection="sync")
        else:
            handle = await manager.push(OrderJob(log))
            worker = await work(manager)
            assert worker.counts.done == 1
        assert steps(log) == SUCCESS_ORDER
        # The middleware's value is the result: it is what `succeeded()` and the hooks saw.
        assert logged(log, "succeeded")[0]["result"] == {"wrapped": 1}
        assert logged(log, "after_run succeeded")[0]["value"] == {"wrapped": 1}
        assert await handle.result(timeout=5) == {"wrapped": 1}


@pytest.mark.parametrize("runner", ["worker", "sync"])
async def test_a_retried_then_failed_job_runs_failed_then_on_failure_then_after_run(
    runner: str, log: str, app_hooks: None
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        if runner == "sync":
            with pytest.raises(ValueError, match="not yet on try 2"):
                await manager.push(OrderJob(log, succeed_on=3), connection="sync")
            [record] = await (await manager.failed_store("sync")).list()
            handle = manager.job(record.id, "sync")
        else:
            handle = await manager.push(OrderJob(log, succeed_on=3))
            worker = await work(manager)
            assert (worker.counts.retried, worker.counts.failed) == (1, 1)
        assert steps(log) == RETRY_THEN_FAIL_ORDER
        status = await handle.status()
        assert status.status is Status.FAILED
        assert status.attempts == 2
        assert status.error == "ValueError: not yet on try 2"
        assert "not yet on try 2" in status.traceback
        with pytest.raises(JobFailedError, match="not yet on try 2"):
            await handle.result(timeout=5)


async def test_succeeded_that_raises_is_logged_and_the_job_still_succeeded(
    log: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        handle = await manager.push(OrderJob(log, succeeded_raises=True))
        with caplog.at_level(logging.ERROR, logger="topiq.worker"):
            worker = await work(manager)
        assert (worker.counts.done, worker.counts.retried, worker.counts.failed) == (1, 0, 0)
        assert "succeeded() raised (the job still succeeded)" in caplog.text
        assert "succeeded() broke" in caplog.text
        assert await handle.result(timeout=5) == {"wrapped": 1}
        assert len(logged(log, "handle")) == 1  # not run again


# -- results, records, errors -----------------------------------------------------------


async def test_results_are_kept_with_the_acknowledgement(manager: QueueManager) -> None:
    kept = await manager.push(ResultJob("json"))
    other = ResultJob("set")
    not_json = await manager.push(other)
    big = await manager.push(ResultJob("big", size=manager.settings.queue_max_payload_bytes))
    nothing = ResultJob("json")
    nothing.result_ttl = 0
    gone = await manager.push(nothing)
    worker = await work(manager, concurrency=2)
    assert worker.counts.done == 4
    assert await kept.result(timeout=5) == {"answer": 42, "items": [1, "two", None]}
    record = await kept.status()
    assert record.status is Status.SUCCEEDED and record.worker == worker.id
    assert record.attempts == 1 and record.started_at is not None and record.ended_at is not None
    # Work done, result not kept: succeeded, with the reason where the result would be.
    for handle, reason in ((not_json, "of type set is not JSON"), (big, "QUEUE_MAX_PAYLOAD_BYTES")):
        record = await handle.status()
        assert record.status is Status.SUCCEEDED
        assert record.result is None and await handle.result(timeout=5) is None
        assert reason in record.error and "not kept" in record.error
    with pytest.raises(JobNotFoundError):
        await gone.status()  # result_ttl = 0: nothing kept


async def test_a_failed_try_is_released_with_its_error(manager: QueueManager, log: str) -> None:
    flaky = FlakyJob(log, message="boom")
    flaky.retry_after = 300
    handle = await manager.push(flaky)
    await work(manager, max_jobs=1)
    record = await handle.status()
    assert record.status is Status.RETRYING
    assert record.error == "ValueError: boom on try 1"
    assert record.attempts == 1


async def test_events_of_each_end_name_the_worker_and_the_duration(
    log: str, heard: list[JobEvent]
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        ok = await manager.push(OrderJob(log))
        bad = await manager.push(OrderJob(log, succeed_on=9))
        worker = await work(manager)
    kinds = {(e.job_id, e.kind) for e in heard}
    assert (ok, EventKind.STARTED) in kinds and (ok, EventKind.SUCCEEDED) in kinds
    assert [e.kind for e in heard if e.job_id == bad] == [
        EventKind.DISPATCHED,
        EventKind.STARTED,
        EventKind.RETRYING,
        EventKind.STARTED,
        EventKind.FAILED,
    ]
    for event in heard:
        if event.kind is EventKind.DISPATCHED:
            continue
        assert event.worker == worker.id
        assert event.job == "tests.lifecycle_jobs:OrderJob"
        assert event.connection == "memory"
        if event.kind is not EventKind.STARTED:
            assert event.duration is not None and 0 <= event.duration < 5
    assert [e.error for e in heard if e.kind is EventKind.FAILED] == [
        "ValueError: not yet on try 2"
    ]


async def test_a_job_handed_back_by_a_stopping_worker_is_announced_as_returned(
    log: str, heard: list[JobEvent]
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        handle = await manager.push(CancelMeJob(log, seconds=60))
        async with running(manager, grace=0.2) as worker:
            await wait_for_event(heard, EventKind.STARTED)
        assert worker.counts.returned == 1
        [returned] = [e for e in heard if e.kind is EventKind.RETURNED]
        assert returned.job_id == handle and returned.worker == worker.id
        assert returned.duration is not None and returned.duration >= 0.2
        assert (await handle.status()).status is Status.QUEUED  # unspent, waiting again


# -- cancel of running jobs ---------------------------------------------------------------


async def test_a_running_job_is_cancelled_within_a_second_and_never_retried(
    manager: QueueManager, log: str, heard: list[JobEvent]
) -> None:
    handle = await manager.push(CancelMeJob(log, seconds=60))
    async with running(manager) as worker:
        await wait_for_event(heard, EventKind.STARTED)
        asked = time.monotonic()
        assert await handle.cancel() is True
        with pytest.raises(JobCancelledError):
            await handle.result(timeout=10)
        took = time.monotonic() - asked
        print(f"cancelled {took:.2f}s after the request ({manager.settings.queue_connection})")
        assert took < 1.5
    assert worker.counts.cancelled == 1
    assert (worker.counts.retried, worker.counts.failed, worker.counts.returned) == (0, 0, 0)
    record = await handle.status()
    assert record.status is Status.CANCELLED and record.attempts == 1
    assert record.worker == worker.id
    assert [e["event"] for e in logged(log)] == ["start", "cancelled"]  # no failed(), no retry
    assert [e.kind for e in heard if e.job_id == handle][-1] is EventKind.CANCELLED
    assert await manager.size() == 0
    assert await handle.cancel() is False  # ended


async def test_a_sync_handle_is_cancelled_once_its_thread_returns(
    log: str, heard: list[JobEvent]
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        handle = await manager.push(ThreadSleepJob(log, seconds=0.6))
        async with running(manager) as worker:
            await wait_for_event(heard, EventKind.STARTED)
            assert await handle.cancel() is True
            with pytest.raises(JobCancelledError):
                await handle.result(timeout=10)
        assert worker.counts.cancelled == 1 and worker.counts.given_up == 0
        # A thread cannot be stopped: its try ran to the end, and the job still counts as
        # cancelled (not retried, not failed).
        assert [e["event"] for e in logged(log)] == ["start", "end"]
        assert (await handle.status()).attempts == 1


async def test_a_job_that_will_not_stop_when_cancelled_is_given_up(
    log: str, heard: list[JobEvent]
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        handle = await manager.push(CancelMeJob(log, seconds=60, swallow=2.5))
        worker = Worker(manager, WorkerOptions(queues=("default",), handle_signals=False))
        task = asyncio.create_task(worker.run())
        await wait_for_event(heard, EventKind.STARTED)
        assert await handle.cancel() is True
        reason = await asyncio.wait_for(task, 10)
        assert reason is StopReason.STUCK  # the process would exit: a fresh one takes over
        assert worker.counts.given_up == 1 and worker.counts.cancelled == 1
        record = await handle.status()
        assert record.status is Status.CANCELLED and record.attempts == 1
        assert "failed" not in [e["event"] for e in logged(log)]
        await wait_for_event(heard, EventKind.CANCELLED)
        # The abandoned try finishes by itself; nothing of it is recorded.
        await asyncio.wait(worker._abandoned, timeout=10)
        assert logged(log, "end")
        assert (await handle.status()).status is Status.CANCELLED


async def test_a_job_cancelled_while_prefetched_never_starts(
    log: str, heard: list[JobEvent]
) -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        first = await manager.push(CancelMeJob(log, seconds=60))
        second = await manager.push(CancelMeJob(log, seconds=60))
        async with running(manager, concurrency=1, prefetch=1) as worker:
            await wait_for_event(heard, EventKind.STARTED)
            assert (await second.status()).status is Status.RUNNING  # reserved, in the buffer
            assert await second.cancel() is True
            with pytest.raises(JobCancelledError):
                await second.result(timeout=5)
            assert await first.cancel() is True
            with pytest.raises(JobCancelledError):
                await first.result(timeout=5)
        assert worker.counts.cancelled == 2
        assert [e["id"] for e in logged(log, "start")] == [first]


# -- pruning ------------------------------------------------------------------------------


async def test_workers_prune_records_in_the_background(manager: QueueManager) -> None:
    driver = await manager.connection()
    calls: list[float] = []
    thrice = asyncio.Event()
    original: Callable[[], Any] = driver.prune_records

    async def counted() -> int:
        calls.append(time.monotonic())
        if len(calls) >= 3:
            thrice.set()
        return int(await original())

    driver.prune_records = counted  # type: ignore[method-assign]
    worker = Worker(manager, WorkerOptions(queues=("default",), handle_signals=False))
    assert worker._prune_every == 60.0  # at most once a minute
    worker._prune_every = 0.2
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(thrice.wait(), 10)
    worker.stop()
    assert await asyncio.wait_for(task, 10) is StopReason.SIGNAL
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.19 for gap in gaps), gaps


# -- real worker processes ----------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_running_job_in_a_worker_process_is_cancelled_within_a_second(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(["--concurrency", "4"], server_backend.env(), tmp_path / "w.log")
    try:
        wait_until(lambda: "starting:" in worker.output, 60, "the worker to start")

        async def dispatch() -> JobHandle:
            async with QueueManager(server_backend.settings()) as manager:
                return await manager.push(CancelMeJob(log, seconds=60))

        handle = run(dispatch())
        wait_until(lambda: bool(logged(log, "start")), 30, "the job to start")

        async def cancel() -> tuple[float, Any]:
            async with QueueManager(server_backend.settings()) as manager:
                job = manager.job(handle, queue=handle.queue)
                asked = time.monotonic()
                assert await job.cancel() is True
                with pytest.raises(JobCancelledError):
                    await job.result(timeout=10)
                return time.monotonic() - asked, await job.status()

        took, record = run(cancel())
        print(f"{server_backend.kind}: cancelled {took:.2f}s after the request")
        assert took < 1.5
        assert record.status is Status.CANCELLED and record.attempts == 1
        assert record.worker.split(":")[1] == str(worker.proc.pid)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == ExitCode.OK, worker.output
    finally:
        worker.stop()
    assert [e["event"] for e in logged(log)] == ["start", "cancelled"]  # no failed(), no retry
    assert "cancelled on request" in worker.output


@pytest.mark.process
@pytest.mark.timeout(120)
def test_result_across_processes(server_backend: Backend, log: str, tmp_path: Path) -> None:
    worker = WorkerProcess([], server_backend.env(), tmp_path / "w.log")
    try:

        async def go() -> tuple[Any, Any, Any]:
            async with QueueManager(server_backend.settings()) as manager:
                ok = await manager.push(OrderJob(log))
                bad = await manager.push(OrderJob(log, succeed_on=5))
                value = await manager.job(ok).result(timeout=60)  # rebuilt from the id alone
                with pytest.raises(JobFailedError) as failed:
                    await bad.result(timeout=60)
                return value, failed.value, await ok.status()

        value, failed, record = run(go())
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == ExitCode.OK, worker.output
    finally:
        worker.stop()
    assert value == {"wrapped": 1}
    assert failed.error == "ValueError: not yet on try 2"
    assert "not yet on try 2" in failed.traceback
    assert record.status is Status.SUCCEEDED and record.attempts == 1
    assert record.worker.split(":")[1] == str(worker.proc.pid)
    assert record.started_at is not None and record.ended_at >= record.started_at
