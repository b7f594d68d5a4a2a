"""The worker's background duties off the job path: the periodic prune of expired status
records, and the backend calls such duties make, which stopping never cuts off half-way."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

from core.execution import describe
from core.queue.drivers.base import Driver

__all__ = ["PRUNE_EVERY", "Duties"]

logger = logging.getLogger("topiq.worker")

T = TypeVar("T")
#: Seconds between two prunes of expired status records.
PRUNE_EVERY = 60.0


class Duties:
    """Backend calls of the worker's background duties, and the prune of status records."""

    def __init__(self, margin: float) -> None:
        self._margin = margin
        self.prune_every = PRUNE_EVERY
        self._duty_calls: set[asyncio.Future[Any]] = set()

    async def prune_records(self, driver: Driver) -> None:
        """Delete status records past their keep time, at most once a minute, off the job
        path. The first prune comes at a random point of the first minute, so that workers
        started together do not prune together."""
        await asyncio.sleep(random.uniform(0.5, 1.0) * self.prune_every)
        while True:
            try:
                pruned = await self.whole_call(driver.prune_records())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("could not prune status records: %s", describe(exc))
            else:
                if pruned:
                    logger.info("pruned %d status record(s) past their keep time", pruned)
            await asyncio.sleep(self.prune_every)

    async def whole_call(self, call: Awaitable[T]) -> T:
        """Await a backend call of a background duty as a task of its own: cancelling the
        duty never cuts the call off half-way (that can leave a connection unusable, see
        `Worker._heartbeat`); `end_calls` lets it finish when the worker stops."""
        task: asyncio.Task[T] = asyncio.ensure_future(call)
        self._duty_calls.add(task)
        task.add_done_callback(self._duty_calls.discard)
        return await asyncio.shield(task)

    async def end_calls(self) -> None:
        """Stopping: let background calls in flight finish (bounded), then give up on them."""
        calls = set(self._duty_calls)
        if calls:
            await asyncio.wait(calls, timeout=self._margin)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
