"""Jobs, functions, callbacks and hooks written the way Masonite, RQ and django-db-queue users
write theirs, for tests/test_seed_processes.py (issue #16).

Everything records what happened to it as a JSON line (tests/jobs.py `record`) in the file
named by the SEED_F_LOG environment variable, which the test gives both to the plain scripts
that dispatch and to the worker processes that run: so one file shows the order of events
across the two processes (a creation hook runs in the script, the other hooks in the worker).
Each event carries the job id where the code can know it, so that tests sharing one worker
tell their events apart.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from core.job import Job
from tests.jobs import record


def log_path() -> str:
    return os.environ["SEED_F_LOG"]


def note(event: str, **fields: Any) -> None:
    record(log_path(), event=event, **fields)


def job_id_of(job: Any) -> str:
    """The id of a job instance (a Job, or RQ's view of a function job: `job.id`)."""
    return str(getattr(job, "job_id", "") or getattr(job, "id", ""))


# -- Masonite (seeds 000, 001) ------------------------------------------------------------


class SendWelcomeEmail(Job):
    """Pushed as a class (`queue.push(SendWelcomeEmail)`): built with no arguments; takes
    `handle(*args)` from `push(..., args=[...])`."""

    max_tries = 1

    def __init__(self) -> None:
        self.template = "welcome"

    def handle(self, *args: Any) -> dict[str, Any]:  # type: ignore[override]
        note("welcome", id=self.job_id, args=list(args), template=self.template)
        return {"template": self.template, "args": list(args)}


class TutorialEmail(Job):
    """Pushed as an instance beside a class: `queue.push(SendWelcomeEmail, TutorialEmail(...))`."""

    max_tries = 1

    def __init__(self, var1: str, var2: str) -> None:
        self.var1 = var1
        self.var2 = var2

    async def handle(self) -> list[str]:
        note("tutorial", id=self.job_id, vars=[self.var1, self.var2])
        return [self.var1, self.var2]


def run_async(first: str, second: str) -> str:
    """A plain function pushed with `queue.push(run_async, args=(...))`."""
    note("run_async", args=[first, second])
    return f"{first} and {second}"


class DivideJob(Job):
    """Fails (division by zero) and takes Masonite's `failed(self, payload, error)`."""

    max_tries = 1

    def __init__(self, numerator: int, denominator: int) -> None:
        self.numerator = numerator
        self.denominator = denominator

    async def handle(self, *args: Any) -> float:
        return self.numerator / self.denominator

    def failed(self, payload: dict[str, Any], error: BaseException) -> None:  # type: ignore[override]
        note(
            "masonite_failed",
            id=self.job_id,
            keys=sorted(payload),
            obj=f"{payload['obj'].__module__}:{payload['obj'].__qualname__}",
            args=list(payload["args"]),
            callback=payload["callback"],
            created=payload["created"],
            ran=payload["ran"],
            payload_id=payload["id"],
            queue=payload["queue"],
            data=payload["data"],
            error=str(error),
            error_type=type(error).__name__,
        )


class NeedsMarker(Job):
    """Fails until the file `marker` exists: fixed between a failure and `queue:work --failed`."""

    max_tries = 1

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def handle(self) -> str:  # type: ignore[override]
        note("needs_marker", id=self.job_id, attempts=self.attempts)
        if not Path(self.marker).exists():
            raise FileNotFoundError(f"no marker at {self.marker}")
        return "fixed"


# -- RQ (seed 004) ------------------------------------------------------------------------


def count_words(text: str) -> int:
    note("count_words", text=text)
    return len(text.split())


def add(x: int, y: int) -> int:
    note("add", x=x, y=y)
    return x + y


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


async def nap(seconds: float, tag: str = "") -> str:
    note("nap_start", tag=tag, seconds=seconds)
    await asyncio.sleep(seconds)
    note("nap_end", tag=tag)
    return tag


def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Returns what it was called with: shows which options reached the function."""
    note("echo", args=list(args), kwargs=kwargs)
    return {"args": list(args), "kwargs": kwargs}


def mark(tag: str) -> str:
    note("mark", tag=tag)
    return tag


def always_fails(tag: str) -> None:
    note("always_fails", tag=tag)
    raise RuntimeError(f"{tag} broke")


def report_success(job: Any, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    note(
        "on_success",
        id=job_id_of(job),
        connection=connection,
        result=result,
        func_name=getattr(job, "func_name", None),
        meta=getattr(job, "meta", None),
        description=getattr(job, "description", None),
    )


def report_failure(job: Any, connection: Any, type: Any, value: Any, traceback: Any) -> None:
    note(
        "on_failure",
        id=job_id_of(job),
        connection=connection,
        type=type.__name__,
        value=str(value),
        has_traceback=traceback is not None,
    )


def report_stopped(job: Any, connection: Any) -> None:
    note("on_stopped", id=job_id_of(job), connection=connection)


def broken_success(job: Any, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    note("broken_success", id=job_id_of(job))
    raise RuntimeError("the success callback broke")


# -- django-db-queue (seed 002) -----------------------------------------------------------


def on_created(job: Any) -> None:
    note("created", id=job.job_id, tag=job.tag)


def before_task(job: Any) -> None:
    note("pre", id=job.job_id, tag=job.tag)


def after_task(job: Any) -> None:
    note("post", id=job.job_id, tag=job.tag)


def on_failed_for_good(job: Any, exception: BaseException) -> None:
    note("failure_hook", id=job.job_id, tag=job.tag, error=str(exception))


def fetch_rows(job: Any) -> None:
    """ddq's first task: puts rows into the workspace."""
    note("fetch", id=job.job_id, tag=job.tag, attempts=job.attempts, workspace=job.workspace)
    job.workspace["rows"] = [3, 4, 5]
    if job.fail_in == "fetch":
        raise ValueError("fetch failed")


def store_rows(job: Any) -> None:
    """ddq's second task: reads what the first left in the workspace."""
    note("store", id=job.job_id, tag=job.tag, attempts=job.attempts, workspace=job.workspace)
    if job.fail_in == "store" or (job.fail_in == "store-once" and job.attempts == 1):
        raise ValueError("store failed")
    job.workspace["stored"] = sum(job.workspace["rows"])


class ImportRows(Job):
    """A two-step job with the four hooks given as dotted paths, as ddq's JOBS setting does."""

    max_tries = 1
    steps = ["tests.seed_jobs_f.fetch_rows", "tests.seed_jobs_f.store_rows"]
    creation_hook = "tests.seed_jobs_f.on_created"
    pre_task_hook = "tests.seed_jobs_f.before_task"
    post_task_hook = "tests.seed_jobs_f.after_task"
    failure_hook = "tests.seed_jobs_f.on_failed_for_good"

    def __init__(
        self, tag: str, fail_in: str = "", workspace: dict[str, Any] | None = None
    ) -> None:
        self.tag = tag
        self.fail_in = fail_in
        if workspace is not None:
            self.workspace = workspace

    async def failed(self, exception: BaseException) -> None:
        note("failed", id=self.job_id, tag=self.tag, error=str(exception))


class RetriedImport(ImportRows):
    """Its second step fails on the first try: the retry resumes there."""

    max_tries = 2


class SlowImport(Job):
    """Its second step hangs on the first try (the worker is killed -9 there)."""

    max_tries = 3
    timeout = 3  # the kill comes within milliseconds of the second step's start
    steps = ["tests.seed_jobs_f.fetch_rows", "tests.seed_jobs_f.hang_once"]

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.fail_in = ""


async def hang_once(job: Any) -> None:
    note("hang", id=job.job_id, tag=job.tag, attempts=job.attempts, workspace=job.workspace)
    if job.attempts == 1:
        await asyncio.sleep(60)
    job.workspace["finished"] = True


def refuse(job: Any) -> None:
    note("pre", id=job.job_id, tag=job.tag)
    raise PermissionError("the pre-task hook refused")


def broken_post(job: Any) -> None:
    note("post", id=job.job_id, tag=job.tag)
    raise RuntimeError("the post-task hook broke")


class RefusedByPreHook(Job):
    """Hooks as plain functions (class attributes); the pre-task hook raises."""

    max_tries = 1
    pre_task_hook = refuse
    post_task_hook = after_task
    failure_hook = on_failed_for_good

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def handle(self) -> str:
        note("handle", id=self.job_id, tag=self.tag)
        return "ran"


class BrokenPostHook(Job):
    """The post-task hook raises: logged, the job still succeeds."""

    max_tries = 1
    pre_task_hook = before_task
    post_task_hook = broken_post
    failure_hook = on_failed_for_good

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def handle(self) -> str:
        note("handle", id=self.job_id, tag=self.tag)
        return "ran"


def created_then_broke(job: Any) -> None:
    note("created", id=job.job_id, tag=job.tag)
    raise RuntimeError("the creation hook broke")


class BrokenCreationHook(Job):
    """The creation hook raises in the dispatching process: logged, the job is stored."""

    max_tries = 1
    creation_hook = created_then_broke

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def handle(self) -> str:
        note("handle", id=self.job_id, tag=self.tag)
        return "ran"


# -- each convention from inside a job a worker runs ----------------------------------------


class DispatchFromAWorker(Job):
    """Dispatches with each seed's convention from inside a worker process."""

    max_tries = 1

    async def handle(self) -> dict[str, Any]:
        from core.queue.queue_manager import Queue, queue

        masonite = await queue.push(SendWelcomeEmail, args=["from-a-worker"])
        several = await queue.push(SendWelcomeEmail, TutorialEmail("w1", "w2"))
        function = await queue.push(run_async, args=("w3", "w4"))
        rq = await Queue("low").enqueue(add, 20, 22, description="from a worker")
        ddq = await queue.push(ImportRows("from-a-worker"))
        return {
            "pid": os.getpid(),
            "masonite": masonite,
            "several": several,
            "function": function,
            "rq": rq,
            "ddq": ddq,
        }
