"""RouteMQ's benchmark jobs. Its worker imports this package (ROUTEMQ_JOB_DIRECTORY) so that
`@Job.register` runs before it deserializes any job."""

from __future__ import annotations

from routemq.job import Job

from bench import marks
from bench.marks import SLEEP


@Job.register
class Noop(Job):
    async def handle(self) -> None:
        marks.hit()


@Job.register
class Sleep(Job):
    async def handle(self) -> None:
        await marks.timed_sleep(SLEEP)


@Job.register
class Latency(Job):
    sent = 0.0

    async def handle(self) -> None:
        marks.hit(self.sent)
