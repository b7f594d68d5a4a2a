"""Failover of a real Sentinel setup under load (#17 §4): a primary, its replicas and three
sentinel processes of the test's own; a dispatcher process pushes jobs continuously to two
queues and one worker process per queue runs them, all through REDIS_SENTINELS /
REDIS_SENTINEL_MASTER. A forced `SENTINEL FAILOVER` and a kill -9 of the primary: the same
processes carry on (they ask the sentinels again). With REDIS_WAIT_REPLICAS=1 no job
acknowledged by dispatch is lost; without it, a forced failover can lose the few jobs the old
primary took between the promotion and its demotion (reported, see the test).
TOPIQ_FAILOVER_REPORT=<file> collects the figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.failover_dispatch import Load, queue_empty, report, tally
from tests.processes import wait_until
from tests.servers import PrivateSentinel, start_redis_sentinel

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

QUEUES = ["sentinel-a", "sentinel-b"]


def env_of(setup: PrivateSentinel, wait_replicas: int) -> dict[str, str]:
    return {
        "QUEUE_CONNECTION": "redis",
        "QUEUE_ALLOWED_MODULES": "app.,tests.",
        "QUEUE_LEASE_MARGIN": "2",
        "WORKER_SLEEP": "0.05",
        "LOG_LEVEL": "INFO",
        "REDIS_SENTINELS": setup.sentinels,
        "REDIS_SENTINEL_MASTER": setup.master_name,
        "REDIS_WAIT_REPLICAS": str(wait_replicas),
        "REDIS_WAIT_TIMEOUT": "1",
    }


def run_sentinel_failover(
    setup: PrivateSentinel, tmp_path: Path, wait_replicas: int, fail: Callable[[], int]
) -> dict[str, object]:
    settings = make_settings(
        redis_sentinels=setup.sentinels, redis_sentinel_master=setup.master_name
    )
    load = Load(tmp_path, env_of(setup, wait_replicas), QUEUES)
    try:
        wait_until(lambda: len(load.runs()) >= 100, 40, "100 jobs to run before the failover")
        started = time.time()
        old = fail()
        new = setup.wait_new_primary(old)
        promoted = time.time()
        demoted = promoted
        if setup.server(old).proc.poll() is None:
            # A forced failover: the old primary goes on answering the connections it has
            # until the sentinels make it follow the new one.
            wait_until(lambda: setup.role(old) == "slave", 30, "the old primary to follow")
            demoted = time.time()
        # The same processes carry on through the new primary: dispatches are acknowledged
        # again on both queues, and the workers run jobs acknowledged after the promotion.
        for queue in QUEUES:
            wait_until(
                lambda q=queue: load.acked_since(demoted, q) >= 50,  # type: ignore[misc]
                30,
                f"dispatches to {queue} to resume",
            )
        after = {
            int(e["n"])  # type: ignore[call-overload]
            for e in load.events("acked")
            if float(e["t"]) > demoted  # type: ignore[arg-type]
        }
        wait_until(
            lambda: any(int(r["n"]) in after for r in load.runs()),  # type: ignore[call-overload]
            30,
            "a job dispatched after the switch to run",
        )
        first_run = min(
            float(r["t"])  # type: ignore[arg-type]
            for r in load.runs()
            if int(r["n"]) in after  # type: ignore[call-overload]
        )
        load.stop_dispatching()
        wait_until(lambda: queue_empty(settings, QUEUES), 40, "the queues to drain")
        for worker in load.workers:
            assert worker.proc.poll() is None, worker.output[-3000:]
        figures = tally(load)
        lost_at: list[float] = figures.pop("lost_acked_at")  # type: ignore[assignment]
        figures.update(
            lost_acked_from_started_s=[round(t - started, 2) for t in lost_at],
            wait_replicas=wait_replicas,
            old_primary=old,
            new_primary=new,
            failover_to_promotion_s=round(promoted - started, 2),
            failover_to_first_run_s=round(first_run - started, 2),
            failover_to_old_primary_following_s=round(demoted - started, 2),
        )
    except BaseException:
        print(load.output())
        raise
    finally:
        load.stop()
    return figures


def test_forced_sentinel_failover_with_wait_replicas_loses_nothing(tmp_path: Path) -> None:
    setup = start_redis_sentinel(replicas=1)
    if setup is None:
        pytest.skip("redis-server is not installed")
    try:
        figures = run_sentinel_failover(setup, tmp_path, 1, setup.failover)
    finally:
        setup.stop()
    report("sentinel forced failover, REDIS_WAIT_REPLICAS=1", figures)
    assert figures["lost"] == [], figures


def test_forced_sentinel_failover_without_wait_carries_on(tmp_path: Path) -> None:
    # Sentinel promotes the replica, then tells the old primary to follow it: in between, the
    # old primary still answers the connections it has, and what it takes then is discarded
    # when it resyncs. Without WAIT those jobs were acknowledged to the dispatcher: the figure
    # is reported (a few, of the last moment before the switch), not asserted zero.
    setup = start_redis_sentinel(replicas=1)
    if setup is None:
        pytest.skip("redis-server is not installed")
    try:
        figures = run_sentinel_failover(setup, tmp_path, 0, setup.failover)
    finally:
        setup.stop()
    report("sentinel forced failover, no WAIT", figures)
    assert figures["unconfirmed"] == 0
    # Only what was acknowledged before the old primary followed the new one can be lost (the
    # test sees the switch up to a poll late, the dispatcher records an ack a moment after it:
    # 1 s of slack).
    window: float = figures["failover_to_old_primary_following_s"]  # type: ignore[assignment]
    lost_at: list[float] = figures["lost_acked_from_started_s"]  # type: ignore[assignment]
    assert all(t <= window + 1.0 for t in lost_at), figures


def test_sentinel_primary_killed_with_wait_replicas_loses_nothing(tmp_path: Path) -> None:
    # Two replicas: after the kill the promoted one still has a replica to acknowledge WAIT 1.
    setup = start_redis_sentinel(replicas=2)
    if setup is None:
        pytest.skip("redis-server is not installed")
    try:
        figures = run_sentinel_failover(setup, tmp_path, 1, setup.kill_primary)
    finally:
        setup.stop()
    report("sentinel kill -9, REDIS_WAIT_REPLICAS=1", figures)
    assert figures["lost"] == [], figures


@pytest.mark.parametrize("topology", ["single", "sentinel"])
def test_wait_replicas_raises_not_replicated_when_the_replica_is_stopped(topology: str) -> None:
    """One server (REDIS_URL at the primary) and Sentinel: a push is acknowledged by the replica;
    with the replica stopped (SIGSTOP) it raises NotReplicatedError after REDIS_WAIT_TIMEOUT,
    naming the jobs, and the jobs are stored on the primary."""
    import asyncio
    import os
    import signal

    from core.errors import NotReplicatedError
    from core.queue.drivers.base import OutgoingJob
    from core.queue.drivers.redis import RedisDriver

    setup = start_redis_sentinel(replicas=1)
    if setup is None:
        pytest.skip("redis-server is not installed")
    where: dict[str, object] = (
        {"redis_url": f"redis://127.0.0.1:{setup.primary()}/0"}
        if topology == "single"
        else {"redis_sentinels": setup.sentinels, "redis_sentinel_master": setup.master_name}
    )
    settings = make_settings(**where, redis_wait_replicas=1, redis_wait_timeout=0.3)
    replica = next(s for s in setup.servers if s.port != setup.primary())

    async def go() -> None:
        driver = RedisDriver("redis", settings)
        await driver.open()
        try:
            jobs = [OutgoingJob(id=f"ok-{n}", queue=f"q{n % 2}", payload=b"{}") for n in range(4)]
            assert [p.outcome for p in await driver.push(jobs)] == ["created"] * 4
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(NotReplicatedError) as caught:
                    await driver.push(
                        [OutgoingJob(id=f"unsure-{n}", queue="q0", payload=b"{}") for n in range(2)]
                    )
                waited = time.monotonic() - started
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            assert 0.3 <= waited < 5
            assert caught.value.job_ids == ["unsure-0", "unsure-1"]
            assert caught.value.acknowledged == 0
            for n in range(2):
                status = await driver.job_status(f"unsure-{n}", "q0")
                assert status is not None and status.status == "queued"
        finally:
            pool = driver.client.connection_pool
            await driver.close()
            # RedisDriver.close() leaves the Sentinel's own connections to the sentinels open
            # (a ResourceWarning; reported to A in /work/notes/failover17.md): closed here.
            for watcher in getattr(getattr(pool, "sentinel_manager", None), "sentinels", []):
                await watcher.aclose()

    try:
        asyncio.run(go())
    finally:
        setup.stop()
