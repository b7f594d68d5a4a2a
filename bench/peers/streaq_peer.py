"""streaq: `task.enqueue()` and `Worker.enqueue_many`; its worker through `Worker.run_sync`
(what `streaq run` calls; the CLI itself has no quieter level than INFO)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from streaq import Worker

from bench import marks
from bench.marks import SLEEP
from bench.peers.base import QUEUE, JobKind, Peer


async def noop() -> None:
    marks.hit()


async def sleep() -> None:
    await marks.timed_sleep(SLEEP)


async def latency(sent: float) -> None:
    marks.hit(sent)


async def numbered(index: int) -> None:
    await marks.numbered(index)


def build(url: str) -> tuple[Worker[Any], dict[str, Any]]:
    """A worker with the three tasks registered, and the tasks by name."""
    worker: Worker[Any] = Worker(redis_url=url, concurrency=32, queue_name=QUEUE)
    tasks = {fn.__name__: worker.task(fn) for fn in (noop, sleep, latency, numbered)}  # type: ignore[call-overload]
    return worker, tasks


class StreaqPeer(Peer):
    name = "streaq"
    dists = ("streaq", "coredis", "anyio")
    note = "concurrency=32 (prefetch defaults to concurrency)"

    async def open(self) -> None:
        self.worker, self.tasks = build(self.ctx.redis_url)
        self.stack = contextlib.AsyncExitStack()
        await self.stack.enter_async_context(self.worker)

    async def close(self) -> None:
        await self.stack.aclose()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        task = self.tasks[kind]
        await (task.enqueue(sent) if kind == "latency" else task.enqueue())

    async def enqueue_numbered(self, index: int) -> None:
        await self.tasks["numbered"].enqueue(index)

    async def enqueue_bulk(self, kind: JobKind, n: int) -> None:
        await self.worker.enqueue_many([self.tasks[kind].enqueue() for _ in range(n)])

    def worker_command(self) -> list[str]:
        return [self.python(), "-m", __name__]

    def worker_env(self) -> dict[str, str]:
        return {"BENCH_QUEUE_URL": self.ctx.redis_url}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    build(os.environ["BENCH_QUEUE_URL"])[0].run_sync()
