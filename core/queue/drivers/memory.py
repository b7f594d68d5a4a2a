"""An in-process queue: same semantics as the servers, gone when the process exits.

For tests, and for running the app and a worker in one process during development.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from core.queue.drivers.base import (
    Driver,
    FailedJob,
    FailedStore,
    OutgoingJob,
    QueueStats,
    ReservedJob,
    WorkerInfo,
    claim_record_id,
    new_record_id,
)
from core.settings import Settings

__all__ = ["MemoryDriver", "MemoryFailedStore"]


@dataclass
class _Queue:
    ready: deque[str] = field(default_factory=deque)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # heap (due, seq, id)
    reserved: dict[str, float] = field(default_factory=dict)  # id -> lease expiry
    payloads: dict[str, bytes] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)


class MemoryFailedStore(FailedStore):
    def __init__(self) -> None:
        self._records: dict[str, FailedJob] = {}

    async def add(self, record: FailedJob) -> None:
        self._records.pop(record.id, None)
        self._records[record.id] = replace(record, record_id=new_record_id())

    async def list(
        self, queue: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[FailedJob]:
        records = sorted(
            (r for r in self._records.values() if queue in (None, r.queue)),
            key=lambda r: r.failed_at,
            reverse=True,
        )
        return records[offset : offset + limit]

    async def get(self, job_id: str) -> FailedJob | None:
        return self._records.get(job_id)

    async def forget(self, job_id: str) -> bool:
        return self._records.pop(job_id, None) is not None

    def holds(self, record: FailedJob) -> bool:
        """Whether the job's record is still `record` (same record id)."""
        stored = self._records.get(record.id)
        return stored is not None and stored.record_id == record.record_id

    async def claim(self, record: FailedJob) -> FailedJob | None:
        # No await between the check and the change: atomic on the event loop.
        if not self.holds(record):
            return None
        claimed = self._records[record.id] = replace(record, record_id=claim_record_id(time.time()))
        return claimed

    async def remove(self, record: FailedJob) -> bool:
        if not self.holds(record):
            return False
        del self._records[record.id]
        return True

    async def flush(self, queue: str | None = None) -> int:
        doomed = [k for k, r in self._records.items() if queue in (None, r.queue)]
        for key in doomed:
            del self._records[key]
        return len(doomed)

    async def prune(self, before: datetime) -> int:
        doomed = [k for k, r in self._records.items() if r.failed_at < before]
        for key in doomed:
            del self._records[key]
        return len(doomed)

    async def count(self, queue: str | None = None) -> int:
        return sum(1 for r in self._records.values() if queue in (None, r.queue))


class MemoryDriver(Driver):
    kind = "memory"
    blocks = True

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._pushed = asyncio.Event()
        self._failed = MemoryFailedStore()
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._restart_at: float | None = None

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def _wake(self) -> None:
        # Replace the event so that later waiters block again; earlier ones wake up.
        self._pushed.set()
        self._pushed = asyncio.Event()

    async def push(self, jobs: Sequence[OutgoingJob]) -> None:
        now = time.monotonic()
        for job in jobs:
            queue = self._queue(job.queue)
            if job.id in queue.payloads:
                # Stored already (a failed job retried before a late ack): start afresh.
                self._forget(queue, job.id)
            queue.payloads[job.id] = job.payload
            queue.attempts[job.id] = 0
            if job.delay > 0:
                heapq.heappush(queue.delayed, (now + job.delay, next(self._seq), job.id))
            else:
                queue.ready.append(job.id)
        self._wake()

    @staticmethod
    def _forget(queue: _Queue, job_id: str) -> None:
        queue.reserved.pop(job_id, None)
        with contextlib.suppress(ValueError):
            queue.ready.remove(job_id)
        queue.delayed = [entry for entry in queue.delayed if entry[2] != job_id]
        heapq.heapify(queue.delayed)

    def _mature(self, queue: _Queue, now: float) -> None:
        while queue.delayed and queue.delayed[0][0] <= now:
            _, _, job_id = heapq.heappop(queue.delayed)
            queue.ready.append(job_id)
        expired = [job_id for job_id, until in queue.reserved.items() if until <= now]
        for job_id in reversed(expired):
            del queue.reserved[job_id]
            queue.ready.appendleft(job_id)

    def _owns(self, queue: _Queue, job: ReservedJob) -> bool:
        return queue.attempts.get(job.id) == job.attempts

    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
    ) -> list[ReservedJob]:
        if ack:
            await self.ack(ack)
        now = time.monotonic()
        out: list[ReservedJob] = []
        for name in queues:
            queue = self._queue(name)
            self._mature(queue, now)
            while queue.ready and len(out) < limit:
                job_id = queue.ready.popleft()
                payload = queue.payloads.get(job_id)
                if payload is None:  # acknowledged after its lease had expired
                    continue
                attempts = queue.attempts[job_id] = queue.attempts.get(job_id, 0) + 1
                queue.reserved[job_id] = now + lease
                out.append(ReservedJob(job_id, name, payload, attempts))
            if len(out) >= limit:
                break
        return out

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        now = time.monotonic()
        for name in queues:
            queue = self._queue(name)
            if queue.ready:
                return
            if queue.delayed:
                timeout = min(timeout, queue.delayed[0][0] - now)
            if queue.reserved:
                timeout = min(timeout, min(queue.reserved.values()) - now)
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pushed.wait(), timeout)

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        for job in jobs:
            queue = self._queue(job.queue)
            if self._owns(queue, job):
                queue.reserved.pop(job.id, None)
                queue.payloads.pop(job.id, None)
                queue.attempts.pop(job.id, None)

    async def release(self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False) -> None:
        queue = self._queue(job.queue)
        if not self._owns(queue, job) or queue.reserved.pop(job.id, None) is None:
            return
        if refund:
            queue.attempts[job.id] -= 1
        if delay > 0:
            heapq.heappush(queue.delayed, (time.monotonic() + delay, next(self._seq), job.id))
        elif refund:
            queue.ready.appendleft(job.id)
        else:
            queue.ready.append(job.id)
        self._wake()

    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        now = time.monotonic()
        for job, seconds in leases:
            queue = self._queue(job.queue)
            if self._owns(queue, job) and job.id in queue.reserved:
                queue.reserved[job.id] = now + seconds

    async def stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        pending = sum(1 for job_id in q.ready if job_id in q.payloads)
        return QueueStats(self.name, queue, pending, len(q.delayed), len(q.reserved), 0)

    async def queues(self) -> list[str]:
        return sorted(self._queues)

    async def clear(self, queue: str) -> int:
        q = self._queue(queue)
        doomed = [*q.ready, *(job_id for _, _, job_id in q.delayed)]
        q.ready.clear()
        q.delayed.clear()
        for job_id in doomed:
            q.payloads.pop(job_id, None)
            q.attempts.pop(job_id, None)
        return len(doomed)

    def failed_store(self) -> FailedStore:
        return self._failed

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        # Checked, deleted and pushed without yielding to the event loop: one atomic step.
        moving = [r for r in records if r.connection == self.name and self._failed.holds(r)]
        for record in moving:
            await self._failed.remove(record)
        await self.push([OutgoingJob(r.id, r.queue, r.payload.encode()) for r in moving])
        return [record.id for record in moving]

    async def report_worker(self, info: WorkerInfo, ttl: float) -> None:
        now = time.time()
        for gone in [key for key, (_, until) in self._workers.items() if until <= now]:
            del self._workers[gone]  # a dead worker leaves when its heartbeat expires
        self._workers[info.id] = (info, now + ttl)

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerInfo]:
        now = time.time()
        return [info for info, until in self._workers.values() if until > now]

    async def request_restart(self, at: float) -> None:
        self._restart_at = at

    async def restart_requested_at(self) -> float | None:
        return self._restart_at
