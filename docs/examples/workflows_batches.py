"""Batches (docs/workflows.md, "Batches")."""

from core.job import Job
from core.queue.queue_manager import batch

ran: list[str] = []


# In a project these live in modules under app/jobs/ and have no `connection`; this example
# runs them inline on `sync` (docs/ is not an allowed module).
class ImportFile(Job):
    connection = "sync"
    max_tries = 1

    def __init__(self, path: str) -> None:
        self.path = path

    async def handle(self) -> None:
        ran.append(self.path)
        if self.path.endswith(".bad"):
            raise ValueError(f"cannot read {self.path}")


class Note(Job):
    connection = "sync"

    def __init__(self, text: str) -> None:
        self.text = text

    async def handle(self) -> None:
        ran.append(self.text)


async def main() -> list[str]:
    lines = []
    files = ["a.csv", "b.csv", "c.bad"]
    imports = await batch(
        [ImportFile(path) for path in files],
        then=Note("all imported"),  # if every member succeeded
        catch=Note("an import failed"),  # once, at the first failure
        finally_=Note("import over"),  # once every member has ended, however
        allow_failures=True,  # a failure cancels nothing (else: the members still waiting)
        name="nightly import",
    ).dispatch()
    progress = await imports.progress()
    lines.append(
        f"{progress.done}/{progress.total} done: {progress.succeeded} succeeded, "
        f"{progress.failed} failed"
    )
    record = await imports.status()
    lines.append(f"{record.kind} {record.job!r} {record.status}: {record.error}")
    lines.append("ran: " + ", ".join(ran))
    return lines


if __name__ == "__main__":  # `.venv/bin/python docs/examples/workflows_batches.py`
    import asyncio

    print("\n".join(asyncio.run(main())))
