"""taskiq with taskiq-redis's `RedisStreamBroker` (the one its README shows; it acknowledges):
`task.kiq()`, and the `taskiq worker` CLI with one worker process."""

from __future__ import annotations

import os
from typing import Any

from taskiq_redis import RedisStreamBroker

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


def build(url: str) -> tuple[RedisStreamBroker, dict[str, Any]]:
    """A broker with the three tasks registered, and the tasks by name."""
    broker = RedisStreamBroker(url=url, queue_name=QUEUE)
    # By explicit name: registering renames the function it wraps.
    funcs = {"noop": noop, "sleep": sleep, "latency": latency, "numbered": numbered}
    tasks = {name: broker.register_task(fn, task_name=name) for name, fn in funcs.items()}
    return broker, tasks


#: What the `taskiq worker bench.peers.taskiq_peer:broker` CLI loads.
broker, _ = build(os.environ.get("BENCH_QUEUE_URL", "redis://127.0.0.1"))


class TaskiqPeer(Peer):
    name = "taskiq"
    dists = ("taskiq", "taskiq-redis", "redis")
    note = "`taskiq worker --workers 1 --max-async-tasks 32`"

    async def open(self) -> None:
        self.broker, self.tasks = build(self.ctx.redis_url)
        await self.broker.startup()  # creates the consumer group, so queued jobs are seen

    async def close(self) -> None:
        await self.broker.shutdown()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        task = self.tasks[kind]
        await (task.kiq(sent) if kind == "latency" else task.kiq())

    async def enqueue_numbered(self, index: int) -> None:
        await self.tasks["numbered"].kiq(index)

    def worker_command(self) -> list[str]:
        return [
            self.python(), "-m", "taskiq", "worker", f"{__name__}:broker",
            "--workers", "1", "--max-async-tasks", "32", "--log-level", "WARNING",
        ]  # fmt: skip

    def worker_env(self) -> dict[str, str]:
        return {"BENCH_QUEUE_URL": self.ctx.redis_url}
