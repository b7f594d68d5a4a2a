"""Masonite's failed(payload, error) and blocking mode (docs/coming-from.md, "Masonite")."""

from typing import Any

from core.job import Job
from core.queue.queue_manager import queue

reports: list[str] = []


# In a project this lives in app/jobs/ and has no `connection`: the `sync` connection is
# Masonite's async driver with `blocking: True` (jobs run inside push, errors surface there).
class CreateInvoice(Job):
    connection = "sync"

    def __init__(self, amount: int, parts: int) -> None:
        self.amount = amount
        self.parts = parts

    async def handle(self) -> float:
        return self.amount / self.parts

    def failed(self, payload: dict[str, Any], error: BaseException) -> None:
        reports.append(
            f"{payload['obj'].__name__}.{payload['callback']} ran {payload['ran']} times: {error}"
        )


async def main() -> list[str]:
    handle = await queue.push(CreateInvoice(100, 4))
    reports.append(f"result: {await handle.result()}")
    try:
        await queue.push(CreateInvoice(100, 0))
    except ZeroDivisionError as exc:
        reports.append(f"push raised: {exc}")
    return reports


if __name__ == "__main__":  # `.venv/bin/python docs/examples/coming_from_masonite_failed.py`
    import asyncio

    print("\n".join(asyncio.run(main())))
