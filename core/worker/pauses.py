"""Paused queues (`queue:pause`): the worker asks its backend which of its queues are paused
about twice a second, reserves only from the others, and hands back, unspent, the jobs of a
queue it finds paused that it had reserved ahead of a free slot. Jobs already running finish.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from core.execution import describe

if TYPE_CHECKING:
    from core.worker.worker import Worker

__all__ = ["PAUSE_CHECK_EVERY", "Pauses"]

logger = logging.getLogger("topiq.worker")

#: Seconds between two looks at the pause markers (a pause takes effect within about this).
PAUSE_CHECK_EVERY = 0.5


class Pauses:
    """Which of a worker's queues are paused, as last read from the backend."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.paused: frozenset[str] = frozenset()
        self.every = PAUSE_CHECK_EVERY
        self._failing = False

    def active(self, queues: tuple[str, ...]) -> list[str]:
        """The queues of `queues` not paused, in their order."""
        paused = self.paused
        return [queue for queue in queues if queue not in paused] if paused else list(queues)

    async def refresh(self) -> bool:
        """Read the pause markers; whether the set of paused queues changed. A failed read
        keeps the last answer (logged once until reads work again)."""
        worker = self._worker
        driver = worker._driver
        assert driver is not None
        try:
            # A call of its own (`Duties.whole_call`), as the cancel poll's: stopping cancels
            # `watch` at the shield, never inside the client, which may complete a cancelled
            # command and lose the cancel (redis-py 8.1: the worker then never stopped).
            paused = await worker._duties.whole_call(driver.paused(worker.options.queues))
            now = frozenset(paused)
        except NotImplementedError:
            return False  # a backend without markers cannot be paused
        except Exception as exc:
            if not self._failing:
                logger.warning("could not read which queues are paused: %s", describe(exc))
                self._failing = True
            return False
        self._failing = False
        if now == self.paused:
            return False
        for queue in sorted(now - self.paused):
            logger.info("queue %s is paused: worker %s takes none of its jobs", queue, worker.id)
        for queue in sorted(self.paused - now):
            logger.info("queue %s resumed", queue)
        self.paused = now
        return True

    async def watch(self) -> None:
        """Look at the markers every `every` seconds; on a change, wake the worker's loop and
        hand back the prefetched jobs of the queues now paused."""
        while True:
            await asyncio.sleep(self.every)
            if await self.refresh():
                self._worker._paused_changed()
