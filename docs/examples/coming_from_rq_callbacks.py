"""RQ's callbacks and retries in Topiq (docs/coming-from.md, "RQ")."""

from typing import Any

from core.queue.queue_manager import Callback, Queue, RetryPolicy


# In a project these live in a module under app/ (e.g. app/tasks.py).
def say_hello(name: str) -> str:
    if not name:
        raise ValueError("nobody to greet")
    return f"Hello, {name}!"


def report_success(job: Any, connection: str, result: Any, *args: Any, **kwargs: Any) -> None:
    print(f"{job.func_name} succeeded on {connection}: {result}")


def report_failure(job: Any, connection: str, type: Any, value: Any, traceback: Any) -> None:
    print(f"{job.id} failed for good: {value}")


def refuse(job: Any, connection: str, result: Any, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the success callback refused it")


async def main() -> list[str]:
    q = Queue()  # the default queue
    hello = await q.enqueue(say_hello, "Ada", on_success=report_success)
    nobody = await q.enqueue(
        say_hello,
        "",
        on_failure=Callback(report_failure, timeout=10),
        retry=RetryPolicy(max=2, interval=[0.1, 0.5]),  # 2 retries: 3 tries in all
    )
    refused = await q.enqueue(say_hello, "Bob", on_success=refuse)
    lines = [await hello.result(timeout=30)]
    for handle in (nobody, refused):
        try:
            await handle.result(timeout=30)
        except Exception:
            record = await handle.status()
            lines.append(f"{record.status} after {record.attempts} tries: {record.error}")
    return lines
