"""Jobs for tests/test_workflow_processes.py. Each records what happened to it as JSON lines in
`log` (tests.jobs.record: O_APPEND writes, one short line each, so that the worker processes'
lines never mix)."""

from __future__ import annotations

import asyncio
import time

from core.job import Job
from tests.jobs import events, record


class RateLimited(Job):
    """Records its start; at most 5 of them start per second, across every worker."""

    rate_limit = "5/second"
    max_tries = 1

    def __init__(self, log: str, n: int) -> None:
        self.log = log
        self.n = n

    async def handle(self) -> None:
        record(self.log, event="run", n=self.n, attempts=self.attempts)


class TwoAtOnce(Job):
    """Sleeps `seconds`, recording its start and end; at most 2 of them run at once."""

    concurrency_limit = 2
    max_tries = 1

    def __init__(self, log: str, n: int, seconds: float = 0.3) -> None:
        self.log = log
        self.n = n
        self.seconds = seconds

    async def handle(self) -> None:
        record(self.log, event="start", n=self.n, attempts=self.attempts)
        await asyncio.sleep(self.seconds)
        record(self.log, event="end", n=self.n, attempts=self.attempts)


class Partner(Job):
    """One of a pair that end together: it waits until its partner has started too (in another
    worker process: each worker runs one job at a time), then returns at once.

    Another process's start shows only as a line in the log file, which offers nothing to
    await: so the job looks every 2 ms, for at most `patience` seconds.
    """

    max_tries = 1
    timeout = 60

    def __init__(self, log: str, pair: int, side: str, patience: float = 30.0) -> None:
        self.log = log
        self.pair = pair
        self.side = side
        self.patience = patience

    async def handle(self) -> None:
        record(self.log, event="arrive", pair=self.pair, side=self.side)
        deadline = time.monotonic() + self.patience
        while True:
            here = {e["side"] for e in events(self.log, "arrive") if e["pair"] == self.pair}
            if len(here) == 2:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"pair {self.pair}: the partner of {self.side} never started")
            await asyncio.sleep(0.002)
        record(self.log, event="leave", pair=self.pair, side=self.side)


class Dependent(Job):
    """Records its run (the test counts them: each must run exactly once)."""

    max_tries = 1

    def __init__(self, log: str, pair: int) -> None:
        self.log = log
        self.pair = pair

    async def handle(self) -> None:
        record(self.log, event="dependent", pair=self.pair, attempts=self.attempts)


class Step(Job):
    """A chain member: records its start, sleeps `seconds`, records its end."""

    max_tries = 2
    timeout = 3  # the lease: timeout + QUEUE_LEASE_MARGIN (2 s in the tests)

    def __init__(self, log: str, n: int, seconds: float = 0.0) -> None:
        self.log = log
        self.n = n
        self.seconds = seconds

    async def handle(self) -> int:
        record(self.log, event="start", n=self.n, attempts=self.attempts)
        await asyncio.sleep(self.seconds)
        record(self.log, event="end", n=self.n, attempts=self.attempts)
        return self.n
