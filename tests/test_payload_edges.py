"""The edges of a payload: data that would replace what the class defines, settings that are not
plain numbers, classes no worker can import, and class code that fails while a job is rebuilt.

Dispatch refuses what it can see (naming the attribute, queueing nothing); the loader turns
every other problem into `PayloadError` with the reason, which the worker records as a failure.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from core.errors import PayloadError, SerializationError, UnloadableJobError
from core.job import Job
from core.queue import queue_manager as queue_manager_module
from core.queue.payload import JobLoader, encode, unloadable_reason
from core.queue.queue_manager import QueueManager
from core.worker.execution import JobThreads, call_handle
from tests.conftest import ROOT, make_settings
from tests.jobs import RecordJob, events, record
from tests.test_settings import CLEAN

pytestmark = pytest.mark.timeout(60)

PATH = "tests.test_payload_edges"
LOADER = JobLoader(["tests."])


class SummaryJob(Job):
    """Defines a property, a method and a plain class default of its own besides Job's."""

    threshold: ClassVar[float] = 30.0

    def __init__(self, log: str, n: int = 0) -> None:
        self.log = log
        self.n = n

    @property
    def summary(self) -> str:
        return f"n={self.n}"

    def helper(self) -> int:
        return self.n

    async def handle(self) -> None:
        record(self.log, event="run", n=self.n, summary=self.summary)


class UrgentJob(Job):
    """Sets its settings on the instance in `__init__`, as a job that decides per instance."""

    def __init__(self, log: str, urgent: bool = False, queue: str = "urgent") -> None:
        self.log = log
        if urgent:
            self.queue = queue
            self.timeout = 5
            self.max_tries = 9
            self.retry_after = [1, 2]

    async def handle(self) -> None:
        record(
            self.log,
            event="run",
            queue=self.queue,
            timeout=self.timeout,
            max_tries=self.max_tries,
            retry_after=self.retry_after,
        )


class ReadOnlyTimeoutJob(Job):
    """Its `timeout` is a read-only property: a setting that is not a plain value."""

    @property
    def timeout(self) -> float:  # type: ignore[override]
        return 5.0

    async def handle(self) -> None:
        pass


class FrozenJob(Job):
    """Its `__setattr__` raises: the loader must not need it."""

    log: str

    def __init__(self, log: str) -> None:
        object.__setattr__(self, "log", log)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FrozenJob is frozen: cannot set {name}")

    async def handle(self) -> None:
        record(self.log, event="run", id=self.job_id, attempts=self.attempts)


class NoNewJob(Job):
    """Its `__new__` needs an argument the loader cannot give."""

    def __new__(cls, required: str) -> NoNewJob:
        return super().__new__(cls)

    async def handle(self) -> None:
        pass


def payload(job: str, data: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"id": "x", "job": f"{PATH}:{job}", "data": data, **fields})


# -- dispatch: data may only set data attributes ---------------------------------------


@pytest.mark.parametrize("name", ["handle", "failed", "data", "backoff", "publish"])
def test_data_named_like_a_job_method_is_refused_at_dispatch(name: str) -> None:
    job = RecordJob("log")
    setattr(job, name, "x")
    owner = "RecordJob" if name == "handle" else "Job"  # RecordJob defines its own handle
    with pytest.raises(SerializationError, match=rf"RecordJob .*'{name}' is a method of {owner}"):
        encode(job, job_id="a", queue="q", max_bytes=10_000)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("summary", "a property of SummaryJob"),
        ("helper", "a method of SummaryJob"),
    ],
)
def test_data_named_like_what_the_subclass_defines_is_refused(name: str, what: str) -> None:
    job = SummaryJob("log")
    job.__dict__[name] = 1  # the property has no setter: put it where a payload would
    with pytest.raises(SerializationError, match=rf"'{name}' is {what}.*rename them"):
        encode(job, job_id="a", queue="q", max_bytes=10_000)


def test_instance_settings_are_settings_not_data() -> None:
    raw = encode(UrgentJob("log", urgent=True), job_id="a", queue="urgent", max_bytes=10_000)
    envelope = orjson.loads(raw)
    assert envelope["data"] == {"log": "log"}
    assert (envelope["max_tries"], envelope["timeout"], envelope["retry_after"]) == (9, 5, [1, 2])
    decoded = LOADER.load(raw, job_id="a", attempts=1)
    job = decoded.job
    assert (decoded.max_tries, decoded.timeout) == (9, 5.0)
    assert (job.queue, job.timeout, job.max_tries, job.retry_after) == ("urgent", 5, 9, [1, 2])
    assert job.data() == {"log": "log"}
    # A job that keeps the class's settings carries none on the instance.
    plain = LOADER.load(
        encode(UrgentJob("log"), job_id="b", queue="default", max_bytes=10_000),
        job_id="b",
        attempts=1,
    ).job
    assert not {"queue", "timeout", "max_tries", "retry_after"} & plain.__dict__.keys()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("timeout", "thirty", "timeout: invalid delay 'thirty'"),
        ("timeout", "40 days", "timeout must be a number of seconds from 0 to 2592000"),
        ("timeout", -1, "timeout must be a number of seconds"),
        ("timeout", float("nan"), "timeout must be a number of seconds"),
        ("timeout", float("inf"), "timeout must be a number of seconds"),
        ("timeout", True, "timeout must be a number of seconds"),
        ("timeout", 1e308, "timeout must be a number of seconds from 0 to 2592000"),
        ("retry_after", [1, 10**12], "retry_after must be a number of seconds from 0 to 2592000"),
        ("max_tries", 0, "max_tries must be at least 1"),
        ("max_tries", 2.5, "max_tries must be a whole number"),
        ("max_tries", "3", "max_tries must be a whole number"),
        ("max_tries", None, "max_tries must be a whole number"),
        ("retry_after", "5 fortnights", "retry_after: invalid delay '5 fortnights'"),
        ("retry_after", [1, "x"], "retry_after: invalid delay 'x'"),
        ("retry_after", [1, None], r"retry_after must be a number of seconds.*got None"),
        ("retry_after", -2, "retry_after must be a number of seconds"),
    ],
)
def test_settings_that_are_not_numbers_are_refused_at_dispatch(
    name: str, value: Any, message: str
) -> None:
    job = RecordJob("log")
    setattr(job, name, value)
    with pytest.raises(SerializationError, match=rf"RecordJob\.{message}"):
        encode(job, job_id="a", queue="q", max_bytes=10_000)


def test_a_setting_that_is_a_property_is_refused_at_dispatch_and_at_load() -> None:
    with pytest.raises(SerializationError, match=r"ReadOnlyTimeoutJob\.timeout is a property"):
        encode(ReadOnlyTimeoutJob(), job_id="a", queue="q", max_bytes=10_000)
    with pytest.raises(PayloadError, match=r"ReadOnlyTimeoutJob\.timeout is a property"):
        LOADER.load(payload("ReadOnlyTimeoutJob", {}, timeout=5), job_id="a", attempts=1)


# -- load: refused with the reason, never another exception type -----------------------


@pytest.mark.parametrize(
    ("job", "data", "reason"),
    [
        ("SummaryJob", {"log": "l", "handle": "x"}, "'handle' is a method of SummaryJob"),
        ("SummaryJob", {"log": "l", "failed": "x"}, "'failed' is a method of Job"),
        ("SummaryJob", {"log": "l", "data": {}}, "'data' is a method of Job"),
        ("SummaryJob", {"log": "l", "summary": "x"}, "'summary' is a property of SummaryJob"),
        ("SummaryJob", {"log": "l", "_secret": 1}, "'_secret' is a private name"),
        ("SummaryJob", {"log": "l", "__class__": "x"}, "'__class__' is a private name"),
        ("SummaryJob", {"job_id": "forged"}, "'job_id' is a class attribute of Job"),
        ("SummaryJob", {"queue": "other"}, "'queue' is a class attribute of Job"),
        ("SummaryJob", {"timeout": 1}, "'timeout' is a class attribute of Job"),
    ],
)
def test_payload_data_may_only_set_data_attributes(
    job: str, data: dict[str, Any], reason: str
) -> None:
    with pytest.raises(PayloadError, match=rf"may only set data attributes.*{reason}"):
        LOADER.load(payload(job, data), job_id="a", attempts=1)


def test_a_payload_with_many_bad_keys_is_refused_in_one_short_line() -> None:
    data = {f"_k{n}": n for n in range(1000)}
    with pytest.raises(PayloadError) as caught:
        LOADER.load(payload("SummaryJob", data), job_id="a", attempts=1)
    message = str(caught.value)
    assert "'_k4' is a private name; and 995 more" in message and len(message) < 400


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"timeout": "abc"}, "timeout must be a number"),
        ({"timeout": None}, "timeout must be a number"),
        ({"timeout": -5}, "timeout must be a number"),
        ({"timeout": [1]}, "timeout must be a number"),
        ({"max_tries": 0}, "max_tries must be at least 1"),
        ({"max_tries": 1.5}, "max_tries must be a whole number"),
        ({"max_tries": True}, "max_tries must be a whole number"),
        ({"max_tries": "3"}, "max_tries must be a whole number"),
        ({"retry_after": "x"}, "retry_after must be seconds"),
        ({"retry_after": [1, None]}, "retry_after must be seconds"),
        ({"queue": 5}, "'queue' must be a string"),
    ],
)
def test_payload_settings_fields_are_checked_at_load(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(PayloadError, match=rf"{PATH}:SummaryJob: payload field.*{reason}"):
        LOADER.load(payload("SummaryJob", {"log": "l"}, **fields), job_id="a", attempts=1)


def test_limits_the_loader_returns_are_numbers() -> None:
    decoded = LOADER.load(
        payload("SummaryJob", {"log": "l"}, max_tries=3.0, timeout=2), job_id="a", attempts=1
    )
    assert type(decoded.max_tries) is int and decoded.max_tries == 3
    assert type(decoded.timeout) is float and decoded.timeout == 2.0
    missing = LOADER.load(payload("SummaryJob", {"log": "l"}), job_id="a", attempts=1)
    assert (missing.max_tries, missing.timeout) == (3, 60.0)  # the class's own


def test_class_code_failing_during_a_load_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match=r"cannot be rebuilt.*TypeError") as caught:
        LOADER.load(payload("NoNewJob", {}), job_id="a", attempts=1)
    assert isinstance(caught.value.__cause__, TypeError)


def test_a_raising_setattr_does_not_stop_a_load(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    raw = encode(FrozenJob(log), job_id="a", queue="q", max_bytes=10_000)
    decoded = LOADER.load(raw, job_id="a", attempts=2)
    asyncio.run(decoded.job.handle())
    assert decoded.job.data() == {"log": log}
    assert [(e["id"], e["attempts"]) for e in events(log, "run")] == [("a", 2)]


# -- the class-wide handle cache -------------------------------------------------------


def test_an_instance_handle_cannot_poison_the_class_cache(tmp_path: Path) -> None:
    """The cache answers from the class's function, so a shadowed instance cannot mislead it."""
    log = str(tmp_path / "log")

    async def run() -> None:
        poisoned = SummaryJob(log, 1)
        poisoned.__dict__["handle"] = lambda: None  # a sync callable on the instance
        # The class's handle is async, so the instance's plain value is awaited and fails.
        threads = JobThreads(1)
        try:
            with pytest.raises(TypeError):
                await call_handle(poisoned, 5, threads, stop_within=1, on_stuck=stuck.append)
            await call_handle(SummaryJob(log, 2), 5, threads, stop_within=1, on_stuck=stuck.append)
        finally:
            threads.shutdown()

    stuck: list[BaseException] = []
    asyncio.run(run())
    assert stuck == []
    assert [e["n"] for e in events(log, "run")] == [2]


# -- classes no worker can import ------------------------------------------------------


def _class_in(module: str, name: str = "Stray") -> type[Job]:
    return type(name, (Job,), {"__module__": module, "__qualname__": name})


def test_unloadable_reasons_say_how_to_fix_it() -> None:
    allowed = ("app.", "tests.")
    main = unloadable_reason(_class_in("__main__", "SendMail"), allowed)
    assert main is not None
    assert "defined in __main__" in main and "app/jobs/send_mail.py" in main

    outside = unloadable_reason(_class_in("examples.queue_jobs"), allowed)
    assert outside is not None
    assert "outside the allowed modules (app., tests.)" in outside
    assert "app/jobs/stray.py" in outside and "add 'examples.' to QUEUE_ALLOWED_MODULES" in outside

    def factory() -> type[Job]:
        class Local(Job):
            pass

        return Local

    local = unloadable_reason(factory(), allowed)
    assert local is not None and "inside a function" in local

    # A name its module does not (or no longer) holds, as a class made at run time.
    replaced = unloadable_reason(_class_in(PATH, "SummaryJob"), allowed)
    assert replaced is not None and "does not name this class" in replaced

    assert unloadable_reason(SummaryJob, allowed) is None
    assert unloadable_reason(RecordJob, ("tests",)) is None  # a prefix without its dot


async def test_dispatch_refuses_a_class_no_worker_can_load_and_checks_each_class_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[type] = []
    real = unloadable_reason

    def counting(cls: type, allowed: Any) -> str | None:
        calls.append(cls)
        return real(cls, allowed)

    monkeypatch.setattr(queue_manager_module, "unloadable_reason", counting)
    stray = _class_in("__main__")
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        with pytest.raises(UnloadableJobError, match="defined in __main__"):
            await manager.push(stray())
        with pytest.raises(UnloadableJobError, match="defined in __main__"):
            await manager.bulk([SummaryJob("log"), stray()])
        assert await manager.size("default") == 0
        for n in range(3):
            await manager.push(SummaryJob(str(tmp_path / "log"), n))
        assert await manager.size("default") == 3
    assert calls.count(SummaryJob) == 1  # checked once, then remembered
    assert calls.count(stray) == 2  # a refusal is not remembered: each try says why


async def test_the_sync_connection_runs_a_class_outside_the_allowed_modules(
    tmp_path: Path,
) -> None:
    log = str(tmp_path / "log")
    settings = make_settings(queue_connection="sync", queue_allowed_modules=("app.",))
    async with QueueManager(settings) as manager:
        await manager.push(SummaryJob(log, 4))
        with pytest.raises(UnloadableJobError, match="outside the allowed modules"):
            await manager.push(SummaryJob(log, 5), connection="memory")
    assert [e["n"] for e in events(log, "run")] == [4]


SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from core.job import Job
    from core.queue.queue_manager import dispatch, queue

    class SendWelcomeEmail(Job):
        def __init__(self, user_id):
            self.user_id = user_id

        async def handle(self):
            print("ran inline for", self.user_id)

    async def main():
        if sys.argv[1:] == ["sync"]:
            await queue.push(SendWelcomeEmail(7), connection="sync")
        else:
            await dispatch(SendWelcomeEmail(7))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("connection", ["redis", "database"])
def test_a_script_dispatching_its_own_class_is_told_how_to_fix_it(
    connection: str, tmp_path: Path
) -> None:
    """The README trap: a job class in the script itself. Refused before any connection."""
    (tmp_path / "send.py").write_text(SCRIPT)
    env = {
        **CLEAN,
        "PYTHONPATH": str(ROOT),
        "QUEUE_CONNECTION": connection,
        "REDIS_URL": "redis://127.0.0.1:9/0",  # nothing listens: dispatch must not get there
        "DB_URL": f"sqlite+aiosqlite:///{tmp_path}/queue.db",
    }
    refused = subprocess.run(
        [sys.executable, "send.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("core.errors.UnloadableJobError: SendWelcomeEmail is defined in")
    assert "app/jobs/send_welcome_email.py" in last
    assert not (tmp_path / "queue.db").exists()  # nothing was queued anywhere

    inline = subprocess.run(
        [sys.executable, "send.py", "sync"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert inline.returncode == 0, inline.stderr
    assert inline.stdout.strip() == "ran inline for 7"


def test_a_plain_class_attribute_is_a_default_for_data() -> None:
    """`threshold = 30.0` on the class is a default; an instance value of that name is data."""
    job = SummaryJob("log")
    job.threshold = 12.5
    raw = encode(job, job_id="a", queue="q", max_bytes=10_000)
    loaded = LOADER.load(raw, job_id="a", attempts=1).job
    assert isinstance(loaded, SummaryJob)
    assert loaded.threshold == 12.5
    assert SummaryJob.threshold == 30.0
    plain = LOADER.load(
        encode(SummaryJob("x"), job_id="b", queue="q", max_bytes=10_000), job_id="b", attempts=1
    ).job
    assert plain.threshold == 30.0
