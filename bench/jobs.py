"""Topiq's benchmark jobs. The worker loads them because the bench's settings allow `bench.`."""

from __future__ import annotations

from bench import marks
from core.job import Job

SLEEP = 0.01  # W3's job: seconds of asyncio.sleep


class Noop(Job):
    """Does nothing but count itself."""

    async def handle(self) -> None:
        marks.hit()


class Sleep(Job):
    """Awaits `SLEEP` seconds: what an I/O-bound job looks like to the worker."""

    async def handle(self) -> None:
        await marks.timed_sleep(SLEEP)


class Latency(Job):
    """Records the delay from its dispatch (`sent`) to its start."""

    def __init__(self, sent: float) -> None:
        self.sent = sent

    async def handle(self) -> None:
        marks.hit(self.sent)
