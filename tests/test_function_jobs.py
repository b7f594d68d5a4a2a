"""`@job` on async and sync functions: dispatch, later, options, JSON arguments checked at
dispatch naming the argument, the allow-list rules of classes, and the return value as the result
(in process on `sync`, and through real worker processes on the server backends).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import PayloadError, SerializationError, UnloadableJobError
from core.functions import JobFunction
from core.job import Job, job
from core.queue.drivers.memory import MemoryDriver
from core.queue.payload import JobLoader
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from core.status import Status
from tests.conftest import ROOT, Backend, make_settings
from tests.jobs import events, record
from tests.processes import WorkerProcess

pytestmark = pytest.mark.timeout(90)

PATH = "tests.test_function_jobs"


@job(queue="fn-mail", max_tries=2, timeout="2 minutes", retry_after=["1s", 5])
async def add(a: int, b: int = 0, *rest: int, scale: int = 1) -> dict[str, Any]:
    """Adds numbers."""
    await asyncio.sleep(0)
    return {"sum": (a + b + sum(rest)) * scale}


@job
def shout(text: str, log: str = "") -> str:
    if log:
        record(log, event="shout", thread=threading.current_thread().name)
    return text.upper()


@job(max_tries=1)
def explode(message: str) -> None:
    raise ValueError(message)


def settings(**extra: Any) -> Any:
    return make_settings(queue_connection="memory", **extra)


async def reserved_payload(manager: QueueManager, queue: str) -> dict[str, Any]:
    driver = await manager.connection()
    [taken] = await driver.reserve([queue], 1, 30)
    return dict(orjson.loads(taken.payload))


def test_the_decorated_function_is_still_the_function() -> None:
    assert isinstance(add, JobFunction) and isinstance(shout, JobFunction)
    assert asyncio.run(add(1, 2, scale=2)) == {"sum": 6}
    assert shout("hi") == "HI"
    assert (add.__name__, add.__doc__, add.__module__) == ("add", "Adds numbers.", PATH)
    cls = add.job_class
    assert issubclass(cls, Job) and f"{cls.__module__}:{cls.__qualname__}" == f"{PATH}:add"
    assert (cls.queue, cls.max_tries, cls.timeout) == ("fn-mail", 2, "2 minutes")
    assert asyncio.iscoroutinefunction(cls.handle)
    assert not asyncio.iscoroutinefunction(shout.job_class.handle)  # runs in a thread


async def test_dispatch_stores_the_arguments_and_names_the_function() -> None:
    async with QueueManager(settings()) as manager:
        set_default_manager(manager)
        try:
            handle = await add.dispatch(1, 2, 3, scale=10)
            envelope = await reserved_payload(manager, "fn-mail")
        finally:
            set_default_manager(None)
    assert handle.queue == "fn-mail"
    assert envelope["job"] == f"{PATH}:add"
    assert envelope["data"] == {"args": [1, 2, 3], "kwargs": {"scale": 10}}
    assert (envelope["max_tries"], envelope["timeout"], envelope["retry_after"]) == (2, 120, [1, 5])


async def test_the_loader_rebuilds_the_call_and_handle_returns_the_function_result() -> None:
    raw = orjson.dumps(
        {"job": f"{PATH}:add", "data": {"args": [4, 5], "kwargs": {"scale": 3}}, "max_tries": 2}
    )
    decoded = JobLoader(["tests."]).load(raw, job_id="x", attempts=1)
    assert type(decoded.job) is add.job_class
    assert await decoded.job.handle() == {"sum": 27}


@pytest.mark.parametrize(
    "data",
    [{"args": "12", "kwargs": {}}, {"args": [1], "kwargs": [2]}, {"args": [1]}, {"x": 1}],
)
def test_a_function_payload_of_another_shape_is_refused_at_load(data: dict[str, Any]) -> None:
    raw = orjson.dumps({"job": f"{PATH}:add", "data": data})
    with pytest.raises(PayloadError, match=r"@job function's payload data must be exactly"):
        JobLoader(["tests."]).load(raw, job_id="x", attempts=1)


async def test_later_and_per_call_options() -> None:
    async with QueueManager(settings()) as manager:
        set_default_manager(manager)
        try:
            later = await add.later("1 hour", 1)
            assert (await later.status()).status == Status.SCHEDULED
            chosen = await add.options(job_id="sum-7", at_front=True, timeout=5).dispatch(7)
            assert chosen == "sum-7"
            kept = await add.options(job_id="sum-7", on_duplicate="keep").dispatch(8)
            assert kept == "sum-7"
            scheduled = await shout.options(job_id="shout-1").later(60, "x")
            assert (await scheduled.status()).status == Status.SCHEDULED
            envelope = await reserved_payload(manager, "fn-mail")
        finally:
            set_default_manager(None)
    assert (envelope["id"], envelope["timeout"], envelope["data"]["args"]) == ("sum-7", 5, [7])
    with pytest.raises(TypeError, match=r"unknown option\(s\) queue"):
        add.options(queue="other")


async def test_arguments_must_be_json_and_fit_the_signature() -> None:
    async with QueueManager(settings()) as manager:
        set_default_manager(manager)
        try:
            with pytest.raises(SerializationError, match=r"add\(\) argument 'b' cannot be stored"):
                await add.dispatch(1, {1, 2})  # type: ignore[arg-type]
            with pytest.raises(SerializationError, match=r"argument 'scale' cannot be stored"):
                await add.dispatch(1, scale=datetime(2026, 1, 1))  # type: ignore[arg-type]
            with pytest.raises(SerializationError, match=r"argument 'rest' cannot be stored"):
                await add.dispatch(1, 2, 3, object())  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=r"add\(\) cannot be dispatched.*'a'"):
                await add.dispatch()  # type: ignore[call-arg]
            with pytest.raises(TypeError, match=r"shout\(\) cannot be dispatched.*unexpected"):
                await shout.dispatch("x", loud=True)  # type: ignore[call-arg]
            with pytest.raises(SerializationError, match=r"add is a @job function.*add\.dispatch"):
                await dispatch(add)  # type: ignore[arg-type]
            driver = await manager.connection()
            assert isinstance(driver, MemoryDriver)
            assert await manager.size("fn-mail") == 0  # nothing was queued
        finally:
            set_default_manager(None)


def test_options_are_checked_when_the_function_is_decorated() -> None:
    with pytest.raises(SerializationError, match=r"bad_timeout\.timeout: invalid delay"):

        @job(timeout="soonish")
        async def bad_timeout() -> None: ...

    with pytest.raises(SerializationError, match=r"bad_dup\.on_duplicate must be"):

        @job(on_duplicate="merge")
        async def bad_dup() -> None: ...

    with pytest.raises(TypeError, match=r"@job got unknown option\(s\) retries"):
        job(retries=3)
    with pytest.raises(TypeError, match="@job decorates functions"):
        job(max_tries=2)(print)


async def test_the_allow_list_rules_of_classes_apply(tmp_path: Path) -> None:
    @job
    async def nested() -> None: ...

    async with QueueManager(settings()) as manager:
        with pytest.raises(
            UnloadableJobError, match=r"defined inside a function.*move the function"
        ):
            await manager.push(nested.make())
    async with QueueManager(settings(queue_allowed_modules="app.")) as manager:
        with pytest.raises(UnloadableJobError, match=rf"{PATH}:add is outside the allowed"):
            await manager.push(add.make(1))


def test_a_script_dispatching_its_own_function_is_told_how_to_fix_it(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from core.job import job
            from core.queue.queue_manager import dispatch

            @job
            async def ping() -> str:
                return "pong"

            asyncio.run(ping.dispatch())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "QUEUE_CONNECTION": "memory", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "ping is defined in __main__" in done.stderr
    assert "move the function into a module under app/" in done.stderr


async def test_on_sync_the_function_runs_inline_and_its_result_is_kept(tmp_path: Path) -> None:
    log = str(tmp_path / "log.jsonl")
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        set_default_manager(manager)
        try:
            handle = await add.dispatch(2, 3)
            assert await handle.result(timeout=5) == {"sum": 5}
            shouted = await shout.dispatch("hey", log=log)
            assert await shouted.result(timeout=5) == "HEY"
            with pytest.raises(ValueError, match="kaboom"):
                await explode.dispatch("kaboom")
        finally:
            set_default_manager(None)


@pytest.mark.process
async def test_a_worker_process_runs_functions_and_keeps_their_results(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "log.jsonl")
    async with QueueManager(server_backend.settings()) as manager:
        set_default_manager(manager)
        try:
            summed = await add.dispatch(1, 2, 3, scale=2)
            shouted = await shout.dispatch("quiet", log=log)
            failing = await explode.dispatch("no luck")
            worker = WorkerProcess(
                ["--queue", f"fn-mail,{server_backend.overrides['queue_default']}"],
                server_backend.env(),
                tmp_path / "worker.log",
            )
            try:
                assert await summed.result(timeout=30) == {"sum": 12}
                assert await shouted.result(timeout=30) == "QUIET"
                with pytest.raises(Exception, match="no luck") as caught:
                    await failing.result(timeout=30)
                assert "ValueError" in str(caught.value)
            finally:
                worker.stop()
        finally:
            set_default_manager(None)
    [line] = events(log, "shout")
    assert line["thread"].startswith("topiq-job")  # a plain def ran in the worker's threads
