"""What only a real Redis Cluster shows about the Redis driver (issue #17).

The conformance suite and the worker-process tests run on the `cluster` backend kind as on any
other; these tests put queues on slots served by different primaries of the session's private
cluster (3 primaries, 3 replicas) and check what crosses slots: a worker waiting on queues in
three slots (one BLPOP per slot, the first to return wins), the failed store (its own slot) and
`queue:retry`, the workers registry and `queue:stats`, `prune_records` (SCAN on each queue's
primary) and the worker's check of every primary's configuration. Failover under load is
tests/test_redis_failover.py; cross-queue workflows are tests/test_redis_cluster_workflows.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.queue.drivers import OutgoingJob, create_driver
from core.queue.drivers.redis import RedisDriver
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests import cluster_support
from tests.cluster_support import spread_queues
from tests.conftest import ROOT, Backend
from tests.jobs import FlakyJob, RecordJob, events
from tests.processes import WorkerProcess, wait_until
from tests.servers import PrivateCluster

#: The cluster backend and a driver on it, as this module's `backend` and `driver`.
backend = cluster_support.backend
driver = cluster_support.driver

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `queue:work` processes; none outlives the test."""
    procs: list[WorkerProcess] = []

    def start(backend: Backend, *args: str) -> WorkerProcess:
        proc = WorkerProcess(list(args), backend.env(), tmp_path / f"worker-{len(procs)}.log")
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()


def cli(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    """`python main.py ARGS` against the cluster, as an operator runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env={**os.environ, **backend.env(), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Until `check()` is true: a state another process makes (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def record_job(log: Path, n: int, queue: str) -> RecordJob:
    job = RecordJob(str(log), n=n)
    job.queue = queue
    return job


# -- waiting on queues in several slots ---------------------------------------------------


async def test_wait_on_three_slots_blocks_returns_on_a_push_to_any_and_leaves_the_client_sound(
    driver: RedisDriver, backend: Backend
) -> None:
    queues = spread_queues(driver)
    async with create_driver("redis", backend.settings()) as pusher:
        for n, queue in enumerate(reversed(queues)):
            # Nothing pushed: it blocks (its BLPOPs stay blocked for the next wait, so a push
            # right after this timeout still wakes it: a cancelled BLPOP could lose the token).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(driver.wait(queues, 30), 0.3)
            waiting = asyncio.ensure_future(driver.wait(queues, 30))
            began = time.monotonic()
            await pusher.push([OutgoingJob(f"j{n}", queue, b'{"job": "x"}')])
            await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - began < 5
            # The BLPOPs left blocked hold connections of their own: commands go on.
            [job] = await driver.reserve(queues, 10, 30)
            assert (job.id, job.queue) == (f"j{n}", queue)
            await driver.ack([job])
            assert [(await driver.stats(q)).pending for q in queues] == [0, 0, 0]


async def test_a_worker_on_three_queues_in_three_slots_wakes_at_once_on_a_push_to_any(
    backend: Backend, driver: RedisDriver, started: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    queues = spread_queues(driver)
    log = tmp_path / "events.log"
    # --sleep 30: a worker that polled instead of blocking would take up to 30 s per job.
    worker = started(backend, "--queue", ",".join(queues), "--sleep", "30")
    await until(lambda: _registered(driver), 30, "the worker to register")
    latencies = []
    async with QueueManager(backend.settings()) as manager:
        for n, queue in enumerate([queues[2], queues[0], queues[1], queues[2]], start=1):
            pushed_at = time.time()
            await manager.push(record_job(log, n, queue))
            wait_until(lambda n=n: len(events(log, "run")) == n, 20, f"job {n} to run")
            latencies.append(events(log, "run")[-1]["t"] - pushed_at)
    assert [e["n"] for e in events(log, "run")] == [1, 2, 3, 4]
    assert max(latencies) < 3.0, latencies
    assert worker.proc.poll() is None, worker.output


async def _registered(driver: RedisDriver, count: int = 1) -> bool:
    return len(await driver.workers()) >= count


async def test_two_workers_on_queues_of_different_primaries_each_run_their_own_queue(
    backend: Backend, driver: RedisDriver, started: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    a, b = spread_queues(driver, 2)
    log = tmp_path / "events.log"
    started(backend, "--queue", a)
    started(backend, "--queue", b)
    await until(lambda: _registered(driver, 2), 30, "both workers to register")
    async with QueueManager(backend.settings()) as manager:
        for n in range(10):
            await manager.push(record_job(log, n, a if n % 2 else b))
    wait_until(lambda: len(events(log, "run")) == 10, 30, "10 jobs to run")
    runs = events(log, "run")
    assert sorted(e["n"] for e in runs) == list(range(10))
    # One process per queue: the odd jobs (queue a) in one, the even ones in the other.
    by_pid: dict[int, set[int]] = {}
    for e in runs:
        by_pid.setdefault(e["pid"], set()).add(e["n"] % 2)
    assert sorted(by_pid.values(), key=sorted) == [{0}, {1}]
    reports = {w.pid: w for w in await driver.workers()}
    assert sorted(tuple(w.queues) for w in reports.values()) == sorted([(a,), (b,)])


# -- the failed store, queue:retry, the registry and queue:stats --------------------------


async def test_failed_jobs_of_queues_on_three_primaries_are_listed_and_retried_by_queue_retry(
    backend: Backend, driver: RedisDriver, started: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    queues = spread_queues(driver)
    log = tmp_path / "events.log"
    ids = []
    async with QueueManager(backend.settings()) as manager:
        for queue in queues:
            job = FlakyJob(str(log))  # fails every try
            job.queue = queue
            job.max_tries = 1
            ids.append((await manager.push(job)).id)
    worker = started(backend, "--queue", ",".join(queues))
    store = driver.failed_store()
    await until(lambda: _count(store, 3), 30, "3 failed records")
    listed = cli(backend, "queue:failed", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)["jobs"]
    assert sorted(r["id"] for r in records) == sorted(ids)
    assert sorted(r["queue"] for r in records) == sorted(queues)
    # Each record goes back to its queue (another slot than the store's), runs, fails again.
    retried = cli(backend, "queue:retry", "all")
    assert retried.returncode == 0, retried.stderr + retried.stdout
    wait_until(lambda: len(events(log, "failed")) == 6, 30, "the retried jobs to fail again")
    await until(lambda: _count(store, 3), 30, "3 failed records again")
    tries = events(log, "try")
    assert sorted(e["id"] for e in tries) == sorted(ids * 2)
    for job_id, queue in zip(ids, queues, strict=True):
        record = await driver.job_status(job_id, queue)
        assert record is not None and record.status is Status.FAILED, record
    assert worker.proc.poll() is None, worker.output


async def _count(store: Any, expected: int) -> bool:
    return int(await store.count()) == expected


async def test_queue_stats_and_the_registry_cover_queues_on_every_primary(
    backend: Backend, driver: RedisDriver, started: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    queues = spread_queues(driver)
    for n, queue in enumerate(queues):
        await driver.push(
            [OutgoingJob(f"{queue}-{i}", queue, b'{"job": "x"}') for i in range(n + 1)]
        )
    worker = started(backend, "--queue", "nothing-here")
    await until(lambda: _registered(driver), 30, "the worker to register")
    shown = cli(backend, "queue:stats", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    pending = {q["queue"]: q["pending"] for q in data["queues"] if q["queue"] in queues}
    assert pending == {queues[0]: 1, queues[1]: 2, queues[2]: 3}, data
    [report] = data["workers"]
    assert report["pid"] == worker.proc.pid, data
    restart = cli(backend, "queue:restart")
    assert restart.returncode == 0, restart.stderr
    assert worker.wait(30) == 0, worker.output
    await until(lambda: _none_registered(driver), 30, "the registry to forget the worker")


async def _none_registered(driver: RedisDriver) -> bool:
    return await driver.workers() == []


# -- maintenance and checks that would cross slots -----------------------------------------


async def test_prune_records_scans_each_queues_primary(driver: RedisDriver) -> None:
    queues = spread_queues(driver)
    for queue in queues:
        await driver.push([OutgoingJob(f"{queue}-{i}", queue, b'{"job": "x"}') for i in range(3)])
        await driver.ack(await driver.reserve([queue], 10, 30))
    kept = await driver.job_status(f"{queues[0]}-0", queues[0])
    assert kept is not None and kept.status is Status.SUCCEEDED
    assert await driver.prune_records(ended_before=0.0) == 0
    assert await driver.prune_records(ended_before=time.time() + 60) == 9
    for queue in queues:
        assert await driver.job_status(f"{queue}-0", queue) is None


async def test_the_worker_checks_the_configuration_of_every_primary(
    backend: Backend, started: Callable[..., WorkerProcess], redis_cluster: PrivateCluster
) -> None:
    # The session's cluster runs without AOF or save points: each primary is named.
    worker = started(backend, "--queue", "durability")
    wait_until(lambda: "may lose jobs" in worker.output, 30, "the durability warning")
    line = next(x for x in worker.output.splitlines() if "may lose jobs" in x)
    assert "the Redis Cluster at" in line and "appendonly no" in line, line
    about = line.split("may lose jobs: primaries ", 1)[1].split(": it keeps", 1)[0]
    named = sorted(int(node.rpartition(":")[2]) for node in about.split(", "))
    assert named == sorted(redis_cluster.primaries()), line


def test_health_on_a_cluster_reports_the_live_worker(
    backend: Backend, started: Callable[..., WorkerProcess]
) -> None:
    down = cli(backend, "health", "--connection", "redis")
    assert down.returncode != 0 and "no live worker" in down.stdout + down.stderr
    started(backend, "--queue", "health-q")
    wait_until(
        lambda: cli(backend, "health", "--connection", "redis").returncode == 0,
        30,
        "health to see the worker",
    )


def test_the_dashboard_offers_the_redis_connection_set_by_cluster_nodes_alone(
    backend: Backend,
) -> None:
    from core.dashboard.source import configured_connections
    from tests.conftest import make_settings

    settings = make_settings(
        queue_connection="database",
        db_url="sqlite+aiosqlite:///:memory:",
        redis_cluster_nodes=backend.overrides["redis_cluster_nodes"],
    )
    assert "redis" in configured_connections(settings)


async def test_a_primary_without_the_scripts_gets_them_and_only_its_calls_are_sent_again(
    driver: RedisDriver, backend: Backend
) -> None:
    """As after a failover (Redis does not replicate its script cache to the replica that
    takes over): one primary answers NOSCRIPT, the others run their calls of the pipeline."""
    queues = spread_queues(driver)
    client: Any = driver.client
    flushed = client.get_node_from_key(driver.keys(queues[1]).tag)
    await client.execute_command("SCRIPT FLUSH", target_nodes=flushed)
    await driver.push([OutgoingJob(f"{q}-1", q, b'{"job": "x"}') for q in queues])
    # Each job stored once: the calls that ran on the other primaries were not sent again.
    assert [(await driver.stats(q)).pending for q in queues] == [1, 1, 1]
    [loaded] = await client.execute_command(
        "SCRIPT EXISTS", driver.script("push").sha, target_nodes=flushed
    )
    assert loaded
    jobs = await driver.reserve(queues, 10, 30)
    assert sorted(j.id for j in jobs) == sorted(f"{q}-1" for q in queues)
