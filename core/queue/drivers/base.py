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

The job lifecycle (status records, results, uniqueness, cancel, `ttl`) is kept by the same
primitives, in the same round trips: `push` writes the waiting record and applies `job_id` and
`unique_key` rules atomically, `reserve` marks jobs running (and expires those past their `ttl`),
`release` marks them retrying, and `ack` writes how each ended (`ReservedJob.outcome`) and keeps
that record for `Outcome.keep` seconds. `job_status`, `wait_ended`, `cancel` and
`cancel_requested` read and steer single jobs; `recent` counts how jobs ended over the last
minutes.

Workflows and limits ride on the same primitives (the full rules: docs/workflows.md and the
driver notes in `OutgoingJob`):

* `priority`: `reserve` hands out `at_front` jobs first, then higher priorities, then in the
  order jobs became ready; O(log n) per job, the priority-0 path as fast as before.
* `depends_on`: a job pushed with dependencies is `deferred` until they end; each end of a
  dependency (ack, cancel, expiry, a workflow record finishing) resolves its dependents in the
  same atomic step, so the last two dependencies ending at once release a dependent once.
* Workflow records (`kind` "chain"/"batch"): never run; they end when their members have
  ended and count them (`JobStatus.progress`).
* `limit`: `reserve` skips a job whose limit key is at its rate or concurrency limit without
  counting a try; it becomes ready again when the rate allows or a job of its key stops.
* `once_key`: at most one push per key while the key lives (`once_for`), whatever the push
  did (stored, or answered by a holder): schedule ticks, the offline spool's replay.
* `get_marker`/`set_marker`: small named values (a schedule's last tick, a queue's pause).

Observing (the dashboard, metrics; docs/observing.md): `history` reads a queue's per-minute
counts (the ends the driver counts, plus what workers add with `add_history`), `browse` lists
the jobs in one state, `groups` a queue's groups; `pause`/`resume`/`paused` are markers.

IoT-native rules ride on them too (docs/iot.md):

* `group`: one job per group and queue is in turn (ready, retrying, running); the others wait
  in the group's line in push order, and the next takes the turn in the same atomic step as
  the holder ends. Only turn holders are ever ready, so groups are served fairly.
* `max_length` + `overflow`: `push` counts the queue's waiting jobs in the same atomic step as
  the store, and rejects the new job ("full") or drops the oldest waiting one.
* `reserve` hands back the jobs it expired (`ReservedJob.expired`), so the worker can report
  their end (an outcome over MQTT); they are already ended and are never run.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Literal, Self

from core.settings import Settings
from core.status import ENDED, JobStatus, Status

__all__ = [
    "HISTORY_FIELDS",
    "MAX_PRIORITY",
    "BrowseState",
    "Dependency",
    "DependencyRule",
    "Driver",
    "FailedJob",
    "FailedStore",
    "GroupInfo",
    "JobKind",
    "Limit",
    "MinuteCounts",
    "OnDuplicate",
    "Outcome",
    "OutgoingJob",
    "Overflow",
    "Pushed",
    "QueueStats",
    "RecentCounts",
    "ReservedJob",
    "WorkerInfo",
    "check_marker_items",
    "claim_record_id",
    "claimed_at",
    "new_record_id",
    "pause_marker",
]


OnDuplicate = Literal["reject", "keep", "replace"]
#: When a job with dependencies may run (see `OutgoingJob.rule`).
DependencyRule = Literal["succeeded", "ended", "failed"]
#: A job that runs, or the record of a workflow that never runs itself.
JobKind = Literal["job", "chain", "batch"]
#: What a push into a full queue does (`OutgoingJob.max_length`).
Overflow = Literal["reject", "drop_oldest"]

#: The largest priority magnitude (both signs): exact as a float score and as a 32-bit column.
MAX_PRIORITY = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Dependency:
    """A job that another waits for: its id, and its queue when known (`None`: the driver
    finds it among the connection's queues)."""

    id: str
    queue: str | None = None


@dataclass(frozen=True, slots=True)
class Limit:
    """A limit on job starts, shared by every job of one queue with the same `key`.

    `rate` starts per `period` seconds (0: no rate limit), spaced evenly (GCRA): a start is
    allowed when the previous allowed start is `period / rate` seconds old, or up to
    `burst - 1` intervals early (burst 1: never two starts closer than the interval).
    `concurrency` caps the jobs of the key running at once (0: no cap). A job counts against
    `concurrency` from its reserve until its ack, release or lost lease.
    """

    key: str
    rate: int = 0
    period: float = 0.0
    burst: int = 1
    concurrency: int = 0

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate (0: no rate limit)."""
        return self.period / self.rate if self.rate else 0.0


@dataclass(slots=True)
class OutgoingJob:
    """A job on its way into a queue, with the lifecycle rules the driver applies at push.

    Not frozen, for speed (one is built per dispatch; a frozen dataclass of this size costs
    about 1.7 µs more to build): treat it as read-only, `dataclasses.replace` to change it.
    """

    id: str
    queue: str
    payload: bytes
    delay: float = 0.0  # seconds from now; 0 means ready at once
    job: str = ""  # the class path (`module:QualName`), kept in its status record
    max_tries: int | None = None  # kept in its status record
    at_front: bool = False  # ready at the head of the queue (several: the latest first)
    #: The caller chose the id: if a job with this id is waiting or running on this queue,
    #: `on_duplicate` decides (an id is never stored twice).
    check_id: bool = False
    #: At most one waiting job per key and queue ("" for none). A key held only by a running
    #: job lets one new waiting job (its successor) in.
    unique_key: str = ""
    #: Seconds the key stays taken after dispatch, whatever happens to the job; 0: the key is
    #: free again once its job starts (for a successor) or ends.
    unique_for: float = 0.0
    #: What a duplicate (by id or key) does: "reject" (nothing stored; `Pushed.outcome` is
    #: "duplicate"), "keep" (nothing stored; the holder's id is returned), "replace" (the
    #: waiting holder's payload becomes this one's; it keeps its id). A holder that is running,
    #: or whose key is held by `unique_for` after it ended, is never replaced: "replace" then
    #: acts as "keep".
    on_duplicate: OnDuplicate = "reject"
    #: Seconds after it becomes due by which its first try must start, or it expires (status
    #: `expired`, never run); 0: never.
    ttl: float = 0.0
    #: Seconds an expired or cancelled-while-waiting record is kept (the job's `failure_ttl`).
    failure_ttl: float = 604800.0
    #: Higher first within the queue (after `at_front` jobs); equal priorities in the order
    #: they became ready. Kept with the job: a retry, a refund or a lost lease keeps it.
    priority: int = 0
    #: The jobs this one waits for. While any has not ended the job is `deferred` (not ready,
    #: whatever its delay); once they have, `rule` decides. A dependency that is not known
    #: (never pushed, or its record is gone) stores nothing: `Pushed.outcome` "missing", `id`
    #: the unknown dependency. A dependency pushed earlier in the same `push` call is known.
    depends_on: tuple[Dependency, ...] = ()
    #: "succeeded": runs once every dependency succeeded; one that failed, expired or was
    #: cancelled cancels this job (error "dependency <id> <status>"), and so on down its own
    #: dependents. "ended": runs once every dependency ended, however
    #: (`allow_dependency_failure`). "failed": runs as soon as one dependency failed or
    #: expired; cancelled (error "no dependency failed") once all ended without a failure
    #: (a workflow's `catch`).
    rule: DependencyRule = "succeeded"
    #: "job" runs `payload`. "chain"/"batch" is a workflow's record: `payload` is empty, it is
    #: never reserved; it waits (`deferred`) for its members (`depends_on`, rule "ended"),
    #: counts how each ended (`JobStatus.progress`), and when the last has ended it ends
    #: itself: `failed` if any member failed or expired, else `cancelled` if any was
    #: cancelled, else `succeeded` (kept for `failure_ttl`, or the connection's result ttl
    #: when it succeeded), resolving its own dependents (a batch's `then` and `finally_`).
    #: Cancelling it cancels its members that have not ended (as `cancel` would each).
    kind: JobKind = "job"
    #: For a workflow record: the first member that fails or expires cancels the members still
    #: waiting (a batch without `allow_failures`).
    cancel_on_failure: bool = False
    #: The limit this job's starts count against (`None`: none).
    limit: Limit | None = None
    #: At most one push per `once_key` and queue while the key lives: a push whose key is
    #: taken stores nothing and changes nothing (`Pushed.outcome` "duplicate", `id` the job
    #: the first push answered). The key is taken in the push's atomic step by every outcome
    #: but "missing" and "full": when the job is stored ("created"), and when a holder of its
    #: id or unique key answers ("duplicate", "kept", "replaced": its id is the one kept), so
    #: a push repeated after a lost answer is refused even when its value went into another
    #: job. It lives `once_for` seconds whatever happens to the job ("" for none).
    once_key: str = ""
    once_for: float = 0.0
    #: One job per group and queue at a time, in push order ("" for none). The group's first
    #: job takes the turn: it is stored as usual (ready, or scheduled until its delay). Later
    #: jobs of the group wait in the group's line (status `queued`, counted as pending) until
    #: every job before them has ended. The turn passes only at an end (ack with any
    #: outcome, cancel, ttl expiry, `clear`, a dependency cascade, a drop by `max_length`),
    #: in the same atomic step: the line's first job becomes ready (behind the jobs already
    #: ready: fair between groups), or scheduled until its own due time. A retry, a refund, a
    #: lost lease or a limit holding the holder back keep the turn. Within a group the order is
    #: push order: `priority` and `at_front` place the turn holder in the queue, not a job in
    #: its line. A job with `depends_on` joins its group's line when it is released.
    group: str = ""
    #: The most jobs the queue may hold waiting (pending + delayed: ready, scheduled,
    #: retrying, held by a limit, in a group's line; not running, not deferred); 0: no bound.
    #: Checked in the same atomic step as the store. A push that would go past it: with
    #: `overflow` "reject" stores nothing (`Pushed.outcome` "full", `id` this job's id);
    #: with "drop_oldest" the job is stored and one waiting job is dropped: the first job in
    #: the line of this job's group if that line is not empty, else the job that has waited
    #: longest among the queue's ready priority-0 jobs (a turn holder dropped passes the
    #: turn); with neither, it is rejected as with "reject". A dropped job ends `cancelled`
    #: (error "dropped: queue <queue> is full (<max_length> waiting)", kept for its
    #: `failure_ttl`, dependents resolved) and counts as `dropped`, not `cancelled`, in
    #: `recent`. A push that replaces or keeps a holder adds nothing and is never refused.
    max_length: int = 0
    overflow: Overflow = "reject"


@dataclass(frozen=True, slots=True)
class Pushed:
    """What `push` did with one `OutgoingJob`.

    `id` is the job that now holds the work: the new job ("created"), or the holder of the id
    or key ("duplicate": rejected; "kept": left as it was; "replaced": holder's payload swapped).
    """

    id: str
    #: "full": rejected by the queue's `max_length` (nothing stored). "spooled": written to
    #: the MQTT app's offline spool, to be pushed when the backend answers again (set by the
    #: manager, never by a driver).
    outcome: Literal["created", "duplicate", "kept", "replaced", "missing", "full", "spooled"] = (
        "created"
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a reserved job ended, written with its acknowledgement.

    `status` is one of `succeeded`, `failed`, `cancelled`, `expired`; `keep` is how many
    seconds its record stays readable (0: deleted at once). `result` is the JSON of the
    return value.
    """

    status: Status
    keep: float
    result: bytes | None = None
    error: str = ""
    traceback: str = ""
    #: JSON object kept with the record (issue #16): `{"description": str, "meta": {...}}`,
    #: either key optional; `None` for none. Read back as `JobStatus.description` / `.meta`.
    info: bytes | None = None


@dataclass(slots=True)
class ReservedJob:
    """A job handed to a worker under a lease."""

    id: str
    queue: str
    payload: bytes
    attempts: int  # this try's number, counting this one
    #: Set by the worker before it acknowledges the job; `None` acknowledges as "succeeded"
    #: with the connection's default `result_ttl` and no result.
    outcome: Outcome | None = field(default=None, compare=False)
    #: Set by `reserve` on a job it found past its `ttl` and ended as `expired` (its record
    #: written, dependents resolved, group turn passed, counted): handed back only so the
    #: worker can report the end. It holds no lease: never run, acknowledge or release it.
    #: Expired jobs come in addition to the `limit` runnable ones.
    expired: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class RecentCounts:
    """How many jobs of a queue ended each way over a recent window (`queue:stats`)."""

    window: float  # seconds
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    coalesced: int = 0  # pushes that replaced a waiting job's data ("replaced")
    dropped: int = 0  # waiting jobs dropped by `max_length` with "drop_oldest"
    rejected: int = 0  # pushes refused by `max_length` ("full")


#: What workers add to a queue's per-minute history (`Driver.add_history`), besides the ends
#: the driver counts itself: `started` tries; `waited` first tries whose wait was measured and
#: `wait_ms` the sum of those waits (dispatch, or the time a delayed job was due, to the start of
#: its first try), in milliseconds; `ran` tries that ended and `run_ms` the sum of their run
#: times, in milliseconds.
HISTORY_FIELDS: tuple[str, ...] = ("started", "waited", "wait_ms", "ran", "run_ms")

#: The states `Driver.browse` lists.
BrowseState = Literal["pending", "delayed", "reserved", "deferred"]


@dataclass(frozen=True, slots=True)
class MinuteCounts:
    """One minute of a queue's history (`Driver.history`): how jobs ended in that minute (the
    counts `recent` sums), and what workers reported (`HISTORY_FIELDS`)."""

    minute: int  # epoch minutes: epoch seconds // 60
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    coalesced: int = 0
    dropped: int = 0
    rejected: int = 0
    started: int = 0
    waited: int = 0
    wait_ms: int = 0
    ran: int = 0
    run_ms: int = 0

    @property
    def ended(self) -> int:
        """Jobs that ended in this minute, whichever way."""
        return self.succeeded + self.failed + self.cancelled + self.expired

    @property
    def mean_wait(self) -> float | None:
        """Mean dispatch-to-start wait of the first tries started in this minute, in seconds."""
        return self.wait_ms / self.waited / 1000 if self.waited else None

    @property
    def mean_run(self) -> float | None:
        """Mean run time of the tries that ended in this minute, in seconds."""
        return self.run_ms / self.ran / 1000 if self.ran else None


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One group of a queue (`Driver.groups`): the job holding its turn and how many wait."""

    group: str
    holder: str  # the id of the job in turn ("" when none holds it)
    waiting: int  # jobs in the group's line behind the holder


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
    pending: int  # ready to run now (or waiting only for a limit or its group's turn)
    delayed: int  # waiting for their time (first dispatch or retry)
    reserved: int  # held by a worker under a lease
    failed: int  # in the failed-job store
    # How jobs ended over the recent window (`RecentCounts`), filled in by the manager.
    succeeded: int = 0
    failed_recent: int = 0
    cancelled: int = 0
    expired: int = 0
    deferred: int = 0  # waiting for dependencies (workflow records not counted)
    # Over the recent window too (`RecentCounts`), filled in by the manager.
    coalesced: int = 0
    dropped: int = 0
    rejected: int = 0

    @property
    def size(self) -> int:
        """Jobs not yet finished: pending + delayed + reserved + deferred."""
        return self.pending + self.delayed + self.reserved + self.deferred


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


#: How long a pause lasts unless resumed (ten years: for good).
PAUSE_TTL = 10 * 365 * 86400.0


#: Markers the default `get_markers` reads at once (well under a connection pool's size).
MARKER_READS = 16


def check_marker_items(items: Sequence[tuple[str, str, float]]) -> None:
    """Refuse a `set_markers` call holding a ttl that is not a positive number of seconds,
    before anything is written (a bulk write is all or nothing on bad input)."""
    for index, (name, _, ttl) in enumerate(items):
        if not 0 < ttl < math.inf:
            raise ValueError(
                f"set_markers item {index} ({name!r}): ttl must be a positive number, not {ttl!r}"
            )


def pause_marker(queue: str) -> str:
    """The marker name of `queue`'s pause (names fit a marker's 190 characters)."""
    if len(queue) <= 180:
        return f"paused:{queue}"
    return "paused:#" + hashlib.sha256(queue.encode()).hexdigest()


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
    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        """Store `jobs` in one round trip where the backend allows; one `Pushed` per job, in
        order. Id and key checks and the store are one atomic step per job, so competing
        dispatchers never store two waiting jobs with one id or one unique key."""

    @abc.abstractmethod
    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
        *,
        worker: str = "",
    ) -> list[ReservedJob]:
        """Acknowledge `ack`, then take up to `limit` ready jobs, earlier queues first.

        Each job taken is marked running by `worker` (its status record says so). A job whose
        first try was not started within its `ttl` is expired instead (never returned).
        Never blocks waiting for work; `wait` does that.
        """

    @abc.abstractmethod
    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        """Return when work may be ready in `queues`, or after `timeout` seconds."""

    @abc.abstractmethod
    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        """Remove finished jobs, writing each one's `outcome` as its record."""

    @abc.abstractmethod
    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        """Put a reserved job back: after `delay` seconds, or at once.

        With `refund`, the try does not count and the job goes to the front of its queue
        (a worker stopping before it could finish the job); its status is `queued`. Otherwise
        its status is `retrying`, with `error` as the reason.
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

    async def sweep(self) -> None:
        """Periodic upkeep of the backend, done by every worker's heartbeat (every few
        seconds); errors are logged by the caller. Nothing by default (Redis Cluster: the
        relay's outboxes left by a worker that died, redis_relay.py)."""

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

    # -- single jobs -------------------------------------------------------------------

    async def job_status(self, job_id: str, queue: str | None = None) -> JobStatus | None:
        """The record of one job, or `None` if the connection has none (never had, or its
        record was not kept). `queue` narrows the search when known."""
        raise NotImplementedError(f"{type(self).__name__} keeps no status records")

    async def job_payload(self, job_id: str, queue: str | None = None) -> bytes | None:
        """The job's payload (the envelope as pushed) while the backend keeps it: waiting,
        deferred, delayed or running. `None` once the job has ended (unless the backend keeps
        it then: none does today), for an unknown id, or when `queue` is given and the job is
        not on it. Without `queue`, the job `job_status` would show is the one read. One read
        of the backend; `JobStatus` carries no payload, so listing jobs never fetches them."""
        return None

    async def wait_ended(self, job_id: str, queue: str | None, timeout: float) -> JobStatus | None:
        """The job's record once it has ended, or as it is when `timeout` seconds have passed.

        Drivers that can block on the server do; this default polls with a growing pause.
        """
        deadline = time.monotonic() + timeout
        pause = 0.005
        while True:
            record = await self.job_status(job_id, queue)
            left = deadline - time.monotonic()
            if record is None or record.status in ENDED or left <= 0:
                return record
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.2)

    async def cancel(self, job_id: str, queue: str | None = None) -> bool:
        """Cancel a job: a waiting one is removed (record `cancelled`, kept for the job's
        `failure_ttl`); for a running one, its worker is asked to cancel it (`cancel_requested`
        tells it). `False` if the job has ended or is unknown."""
        raise NotImplementedError(f"{type(self).__name__} cannot cancel jobs")

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        """The ids among `jobs` (held by the caller) whose cancellation was asked for."""
        return []

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        """How many jobs of `queue` ended each way over the last `window` seconds."""
        return RecentCounts(window)

    async def prune_records(self, ended_before: float | None = None) -> int:
        """Delete ended records past their keep time; returns how many. Backends whose
        records expire by themselves (Redis) return 0 when `ended_before` is `None`.

        With `ended_before` (epoch seconds), also delete every ended record (succeeded,
        failed, cancelled, expired; jobs and workflow records) whose `ended_at` is earlier,
        whatever its keep time (`queue:prune --older-than`, django-db-queue's
        `delete_old_jobs`). Waiting, deferred and running jobs are never touched."""
        return 0

    async def save_payload(self, job: ReservedJob, payload: bytes) -> bool:
        """Replace the stored payload of `job`, which the caller holds under a lease (a
        multi-step job's checkpoint: its workspace and next step; RQ's `save_meta`).

        Written only while the caller still holds this reservation (same job, same try, lease
        not taken over): `False`, and nothing written, otherwise. A later retry, a refund, a
        lost lease's redelivery and a failed-store record all read the new payload. One round
        trip, atomic."""
        raise NotImplementedError(f"{type(self).__name__} cannot save payloads")

    # -- observing (the dashboard, metrics) -----------------------------------------------

    async def history(self, queue: str, minutes: int = 60) -> list[MinuteCounts]:
        """`queue`'s last `minutes` minutes (the current one included), oldest first, one entry
        per minute (all zeros where nothing happened). Kept by the backend for at least two
        hours, then dropped by itself (Redis) or by `prune_records` / the writes (SQL)."""
        now = int(time.time() // 60)
        return [MinuteCounts(m) for m in range(now - minutes + 1, now + 1)]

    async def add_history(self, rows: Sequence[tuple[str, int, Mapping[str, int]]]) -> None:
        """Add workers' counts to the history: each row is `(queue, minute, {field: n})` with
        fields from `HISTORY_FIELDS` (others are ignored); additions, never overwrites, so any
        number of workers may report into the same minute. One round trip."""

    async def browse(
        self, queue: str, state: BrowseState, offset: int = 0, limit: int = 50
    ) -> list[JobStatus]:
        """Up to `limit` jobs of `queue` in `state`, from `offset`, as their records: `pending`
        in the order they will be handed out, `delayed` by due time, `reserved` by lease
        expiry, `deferred` in push order. Costs O(offset + limit) reads where the backend
        keeps an order (never a scan of the whole queue)."""
        return []

    async def groups(self, queue: str, offset: int = 0, limit: int = 100) -> list[GroupInfo]:
        """Up to `limit` groups of `queue` that hold or wait for a turn, ordered by name."""
        return []

    async def pause(self, queue: str) -> None:
        """Pause `queue`: workers stop taking its jobs (within a second or so) until `resume`;
        dispatches go on, nothing is lost. Kept by the backend, so every worker sees it."""
        await self.set_marker(pause_marker(queue), "1", PAUSE_TTL)

    async def resume(self, queue: str) -> None:
        """Undo `pause` (nothing happens for a queue not paused)."""
        await self.set_marker(pause_marker(queue), "", 0.001)

    async def paused(self, queues: Sequence[str]) -> set[str]:
        """Which of `queues` are paused (drivers that can read many markers in one round
        trip do so: a connection may hold thousands of queues)."""
        values = await asyncio.gather(*(self.get_marker(pause_marker(q)) for q in queues))
        return {q for q, value in zip(queues, values, strict=True) if value == "1"}

    # -- small named values ------------------------------------------------------------

    async def get_marker(self, name: str) -> str | None:
        """The value stored under `name` by `set_marker`, or `None` (never set, or expired)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no markers")

    async def set_marker(self, name: str, value: str, ttl: float) -> None:
        """Store `value` under `name` for `ttl` seconds (replacing any earlier value)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no markers")

    async def claim_marker(self, name: str, value: str, ttl: float) -> bool:
        """Store `value` under `name` for `ttl` seconds only if nothing unexpired is stored
        there; whether this call stored it.

        Set-if-absent for drivers that keep records in another driver (an id or a unique key
        taken once across every process): of any number of concurrent claims of a free name,
        from any process, exactly one returns True. An expired value counts as absent; a value
        `set_marker` stored counts as taken. `get_marker` reads what a claim stored.

        Raises:
            ValueError: `ttl` is not a positive number of seconds.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no markers")

    async def set_markers(self, items: Sequence[tuple[str, str, float]]) -> None:
        """`set_marker` for each `(name, value, ttl)` of `items`, in order (a later item for a
        name replaces an earlier one), in one round trip on the server drivers: a companion
        store keeps thousands of job records per dispatch, one request each would drain the
        connection pool. This default writes them one by one.

        Raises:
            ValueError: a `ttl` is not a positive number of seconds (nothing is written).
        """
        check_marker_items(items)
        for name, value, ttl in items:
            await self.set_marker(name, value, ttl)

    async def get_markers(self, names: Sequence[str]) -> list[str | None]:
        """`get_marker` for each of `names`, in their order (one round trip on the server
        drivers). This default asks for `MARKER_READS` at a time: all of thousands at once
        would ask a connection pool for thousands of connections."""
        found: list[str | None] = []
        for start in range(0, len(names), MARKER_READS):
            batch = names[start : start + MARKER_READS]
            found.extend(await asyncio.gather(*(self.get_marker(name) for name in batch)))
        return found
