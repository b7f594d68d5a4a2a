"""Jobs the tests dispatch. Each records what happened to it as a JSON line in `log`, a file
path, so that in-process and subprocess workers report alike (appends of one short line are
atomic with O_APPEND)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from core.errors import Retry
from core.job import Job


def record(log: str, **event: Any) -> None:
    event.setdefault("t", time.time())
    event.setdefault("pid", os.getpid())
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def events(log: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = Path(log)
    if not path.exists():
        return []
    # Only whole lines: a writer in another process may be half-way through the last one.
    out = [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


class RecordJob(Job):
    """Records its start; `data` round-trips every attribute."""

    init_calls = 0

    def __init__(self, log: str, n: int = 0, **data: Any) -> None:
        type(self).init_calls += 1
        self.log = log
        self.n = n
        self.data_ = data

    async def handle(self) -> None:
        record(
            self.log, event="run", n=self.n, attempts=self.attempts, id=self.job_id, data=self.data_
        )


class FlakyJob(Job):
    """Fails until try `succeed_on`; records every try."""

    max_tries = 3

    def __init__(self, log: str, succeed_on: int = 99, message: str = "flaky failure") -> None:
        self.log = log
        self.succeed_on = succeed_on
        self.message = message

    async def handle(self) -> None:
        record(self.log, event="try", attempts=self.attempts, id=self.job_id)
        if self.attempts < self.succeed_on:
            raise ValueError(f"{self.message} on try {self.attempts}")
        record(self.log, event="done", attempts=self.attempts)

    async def failed(self, exception: BaseException) -> None:
        record(
            self.log,
            event="failed",
            attempts=self.attempts,
            error=f"{type(exception).__name__}: {exception}",
        )


class RetryJob(Job):
    """Asks for a retry with `Retry(delay)` until try `succeed_on`."""

    max_tries = 3

    def __init__(self, log: str, succeed_on: int = 2, delay: float = 0.1) -> None:
        self.log = log
        self.succeed_on = succeed_on
        self.delay = delay

    async def handle(self) -> None:
        record(self.log, event="try", attempts=self.attempts)
        if self.attempts < self.succeed_on:
            raise Retry(self.delay)
        record(self.log, event="done", attempts=self.attempts)

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", attempts=self.attempts)


class SleepJob(Job):
    """Sleeps `seconds` (asynchronously), recording its start and its end."""

    max_tries = 1

    def __init__(self, log: str, seconds: float, n: int = 0) -> None:
        self.log = log
        self.seconds = seconds
        self.n = n

    async def handle(self) -> None:
        record(self.log, event="start", n=self.n, attempts=self.attempts, id=self.job_id)
        await asyncio.sleep(self.seconds)
        record(self.log, event="end", n=self.n, attempts=self.attempts)

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", n=self.n, error=f"{type(exception).__name__}: {exception}")


class BlockingJob(Job):
    """Blocks the event loop with time.sleep on its first try (the watchdog's case)."""

    max_tries = 3
    timeout = 1

    def __init__(self, log: str, seconds: float = 30) -> None:
        self.log = log
        self.seconds = seconds

    async def handle(self) -> None:
        record(self.log, event="start", attempts=self.attempts)
        if self.attempts == 1:
            time.sleep(self.seconds)  # noqa: ASYNC251 - blocking the loop is the point
        record(self.log, event="end", attempts=self.attempts)


class SyncHandleJob(Job):
    """A plain `def handle`: runs in a thread."""

    def __init__(self, log: str) -> None:
        self.log = log

    def handle(self) -> None:  # type: ignore[override]
        import threading

        record(self.log, event="run", thread=threading.current_thread().name)


class NotAJob:
    """A class under an allowed module that is not a Job."""
