"""Jobs for the worker's edge cases (tests/test_worker_edges.py): jobs that will not stop, jobs
that cannot be loaded or retried, jobs that use the loop's own thread pool. Each records what
happened to it in `log`, as tests/jobs.py does."""

from __future__ import annotations

import asyncio
import threading
import time

from core.job import Job
from tests.jobs import record


class SyncSleepJob(Job):
    """A plain `def handle` that sleeps in its thread (on try `sleep_on` only, when given)."""

    max_tries = 2

    def __init__(self, log: str, seconds: float, n: int = 0, sleep_on: int = 0) -> None:
        self.log = log
        self.seconds = seconds
        self.n = n
        self.sleep_on = sleep_on

    def handle(self) -> None:  # type: ignore[override]
        record(self.log, event="start", n=self.n, attempts=self.attempts, sync=True)
        if not self.sleep_on or self.attempts == self.sleep_on:
            time.sleep(self.seconds)
        record(self.log, event="end", n=self.n, attempts=self.attempts)


class StubbornJob(Job):
    """Swallows every cancellation for `seconds` on its first try, ticking as it goes."""

    max_tries = 2

    def __init__(self, log: str, seconds: float, n: int = 0) -> None:
        self.log = log
        self.seconds = seconds
        self.n = n

    async def handle(self) -> None:
        record(self.log, event="start", n=self.n, attempts=self.attempts)
        if self.attempts == 1:
            until = time.monotonic() + self.seconds
            while time.monotonic() < until:
                try:
                    await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    record(self.log, event="swallowed", n=self.n, attempts=self.attempts)
        record(self.log, event="end", n=self.n, attempts=self.attempts)


class ToThreadJob(Job):
    """Calls `asyncio.to_thread`, the loop's default executor, and records how long it took."""

    def __init__(self, log: str) -> None:
        self.log = log

    async def handle(self) -> None:
        began = time.monotonic()
        name = await asyncio.to_thread(lambda: threading.current_thread().name)
        record(self.log, event="to_thread", took=time.monotonic() - began, thread=name)


class ReadOnlyTimeoutJob(Job):
    """Its `timeout` is a read-only property: a payload that carries a timeout cannot set it."""

    @property
    def timeout(self) -> float:  # type: ignore[override]
        return 5.0

    async def handle(self) -> None:
        raise AssertionError("never loaded, never run")


class BadBackoffJob(Job):
    """Fails every try, and its `backoff` raises instead of giving the delay before a retry."""

    max_tries = 2

    def __init__(self, log: str) -> None:
        self.log = log

    def backoff(self, attempts: int) -> float:
        raise ZeroDivisionError("no delay for you")

    async def handle(self) -> None:
        record(self.log, event="try", attempts=self.attempts)
        raise ValueError(f"boom on try {self.attempts}")
