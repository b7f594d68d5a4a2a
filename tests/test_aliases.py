"""Renamed job classes: `aliases` lets a class run payloads that name its old path.

The loader, on a class path it cannot import, looks for a class declaring it among the imported
job classes, then imports the modules of the allowed packages' `jobs` package once and looks
again. An alias passes the allowed-modules rule like any class path.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from core.errors import PayloadError, SerializationError, UnknownJobError
from core.job import Job
from core.queue.drivers import OutgoingJob
from core.queue.payload import JobLoader, encode
from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.jobs import events, record
from tests.processes import WorkerProcess

pytestmark = pytest.mark.timeout(60)

PATH = "tests.test_aliases"


class RenamedJob(Job):
    """Was `tests.test_aliases:OldJob`, and before that lived in a module since deleted."""

    aliases: ClassVar[tuple[str, ...]] = (f"{PATH}:OldJob", "tests.deleted_module:OlderJob")

    def __init__(self, log: str, n: int = 0) -> None:
        self.log = log
        self.n = n

    async def handle(self) -> int:
        record(self.log, event="run", n=self.n, cls=type(self).__name__)
        return self.n * 2


def payload(path: str, **data: Any) -> bytes:
    return orjson.dumps({"job": path, "data": data, "max_tries": 1, "timeout": 10})


def test_an_old_path_loads_as_the_class_declaring_it() -> None:
    loader = JobLoader(["tests."])
    for old in (f"{PATH}:OldJob", "tests.deleted_module:OlderJob"):
        decoded = loader.load(payload(old, log="l", n=3), job_id="a", attempts=1)
        assert type(decoded.job) is RenamedJob and decoded.job.n == 3


def test_an_alias_outside_the_allowed_modules_is_refused() -> None:
    with pytest.raises(UnknownJobError, match="outside the allowed modules"):
        JobLoader(["app."]).load(payload(f"{PATH}:OldJob", log="l"), job_id="a", attempts=1)


def test_a_class_outside_the_allowed_modules_cannot_answer_for_an_alias() -> None:
    stray = type(
        "Stray",
        (Job,),
        {"__module__": "elsewhere.jobs", "aliases": ("tests.stray_old:Stray",)},
    )
    with pytest.raises(UnknownJobError, match="no job class declares it"):
        JobLoader(["tests."]).load(payload("tests.stray_old:Stray"), job_id="a", attempts=1)
    assert issubclass(stray, Job)  # kept alive until here: an imported subclass of Job


def test_an_alias_declared_twice_is_refused_naming_both() -> None:
    first = type("First", (Job,), {"__module__": PATH, "aliases": ("tests.twice:Old",)})
    second = type("Second", (Job,), {"__module__": PATH, "aliases": ("tests.twice:Old",)})
    with pytest.raises(UnknownJobError, match=rf"more than one class.*{PATH}:First.*Second"):
        JobLoader(["tests."]).load(payload("tests.twice:Old"), job_id="a", attempts=1)
    assert first is not second


def test_a_bad_aliases_setting_is_refused_at_dispatch() -> None:
    bare = type("BareAlias", (Job,), {"__module__": PATH, "aliases": "tests.old:Bare"})
    with pytest.raises(SerializationError, match=r"BareAlias\.aliases must be a tuple"):
        encode(bare(), job_id="a", queue="q", max_bytes=1000)
    shapeless = type("Shapeless", (Job,), {"__module__": PATH, "aliases": ("no-colon",)})
    with pytest.raises(SerializationError, match=r"Shapeless\.aliases: 'no-colon' is not a"):
        encode(shapeless(), job_id="a", queue="q", max_bytes=1000)


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    """A project package `pkg_<random>` with a `jobs` package not imported yet."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    jobs = tmp_path / name / "jobs"
    jobs.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (jobs / "__init__.py").write_text("")
    (jobs / "billing.py").write_text(
        textwrap.dedent(
            f"""
            from core.job import Job

            class Invoice(Job):
                aliases = ("{name}.jobs.old_billing:Invoice",)

                async def handle(self):
                    return "invoiced"
            """
        )
    )
    (jobs / "broken.py").write_text("raise RuntimeError('this module is broken')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


def test_the_jobs_package_is_imported_once_to_find_an_alias(
    package: str, caplog: pytest.LogCaptureFixture
) -> None:
    loader = JobLoader([f"{package}."])
    assert f"{package}.jobs.billing" not in sys.modules
    with caplog.at_level(logging.WARNING, logger="topiq.queue"):
        decoded = loader.load(
            payload(f"{package}.jobs.old_billing:Invoice"), job_id="a", attempts=1
        )
    assert type(decoded.job).__qualname__ == "Invoice"
    assert type(decoded.job).__module__ == f"{package}.jobs.billing"
    # A broken module in the package is named and skipped, not fatal.
    assert f"cannot import {package}.jobs.broken" in caplog.text
    # Looked for once: an unknown path does not import the package again.
    del sys.modules[f"{package}.jobs.billing"]
    with pytest.raises(UnknownJobError, match="no job class declares it"):
        loader.load(payload(f"{package}.jobs.old:Gone"), job_id="b", attempts=1)
    assert f"{package}.jobs.billing" not in sys.modules


def test_an_unknown_class_still_says_it_cannot_be_imported() -> None:
    with pytest.raises(PayloadError, match=r"tests.nowhere:Nothing' cannot be imported"):
        JobLoader(["tests."]).load(payload("tests.nowhere:Nothing"), job_id="a", attempts=1)


@pytest.mark.process
async def test_a_worker_runs_a_payload_left_under_the_old_name(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "log.jsonl")
    settings = server_backend.settings()
    queue = settings.queue_default
    async with QueueManager(settings) as manager:
        driver = await manager.connection()
        # What an earlier release dispatched, before the class was renamed.
        old = orjson.dumps(
            {
                "id": "old-1",
                "job": f"{PATH}:OldJob",
                "queue": queue,
                "data": {"log": log, "n": 21},
                "max_tries": 1,
                "timeout": 10,
                "retry_after": 0,
                "created_at": 1700000000000,
            }
        )
        await driver.push([OutgoingJob("old-1", queue, old)])
        worker = WorkerProcess([], server_backend.env(), tmp_path / "worker.log")
        try:
            assert await manager.job("old-1", queue=queue).result(timeout=30) == 42
        finally:
            worker.stop()
    assert [(e["cls"], e["n"]) for e in events(log, "run")] == [("RenamedJob", 21)]
