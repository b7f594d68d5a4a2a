"""RQ's callbacks and description/meta on the worker side (issue #16): `on_success(job,
connection, result)` inside the try's outcome (its failure or timeout fails the try),
`on_failure(job, connection, type, value, traceback)` once on final failure, `on_stopped(job,
connection)` when a running job is cancelled; `connection` is the queue connection's name. Jobs
with a description or meta carry them in every record they end with (`Outcome.info`)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from core.errors import JobFailedError, JobTimeoutError
from core.hooks import hooks
from core.job import Job
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.worker.options import StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, make_settings
from tests.jobs import events
from tests.processes import wait_until, workers
from tests.seed_jobs_b import CallbackJob, callbacks

pytestmark = pytest.mark.timeout(120)

SUCCESS = "tests.seed_jobs_b.on_success"
FAILURE = "tests.seed_jobs_b.on_failure"
STOPPED = "tests.seed_jobs_b.on_stopped"


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


def kinds(log: str) -> list[str]:
    return [e["event"] for e in events(log)]


async def work(manager: QueueManager, queue: str) -> Worker:
    worker = Worker(
        manager,
        WorkerOptions(queues=(queue,), sleep=0.02, stop_when_empty=True, handle_signals=False),
    )
    assert await asyncio.wait_for(worker.run(), 60) is StopReason.EMPTY
    return worker


async def cancel_once_started(manager: QueueManager, handle: Any) -> None:
    """Run an in-process worker on "rq"; cancel the job once its try has started."""
    started = asyncio.Event()
    hooks.before_run(lambda job: started.set())
    try:
        worker = asyncio.create_task(work(manager, "rq"))
        await asyncio.wait_for(started.wait(), 30)
        assert await handle.cancel()
        await asyncio.wait_for(worker, 30)
    finally:
        hooks.clear()


@pytest.fixture(params=["sync", "memory"])
def connection(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def run(manager: QueueManager, connection: str, job: Job, job_id: str) -> Any:
    """Push `job` with id `job_id` and let it end; its record (on `sync`, a job that fails
    raises at the push: its record tells the same)."""
    job.job_id = job_id
    try:
        await manager.push(job)
    except Exception:
        assert connection == "sync"
    if connection == "memory":
        await work(manager, "rq")
    driver = await manager.connection()
    return await driver.job_status(job_id, "rq")


async def test_the_success_callback_gets_the_connection_and_result_before_succeeded(
    log: str, connection: str
) -> None:
    async with QueueManager(Backend(connection, {"queue_default": "rq"}).settings()) as manager:
        job = callbacks(CallbackJob(log, value={"n": 1}), success=SUCCESS, failure=FAILURE)
        record = await run(manager, connection, job, "ok-1")
        assert record.status == Status.SUCCEEDED
        assert record.value() == {"n": 1}
    assert kinds(log) == ["handle", "on_success", "succeeded"]
    [called] = events(log, "on_success")
    assert called["connection"] == connection
    assert called["result"] == {"n": 1}


async def test_a_failing_success_callback_fails_the_job(log: str, connection: str) -> None:
    async with QueueManager(Backend(connection, {"queue_default": "rq"}).settings()) as manager:
        job = callbacks(CallbackJob(log, fail_success=True), success=SUCCESS, failure=FAILURE)
        record = await run(manager, connection, job, "bad-1")
    assert record.status == Status.FAILED
    assert "success callback failed" in record.error
    ended = events(log, "on_failure")
    assert kinds(log) == ["handle", "on_success", "failed", "failure_hook", "on_failure"]
    assert ended[0]["type"] == "RuntimeError"
    assert ended[0]["value"] == "success callback failed"
    assert ended[0]["traceback"] is True


async def test_a_failing_success_callback_is_retried_when_tries_remain(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        job = callbacks(CallbackJob(log, fail_success=True), success=SUCCESS, failure=FAILURE)
        job.max_tries = 2
        with pytest.raises(RuntimeError, match="success callback failed"):
            await manager.push(job)
    assert kinds(log) == [
        "handle",
        "on_success",
        "handle",
        "on_success",
        "failed",
        "failure_hook",
        "on_failure",  # once, on the final failure only
    ]


async def test_a_success_callback_past_its_timeout_fails_the_try(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        job = callbacks(CallbackJob(log), timeout=0.3, success="tests.seed_jobs_b.slow_success")
        with pytest.raises(JobTimeoutError, match=r"success callback .*slow_success.* 0\.3s"):
            await manager.push(job)
    assert kinds(log) == ["handle", "slow_success", "failed", "failure_hook"]


async def test_the_failure_callback_runs_after_failure_hook_and_before_app_hooks(
    log: str,
) -> None:
    seen: list[str] = []

    @hooks.on_failure
    def app_hook(job: Job, exc: BaseException) -> None:
        seen.append(f"app:{[e['event'] for e in events(log)]}")

    try:
        async with QueueManager(make_settings(queue_connection="sync")) as manager:
            job = callbacks(CallbackJob(log, fail_on=(1,)), failure=FAILURE)
            with pytest.raises(ValueError, match="handle failed on try 1"):
                await manager.push(job)
    finally:
        hooks.clear()
    assert seen == ["app:['handle', 'failed', 'failure_hook', 'on_failure']"]
    [called] = events(log, "on_failure")
    assert called["type"] == "ValueError" and called["connection"] == "sync"


async def test_a_failing_failure_callback_is_logged_only(
    log: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        job = callbacks(CallbackJob(log, fail_on=(1,)), failure="tests.seed_jobs_b.nope")
        with pytest.raises(ValueError, match="handle failed on try 1"):
            await manager.push(job)
    assert "the failure callback raised" in caplog.text


async def test_the_stopped_callback_runs_when_a_running_job_is_cancelled(log: str) -> None:
    async with QueueManager(Backend("memory", {"queue_default": "rq"}).settings()) as manager:
        job = callbacks(CallbackJob(log, block=True), stopped=STOPPED, failure=FAILURE)
        handle = await manager.push(job)
        await cancel_once_started(manager, handle)
        with pytest.raises(JobFailedError, match="cancelled"):
            await handle.result(5)
    assert kinds(log) == ["handle", "blocking", "on_stopped"]
    assert events(log, "on_stopped")[0]["connection"] == "memory"


async def test_description_and_meta_are_kept_with_every_ending(connection: str, log: str) -> None:
    backend = Backend(connection, {"queue_default": "rq"})
    async with QueueManager(backend.settings()) as manager:
        ok = CallbackJob(log)
        ok.__dict__["_topiq_description"] = "count words"
        ok.__dict__["_topiq_meta"] = {"owner": "ana"}
        bad = CallbackJob(log, fail_on=(1,))
        bad.__dict__["_topiq_meta"] = {"owner": "bo"}
        done = await run(manager, connection, ok, "ok-1")
        failed = await run(manager, connection, bad, "bad-1")
        plain = await run(manager, connection, CallbackJob(log), "plain-1")
    assert done.status == Status.SUCCEEDED
    assert (done.description, done.meta) == ("count words", {"owner": "ana"})
    assert failed.status == Status.FAILED
    assert (failed.description, failed.meta) == ("", {"owner": "bo"})
    assert plain.status == Status.SUCCEEDED
    assert not plain.description and not plain.meta


async def test_a_job_cancelled_while_running_keeps_its_description(log: str) -> None:
    async with QueueManager(Backend("memory", {"queue_default": "rq"}).settings()) as manager:
        job = CallbackJob(log, block=True)
        job.__dict__["_topiq_description"] = "long one"
        handle = await manager.push(job)
        await cancel_once_started(manager, handle)
        record = await handle.status()
    assert record.status == Status.CANCELLED
    assert record.description == "long one"


# -- real worker processes -----------------------------------------------------------------


def send(backend: Backend, job: Job) -> str:
    async def go() -> str:
        async with QueueManager(backend.settings()) as manager:
            return (await manager.push(job)).id

    return asyncio.run(go())


def ask(backend: Backend, job_id: str, op: str) -> Any:
    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            queue = manager.settings.queue_default
            if op == "cancel":
                return await driver.cancel(job_id, queue)
            return await driver.job_status(job_id, queue)

    return asyncio.run(go())


@pytest.mark.process
@pytest.mark.timeout(180)
def test_in_a_worker_process_a_failing_success_callback_fails_the_job(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    job = callbacks(CallbackJob(log, fail_success=True), success=SUCCESS, failure=FAILURE)
    job.__dict__["_topiq_description"] = "doomed"
    job_id = send(server_backend, job)
    with workers(1, ["--stop-when-empty"], server_backend.env(), tmp_path) as [worker]:
        assert worker.wait(90) == 0, worker.output
    record = ask(server_backend, job_id, "status")
    assert record.status == Status.FAILED
    assert "success callback failed" in record.error
    assert record.description == "doomed"
    assert kinds(log) == ["handle", "on_success", "failed", "failure_hook", "on_failure"]
    assert events(log, "on_success")[0]["connection"] == server_backend.connection


@pytest.mark.process
@pytest.mark.timeout(180)
def test_in_a_worker_process_cancelling_a_running_job_calls_on_stopped(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    job = callbacks(CallbackJob(log, block=True), stopped=STOPPED, failure=FAILURE)
    job_id = send(server_backend, job)
    with workers(1, [], server_backend.env(), tmp_path) as [worker]:
        wait_until(lambda: bool(events(log, "blocking")), 60, "the job to start")
        assert ask(server_backend, job_id, "cancel")
        wait_until(lambda: bool(events(log, "on_stopped")), 30, "the stopped callback")
        wait_until(
            lambda: ask(server_backend, job_id, "status").status == Status.CANCELLED,
            30,
            "the cancelled record",
        )
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output
    assert kinds(log) == ["handle", "blocking", "on_stopped"]
    [stopped] = events(log, "on_stopped")
    assert stopped["connection"] == server_backend.connection
