"""Priorities (docs/workflows.md, "Priorities")."""

import asyncio

from app.jobs.send_notification_job import SendNotificationJob
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker


async def main() -> list[str]:
    settings = Settings.load(env_file=None, queue_connection="memory")
    async with QueueManager(settings) as manager:
        handles = {
            "weekly digest": await manager.push(SendNotificationJob(1, "digest"), priority=-10),
            "reminder 1": await manager.push(SendNotificationJob(1, "reminder 1")),
            "reminder 2": await manager.push(SendNotificationJob(2, "reminder 2")),
            "door alarm": await manager.push(SendNotificationJob(3, "alarm"), priority=100),
        }
        # One worker running one job at a time takes them highest priority first, and in
        # dispatch order among equal priorities.
        worker = Worker(manager, WorkerOptions(queues=("notifications",), stop_when_empty=True))
        await worker.run()
        started = {
            name: (await handle.status()).started_at or 0 for name, handle in handles.items()
        }
    return sorted(started, key=started.__getitem__)


if __name__ == "__main__":  # `.venv/bin/python docs/examples/workflows_priorities.py`
    print(", ".join(asyncio.run(main())))
