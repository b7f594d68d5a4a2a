"""Routers for tests/mqtt/test_delivery.py's app subprocesses (`--app
tests.mqtt.delivery_apps:<name>`), on topics under `topiq-test/<run>/`."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from core.job import Job
from core.mqtt import Router
from core.queue.queue_manager import dispatch

logger = logging.getLogger("topiq.test")


class DeliveredJob(Job):
    """Stands for the work a message asks for; the tests count these in the queue's table."""

    def __init__(self, run: str, n: int) -> None:
        super().__init__()
        self.run = run
        self.n = n

    async def handle(self) -> None:
        pass


#: Each message dispatches one job to the durable queue the environment names. A handler
#: takes DELIVERY_HANDLER_DELAY seconds first, so a stream of messages takes a while.
durable = Router()


@durable.on("topiq-test/{run}/in", qos=1)
async def store(run: str, payload: Any) -> None:
    logger.info("delivery-test handling n=%d", payload["n"])
    await asyncio.sleep(float(os.environ.get("DELIVERY_HANDLER_DELAY", "0")))
    await dispatch(DeliveredJob(run, int(payload["n"])))
    logger.info("delivery-test stored n=%d", payload["n"])


#: A plain `def` handler that blocks far past any grace period (a thread cannot be cancelled).
blocking = Router()


@blocking.on("topiq-test/{run}/block", qos=1)
def block(run: str, payload: Any) -> None:
    logger.info("delivery-test blocking n=%d", payload["n"])
    import time

    time.sleep(float(os.environ.get("DELIVERY_BLOCK_SECONDS", "3600")))
