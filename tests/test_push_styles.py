"""Masonite's ways of calling `push` (issue #16): a job class built with no arguments, a plain
function with `args=`, several jobs in one call, `args=` as `handle(*args)`, `wait=` as the
delay, and a job class's `creation_hook`. What is stored is read back from each backend
(memory, sqlite, mysql, redis); what a job returns is run through the `sync` connection and a
worker process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import SerializationError
from core.job import Job
from core.queue.drivers import Driver
from core.queue.handle import JobHandle
from core.queue.queue_manager import QueueManager, dispatch, queue, set_default_manager
from tests import seed_jobs_c as c
from tests.conftest import Backend, make_settings
from tests.processes import WorkerProcess

pytestmark = pytest.mark.timeout(90)


async def stored(manager: QueueManager, handle: JobHandle) -> dict[str, Any]:
    """The payload the backend holds for a waiting job."""
    driver = await manager.connection(handle.connection)
    raw = await driver.job_payload(handle, handle.queue)
    assert raw is not None, f"job {handle} is not stored"
    return dict(orjson.loads(raw))


def count_pushes(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many jobs each `driver.push` call carried (a spy on the real driver)."""
    calls: list[int] = []
    real = driver.push

    async def push(jobs: Any) -> Any:
        calls.append(len(jobs))
        return await real(jobs)

    monkeypatch.setattr(driver, "push", push)
    return calls


@pytest.fixture
async def memory() -> Any:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


# -- a job class built with no arguments ----------------------------------------------------


async def test_a_job_class_is_built_with_no_arguments(manager: QueueManager) -> None:
    handle = await queue.push(c.Ping)
    payload = await stored(manager, handle)
    assert payload["job"] == "tests.seed_jobs_c:Ping"
    assert payload["data"] == {"count": 1}  # what its __init__ set
    assert payload["queue"] == "seed-c" == handle.queue
    assert "handle_args" not in payload


async def test_a_class_whose_constructor_needs_arguments_is_refused(memory: QueueManager) -> None:
    with pytest.raises(
        TypeError, match=r"NeedsArgs cannot be built with no arguments .*NeedsArgs\("
    ):
        await queue.push(c.NeedsArgs)
    assert await memory.size() == 0


# -- functions --------------------------------------------------------------------------------


async def test_a_plain_function_with_args_is_stored_as_a_job_function_call(
    manager: QueueManager,
) -> None:
    handle = await queue.push(c.add, args=(1, 2))
    payload = await stored(manager, handle)
    assert payload["job"] == "tests.seed_jobs_c:add"
    assert payload["data"] == {"args": [1, 2], "kwargs": {}}  # exactly @job's payload
    assert payload["max_tries"] == 1  # a plain function runs once unless told otherwise
    decorated = await queue.push(c.decorated, args=[5])
    assert (await stored(manager, decorated))["max_tries"] == 3  # the @job's settings hold


async def test_function_arguments_are_checked_at_push(memory: QueueManager) -> None:
    with pytest.raises(TypeError, match=r"add\(\) cannot be dispatched.*args=\["):
        await queue.push(c.add)  # `a` is required
    with pytest.raises(TypeError, match=r"add\(\) cannot be dispatched"):
        await queue.push(c.add, args=[1, 2, 3])
    with pytest.raises(SerializationError, match=r"add\(\) argument 'a' cannot be stored"):
        await queue.push(c.add, args=[object()])
    with pytest.raises(SerializationError, match="lambda"):
        await queue.push(c.lambda_job, args=[])
    with pytest.raises(SerializationError, match="inside a function"):
        await queue.push(c.make_nested(), args=[])
    with pytest.raises(SerializationError, match="builtin"):
        await queue.push(len, args=["x"])
    with pytest.raises(TypeError, match=r"not the path 'tests\.seed_jobs_c\.add'.*enqueue"):
        await queue.push("tests.seed_jobs_c.add")  # type: ignore[call-overload]
    assert await memory.size() == 0


# -- args= for a job class: handle(*args) -----------------------------------------------------


async def test_args_for_a_job_class_travel_as_handle_args(manager: QueueManager) -> None:
    handle = await queue.push(c.Ping, args=["a", 2, {"k": [1]}])
    payload = await stored(manager, handle)
    assert payload["handle_args"] == ["a", 2, {"k": [1]}]
    assert payload["data"] == {"count": 1}  # never mixed into the data
    instance = c.Ping()
    second = await queue.push(instance, args=())
    assert (await stored(manager, second))["handle_args"] == []


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ("abc", TypeError, r"args=\.\.\.\) must be a list or tuple.*args=\[value\]"),
        ({"a": 1}, TypeError, r"args=\.\.\.\) must be a list or tuple"),
        (5, TypeError, r"args=\.\.\.\) must be a list or tuple"),
        ([{1, 2}], SerializationError, r"args=\.\.\.\) for Ping cannot be stored as JSON"),
    ],
)
async def test_args_that_are_not_a_list_of_json_are_refused(
    memory: QueueManager, args: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await queue.push(c.Ping, args=args)
    assert await memory.size("seed-c") == 0


# -- several jobs in one call -----------------------------------------------------------------


async def test_several_jobs_go_in_one_round_trip_and_return_handles_in_order(
    manager: QueueManager, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_pushes(await manager.connection(), monkeypatch)
    first = c.Ping()
    handles = await queue.push(first, c.Ping, c.add, c.decorated, args=[4])
    assert isinstance(handles, list) and len(handles) == 4
    assert calls == [4]  # one driver call carried them all
    assert first.job_id == handles[0]
    payloads = [await stored(manager, h) for h in handles]
    assert [p["job"] for p in payloads] == [
        "tests.seed_jobs_c:Ping",
        "tests.seed_jobs_c:Ping",
        "tests.seed_jobs_c:add",
        "tests.seed_jobs_c:decorated",
    ]
    assert [p["id"] for p in payloads] == list(handles)
    assert payloads[0]["handle_args"] == [4] and payloads[2]["data"]["args"] == [4]
    default = backend.overrides["queue_default"]
    assert [h.queue for h in handles] == ["seed-c", "seed-c", default, default]


async def test_several_jobs_take_queue_and_options_by_keyword(
    manager: QueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_pushes(await manager.connection(), monkeypatch)
    handles = await manager.push(c.Ping, c.Ping, queue="styles-many", wait=30, at_front=True)
    assert calls == [2]
    assert [h.queue for h in handles] == ["styles-many", "styles-many"]
    for handle in handles:
        payload = await stored(manager, handle)
        assert payload["due_at"] - payload["created_at"] == 30_000


async def test_a_string_after_the_job_is_still_the_queue(memory: QueueManager) -> None:
    one = await queue.push(c.Ping(), "styles-mail")
    assert isinstance(one, JobHandle) and one.queue == "styles-mail"
    two = await queue.push(c.Ping(), "styles-mail", "memory")
    assert (two.queue, two.connection) == ("styles-mail", "memory")
    three = await queue.push(c.Ping(), None, "memory")
    assert three.queue == "seed-c"
    assert await memory.size("styles-mail") == 2


async def test_wrong_ways_of_calling_push_with_several_jobs_are_refused(
    memory: QueueManager,
) -> None:
    with pytest.raises(TypeError, match=r"argument 3 is 'low' after another job.*queue='low'"):
        await queue.push(c.Ping(), c.Ping(), "low")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"job_id=\.\.\.\) names one job"):
        await memory.push(c.Ping(), c.Ping(), job_id="one")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="at most a queue and a connection"):
        await queue.push(c.Ping(), "a", "memory", "extra")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="got the queue twice"):
        await queue.push(c.Ping(), "a", queue="b")  # type: ignore[call-overload]
    with pytest.raises(SerializationError, match=r"only core\.job\.Job instances"):
        await queue.push(c.Ping(), 42)  # type: ignore[call-overload]
    # One bad job in the call: none of them is stored.
    with pytest.raises(TypeError, match="NeedsArgs cannot be built"):
        await queue.push(c.Ping(), c.NeedsArgs)
    assert await memory.size("seed-c") == 0


async def test_dispatch_still_takes_only_job_instances(memory: QueueManager) -> None:
    with pytest.raises(SerializationError, match=r"only core\.job\.Job instances"):
        await dispatch(c.Ping)  # type: ignore[arg-type]


# -- wait= ------------------------------------------------------------------------------------


async def test_wait_is_another_name_for_the_delay(manager: QueueManager) -> None:
    handle = await queue.push(c.Ping, wait="10 minutes")
    payload = await stored(manager, handle)
    assert payload["due_at"] - payload["created_at"] == 600_000
    assert (await handle.status()).status == "scheduled"
    stats = (await manager.stats("seed-c"))[0]
    assert (stats.pending, stats.delayed) == (0, 1)


async def test_wait_and_delay_together_are_refused(memory: QueueManager) -> None:
    with pytest.raises(TypeError, match="both wait= and delay="):
        await queue.push(c.Ping, wait=5, delay=5)
    with pytest.raises(ValueError, match="invalid delay"):
        await queue.push(c.Ping, wait="whenever")
    assert await memory.size("seed-c") == 0


# -- creation_hook ----------------------------------------------------------------------------


async def test_the_creation_hook_runs_once_the_job_is_stored(
    manager: QueueManager, caplog: pytest.LogCaptureFixture
) -> None:
    c.created.clear()
    handle = await queue.push(c.Created)
    by_path = await queue.push(c.CreatedByPath())
    assert c.created == [handle, by_path]
    kept = await queue.push(c.Created(), job_id=handle, on_duplicate="keep")
    assert kept == handle and c.created == [handle, by_path]  # nothing new was created
    with caplog.at_level(logging.ERROR, logger="topiq.queue"):
        failing = await queue.push(c.CreationFails)
    assert c.created[-1] == f"raised:{failing}"
    assert "creation_hook of CreationFails failed" in caplog.text
    assert "creation hook failed" in caplog.text
    assert (await stored(manager, failing))["job"] == "tests.seed_jobs_c:CreationFails"


# -- running them -----------------------------------------------------------------------------


async def test_pushed_styles_run_inline_on_the_sync_connection() -> None:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        set_default_manager(manager)
        try:
            summed = await queue.push(c.add, args=[2, 3])
            assert await summed.result(timeout=10) == 5
            awaited = await queue.push(c.async_add, args=[4], queue="other")
            assert await awaited.result(timeout=10) == 4
            pinged = await queue.push(c.Ping, args=["x", 1])
            assert await pinged.result(timeout=10) == {"count": 1, "args": ["x", 1]}
            many = await queue.push(c.Ping, c.add, args=[7])
            assert [await h.result(timeout=10) for h in many] == [{"count": 1, "args": [7]}, 7]
        finally:
            set_default_manager(None)


async def test_the_fake_queue_records_what_these_calls_make() -> None:
    with queue.fake(make_settings()) as fake:
        await queue.push(c.Ping, c.add, args=[1])
        await queue.push(c.Ping, "styles-fake")
        fake.assert_dispatched(c.Ping, count=2)
        fake.assert_dispatched("tests.seed_jobs_c:add", count=1)
        assert [d.queue for d in fake.dispatches] == ["seed-c", "default", "styles-fake"]
        assert orjson.loads(fake.dispatches[0].payload)["handle_args"] == [1]


@pytest.mark.process
async def test_a_worker_process_runs_what_push_stored(
    server_backend: Backend, tmp_path: Path
) -> None:
    async with QueueManager(server_backend.settings()) as manager:
        set_default_manager(manager)
        try:
            handles = await queue.push(c.Ping, c.add, c.async_add, args=[10])
            later = await queue.push(c.add, args=[1, 1], wait=1)
            worker = WorkerProcess(
                ["--queue", f"seed-c,{server_backend.overrides['queue_default']}"],
                server_backend.env(),
                tmp_path / "worker.log",
            )
            try:
                results = [await h.result(timeout=30) for h in handles]
                assert results == [{"count": 1, "args": [10]}, 10, 10]
                assert await later.result(timeout=30) == 2
            finally:
                worker.stop()
        finally:
            set_default_manager(None)


class _MasoniteTimes(Job):
    run_times = 5

    async def handle(self) -> None:
        return None


class _MasoniteOnce(Job):
    run_again_on_fail = False

    async def handle(self) -> None:
        return None


class _MasoniteAgain(Job):
    run_again_on_fail = True

    async def handle(self) -> None:
        return None


@pytest.mark.parametrize(
    ("cls", "says"),
    [
        (_MasoniteTimes, "write `max_tries = 5` instead"),
        (_MasoniteOnce, "write `max_tries = 1` instead"),
        (_MasoniteAgain, "remove it"),
    ],
)
async def test_masonites_retry_settings_are_refused_naming_the_rename(
    cls: type[Job], says: str
) -> None:
    """`run_times` / `run_again_on_fail` would otherwise be ignored without a word (a job meant
    to run 5 times would run 3): dispatch refuses the class, naming what to write."""
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        with pytest.raises(SerializationError, match=f"{cls.__qualname__}.* Masonite.*{says}"):
            await manager.push(cls)
        assert await manager.size() == 0
