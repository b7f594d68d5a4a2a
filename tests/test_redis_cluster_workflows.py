"""Cross-queue dependencies and workflows on a real Redis Cluster (issue #17, the relay:
core/queue/drivers/redis_relay.py, lua/relay.lua).

Every queue lives in one slot; these tests put a workflow's jobs on queues whose slots are
served by different primaries of the session's private cluster (3 primaries, 3 replicas),
and run them on real worker processes, one per queue, so that every cross-queue step goes
through an outbox and relay.lua on another node. The crash test runs an ack's script without
the delivery that follows it (as a worker killed between the two leaves things) and shows a
worker of that queue delivers the messages later, the dependent running exactly once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import JobCancelledError, JobFailedError
from core.queue.drivers import Outcome, OutgoingJob
from core.queue.drivers.base import Dependency
from core.queue.drivers.redis import RedisDriver
from core.queue.drivers.redis_relay import Outboxes, deliver
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.workflows import batch, chain
from tests import cluster_support
from tests.cluster_support import spread_queues
from tests.conftest import Backend
from tests.jobs import FlakyJob, RecordJob, events
from tests.processes import WorkerProcess, wait_until

#: The cluster backend and a driver on it, as this module's `backend` and `driver`.
backend = cluster_support.backend
driver = cluster_support.driver

pytestmark = [pytest.mark.timeout(120)]


class Workers:
    """One `queue:work` process per queue (each on its own slot and node)."""

    def __init__(self, backend: Backend, logs: Path) -> None:
        self.env = backend.env()
        self.logs = logs
        self.procs: list[WorkerProcess] = []

    def start(self, queue: str) -> WorkerProcess:
        proc = WorkerProcess(["--queue", queue], self.env, self.logs / f"worker-{queue}.log")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


@pytest.fixture
def workers(backend: Backend, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(backend, tmp_path)
    try:
        yield pool
    finally:
        pool.stop()


def on(job: Any, queue: str) -> Any:
    job.queue = queue
    return job


async def until_empty(driver: RedisDriver, key: str, timeout: float = 10) -> None:
    """Poll a list another process empties (no event to await), every 20 ms."""
    deadline = time.monotonic() + timeout
    while await driver.client.llen(key):  # type: ignore[misc]
        assert time.monotonic() < deadline, f"{key} still holds messages after {timeout}s"
        await asyncio.sleep(0.02)


def runs(log: Path) -> list[int]:
    return [e["n"] for e in events(log, "run")]


async def test_a_chain_over_three_queues_on_three_primaries_runs_in_order(
    backend: Backend, driver: RedisDriver, workers: Workers, tmp_path: Path
) -> None:
    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    for queue in (a, b, c):
        workers.start(queue)
    async with QueueManager(backend.settings()) as manager:
        flow = await chain(
            on(RecordJob(str(log), n=1), a),
            on(RecordJob(str(log), n=2), b),
            on(RecordJob(str(log), n=3), c),
        ).dispatch(manager)
        assert await flow.result(timeout=60) is None
        record = await flow.status()
        assert record.status is Status.SUCCEEDED
        assert record.progress is not None
        assert (record.progress.total, record.progress.succeeded) == (3, 3)
    assert runs(log) == [1, 2, 3]
    # Each ran on the worker of its own queue: three processes.
    assert len({e["pid"] for e in events(log, "run")}) == 3


async def test_a_batch_over_queues_ends_with_its_members_counts(
    backend: Backend, driver: RedisDriver, workers: Workers, tmp_path: Path
) -> None:
    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    for queue in (a, b, c):
        workers.start(queue)
    failing = on(FlakyJob(str(log)), c)
    failing.max_tries = 1
    async with QueueManager(backend.settings()) as manager:
        flow = await batch(
            [
                on(RecordJob(str(log), n=1), a),
                on(RecordJob(str(log), n=2), b),
                on(RecordJob(str(log), n=3), b),
                failing,
            ],
            allow_failures=True,
        ).dispatch(manager)
        with pytest.raises(JobFailedError):
            await flow.result(timeout=60)
        progress = await flow.progress()
        assert (progress.total, progress.succeeded, progress.failed, progress.cancelled) == (
            4,
            3,
            1,
            0,
        )
        assert (await flow.status()).error == "1 of 4 members failed"
    assert sorted(runs(log)) == [1, 2, 3]


async def test_cancel_on_failure_reaches_members_in_other_queues(
    backend: Backend, driver: RedisDriver, workers: Workers, tmp_path: Path
) -> None:
    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    failing = on(FlakyJob(str(log)), a)
    failing.max_tries = 1
    async with QueueManager(backend.settings()) as manager:
        flow = await batch(
            [failing, on(RecordJob(str(log), n=2), b), on(RecordJob(str(log), n=3), c)]
        ).dispatch(manager)
        # Only queue a has a worker: b's and c's members wait until the failure cancels them.
        workers.start(a)
        with pytest.raises(JobFailedError):
            await flow.result(timeout=60)
        for member in flow.jobs[1:]:
            record = await member.status()
            assert record.status is Status.CANCELLED, record
            assert record.error == f"cancelled: a member of {flow.id} failed"
        progress = await flow.progress()
        assert (progress.failed, progress.cancelled) == (1, 2)
        # Workers of b and c find nothing to run.
        assert await driver.reserve([b, c], 10, lease=30) == []
    assert runs(log) == []


async def test_dependents_in_other_slots_are_released_or_cancelled_by_their_rule(
    backend: Backend, driver: RedisDriver, workers: Workers, tmp_path: Path
) -> None:
    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    failing = FlakyJob(str(log))
    failing.max_tries = 1
    async with QueueManager(backend.settings()) as manager:
        first = await manager.push(failing, queue=a)
        strict = await manager.push(RecordJob(str(log), n=2), queue=b, depends_on=first)
        lenient = await manager.push(
            RecordJob(str(log), n=3), queue=c, depends_on=first, allow_dependency_failure=True
        )
        assert (await strict.status()).status is Status.DEFERRED
        for queue in (a, b, c):
            workers.start(queue)
        assert await lenient.result(timeout=60) is None
        with pytest.raises(JobCancelledError):
            await strict.result(timeout=60)
        record = await strict.status()
        assert record.status is Status.CANCELLED
        assert record.error == f"dependency {first.id} failed"
        assert (await first.status()).status is Status.FAILED
    assert runs(log) == [3]


async def test_a_dependency_unknown_in_another_queue_is_missing_and_nothing_is_stored(
    driver: RedisDriver,
) -> None:
    a, b = spread_queues(driver, 2)
    job = OutgoingJob(
        "dependent", b, b"{}", job="tests.jobs:RecordJob", depends_on=(Dependency("nobody", a),)
    )
    [pushed] = await driver.push([job])
    assert (pushed.outcome, pushed.id) == ("missing", "nobody")
    assert await driver.job_status("dependent", b) is None
    assert await driver.client.llen(f"{driver.keys(b).tag}:outbox") == 0  # type: ignore[misc]


async def test_messages_left_by_a_worker_lost_after_its_ack_are_delivered_by_another(
    backend: Backend, driver: RedisDriver, workers: Workers, tmp_path: Path
) -> None:
    """A worker killed between its ack script and the delivery: the message stays in the
    queue's outbox; a worker of that queue delivers it once it is older than 2 s; the
    dependent runs exactly once, and a second delivery of the same message changes nothing."""
    a, b = spread_queues(driver, 2)
    log = tmp_path / "events.log"
    async with QueueManager(backend.settings()) as manager:
        first = await manager.push(RecordJob(str(log), n=1), queue=a)
        second = await manager.push(RecordJob(str(log), n=2), queue=b, depends_on=first)
    [held] = await driver.reserve([a], 1, lease=30)
    # ack.lua as a worker runs it, and then nothing: the process is gone before delivering.
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    k = driver.keys(a)
    reply = await driver.script("ack")(
        keys=[k.reserved, k.payloads, k.attempts], args=[k.tag, *driver._ack_args([held])]
    )
    removed, messages, stale = reply
    assert (int(removed), len(messages), int(stale)) == (1, 1, 0)
    outbox = f"{k.tag}:outbox"
    assert await driver.client.lrange(outbox, 0, -1) == messages  # type: ignore[misc]
    assert orjson.loads(messages[0])[3] == "r"
    assert (await driver.job_status(second.id, b)).status is Status.DEFERRED  # type: ignore[union-attr]

    # Workers of both queues: a's (idle, reserving every WORKER_SLEEP) finds the stale message.
    workers.start(a)
    workers.start(b)
    wait_until(lambda: runs(log) == [2], 30, "the dependent to run")
    record = await driver.wait_ended(second.id, b, 30)
    assert record is not None and record.status is Status.SUCCEEDED
    # The deliverer removes the message after relay.lua ran (the dependent may end first).
    await until_empty(driver, outbox)

    # The same message delivered again (a sweeper beside the first deliverer): no effect.
    again = Outboxes()
    again.sent[k.tag] = list(messages)
    assert await deliver(driver, again) == 1
    assert (await driver.job_status(second.id, b)).status is Status.SUCCEEDED  # type: ignore[union-attr]
    assert await driver.reserve([b], 10, lease=30) == []
    assert runs(log) == [2]


async def test_cancelling_a_chain_cancels_its_members_in_other_queues(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    async with QueueManager(backend.settings()) as manager:
        flow = await chain(
            on(RecordJob(str(log), n=1), b),
            on(RecordJob(str(log), n=2), c),
            on(RecordJob(str(log), n=3), a),
        ).dispatch(manager)
        assert flow.queue == b  # the record is in the first member's queue
        [running] = await driver.reserve([b], 1, lease=30)  # the first one runs
        assert await flow.cancel()
        with pytest.raises(JobCancelledError):
            await flow.jobs[1].result(timeout=10)
        for member in flow.jobs[1:]:
            record = await member.status()
            assert record.status is Status.CANCELLED, record
        # The running member is asked to stop; its end (cancelled) ends the chain.
        assert await driver.cancel_requested([running]) == [running.id]
        running.outcome = Outcome(Status.CANCELLED, 60, error="stopped")
        await driver.ack([running])
        with pytest.raises(JobCancelledError):
            await flow.result(timeout=10)
        progress = await flow.progress()
        assert (progress.total, progress.cancelled) == (3, 3)
        assert await driver.reserve([a, b, c], 10, lease=30) == []
