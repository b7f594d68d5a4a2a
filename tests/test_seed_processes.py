"""The seed systems' ways of calling, end to end (issue #16): Masonite, RQ and django-db-queue
code in a plain script (`asyncio.run`, settings from a .env, as a user runs it), jobs run by a
real `python main.py queue:work` process, outcomes read back through `job(id).status()` /
`.result()` and `python main.py queue:job`, on every backend that outlives a process (redis,
sqlite, mysql).

One worker per backend serves the whole module (the `seeds` fixture): each test dispatches from
its own script, onto the worker's queues, and tells its jobs apart by id. Jobs record their
events in one file (tests/seed_jobs_f.py, SEED_F_LOG) written by the script and the worker
alike, so the order of hooks across the two processes is read from one place. Tests that need
a worker of their own (killed with -9) start it on a queue the shared one does not serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import JobCancelledError, JobExpiredError, JobFailedError, JobNotFoundError
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conftest import ROOT, Backend, flush_redis, reset_mysql
from tests.jobs import events
from tests.processes import WorkerProcess, wait_until
from tests.test_settings import CLEAN

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

#: How long a test waits for a job the shared worker runs (generous: 2 cores, many engineers).
JOB_WAIT = 30.0


@dataclass
class Seeds:
    """One backend with its shared worker, and where the scripts run."""

    backend: Backend
    home: Path  # the scripts' directory, with the .env that points them at the backend
    log: Path  # SEED_F_LOG: every job, hook and callback records here
    worker: WorkerProcess
    queues: dict[str, str]
    tmp: Path

    @property
    def default(self) -> str:
        return self.queues["default"]

    def env(self) -> dict[str, str]:
        return {"SEED_F_LOG": str(self.log), "MQTT_SPOOL_PATH": str(self.tmp / "spool.sqlite3")}

    def worker_env(self) -> dict[str, str]:
        return {**self.backend.env(), **self.env()}

    def events(self, job_id: str) -> list[str]:
        """The names of the events recorded for one job, in order."""
        return [e["event"] for e in events(self.log) if e.get("id") == job_id]

    def worker_side(self, job_id: str) -> list[str]:
        """The events of one job other than its creation hook's: the creation hook runs in
        the dispatching process once the job is stored, so a worker may start the job
        before, while or after it runs; everything else happens in the worker, in order."""
        return [name for name in self.events(job_id) if name != "created"]

    def where(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in events(self.log) if all(e.get(k) == v for k, v in match.items())]

    def tail(self) -> str:
        return f"--- worker log (tail) ---\n{self.worker.output[-4000:]}"


def pause_queue(backend: Backend, name: str, paused: bool) -> None:
    async def go() -> None:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            await (driver.pause(name) if paused else driver.resume(name))

    asyncio.run(go())


@pytest.fixture(scope="module", params=["redis", "sqlite", "mysql"])
def seeds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeds]:
    kind: str = request.param
    tmp = tmp_path_factory.mktemp(f"seeds-{kind}")
    suffix = uuid.uuid4().hex[:8]
    queues = {
        "default": f"seed-{suffix}",
        "low": "low",  # RQ's docs' `Queue('low')`, as written (the backend is emptied first)
        "retry": f"retry-{suffix}",  # Masonite's `queue:work --failed`, filtered to this queue
        "ttl": f"ttl-{suffix}",  # paused while a job's `ttl` runs out
        "parked": f"parked-{suffix}",  # no worker serves it: RQ's queue inspection
        "own": f"own-{suffix}",  # served only by the workers a test starts itself
    }
    overrides: dict[str, Any] = {"queue_default": queues["default"]}
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        flush_redis(url)
        overrides["redis_url"] = url
    elif kind == "sqlite":
        overrides["db_url"] = f"sqlite+aiosqlite:///{tmp}/queue.db"
    else:
        url = request.getfixturevalue("mysql_url")
        reset_mysql(url)
        overrides["db_url"] = url
    backend = Backend(kind, overrides)
    home = tmp / "project"
    home.mkdir()
    (home / ".env").write_text("".join(f"{k}={v}\n" for k, v in backend.env().items()))
    pause_queue(backend, queues["ttl"], True)  # before the worker starts: it reads it at once
    served = [queues[k] for k in ("default", "low", "retry", "ttl")]
    log = tmp / "events.jsonl"
    worker = WorkerProcess(
        ["--queue", ",".join(served), "--concurrency", "6", "--grace", "1"],
        {**backend.env(), "SEED_F_LOG": str(log), "MQTT_SPOOL_PATH": str(tmp / "spool.sqlite3")},
        tmp / "worker.log",
    )
    seeds = Seeds(backend, home, log, worker, queues, tmp)
    try:
        wait_until(lambda: "starting:" in worker.output, 60, "the shared worker to start")
        yield seeds
    finally:
        worker.stop()


# -- helpers ------------------------------------------------------------------------------


async def run_script(seeds: Seeds, code: str, **values: Any) -> dict[str, Any]:
    """Run `code` (formatted with `values`, and the queue names) as a user's plain script in
    the project directory; returns the JSON object it printed last."""
    source = textwrap.dedent(code).format(**{**seeds.queues, **values})
    path = seeds.home / f"script_{uuid.uuid4().hex[:6]}.py"
    path.write_text(source)
    done = await asyncio.to_thread(
        subprocess.run,
        # -W error: an unclosed connection (a ResourceWarning) or any warning fails the script.
        [sys.executable, "-W", "error", path.name],
        cwd=seeds.home,
        env={**CLEAN, "PYTHONPATH": str(ROOT), **seeds.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"script failed:\n{source}\n--- stderr ---\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"the script printed nothing; stderr:\n{done.stderr}"
    out: dict[str, Any] = json.loads(lines[-1])
    out["_stderr"] = done.stderr
    return out


async def cli(seeds: Seeds, *args: str) -> subprocess.CompletedProcess[str]:
    """`python main.py ARGS` against the backend, as an operator runs it."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env={**os.environ, **seeds.worker_env(), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@asynccontextmanager
async def manager(seeds: Seeds) -> AsyncIterator[QueueManager]:
    async with QueueManager(seeds.backend.settings()) as qm:
        yield qm


async def until(condition: Callable[[], bool], what: str, timeout: float = JOB_WAIT) -> None:
    """Wait for something another process makes true (it appends to a file: no event to
    await), checking every 20 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def events_for(seeds: Seeds, job_id: str, count: int) -> None:
    """Wait until `count` events are recorded for the job."""
    await until(
        lambda: len(seeds.events(job_id)) >= count,
        f"{count} events of job {job_id}, got {seeds.events(job_id)}\n{seeds.tail()}",
    )


async def gone(qm: QueueManager, job_id: str, what: str) -> None:
    """Wait until the backend no longer has a record of the job."""
    deadline = time.monotonic() + JOB_WAIT
    while True:
        try:
            await qm.job(job_id).status()
        except JobNotFoundError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the record of {what} ({job_id}) is still kept")
        await asyncio.sleep(0.02)


# -- Masonite (seeds 000 and 001) -----------------------------------------------------------

MASONITE = """
    import asyncio, json
    from core.queue.queue_manager import queue
    from tests.seed_jobs_f import DivideJob, NeedsMarker, SendWelcomeEmail, TutorialEmail, run_async

    async def main():
        later = await queue.push(SendWelcomeEmail, wait="10 minutes")
        one = await queue.push(SendWelcomeEmail)
        function = await queue.push(run_async, args=("obj1", "obj2"))
        several = await queue.push(SendWelcomeEmail, TutorialEmail("val1", "val2"))
        elsewhere = await queue.push(SendWelcomeEmail, TutorialEmail("a", "b"), queue={low!r})
        with_args = await queue.push(SendWelcomeEmail, args=["user@email.com"])
        broken = await queue.push(DivideJob(1, 0))
        fixable = await queue.push(NeedsMarker({marker!r}), queue={retry!r})
        print(json.dumps(dict(
            later=later, one=one, function=function, several=several, elsewhere=elsewhere,
            several_type=type(several).__name__, with_args=with_args, broken=broken,
            fixable=fixable,
        )))

    asyncio.run(main())
"""


async def test_masonite_push_styles_failed_payload_and_queue_work_failed(seeds: Seeds) -> None:
    marker = seeds.tmp / f"marker-{uuid.uuid4().hex[:6]}"
    out = await run_script(seeds, MASONITE, marker=str(marker))
    async with manager(seeds) as qm:

        async def result(job_id: str) -> Any:
            return await qm.job(job_id).result(timeout=JOB_WAIT)

        # push(SomeJob): the class, built with no arguments, its handle() run.
        assert await result(out["one"]) == {"template": "welcome", "args": []}, seeds.tail()
        record = await qm.job(out["one"]).status()
        assert (record.status, record.job, record.queue) == (
            Status.SUCCEEDED,
            "tests.seed_jobs_f:SendWelcomeEmail",
            seeds.default,
        )
        # push(function, args=(...)): a plain function of an allowed module, run once.
        assert await result(out["function"]) == "obj1 and obj2"
        record = await qm.job(out["function"]).status()
        assert (record.job, record.attempts) == ("tests.seed_jobs_f:run_async", 1)
        # push(job_a, job_b): several jobs, a list of handles in order.
        assert out["several_type"] == "list" and len(out["several"]) == 2
        welcome, tutorial = out["several"]
        assert await result(welcome) == {"template": "welcome", "args": []}
        assert await result(tutorial) == ["val1", "val2"]
        # ... and with queue= (Masonite's channel=) they all go there.
        for job_id in out["elsewhere"]:
            await result(job_id)
            assert (await qm.job(job_id).status()).queue == "low"
        # push(JobClass, args=[...]) -> handle(*args).
        assert await result(out["with_args"]) == {
            "template": "welcome",
            "args": ["user@email.com"],
        }
        assert seeds.where(event="welcome", id=out["with_args"])[0]["args"] == ["user@email.com"]

        # failed(self, payload, error): the payload dict and the exception.
        with pytest.raises(JobFailedError):
            await result(out["broken"])
        record = await qm.job(out["broken"]).status()
        assert record.status is Status.FAILED and "division by zero" in record.error
        [called] = seeds.where(event="masonite_failed", id=out["broken"])
        assert called["keys"] == sorted(
            ["obj", "args", "callback", "created", "ran", "id", "queue", "data"]
        )
        assert called["obj"] == "tests.seed_jobs_f:DivideJob"
        assert (called["args"], called["callback"], called["ran"]) == ([], "handle", 1)
        assert (called["payload_id"], called["queue"]) == (out["broken"], seeds.default)
        assert called["data"] == {"numerator": 1, "denominator": 0}
        assert (called["error"], called["error_type"]) == ("division by zero", "ZeroDivisionError")
        created = datetime.fromisoformat(called["created"])
        assert created.tzinfo is not None
        assert abs(created.timestamp() - record.enqueued_at) < 5  # type: ignore[operator]

        # queue:work --failed moves the failed jobs back (of --queue), then the worker runs them.
        with pytest.raises(JobFailedError):
            await result(out["fixable"])
        assert seeds.events(out["fixable"]) == ["needs_marker"]
        marker.write_text("fixed")
        moved = await cli(seeds, "queue:work", "--failed", "--queue", seeds.queues["retry"])
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert "Retried 1 failed job" in moved.stdout, moved.stdout
        assert await result(out["fixable"]) == "fixed", seeds.tail()
        assert seeds.events(out["fixable"]) == ["needs_marker", "needs_marker"]
        # It moved only that queue's: the division is still failed, and ran once.
        assert (await qm.job(out["broken"]).status()).status is Status.FAILED
        assert len(seeds.where(event="masonite_failed", id=out["broken"])) == 1

        # wait="10 minutes": scheduled for then, not run while everything pushed after it ran.
        record = await qm.job(out["later"]).status()
        assert record.status is Status.SCHEDULED
        assert record.due_at is not None and record.enqueued_at is not None
        assert 595 <= record.due_at - record.enqueued_at <= 605
        assert seeds.events(out["later"]) == []
        assert await qm.job(out["later"]).cancel()


# -- RQ (seed 004) ----------------------------------------------------------------------------

RQ_ENQUEUE = """
    import asyncio, json
    from core.queue.queue_manager import Queue, queue
    from tests.seed_jobs_f import add, always_fails, count_words, echo, mark, nap

    async def main():
        q = Queue("low")
        out = dict(name=q.name)
        out["function"] = await q.enqueue(count_words, "the quick brown fox")
        out["path"] = await q.enqueue("tests.seed_jobs_f.add", 3, 4)
        out["facade"] = await queue.enqueue(add, 5, 5)
        out["hour"] = await q.enqueue(nap, 0.05, "hour", job_timeout="1h")
        out["numeric_text"] = await q.enqueue(nap, 0.05, "numeric_text", job_timeout="2")
        out["short"] = await q.enqueue(nap, 30, "short", job_timeout=1)
        out["keep"] = await q.enqueue(mark, "keep", result_ttl=-1)
        out["forget"] = await q.enqueue(mark, "forget", result_ttl=0)
        out["forget_failure"] = await q.enqueue(always_fails, "forget_failure", failure_ttl=0)
        report = await q.enqueue(nap, 0.3, "report")
        out["report"] = report
        out["send"] = await q.enqueue(mark, "send", depends_on=report)
        foo = await q.enqueue(nap, 0.2, "foo")
        bar = await q.enqueue(nap, 0.3, "bar")
        out["foo_bar"] = [foo, bar]
        out["baz"] = await q.enqueue(mark, "baz", depends_on=[foo, bar])
        out["chosen"] = await q.enqueue(mark, "chosen", job_id={chosen!r})
        out["described"] = await q.enqueue(
            add, 1, 2, description="adds one and two", meta={{"owner": "ops", "n": 1}}
        )
        out["clash"] = await q.enqueue(
            echo,
            ttl=30,
            args=("http://nvie.com",),
            kwargs={{"description": "Function description", "ttl": 15}},
        )
        out["waiting"] = await q.enqueue_in(
            3600, mark, "waiting", description="runs in an hour", meta={{"kind": "later"}}
        )
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_rq_enqueue_and_its_options(seeds: Seeds) -> None:
    chosen = f"my_job_id-{uuid.uuid4().hex[:6]}"
    out = await run_script(seeds, RQ_ENQUEUE, chosen=chosen)
    assert out["name"] == "low"
    async with manager(seeds) as qm:

        async def result(job_id: str) -> Any:
            return await qm.job(job_id).result(timeout=JOB_WAIT)

        # enqueue(function, *args) and enqueue("module.function", *args).
        assert await result(out["function"]) == 4, seeds.tail()
        record = await qm.job(out["function"]).status()
        assert (record.job, record.queue) == ("tests.seed_jobs_f:count_words", "low")
        assert await result(out["path"]) == 7
        assert (await qm.job(out["path"]).status()).job == "tests.seed_jobs_f:add"
        # The module facade's enqueue: the default queue.
        assert await result(out["facade"]) == 10
        assert (await qm.job(out["facade"]).status()).queue == seeds.default

        # job_timeout: "1h", "2" and 1 (the last one interrupts a 30 s nap).
        assert await result(out["hour"]) == "hour"
        assert await result(out["numeric_text"]) == "numeric_text"
        with pytest.raises(JobFailedError):
            await result(out["short"])
        record = await qm.job(out["short"]).status()
        assert "timed out after 1s" in record.error, record.error
        assert record.started_at is not None and record.ended_at is not None
        assert record.ended_at - record.started_at < 10
        assert seeds.where(event="nap_end", tag="short") == []

        # result_ttl=-1 keeps the record; result_ttl=0 and failure_ttl=0 keep none.
        assert await result(out["keep"]) == "keep"
        assert (await qm.job(out["keep"]).status()).status is Status.SUCCEEDED
        await until(lambda: bool(seeds.where(event="mark", tag="forget")), "the forget job")
        await gone(qm, out["forget"], "a job of result_ttl=0")
        await until(
            lambda: bool(seeds.where(event="always_fails", tag="forget_failure")),
            "the forget_failure job",
        )
        await gone(qm, out["forget_failure"], "a failure of failure_ttl=0")
        store = await qm.failed_store()
        assert await store.get(out["forget_failure"]) is not None  # the failed store keeps it

        # depends_on: one job, and a list; each runs after what it depends on ended.
        assert await result(out["send"]) == "send"
        report, send = await qm.job(out["report"]).status(), await qm.job(out["send"]).status()
        assert report.ended_at is not None and send.started_at is not None
        assert send.started_at >= report.ended_at
        assert await result(out["baz"]) == "baz"
        baz = await qm.job(out["baz"]).status()
        for dependency in out["foo_bar"]:
            ended = (await qm.job(dependency).status()).ended_at
            assert ended is not None and baz.started_at is not None and baz.started_at >= ended

        # job_id
        assert out["chosen"] == chosen
        assert await result(chosen) == "chosen"

        # args=/kwargs=: names that clash with RQ's options reach the function.
        assert await result(out["clash"]) == {
            "args": ["http://nvie.com"],
            "kwargs": {"description": "Function description", "ttl": 15},
        }
        assert (await qm.job(out["clash"]).status()).description == ""

        # description and meta: in the record, and in queue:job (text and --json).
        assert await result(out["described"]) == 3
        record = await qm.job(out["described"]).status()
        assert (record.description, record.meta) == ("adds one and two", {"owner": "ops", "n": 1})
        shown = await cli(seeds, "queue:job", out["described"])
        assert shown.returncode == 0, shown.stderr
        assert "adds one and two" in shown.stdout and '"owner": "ops"' in shown.stdout, shown.stdout
        # ... and for a job still waiting (read from its payload), in --json.
        assert (await qm.job(out["waiting"]).status()).status is Status.SCHEDULED
        shown = await cli(seeds, "queue:job", out["waiting"], "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert (data["description"], data["meta"]) == ("runs in an hour", {"kind": "later"})
        assert await qm.job(out["waiting"]).cancel()


RQ_CALLBACKS = """
    import asyncio, json
    from core.queue.queue_manager import Callback, Queue, RetryPolicy
    from tests.seed_jobs_f import add, always_fails, broken_success, nap, report_failure
    from tests.seed_jobs_f import report_success

    async def main():
        q = Queue("low")
        out = {{}}
        out["success"] = await q.enqueue(add, 2, 2, on_success=report_success, meta={{"who": "me"}})
        out["success_path"] = await q.enqueue(
            add, 2, 3, on_success="tests.seed_jobs_f.report_success"
        )
        out["failure"] = await q.enqueue(
            always_fails, "failure", on_failure=Callback(report_failure, timeout=5)
        )
        out["broken"] = await q.enqueue(add, 1, 1, on_success=broken_success)
        out["stopped"] = await q.enqueue(
            nap, 30, "stopped", on_stopped="tests.seed_jobs_f.report_stopped"
        )
        out["retried"] = await q.enqueue(
            always_fails,
            "retried",
            retry=RetryPolicy(max=2, interval=[0.2, 0.4]),
            on_failure="tests.seed_jobs_f.report_failure",
        )
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_rq_callbacks_and_retry_policy(seeds: Seeds) -> None:
    out = await run_script(seeds, RQ_CALLBACKS)
    connection = seeds.backend.connection
    async with manager(seeds) as qm:

        async def result(job_id: str) -> Any:
            return await qm.job(job_id).result(timeout=JOB_WAIT)

        # on_success, as a callable and as a dotted path: (job, connection, result).
        assert await result(out["success"]) == 4, seeds.tail()
        await until(lambda: bool(seeds.where(event="on_success", id=out["success"])), "on_success")
        [called] = seeds.where(event="on_success", id=out["success"])
        assert (called["connection"], called["result"]) == (connection, 4)
        assert called["meta"] == {"who": "me"}
        assert "tests.seed_jobs_f" in called["func_name"] and called["func_name"].endswith("add")
        assert await result(out["success_path"]) == 5
        await until(
            lambda: bool(seeds.where(event="on_success", id=out["success_path"])),
            "on_success given as a path",
        )

        # on_failure (Callback with a timeout): (job, connection, type, value, traceback).
        with pytest.raises(JobFailedError):
            await result(out["failure"])
        await until(lambda: bool(seeds.where(event="on_failure", id=out["failure"])), "on_failure")
        [called] = seeds.where(event="on_failure", id=out["failure"])
        assert (called["connection"], called["type"], called["value"]) == (
            connection,
            "RuntimeError",
            "failure broke",
        )
        assert called["has_traceback"]

        # A success callback that raises marks the job failed (RQ's documented effect).
        with pytest.raises(JobFailedError):
            await result(out["broken"])
        record = await qm.job(out["broken"]).status()
        assert record.status is Status.FAILED
        assert "the success callback broke" in record.error, record.error
        assert seeds.where(event="add", x=1, y=1)  # the function itself ran
        assert len(seeds.where(event="broken_success", id=out["broken"])) == 1

        # on_stopped: the running job cancelled.
        await until(lambda: bool(seeds.where(event="nap_start", tag="stopped")), "the nap start")
        assert await qm.job(out["stopped"]).cancel()
        with pytest.raises(JobCancelledError):
            await result(out["stopped"])
        await until(lambda: bool(seeds.where(event="on_stopped", id=out["stopped"])), "on_stopped")
        assert seeds.where(event="nap_end", tag="stopped") == []

        # RetryPolicy(max=2, interval=[0.2, 0.4]): 3 tries, 0.2 s then 0.4 s apart, and the
        # failure callback once, after the last.
        with pytest.raises(JobFailedError):
            await result(out["retried"])
        record = await qm.job(out["retried"]).status()
        assert (record.status, record.attempts) == (Status.FAILED, 3)
        tries = [e["t"] for e in seeds.where(event="always_fails", tag="retried")]
        assert len(tries) == 3
        assert tries[1] - tries[0] >= 0.2 - 0.01 and tries[2] - tries[1] >= 0.4 - 0.01, tries
        await until(lambda: bool(seeds.where(event="on_failure", id=out["retried"])), "on_failure")
        assert len(seeds.where(event="on_failure", id=out["retried"])) == 1


RQ_SCHEDULE_BULK_INSPECT = """
    import asyncio, json, time
    from datetime import datetime, timedelta, timezone
    from core.queue.queue_manager import Queue
    from tests.seed_jobs_f import count_words, fib, mark

    async def main():
        q = Queue("low")
        out = {{"pushed_at": time.time()}}
        out["in"] = await q.enqueue_in(timedelta(seconds=1), mark, "in")
        soon = datetime.now(timezone.utc) + timedelta(seconds=1)
        out["at"] = await q.enqueue_at(soon, mark, "at")
        out["many"] = await q.enqueue_many([
            Queue.prepare_data(count_words, "http://nvie.com", job_id={first!r}),
            Queue.prepare_data(count_words, "two words", job_id={second!r}),
        ])

        parked = Queue({parked!r})
        a = await parked.enqueue(mark, "a")
        b = await parked.enqueue(mark, "b")
        c = await parked.enqueue(mark, "c", at_front=True)
        out["abc"] = [a, b, c]
        out["count"] = await parked.count()
        out["job_ids"] = await parked.job_ids()
        fetched = await parked.fetch_job(b)
        out["fetched"] = [fetched, str((await fetched.status()).status)]
        out["unknown"] = await parked.fetch_job("no-such-job-{first}")
        out["emptied"] = await parked.empty()
        out["count_after"] = await parked.count()

        eager = Queue("low", is_async=False)
        job = await eager.enqueue(fib, 8)
        out["eager"] = await job.result(timeout=5)

        ttl = Queue({ttl!r})
        out["ttl_short"] = await ttl.enqueue(mark, "ttl_short", ttl=1)
        out["ttl_none"] = await ttl.enqueue(mark, "ttl_none", ttl=None)
        out["ttl_at"] = time.time()
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_rq_scheduling_bulk_inspection_eager_and_ttl(seeds: Seeds) -> None:
    first, second = (f"my_job_id-{uuid.uuid4().hex[:6]}" for _ in range(2))
    out = await run_script(seeds, RQ_SCHEDULE_BULK_INSPECT, first=first, second=second)
    async with manager(seeds) as qm:

        async def result(job_id: str) -> Any:
            return await qm.job(job_id).result(timeout=JOB_WAIT)

        # enqueue_in / enqueue_at: due a second later, not started before.
        for key in ("in", "at"):
            assert await result(out[key]) == key, seeds.tail()
            record = await qm.job(out[key]).status()
            assert record.due_at is not None and record.started_at is not None
            assert record.enqueued_at is not None
            # Due a second after the call (the enqueue_at's datetime was taken after
            # pushed_at, before the call), and not started before it was due.
            assert record.due_at >= out["pushed_at"] + 1 - 0.01, (key, record)
            assert record.due_at <= record.enqueued_at + 1 + 0.25, (key, record)
            assert record.started_at >= record.due_at - 0.01

        # enqueue_many with prepare_data: the ids asked for, in order.
        assert out["many"] == [first, second]
        assert [await result(job_id) for job_id in out["many"]] == [1, 2]

        # count, job_ids (at_front first), fetch_job, empty.
        a, b, c = out["abc"]
        assert out["count"] == 3
        assert out["job_ids"] == [c, a, b]
        assert out["fetched"] == [b, "queued"]
        assert out["unknown"] is None
        assert (out["emptied"], out["count_after"]) == (3, 0)
        for job_id in (a, b, c):
            assert seeds.where(event="mark", tag=job_id) == []

        # is_async=False: run inside the script, no worker.
        assert out["eager"] == 21

        # ttl: the queue was paused for longer than the job's ttl; once resumed, the job of
        # ttl=1 expires unrun, the one of ttl=None runs.
        left = out["ttl_at"] + 1.2 - time.time()
        if left > 0:
            await asyncio.sleep(left)  # a ttl is a span of time: it has to pass
        driver = await qm.connection()
        await driver.resume(seeds.queues["ttl"])
        try:
            assert await result(out["ttl_none"]) == "ttl_none"
            with pytest.raises(JobExpiredError):
                await result(out["ttl_short"])
        finally:
            await driver.pause(seeds.queues["ttl"])
        assert seeds.where(event="mark", tag="ttl_short") == []


# -- django-db-queue (seed 002) ---------------------------------------------------------------

DDQ_HOOKS = """
    import asyncio, json, os
    from core.queue.queue_manager import queue
    from tests.seed_jobs_f import BrokenCreationHook, BrokenPostHook, ImportRows, RefusedByPreHook

    async def main():
        out = {{"pid": os.getpid()}}
        out["ok"] = await queue.push(ImportRows("ok", workspace={{"user_id": 7}}))
        out["bad"] = await queue.push(ImportRows("bad", fail_in="store"))
        out["refused"] = await queue.push(RefusedByPreHook("refused"))
        out["post"] = await queue.push(BrokenPostHook("post"))
        out["creation"] = await queue.push(BrokenCreationHook("creation"))
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_ddq_hooks_run_in_their_processes_in_order(seeds: Seeds) -> None:
    out = await run_script(seeds, DDQ_HOOKS)
    expected = {
        "ok": ["pre", "fetch", "post", "pre", "store", "post"],
        "bad": ["pre", "fetch", "post", "pre", "store", "failed", "failure_hook", "post"],
        "refused": ["pre", "failure_hook", "post"],
        "post": ["pre", "handle", "post"],
        "creation": ["handle"],
    }
    with_creation_hook = {"ok", "bad", "creation"}
    async with manager(seeds) as qm:
        outcome = {}
        for key, names in expected.items():
            with contextlib.suppress(JobFailedError):
                await qm.job(out[key]).result(timeout=JOB_WAIT)
            outcome[key] = await qm.job(out[key]).status()
            # The last hooks may run after the job's end is recorded: wait for that many.
            await events_for(seeds, out[key], len(names) + (key in with_creation_hook))
    for key, names in expected.items():
        assert seeds.worker_side(out[key]) == names, (key, seeds.events(out[key]))
        hooked = seeds.where(event="created", id=out[key])
        assert len(hooked) == (key in with_creation_hook), (key, hooked)
    # The creation hook ran in the dispatching script, the others in the worker.
    [created] = seeds.where(event="created", id=out["ok"])
    assert created["pid"] == out["pid"]
    worker_pid = seeds.worker.proc.pid
    assert {e["pid"] for e in seeds.where(id=out["ok"]) if e["event"] != "created"} == {worker_pid}
    # The workspace: given at dispatch, passed from step to step, the job's result.
    assert outcome["ok"].status is Status.SUCCEEDED
    assert outcome["ok"].value() == {"user_id": 7, "rows": [3, 4, 5], "stored": 12}
    assert seeds.where(event="fetch", id=out["ok"])[0]["workspace"] == {"user_id": 7}
    assert seeds.where(event="store", id=out["ok"])[0]["workspace"] == {
        "user_id": 7,
        "rows": [3, 4, 5],
    }
    # A failing step fails the job: failed(), the failure hook with its exception, then post.
    assert outcome["bad"].status is Status.FAILED and "store failed" in outcome["bad"].error
    assert seeds.where(event="failure_hook", id=out["bad"])[0]["error"] == "store failed"
    # A failing pre-task hook fails the job without running it.
    assert outcome["refused"].status is Status.FAILED
    assert "the pre-task hook refused" in outcome["refused"].error
    # A failing post-task hook is logged; the job still succeeded.
    assert outcome["post"].status is Status.SUCCEEDED and outcome["post"].value() == "ran"
    assert "the post-task hook broke" in seeds.worker.output
    # A failing creation hook is logged in the script; the job was stored, and ran.
    assert outcome["creation"].status is Status.SUCCEEDED
    assert "the creation hook broke" in out["_stderr"], out["_stderr"]


DDQ_STEPS = """
    import asyncio, json
    from core.queue.queue_manager import queue
    from tests.seed_jobs_f import RetriedImport, SlowImport

    async def main():
        out = {{}}
        out["retried"] = await queue.push(RetriedImport("retried", fail_in="store-once"))
        out["killed"] = await queue.push(SlowImport("killed"), queue={own!r})
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_ddq_steps_resume_after_a_retry_and_after_kill_9(seeds: Seeds) -> None:
    out = await run_script(seeds, DDQ_STEPS)
    own = ["--queue", seeds.queues["own"], "--grace", "1"]
    # A lease of timeout (3 s) + 1 s: the killed try's job is free again within 4 s.
    env = {**seeds.worker_env(), "QUEUE_LEASE_MARGIN": "1"}
    first = WorkerProcess(own, env, seeds.tmp / f"own-{out['killed']}-1.log")
    second: WorkerProcess | None = None
    try:
        # The worker is killed -9 in the second step, after the first one's checkpoint.
        await until(
            lambda: bool(seeds.where(event="hang", id=out["killed"])),
            f"the second step to start\n{first.output[-3000:]}",
        )
        first.signal(signal.SIGKILL)
        first.wait(10)
        second = WorkerProcess(own, env, seeds.tmp / f"own-{out['killed']}-2.log")
        async with manager(seeds) as qm:
            # A retry resumes at the step that failed, with the workspace the steps before left.
            retried = await qm.job(out["retried"]).result(timeout=JOB_WAIT)
            assert retried == {"rows": [3, 4, 5], "stored": 12}, seeds.tail()
            assert (await qm.job(out["retried"]).status()).attempts == 2
            steps = [
                (e["event"], e["attempts"])
                for e in seeds.where(id=out["retried"])
                if e["event"] in ("fetch", "store")
            ]
            assert steps == [("fetch", 1), ("store", 1), ("store", 2)]
            assert [e["workspace"] for e in seeds.where(event="store", id=out["retried"])] == [
                {"rows": [3, 4, 5]}
            ] * 2
            # The failed try's post-task hook ran once the retry was scheduled; no failure hook.
            assert seeds.worker_side(out["retried"]) == [
                *("pre", "fetch", "post", "pre", "store", "post"),
                *("pre", "store", "post"),
            ]
            assert seeds.events(out["retried"]).count("created") == 1

            # After the kill: the lease lapses, another worker resumes at the unfinished step.
            killed = await qm.job(out["killed"]).result(timeout=JOB_WAIT)
            assert killed == {"rows": [3, 4, 5], "finished": True}, second.output[-3000:]
            assert [e["attempts"] for e in seeds.where(event="fetch", id=out["killed"])] == [1]
            hangs = seeds.where(event="hang", id=out["killed"])
            assert [e["attempts"] for e in hangs] == [1, 2]
            assert hangs[1]["workspace"] == {"rows": [3, 4, 5]}
            assert hangs[1]["pid"] == second.proc.pid
            assert "timed out" not in first.output  # the first try ended by the kill
    finally:
        first.stop()
        if second is not None:
            second.stop()


FROM_A_WORKER = """
    import asyncio, json
    from core.queue.queue_manager import queue
    from tests.seed_jobs_f import DispatchFromAWorker

    async def main():
        print(json.dumps({{"outer": await queue.push(DispatchFromAWorker)}}))

    asyncio.run(main())
"""


async def test_each_convention_dispatched_from_inside_a_worker(seeds: Seeds) -> None:
    """The same calls made by a job the worker runs (not a plain script): Masonite's push
    styles, RQ's enqueue, a ddq job whose creation hook then runs in the worker."""
    out = await run_script(seeds, FROM_A_WORKER)
    async with manager(seeds) as qm:

        async def result(job_id: str) -> Any:
            return await qm.job(job_id).result(timeout=JOB_WAIT)

        inner = await result(out["outer"])
        assert inner["pid"] == seeds.worker.proc.pid, seeds.tail()
        assert await result(inner["masonite"]) == {
            "template": "welcome",
            "args": ["from-a-worker"],
        }
        welcome, tutorial = inner["several"]
        assert await result(welcome) == {"template": "welcome", "args": []}
        assert await result(tutorial) == ["w1", "w2"]
        assert await result(inner["function"]) == "w3 and w4"
        assert await result(inner["rq"]) == 42
        record = await qm.job(inner["rq"]).status()
        assert (record.queue, record.description) == ("low", "from a worker")
        assert await result(inner["ddq"]) == {"rows": [3, 4, 5], "stored": 12}
        await events_for(seeds, inner["ddq"], 7)
        assert seeds.worker_side(inner["ddq"]) == ["pre", "fetch", "post", "pre", "store", "post"]
        assert seeds.events(inner["ddq"]).count("created") == 1
        assert {e["pid"] for e in seeds.where(id=inner["ddq"])} == {seeds.worker.proc.pid}


DDQ_PRUNE = """
    import asyncio, json
    from core.queue.queue_manager import queue
    from tests.seed_jobs_f import ImportRows, SendWelcomeEmail

    async def main():
        out = {{}}
        out["done"] = await queue.push(ImportRows("prune-done"))
        out["failed"] = await queue.push(ImportRows("prune-failed", fail_in="fetch"))
        out["waiting"] = await queue.push(SendWelcomeEmail, wait="1 hour")
        print(json.dumps(out))

    asyncio.run(main())
"""


async def test_ddq_prune_older_than(seeds: Seeds) -> None:
    """Last in the module: it deletes every ended record of the backend older than 0.5 s."""
    out = await run_script(seeds, DDQ_PRUNE)
    async with manager(seeds) as qm:
        assert await qm.job(out["done"]).result(timeout=JOB_WAIT) is not None, seeds.tail()
        with pytest.raises(JobFailedError):
            await qm.job(out["failed"]).result(timeout=JOB_WAIT)
        store = await qm.failed_store()
        assert await store.get(out["failed"]) is not None

        # Everything ended within the last 14 days: nothing goes.
        kept = await cli(seeds, "queue:prune", "--older-than", "14d", "--json")
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert json.loads(kept.stdout)["failed_deleted"] == 0
        assert (await qm.job(out["done"]).status()).status is Status.SUCCEEDED
        assert (await qm.job(out["failed"]).status()).status is Status.FAILED
        assert await store.get(out["failed"]) is not None

        ended = max([(await qm.job(out[k]).status()).ended_at or 0.0 for k in ("done", "failed")])
        left = ended + 0.7 - time.time()
        if left > 0:
            await asyncio.sleep(left)  # "older than 0.5s" needs records half a second old
        pruned = await cli(seeds, "queue:prune", "--older-than", "0.5s", "--json")
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        counts = json.loads(pruned.stdout)
        assert counts["deleted"] >= 2 and counts["failed_deleted"] >= 1, counts
        # The finished and the failed records are gone, and the failed store's entry.
        for key in ("done", "failed"):
            with pytest.raises(JobNotFoundError):
                await qm.job(out[key]).status()
        assert await store.get(out["failed"]) is None
        # A waiting job is not a record to prune.
        assert (await qm.job(out["waiting"]).status()).status is Status.SCHEDULED
        assert await qm.job(out["waiting"]).cancel()
