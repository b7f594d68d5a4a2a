"""Topiq's benchmark jobs. The worker loads them because the bench's settings allow `bench.`."""

from __future__ import annotations

from bench import marks
from bench.marks import SLEEP
from core.job import Job


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


class NoopUnkept(Noop):
    """W2n's job: a `Noop` whose status record and result are not kept (`result_ttl = 0`)."""

    result_ttl = 0


class NoopGrouped(Noop):
    """W2g's job: a `Noop` of one device (`group`, rendered from its data): one job per device
    runs at a time, the devices in turn."""

    group = "{device}"

    def __init__(self, device: str) -> None:
        self.device = device


class Echo(Job):
    """W8's job: returns its argument, which the dispatcher awaits through the job's handle."""

    def __init__(self, value: int) -> None:
        self.value = value

    async def handle(self) -> int:
        return self.value


class Numbered(Job):
    """W9's job: notes its start and end (bench/marks.py `numbered`), so a crash's cost is
    counted by the jobs themselves."""

    def __init__(self, index: int) -> None:
        self.index = index

    async def handle(self) -> None:
        await marks.numbered(self.index)
