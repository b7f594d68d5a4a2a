"""RouteMQ (the seed implementation): `QueueManager.push/bulk` and `routemq queue-work`, on its
Redis driver or its database driver.

Its worker runs one job at a time (no concurrency setting) and sleeps `--sleep` seconds (default
3) when its queue is empty; RouteMQ reads its settings from the environment only."""

from __future__ import annotations

import os
from typing import Any

from bench.peers.base import QUEUE, JobKind, Peer


class RouteMQPeer(Peer):
    name = "routemq"
    dists = ("routemq", "redis", "sqlalchemy", "aiomysql")
    backends = ("redis", "mysql")
    concurrency = 1
    note = (
        "one job at a time (it has no concurrency option), `--sleep 3` (default) when idle, "
        "REDIS_MAX_CONNECTIONS=64"
    )

    def _env(self) -> dict[str, str]:
        database = self.ctx.backend == "mysql"
        env = {
            "QUEUE_CONNECTION": "database" if database else "redis",
            "ENABLE_REDIS": "false" if database else "true",
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.ctx.redis_port),
            # Its pool (default 10) raises MaxConnectionsError with 32 enqueues in flight.
            "REDIS_MAX_CONNECTIONS": "64",
            "ENABLE_MYSQL": "true" if database else "false",
            "DB_AUTO_CREATE_TABLES": "true",
            "ROUTEMQ_JOB_DIRECTORY": "bench.peers.routemq_jobs",
            "LOG_LEVEL": "WARNING",
            "LOG_LIFECYCLE_EVENTS": "false",  # one log line per job event otherwise
        }
        if database:
            env["DATABASE_URL"] = self.ctx.db_url
        return env

    async def open(self) -> None:
        os.environ.update(self._env())
        from bootstrap.app import Application
        from routemq.queue.queue_manager import QueueManager

        from bench.peers import routemq_jobs

        self.app: Any = Application(env_file=os.devnull)
        await self.app._initialize_connections()  # what `routemq queue-work` does first
        self.manager = QueueManager()
        self.jobs = routemq_jobs

    async def close(self) -> None:
        await self.app._cleanup_connections()

    def _job(self, kind: JobKind, sent: float = 0.0) -> Any:
        job = {"noop": self.jobs.Noop, "sleep": self.jobs.Sleep, "latency": self.jobs.Latency}[
            kind
        ]()
        job.queue = QUEUE
        if kind == "latency":
            job.sent = sent
        return job

    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        await self.manager.push(self._job(kind, sent))

    async def enqueue_bulk(self, kind: JobKind, n: int) -> None:
        await self.manager.bulk([self._job(kind) for _ in range(n)])

    def worker_command(self) -> list[str]:
        connection = "database" if self.ctx.backend == "mysql" else "redis"
        return [
            self.python(), "-m", "routemq.cli", "queue-work",
            "--queue", QUEUE, "--connection", connection,
        ]  # fmt: skip

    def worker_env(self) -> dict[str, str]:
        return self._env()
