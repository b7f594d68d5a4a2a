"""Hostile review of issue #16's dispatch and payload side (Masonite `push` styles, RQ's
`enqueue` in core/queue/enqueue.py, functions as jobs without `@job`, the envelope fields
`handle_args`/`step`/`description`/`meta`/`callbacks`, `creation_hook`).

Each test passes when the behaviour is right. A defect found by this review is a test marked
`xfail(strict=True)` whose reason names it; notes/review16-breakit-dispatch.md lists each one
with how to reproduce it, where it is and the fix suggested. Storage behaviour runs over every
backend (the `backend`/`manager` fixtures); what lives in a process runs a real worker process.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import (
    DuplicateJobError,
    PayloadError,
    QueueFullError,
    SerializationError,
    UnknownJobError,
    UnloadableJobError,
)
from core.functions import function_job, resolve_function
from core.job import Job
from core.queue.drivers import Driver, OutgoingJob
from core.queue.enqueue import PreparedJob
from core.queue.payload import MAX_KEEP_SECONDS, JobLoader, callbacks_problem
from core.queue.queue_manager import (
    Callback,
    Queue,
    QueueManager,
    RetryPolicy,
    prepare_data,
    set_default_manager,
)
from tests import seed_jobs_b as b
from tests import seed_jobs_c as c
from tests.conftest import Backend, make_settings
from tests.processes import WorkerProcess, wait_until

pytestmark = pytest.mark.timeout(120)

# -- what the hostile sender hands over ----------------------------------------------------------


class CallableThing:
    """A callable object instance: not a function."""

    def __call__(self, *args: Any) -> None:
        return None


class Holder:
    """A class with a method and a staticmethod."""

    def method(self, *args: Any) -> None:
        return None

    @staticmethod
    def static(*args: Any) -> None:
        return None


class CtorRaises(Job):
    """A job class whose constructor raises."""

    queue = "adv-c"

    def __init__(self) -> None:
        raise RuntimeError("constructor of CtorRaises failed")

    async def handle(self) -> None:
        return None


class HostileCreationHook(Job):
    """A `creation_hook` naming a builtin by its dotted path: never resolved, the job stays."""

    queue = "adv-c"
    creation_hook = "os.system"

    async def handle(self) -> str:
        return "ok"


def wait_for_release(log: str, release: str) -> str:
    """A plain function job (no `@job`) that notes its start in `log`, then waits until the
    file `release` exists (the test creates it)."""
    with open(log, "a") as out:
        out.write("started\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


@pytest.fixture
async def memory() -> AsyncIterator[QueueManager]:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


async def waiting(manager: QueueManager, queue: str) -> int:
    """Every job the backend holds on `queue` that has not ended (ready, delayed, reserved,
    deferred)."""
    driver = await manager.connection()
    return (await driver.stats(queue)).size


# -- callbacks: hostile values at enqueue ----------------------------------------------------------


HOSTILE_CALLBACKS: list[tuple[str, Any, type[Exception], str]] = [
    ("os.system", os.system, SerializationError, "is a builtin"),
    ("eval by path", "builtins.eval", SerializationError, "outside the allowed modules"),
    ("colon path into a module", "app.jobs:subprocess.run", ValueError, "is not of the form"),
    ("core path", "core.functions.resolve_function", SerializationError, "outside the allowed"),
    ("subprocess.run", subprocess.run, SerializationError, "outside the allowed modules"),
    ("nested", c.make_nested(), SerializationError, "defined inside a function"),
    ("bound method", Holder().method, SerializationError, "bound method"),
    ("staticmethod", Holder.static, SerializationError, "method of a class"),
    ("callable object", CallableThing(), SerializationError, "is a CallableThing"),
    ("lambda", lambda *a: None, SerializationError, "is a lambda"),
    ("partial", functools.partial(c.on_success), SerializationError, "functools.partial"),
    ("a number in Callback", Callback(5), SerializationError, "5 is a int"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [pytest.param(v, e, m, id=i) for i, v, e, m in HOSTILE_CALLBACKS],
)
async def test_a_hostile_callback_is_refused_at_enqueue_naming_the_option(
    memory: QueueManager, value: Any, error: type[Exception], match: str
) -> None:
    for option in ("on_success", "on_failure", "on_stopped"):
        with pytest.raises(error, match=match) as raised:
            await Queue("adv-cb").enqueue(c.add, 1, **{option: value})
        assert option in str(raised.value)
    assert await waiting(memory, "adv-cb") == 0


@pytest.mark.parametrize(
    "path",
    [
        "tests.seed_jobs_c.run",  # subprocess.run, imported into an allowed module
        "tests.seed_jobs_c.system",  # os.system, likewise
        "tests.seed_jobs_c.nope",  # nothing by that name
        "tests.seed_jobs_c.Ping",  # a class
    ],
)
async def test_a_callback_path_is_held_to_the_function_rule_at_enqueue(
    memory: QueueManager, path: str
) -> None:
    # The function itself by such a path is refused at enqueue (test above); its callback
    # must be too, rather than fail on the worker after the job's function has run.
    with pytest.raises(SerializationError, match="on_success"):
        await Queue("adv-cb").enqueue(c.add, 1, on_success=path)
    assert await waiting(memory, "adv-cb") == 0


# -- functions: hostile values at enqueue and push ------------------------------------------------


HOSTILE_FUNCTIONS: list[tuple[str, Any, type[Exception], str]] = [
    ("os.system", os.system, SerializationError, "is a builtin"),
    ("eval", eval, SerializationError, "is a builtin"),
    ("os.system by path", "os.system", UnloadableJobError, "outside the allowed modules"),
    ("core by path", "core.functions.job", UnloadableJobError, "outside the allowed modules"),
    ("colon path", "app.jobs:subprocess.run", TypeError, "is not of the form"),
    ("re-exported run", "tests.seed_jobs_c.run", SerializationError, "not defined in"),
    ("re-exported system", "tests.seed_jobs_c.system", SerializationError, "builtin"),
    ("missing name", "tests.seed_jobs_c.nope", SerializationError, "has no function 'nope'"),
    ("subprocess.run", subprocess.run, UnloadableJobError, "outside the allowed modules"),
    ("nested", c.make_nested(), SerializationError, "defined inside a function"),
    ("locals path", "tests.seed_jobs_c:make_nested.<locals>.nested", TypeError, "not of the"),
    ("bound method", Holder().method, SerializationError, "bound method"),
    ("staticmethod", Holder.static, SerializationError, "method of a class"),
    ("callable object", CallableThing(), SerializationError, "is a CallableThing"),
    ("lambda", lambda: 1, SerializationError, "is a lambda"),
    ("module lambda", c.lambda_job, SerializationError, "is a lambda"),
    ("None", None, SerializationError, "is a NoneType"),
]


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [pytest.param(v, e, m, id=i) for i, v, e, m in HOSTILE_FUNCTIONS],
)
async def test_what_cannot_be_a_job_is_refused_at_enqueue_naming_it(
    memory: QueueManager, target: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await Queue("adv-fn").enqueue(target)
    if not isinstance(target, str):
        with pytest.raises((error, SerializationError, UnloadableJobError, TypeError)):
            await memory.push(target, args=[], queue="adv-fn")
    assert await waiting(memory, "adv-fn") == 0


async def test_every_rq_option_of_the_wrong_type_is_refused_naming_it_and_nothing_is_stored(
    manager: QueueManager,
) -> None:
    q = Queue("adv-opt")
    wrong: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"job_timeout": "1 fortnight"}, ValueError, r"enqueue\(job_timeout=...\)"),
        ({"job_timeout": True}, ValueError, r"job_timeout"),
        ({"job_timeout": float("nan")}, ValueError, r"job_timeout"),
        ({"job_timeout": [1]}, ValueError, r"job_timeout"),
        ({"result_ttl": "forever"}, ValueError, r"result_ttl"),
        ({"result_ttl": -2}, ValueError, r"result_ttl"),
        ({"failure_ttl": {}}, ValueError, r"failure_ttl"),
        ({"ttl": 0}, ValueError, r"ttl=...\) must be over 0"),
        ({"ttl": -5}, ValueError, r"ttl"),
        ({"at_front": "yes"}, TypeError, r"at_front"),
        ({"at_front": 1}, TypeError, r"at_front"),
        ({"job_id": 5}, ValueError, r"job_id"),
        ({"job_id": ""}, ValueError, r"job_id"),
        ({"job_id": "a b"}, ValueError, r"job_id"),
        ({"job_id": "x" * 10_000}, ValueError, r"job_id"),
        ({"description": 5}, ValueError, r"description"),
        ({"description": "x" * 10_000_000}, ValueError, r"description.*at most 1000"),
        ({"meta": [1]}, TypeError, r"meta"),
        ({"meta": "x"}, TypeError, r"meta"),
        ({"meta": {1: 2}}, SerializationError, r"meta"),
        ({"meta": {"o": object()}}, SerializationError, r"meta"),
        ({"retry": 3}, TypeError, r"retry"),
        ({"retry": {"max": 3}}, TypeError, r"retry"),
        ({"depends_on": 3.5}, SerializationError, r"depends_on"),
        ({"depends_on": "never-dispatched"}, Exception, r"unknown job never-dispatched"),
        ({"args": "ab"}, TypeError, r"args=...\) must be a list or tuple"),
        ({"args": b"ab"}, TypeError, r"args="),
        ({"args": {"a": 1}}, TypeError, r"args="),
        ({"args": {1, 2}}, TypeError, r"args="),
        ({"args": (i for i in range(2))}, TypeError, r"args="),
        ({"kwargs": [1]}, TypeError, r"kwargs=...\) must be a dict"),
        ({"kwargs": {1: 2}}, TypeError, r"kwargs="),
        ({"kwargs": {"b": 1}, "b": 2}, TypeError, r"b given twice"),
        ({"pipeline": object()}, TypeError, r"pipeline"),
        ({"on_success": 5}, SerializationError, r"on_success"),
        ({"a": object()}, SerializationError, r"argument 'a'"),
        ({"timeout": 5}, TypeError, r"unexpected keyword argument 'timeout'"),
    ]
    for options, error, match in wrong:
        call = options if "args" in options else {"a": 1, **options}
        with pytest.raises(error, match=match):
            await q.enqueue(c.add, **call)
    with pytest.raises(TypeError, match="not both"):
        await q.enqueue(c.add, 1, args=[2])
    assert await waiting(manager, "adv-opt") == 0


async def test_retry_policy_and_callback_refuse_nonsense() -> None:
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: RetryPolicy(max=-1), r"max=...\) must be a whole number, 1 or more, got -1"),
        (lambda: RetryPolicy(max=0), r"1 or more"),
        (lambda: RetryPolicy(max=10**9), r"at most 999"),
        (lambda: RetryPolicy(max=True), r"whole number"),
        (lambda: RetryPolicy(max=2.0), r"whole number"),  # type: ignore[arg-type]
        (lambda: RetryPolicy(max=1, interval=-1), r"interval"),
        (lambda: RetryPolicy(max=1, interval=[]), r"empty list"),
        (lambda: RetryPolicy(max=1, interval=float("inf")), r"interval"),
        (lambda: Callback(c.on_success, timeout=0), r"over 0"),
        (lambda: Callback(c.on_success, timeout=float("nan")), r"timeout"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()


async def test_extreme_but_valid_options_are_stored_as_documented(manager: QueueManager) -> None:
    q = Queue("adv-ext")
    kept = await q.enqueue(
        c.add, 1, result_ttl=-1, job_timeout=-1, retry=RetryPolicy(max=999, interval=[0, 1])
    )
    driver = await manager.connection()
    raw = await driver.job_payload(kept, "adv-ext")
    assert raw is not None
    envelope = orjson.loads(raw)
    assert envelope["result_ttl"] == MAX_KEEP_SECONDS
    assert envelope["timeout"] == 30 * 24 * 3600 and envelope["max_tries"] == 1000
    assert envelope["retry_after"] == [0, 1]


# -- payloads that lie ------------------------------------------------------------------------


def _load(envelope: dict[str, Any], allowed: tuple[str, ...] = ("tests.",)) -> Job:
    return JobLoader(allowed).load(orjson.dumps(envelope), job_id="lie", attempts=1).job


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"handle_args": {"a": 1}}, "'handle_args' must be a list"),
        ({"handle_args": "abc"}, "'handle_args' must be a list"),
        ({"step": 1e30}, "'step' must be a whole number"),  # JSON 10**30 loads as a float
        ({"step": -1}, "'step' must be a whole number, 0 or more"),
        ({"step": True}, "'step' must be a whole number"),
        ({"step": "1"}, "'step' must be a whole number"),
        ({"description": "x" * 10_000_000}, "'description' must be a string of at most 1000"),
        ({"description": None}, "'description' must be a string"),
        ({"meta": [1, 2]}, "'meta' must be an object"),
        ({"meta": None}, "'meta' must be an object"),
        ({"callbacks": {"success": {"path": "os.system"}}}, "outside the allowed modules"),
        ({"callbacks": {"success": {"path": "builtins.eval"}}}, "outside the allowed modules"),
        ({"callbacks": {"failure": {"path": "app.jobs:subprocess.run"}}}, "is not of the form"),
        ({"callbacks": {"stopped": {"path": "core.cli.main"}}}, "outside the allowed modules"),
        ({"callbacks": {"success": {"path": "tests.x.f", "timeout": 10**9}}}, "timeout"),
        ({"callbacks": {"success": {"path": "tests.x.f", "timeout": -1}}}, "timeout"),
        ({"callbacks": {"success": {"path": "tests.x.f", "extra": 1}}}, "'path' and 'timeout'"),
        ({"callbacks": {"success": None}}, "must be an object"),
    ],
)
def test_a_lying_envelope_field_is_refused_naming_it(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        _load({"job": "tests.seed_jobs_c:Ping", "data": {"count": 1}, **extra})


@pytest.mark.parametrize(
    "path",
    [
        "tests.seed_jobs_c:system",
        "tests.seed_jobs_c:run",
        "tests.seed_jobs_c:subprocess.run",
        "tests.seed_jobs_c:Ping.handle",
        "tests.test_seed_adversarial_dispatch:Holder.static",
        "tests.test_seed_adversarial_dispatch:Holder.method",
        "tests.test_seed_adversarial_dispatch:CallableThing",
        "tests.seed_jobs_c:lambda_job",
        "tests.seed_jobs_c:functools.partial",
        "core.functions:resolve_function",
        "builtins:eval",
        "os:system",
    ],
)
def test_a_payload_naming_anything_but_a_module_level_function_never_loads(path: str) -> None:
    with pytest.raises(PayloadError):
        _load({"job": path, "data": {"args": ["touch /tmp/pwned"], "kwargs": {}}})


@pytest.mark.parametrize(
    "path",
    ["tests.seed_jobs_c.run", "tests.seed_jobs_c.system", "tests.seed_jobs_c.Ping", "os.system"],
)
def test_a_callback_path_never_resolves_to_what_the_module_imported(path: str) -> None:
    with pytest.raises(UnknownJobError):
        resolve_function(path, ("tests.",))


def test_a_step_past_the_last_step_is_refused() -> None:
    envelope = {
        "job": "tests.seed_jobs_b:StepJob",
        "data": {"log": "/dev/null", "block_on": 0, "fail_on": [], "workspace": {"start": 1}},
        "step": 2**63 - 1,
    }
    with pytest.raises(PayloadError, match="step"):
        _load(envelope)


async def test_a_job_whose_payload_skips_every_step_does_not_succeed(tmp_path: Path) -> None:
    # On the sync connection the job runs inline through core.execution, as on a worker.
    log = tmp_path / "steps.log"
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        job = b.StepJob(str(log))
        job.__dict__["_topiq_step"] = 99  # what a rewritten payload says
        try:
            handle = await manager.push(job)
        except Exception:
            return  # refused: right
        status = await handle.status()
        assert status.status != "succeeded" or log.exists(), "no step ran, yet it succeeded"


async def test_meta_that_json_cannot_hold_exactly_is_refused(memory: QueueManager) -> None:
    with pytest.raises((SerializationError, ValueError), match="meta"):
        await Queue("adv-meta").enqueue(c.add, 1, meta={"ratio": float("nan")})


# -- Masonite push styles --------------------------------------------------------------------------


async def test_push_of_a_job_then_a_queue_then_a_job_is_refused(memory: QueueManager) -> None:
    with pytest.raises(TypeError, match="at most a queue and a connection"):
        await memory.push(c.Ping(), "adv-c", c.Ping())  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="queue='adv-c'"):
        await memory.push(c.Ping(), c.Ping(), "adv-c")  # type: ignore[call-overload]
    assert await waiting(memory, "adv-c") == 0 and await waiting(memory, "seed-c") == 0


async def test_push_of_classes_that_cannot_be_built_stores_nothing(manager: QueueManager) -> None:
    with pytest.raises(TypeError, match=r"NeedsArgs cannot be built with no arguments"):
        await manager.push(c.Ping, c.NeedsArgs)
    with pytest.raises(RuntimeError, match="constructor of CtorRaises failed"):
        await manager.push(c.Ping, CtorRaises)

    class Local(Job):  # a Job class no worker could import
        async def handle(self) -> None:
            return None

    with pytest.raises(UnloadableJobError, match="defined inside a function"):
        await manager.push(c.Ping, Local)
    with pytest.raises(SerializationError, match="got int"):
        await manager.push(c.Ping, 5)  # type: ignore[call-overload]
    with pytest.raises(SerializationError, match="at_front"):
        await manager.push(c.Ping, c.Ping, at_front="yes")  # type: ignore[call-overload]
    assert await waiting(manager, "seed-c") == 0


async def test_a_hostile_creation_hook_is_never_called_and_the_job_is_kept(
    memory: QueueManager, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await memory.push(HostileCreationHook())
    assert (await handle.status()).status == "queued"
    assert "creation_hook of HostileCreationHook failed" in caplog.text
    assert "outside the allowed modules" in caplog.text


# -- enqueue_many, prepare_data, depends_on -------------------------------------------------------


async def test_enqueue_many_with_one_bad_entry_stores_nothing(manager: QueueManager) -> None:
    q = Queue("adv-many")
    good = prepare_data(c.add, 1)
    with pytest.raises(SerializationError, match="on_success"):
        await q.enqueue_many([good, prepare_data(c.add, 2, on_success="os.system")])
    with pytest.raises(TypeError, match="item 1 is tuple"):
        await q.enqueue_many([good, (c.add, 1)])  # type: ignore[list-item]

    class Local(Job):  # no worker could import it
        async def handle(self) -> None:
            return None

    with pytest.raises(UnloadableJobError, match="defined inside a function"):
        await q.enqueue_many([good, prepare_data(Local())])
    with pytest.raises(TypeError, match="job instance"):
        await q.enqueue_many([good, prepare_data(c.Ping(), 1)])
    with pytest.raises(TypeError, match="depends_on"):
        prepare_data(c.add, 1, depends_on="x")
    with pytest.raises(SerializationError, match="argument 'a'"):
        await q.enqueue_many([good, prepare_data(c.add, object())])
    assert await waiting(manager, "adv-many") == 0


async def test_enqueue_many_with_a_taken_job_id_stores_nothing_or_returns_what_it_stored(
    manager: QueueManager,
) -> None:
    q = Queue("adv-many")
    await q.enqueue(c.add, 0, job_id="adv-taken")
    with pytest.raises(DuplicateJobError) as raised:
        await q.enqueue_many([prepare_data(c.add, 1), prepare_data(c.add, 2, job_id="adv-taken")])
    message = str(raised.value)
    assert not ("the others were" in message and "nothing was queued" in message), message
    stored = await waiting(manager, "adv-many") - 1
    assert stored == 0 or len(getattr(raised.value, "handles", ())) == stored


async def test_enqueue_many_does_not_drop_a_dependency(memory: QueueManager) -> None:
    q = Queue("adv-many")
    first = await q.enqueue(c.add, 1)
    prepared = PreparedJob(c.add, (2,), {}, {"depends_on": first})
    try:
        [second] = await q.enqueue_many([prepared])
    except (TypeError, ValueError):
        return  # refused: right too
    assert (await second.status()).status == "deferred"


# -- enqueue_at / enqueue_in -----------------------------------------------------------------------


async def test_enqueue_at_far_past_future_naive_and_aware(manager: QueueManager) -> None:
    q = Queue("adv-at")
    past = await q.enqueue_at(datetime(1, 1, 1), c.add, 1)  # naive: UTC; runs at once
    assert (await past.status()).status == "queued"
    plus5 = timezone(timedelta(hours=5))
    assert await (await q.enqueue_at(datetime.min.replace(tzinfo=plus5), c.add, 1)).status()
    when = datetime.now(UTC).replace(microsecond=0, tzinfo=None) + timedelta(days=3)
    naive = await (await q.enqueue_at(when, c.add, 1)).status()
    aware = await (await q.enqueue_at(when.replace(tzinfo=UTC), c.add, 1)).status()
    shifted = await (await q.enqueue_at(when.replace(tzinfo=plus5), c.add, 1)).status()
    assert naive.status == aware.status == "scheduled"
    assert naive.due_at is not None and aware.due_at is not None and shifted.due_at is not None
    assert abs(naive.due_at - aware.due_at) < 1
    assert abs((aware.due_at - shifted.due_at) - 5 * 3600) < 1
    late = await (await q.enqueue_at(datetime(9998, 6, 1), c.add, 1)).status()
    assert late.status == "scheduled"
    for too_late in (datetime.max, datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))):
        with pytest.raises(ValueError, match="after 9999-01-01"):
            await q.enqueue_at(too_late, c.add, 1)
    for delay, error in [(float("inf"), ValueError), (10**30, ValueError), (-1, ValueError)]:
        with pytest.raises(error):
            await q.enqueue_in(delay, c.add, 1)
    with pytest.raises(TypeError, match="timedelta or a number"):
        await q.enqueue_in("10 minutes", c.add, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes a datetime"):
        await q.enqueue_at("2030-01-01", c.add, 1)  # type: ignore[arg-type]
    assert await waiting(manager, "adv-at") == 6


# -- the same job_id from two senders at once ------------------------------------------------------


async def test_two_senders_enqueueing_the_same_job_id_at_once_store_it_once(
    server_backend: Backend,
) -> None:
    """Two managers are two connections, as two processes would hold (the memory backend is
    one process's own, so it is not among these)."""
    async with (
        QueueManager(server_backend.settings()) as one,
        QueueManager(server_backend.settings()) as two,
    ):
        await (await one.connection()).stats("adv-race")  # tables exist before the race
        ids = [f"adv-race-{n}" for n in range(20)]

        async def send(manager: QueueManager, job_id: str, value: int) -> str:
            try:
                await Queue("adv-race", manager=manager).enqueue(c.add, value, job_id=job_id)
            except DuplicateJobError:
                return "duplicate"
            return "created"

        outcomes = await asyncio.gather(
            *(send(m, i, n) for i in ids for n, m in enumerate((one, two)))
        )
        assert sorted(outcomes).count("created") == len(ids), outcomes
        assert await waiting(one, "adv-race") == len(ids)
        assert sorted(await Queue("adv-race", manager=one).job_ids()) == sorted(ids)


# -- is_async=False ------------------------------------------------------------------------------


async def test_is_async_false_with_a_failing_function_raises_and_keeps_the_failure() -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        q = Queue("adv-sync", is_async=False, manager=manager)
        with pytest.raises(ValueError, match="inline failure"):
            await q.enqueue(c.fail, "inline failure", job_id="adv-sync-1")
        status = await manager.job("adv-sync-1", "sync").status()
        assert status.status == "failed" and "inline failure" in status.error


async def test_is_async_false_with_several_jobs_loses_none_when_one_fails() -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        q = Queue("adv-sync", is_async=False, manager=manager)
        with pytest.raises(ValueError, match="first fails"):
            await q.enqueue_many(
                [prepare_data(c.fail, "first fails"), prepare_data(c.add, 1, job_id="adv-after")]
            )
        assert (await manager.job("adv-after", "sync").status()).status == "succeeded"


# -- inspection ------------------------------------------------------------------------------------


async def test_fetch_job_of_an_id_in_another_queue_is_none(manager: QueueManager) -> None:
    other = await Queue("adv-other").enqueue(c.add, 1)
    assert await Queue("adv-mine").fetch_job(str(other)) is None


async def test_fetch_job_of_unknown_or_malformed_ids(manager: QueueManager) -> None:
    q = Queue("adv-mine")
    assert await q.fetch_job("adv-never") is None
    for bad in ("a b", "", 5, "x" * 500):
        with pytest.raises(ValueError, match="job id"):
            await q.fetch_job(bad)  # type: ignore[arg-type]


async def test_count_and_job_ids_agree_with_a_delayed_job_waiting(manager: QueueManager) -> None:
    q = Queue("adv-count")
    ready = await q.enqueue(c.add, 1)
    await q.enqueue_in(600, c.add, 2)
    assert await q.count() == len(await q.job_ids()) == 1
    assert await q.job_ids() == [str(ready)]
    with pytest.raises(ValueError, match="offset"):
        await q.job_ids(-1)
    with pytest.raises(ValueError, match="length"):
        await q.job_ids(0, -2)


async def test_job_ids_of_ten_thousand_jobs_is_paged_not_one_trip_per_job(
    server_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = server_backend.kind
    async with QueueManager(server_backend.settings()) as manager:
        q = Queue("adv-10k", manager=manager)
        sent: list[str] = []
        for start in range(0, 10_000, 1000):
            handles = await q.enqueue_many(
                [prepare_data(c.add, n) for n in range(start, start + 1000)]
            )
            sent.extend(str(h) for h in handles)
        driver = await manager.connection()
        calls: list[int] = []
        browse = driver.browse

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return await browse(*args, **kwargs)

        monkeypatch.setattr(driver, "browse", counted)
        started = time.perf_counter()
        ids = await q.job_ids()
        took = time.perf_counter() - started
        assert ids == sent
        assert len(calls) <= 10_000 // 500 + 1, f"{len(calls)} browse calls"
        assert took < 20, f"job_ids() of 10,000 took {took:.1f}s on {kind}"
        print(f"job_ids() of 10,000 on {kind}: {took:.2f}s, {len(calls)} round trips")


async def test_enqueue_many_with_job_ids_on_sql_is_not_a_statement_per_job(
    server_backend: Backend,
) -> None:
    from sqlalchemy import event

    if server_backend.connection == "redis":
        pytest.skip("one Lua call per push on Redis")
    async with QueueManager(server_backend.settings()) as manager:
        q = Queue("adv-ids", manager=manager)
        await q.count()  # the tables exist
        driver: Any = await manager.connection()
        statements: list[str] = []

        def count(*args: Any) -> None:
            statements.append(str(args[2])[:40])

        engine = driver._engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            await q.enqueue_many([prepare_data(c.add, n, job_id=f"adv-id-{n}") for n in range(200)])
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert await q.count() == 200
        assert len(statements) < 50, f"{len(statements)} statements for 200 jobs"


# -- worker processes -----------------------------------------------------------------------------


@pytest.mark.process
async def test_a_path_no_worker_can_import_ends_failed_not_lost_nor_retried_for_ever(
    server_backend: Backend, tmp_path: Path
) -> None:
    async with QueueManager(server_backend.settings()) as manager:
        q = Queue("adv-missing", manager=manager)
        missing = await q.enqueue(
            "tests.no_such_module_adv.work", 1, retry=RetryPolicy(max=2, interval=0)
        )
        unknown_name = await q.enqueue("tests.seed_jobs_c:add", 1)
        driver: Driver = await manager.connection()
        raw = await driver.job_payload(unknown_name, "adv-missing")
        assert raw is not None
        envelope = orjson.loads(raw)
        await driver.cancel(unknown_name, "adv-missing")
        envelope["job"], envelope["id"] = "tests.seed_jobs_c:gone_function", "adv-gone"
        await driver.push(
            [
                OutgoingJob(
                    "adv-gone", "adv-missing", orjson.dumps(envelope), 0.0, job=envelope["job"]
                )
            ]
        )
        worker = WorkerProcess(["--queue", "adv-missing"], server_backend.env(), tmp_path / "w")
        try:
            with pytest.raises(Exception, match=r"tests\.no_such_module_adv"):
                await missing.result(timeout=45)
            with pytest.raises(Exception, match="gone_function"):
                await manager.job("adv-gone", queue="adv-missing").result(timeout=45)
        finally:
            worker.stop()
        for handle in (missing, manager.job("adv-gone", queue="adv-missing")):
            status = await handle.status()
            assert status.status == "failed" and status.attempts <= 3, status
        assert await waiting(manager, "adv-missing") == 0


@pytest.mark.process
async def test_empty_while_a_worker_runs_a_job_removes_only_the_waiting_ones(
    server_backend: Backend, tmp_path: Path
) -> None:
    log, release = tmp_path / "runs.log", tmp_path / "release"
    async with QueueManager(server_backend.settings()) as manager:
        q = Queue("adv-empty", manager=manager)
        running = await q.enqueue(wait_for_release, str(log), str(release))
        for _ in range(3):
            await q.enqueue(wait_for_release, str(log), str(release))
        worker = WorkerProcess(
            ["--queue", "adv-empty", "--concurrency", "1", "--prefetch", "0"],
            server_backend.env(),
            tmp_path / "w.log",
        )
        try:
            wait_until(log.exists, 30, "the first job to start")
            assert await q.empty() == 3
            assert await q.count() == 0 and await q.job_ids() == []
            release.touch()
            assert await running.result(timeout=30) == "released"
        finally:
            worker.stop()
        assert log.read_text().splitlines() == ["started"]
        assert (await running.status()).status == "succeeded"


# -- after the fixes: what each one promises beyond the reviewer's case ---------------------------


class Bounded(Job):
    """A job whose queue holds at most one waiting job (overflow "reject")."""

    queue = "adv-bounded"
    max_queue_length = 1

    async def handle(self) -> None:
        return None


class Measured(Job):
    """A job class whose data is a float."""

    queue = "adv-c"

    def __init__(self, ratio: float | None) -> None:
        self.ratio = ratio

    async def handle(self) -> None:
        return None


async def test_is_async_false_stores_and_runs_every_job_and_names_each_failure() -> None:
    # D1: push(a, b, c) on sync with two failing: all three stored and run; the first failure
    # is raised, with a note naming both failed ids.
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        q = Queue("adv-sync", is_async=False, manager=manager)
        with pytest.raises(ValueError, match="one fails") as raised:
            await q.enqueue_many(
                [
                    prepare_data(c.fail, "one fails", job_id="adv-s1"),
                    prepare_data(c.fail, "two fails", job_id="adv-s2"),
                    prepare_data(c.add, 2, 3, job_id="adv-s3"),
                ]
            )
        notes = " ".join(getattr(raised.value, "__notes__", []))
        assert "2 of the 3 jobs" in notes and "adv-s1" in notes and "adv-s2" in notes
        statuses = [(await manager.job(i, "sync").status()).status for i in ("adv-s1", "adv-s2")]
        assert statuses == ["failed", "failed"]
        assert await manager.job("adv-s3", "sync").result() == 5
        # One job: its own error, no note added.
        with pytest.raises(ValueError, match="alone") as single:
            await q.enqueue(c.fail, "alone")
        assert not getattr(single.value, "__notes__", [])


async def test_a_callback_path_that_passes_the_function_rule_or_lives_elsewhere_is_kept(
    memory: QueueManager,
) -> None:
    # D2: a good path is accepted; one whose module this process cannot import (another code
    # base's, under an allowed prefix) is kept with the prefix check only, as before.
    q = Queue("adv-cb")
    await q.enqueue(c.add, 1, on_success="tests.seed_jobs_c.on_success")
    await q.enqueue(c.add, 1, on_failure="tests.seed_jobs_c:decorated")  # a @job function
    await q.enqueue(c.add, 1, on_stopped="tests.not_here_adv.on_stopped")
    with pytest.raises(SerializationError, match=r"on_failure.*has no function 'nope'"):
        await q.enqueue_many([prepare_data(c.add, 1, on_failure="tests.seed_jobs_c.nope")])
    assert await waiting(memory, "adv-cb") == 3


def test_a_step_is_taken_up_to_the_number_of_steps_and_only_by_a_steps_class() -> None:
    # D3: 0..len(steps) load (len: every step ran and was saved); a class without steps
    # takes none.
    data = {"log": "/dev/null", "block_on": 0, "fail_on": [], "workspace": {}}
    for step in (0, 3):
        envelope = {"job": "tests.seed_jobs_b:StepJob", "data": data, "step": step}
        assert _load(envelope).__dict__["_topiq_step"] == step
    with pytest.raises(PayloadError, match=r"'step' 4 is past the last step \(StepJob has 3"):
        _load({"job": "tests.seed_jobs_b:StepJob", "data": data, "step": 4})
    with pytest.raises(PayloadError, match="Ping has no steps"):
        _load({"job": "tests.seed_jobs_c:Ping", "data": {}, "step": 0})


async def test_a_step_past_the_last_is_refused_at_dispatch(manager: QueueManager) -> None:
    job = b.StepJob("/dev/null")
    job.__dict__["_topiq_step"] = 4
    with pytest.raises(SerializationError, match="past the last step"):
        await manager.push(job, queue="adv-steps")
    assert await waiting(manager, "adv-steps") == 0


async def test_nan_and_infinity_are_refused_in_arguments_data_and_handle_args(
    memory: QueueManager,
) -> None:
    # D7: named where they are; None (also written as null) is fine.
    q = Queue("adv-meta")
    with pytest.raises(SerializationError, match=r"meta\['deep'\]\[1\] is NaN or infinite"):
        await q.enqueue(c.add, 1, meta={"deep": [1.0, float("-inf")]})
    with pytest.raises(SerializationError, match=r"add\(\) argument 'b' is NaN or infinite"):
        await q.enqueue(c.add, 1, float("inf"))
    with pytest.raises(SerializationError, match=r"decorated\(\) argument 'x' is NaN"):
        await c.decorated.dispatch(float("nan"))  # the @job path (.make) too
    with pytest.raises(SerializationError, match=r"argument 'args\[0\]'"):
        await q.enqueue("tests.not_here_adv.work", float("nan"))  # a stand-in's arguments
    with pytest.raises(SerializationError, match=r"Measured\.ratio is NaN or infinite"):
        await memory.push(Measured(float("nan")))
    with pytest.raises(SerializationError, match=r"handle_args\[0\] is NaN"):
        await memory.push(c.Ping, args=[float("inf")])
    assert await waiting(memory, "adv-meta") == 0 and await waiting(memory, "adv-c") == 0
    await q.enqueue(c.add, 1, None, meta={"none": None, "text": "null"})
    await memory.push(Measured(None))
    assert await waiting(memory, "adv-meta") == 1 and await waiting(memory, "adv-c") == 1


async def test_a_job_id_given_twice_in_one_call_stores_nothing(manager: QueueManager) -> None:
    # D4: refused before anything is sent, for enqueue_many and push(a, b).
    q = Queue("adv-many")
    with pytest.raises(DuplicateJobError, match="'adv-twice' is given to more than one job"):
        await q.enqueue_many(
            [
                prepare_data(c.add, 1, job_id="adv-twice"),
                prepare_data(c.add, 2),
                prepare_data(c.add, 3, job_id="adv-twice"),
            ]
        )
    one, two = c.Ping(), c.Ping()
    one.job_id = two.job_id = "adv-twice"
    with pytest.raises(DuplicateJobError, match="given to more than one job"):
        await manager.push(one, two)
    assert await waiting(manager, "adv-many") == 0 and await waiting(manager, "seed-c") == 0


async def test_a_bulk_call_meeting_a_taken_id_or_a_full_queue_hands_back_what_it_stored(
    manager: QueueManager,
) -> None:
    # D4: the error's `handles` are the stored jobs', in order; the message says so once.
    q = Queue("adv-many")
    await q.enqueue(c.add, 0, job_id="adv-held")
    with pytest.raises(DuplicateJobError) as raised:
        await q.enqueue_many(
            [
                prepare_data(c.add, 1, job_id="adv-first"),
                prepare_data(c.add, 2, job_id="adv-held"),
                prepare_data(c.add, 3),
            ]
        )
    error = raised.value
    assert "nothing was queued" not in str(error)
    assert "1 of 3 jobs not queued as duplicates" in str(error)
    assert "; the others were queued (their handles" in str(error)
    assert error.existing == "adv-held"
    assert len(error.handles) == 2 and error.handles[0].id == "adv-first"
    for handle in error.handles:
        assert (await handle.status()).status == "queued"
    assert await waiting(manager, "adv-many") == 3
    with pytest.raises(QueueFullError) as full:
        await manager.bulk([Bounded(), Bounded(), Bounded()])
    assert len(full.value.handles) == 1 and "the others were queued" in str(full.value)
    assert (await full.value.handles[0].status()).queue == "adv-bounded"


async def test_a_prepared_job_built_by_hand_is_checked_as_prepare_data_checks(
    memory: QueueManager,
) -> None:
    # D5: its options are checked (naming them), unknown ones refused, valid ones applied.
    q = Queue("adv-many")
    with pytest.raises(ValueError, match=r"job_timeout"):
        await q.enqueue_many([PreparedJob(c.add, (1,), {}, {"job_timeout": "garbage"})])
    with pytest.raises(TypeError, match="unknown option"):
        await q.enqueue_many([PreparedJob(c.add, (1,), {}, {"colour": "red"})])
    with pytest.raises(TypeError, match=r"args=\.\.\.\) must be a list"):
        await q.enqueue_many([PreparedJob(c.add, "12", {}, {})])
    assert await waiting(memory, "adv-many") == 0
    [handle] = await q.enqueue_many(
        [PreparedJob(c.add, [1], {"b": 2}, {"job_id": "adv-hand", "description": "by hand"})]
    )
    assert handle.id == "adv-hand" and (await handle.status()).status == "queued"
    payload = await (await memory.connection()).job_payload("adv-hand")
    assert payload is not None and orjson.loads(payload)["description"] == "by hand"


async def test_fetch_job_of_this_queue_still_finds_it(manager: QueueManager) -> None:
    # D6: the queue's own job is found (the other queue's is None: test above).
    mine = await Queue("adv-mine").enqueue(c.add, 1)
    found = await Queue("adv-mine").fetch_job(mine.id)
    assert found is not None and found.id == mine.id and found.queue == "adv-mine"


def test_an_allowed_modules_entry_is_a_package_with_or_without_its_dot() -> None:
    # `tests` allows the package `tests` and its submodules, not `testsuite` (nor `tests_x`).
    for entry in ("tests", "tests."):
        loader = JobLoader((entry,))
        assert loader.allowed("tests") and loader.allowed("tests.seed_jobs_c")
        assert not loader.allowed("testsuite") and not loader.allowed("tests_x.jobs")
        assert resolve_function("tests.seed_jobs_c.on_success", (entry,)) is c.on_success
        with pytest.raises(UnknownJobError, match="outside the allowed modules"):
            resolve_function("testsuite.mod.f", (entry,))
        with pytest.raises(UnloadableJobError, match="outside the allowed modules"):
            function_job("testsuite.mod.f", (), {}, allowed_modules=(entry,))
        assert callbacks_problem({"success": {"path": "tests_x.m.f"}}, (entry,)) is not None
    assert JobLoader(("",)).allowed("anything.at.all")  # an empty entry: every module


async def test_an_allowed_modules_entry_without_its_dot_at_enqueue() -> None:
    settings = make_settings(queue_connection="memory", queue_allowed_modules=("tests",))
    async with QueueManager(settings) as manager:
        q = Queue("adv-allowed", manager=manager)
        await q.enqueue(c.add, 1)
        await q.enqueue("tests.not_here_adv.work", 1)
        with pytest.raises(UnloadableJobError, match="outside the allowed modules"):
            await q.enqueue("testsuite.jobs.work", 1)
        with pytest.raises(SerializationError, match="on_success"):
            await q.enqueue(c.add, 1, on_success="testsuite.jobs.done")
        assert await waiting(manager, "adv-allowed") == 2
