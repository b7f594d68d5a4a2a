"""Masonite's job conventions on the worker side (issue #16): `handle(self, *args)` called with
the args of `push(JobClass, args=[...])`, and `failed(self, payload, error)` accepted beside
`failed(self, exception)` (decided by the method's positional parameters, once per class)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.job import Job
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.steps import plan_of
from tests.conftest import Backend, make_settings
from tests.jobs import events
from tests.processes import workers
from tests.seed_jobs_b import CallbackJob, DivideJob

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


def check_failed_payload(entry: dict[str, Any], job_id: str, queue: str, log: str) -> None:
    assert entry["obj"] == "DivideJob"
    assert entry["args"] == [1, 0]
    assert entry["callback"] == "handle"
    created = datetime.fromisoformat(entry["created"])
    assert abs((datetime.now(UTC) - created).total_seconds()) < 120
    assert entry["ran"] == 1
    assert entry["id"] == job_id
    assert entry["queue"] == queue
    assert entry["data"] == {"log": log}
    assert entry["error"] == "division by zero"
    assert entry["error_type"] == "ZeroDivisionError"


async def test_handle_gets_the_pushed_args(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        handle = await manager.push(DivideJob(log), args=[6, 3])
        assert await handle.result(5) == 2.0
    assert events(log, "handle")[0]["args"] == [6, 3]


async def test_failed_with_two_parameters_gets_masonites_payload_and_the_error(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(ZeroDivisionError):
            await manager.push(DivideJob(log), args=[1, 0], job_id="div-1")
    [entry] = events(log, "failed")
    check_failed_payload(entry, "div-1", manager.settings.queue_default, log)


async def test_failed_with_one_parameter_still_gets_the_exception(log: str) -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(ValueError, match="handle failed on try 1"):
            await manager.push(CallbackJob(log, fail_on=(1,)))
    assert [e["error"] for e in events(log, "failed")] == ["handle failed on try 1"]


def test_the_form_of_failed_is_read_from_the_class_once() -> None:
    class TwoArgs(Job):
        def failed(self, payload: Any, error: BaseException) -> None: ...

    class OneArg(Job):
        async def failed(self, exception: BaseException) -> None: ...

    class Star(Job):
        async def failed(self, *args: Any) -> None: ...

    assert plan_of(TwoArgs).failed_takes_payload
    assert not plan_of(OneArg).failed_takes_payload
    assert not plan_of(Star).failed_takes_payload  # *args: the exception, as before


def send(backend: Backend, job: Job, args: list[Any], job_id: str) -> str:
    async def go() -> str:
        async with QueueManager(backend.settings()) as manager:
            return (await manager.push(job, args=args, job_id=job_id)).id

    return asyncio.run(go())


def status_of(backend: Backend, job_id: str) -> Any:
    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            return await driver.job_status(job_id, manager.settings.queue_default)

    return asyncio.run(go())


@pytest.mark.process
@pytest.mark.timeout(180)
def test_in_a_worker_process_args_reach_handle_and_failed_gets_the_payload(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    send(server_backend, DivideJob(log), [6, 3], "div-ok")
    send(server_backend, DivideJob(log), [1, 0], "div-zero")
    with workers(1, ["--stop-when-empty"], server_backend.env(), tmp_path) as [worker]:
        assert worker.wait(90) == 0, worker.output
    done = status_of(server_backend, "div-ok")
    assert done.status == Status.SUCCEEDED and done.value() == 2.0
    failed = status_of(server_backend, "div-zero")
    assert failed.status == Status.FAILED and "division by zero" in failed.error
    [entry] = events(log, "failed")
    check_failed_payload(entry, "div-zero", server_backend.overrides["queue_default"], log)
