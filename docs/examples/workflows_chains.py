"""Chains (docs/workflows.md, "Chains")."""

from core.errors import JobFailedError
from core.job import Job
from core.queue.queue_manager import chain

ran: list[str] = []


# In a project these live in modules under app/jobs/ and have no `connection`; this example
# runs them inline on `sync` (docs/ is not an allowed module).
class Step(Job):
    connection = "sync"
    max_tries = 1

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail

    async def handle(self) -> str:
        ran.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed")
        return self.name


class Alert(Job):
    connection = "sync"

    async def handle(self) -> None:
        ran.append("alert")


async def main() -> list[str]:
    lines = []
    # Each job runs once the one before it succeeded.
    flow = await chain(Step("download"), Step("resize"), Step("upload")).dispatch()
    await flow.result()  # None once every member succeeded
    progress = await flow.progress()
    lines.append(f"{flow.kind}: {progress.succeeded} of {progress.total} succeeded")
    lines.append("results: " + ", ".join([await job.result() for job in flow.jobs]))

    # A failure stops the chain: the rest are cancelled, `catch` and `finally_` run.
    ran.clear()
    flow = await chain(
        Step("download"),
        Step("resize", fail=True),
        Step("upload"),
        catch=Alert(),
        finally_=Step("clean up"),
    ).dispatch()
    try:
        await flow.result()
    except JobFailedError as exc:
        lines.append(f"failed: {exc.error}")
    lines.append("ran: " + ", ".join(ran))
    upload = await flow.jobs[2].status()  # error: "dependency <resize's id> failed"
    lines.append(f"upload {upload.status}")
    return lines


if __name__ == "__main__":  # `.venv/bin/python docs/examples/workflows_chains.py`
    import asyncio

    print("\n".join(asyncio.run(main())))
