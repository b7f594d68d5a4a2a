"""Operations: a worker says when its Redis server may lose jobs; dead workers leave the registry.

The Redis servers here are this module's own (started with the configuration under test), never
the session's shared one, whose configuration other tests rely on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from core.commands.work import redis_durability
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import WorkerInfo
from core.queue.drivers.memory import MemoryDriver
from core.queue.drivers.sql_migrations import create_engine
from core.settings import Settings
from tests.conftest import Backend
from tests.processes import WorkerProcess, wait_until
from tests.servers import PrivateServer, free_port

pytestmark = [pytest.mark.timeout(90), pytest.mark.process]

#: name -> redis-server flags: how each test server keeps (or loses) its data.
CONFIGS = {
    "volatile": ["--save", "", "--appendonly", "no"],
    "aof": ["--save", "", "--appendonly", "yes"],
    "snapshots": ["--save", "3600 1", "--appendonly", "no"],
    "evicting": ["--appendonly", "yes", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
    "no-config": ["--save", "", "--appendonly", "no", "--rename-command", "CONFIG", ""],
}


@pytest.fixture(scope="module")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One private redis-server per configuration: name -> URL."""
    binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("redis-server is not installed")
    servers: dict[str, PrivateServer] = {}
    try:
        for name, flags in CONFIGS.items():
            workdir = tmp_path_factory.mktemp(f"redis-{name}")
            port = free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
            servers[name] = PrivateServer(f"redis-{name}", [*argv, *flags], port, workdir)
        for server in servers.values():
            server.wait_listening()
        yield {name: f"redis://127.0.0.1:{s.port}/0" for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize(
    ("config", "level", "says"),
    [
        ("volatile", logging.WARNING, "it keeps nothing on restart (appendonly no"),
        ("evicting", logging.WARNING, "maxmemory-policy is allkeys-lru"),
        ("aof", logging.INFO, "keeps the queue in its append-only file"),
        ("snapshots", logging.INFO, "keeps RDB snapshots only (save 3600 1)"),
        ("no-config", logging.INFO, "cannot read the Redis server's configuration"),
    ],
)
async def test_durability_check_reads_the_servers_configuration(
    redis_servers: dict[str, str], config: str, level: int, says: str
) -> None:
    client = aioredis.Redis.from_url(redis_servers[config])
    try:
        got_level, line = await redis_durability(client)
    finally:
        await client.aclose()
    assert (got_level, "\n" in line) == (level, False)
    assert says in line
    if level == logging.WARNING:
        assert "Running Redis for a queue" in line


@pytest.mark.parametrize(
    ("config", "warns"), [("volatile", True), ("aof", False), ("no-config", False)]
)
def test_worker_start_warns_once_when_redis_may_lose_jobs(
    redis_servers: dict[str, str], tmp_path: Path, config: str, warns: bool
) -> None:
    env = {
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": redis_servers[config],
        "LOG_LEVEL": "INFO",
        "QUEUE_LEASE_MARGIN": "2",
    }
    worker = WorkerProcess(["--sleep", "0.05"], env, tmp_path / "worker.log")
    try:
        # The check ends with exactly one line about the server, a warning or an info.
        wait_until(lambda: "Redis at redis://127.0.0.1" in worker.output, 20, "the Redis check")
    finally:
        worker.stop()
    lines = [line for line in worker.output.splitlines() if "Redis at redis://" in line]
    assert len(lines) == 1, worker.output
    assert ("WARNING" in lines[0]) is warns
    warnings = [line for line in worker.output.splitlines() if "WARNING" in line]
    assert len(warnings) == (1 if warns else 0), worker.output


# -- the worker registry ----------------------------------------------------------------------


def _worker_id(worker: WorkerProcess) -> str:
    for line in worker.output.splitlines():
        if " starting: connection=" in line:
            return line.split("worker ", 1)[1].split(" ", 1)[0]
    raise AssertionError(f"no start line in:\n{worker.output}")


def _registered(backend: Backend, worker_id: str) -> bool:
    """Whether the registry still stores `worker_id` (raw storage: no driver method runs)."""
    settings = backend.settings()
    if backend.connection == "redis":
        prefix = settings.redis_prefix
        client: redis.Redis | redis.RedisCluster = (
            redis.RedisCluster.from_url(f"redis://{settings.redis_cluster_nodes.split(',')[0]}/0")
            if settings.redis_cluster_nodes
            else redis.Redis.from_url(settings.redis_dsn)
        )
        try:
            tag = f"{prefix}:{{{prefix}:workers}}"
            return bool(
                client.exists(f"{tag}:worker:{worker_id}")
                or client.zscore(f"{tag}:index", worker_id) is not None
            )
        finally:
            client.close()

    async def rows() -> int:
        engine = create_engine(settings.database_dsn, pool_size=1)
        try:
            async with engine.connect() as conn:
                query = select(t.queue_workers.c.id).where(t.queue_workers.c.id == worker_id)
                return len((await conn.execute(query)).all())
        finally:
            await engine.dispose()

    try:
        return asyncio.run(rows()) > 0
    except DBAPIError:  # the worker has not created the tables yet
        return False


def test_a_killed_worker_leaves_the_registry_when_its_heartbeat_expires(
    server_backend: Backend, tmp_path: Path
) -> None:
    """kill -9 a worker: its entry goes once its heartbeat expires, without `queue:stats`.

    On Redis the entry's own TTL removes it; on the database the live workers' heartbeats
    delete expired rows. A second worker stays alive throughout, as a pool would.
    """
    env = server_backend.env()
    doomed = WorkerProcess(["--sleep", "0.05"], env, tmp_path / "doomed.log")
    survivor = WorkerProcess(["--sleep", "0.05"], env, tmp_path / "survivor.log")
    try:
        wait_until(lambda: " starting: connection=" in doomed.output, 30, "the doomed worker")
        doomed_id = _worker_id(doomed)
        wait_until(lambda: _registered(server_backend, doomed_id), 30, "its first heartbeat")
        wait_until(lambda: " starting: connection=" in survivor.output, 30, "the survivor")
        doomed.proc.kill()
        doomed.wait(10)
        killed = time.monotonic()
        wait_until(
            lambda: not _registered(server_backend, doomed_id), 20, "the dead worker to leave"
        )
        gone_after = time.monotonic() - killed
        assert survivor.proc.poll() is None
        assert _registered(server_backend, _worker_id(survivor))
    finally:
        doomed.stop()
        survivor.stop()
    print(f"{server_backend.kind}: the killed worker left the registry after {gone_after:.2f}s")
    # QUEUE_LEASE_MARGIN=2: heartbeat every 0.67 s, an entry lives 2 s after the last one.
    assert gone_after < 2.0 + 1.5, f"left after {gone_after:.2f}s"


async def test_memory_registry_drops_expired_workers_on_the_next_report() -> None:
    driver = MemoryDriver("memory", Settings.load(env_file=None))
    dead = WorkerInfo("h:1:a", "h", 1, "memory", ("q",), 1, time.time(), time.time(), 0, ())
    alive = WorkerInfo("h:2:b", "h", 2, "memory", ("q",), 1, time.time(), time.time(), 0, ())
    await driver.report_worker(dead, ttl=0.01)
    await asyncio.sleep(0.02)  # the dead worker's heartbeat expires
    await driver.report_worker(alive, ttl=30)
    assert set(driver._workers) == {alive.id}
    assert [w.id for w in await driver.workers()] == [alive.id]
