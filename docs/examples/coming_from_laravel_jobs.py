"""Laravel's job options in Topiq (docs/coming-from.md, "Laravel queues")."""

from core.errors import JobFailedError
from core.job import Job
from core.queue.queue_manager import dispatch, queue


# In a project this lives in app/jobs/process_podcast.py.
class ProcessPodcast(Job):
    queue = "podcasts"  # $queue / ->onQueue()
    max_tries = 3  # $tries
    retry_after = [0.1, 0.2]  # $backoff: before the 2nd try, the 3rd (the last repeats)
    timeout = "2 minutes"  # $timeout
    unique_for = "1h"  # ShouldBeUnique's $uniqueFor
    on_duplicate = "keep"  # a duplicate dispatch answers with the waiting job

    def __init__(self, podcast_id: int) -> None:
        self.podcast_id = podcast_id
        self.unique_key = f"podcast:{podcast_id}"  # uniqueId()

    async def handle(self) -> str:
        if self.podcast_id == 0:
            raise ValueError("no such podcast")
        return f"podcast {self.podcast_id} processed"

    async def failed(self, exception: BaseException) -> None:  # failed(Throwable $e)
        print(f"podcast {self.podcast_id} failed: {exception}")


async def main() -> list[str]:
    lines = []
    done = await dispatch(ProcessPodcast(1))  # ProcessPodcast::dispatch($podcast)
    again = await dispatch(ProcessPodcast(1))  # unique: the same job's handle
    lines.append(f"same job: {again == done}")
    lines.append(await done.result(timeout=30))

    # ->onQueue('processing')->delay(now()->addMinutes(10))
    later = await queue.push(ProcessPodcast(2), queue="processing", delay="10 minutes")
    lines.append(f"{(await later.status()).status} on processing")
    await later.cancel()

    broken = await dispatch(ProcessPodcast(0))  # fails 3 times, then failed() runs
    try:
        await broken.result(timeout=30)
    except JobFailedError as exc:
        record = await broken.status()
        lines.append(f"{record.status} after {record.attempts} tries: {exc.error}")
    return lines
