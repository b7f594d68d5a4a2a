"""Job classes and plain functions for the dispatch-side tests of issue #16 (Masonite's `push`,
RQ's `enqueue`): plain functions with no `@job`, classes built with no arguments, callbacks."""

from __future__ import annotations

import asyncio
import subprocess
from os import system  # a hostile payload names it through this module
from subprocess import run  # likewise
from typing import Any

from core.job import Job, job

__all__ = ["run", "subprocess", "system"]


def add(a: int, b: int = 0) -> int:
    """A plain function: no `@job`."""
    return a + b


async def async_add(a: int, b: int = 0) -> int:
    await asyncio.sleep(0)
    return a + b


def count_words(text: str) -> int:
    return len(text.split())


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def make_nested() -> Any:
    def nested() -> int:
        return 1

    return nested


lambda_job = lambda: 1  # noqa: E731


@job("low", timeout=5)
def low_priority(x: int) -> int:
    """RQ's decorator: the queue as the first argument."""
    return x * 2


@job(max_tries=3)
def decorated(x: int) -> int:
    return x + 100


class Ping(Job):
    """Built with no arguments (Masonite's `queue.push(Ping)`)."""

    queue = "seed-c"

    def __init__(self) -> None:
        self.count = 1

    async def handle(self, *args: Any) -> Any:
        return {"count": self.count, "args": list(args)}


class NeedsArgs(Job):
    def __init__(self, device: str) -> None:
        self.device = device

    async def handle(self) -> None:
        return None


created: list[str] = []


def remember_creation(job: Job) -> None:
    created.append(job.job_id)


def failing_creation(job: Job) -> None:
    created.append(f"raised:{job.job_id}")
    raise RuntimeError("creation hook failed")


class Created(Job):
    queue = "seed-c"
    creation_hook = remember_creation

    async def handle(self) -> str:
        return "ok"


class CreatedByPath(Job):
    queue = "seed-c"
    creation_hook = "tests.seed_jobs_c.remember_creation"

    async def handle(self) -> str:
        return "ok"


class CreationFails(Job):
    queue = "seed-c"
    creation_hook = failing_creation

    async def handle(self) -> str:
        return "ok"


callbacks: list[tuple[str, str, Any]] = []


def on_success(job: Any, connection: Any, result: Any) -> None:
    callbacks.append(("success", job.id, result))


def on_failure(job: Any, connection: Any, kind: Any, value: Any, traceback: Any) -> None:
    callbacks.append(("failure", job.id, str(value)))


def on_stopped(job: Any, connection: Any) -> None:
    callbacks.append(("stopped", job.id, None))
