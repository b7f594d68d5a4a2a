"""Laravel's chains and batches in Topiq (docs/coming-from.md, "Laravel queues")."""

from core.job import Job
from core.queue.queue_manager import batch, chain


# In a project these live in app/jobs/.
class Step(Job):
    queue = "podcasts"

    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self) -> str:
        return self.name


class Notify(Job):
    queue = "podcasts"

    def __init__(self, text: str) -> None:
        self.text = text

    async def handle(self) -> str:
        return self.text


async def main() -> list[str]:
    # Bus::chain([...])->catch(...)->dispatch()
    flow = await chain(
        Step("download"), Step("transcode"), Step("publish"), catch=Notify("chain failed")
    ).dispatch()
    await flow.result(timeout=30)
    lines = [", ".join([await job.result(timeout=30) for job in flow.jobs])]

    # Bus::batch([...])->then(...)->catch(...)->finally(...)->dispatch()
    group = await batch(
        [Step(f"episode {n}") for n in range(1, 4)],
        then=Notify("all done"),
        catch=Notify("one failed"),
        finally_=Notify("batch ended"),
    ).dispatch()
    await group.result(timeout=30)
    progress = await group.progress()
    lines.append(f"batch: {progress.succeeded} of {progress.total} succeeded")
    return lines
