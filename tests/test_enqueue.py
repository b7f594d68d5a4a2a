"""RQ's way of calling (issue #16): `Queue(...).enqueue(f, *args, **kwargs)` with RQ's options,
`enqueue_in`, `enqueue_at`, `enqueue_many` with `prepare_data`, the inspection calls, the
`@job("queue")` decorator's `.delay`, `is_async=False`; and the loader's strict rule for plain
functions named by a payload (a hostile payload naming an imported function, a builtin or a
method is refused). Storage behaviour runs over every backend (memory, sqlite, mysql, redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import (
    DuplicateJobError,
    PayloadError,
    SerializationError,
    UnknownJobError,
    UnloadableJobError,
)
from core.functions import resolve_function
from core.queue.drivers import Driver
from core.queue.handle import JobHandle
from core.queue.payload import MAX_KEEP_SECONDS, JobLoader
from core.queue.queue_manager import (
    Callback,
    Queue,
    QueueManager,
    RetryPolicy,
    prepare_data,
    queue,
    set_default_manager,
)
from tests import seed_jobs_c as c
from tests.conftest import Backend, make_settings
from tests.processes import WorkerProcess

pytestmark = pytest.mark.timeout(90)


async def stored(manager: QueueManager, handle: JobHandle) -> dict[str, Any]:
    driver = await manager.connection(handle.connection)
    raw = await driver.job_payload(handle, handle.queue)
    assert raw is not None, f"job {handle} is not stored"
    return dict(orjson.loads(raw))


@pytest.fixture
async def memory() -> Any:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


# -- enqueue and its options ------------------------------------------------------------------


async def test_enqueue_stores_the_call_and_every_option(manager: QueueManager) -> None:
    q = Queue("rq-low")
    handle = await q.enqueue(
        c.add,
        1,
        b=2,
        job_timeout="3m",
        result_ttl=-1,
        ttl=30,
        failure_ttl="1h",
        description="adds two numbers",
        meta={"source": "test", "n": [1]},
        retry=RetryPolicy(max=3, interval=[10, 30, 60]),
        on_success=c.on_success,
        on_failure=Callback("tests.seed_jobs_c.on_failure", timeout="5s"),
        on_stopped="tests.seed_jobs_c:on_stopped",
    )
    assert isinstance(handle, JobHandle) and handle.queue == "rq-low"
    payload = await stored(manager, handle)
    assert payload["job"] == "tests.seed_jobs_c:add"
    assert payload["data"] == {"args": [1], "kwargs": {"b": 2}}
    assert payload["timeout"] == 180
    assert payload["max_tries"] == 4  # max=3 retries: four tries
    assert payload["retry_after"] == [10, 30, 60]
    assert payload["result_ttl"] == MAX_KEEP_SECONDS
    assert (payload["ttl"], payload["failure_ttl"]) == (30, 3600)
    assert payload["description"] == "adds two numbers"
    assert payload["meta"] == {"source": "test", "n": [1]}
    assert payload["callbacks"] == {
        "success": {"path": "tests.seed_jobs_c.on_success", "timeout": 60},
        "failure": {"path": "tests.seed_jobs_c.on_failure", "timeout": 5},
        "stopped": {"path": "tests.seed_jobs_c:on_stopped", "timeout": 60},
    }


async def test_a_plain_enqueue_runs_once_and_carries_nothing_extra(
    manager: QueueManager, backend: Backend
) -> None:
    handle = await Queue().enqueue(c.count_words, "a b c")
    payload = await stored(manager, handle)
    assert handle.queue == backend.overrides["queue_default"]
    assert payload["max_tries"] == 1
    for key in ("description", "meta", "callbacks", "handle_args", "step"):
        assert key not in payload


async def test_job_id_and_at_front(manager: QueueManager) -> None:
    q = Queue("rq-front")
    first = await q.enqueue(c.add, 1)
    front = await q.enqueue(c.add, 2, job_id="rq-front-1", at_front=True)
    assert front == "rq-front-1"
    assert await q.job_ids() == ["rq-front-1", first]
    with pytest.raises(DuplicateJobError):
        await q.enqueue(c.add, 3, job_id="rq-front-1")
    assert await q.count() == 2


async def test_names_that_clash_with_options_go_through_kwargs(manager: QueueManager) -> None:
    handle = await Queue("rq-clash").enqueue(
        c.echo_kwargs, kwargs={"description": "for the function", "job_id": "not mine"}
    )
    payload = await stored(manager, handle)
    assert payload["data"]["kwargs"] == {"description": "for the function", "job_id": "not mine"}
    assert "description" not in payload and handle != "not mine"
    explicit = await Queue("rq-clash").enqueue(c.add, args=[1], kwargs={"b": 5})
    assert (await stored(manager, explicit))["data"] == {"args": [1], "kwargs": {"b": 5}}
    with pytest.raises(TypeError, match="either after the function or as args="):
        await Queue("rq-clash").enqueue(c.add, 1, args=[2])
    with pytest.raises(TypeError, match=r"enqueue\(kwargs=\.\.\.\) must be a dict"):
        await Queue("rq-clash").enqueue(c.add, kwargs=["x"])
    with pytest.raises(TypeError, match=r"enqueue\(args=\.\.\.\) must be a list or tuple"):
        await Queue("rq-clash").enqueue(c.add, args="abc")
    with pytest.raises(TypeError, match=r"b given twice"):
        await Queue("rq-clash").enqueue(c.add, b=1, kwargs={"b": 2})
    assert await Queue("rq-clash").count() == 2


async def test_enqueue_call_takes_the_arguments_only_as_args_and_kwargs(
    manager: QueueManager,
) -> None:
    q = Queue("rq-call")
    handle = await q.enqueue_call(
        c.echo_kwargs, kwargs={"job_id": "for the function"}, job_id="rq-call-1", meta={"a": 1}
    )
    payload = await stored(manager, handle)
    assert handle == "rq-call-1" and payload["meta"] == {"a": 1}
    assert payload["data"] == {"args": [], "kwargs": {"job_id": "for the function"}}
    positional = await q.enqueue_call(c.add, args=(1, 2))
    assert (await stored(manager, positional))["data"]["args"] == [1, 2]
    with pytest.raises(TypeError, match=r"enqueue_call\(\) got unknown option\(s\) b"):
        await q.enqueue_call(c.add, args=[1], b=2)
    assert await q.count() == 2


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"job_timeout": "soonish"}, ValueError, r"enqueue\(job_timeout=\.\.\.\)"),
        ({"job_timeout": -5}, ValueError, r"enqueue\(job_timeout=\.\.\.\)"),
        ({"result_ttl": "forever"}, ValueError, r"enqueue\(result_ttl=\.\.\.\)"),
        ({"failure_ttl": -3}, ValueError, r"enqueue\(failure_ttl=\.\.\.\)"),
        ({"ttl": 0}, ValueError, r"enqueue\(ttl=\.\.\.\) must be over 0"),
        ({"at_front": "yes"}, TypeError, r"enqueue\(at_front=\.\.\.\) must be True or False"),
        ({"job_id": "has space"}, ValueError, r"enqueue\(job_id=\.\.\.\) must be 1 to 190"),
        ({"description": "x" * 1001}, ValueError, r"enqueue\(description=\.\.\.\)"),
        ({"description": 5}, ValueError, r"enqueue\(description=\.\.\.\)"),
        ({"meta": ["a"]}, TypeError, r"enqueue\(meta=\.\.\.\) must be a dict"),
        ({"meta": {"a": {1, 2}}}, SerializationError, r"enqueue\(meta=\.\.\.\) cannot be stored"),
        ({"retry": 3}, TypeError, r"enqueue\(retry=\.\.\.\) takes RetryPolicy"),
        ({"on_success": print}, SerializationError, r"enqueue\(on_success=\.\.\.\).*builtin"),
        ({"on_failure": lambda *a: None}, SerializationError, r"on_failure=\.\.\.\).*lambda"),
        ({"on_stopped": "os.system"}, SerializationError, r"on_stopped=\.\.\.\).*allowed modules"),
        ({"on_success": "not a path"}, ValueError, r"on_success=\.\.\.\) 'not a path'"),
        ({"on_success": 5}, SerializationError, r"enqueue\(on_success=\.\.\.\)"),
        ({"pipeline": object()}, TypeError, r"enqueue\(pipeline=\.\.\.\).*enqueue_many"),
        ({"depends_on": 5}, SerializationError, r"depends_on takes"),
    ],
)
async def test_each_option_is_checked_at_enqueue_naming_it(
    memory: QueueManager, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await Queue("rq-bad").enqueue(c.add, 1, **options)
    assert await memory.size("rq-bad") == 0


def test_retry_policy_and_callback_check_themselves() -> None:
    policy = RetryPolicy(max=2, interval=5)
    assert (policy.max_tries, policy.retry_after) == (3, 5)
    assert RetryPolicy(max=1, interval=["1s", "2m"]).retry_after == [1, 120]
    with pytest.raises(ValueError, match=r"RetryPolicy\(max=\.\.\.\)"):
        RetryPolicy(max=0)
    with pytest.raises(ValueError, match=r"RetryPolicy\(interval=\.\.\.\)"):
        RetryPolicy(max=1, interval=[5, -1])
    with pytest.raises(ValueError, match=r"interval=\.\.\.\) must not be an empty"):
        RetryPolicy(max=1, interval=[])
    assert Callback(c.on_success).timeout == 60
    with pytest.raises(ValueError, match=r"Callback\(timeout=\.\.\.\)"):
        Callback(c.on_success, timeout=0)


# -- what can be enqueued ---------------------------------------------------------------------


async def test_a_function_by_its_dotted_path(manager: QueueManager) -> None:
    q = Queue("rq-paths")
    here = await q.enqueue("tests.seed_jobs_c.count_words", "a b")
    assert (await stored(manager, here))["job"] == "tests.seed_jobs_c:count_words"
    colon = await q.enqueue("tests.seed_jobs_c:add", 1)
    assert (await stored(manager, colon))["job"] == "tests.seed_jobs_c:add"
    # Code this process cannot import (another code base's worker runs it): stored by name.
    elsewhere = await q.enqueue("tests.other_code_base.tasks.crunch", 7, mode="fast")
    payload = await stored(manager, elsewhere)
    assert payload["job"] == "tests.other_code_base.tasks:crunch"
    assert payload["data"] == {"args": [7], "kwargs": {"mode": "fast"}}


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        ("elsewhere.tasks.crunch", UnloadableJobError, "outside the allowed modules"),
        ("tests.seed_jobs_c.system", SerializationError, "builtin"),
        ("tests.seed_jobs_c.run", SerializationError, "subprocess:run, which is not defined in"),
        ("tests.seed_jobs_c.nothing_here", SerializationError, "has no function 'nothing_here'"),
        ("tests.seed_jobs_c.Ping", TypeError, "job class"),
        ("no_dots", TypeError, "is not of the form"),
    ],
)
async def test_paths_that_cannot_be_a_job_are_refused(
    memory: QueueManager, target: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await Queue("rq-refused").enqueue(target, 1)
    assert await memory.size("rq-refused") == 0


async def test_job_instances_and_classes_without_arguments(memory: QueueManager) -> None:
    q = Queue("rq-jobs")
    assert await q.enqueue(c.Ping()) and await q.enqueue(c.Ping)
    with pytest.raises(TypeError, match="job instance, which carries its own data"):
        await q.enqueue(c.Ping(), 1)
    with pytest.raises(TypeError, match="Ping is a job class"):
        await q.enqueue(c.Ping, 1)
    with pytest.raises(TypeError, match="NeedsArgs cannot be built with no arguments"):
        await q.enqueue(c.NeedsArgs)
    assert await q.count() == 2


async def test_the_job_decorator_takes_the_queue_first_and_delay_dispatches(
    manager: QueueManager,
) -> None:
    handle = await c.low_priority.delay(4)
    payload = await stored(manager, handle)
    assert handle.queue == "low" and payload["timeout"] == 5
    assert payload["data"] == {"args": [4], "kwargs": {}}
    from core.job import job

    with pytest.raises(TypeError, match="queue twice"):
        job("a", queue="b")


# -- enqueue_in, enqueue_at, enqueue_many -----------------------------------------------------


async def test_enqueue_in_and_enqueue_at_delay_the_job(manager: QueueManager) -> None:
    q = Queue("rq-later")
    soon = await q.enqueue_in(timedelta(minutes=10), c.add, 1)
    payload = await stored(manager, soon)
    assert payload["due_at"] - payload["created_at"] == 600_000
    seconds = await q.enqueue_in(90, c.add, 2, job_id="rq-later-90")
    assert seconds == "rq-later-90"
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    naive = await q.enqueue_at(when.replace(tzinfo=None), c.add, 3)  # naive: UTC, as RQ
    assert abs((await stored(manager, naive))["due_at"] - when.timestamp() * 1000) <= 1
    assert await q.count() == 0  # scheduled, not waiting to run
    stats = (await manager.stats("rq-later"))[0]
    assert stats.delayed == 3
    with pytest.raises(TypeError, match=r"enqueue_in\(\) takes a timedelta"):
        await q.enqueue_in("10 minutes", c.add, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"enqueue_in\(\): the delay must be 0 or more"):
        await q.enqueue_in(-1, c.add, 1)
    with pytest.raises(TypeError, match=r"enqueue_at\(\) takes a datetime"):
        await q.enqueue_at(123, c.add, 1)  # type: ignore[arg-type]


async def test_enqueue_many_stores_prepared_jobs_in_one_round_trip(
    manager: QueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_pushes(await manager.connection(), monkeypatch)
    q = Queue("rq-many")
    handles = await q.enqueue_many(
        [
            Queue.prepare_data(c.count_words, "http://nvie.com", job_id="my_job_id"),
            prepare_data(c.add, 1, b=2, description="second", at_front=True),
            prepare_data("tests.seed_jobs_c.add", 5),
        ]
    )
    assert calls == [3]
    assert handles[0] == "my_job_id" and len(handles) == 3
    assert (await stored(manager, handles[1]))["description"] == "second"
    assert await q.job_ids() == [handles[1], "my_job_id", handles[2]]
    assert await q.enqueue_many([]) == []


async def test_enqueue_many_checks_everything_before_storing(memory: QueueManager) -> None:
    with pytest.raises(TypeError, match=r"prepare_data\(depends_on=\.\.\.\) is not supported"):
        prepare_data(c.add, 1, depends_on="x")
    with pytest.raises(ValueError, match=r"prepare_data\(job_timeout=\.\.\.\)"):
        prepare_data(c.add, 1, job_timeout="never")
    q = Queue("rq-many-bad")
    with pytest.raises(TypeError, match=r"item 1 is tuple"):
        await q.enqueue_many([prepare_data(c.add, 1), (c.add, 2)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"add\(\) cannot be dispatched"):
        await q.enqueue_many([prepare_data(c.add, 1), prepare_data(c.add)])
    assert await q.count() == 0


# -- depends_on, inspection -------------------------------------------------------------------


async def test_inspection_count_job_ids_fetch_job_and_empty(manager: QueueManager) -> None:
    q = Queue("rq-inspect")
    first = await q.enqueue(c.add, 1)
    second = await q.enqueue(c.add, 2)
    waiting = await q.enqueue(c.add, 3, depends_on=first)
    await q.enqueue_in(60, c.add, 4)
    assert await q.count() == 2  # neither the deferred nor the scheduled job
    assert await q.job_ids() == [first, second]
    assert await q.job_ids(1) == [second] and await q.job_ids(0, 1) == [first]
    fetched = await q.fetch_job(waiting)
    assert fetched == waiting and (await fetched.status()).status == "deferred"
    assert await q.fetch_job("never-enqueued") is None
    assert (q.name, q.connection) == ("rq-inspect", manager.connection_name())
    assert await q.empty() == 4
    assert await q.count() == 0 and await q.job_ids() == []


async def test_job_ids_pages_through_a_long_queue(memory: QueueManager) -> None:
    q = Queue("rq-long")
    handles = await q.enqueue_many([prepare_data(c.add, i) for i in range(1203)])
    assert await q.job_ids() == handles
    assert await q.job_ids(1000, 500) == handles[1000:]


# -- the facade, the manager, is_async=False ----------------------------------------------------


async def test_the_facade_and_the_manager_enqueue_on_the_default_queue(
    manager: QueueManager, backend: Backend
) -> None:
    default = backend.overrides["queue_default"]
    one = await queue.enqueue(c.add, 1)
    two = await manager.enqueue("tests.seed_jobs_c.add", 2)
    three = await queue.enqueue_in(5, c.add, 3)
    four = await manager.enqueue_at(datetime.now(UTC) + timedelta(minutes=1), c.add, 4)
    many = await queue.enqueue_many([prepare_data(c.add, 5)])
    assert {h.queue for h in (one, two, three, four, *many)} == {default}
    assert await Queue().count() == 3


def test_a_queue_takes_a_connection_name_not_a_client() -> None:
    with pytest.raises(TypeError, match="Topiq connection name"):
        Queue("x", connection=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid queue name"):
        Queue("bad name")
    assert Queue(is_async=False).connection == "sync"


async def test_is_async_false_runs_the_job_inline() -> None:
    manager = QueueManager(make_settings(queue_connection="memory"))
    async with manager:
        q = Queue("rq-inline", is_async=False, manager=manager)
        handle = await q.enqueue(c.add, 2, b=3)
        assert handle.connection == "sync"
        assert await handle.result(timeout=5) == 5  # done before enqueue returned
        assert (await handle.status()).status == "succeeded"
        with pytest.raises(ValueError, match="inline boom"):  # raised to the caller, as in RQ
            await q.enqueue(c.fail, "inline boom")
        assert await q.enqueue(c.async_add, 1) and await manager.size("rq-inline") == 0


# -- the loader's strict rule: hostile payloads -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("tests.seed_jobs_c:system", "builtin 'system'"),
        ("tests.seed_jobs_c:run", "subprocess:run, which is not defined in tests.seed_jobs_c"),
        ("tests.seed_jobs_c:subprocess.run", "subprocess:run, which is not defined"),
        ("tests.seed_jobs_c:subprocess.Popen", "not a subclass of core.job.Job"),
        ("tests.seed_jobs_c:asyncio.sleep", "asyncio.tasks:sleep, which is not defined"),
        ("tests.seed_jobs_c:lambda_job", "lambda"),
        ("tests.seed_jobs_c:Ping.handle", "not lambdas or methods"),
        ("tests.seed_jobs_c:make_nested.<locals>.nested", "cannot be imported"),
        ("app.jobs:os.system", "cannot be imported"),
        ("app.jobs.send_notification_job:logging.getLogger", "logging:getLogger"),
        ("os:system", "outside the allowed modules"),
        ("builtins:eval", "outside the allowed modules"),
    ],
)
def test_a_payload_naming_anything_but_a_module_level_function_is_refused(
    path: str, match: str
) -> None:
    loader = JobLoader(("app.", "tests."))
    raw = orjson.dumps({"job": path, "data": {"args": ["echo pwned"], "kwargs": {}}})
    with pytest.raises(UnknownJobError, match=match):
        loader.load(raw, job_id="hostile", attempts=1)


def test_a_module_level_function_loads_as_the_class_dispatch_made() -> None:
    from core.functions import function_job

    loader = JobLoader(("tests.",))
    raw = orjson.dumps({"job": "tests.seed_jobs_c:add", "data": {"args": [1], "kwargs": {}}})
    decoded = loader.load(raw, job_id="j1", attempts=1)
    assert type(decoded.job) is type(function_job(c.add, [1]))
    assert decoded.max_tries == 1
    assert (decoded.job.id, decoded.job.func_name) == ("j1", "tests.seed_jobs_c.add")  # type: ignore[attr-defined]
    assert decoded.job.description is None and decoded.job.meta == {}  # type: ignore[attr-defined]
    bad = orjson.dumps({"job": "tests.seed_jobs_c:add", "data": {"args": [1]}})
    with pytest.raises(PayloadError, match=r"exactly \{\"args\""):
        loader.load(bad, job_id="j2", attempts=1)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"handle_args": {"a": 1}}, "'handle_args' must be a list"),
        ({"step": -1}, "'step' must be a whole number, 0 or more"),
        ({"step": 1.5}, "'step' must be a whole number"),
        ({"step": True}, "'step' must be a whole number"),
        ({"description": ["x"]}, "'description' must be a string"),
        ({"description": "x" * 1001}, "'description' must be a string of at most 1000"),
        ({"meta": "x"}, "'meta' must be an object"),
        ({"callbacks": []}, "'callbacks' must be an object"),
        ({"callbacks": {"done": {"path": "tests.a.b"}}}, "unknown kind 'done'"),
        ({"callbacks": {"success": "tests.a.b"}}, "'callbacks.success' must be an object"),
        ({"callbacks": {"success": {"path": 5}}}, r"'callbacks.success.path' must be a string"),
        ({"callbacks": {"failure": {"path": "os.system"}}}, "outside the allowed modules"),
        ({"callbacks": {"failure": {"path": "a b"}}}, "is not of the form"),
        (
            {"callbacks": {"stopped": {"path": "tests.a.b", "timeout": 0}}},
            r"'callbacks.stopped.timeout' must be a number of seconds over 0",
        ),
        (
            {"callbacks": {"stopped": {"path": "tests.a.b", "timeout": "60"}}},
            r"'callbacks.stopped.timeout'",
        ),
    ],
)
def test_a_payload_lying_about_the_new_fields_is_refused_naming_the_field(
    extra: dict[str, Any], match: str
) -> None:
    loader = JobLoader(("tests.",))
    raw = orjson.dumps({"job": "tests.seed_jobs_c:Ping", "data": {"count": 1}, **extra})
    with pytest.raises(PayloadError, match=match):
        loader.load(raw, job_id="lie", attempts=1)


def test_handle_args_are_for_job_classes_only() -> None:
    loader = JobLoader(("tests.",))
    raw = orjson.dumps(
        {"job": "tests.seed_jobs_c:add", "data": {"args": [], "kwargs": {}}, "handle_args": [1]}
    )
    with pytest.raises(PayloadError, match="'handle_args' is for job classes"):
        loader.load(raw, job_id="x", attempts=1)


def test_the_new_fields_are_written_back_on_load() -> None:
    loader = JobLoader(("tests.",))
    callbacks = {"success": {"path": "tests.seed_jobs_c.on_success", "timeout": 2}}
    raw = orjson.dumps(
        {
            "job": "tests.seed_jobs_c:Ping",
            "data": {"count": 1},
            "handle_args": [1, "a"],
            "description": "d",
            "meta": {"k": 1},
            "callbacks": callbacks,
        }
    )
    state = loader.load(raw, job_id="ok", attempts=1).job.__dict__
    assert state["_topiq_args"] == [1, "a"]  # `step`: a steps class's (adversarial tests)
    assert (state["_topiq_description"], state["_topiq_meta"]) == ("d", {"k": 1})
    assert state["_topiq_callbacks"] == callbacks
    assert loader.load(raw, job_id="ok", attempts=1).job.data() == {"count": 1}


def test_resolve_function_follows_the_same_rule() -> None:
    allowed = ("tests.",)
    assert resolve_function("tests.seed_jobs_c.on_success", allowed) is c.on_success
    assert resolve_function("tests.seed_jobs_c:decorated", allowed) is c.decorated.function
    for path, match in [
        ("tests.seed_jobs_c.system", "builtin"),
        ("tests.seed_jobs_c.run", "not defined in tests.seed_jobs_c"),
        ("tests.seed_jobs_c.Ping", "the class Ping"),
        ("tests.seed_jobs_c.nope", "has no function 'nope'"),
        ("tests.no_such_module.f", "cannot be imported"),
        ("os.system", "outside the allowed modules"),
        ("just_a_name", "is not of the form"),
    ]:
        with pytest.raises(UnknownJobError, match=match):
            resolve_function(path, allowed)


# -- a hostile payload in a real backend, and a worker process ---------------------------------


@pytest.mark.process
async def test_a_worker_process_runs_enqueued_functions_and_refuses_a_hostile_payload(
    server_backend: Backend, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    async with QueueManager(server_backend.settings()) as manager:
        set_default_manager(manager)
        try:
            q = Queue("rq-worker")
            summed = await q.enqueue(c.add, 2, b=3, description="sum", meta={"m": 1})
            by_path = await q.enqueue("tests.seed_jobs_c.count_words", "one two three")
            retried = await q.enqueue(c.fail, "again", retry=RetryPolicy(max=1, interval=0))
            driver: Driver = await manager.connection()
            plain = await q.enqueue(c.add, 0)  # its payload is then rewritten to a lie
            lie = await _rewrite(driver, plain, "tests.seed_jobs_c:system", f"touch {marker}")
            hostile = manager.job(lie, queue="rq-worker")
            worker = WorkerProcess(
                ["--queue", "rq-worker"], server_backend.env(), tmp_path / "w.log"
            )
            try:
                assert await summed.result(timeout=30) == 5
                assert await by_path.result(timeout=30) == 3
                with pytest.raises(Exception, match="again"):
                    await retried.result(timeout=30)
                assert (await retried.status()).attempts == 2  # max=1: two tries
                with pytest.raises(Exception, match="builtin 'system'"):
                    await hostile.result(timeout=30)
                record = await summed.status()
                assert (record.description, record.meta) == ("sum", {"m": 1})
            finally:
                worker.stop()
        finally:
            set_default_manager(None)
    assert not marker.exists()


async def _rewrite(driver: Driver, handle: JobHandle, path: str, arg: str) -> str:
    """Put a payload naming `path` in place of the waiting job's (as a hostile writer to the
    backend would): cancel it and push the lie under a new id."""
    from core.queue.drivers import OutgoingJob

    raw = await driver.job_payload(handle, handle.queue)
    assert raw is not None
    envelope = orjson.loads(raw)
    await driver.cancel(handle, handle.queue)
    envelope["job"] = path
    envelope["data"] = {"args": [arg], "kwargs": {}}
    envelope["id"] = f"{handle}-lie"
    await driver.push(
        [OutgoingJob(f"{handle}-lie", handle.queue or "", orjson.dumps(envelope), 0.0, job=path)]
    )
    return f"{handle}-lie"


def count_pushes(driver: Driver, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = driver.push

    async def push(jobs: Any) -> Any:
        calls.append(len(jobs))
        return await real(jobs)

    monkeypatch.setattr(driver, "push", push)
    return calls
