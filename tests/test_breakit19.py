"""Break-it review of issue #19: defects found, each shown by a strict xfail (it passes once the
defect is fixed, and then the mark must go).

Prefetched jobs of a SIGKILLed worker: the brief for #19 asks that they come back within the
lease margin and run. They come back on time, but each reservation counted as a try, so a job
with `max_tries=1` that never started is failed for good ("worker was lost on the last allowed
try") instead of being run by the next worker. Not new in #19 (the tree before it does the same).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.jobs import SleepJob, events
from tests.processes import WorkerProcess, wait_until

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def send(backend: Backend, jobs: list[Any]) -> None:
    async def go() -> None:
        async with QueueManager(backend.settings()) as manager:
            await manager.bulk(jobs, queue=backend.settings().queue_default)

    asyncio.run(go())


def reserved(backend: Backend) -> int:
    async def go() -> int:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            return (await driver.stats(backend.settings().queue_default)).reserved

    return asyncio.run(go())


@pytest.mark.xfail(
    strict=True,
    reason="#19 break-it: a prefetched job that never started is failed for good when its "
    "worker is SIGKILLed (the reservation counted its only try)",
)
@pytest.mark.parametrize("server_backend", ["redis"], indirect=True)
def test_prefetched_jobs_of_a_killed_worker_run_on_the_next_worker(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    env = server_backend.env()
    first = WorkerProcess(["--concurrency", "1", "--prefetch", "3"], env, tmp_path / "w1.log")
    try:
        wait_until(lambda: "starting:" in first.output, 60, "the first worker to start")
        # n=0 runs long; n=1..3 (max_tries=1, SleepJob's default) wait in the buffer.
        send(server_backend, [SleepJob(log, 30, 0), *(SleepJob(log, 0.01, n) for n in (1, 2, 3))])
        wait_until(lambda: len(events(log, "start")) >= 1, 30, "the first job to start")
        wait_until(lambda: reserved(server_backend) == 4, 30, "the other three to be prefetched")
        first.proc.kill()
        first.proc.wait(10)
    finally:
        first.stop()
    second = WorkerProcess(["--concurrency", "4"], env, tmp_path / "w2.log")
    try:
        wait_until(
            lambda: {e["n"] for e in events(log) if e["event"] in ("end", "failed")} >= {1, 2, 3},
            60,
            "the prefetched jobs to end",
        )
    finally:
        second.stop()
    ran = {e["n"] for e in events(log, "end")}
    assert ran >= {1, 2, 3}, (events(log), second.output)
