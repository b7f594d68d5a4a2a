"""Pause a queue from code while something it depends on is down (docs/observing.md)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from core.queue.queue_manager import QueueManager


@asynccontextmanager
async def paused(manager: QueueManager, *queues: str) -> AsyncIterator[None]:
    """Workers take none of these queues' jobs inside the block; dispatches go on."""
    driver = await manager.connection()
    for queue in queues:
        await driver.pause(queue)
    try:
        yield
    finally:
        for queue in queues:
            await driver.resume(queue)


async def migrate_mail_server(manager: QueueManager) -> set[str]:
    async with paused(manager, "emails"):
        # ... switch the SMTP relay; jobs dispatched meanwhile wait in "emails" ...
        return await (await manager.connection()).paused(["emails", "default"])
