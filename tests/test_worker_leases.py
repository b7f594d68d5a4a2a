"""Which lease a reserved job holds (issue #19): a job an idle worker takes starts at once under
the lease it runs with, with no lease round trip before it; jobs reserved ahead of a free slot
(the prefetch) hold the short one, so a worker that dies with them gives them back quickly."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from core.queue.drivers.base import ReservedJob
from core.queue.queue_manager import QueueManager
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, _backend
from tests.jobs import RecordJob, events

pytestmark = pytest.mark.timeout(60)


class Calls:
    """What the worker asked of its driver (each reserve's lease and what it got; when it
    waits) and which jobs it gave a new lease to before starting them (`Worker._set_lease`:
    the round trip a job waits for; the heartbeat's renewals are not counted)."""

    def __init__(self, driver: Any) -> None:
        self.reserved: list[tuple[float, int]] = []  # (lease, jobs handed out)
        self.extended: list[str] = []
        self.waiting = asyncio.Event()
        reserve, wait = driver.reserve, driver.wait

        async def reserve_(
            queues: Sequence[str], limit: int, lease: float, *args: Any, **kwargs: Any
        ) -> list[ReservedJob]:
            got: list[ReservedJob] = await reserve(queues, limit, lease, *args, **kwargs)
            if got:
                self.reserved.append((lease, len(got)))
            return got

        async def wait_(queues: Sequence[str], timeout: float) -> None:
            self.waiting.set()  # the worker found nothing and waits: it is idle
            await wait(queues, timeout)

        driver.reserve, driver.wait = reserve_, wait_

    def watch(self, worker: Worker) -> Worker:
        set_lease = worker._set_lease

        async def set_lease_(run: Any, lease: float) -> None:
            self.extended.append(run.reserved.id)
            await set_lease(run, lease)

        worker._set_lease = set_lease_  # type: ignore[method-assign]
        return worker


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield Backend("memory", {"queue_default": "leases"})
    else:
        yield from _backend("redis", request, tmp_path)


async def until(condition: Any, what: str, timeout: float = 20) -> None:
    """Wait for what the worker does in this same loop (it reports through files)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_an_idle_worker_starts_a_job_under_its_running_lease_with_no_round_trip_first(
    backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    async with QueueManager(backend.settings()) as manager:
        calls = Calls(await manager.connection())
        queue = backend.settings().queue_default
        options = WorkerOptions(queues=(queue,), concurrency=4, prefetch=2, handle_signals=False)
        worker = calls.watch(Worker(manager, options))
        running = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(calls.waiting.wait(), 20)
            for n in range(3):  # one at a time, each to an idle worker
                calls.waiting.clear()
                await manager.push(RecordJob(log, n), queue)
                await until(lambda n=n: len(events(log, "run")) > n, f"job {n} to run")
                await asyncio.wait_for(calls.waiting.wait(), 20)
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
    running_lease = worker._default_lease
    assert calls.reserved, "no reserve handed out a job"
    assert all(lease == running_lease for lease, _ in calls.reserved), calls.reserved
    assert calls.extended == []  # no lease round trip before (or while) the jobs ran


async def test_jobs_reserved_ahead_of_a_free_slot_hold_the_short_lease_until_they_start(
    backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    async with QueueManager(backend.settings()) as manager:
        calls = Calls(await manager.connection())
        queue = backend.settings().queue_default
        await manager.bulk([RecordJob(log, n) for n in range(12)], queue)
        options = WorkerOptions(
            queues=(queue,), concurrency=2, prefetch=2, stop_when_empty=True, handle_signals=False
        )
        worker = calls.watch(Worker(manager, options))
        await asyncio.wait_for(worker.run(), 30)
    assert sorted(e["n"] for e in events(log, "run")) == list(range(12))
    short, running_lease = worker._prestart_lease, worker._default_lease
    assert short < running_lease
    # The first reservation fills the free slots under the running lease; the prefetch is
    # reserved under the short one, and each such job gets its running lease as it starts.
    assert calls.reserved[0] == (running_lease, 2)
    prefetched = sum(n for lease, n in calls.reserved if lease == short)
    assert prefetched > 0
    assert len(calls.extended) == prefetched  # each prefetched job, once, as it started
