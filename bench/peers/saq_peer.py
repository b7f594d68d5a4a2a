"""SAQ: `Queue.enqueue`, and its worker through the `saq` CLI (WARNING by default).

SAQ has no bulk enqueue (`Queue.map` enqueues concurrently and then waits for the results).
W8's round trip is `Queue.apply` (enqueue, then wait for the result)."""

from __future__ import annotations

import os
from typing import Any

from saq import Queue

from bench import marks
from bench.marks import SLEEP
from bench.peers.base import QUEUE, JobKind, Peer


async def noop(ctx: Any) -> None:
    marks.hit()


async def sleep(ctx: Any) -> None:
    await marks.timed_sleep(SLEEP)


async def latency(ctx: Any, *, sent: float) -> None:
    marks.hit(sent)


async def numbered(ctx: Any, *, index: int) -> None:
    await marks.numbered(index)


async def echo(ctx: Any, *, value: int) -> int:
    return value


def settings() -> dict[str, Any]:
    """The worker settings the `saq` CLI loads (`saq bench.peers.saq_peer.settings`)."""
    url = os.environ.get("BENCH_QUEUE_URL", "redis://127.0.0.1")
    return {
        "queue": Queue.from_url(url, name=QUEUE),
        "functions": [noop, sleep, latency, echo, numbered],
        "concurrency": 32,
    }


class SaqPeer(Peer):
    name = "saq"
    dists = ("saq", "redis")
    note = "concurrency=32; `Queue.apply` with its default poll_interval (0.5 s)"

    async def open(self) -> None:
        self.queue = Queue.from_url(self.ctx.redis_url, name=QUEUE)
        await self.queue.connect()

    async def close(self) -> None:
        await self.queue.disconnect()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        if kind == "latency":
            await self.queue.enqueue("latency", sent=sent)
        else:
            await self.queue.enqueue(kind)

    async def enqueue_numbered(self, index: int) -> None:
        await self.queue.enqueue("numbered", index=index)

    async def round_trip(self, value: int, timeout: float) -> object:
        # `apply` enqueues and then reads the job back every `poll_interval` (default 0.5 s),
        # sleeping once more after the read that found it done: two intervals at the least.
        # (Its worker waits for jobs in a blocking Redis call, not a poll.)
        if self.poll is None:
            return await self.queue.apply("echo", timeout=timeout, value=value)
        return await self.queue.apply("echo", timeout=timeout, poll_interval=self.poll, value=value)

    def worker_command(self) -> list[str]:
        return [self.python(), "-m", "saq", f"{__name__}.settings"]

    def worker_env(self) -> dict[str, str]:
        return {"BENCH_QUEUE_URL": self.ctx.redis_url}
