"""RQ's queue inspection in Topiq (docs/coming-from.md, "RQ")."""

from core.queue.queue_manager import Queue


# In a project this lives in a module under app/ (e.g. app/tasks.py).
def count_words(text: str) -> int:
    return len(text.split())


async def main() -> list[object]:
    q = Queue("inspected")
    ids = [
        await q.enqueue(count_words, "first"),
        await q.enqueue(count_words, "second"),
        await q.enqueue(count_words, "urgent", at_front=True),
    ]
    job = await q.fetch_job(ids[0])  # a handle, or None for an unknown id
    return [
        await q.count(),  # len(q): waiting jobs, not those waiting for dependencies
        await q.job_ids() == [ids[2], ids[0], ids[1]],  # q.job_ids: in the order they will run
        job == ids[0],
        (await job.status()).status if job is not None else None,
        await q.fetch_job("no-such-job"),
        await q.empty(),  # removes the waiting jobs, returns how many
        await q.count(),
    ]
