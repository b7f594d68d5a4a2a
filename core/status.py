"""What a job is doing now, or how it ended: the `Status` names and the `JobStatus` record.

These are the names other tools are written against (`queue:job --json`, the dashboard, MQTT
status messages): keep them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["ENDED", "WAITING", "JobStatus", "Progress", "Status"]


class Status(enum.StrEnum):
    """A job's state. `str(status)` is its lowercase name."""

    QUEUED = "queued"  # ready to run (or waiting for its group's turn or a limit)
    SCHEDULED = "scheduled"  # waiting for the time it was dispatched for
    DEFERRED = "deferred"  # waiting for the jobs it depends on
    RUNNING = "running"  # held by a worker
    RETRYING = "retrying"  # a try failed; waiting for the next one
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good (it is also in the failed-job store)
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not started within its `ttl`


#: States a job can still leave by being run.
WAITING = frozenset({Status.QUEUED, Status.SCHEDULED, Status.DEFERRED, Status.RETRYING})
#: States a job never leaves (until its record is pruned, or it is retried from the failed store).
ENDED = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED})


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a chain or a batch has got: its members counted by how they ended.

    `failed` counts members that failed or expired; `pending` those not ended yet.
    """

    total: int
    pending: int
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def done(self) -> int:
        """Members that ended, whichever way."""
        return self.total - self.pending

    @property
    def fraction(self) -> float:
        """`done / total` (1.0 for an empty workflow)."""
        return self.done / self.total if self.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "pending": self.pending,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One job's record: where it is, how many tries it had, and how it ended.

    Times are epoch seconds (UTC), `None` when the job has not got there. `result` is the JSON
    of `handle()`'s return value (see `value()`); `error` is the one-line summary of the last
    failure and `traceback` its text.
    """

    id: str
    status: Status
    connection: str = ""
    queue: str = ""
    job: str = ""  # the class path, `module:QualName`
    attempts: int = 0  # tries started so far
    max_tries: int | None = None
    enqueued_at: float | None = None
    due_at: float | None = None  # when it becomes (became) ready to run
    started_at: float | None = None  # when its last try started
    ended_at: float | None = None
    worker: str = ""  # the id of the worker running (or that ran) its last try
    error: str = ""
    traceback: str = ""
    result: bytes | None = None
    #: "job", or for the record of a workflow (which never runs itself) "chain" or "batch".
    kind: str = "job"
    #: While `deferred`: the ids of the dependencies that have not ended yet (for a job; a
    #: workflow record leaves this empty and counts its members in `progress`).
    waiting_for: tuple[str, ...] = ()
    #: A chain's or batch's members counted by how they ended (`None` for a job).
    progress: Progress | None = None
    #: The job's priority within its queue (higher first).
    priority: int = 0
    #: The group the job runs in turn with (one at a time, in push order); "" for none.
    group: str = ""
    #: What the job was dispatched with as `description` (RQ's `enqueue(description=)`), kept
    #: with the ended record ("" for none). While the job waits or runs the record may not
    #: carry it: `queue:job` then reads it from the payload.
    description: str = ""
    #: The job's `meta` dict (RQ's `enqueue(meta=)`, as the job last saved it), kept with the
    #: ended record; `None` for none (same caveat as `description`).
    meta: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.status.value

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def value(self) -> Any:
        """The return value of `handle()` decoded from JSON (`None` if none was kept)."""
        return None if self.result is None else orjson.loads(self.result)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`result` decoded), as `queue:job --json` prints it."""
        out: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        out["status"] = self.status.value
        out["result"] = self.value()
        out["waiting_for"] = list(self.waiting_for)
        out["progress"] = None if self.progress is None else self.progress.to_dict()
        return out
