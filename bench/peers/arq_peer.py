"""arq: `ArqRedis.enqueue_job` (W8: then `Job.result()`), and its worker through
`arq.run_worker` (what the `arq` CLI calls; the CLI itself has no quieter level than INFO,
which logs every job)."""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from arq import create_pool, run_worker
from arq.connections import ArqRedis, RedisSettings

from bench import marks
from bench.marks import SLEEP
from bench.peers.base import JobKind, Peer


async def noop(ctx: dict[str, Any]) -> None:
    marks.hit()


async def sleep(ctx: dict[str, Any]) -> None:
    await marks.timed_sleep(SLEEP)


async def latency(ctx: dict[str, Any], sent: float) -> None:
    marks.hit(sent)


async def numbered(ctx: dict[str, Any], index: int) -> None:
    await marks.numbered(index)


async def echo(ctx: dict[str, Any], value: int) -> int:
    return value


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop, sleep, latency, echo, numbered]
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_QUEUE_URL", "redis://127.0.0.1"))
    max_jobs = 32
    # W8p only (BENCH_POLL): how often the worker looks for jobs; arq's default is 0.5 s.
    if os.environ.get("BENCH_POLL"):
        poll_delay = float(os.environ["BENCH_POLL"])


class ArqPeer(Peer):
    name = "arq"
    dists = ("arq", "redis")
    note = (
        "max_jobs=32; library defaults otherwise (poll_delay 0.5 s, results kept 1 h; "
        "`Job.result` poll_delay 0.5 s)"
    )

    async def open(self) -> None:
        self.pool: ArqRedis = await create_pool(RedisSettings.from_dsn(self.ctx.redis_url))

    async def close(self) -> None:
        await self.pool.aclose()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        if kind == "latency":
            await self.pool.enqueue_job("latency", sent)
        else:
            await self.pool.enqueue_job(kind)

    async def enqueue_numbered(self, index: int) -> None:
        await self.pool.enqueue_job("numbered", index)

    async def round_trip(self, value: int, timeout: float) -> object:
        job = await self.pool.enqueue_job("echo", value)
        assert job is not None  # None only for a job id already queued
        # `Job.result` reads the result back every `poll_delay` (default 0.5 s), and the
        # worker looks for jobs every `poll_delay` of its own (the same default).
        if self.poll is None:
            return await job.result(timeout=timeout)
        return await job.result(timeout=timeout, poll_delay=self.poll)

    def worker_command(self) -> list[str]:
        return [self.python(), "-m", __name__]

    def worker_env(self) -> dict[str, str]:
        env = {"BENCH_QUEUE_URL": self.ctx.redis_url}
        if self.poll is not None:
            env["BENCH_POLL"] = repr(self.poll)
        return env


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)  # type: ignore[arg-type]
