"""Jobs for the operations tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.job import Job
from tests.jobs import record


class MarkerJob(Job):
    """Fails until the file `marker` exists: a fault an operator fixes before `queue:retry`.

    One try only, so the first failure lands in the failed store; a retried job counts its
    tries afresh, which is why a try counter (FlakyJob's `succeed_on`) cannot tell the runs apart.
    """

    max_tries = 1

    def __init__(self, log: str, marker: str) -> None:
        self.log = log
        self.marker = marker

    async def handle(self) -> None:
        record(self.log, event="try", attempts=self.attempts, id=self.job_id)
        # A stat of a local file: too quick to be worth a thread.
        if not Path(self.marker).exists():  # noqa: ASYNC240
            raise RuntimeError(f"marker {self.marker} is missing")
        record(self.log, event="done", attempts=self.attempts, id=self.job_id)


class PoolJob(Job):
    """A job for the worker-pool tests: records `done` with its id and the worker's pid.

    With `pause`, it first records `start` and, on its first try only, sleeps `pause` seconds:
    long enough to be caught running (by a SIGKILL, a `supervisorctl stop`).
    """

    timeout = 5  # a job lost with its worker comes back within timeout + lease margin

    def __init__(self, log: str, n: int, pause: float = 0.0) -> None:
        self.log = log
        self.n = n
        self.pause = pause

    async def handle(self) -> None:
        if self.pause:
            record(self.log, event="start", n=self.n, id=self.job_id, attempts=self.attempts)
            if self.attempts == 1:
                await asyncio.sleep(self.pause)
        record(self.log, event="done", n=self.n, id=self.job_id, attempts=self.attempts)
