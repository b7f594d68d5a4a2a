"""An in-process queue: same semantics as the servers, gone when the process exits.

For tests, and for running the app and a worker in one process during development. It is the
reference for the job lifecycle every driver implements (records, uniqueness, `at_front`, `ttl`,
cancel, recent counts): where the servers need a script or a transaction, this driver relies on
the event loop instead, since nothing else runs between two `await`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from core.queue.drivers.base import (
    Driver,
    FailedJob,
    FailedStore,
    Outcome,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
    claim_record_id,
    new_record_id,
)
from core.settings import Settings
from core.status import ENDED, WAITING, JobStatus, Status

__all__ = ["MemoryDriver", "MemoryFailedStore"]

#: How long the per-minute counters behind `recent` are kept (seconds).
COUNTS_KEPT = 7200.0
#: How often ended records past their keep time are swept out while jobs are acknowledged.
SWEEP_EVERY = 60.0


@dataclass
class _Record:
    """One job's status record; `JobStatus` is what callers see of it."""

    id: str
    queue: str
    status: Status
    job: str = ""
    max_tries: int | None = None
    attempts: int = 0
    enqueued_at: float | None = None
    due_at: float | None = None  # epoch seconds
    started_at: float | None = None
    ended_at: float | None = None
    worker: str = ""
    error: str = ""
    traceback: str = ""
    result: bytes | None = None
    # What the lifecycle rules need, never shown:
    due: float = 0.0  # monotonic time it becomes (became) ready
    ttl: float = 0.0
    failure_ttl: float = 604800.0
    unique_key: str = ""
    keep_until: float | None = None  # monotonic; set once the job has ended

    def expires_at(self) -> float | None:
        """Monotonic time after which a first try may no longer start."""
        if self.ttl > 0 and self.attempts == 0 and self.status in WAITING:
            return self.due + self.ttl
        return None


@dataclass
class _Key:
    holder: str  # the job id stored under the key
    until: float | None  # monotonic end of `unique_for`; None: held until its job starts or ends


@dataclass
class _Queue:
    name: str
    ready: deque[str] = field(default_factory=deque)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # heap (due, seq, id)
    reserved: dict[str, float] = field(default_factory=dict)  # id -> lease expiry
    payloads: dict[str, bytes] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    front: set[str] = field(default_factory=set)  # delayed at_front jobs: at the head when due
    records: dict[str, _Record] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    cancels: set[str] = field(default_factory=set)  # running jobs whose cancel was asked for
    counts: dict[int, dict[Status, int]] = field(default_factory=dict)  # minute -> counts

    def waiting(self, job_id: str) -> bool:
        return job_id in self.payloads and job_id not in self.reserved


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


def _class_of(record: FailedJob) -> str:
    path = record.job_class
    return "" if path == "?" else path


class MemoryDriver(Driver):
    kind = "memory"
    blocks = True

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()
        self._pushed = asyncio.Event()
        # (queue, id) -> the event its `wait_ended` callers wait on, set when the job ends;
        # and how many wait on it, so that the last one to give up removes it.
        self._ended: dict[tuple[str, str], asyncio.Event] = {}
        self._waiters: dict[tuple[str, str], int] = {}
        self._failed = MemoryFailedStore()
        self._workers: dict[str, tuple[WorkerInfo, float]] = {}
        self._restart_at: float | None = None
        self._swept = time.monotonic()

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
        return queue

    def _wake(self) -> None:
        # Replace the event so that later waiters block again; earlier ones wake up.
        self._pushed.set()
        self._pushed = asyncio.Event()

    # -- push and the uniqueness rules -------------------------------------------------

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        # No await from here to the end: each job's checks and store are one atomic step.
        out = [self._push_one(job, time.monotonic(), time.time()) for job in jobs]
        self._wake()
        return out

    def _push_one(self, job: OutgoingJob, now: float, wall: float) -> Pushed:
        queue = self._queue(job.queue)
        if job.check_id and job.id in queue.payloads:
            return self._duplicate(queue, job.id, job, replaceable=queue.waiting(job.id))
        if job.unique_key:
            key = self._live_key(queue, job.unique_key, now)
            if key is not None:
                holder = key.holder
                if queue.waiting(holder):
                    return self._duplicate(queue, holder, job, replaceable=True)
                if key.until is not None:  # held by `unique_for`: holder running or ended
                    return self._duplicate(queue, holder, job, replaceable=False)
                # Held until its job starts, and that job has started: the successor goes in.
        if job.id in queue.payloads:
            # Stored already, without an id check (a failed job retried before a late ack):
            # start afresh.
            self._forget(queue, job.id)
        self._store(queue, job, now, wall)
        if job.unique_key:
            until = now + job.unique_for if job.unique_for > 0 else None
            queue.keys[job.unique_key] = _Key(job.id, until)
        return Pushed(job.id)

    def _live_key(self, queue: _Queue, key: str, now: float) -> _Key | None:
        held = queue.keys.get(key)
        if held is None:
            return None
        if held.until is not None and held.until <= now:
            del queue.keys[key]
            return None
        if held.until is None and not queue.waiting(held.holder):
            # Cannot happen while every path frees such keys; never let a stale one block.
            del queue.keys[key]
            return None
        return held

    def _duplicate(
        self, queue: _Queue, holder: str, job: OutgoingJob, *, replaceable: bool
    ) -> Pushed:
        if job.on_duplicate == "reject":
            return Pushed(holder, "duplicate")
        if job.on_duplicate == "replace" and replaceable:
            # The holder keeps its id, tries, place in the queue and due time.
            queue.payloads[holder] = job.payload
            record = queue.records.get(holder)
            if record is not None:
                record.job = job.job or record.job
                record.max_tries = job.max_tries if job.max_tries is not None else record.max_tries
            return Pushed(holder, "replaced")
        return Pushed(holder, "kept")

    def _store(self, queue: _Queue, job: OutgoingJob, now: float, wall: float) -> None:
        queue.payloads[job.id] = job.payload
        queue.attempts[job.id] = 0
        queue.cancels.discard(job.id)
        due = now + max(job.delay, 0.0)
        queue.records[job.id] = _Record(
            job.id,
            job.queue,
            Status.SCHEDULED if job.delay > 0 else Status.QUEUED,
            job=job.job,
            max_tries=job.max_tries,
            enqueued_at=wall,
            due_at=wall + max(job.delay, 0.0),
            due=due,
            ttl=job.ttl,
            failure_ttl=job.failure_ttl,
            unique_key=job.unique_key,
        )
        if job.delay > 0:
            heapq.heappush(queue.delayed, (due, next(self._seq), job.id))
            if job.at_front:
                queue.front.add(job.id)
        elif job.at_front:
            queue.ready.appendleft(job.id)  # several: the latest first
        else:
            queue.ready.append(job.id)

    def _forget(self, queue: _Queue, job_id: str) -> None:
        """Take a job out of every place it waits or runs (its record stays)."""
        queue.reserved.pop(job_id, None)
        with contextlib.suppress(ValueError):
            queue.ready.remove(job_id)
        if any(entry[2] == job_id for entry in queue.delayed):
            queue.delayed = [entry for entry in queue.delayed if entry[2] != job_id]
            heapq.heapify(queue.delayed)
        queue.front.discard(job_id)
        queue.payloads.pop(job_id, None)
        queue.attempts.pop(job_id, None)
        queue.cancels.discard(job_id)

    @staticmethod
    def _free_key(queue: _Queue, record: _Record) -> None:
        """Free the job's unique key if it still names this job and no `unique_for` holds it."""
        held = queue.keys.get(record.unique_key) if record.unique_key else None
        if held is not None and held.holder == record.id and held.until is None:
            del queue.keys[record.unique_key]

    # -- reserve, ack, release ---------------------------------------------------------

    def _mature(self, queue: _Queue, now: float) -> None:
        while queue.delayed and queue.delayed[0][0] <= now:
            _, _, job_id = heapq.heappop(queue.delayed)
            if job_id in queue.front:
                queue.front.discard(job_id)
                queue.ready.appendleft(job_id)
            else:
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
        *,
        worker: str = "",
    ) -> list[ReservedJob]:
        if ack:
            await self.ack(ack)
        now, wall = time.monotonic(), time.time()
        out: list[ReservedJob] = []
        for name in queues:
            queue = self._queue(name)
            self._mature(queue, now)
            while queue.ready and len(out) < limit:
                job_id = queue.ready.popleft()
                payload = queue.payloads.get(job_id)
                if payload is None:  # acknowledged after its lease had expired
                    continue
                record = queue.records.get(job_id)
                if job_id in queue.cancels:  # cancelled while running, then its lease ran out
                    self._end_waiting(queue, job_id, Status.CANCELLED, "cancelled", now, wall)
                    continue
                if record is not None and self._past_ttl(record, now):
                    self._expire(queue, record, now, wall)
                    continue
                attempts = queue.attempts[job_id] = queue.attempts.get(job_id, 0) + 1
                queue.reserved[job_id] = now + lease
                if record is not None:
                    record.status = Status.RUNNING
                    record.attempts = attempts
                    record.started_at = wall
                    record.worker = worker
                    self._free_key(queue, record)
                out.append(ReservedJob(job_id, name, payload, attempts))
            if len(out) >= limit:
                break
        return out

    @staticmethod
    def _past_ttl(record: _Record, now: float) -> bool:
        expires = record.expires_at()
        return expires is not None and expires < now

    def _expire(self, queue: _Queue, record: _Record, now: float, wall: float) -> None:
        self._end_waiting(
            queue,
            record.id,
            Status.EXPIRED,
            f"not started within its ttl of {record.ttl:g}s",
            now,
            wall,
        )

    def _end_waiting(
        self, queue: _Queue, job_id: str, status: Status, error: str, now: float, wall: float
    ) -> None:
        """End a job that will never run (expired, cancelled): payload gone, record kept for its
        `failure_ttl`, counted, key freed, waiters woken."""
        self._forget(queue, job_id)
        record = queue.records.get(job_id)
        if record is None:
            record = queue.records[job_id] = _Record(job_id, queue.name, status)
        self._end(queue, record, Outcome(status, record.failure_ttl, error=error), now, wall)

    def _end(
        self, queue: _Queue, record: _Record, outcome: Outcome, now: float, wall: float
    ) -> None:
        record.status = outcome.status
        record.ended_at = wall
        record.result = outcome.result
        record.error = outcome.error
        record.traceback = outcome.traceback
        self._free_key(queue, record)
        if outcome.keep > 0:
            record.keep_until = now + outcome.keep
        else:
            queue.records.pop(record.id, None)
        self._count(queue, outcome.status, wall)
        event = self._ended.pop((record.queue, record.id), None)
        if event is not None:
            event.set()

    @staticmethod
    def _count(queue: _Queue, status: Status, wall: float) -> None:
        minute = int(wall // 60)
        counts = queue.counts.get(minute)
        if counts is None:
            counts = queue.counts[minute] = {}
            oldest = minute - int(COUNTS_KEPT // 60)
            for gone in [m for m in queue.counts if m < oldest]:
                del queue.counts[gone]
        counts[status] = counts.get(status, 0) + 1

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
        now, wall = time.monotonic(), time.time()
        for job in jobs:
            queue = self._queue(job.queue)
            if not self._owns(queue, job):
                continue  # a lapsed reservation: the job is someone else's now
            queue.reserved.pop(job.id, None)
            queue.payloads.pop(job.id, None)
            queue.attempts.pop(job.id, None)
            queue.cancels.discard(job.id)
            outcome = job.outcome or Outcome(Status.SUCCEEDED, self.settings.queue_result_ttl)
            record = queue.records.get(job.id)
            if record is None:
                record = queue.records[job.id] = _Record(job.id, job.queue, Status.RUNNING)
                record.attempts = job.attempts
            self._end(queue, record, outcome, now, wall)
        if now - self._swept >= SWEEP_EVERY:
            self._sweep(now)

    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        queue = self._queue(job.queue)
        if not self._owns(queue, job) or queue.reserved.pop(job.id, None) is None:
            return
        now = time.monotonic()
        if refund:
            queue.attempts[job.id] -= 1
        if delay > 0:
            heapq.heappush(queue.delayed, (now + delay, next(self._seq), job.id))
        elif refund:
            queue.ready.appendleft(job.id)
        else:
            queue.ready.append(job.id)
        record = queue.records.get(job.id)
        if record is not None:
            record.attempts = queue.attempts[job.id]
            record.due = now + max(delay, 0.0)
            record.due_at = time.time() + max(delay, 0.0)
            if refund:
                record.status = Status.QUEUED
            else:
                record.status = Status.RETRYING
                record.error = error
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
        q.front.clear()
        for job_id in doomed:
            q.payloads.pop(job_id, None)
            q.attempts.pop(job_id, None)
            record = q.records.pop(job_id, None)
            if record is not None:
                self._free_key(q, record)
        return len(doomed)

    # -- single jobs -------------------------------------------------------------------

    def _find(self, job_id: str, queue: str | None) -> tuple[_Queue, _Record] | None:
        """The job's queue and record (a live job's first), dropping records past their keep."""
        names = [queue] if queue is not None else list(self._queues)
        found: list[tuple[_Queue, _Record]] = []
        now = time.monotonic()
        for name in names:
            q = self._queues.get(name)
            record = q.records.get(job_id) if q is not None else None
            if q is None or record is None:
                continue
            if record.keep_until is not None and record.keep_until <= now:
                del q.records[job_id]
                continue
            found.append((q, record))
        if not found:
            return None
        return max(found, key=lambda pair: (pair[1].ended_at is None, pair[1].enqueued_at or 0))

    async def job_status(self, job_id: str, queue: str | None = None) -> JobStatus | None:
        found = self._find(job_id, queue)
        if found is None:
            return None
        q, record = found
        now = time.monotonic()
        if q.waiting(job_id) and self._past_ttl(record, now):
            self._expire(q, record, now, time.time())  # reaped here rather than at a reserve
            if job_id not in q.records:
                return None
        status = record.status
        if status is Status.SCHEDULED and record.due <= now:
            status = Status.QUEUED  # due: ready, whether or not a reserve has moved it yet
        return JobStatus(
            id=record.id,
            status=status,
            connection=self.name,
            queue=record.queue,
            job=record.job,
            attempts=record.attempts,
            max_tries=record.max_tries,
            enqueued_at=record.enqueued_at,
            due_at=record.due_at,
            started_at=record.started_at,
            ended_at=record.ended_at,
            worker=record.worker,
            error=record.error,
            traceback=record.traceback,
            result=record.result,
        )

    async def wait_ended(self, job_id: str, queue: str | None, timeout: float) -> JobStatus | None:
        deadline = time.monotonic() + timeout
        while True:
            record = await self.job_status(job_id, queue)
            left = deadline - time.monotonic()
            if record is None or record.status in ENDED or left <= 0:
                return record
            # A job that may expire before the timeout: look again when it would.
            stored = self._queue(record.queue).records.get(job_id)
            expires = stored.expires_at() if stored is not None else None
            if expires is not None:
                left = min(left, max(expires - time.monotonic(), 0.0) + 0.001)
            key = (record.queue, job_id)
            event = self._ended.setdefault(key, asyncio.Event())
            self._waiters[key] = self._waiters.get(key, 0) + 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
            finally:
                self._waiters[key] -= 1
                if not self._waiters[key]:
                    del self._waiters[key]
                    if self._ended.get(key) is event:
                        del self._ended[key]

    async def cancel(self, job_id: str, queue: str | None = None) -> bool:
        found = self._find(job_id, queue)
        if found is None:
            return False
        q = found[0]
        if q.waiting(job_id):
            self._end_waiting(
                q, job_id, Status.CANCELLED, "cancelled", time.monotonic(), time.time()
            )
            return True
        if job_id in q.reserved:
            q.cancels.add(job_id)
            return True
        return False

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        return [job.id for job in jobs if job.id in self._queue(job.queue).cancels]

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        q = self._queue(queue)
        first = math.floor((time.time() - window) / 60)
        totals: dict[Status, int] = {}
        for minute, counts in q.counts.items():
            if minute >= first:
                for status, n in counts.items():
                    totals[status] = totals.get(status, 0) + n
        return RecentCounts(
            window,
            succeeded=totals.get(Status.SUCCEEDED, 0),
            failed=totals.get(Status.FAILED, 0),
            cancelled=totals.get(Status.CANCELLED, 0),
            expired=totals.get(Status.EXPIRED, 0),
        )

    async def prune_records(self) -> int:
        return self._sweep(time.monotonic())

    def _sweep(self, now: float) -> int:
        self._swept = now
        dropped = 0
        for q in self._queues.values():
            doomed = [
                job_id
                for job_id, record in q.records.items()
                if record.keep_until is not None and record.keep_until <= now
            ]
            for job_id in doomed:
                del q.records[job_id]
            dropped += len(doomed)
        return dropped

    # -- failed store, workers ---------------------------------------------------------

    def failed_store(self) -> FailedStore:
        return self._failed

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        # Checked, deleted and pushed without yielding to the event loop: one atomic step.
        moving = [r for r in records if r.connection == self.name and self._failed.holds(r)]
        for record in moving:
            await self._failed.remove(record)
        back = [OutgoingJob(r.id, r.queue, r.payload.encode(), job=_class_of(r)) for r in moving]
        await self.push(back)
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
