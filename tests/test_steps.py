"""django-db-queue's multi-step jobs and per-class hooks, on the worker side (issue #16): steps
share a workspace saved after each step; a retry, or a worker killed with SIGKILL, resumes at
the step that did not finish; `pre_task_hook` before each step (raising fails the try without
running it), `post_task_hook` after it (after the failure handling for the step that raised; its
own error is logged only), `failure_hook` once on final failure. The same on a worker (in
process and real processes) and on the `sync` connection."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import ConfigurationError, PayloadTooLargeError
from core.execution import LeaseLostError, Site, run_try
from core.job import Job
from core.queue.payload import JobLoader
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.steps import plan_of
from core.worker.options import StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, make_settings
from tests.jobs import events
from tests.processes import WorkerProcess, wait_until, workers
from tests.seed_jobs_b import (
    BadStepJob,
    HookedStepJob,
    HookJob,
    HugeWorkspaceJob,
    SlowStepsJob,
    StepJob,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


def order(log: str, job_id: str | None = None) -> list[str]:
    """The events of the log (of one job), as `event` or `event:name` for steps."""
    return [
        f"{e['event']}:{e['name']}" if "name" in e else e["event"]
        for e in events(log)
        if job_id is None or e.get("id") == job_id
    ]


async def work(manager: QueueManager, queue: str) -> Worker:
    """An in-process worker on `queue` until it is empty."""
    worker = Worker(
        manager,
        WorkerOptions(queues=(queue,), sleep=0.02, stop_when_empty=True, handle_signals=False),
    )
    assert await asyncio.wait_for(worker.run(), 60) is StopReason.EMPTY
    return worker


# -- steps: the sync connection and an in-process worker -----------------------------------


async def test_steps_run_in_order_sharing_the_workspace_and_it_is_the_result(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        handle = await manager.push(StepJob(log))
        assert await handle.result(5) == {"start": 1, "a": 2, "b": 4, "c": 40}
    assert order(log) == ["step:first", "step:second", "step:third"]
    assert [e["ws"] for e in events(log, "step")] == [
        {"start": 1},
        {"start": 1, "a": 2},
        {"start": 1, "a": 2, "b": 4},
    ]


@pytest.mark.parametrize("connection", ["sync", "memory"])
async def test_a_failing_step_is_retried_from_that_step_with_the_saved_workspace(
    log: str, connection: str
) -> None:
    backend = Backend(connection, {"queue_default": "steps"})
    async with QueueManager(backend.settings()) as manager:
        handle = await manager.push(StepJob(log, fail_on=(1, 2)))
        if connection == "memory":
            await work(manager, "steps")
        assert await handle.result(5) == {"start": 1, "a": 2, "b": 4, "c": 40}
    steps = [(e["name"], e["attempts"]) for e in events(log, "step")]
    # Step one ran once: tries 2 and 3 began at step two, with step one's writes.
    assert steps == [("first", 1), ("second", 1), ("second", 2), ("second", 3), ("third", 3)]
    assert [e["ws"] for e in events(log, "step") if e["name"] == "second"] == [
        {"start": 1, "a": 2}
    ] * 3


async def test_a_job_failed_at_a_step_keeps_its_progress_in_the_failed_record(log: str) -> None:
    backend = Backend("memory", {"queue_default": "steps"})
    async with QueueManager(backend.settings()) as manager:
        handle = await manager.push(StepJob(log, fail_on=(1, 2, 3)))
        await work(manager, "steps")
        record = await handle.status()
        assert record.status == Status.FAILED
        assert "second step failed on try 3" in record.error
        failed = await (await manager.failed_store("memory")).get(handle.id)
    assert failed is not None
    envelope = orjson.loads(failed.payload)
    assert envelope["step"] == 1
    assert envelope["data"]["workspace"] == {"start": 1, "a": 2}


async def test_the_timeout_covers_the_whole_try_of_a_step_job(log: str) -> None:
    job = SlowStepsJob(log, seconds=0.6)
    job.timeout = 1  # each step fits, the two do not
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(TimeoutError, match="timed out after 1s"):
            await manager.push(job)
    assert len(events(log, "nap")) == 2


async def test_a_step_naming_nothing_fails_each_try_naming_it(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(ConfigurationError, match=r"BadStepJob.steps\[0\].*'missing'"):
            await manager.push(BadStepJob())


async def test_a_workspace_past_the_payload_limit_fails_the_try_naming_the_limit() -> None:
    settings = make_settings(queue_connection="sync", queue_max_payload_bytes=100_000)
    async with QueueManager(settings) as manager:
        with pytest.raises(PayloadTooLargeError, match=r"after step 1.*QUEUE_MAX_PAYLOAD_BYTES"):
            await manager.push(HugeWorkspaceJob())


async def test_a_checkpoint_whose_reservation_is_gone_stops_the_try(log: str) -> None:
    """The memory driver's save_payload refuses a try that no longer holds the job."""
    backend = Backend("memory", {"queue_default": "steps"})
    async with QueueManager(backend.settings()) as manager:
        driver = await manager.connection()
        await manager.push(StepJob(log))
        [stale] = await driver.reserve(["steps"], 1, 30)
        await driver.release(stale)  # it went back (its try spent); the next try takes it
        [current] = await driver.reserve(["steps"], 1, 30)
        site = Site("memory", ("tests.",), 1_000_000, driver.save_payload)
        job = JobLoader(["tests."]).load(stale.payload, job_id=stale.id, attempts=1).job
        with pytest.raises(LeaseLostError, match="reservation was gone"):
            await run_try(job, 10, site=site, reserved=stale)
        assert [e["name"] for e in events(log, "step")] == ["first"]  # stopped at its save
        # The try that holds it saves, and the stored payload is its own.
        job = JobLoader(["tests."]).load(current.payload, job_id=current.id, attempts=2).job
        assert await run_try(job, 10, site=site, reserved=current) == {
            "start": 1,
            "a": 2,
            "b": 4,
            "c": 40,
        }
        saved = orjson.loads(await driver.job_payload(current.id, "steps") or b"{}")
        assert saved["step"] == 3


def test_the_class_is_read_once_and_a_plain_class_stays_plain() -> None:
    class Plain(Job):
        async def handle(self) -> None:
            return None

    assert plan_of(Plain).plain
    assert plan_of(Plain) is plan_of(Plain)
    assert not plan_of(StepJob).plain
    assert [call.name for call in plan_of(StepJob).steps] == [
        "steps[0] first",
        "steps[1] second",
        "steps[2] tests.seed_jobs_b.third_step",
    ]


def test_a_hook_path_outside_the_allowed_modules_is_refused() -> None:
    class Outside(Job):
        pre_task_hook = "os.path.join"

    plan = plan_of(Outside, ("app.",))
    assert plan.problem is not None
    assert "Outside.pre_task_hook" in plan.problem
    assert "allowed modules" in plan.problem


# -- hooks ---------------------------------------------------------------------------------


async def test_hooks_run_around_handle_in_order(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        handle = await manager.push(HookJob(log))
        assert await handle.result(5) == "done"
    assert order(log) == ["pre", "handle", "post"]


async def test_a_failing_pre_hook_fails_the_job_without_running_it(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(RuntimeError, match="pre hook failed"):
            await manager.push(HookJob(log, fail_pre=True))
    # ddq: as if the task failed: failure hook, then the post hook.
    assert order(log) == ["pre", "failed", "failure_hook", "post"]
    assert events(log, "failure_hook")[0]["error"] == "pre hook failed"


async def test_the_post_hook_runs_after_the_failure_hook_and_its_error_is_logged_only(
    log: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(ValueError, match="handle failed on try 1"):
            await manager.push(HookJob(log, fail_handle_on=(1,), fail_post=True))
        handle = await manager.push(HookJob(log, fail_post=True))
        assert await handle.result(5) == "done"  # the post hook's error failed nothing
        assert (await handle.status()).status == Status.SUCCEEDED
    failed_then_fine = ["pre", "handle", "failed", "failure_hook", "post", "pre", "handle", "post"]
    assert order(log) == failed_then_fine
    assert "post_task_hook" in caplog.text and "post hook failed" in caplog.text


async def test_on_a_retry_the_post_hook_runs_once_the_retry_is_scheduled(log: str) -> None:
    job = HookJob(log, fail_handle_on=(1,))
    job.max_tries = 2
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        handle = await manager.push(job)
        assert await handle.result(5) == "done"
    assert order(log) == ["pre", "handle", "post", "pre", "handle", "post"]


async def test_hooks_run_around_each_step_and_a_retried_step(log: str) -> None:
    backend = Backend("memory", {"queue_default": "steps"})
    async with QueueManager(backend.settings()) as manager:
        handle = await manager.push(HookedStepJob(log, fail_two_on=(1,)))
        await work(manager, "steps")
        assert await handle.result(5) == {"one": True, "two": True}
    assert order(log) == [
        "pre",
        "step:one",
        "post",
        "pre",
        "step:two",
        "post",  # after the retry was scheduled
        "pre",
        "step:two",
        "post",
    ]
    assert [e["step"] for e in events(log, "pre")] == [None, 1, 1]


# -- real worker processes -----------------------------------------------------------------


def send(backend: Backend, job: Job) -> str:
    async def go() -> str:
        async with QueueManager(backend.settings()) as manager:
            return (await manager.push(job)).id

    return asyncio.run(go())


def status_of(backend: Backend, job_id: str) -> Any:
    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            return await driver.job_status(job_id, manager.settings.queue_default)

    return asyncio.run(go())


def run_until_empty(backend: Backend, tmp_path: Path, name: str) -> WorkerProcess:
    worker = WorkerProcess(["--stop-when-empty"], backend.env(), tmp_path / f"{name}.log")
    try:
        assert worker.wait(90) == 0, worker.output
    finally:
        worker.stop()
    return worker


@pytest.mark.process
@pytest.mark.timeout(180)
def test_a_step_job_killed_after_a_checkpoint_resumes_at_the_next_step(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    job = StepJob(log, block_on=1)
    job.timeout = 3  # lease: timeout + QUEUE_LEASE_MARGIN (2 s)
    job_id = send(server_backend, job)
    first = WorkerProcess([], server_backend.env(), tmp_path / "first.log")
    try:
        # Step two starts after step one's checkpoint was saved.
        wait_until(lambda: len(events(log, "step")) == 2, 60, "step two to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    with workers(1, [], server_backend.env(), tmp_path) as [second]:
        wait_until(lambda: len(events(log, "step")) == 4, 60, "the job to resume and end")
        wait_until(
            lambda: status_of(server_backend, job_id).status == Status.SUCCEEDED,
            30,
            "its record to say succeeded",
        )
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.output
    steps = [(e["name"], e["attempts"]) for e in events(log, "step")]
    assert steps == [("first", 1), ("second", 1), ("second", 2), ("third", 2)]
    assert events(log, "step")[2]["ws"] == {"start": 1, "a": 2}  # step one's writes
    assert status_of(server_backend, job_id).value() == {"start": 1, "a": 2, "b": 4, "c": 40}


@pytest.mark.process
@pytest.mark.timeout(180)
def test_a_failing_step_retried_by_a_worker_process_resumes_at_that_step(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    job_id = send(server_backend, StepJob(log, fail_on=(1,)))
    run_until_empty(server_backend, tmp_path, "worker")
    steps = [(e["name"], e["attempts"]) for e in events(log, "step")]
    assert steps == [("first", 1), ("second", 1), ("second", 2), ("third", 2)]
    assert status_of(server_backend, job_id).value() == {"start": 1, "a": 2, "b": 4, "c": 40}


@pytest.mark.process
@pytest.mark.timeout(180)
def test_in_a_worker_process_a_failing_pre_hook_runs_nothing_and_the_post_hook_comes_last(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    job_id = send(server_backend, HookJob(log, fail_pre=True))
    run_until_empty(server_backend, tmp_path, "worker")
    assert order(log) == ["pre", "failed", "failure_hook", "post"]
    record = status_of(server_backend, job_id)
    assert record.status == Status.FAILED and "pre hook failed" in record.error


@pytest.mark.process
@pytest.mark.timeout(180)
def test_in_a_worker_process_the_post_hook_error_does_not_fail_the_job(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    failing = send(server_backend, HookJob(log, fail_handle_on=(1,), fail_post=True))
    fine = send(server_backend, HookJob(log, fail_post=True))
    worker = run_until_empty(server_backend, tmp_path, "worker")
    assert status_of(server_backend, fine).status == Status.SUCCEEDED
    assert order(log, fine) == ["pre", "handle", "post"]
    failed = status_of(server_backend, failing)
    assert failed.status == Status.FAILED and "handle failed on try 1" in failed.error
    assert order(log, failing) == ["pre", "handle", "failed", "failure_hook", "post"]
    assert worker.output.count("post hook failed") >= 2  # logged for both, raised for none
