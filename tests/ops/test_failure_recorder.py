"""A worker recording two failures of the same job at once (found under load by
test_retry_race.py on SQLite).

A job failed for good is held by its worker until the failed store has its record, its lease
renewed meanwhile. When the store is slow (a SQLite file locked by other writers) and a renewal
comes late, the lease lapses, the same worker can reserve the job again (its try spent) and fail
it for good a second time while the first record is still being written: two failures of one
job id are in flight at once, and each must end on its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.queue.drivers.base import FailedJob, ReservedJob
from core.worker.failures import FailureRecorder
from core.worker.state import Running, WorkerCounts

pytestmark = pytest.mark.timeout(30)


class SlowStore:
    """A failed store whose first `add` waits for `release`; later ones answer at once."""

    def __init__(self) -> None:
        self.added: list[FailedJob] = []
        self.first_waiting = asyncio.Event()
        self.release = asyncio.Event()

    async def add(self, record: FailedJob) -> None:
        if not self.added:
            self.added.append(record)
            self.first_waiting.set()
            await self.release.wait()
            return
        self.added.append(record)


class Manager:
    """Only what the recorder asks a manager for: its failed store."""

    def __init__(self, store: SlowStore) -> None:
        self.store = store

    async def failed_store(self, connection: str | None = None) -> Any:
        return self.store


def running(attempts: int) -> Running:
    reserved = ReservedJob("job-1", "q", b"{}", attempts)
    return Running(reserved, deadline=0.0, label="MarkerJob", lease=2.0, lease_until=0.0)


async def test_a_job_failed_again_while_its_first_failure_is_recorded_ends_twice() -> None:
    store = SlowStore()
    finished: list[ReservedJob] = []
    recorder = FailureRecorder(
        Manager(store),  # type: ignore[arg-type]
        "database",
        "worker-1",
        2.0,
        WorkerCounts(),
        finished.append,
        lambda task: task,
    )
    first, again = running(1), running(2)
    # Its first failure waits on the store...
    first_failing = asyncio.create_task(recorder.fail(first, None, RuntimeError("try 1"), 60.0))
    await store.first_waiting.wait()
    # ...its lease lapses meanwhile, and the job comes back to this worker past max_tries.
    await recorder.fail(again, None, RuntimeError("reserved again"), 60.0)
    store.release.set()
    await first_failing  # raised KeyError: the second failure had taken the first one's place
    assert [r.attempts for r in finished] == [2, 1]
    assert [r.exception.strip().splitlines()[-1] for r in store.added] == [
        "RuntimeError: try 1",
        "RuntimeError: reserved again",
    ]
    assert recorder.held == {}
    assert recorder.counts.failed == 2
