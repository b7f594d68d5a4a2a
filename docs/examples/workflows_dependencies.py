"""Jobs that wait for other jobs (docs/workflows.md, "Dependencies")."""

import contextlib

from core.job import Job
from core.queue.queue_manager import dispatch

ran: list[str] = []


# In a project this lives in a module under app/jobs/ and has no `connection`; this example
# runs it inline on `sync` (docs/ is not an allowed module): each job runs as soon as it is
# ready, so a dependency has ended before its dependent is dispatched.
class Build(Job):
    connection = "sync"
    max_tries = 1

    def __init__(self, step: str, fail: bool = False) -> None:
        self.step = step
        self.fail = fail

    async def handle(self) -> str:
        ran.append(self.step)
        if self.fail:
            raise RuntimeError(f"{self.step} failed")
        return self.step


async def main() -> list[str]:
    lines = []
    compiled = await dispatch(Build("compile"))
    tested = await dispatch(Build("test"), depends_on=compiled)  # a handle, an id, or a list
    lines.append(f"test {await tested.status()}")

    # On `sync` a failing job raises in the caller (elsewhere its worker records the failure).
    with contextlib.suppress(RuntimeError):
        await dispatch(Build("lint", fail=True), job_id="lint-1")
    release = await dispatch(Build("release"), depends_on=[tested, "lint-1"])
    record = await release.status()
    lines.append(f"release {record.status}: {record.error}")

    report = await dispatch(
        Build("report"), depends_on=[tested, "lint-1"], allow_dependency_failure=True
    )
    lines.append(f"report {await report.status()}")
    lines.append("ran: " + ", ".join(ran))
    return lines


if __name__ == "__main__":  # `.venv/bin/python docs/examples/workflows_dependencies.py`
    import asyncio

    print("\n".join(asyncio.run(main())))
