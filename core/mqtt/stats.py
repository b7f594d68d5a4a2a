"""Counters of the MQTT app, cheap enough to bump per message and read by the demo display."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.delays import Delay
from core.job import Job
from core.queue.queue_manager import QueueManager
from core.settings import Settings

__all__ = ["CountingQueueManager", "MqttStats"]


@dataclass(slots=True)
class MqttStats:
    """What the app has done since it started. Plain ints: one event loop writes them.

    Attributes:
        received: Messages that reached the app.
        handled: Messages whose handler returned normally.
        failed: Messages whose handler (or a middleware) raised.
        invalid: Messages refused because their payload failed validation.
        rejected: Messages refused by other middleware (e.g. over a rate limit).
        unmatched: Messages no route matched (or duplicates of another route's copy).
        jobs_dispatched: Jobs queued by this process (with `CountingQueueManager`).
        connects: Successful connections to the broker (the first one included).
        connected: Whether the app is connected right now.
    """

    received: int = 0
    handled: int = 0
    failed: int = 0
    invalid: int = 0
    rejected: int = 0
    unmatched: int = 0
    jobs_dispatched: int = 0
    connects: int = 0
    connected: bool = False


class CountingQueueManager(QueueManager):
    """A `QueueManager` that counts the jobs it queues into `stats.jobs_dispatched`.

    The app installs it as the default manager, so `dispatch()` in handlers is counted
    without handlers knowing about it.
    """

    def __init__(self, settings: Settings | None, stats: MqttStats) -> None:
        super().__init__(settings)
        self.mqtt_stats = stats

    async def push(
        self,
        job: Job,
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
    ) -> str:
        """Queue `job` (see `QueueManager.push`) and count it."""
        job_id = await super().push(job, queue, connection, delay=delay)
        self.mqtt_stats.jobs_dispatched += 1
        return job_id

    async def bulk(
        self,
        jobs: Iterable[Job],
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
    ) -> list[str]:
        """Queue many jobs (see `QueueManager.bulk`) and count them."""
        ids = await super().bulk(jobs, queue, connection, delay=delay)
        self.mqtt_stats.jobs_dispatched += len(ids)
        return ids
