"""What a queue backend must provide: storage primitives, and nothing of the policy.

Retries, backoff, attempts limits, timeouts and failed-job handling live in the worker and the
manager, written once. A driver stores, hands out and removes payloads atomically:

* `push` stores jobs, ready now or after a delay (a due job becomes ready atomically).
* `reserve` hands up to `limit` ready jobs to one caller, oldest first, each under a lease and
  with its try counter incremented; it first makes due delayed jobs ready and returns jobs whose
  lease expired to the front of their queue. It acknowledges `ack` jobs in the same round trip.
* `wait` blocks until work may be available (or a timeout); it must be safe to cancel.
* `ack` removes finished jobs; `release` puts a job back (optionally after a delay, optionally
  refunding its try); `extend` renews leases of running jobs.
* `retry_failed` moves failed records of its own failed store back to their queues, each in
  one atomic step (`queue:retry`).

A reservation is identified by the job id *and* its try count: an `ack`, `release` or `extend`
from a worker whose lease expired and whose job was reserved again is ignored.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

from core.settings import Settings

__all__ = [
    "Driver",
    "FailedJob",
    "FailedStore",
    "OutgoingJob",
    "QueueStats",
    "ReservedJob",
    "WorkerInfo",
    "claim_record_id",
    "claimed_at",
    "new_record_id",
]


@dataclass(frozen=True, slots=True)
class OutgoingJob:
    """A job on its way into a queue."""

    id: str
    queue: str
    payload: bytes
    delay: float = 0.0  # seconds from now; 0 means ready at once


@dataclass(slots=True)
class ReservedJob:
    """A job handed to a worker under a lease."""

    id: str
    queue: str
    payload: bytes
    attempts: int  # this try's number, counting this one


def new_record_id() -> str:
    """A fresh failed-record id (32 hex characters)."""
    return os.urandom(16).hex()


def claim_record_id(now: float) -> str:
    """A record id that marks a record as claimed by a retry at `now` (epoch seconds).

    32 characters: `r` (never in a fresh id, which is all hex), the time in milliseconds (13
    digits), 18 random hex digits. Other retries see the claim and leave the record alone
    while it is recent (see `claimed_at`).
    """
    return f"r{int(now * 1000):013d}{os.urandom(9).hex()}"


def claimed_at(record_id: str) -> float | None:
    """When a retry claimed the record with this id (epoch seconds), or `None` if none did."""
    if len(record_id) == 32 and record_id.startswith("r") and record_id[1:14].isdigit():
        return int(record_id[1:14]) / 1000
    return None


@dataclass(frozen=True, slots=True)
class FailedJob:
    """A record in the failed-job store.

    `record_id` names this one failure: a store gives every record it stores a new one (the
    value passed to `add` is ignored), so a job that fails again after a retry gets a record
    that the retry's clean-up cannot match. Empty for a record not read from a store.
    """

    id: str  # the job id
    connection: str
    queue: str
    payload: str
    exception: str  # the exception line and its traceback
    failed_at: datetime  # UTC, timezone-aware
    record_id: str = ""

    @property
    def job_class(self) -> str:
        """The class path in the payload, or `?` if the payload cannot be read."""
        from core.queue.payload import decode_envelope

        try:
            return str(decode_envelope(self.payload)["job"])
        except Exception:
            return "?"


@dataclass(frozen=True, slots=True)
class QueueStats:
    """How many jobs a queue holds in each state."""

    connection: str
    queue: str
    pending: int  # ready to run now
    delayed: int  # waiting for their time (first dispatch or retry)
    reserved: int  # held by a worker under a lease
    failed: int  # in the failed-job store

    @property
    def size(self) -> int:
        """Jobs not yet finished: pending + delayed + reserved."""
        return self.pending + self.delayed + self.reserved


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a running worker reports about itself with each heartbeat."""

    id: str  # host:pid:random
    host: str
    pid: int
    connection: str
    queues: tuple[str, ...]
    concurrency: int
    started_at: float  # epoch seconds
    seen_at: float  # epoch seconds of this report
    processed: int
    running: tuple[str, ...]  # ids of the jobs it is running

    def to_json(self) -> bytes:
        import orjson

        return orjson.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkerInfo:
        import orjson

        data = orjson.loads(raw)
        data["queues"] = tuple(data["queues"])
        data["running"] = tuple(data["running"])
        return cls(**data)


class FailedStore(abc.ABC):
    """Where jobs that failed for good are kept until retried, forgotten or pruned."""

    @abc.abstractmethod
    async def add(self, record: FailedJob) -> None:
        """Store `record` under a new record id; the same job id again replaces the earlier one."""

    @abc.abstractmethod
    async def list(
        self, queue: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[FailedJob]:
        """Records, newest first, optionally of one queue."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> FailedJob | None:
        """One record by job id."""

    @abc.abstractmethod
    async def forget(self, job_id: str) -> bool:
        """Delete one record; `False` if there was none."""

    @abc.abstractmethod
    async def claim(self, record: FailedJob) -> FailedJob | None:
        """Give `record` a new claim record id (`claim_record_id`) if the store still holds it
        as read; atomic.

        Returns the record under its new id, or `None` when the job's record is gone or is
        another failure now (retried by someone else, failed again). Two callers claiming one
        record: exactly one gets it.
        """

    @abc.abstractmethod
    async def remove(self, record: FailedJob) -> bool:
        """Delete the job's record only if it is still this very record (same record id)."""

    @abc.abstractmethod
    async def flush(self, queue: str | None = None) -> int:
        """Delete every record (of one queue); returns how many."""

    @abc.abstractmethod
    async def prune(self, before: datetime) -> int:
        """Delete records that failed before `before`; returns how many."""

    @abc.abstractmethod
    async def count(self, queue: str | None = None) -> int:
        """How many records (of one queue)."""


class Driver(abc.ABC):
    """A queue backend. Open it with `async with driver:` (reusable, not re-entrant)."""

    #: The registry name (`redis`, `database`, `memory`, `sync`).
    kind: str = ""
    #: Whether `wait` is woken by a push (True) or sleeps its timeout (False).
    blocks: bool = False

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (and create tables or load scripts) if needed. Idempotent."""

    async def close(self) -> None:
        """Release every connection. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- primitives --------------------------------------------------------------------

    @abc.abstractmethod
    async def push(self, jobs: Sequence[OutgoingJob]) -> None:
        """Store `jobs` in one round trip where the backend allows."""

    @abc.abstractmethod
    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
    ) -> list[ReservedJob]:
        """Acknowledge `ack`, then take up to `limit` ready jobs, earlier queues first.

        Never blocks waiting for work; `wait` does that.
        """

    @abc.abstractmethod
    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        """Return when work may be ready in `queues`, or after `timeout` seconds."""

    @abc.abstractmethod
    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        """Remove finished jobs."""

    @abc.abstractmethod
    async def release(self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False) -> None:
        """Put a reserved job back: after `delay` seconds, or at once.

        With `refund`, the try does not count and the job goes to the front of its queue
        (a worker stopping before it could finish the job).
        """

    @abc.abstractmethod
    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        """Renew each job's lease to `seconds` from now."""

    @abc.abstractmethod
    async def stats(self, queue: str) -> QueueStats:
        """Pending, delayed and reserved counts (`failed` is left 0: the store counts it)."""

    @abc.abstractmethod
    async def queues(self) -> list[str]:
        """The names of the queues this backend has seen."""

    @abc.abstractmethod
    async def clear(self, queue: str) -> int:
        """Delete every job of `queue` that is not reserved; returns how many."""

    @abc.abstractmethod
    def failed_store(self) -> FailedStore:
        """This backend's own failed-job store."""

    @abc.abstractmethod
    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        """Move failed records of this backend's own store back to their queues.

        Each record goes back only if the store still holds it under the same record id and it
        names this connection; the record is deleted and its job pushed (ready now, its tries
        counted afresh) in one atomic step, so a job is never in neither place, a newer
        failure is never deleted, and two concurrent calls never queue a job twice. Returns
        the ids of the jobs moved.
        """

    # -- worker registry and the restart signal ---------------------------------------------

    @abc.abstractmethod
    async def report_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Record a worker's heartbeat; it counts as alive for `ttl` seconds."""

    @abc.abstractmethod
    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""

    @abc.abstractmethod
    async def workers(self) -> list[WorkerInfo]:
        """Workers whose last heartbeat has not expired."""

    @abc.abstractmethod
    async def request_restart(self, at: float) -> None:
        """Ask every worker started before `at` (epoch seconds) to finish and exit."""

    @abc.abstractmethod
    async def restart_requested_at(self) -> float | None:
        """When the last restart was requested, if ever."""

    async def size(self, queue: str) -> int:
        """Jobs of `queue` not yet finished (pending + delayed + reserved)."""
        return (await self.stats(queue)).size
