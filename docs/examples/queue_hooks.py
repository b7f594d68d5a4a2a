"""The order of hooks, middleware, succeeded() and failed() (docs/queue.md, "Job lifecycle")."""

from typing import Any

from core.events import events
from core.hooks import hooks
from core.job import Job, JobMiddleware
from core.queue.queue_manager import dispatch

seen: list[str] = []


# Application hooks: in a project they live in app/hooks.py, which Topiq loads on start.
@hooks.on_dispatch
def on_dispatch(job: Job, job_id: str) -> None:
    seen.append("on_dispatch")


@hooks.before_run
async def before_run(job: Job) -> None:
    seen.append("before_run")


@hooks.after_run
async def after_run(job: Job, status: str, value: Any) -> None:
    seen.append(f"after_run {status}")


@hooks.on_failure
async def on_failure(job: Job, exception: BaseException) -> None:
    seen.append("on_failure")


def traced(name: str) -> JobMiddleware:
    async def middleware(job: Job, call_next: Any) -> Any:
        seen.append(f"{name} in")
        try:
            return await call_next()
        finally:
            seen.append(f"{name} out")

    return middleware


class Resize(Job):
    connection = "sync"  # runs inside dispatch: the whole story in one call
    max_tries = 2

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def middleware(self) -> list[JobMiddleware]:
        return [traced("outer"), traced("inner")]  # outermost first

    async def handle(self) -> str:
        seen.append(f"handle (try {self.attempts})")
        if self.fail:
            raise ValueError("not an image")
        return "resized"

    async def succeeded(self, result: Any) -> None:
        seen.append(f"succeeded({result!r})")

    async def failed(self, exception: BaseException) -> None:
        seen.append(f"failed({exception})")


async def main() -> list[str]:
    stop = events.subscribe(lambda event: seen.append(f"event: {event.kind}"))
    try:
        await dispatch(Resize(fail=False))
        seen.append("--")
        try:
            await dispatch(Resize(fail=True))
        except ValueError as exc:  # on sync, a job that fails for good raises from dispatch
            seen.append(f"dispatch raised {exc!r}")
    finally:
        stop()
    return seen


if __name__ == "__main__":  # `.venv/bin/python docs/examples/queue_hooks.py`
    import asyncio

    print("\n".join(asyncio.run(main())))
