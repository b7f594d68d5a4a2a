"""RQ: `Queue.enqueue` / `Queue.enqueue_many`, and the `rq worker` CLI.

RQ is synchronous: its client blocks (one enqueue at a time) and its default worker forks a
new process for every job and runs one job at a time (a coroutine job under `asyncio.run`).
That is how RQ is documented and used, so it runs with concurrency 1, and its jobs count in
Redis (see marks.py), since each runs in a fresh process."""

from __future__ import annotations

from redis import Redis
from rq import Queue

from bench import marks
from bench.marks import SLEEP
from bench.peers.base import QUEUE, JobKind, Peer


def noop() -> None:
    marks.hit()


async def sleep() -> None:
    await marks.timed_sleep(SLEEP)


def latency(sent: float) -> None:
    marks.hit(sent)


async def numbered(index: int) -> None:
    await marks.numbered(index)


FUNCS = {"noop": noop, "sleep": sleep, "latency": latency}


class RqPeer(Peer):
    name = "rq"
    dists = ("rq", "redis")
    blocking = True
    concurrency = 1
    shared_marks = True
    note = "sync client (1 in flight); `rq worker`: one job at a time, a fork per job"

    async def open(self) -> None:
        self.redis = Redis.from_url(self.ctx.redis_url)
        self.queue = Queue(QUEUE, connection=self.redis)

    async def close(self) -> None:
        self.redis.close()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        if kind == "latency":
            self.queue.enqueue(latency, sent)
        else:
            self.queue.enqueue(FUNCS[kind])

    async def enqueue_numbered(self, index: int) -> None:
        self.queue.enqueue(numbered, index)

    async def enqueue_bulk(self, kind: JobKind, n: int) -> None:
        self.queue.enqueue_many([Queue.prepare_data(FUNCS[kind]) for _ in range(n)])

    def worker_command(self) -> list[str]:
        return [
            self.python(), "-m", "rq.cli", "worker", "--url", self.ctx.redis_url,
            "--logging_level", "WARNING", QUEUE,
        ]  # fmt: skip
