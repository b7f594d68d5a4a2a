"""django-db-queue's priorities, run_after and queue depths in Topiq (docs/coming-from.md)."""

from datetime import timedelta

from core.job import Job
from core.queue.queue_manager import JobHandle, dispatch, queue


# In a project this lives in a module under app/jobs/.
class SendEmail(Job):
    queue = "emails"

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def handle(self) -> str:
        return self.kind


async def create() -> tuple[list[JobHandle], dict[str, int]]:
    handles = [
        await dispatch(SendEmail("normal")),
        await dispatch(SendEmail("important"), priority=1),
        await dispatch(SendEmail("critical"), priority=2),
    ]
    await queue.later(timedelta(minutes=10), SendEmail("scheduled"))  # run_after
    await queue.push(SendEmail("other"), queue="other_queue")  # queue_name="other_queue"
    # Job.get_queue_depths(): jobs ready to run, per queue (delayed ones are counted apart).
    depths = {row.queue: row.pending for row in await queue.stats() if row.pending}
    return handles, depths


async def ran_in_order(handles: list[JobHandle]) -> list[str]:
    records = [await handle.status() for handle in handles]
    records.sort(key=lambda record: record.started_at or 0)
    return [record.value() for record in records]
