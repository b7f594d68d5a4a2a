"""Jobs of the rolling-upgrade test (tests/test_upgrade.py).

The same file is loaded by today's release (copied into its worktree's `tests/`) and by this
checkout, so it uses only what both have: `core.job.Job`, `handle()`, `job_id`, `attempts`,
and the standard library. Each run appends one JSON line to `log` (O_APPEND: one short write
is atomic, so processes on both sides can share the file).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from core.job import Job


def append(log: str, **event: Any) -> None:
    event.update(t=time.time(), pid=os.getpid())
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)


def read(log: str | Path) -> list[dict[str, Any]]:
    """The finished lines of `log` (a line still being written is left for the next read)."""
    path = Path(log)
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


class CountJob(Job):
    """Appends `{"event": "run", "n": n, ...}` each time it runs."""

    def __init__(self, log: str, n: int) -> None:
        self.log = log
        self.n = n

    async def handle(self) -> None:
        append(self.log, event="run", n=self.n, id=self.job_id, attempts=self.attempts)


class GateJob(Job):
    """Fails while the file `gate` does not exist (one try: it lands in the failed store)."""

    max_tries = 1

    def __init__(self, log: str, gate: str, n: int) -> None:
        self.log = log
        self.gate = gate
        self.n = n

    async def handle(self) -> None:
        append(self.log, event="try", n=self.n, id=self.job_id)
        if not await asyncio.to_thread(os.path.exists, self.gate):
            raise RuntimeError("the gate is closed")
        append(self.log, event="run", n=self.n, id=self.job_id, attempts=self.attempts)
