"""Topiq, from this repository: `QueueManager.push/bulk` and `python main.py queue:work`."""

from __future__ import annotations

import itertools
import random
from typing import ClassVar

from bench.peers.base import DEVICES, QUEUE, REPO, JobKind, Peer, Unsupported


class TopiqPeer(Peer):
    name = "topiq"
    dists = ("topiq", "redis", "hiredis", "sqlalchemy", "aiomysql", "aiosqlite")
    backends = ("redis", "mysql", "sqlite", "amqp")
    note = "`python main.py queue:work --concurrency 32`"
    connection: ClassVar[dict[str, str]] = {
        "redis": "redis",
        "mysql": "database",
        "sqlite": "database",
        "amqp": "amqp",
    }

    def _env(self) -> dict[str, str]:
        env = {
            "QUEUE_CONNECTION": self.connection[self.ctx.backend],
            "REDIS_URL": self.ctx.redis_url,
            "QUEUE_ALLOWED_MODULES": "bench.,app.",
            "LOG_LEVEL": "WARNING",
        }
        if self.ctx.db_url:
            env["DB_URL"] = self.ctx.db_url
        if self.ctx.backend == "amqp":
            # RabbitMQ holds the jobs; the records it cannot keep go to the run's Redis
            # (emptied before each run, as for the Redis rows).
            env.update(AMQP_URL=self.ctx.extra["amqp_url"], AMQP_STORE="redis", AMQP_PREFIX="bench")
        return env

    async def open(self) -> None:
        from core.queue.queue_manager import QueueManager
        from core.settings import Settings

        settings = Settings.load(env_file=None, **{k.lower(): v for k, v in self._env().items()})
        self.manager = QueueManager(settings)
        driver = await self.manager.connection()  # connect (create tables) before the clock
        if self.ctx.backend == "amqp":
            # Flushing Redis empties the store, not the broker: what an earlier run (W1)
            # left in the queue goes now.
            await driver.clear(QUEUE)

    async def close(self) -> None:
        if self.ctx.backend == "amqp":  # a broker outlives the run: leave nothing in it
            await (await self.manager.connection()).clear(QUEUE)
        await self.manager.close()

    #: W2p's priorities: the same sequence in every run.
    _priorities = random.Random(13)
    #: W2g's devices, round robin.
    _devices = itertools.count()

    @classmethod
    def _job(cls, kind: JobKind, sent: float = 0.0) -> object:
        from bench import jobs

        if kind == "latency":
            return jobs.Latency(sent)
        if kind == "noop_unkept":
            return jobs.NoopUnkept()
        if kind == "noop_grouped":
            return jobs.NoopGrouped(f"d{next(cls._devices) % DEVICES}")
        if kind == "noop_prio":
            job = jobs.Noop()
            job.priority = cls._priorities.randint(0, 9)  # an instance's own setting
            return job
        return jobs.Sleep() if kind == "sleep" else jobs.Noop()

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        await self.manager.push(self._job(kind, sent), QUEUE)  # type: ignore[arg-type]

    async def enqueue_numbered(self, index: int) -> None:
        from bench import jobs

        await self.manager.push(jobs.Numbered(index), QUEUE)

    async def enqueue_bulk(self, kind: JobKind, n: int) -> None:
        await self.manager.bulk([self._job(kind) for _ in range(n)], QUEUE)  # type: ignore[misc]

    async def round_trip(self, value: int, timeout: float) -> object:
        # `self.poll` is not used: `result()` blocks on the server (Redis), not reading back.
        from bench import jobs

        handle = await self.manager.push(jobs.Echo(value), QUEUE)
        result = getattr(handle, "result", None)
        if result is None:  # the release before issue #12 returns the bare id
            raise Unsupported(
                "push returned a plain id: job handles with `result()` are not in this checkout"
            )
        return await result(timeout=timeout)

    def worker_command(self) -> list[str]:
        # W9 smoke: every job's timeout (`--timeout`) and the lease margin short, so that a
        # killed worker's leases lapse within seconds (by default: 60 s + 10 s).
        short = ["--timeout", repr(self.job_timeout)] if self.job_timeout else []
        return [
            self.python(),
            str(REPO / "main.py"),
            "queue:work",
            "--connection",
            self.connection[self.ctx.backend],
            "--queue",
            QUEUE,
            "--concurrency",
            str(self.concurrency),
            *short,
        ]

    def worker_env(self) -> dict[str, str]:
        env = self._env()
        if self.job_timeout:  # W9 smoke: a lapsed lease comes back after timeout + margin
            env["QUEUE_LEASE_MARGIN"] = repr(self.job_timeout)
        return env
