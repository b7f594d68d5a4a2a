"""RQ's is_async=False in Topiq (docs/coming-from.md, "RQ")."""

from core.queue.queue_manager import Queue


# In a project this lives in a module under app/ (e.g. app/tasks.py).
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


async def main() -> int:
    q = Queue("low", is_async=False)  # runs on the `sync` connection: no worker needed
    job = await q.enqueue(fib, 8)  # fib(8) has run when enqueue returns
    result: int = await job.result()
    return result
