"""Running jobs in tests (docs/queue.md, "Testing")."""

from app.jobs.poll_device_job import PollDeviceJob
from app.jobs.send_notification_job import SendNotificationJob
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker


async def run_inline() -> None:
    # The sync connection runs each job inside dispatch; a job that fails for good raises.
    settings = Settings.load(env_file=None, queue_connection="sync")
    async with QueueManager(settings) as manager:
        await manager.push(SendNotificationJob(1, "hello"))


async def run_with_a_worker() -> int:
    # The memory connection with an in-process worker behaves like production, minus servers.
    settings = Settings.load(env_file=None, queue_connection="memory")
    async with QueueManager(settings) as manager:
        await manager.push(PollDeviceJob("sensor-1"), queue="default")
        options = WorkerOptions(queues=("default",), max_jobs=3)  # one job, three tries
        worker = Worker(manager, options)
        await worker.run()
        return worker.processed
