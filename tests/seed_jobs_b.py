"""Job classes for the worker-side tests of issue #16: django-db-queue's steps and per-class
hooks, Masonite's `handle(*args)` and `failed(payload, error)`, RQ's callbacks. Each records
what happened to it as a JSON line in `log` (tests.jobs.record), so that in-process and
subprocess workers report alike."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from core.job import Job
from tests.jobs import record

# -- django-db-queue: steps --------------------------------------------------------------


def third_step(job: StepJob) -> None:
    """A step given as a dotted path (tests.seed_jobs_b.third_step)."""
    record(job.log, event="step", name="third", attempts=job.attempts, ws=dict(job.workspace))
    job.workspace["c"] = job.workspace["b"] * 10


class StepJob(Job):
    """Three steps: a sync method, an async method, a function by dotted path.

    `block_on`: the try on which step two blocks (for a kill); `fail_on`: the tries on which
    step two raises."""

    steps = ["first", "second", "tests.seed_jobs_b.third_step"]
    max_tries = 3
    timeout = 20

    def __init__(self, log: str, block_on: int = 0, fail_on: tuple[int, ...] = ()) -> None:
        self.log = log
        self.block_on = block_on
        self.fail_on = list(fail_on)
        self.workspace = {"start": 1}

    def first(self) -> None:  # sync: runs in a job thread
        record(self.log, event="step", name="first", attempts=self.attempts, ws=self.workspace)
        self.workspace["a"] = self.workspace["start"] + 1

    async def second(self) -> None:
        record(
            self.log, event="step", name="second", attempts=self.attempts, ws=dict(self.workspace)
        )
        if self.attempts == self.block_on:
            await asyncio.sleep(60)
        if self.attempts in self.fail_on:
            raise ValueError(f"second step failed on try {self.attempts}")
        self.workspace["b"] = self.workspace["a"] * 2


class SlowStepsJob(Job):
    """Two steps of `seconds` each: the timeout covers the whole try, not each step."""

    steps = ["nap", "nap"]
    max_tries = 1

    def __init__(self, log: str, seconds: float) -> None:
        self.log = log
        self.seconds = seconds

    async def nap(self) -> None:
        record(self.log, event="nap", attempts=self.attempts)
        await asyncio.sleep(self.seconds)


class HugeWorkspaceJob(Job):
    """Its step fills the workspace past the payload limit: the checkpoint fails the try."""

    steps = ["fill"]
    max_tries = 1

    def fill(self) -> None:
        self.workspace["blob"] = "x" * 200_000


class BadStepJob(Job):
    """A step naming something that does not exist: every try fails, naming it."""

    steps = ["missing"]
    max_tries = 1


# -- django-db-queue: hooks --------------------------------------------------------------


def pre_hook(job: Any) -> None:
    record(
        job.log,
        event="pre",
        attempts=job.attempts,
        step=job.__dict__.get("_topiq_step"),
        id=job.job_id,
    )
    if job.fail_pre:
        raise RuntimeError("pre hook failed")


async def post_hook(job: Any) -> None:
    record(
        job.log,
        event="post",
        attempts=job.attempts,
        step=job.__dict__.get("_topiq_step"),
        id=job.job_id,
    )
    if job.fail_post:
        raise RuntimeError("post hook failed")


def failure_hook_fn(job: Any, exc: BaseException) -> None:
    record(job.log, event="failure_hook", attempts=job.attempts, error=str(exc), id=job.job_id)


class HookJob(Job):
    """A plain job with all three worker-side hooks (a dotted path, functions)."""

    max_tries = 1
    pre_task_hook = "tests.seed_jobs_b.pre_hook"
    post_task_hook = post_hook
    failure_hook = failure_hook_fn

    def __init__(
        self,
        log: str,
        fail_pre: bool = False,
        fail_handle_on: tuple[int, ...] = (),
        fail_post: bool = False,
    ) -> None:
        self.log = log
        self.fail_pre = fail_pre
        self.fail_handle_on = list(fail_handle_on)
        self.fail_post = fail_post

    async def handle(self) -> str:
        record(self.log, event="handle", attempts=self.attempts, id=self.job_id)
        if self.attempts in self.fail_handle_on:
            raise ValueError(f"handle failed on try {self.attempts}")
        return "done"

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", error=str(exception), id=self.job_id)


class HookedStepJob(Job):
    """Steps with a pre hook (a method name) and a post hook: around each step."""

    steps = ["one", "two"]
    max_tries = 2
    pre_task_hook = "before"
    post_task_hook = post_hook
    failure_hook = failure_hook_fn

    def __init__(self, log: str, fail_two_on: tuple[int, ...] = ()) -> None:
        self.log = log
        self.fail_pre = False
        self.fail_post = False
        self.fail_two_on = list(fail_two_on)

    def before(self) -> None:
        record(self.log, event="pre", attempts=self.attempts, step=self.__dict__.get("_topiq_step"))

    async def one(self) -> None:
        record(self.log, event="step", name="one", attempts=self.attempts)
        self.workspace["one"] = True

    async def two(self) -> None:
        record(self.log, event="step", name="two", attempts=self.attempts)
        if self.attempts in self.fail_two_on:
            raise ValueError(f"two failed on try {self.attempts}")
        self.workspace["two"] = True

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", error=str(exception))


# -- Masonite ----------------------------------------------------------------------------


class DivideJob(Job):
    """Masonite's `handle(self, a, b)` with `push(DivideJob, args=[a, b])`, and the two-argument
    `failed(self, payload, error)`."""

    max_tries = 1

    def __init__(self, log: str = "") -> None:
        self.log = log

    def handle(self, a: float, b: float) -> float:
        record(self.log, event="handle", args=[a, b], pid=os.getpid())
        return a / b

    def failed(self, payload: dict[str, Any], error: BaseException) -> None:
        record(
            self.log,
            event="failed",
            obj=payload["obj"].__qualname__,
            args=list(payload["args"]),
            callback=payload["callback"],
            created=payload["created"],
            ran=payload["ran"],
            id=payload["id"],
            queue=payload["queue"],
            data=payload["data"],
            error=str(error),
            error_type=type(error).__name__,
        )


# -- RQ callbacks ------------------------------------------------------------------------


def on_success(job: Any, connection: str, result: Any) -> None:
    record(job.log, event="on_success", connection=connection, result=result, t=time.time())
    if job.fail_success:
        raise RuntimeError("success callback failed")


async def slow_success(job: Any, connection: str, result: Any) -> None:
    record(job.log, event="slow_success")
    await asyncio.sleep(30)


def on_failure(job: Any, connection: str, kind: type, value: BaseException, tb: Any) -> None:
    record(
        job.log,
        event="on_failure",
        connection=connection,
        type=kind.__name__,
        value=str(value),
        traceback=tb is not None,
    )


async def on_stopped(job: Any, connection: str) -> None:
    record(job.log, event="on_stopped", connection=connection, attempts=job.attempts)


class CallbackJob(Job):
    """A job whose RQ callbacks the test sets (`callbacks(...)`)."""

    max_tries = 1
    failure_hook = failure_hook_fn

    def __init__(
        self,
        log: str,
        value: Any = 42,
        fail_on: tuple[int, ...] = (),
        fail_success: bool = False,
        block: bool = False,
    ) -> None:
        self.log = log
        self.value = value
        self.fail_on = list(fail_on)
        self.fail_success = fail_success
        self.block = block

    async def handle(self) -> Any:
        record(self.log, event="handle", attempts=self.attempts)
        if self.block:
            record(self.log, event="blocking", attempts=self.attempts)
            await asyncio.sleep(60)
        if self.attempts in self.fail_on:
            raise ValueError(f"handle failed on try {self.attempts}")
        return self.value

    async def succeeded(self, result: Any) -> None:
        record(self.log, event="succeeded", result=result)

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", error=str(exception))


def callbacks(job: Job, timeout: float | None = None, **paths: str) -> Job:
    """Set RQ's callbacks on `job` as the dispatch layer does: `success="tests.seed_jobs_b.
    on_success"`, ..."""
    job.__dict__["_topiq_callbacks"] = {
        kind: {"path": path, **({} if timeout is None else {"timeout": timeout})}
        for kind, path in paths.items()
    }
    return job
