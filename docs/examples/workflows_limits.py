"""Rate and concurrency limits (docs/workflows.md, "Rate and concurrency limits")."""

import asyncio
import itertools

from app.jobs.send_notification_job import SendNotificationJob
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker


def notify(user_id: int, message: str) -> SendNotificationJob:
    # In a project the limits are class attributes of the job class (`rate_limit = "2/second"`);
    # set on an instance, as here, they apply to that job alone.
    job = SendNotificationJob(user_id, message)
    job.rate_limit = "2/second"  # per key: no two starts of one user closer than 0.5 s
    job.limit_key = "user:{user_id}"  # from the job's data: one limit per user
    return job


async def main() -> list[str]:
    settings = Settings.load(env_file=None, queue_connection="memory")
    async with QueueManager(settings) as manager:
        first = [await manager.push(notify(1, f"update {n}")) for n in range(3)]
        other = await manager.push(notify(2, "hello"))
        # Four jobs at once, yet user 1's three start 0.5 s apart; user 2's is not held up.
        worker = Worker(
            manager, WorkerOptions(queues=("notifications",), concurrency=4, max_jobs=4)
        )
        await worker.run()
        starts = [(await handle.status()).started_at or 0 for handle in first]
        started_2 = (await other.status()).started_at or 0
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    return [
        f"user 1: {len(starts)} starts, gaps of at least 0.5 s: {min(gaps) >= 0.49}",
        f"user 2 started before user 1's second: {started_2 < starts[1]}",
    ]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/workflows_limits.py`
    print("\n".join(asyncio.run(main())))
