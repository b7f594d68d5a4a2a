"""Jobs for tests/test_worker_lifecycle.py: each records what happened to it as JSON lines in
`log` (see tests/jobs.py), so that in-process and subprocess workers report alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from core.job import Job, JobMiddleware
from tests.jobs import record


async def outer(job: Job, call_next: Callable[[], Awaitable[Any]]) -> Any:
    log: str = job.log  # type: ignore[attr-defined]
    record(log, event="outer in", attempts=job.attempts)
    try:
        return await call_next()
    finally:
        record(log, event="outer out", attempts=job.attempts)


async def inner(job: Job, call_next: Callable[[], Awaitable[Any]]) -> Any:
    log: str = job.log  # type: ignore[attr-defined]
    record(log, event="inner in", attempts=job.attempts)
    result = await call_next()
    record(log, event="inner out", attempts=job.attempts)
    return {"wrapped": result}


class OrderJob(Job):
    """Two middleware around `handle`; fails until try `succeed_on`; records every step."""

    max_tries = 2

    def __init__(self, log: str, succeed_on: int = 1, succeeded_raises: bool = False) -> None:
        self.log = log
        self.succeed_on = succeed_on
        self.succeeded_raises = succeeded_raises

    def middleware(self) -> Sequence[JobMiddleware]:
        return (outer, inner)

    async def handle(self) -> Any:
        record(self.log, event="handle", attempts=self.attempts)
        if self.attempts < self.succeed_on:
            raise ValueError(f"not yet on try {self.attempts}")
        return self.attempts

    async def succeeded(self, result: Any) -> None:
        record(self.log, event="succeeded", attempts=self.attempts, result=result)
        if self.succeeded_raises:
            raise RuntimeError("succeeded() broke")

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", attempts=self.attempts, error=str(exception))


class ResultJob(Job):
    """Returns what `kind` says: JSON, something that is not JSON, or too much."""

    def __init__(self, kind: str, size: int = 0) -> None:
        self.kind = kind
        self.size = size

    async def handle(self) -> Any:
        if self.kind == "json":
            return {"answer": 42, "items": [1, "two", None]}
        if self.kind == "set":
            return {1, 2, 3}
        if self.kind == "big":
            return "x" * self.size
        return None


class CancelMeJob(Job):
    """Sleeps `seconds` (asynchronously); records its start, its cancellation, and `failed()`."""

    max_tries = 3

    def __init__(self, log: str, seconds: float = 60.0, swallow: float = 0.0) -> None:
        self.log = log
        self.seconds = seconds
        self.swallow = swallow

    async def handle(self) -> str:
        record(self.log, event="start", attempts=self.attempts, id=self.job_id)
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            record(self.log, event="cancelled", attempts=self.attempts)
            if self.swallow <= 0:
                raise
            # Will not stop: goes on as if nothing happened (the stuck-job rules apply).
            await asyncio.shield(asyncio.sleep(self.swallow))
        record(self.log, event="end", attempts=self.attempts)
        return "finished"

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", attempts=self.attempts)


class ThreadSleepJob(Job):
    """A plain `def handle` that sleeps `seconds` in its thread (a thread cannot be stopped)."""

    max_tries = 3

    def __init__(self, log: str, seconds: float) -> None:
        self.log = log
        self.seconds = seconds

    def handle(self) -> str:  # type: ignore[override]
        record(self.log, event="start", attempts=self.attempts, id=self.job_id)
        time.sleep(self.seconds)
        record(self.log, event="end", attempts=self.attempts)
        return "finished"

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", attempts=self.attempts)
