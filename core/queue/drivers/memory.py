"""An in-process queue: same semantics as the servers, gone when the process exits.

For tests, and for running the app and a worker in one process during development. It is the
reference for the job lifecycle and the workflow rules every driver implements (records,
uniqueness, `at_front`, `ttl`, cancel, recent counts, priorities, dependencies, workflow
records, limits, once keys, markers, groups, bounded queues, expired jobs handed back): where
the servers need a script or a transaction, this driver relies on the event loop instead, since
nothing else runs between two `await`s. A queue's waiting count (`max_length`) is the size of
its `place` map: O(1).

How a queue keeps its waiting jobs (every job has one `place`, and every structure below may
hold stale entries, skipped when they no longer match the job's place: a cancel or an ack costs
O(1) and never searches a list):

* `first`: ready `at_front` jobs, the latest first.
* `ready`: ready jobs of priority 0 in the order they became ready (the plain path: a deque).
* `ranked`: ready jobs of any other priority, a heap by (-priority, order).
* `delayed`: jobs waiting for their time, a heap by due time.
* `held`: ready jobs a limit holds back, per limit key (`_Gate`), in the order they would have
  been handed out; a key whose first held job may start is listed in `open`, one whose rate
  lets it start at a known time in `timed`.
* `waits`: deferred jobs and workflow records, with the dependencies they still wait for.
* `groups`: per group, the job in turn (`_Group.holder`, stored in one of the places above, or
  running) and the group's line: the jobs waiting for their turn, in push order (an ordered
  dict: O(1) at both ends and by id). A line job's place is ("line", 0), so that it is counted
  as waiting (`max_length`, `pending`) and matches no ordered structure.

The order `reserve` hands jobs out in is the rank (class, -priority, order): class 0 for
`at_front` jobs, 1 for the rest; order grows with each job made ready at the back of its level,
and is negative (and falling) for a job put at the head of its level (a refund, a lost lease,
an `at_front` job), so the latest such job comes first. `browse` lists pending jobs by that
rank (limit-held ones included), then the group lines' jobs (groups by name, each line in push
order). `history` reads the same per-minute counters as `recent`, which `add_history` adds to.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from core.queue.drivers.base import (
    HISTORY_FIELDS,
    BrowseState,
    DependencyRule,
    Driver,
    FailedJob,
    FailedStore,
    GroupInfo,
    JobKind,
    Limit,
    MinuteCounts,
    Outcome,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
    check_marker_items,
    claim_record_id,
    new_record_id,
)
from core.settings import Settings
from core.status import ENDED, WAITING, JobStatus, Progress, Status

__all__ = ["MemoryDriver", "MemoryFailedStore", "check_cutoff", "read_info"]

#: How long the per-minute counters behind `recent` are kept (seconds).
COUNTS_KEPT = 7200.0
#: How often ended records past their keep time are swept out while jobs are acknowledged.
SWEEP_EVERY = 60.0

#: A dependency or dependent: (queue name, job id).
_JobKey = tuple[str, str]
#: Where `reserve` hands a job out: (class, -priority, order); lower first.
_Rank = tuple[int, int, int]
#: Endings that count as a failure for the "failed" rule and a workflow's progress.
_FAILURES = frozenset({Status.FAILED, Status.EXPIRED})
#: A line job's place (`_Queue.place`): in no ordered structure.
_LINE = ("line", 0)
#: The states `browse` lists, and the status a job without a record is shown with in each.
_BROWSED: dict[str, Status] = {
    "pending": Status.QUEUED,
    "delayed": Status.SCHEDULED,
    "reserved": Status.RUNNING,
    "deferred": Status.DEFERRED,
}
#: The counters of a `MinuteCounts` (every field but `minute`).
_MINUTE_FIELDS = tuple(name for name in MinuteCounts.__slots__ if name != "minute")


@dataclass(slots=True)
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
    kind: JobKind = "job"
    priority: int = 0
    group: str = ""
    progress: Progress | None = None  # a workflow record's members, counted
    info: bytes | None = None  # `Outcome.info` of its end: description and meta (JSON)
    # What the lifecycle rules need, never shown:
    due: float = 0.0  # monotonic time it becomes (became) ready
    ttl: float = 0.0
    failure_ttl: float = 604800.0
    unique_key: str = ""
    keep_until: float | None = None  # monotonic; set once the job has ended

    def expires_at(self) -> float | None:
        """Monotonic time after which a first try may no longer start (a deferred job's ttl
        has not begun: it counts from when the job becomes due)."""
        if (
            self.ttl > 0
            and self.attempts == 0
            and self.status in WAITING
            and self.status is not Status.DEFERRED
        ):
            return self.due + self.ttl
        return None


@dataclass(slots=True)
class _Key:
    holder: str  # the job id stored under the key
    until: float | None  # monotonic end of `unique_for`; None: held until its job starts or ends


@dataclass(slots=True)
class _Wait:
    """A deferred job or a workflow record: what it waits for and how those ended so far."""

    kind: JobKind
    rule: DependencyRule
    #: Dependencies not ended yet, in push order (a dict as an ordered set: O(1) removal).
    pending: dict[_JobKey, None]
    total: int
    due: float = 0.0  # monotonic: push time + delay (a job released before it is scheduled)
    due_wall: float = 0.0
    delayed: bool = False
    at_front: bool = False
    cancel_on_failure: bool = False
    tripped: bool = False  # cancel_on_failure has fired
    succeeded: int = 0
    failed: int = 0  # failed or expired
    cancelled: int = 0

    def progress(self) -> Progress:
        return Progress(self.total, len(self.pending), self.succeeded, self.failed, self.cancelled)


@dataclass(slots=True)
class _Gate:
    """The limit state of one (queue, limit key)."""

    tat: float = 0.0  # GCRA theoretical arrival time (monotonic)
    running: set[str] = field(default_factory=set)  # ids reserved now: never drifts
    held: list[tuple[_Rank, str]] = field(default_factory=list)  # heap of held-back jobs
    listed: _Rank | None = None  # the rank under which the key is in `open`, if it is
    timed: bool = False  # in `timed`: its rate lets its first held job start at a known time


@dataclass(slots=True)
class _Group:
    """One group of a queue: the job in turn, and the jobs waiting for it in push order
    (id -> whether it was pushed `at_front`, applied when it takes the turn)."""

    holder: str
    line: OrderedDict[str, bool] = field(default_factory=OrderedDict)


@dataclass
class _Queue:
    name: str
    first: deque[tuple[int, str]] = field(default_factory=deque)  # (order, id)
    ready: deque[tuple[int, str]] = field(default_factory=deque)  # (order, id)
    ranked: list[tuple[int, int, str]] = field(default_factory=list)  # heap (-priority, order, id)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)  # heap (due, order, id)
    #: Where each waiting (not deferred) job is: ("first"|"ready"|"ranked"|"delayed"|"held",
    #: order), or `_LINE` in its group's line. An entry of the structures above that does not
    #: match is stale. Its size is the queue's waiting count (`max_length`).
    place: dict[str, tuple[str, int]] = field(default_factory=dict)
    reserved: dict[str, float] = field(default_factory=dict)  # id -> lease expiry
    payloads: dict[str, bytes] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    priority: dict[str, int] = field(default_factory=dict)  # id -> priority, when not 0
    limits: dict[str, Limit] = field(default_factory=dict)  # id -> its limit
    front: set[str] = field(default_factory=set)  # delayed at_front jobs: at the head when due
    waits: dict[str, _Wait] = field(default_factory=dict)  # deferred jobs, workflow records
    gates: dict[str, _Gate] = field(default_factory=dict)  # limit key -> state
    open: list[tuple[_Rank, str]] = field(default_factory=list)  # heap (head rank, limit key)
    timed: list[tuple[float, str]] = field(default_factory=list)  # heap (allowed at, limit key)
    records: dict[str, _Record] = field(default_factory=dict)
    keys: dict[str, _Key] = field(default_factory=dict)
    once: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (holder, until)
    cancels: set[str] = field(default_factory=set)  # running jobs whose cancel was asked for
    #: minute -> counts by how jobs ended (a `Status`), and "coalesced", "dropped", "rejected"
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)  # the non-empty groups
    group_of: dict[str, str] = field(default_factory=dict)  # grouped job (any state) -> group

    def waiting(self, job_id: str) -> bool:
        """Stored and not running: ready, delayed, held back or deferred."""
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


def _minute_counts(queue: _Queue, minute: int, current: int) -> dict[str, int]:
    """The counters of `queue` for `minute`, created if need be; creating one drops the
    minutes older than `COUNTS_KEPT` before `current` (the minute it is now)."""
    counts = queue.counts.get(minute)
    if counts is None:
        counts = queue.counts[minute] = {}
        oldest = current - int(COUNTS_KEPT // 60)
        for gone in [m for m in queue.counts if m < oldest]:
            del queue.counts[gone]
    return counts


def read_info(raw: bytes | str | None) -> tuple[str, dict[str, Any] | None]:
    """`JobStatus.description` and `.meta` from a record's `Outcome.info` (JSON): what is not
    a JSON object, or a field of the wrong type, is ignored (`""` / `None`)."""
    if not raw:
        return "", None
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(info, dict):
        return "", None
    description = info.get("description")
    meta = info.get("meta")
    return (
        description if isinstance(description, str) else "",
        meta if isinstance(meta, dict) else None,
    )


#: The latest cutoff `check_cutoff` lets through: the end of year 9999 (epoch seconds).
_LATEST = 253402300799.0


def check_cutoff(ended_before: float) -> float:
    """`prune_records`' `ended_before` as epoch seconds (from the epoch, 0, to the end of year
    9999: nothing ended before 1970, so an earlier cutoff is 0), or a `ValueError` naming
    it."""
    if (
        isinstance(ended_before, bool)
        or not isinstance(ended_before, int | float)
        or math.isnan(ended_before)
    ):
        raise ValueError(f"ended_before must be a time in epoch seconds, got {ended_before!r}")
    return max(min(float(ended_before), _LATEST), 0.0)


def _check_page(offset: int, limit: int) -> None:
    """Refuse a page that cannot be read (`browse`, `groups`)."""
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a whole number of at least 0, got {offset!r}")
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number of at least 0, got {limit!r}")


class MemoryDriver(Driver):
    kind = "memory"
    blocks = True

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count()  # orders at the back of a level (and delayed entries)
        self._head = itertools.count(1)  # negated: orders at the head of a level
        self._pushed = asyncio.Event()
        self._stirred = False  # something became ready: wake the waiters before returning
        # (queue, id) -> the event its `wait_ended` callers wait on, set when the job ends;
        # and how many wait on it, so that the last one to give up removes it.
        self._ended: dict[tuple[str, str], asyncio.Event] = {}
        self._waiters: dict[tuple[str, str], int] = {}
        # Dependency -> the jobs and workflow records waiting for it (entries of dependents
        # that stopped waiting are left and skipped).
        self._dependents: dict[_JobKey, list[_JobKey]] = {}
        # Ends whose dependents are still to be resolved: a work list, so that a cascade of
        # any depth never recurses.
        self._ends: deque[tuple[_JobKey, Status]] = deque()
        self._settling = False
        self._markers: dict[str, tuple[str, float]] = {}  # name -> (value, monotonic expiry)
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
        self._stirred = False
        self._pushed.set()
        self._pushed = asyncio.Event()

    def _wake_if_stirred(self) -> None:
        if self._stirred:
            self._wake()

    # -- where waiting jobs are ---------------------------------------------------------

    def _make_ready(
        self, queue: _Queue, job_id: str, *, head: bool = False, front: bool = False
    ) -> None:
        """Put a job among the ready ones: `front` before every other (the latest first),
        `head` at the head of its priority level (refund, lost lease), else at its back."""
        self._stirred = True
        if front:
            order = -next(self._head)
            queue.first.appendleft((order, job_id))
            queue.place[job_id] = ("first", order)
            return
        order = -next(self._head) if head else next(self._seq)
        priority = queue.priority.get(job_id, 0)
        if priority:
            heapq.heappush(queue.ranked, (-priority, order, job_id))
            queue.place[job_id] = ("ranked", order)
        else:
            if head:
                queue.ready.appendleft((order, job_id))
            else:
                queue.ready.append((order, job_id))
            queue.place[job_id] = ("ready", order)

    def _make_delayed(self, queue: _Queue, job_id: str, due: float) -> None:
        order = next(self._seq)
        heapq.heappush(queue.delayed, (due, order, job_id))
        queue.place[job_id] = ("delayed", order)

    # -- push and the uniqueness rules -------------------------------------------------

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        # No await from here to the end: each job's checks and store are one atomic step.
        # Jobs are stored in order, so a dependency pushed earlier in the call is known.
        out = [self._push_one(job, time.monotonic(), time.time()) for job in jobs]
        self._wake()
        return out

    def _push_one(self, job: OutgoingJob, now: float, wall: float) -> Pushed:
        queue = self._queue(job.queue)
        if queue.delayed and queue.delayed[0][0] <= now:
            self._mature_delayed(queue, now)
        # The checks, in order: a taken once key ("duplicate"), an unknown dependency
        # ("missing"), then the id and unique-key rules. A push they answer with a holder
        # ("duplicate", "kept", "replaced") takes the once key for that holder; one refused
        # for its once key, a missing dependency or a full queue stores nothing and takes none.
        if job.once_key:
            taken = queue.once.get(job.once_key)
            if taken is not None and taken[1] > now:
                return Pushed(taken[0], "duplicate")
        # Every dependency must be known before anything is stored.
        deps: dict[_JobKey, Status] = {}
        for dep in job.depends_on:
            found = self._find(dep.id, dep.queue)
            if found is None:
                return Pushed(dep.id, "missing")
            deps[(found[0].name, dep.id)] = found[1].status
        if job.kind == "job":
            held = self._held_by(queue, job, now)
            if held is not None:
                if job.once_key:  # answered by a holder: the key is taken for its answer
                    queue.once[job.once_key] = (held.id, now + job.once_for)
                return held
        victim: str | None = None
        # The bound: waiting jobs (this id's own earlier copy, replaced below, not counted).
        if (
            job.max_length
            and job.kind == "job"
            and len(queue.place) - (job.id in queue.place) >= job.max_length
        ):
            if job.overflow == "drop_oldest":
                victim = self._oldest(queue, job)
            if victim is None:
                self._count(queue, "rejected", wall)
                return Pushed(job.id, "full")
        if job.kind == "job" and job.id in queue.payloads:
            # Stored already, without an id check (a failed job retried before a late ack):
            # start afresh.
            self._forget(queue, job.id)
        if job.once_key:
            queue.once[job.once_key] = (job.id, now + job.once_for)
        if job.unique_key and job.kind == "job":
            until = now + job.unique_for if job.unique_for > 0 else None
            queue.keys[job.unique_key] = _Key(job.id, until)
        self._store(queue, job, now, wall, deferred=bool(deps))
        if deps or job.kind != "job":
            self._attach(queue, job, deps, now, wall)
        if victim is not None and queue.waiting(victim):
            # After the store: a dependent of the dropped job pushed just now is resolved too.
            error = f"dropped: queue {queue.name} is full ({job.max_length} waiting)"
            self._end_waiting(queue, victim, Status.CANCELLED, error, now, wall, counted="dropped")
        return Pushed(job.id)

    @staticmethod
    def _oldest(queue: _Queue, job: OutgoingJob) -> str | None:
        """The waiting job a "drop_oldest" push drops: the first of the job's group line, else
        the head of the plain ready list (priority 0, in the order jobs became ready)."""
        if job.group:
            group = queue.groups.get(job.group)
            if group is not None:
                for job_id in group.line:
                    if job_id != job.id:
                        return job_id
                    break
        ready, place = queue.ready, queue.place
        while ready and place.get(ready[0][1]) != ("ready", ready[0][0]):
            ready.popleft()  # stale
        if ready and ready[0][1] != job.id:
            return ready[0][1]
        return None

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

    def _held_by(self, queue: _Queue, job: OutgoingJob, now: float) -> Pushed | None:
        """The answer of the id and unique-key rules when a holder takes the push ("duplicate",
        "kept", "replaced"), `None` when the job is to be stored."""
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
        return None

    def _duplicate(
        self, queue: _Queue, holder: str, job: OutgoingJob, *, replaceable: bool
    ) -> Pushed:
        if job.on_duplicate == "reject":
            return Pushed(holder, "duplicate")
        if job.on_duplicate == "replace" and replaceable:
            # The holder keeps its id, tries, priority, dependencies, place in the queue and
            # due time: only its payload (and what its record says of the class) changes.
            queue.payloads[holder] = job.payload
            record = queue.records.get(holder)
            if record is not None:
                record.job = job.job or record.job
                record.max_tries = job.max_tries if job.max_tries is not None else record.max_tries
            self._count(queue, "coalesced", time.time())
            return Pushed(holder, "replaced")
        return Pushed(holder, "kept")

    def _store(
        self, queue: _Queue, job: OutgoingJob, now: float, wall: float, *, deferred: bool
    ) -> None:
        delay = max(job.delay, 0.0)
        queue.records[job.id] = _Record(
            job.id,
            job.queue,
            Status.SCHEDULED if delay > 0 else Status.QUEUED,
            job=job.job,
            max_tries=job.max_tries,
            enqueued_at=wall,
            due_at=wall + delay,
            due=now + delay,
            ttl=job.ttl,
            failure_ttl=job.failure_ttl,
            unique_key=job.unique_key,
            kind=job.kind,
            priority=job.priority,
            group=job.group if job.kind == "job" else "",
        )
        if job.kind != "job":
            return  # a workflow record: no payload, never reserved (`_attach` does the rest)
        queue.payloads[job.id] = job.payload
        queue.attempts[job.id] = 0
        queue.cancels.discard(job.id)
        if job.priority:
            queue.priority[job.id] = job.priority
        if job.limit is not None:
            queue.limits[job.id] = job.limit
        if job.group:
            queue.group_of[job.id] = job.group
        if deferred:
            return  # `_attach` makes it deferred (it joins its group when released)
        if job.group and self._join_line(queue, job.group, job.id, job.at_front):
            return
        if delay > 0:
            self._make_delayed(queue, job.id, now + delay)
            if job.at_front:
                queue.front.add(job.id)
        else:
            self._make_ready(queue, job.id, front=job.at_front)

    def _attach(
        self,
        queue: _Queue,
        job: OutgoingJob,
        deps: dict[_JobKey, Status],
        now: float,
        wall: float,
    ) -> None:
        """Make a just-stored job deferred (or a workflow record waiting for its members):
        registered with its live dependencies, the ended ones applied at once."""
        record = queue.records[job.id]
        record.status = Status.DEFERRED
        record.due_at = None
        delay = max(job.delay, 0.0)
        wait = queue.waits[job.id] = _Wait(
            kind=job.kind,
            rule="ended" if job.kind != "job" else job.rule,
            pending=dict.fromkeys(deps),
            total=len(deps),
            due=now + delay,
            due_wall=wall + delay,
            delayed=delay > 0,
            at_front=job.at_front,
            cancel_on_failure=job.cancel_on_failure,
        )
        if job.kind != "job":
            record.progress = wait.progress()
        me = (queue.name, job.id)
        ended: list[tuple[_JobKey, Status]] = []
        for dep, status in deps.items():
            if status in ENDED:
                ended.append((dep, status))
            else:
                self._dependents.setdefault(dep, []).append(me)
        if not deps:  # a workflow record without members: over at once
            self._finish(queue, job.id, wait, now, wall)
            return
        # Apply the ended ones as if they ended now; any cascade waits for the drain below.
        settling, self._settling = self._settling, True
        try:
            for dep, status in ended:
                self._resolve(me, dep, status, now, wall)
        finally:
            self._settling = settling
        self._drain(now, wall)

    # -- groups --------------------------------------------------------------------------

    @staticmethod
    def _join_line(queue: _Queue, name: str, job_id: str, at_front: bool) -> bool:
        """A grouped job arrives (pushed, or released from `deferred`): into the group's line
        (True) if the group has a job in turn, else it takes the turn (False: the caller
        stores it as usual, ready or scheduled). A line job is `queued`; its record keeps its
        own due time."""
        group = queue.groups.get(name)
        if group is None:
            queue.groups[name] = _Group(job_id)
            return False
        group.line[job_id] = at_front
        queue.place[job_id] = _LINE
        record = queue.records.get(job_id)
        if record is not None:
            record.status = Status.QUEUED
        return True

    def _leave_group(self, queue: _Queue, name: str, job_id: str) -> None:
        """A grouped job is gone (ended, or stored afresh): out of its line, or, if it held
        the turn, the turn passes to the line's first job in this same step."""
        group = queue.groups.get(name)
        if group is None:
            return  # deferred, never joined
        if group.holder != job_id:
            group.line.pop(job_id, None)
            return
        if not group.line:
            del queue.groups[name]
            return
        job_id, at_front = group.line.popitem(last=False)
        group.holder = job_id
        now = time.monotonic()
        if queue.delayed and queue.delayed[0][0] <= now:
            # Jobs due before now became ready before this one.
            self._mature_delayed(queue, now)
        record = queue.records.get(job_id)
        if record is not None and record.due > now:
            record.status = Status.SCHEDULED  # its own due time (push time + delay) is later
            self._make_delayed(queue, job_id, record.due)
            if at_front:
                queue.front.add(job_id)
            self._stirred = True  # `wait` callers recompute their timeout
        else:
            self._make_ready(queue, job_id, front=at_front)  # behind the jobs ready already

    def _forget(self, queue: _Queue, job_id: str) -> None:
        """Take a job out of every place it waits or runs (its record stays), passing its
        group's turn on if it held it. Entries left in the ordered structures no longer match
        its place and are skipped."""
        if queue.group_of:
            name = queue.group_of.pop(job_id, None)
            if name is not None:
                queue.place.pop(job_id, None)  # not counted as waiting while the turn passes
                self._leave_group(queue, name, job_id)
        self._unreserve(queue, job_id)
        queue.place.pop(job_id, None)
        queue.payloads.pop(job_id, None)
        queue.attempts.pop(job_id, None)
        # The rest is empty on the plain path: skip the look-ups then.
        if queue.front:
            queue.front.discard(job_id)
        if queue.cancels:
            queue.cancels.discard(job_id)
        if queue.priority:
            queue.priority.pop(job_id, None)
        if queue.limits:
            queue.limits.pop(job_id, None)
        if queue.waits:
            wait = queue.waits.get(job_id)
            if wait is not None and wait.kind == "job":
                del queue.waits[job_id]

    @staticmethod
    def _free_key(queue: _Queue, record: _Record) -> None:
        """Free the job's unique key if it still names this job and no `unique_for` holds it."""
        held = queue.keys.get(record.unique_key) if record.unique_key else None
        if held is not None and held.holder == record.id and held.until is None:
            del queue.keys[record.unique_key]

    # -- dependencies and workflow records ----------------------------------------------

    def _settle(self, key: _JobKey, status: Status, now: float, wall: float) -> None:
        """A job (or workflow record) ended: resolve its dependents, in this same step."""
        self._ends.append((key, status))
        self._drain(now, wall)

    def _drain(self, now: float, wall: float) -> None:
        # Only the outermost caller drains: a dependent cancelled or a record finished while
        # resolving adds its own end to the list instead of recursing.
        if self._settling:
            return
        self._settling = True
        try:
            while self._ends:
                key, status = self._ends.popleft()
                for dependent in self._dependents.pop(key, ()):
                    self._resolve(dependent, key, status, now, wall)
        finally:
            self._settling = False

    def _resolve(
        self, dependent: _JobKey, dep: _JobKey, status: Status, now: float, wall: float
    ) -> None:
        """Apply one dependency's end to one dependent. Idempotent: a dependent no longer
        deferred, or that counted this dependency already, is left alone."""
        queue = self._queues.get(dependent[0])
        job_id = dependent[1]
        wait = queue.waits.get(job_id) if queue is not None else None
        if queue is None or wait is None or dep not in wait.pending:
            return
        del wait.pending[dep]
        if status is Status.SUCCEEDED:
            wait.succeeded += 1
        elif status in _FAILURES:
            wait.failed += 1
        else:
            wait.cancelled += 1
        if wait.kind != "job":
            self._count_member(queue, job_id, wait, status, now, wall)
            return
        if wait.rule == "succeeded":
            if status is not Status.SUCCEEDED:
                self._end_waiting(
                    queue, job_id, Status.CANCELLED, f"dependency {dep[1]} {status}", now, wall
                )
            elif not wait.pending:
                self._release_deferred(queue, job_id, wait, now, wall)
        elif wait.rule == "failed":
            if status in _FAILURES:
                # Runs at the first failure; the dependencies still pending no longer matter.
                self._release_deferred(queue, job_id, wait, now, wall)
            elif not wait.pending:
                self._end_waiting(
                    queue, job_id, Status.CANCELLED, "no dependency failed", now, wall
                )
        elif not wait.pending:  # "ended"
            self._release_deferred(queue, job_id, wait, now, wall)

    def _release_deferred(
        self, queue: _Queue, job_id: str, wait: _Wait, now: float, wall: float
    ) -> None:
        """A deferred job may run: scheduled if its delay (counted from its push) has not
        passed, else ready now (its ttl counting from now). It keeps its priority."""
        del queue.waits[job_id]
        record = queue.records[job_id]
        name = queue.group_of.get(job_id) if queue.group_of else None
        if name is not None and name in queue.groups:
            # Its group has a job in turn: into the line, due at its own time.
            if wait.delayed and wait.due > now:
                record.due, record.due_at = wait.due, wait.due_wall
            else:
                record.due, record.due_at = now, wall
            self._join_line(queue, name, job_id, wait.at_front)
            return
        if name is not None:
            self._join_line(queue, name, job_id, wait.at_front)  # takes the turn
        if wait.delayed and wait.due > now:
            record.status = Status.SCHEDULED
            record.due, record.due_at = wait.due, wait.due_wall
            self._make_delayed(queue, job_id, wait.due)
            if wait.at_front:
                queue.front.add(job_id)
            self._stirred = True  # `wait` callers recompute their timeout
        else:
            record.status = Status.QUEUED
            record.due, record.due_at = now, wall
            self._make_ready(queue, job_id, front=wait.at_front)

    def _count_member(
        self, queue: _Queue, record_id: str, wait: _Wait, status: Status, now: float, wall: float
    ) -> None:
        """A workflow record counts one member's end; the last one ends the record."""
        record = queue.records.get(record_id)
        if record is not None:
            record.progress = wait.progress()
        if wait.cancel_on_failure and status in _FAILURES and not wait.tripped:
            # The first failure cancels the members still waiting (not running ones); each
            # resolves back into this record as cancelled through the work list.
            wait.tripped = True
            for member in list(wait.pending):
                self._cancel_tree(member, ask_running=False, now=now, wall=wall)
        if not wait.pending:
            self._finish(queue, record_id, wait, now, wall)

    def _finish(self, queue: _Queue, record_id: str, wait: _Wait, now: float, wall: float) -> None:
        """End a workflow record whose members have all ended."""
        del queue.waits[record_id]
        record = queue.records.get(record_id)
        if record is None:
            return
        record.progress = wait.progress()
        if wait.failed:
            status, error = Status.FAILED, f"{wait.failed} of {wait.total} members failed"
        elif wait.cancelled:
            status, error = Status.CANCELLED, f"{wait.cancelled} of {wait.total} members cancelled"
        else:
            status, error = Status.SUCCEEDED, ""
        keep = self.settings.queue_result_ttl if status is Status.SUCCEEDED else record.failure_ttl
        self._end(queue, record, Outcome(status, keep, error=error), now, wall)

    def _cancel_tree(self, key: _JobKey, *, ask_running: bool, now: float, wall: float) -> None:
        """Cancel a job if it is waiting (a running one is asked to, if `ask_running`); for a
        workflow record, do so to each of its members that has not ended (nested ones too)."""
        stack = [key]
        while stack:
            name, job_id = stack.pop()
            queue = self._queues.get(name)
            if queue is None:
                continue
            wait = queue.waits.get(job_id)
            if wait is not None and wait.kind != "job":
                stack.extend(reversed(wait.pending))
            elif queue.waiting(job_id):
                self._end_waiting(queue, job_id, Status.CANCELLED, "cancelled", now, wall)
            elif ask_running and job_id in queue.reserved:
                queue.cancels.add(job_id)

    # -- limits ------------------------------------------------------------------------

    def _gate(self, queue: _Queue, key: str) -> _Gate:
        gate = queue.gates.get(key)
        if gate is None:
            gate = queue.gates[key] = _Gate()
        return gate

    @staticmethod
    def _held_head(queue: _Queue, gate: _Gate) -> tuple[_Rank, str] | None:
        """The key's first held-back job still held (stale entries dropped)."""
        held = gate.held
        while held:
            rank, job_id = held[0]
            if queue.place.get(job_id) == ("held", rank[2]):
                return held[0]
            heapq.heappop(held)
        return None

    def _hold(self, queue: _Queue, key: str, gate: _Gate, rank: _Rank, job_id: str) -> None:
        """Hold a job back for its limit key, keeping its rank among the key's jobs."""
        heapq.heappush(gate.held, (rank, job_id))
        queue.place[job_id] = ("held", rank[2])
        if gate.listed is not None and rank < gate.listed:
            # The key may start a job and this one comes first: list it under its rank.
            gate.listed = rank
            heapq.heappush(queue.open, (rank, key))

    def _list(self, queue: _Queue, key: str, gate: _Gate) -> None:
        """The key may start a job again: offer its first held job to `reserve`."""
        if gate.listed is not None:
            return
        head = self._held_head(queue, gate)
        if head is not None:
            gate.listed = head[0]
            heapq.heappush(queue.open, (head[0], key))
            self._stirred = True

    @staticmethod
    def _admit(gate: _Gate, limit: Limit, now: float) -> bool:
        """Whether a job of the key may start now; if so, its start is counted (rate)."""
        if limit.concurrency and len(gate.running) >= limit.concurrency:
            return False
        if limit.rate:
            interval = limit.interval
            # GCRA: allowed up to `burst - 1` intervals ahead of the theoretical arrival time.
            if now < gate.tat - (limit.burst - 1) * interval:
                return False
            gate.tat = max(gate.tat, now) + interval
        return True

    @staticmethod
    def _block(queue: _Queue, key: str, gate: _Gate, limit: Limit) -> None:
        """A key could not start its first held job: wait for a running job of the key to
        stop (concurrency; `_unreserve` lists it again) or for the time its rate allows."""
        if limit.concurrency and len(gate.running) >= limit.concurrency:
            return
        if not gate.timed:
            gate.timed = True
            at = gate.tat - (limit.burst - 1) * limit.interval
            heapq.heappush(queue.timed, (at, key))

    def _unreserve(self, queue: _Queue, job_id: str) -> bool:
        """Take a job out of the running ones (its limit key gets a slot back)."""
        if queue.reserved.pop(job_id, None) is None:
            return False
        limit = queue.limits.get(job_id) if queue.limits else None
        if limit is not None:
            gate = queue.gates.get(limit.key)
            if gate is not None and job_id in gate.running:
                gate.running.discard(job_id)
                self._list(queue, limit.key, gate)
        return True

    # -- reserve, ack, release ---------------------------------------------------------

    def _mature(self, queue: _Queue, now: float) -> None:
        """Make due delayed jobs ready, put jobs whose lease expired back at the head of their
        level, and offer keys whose rate now allows a start."""
        if queue.delayed:
            self._mature_delayed(queue, now)
        if queue.reserved:
            expired = [job_id for job_id, until in queue.reserved.items() if until <= now]
            # The earliest lost lease ends up first.
            for job_id in reversed(expired):
                self._unreserve(queue, job_id)
                self._make_ready(queue, job_id, head=True)
        timed = queue.timed
        while timed and timed[0][0] <= now:  # keys whose rate now allows a start
            _, key = heapq.heappop(timed)
            gate = queue.gates.get(key)
            if gate is not None:
                gate.timed = False
                self._list(queue, key, gate)

    def _mature_delayed(self, queue: _Queue, now: float) -> None:
        """Make due delayed jobs ready, in due order. A push does it first too, so that jobs
        due before it are ordered before the jobs it makes ready."""
        delayed, place = queue.delayed, queue.place
        while delayed and delayed[0][0] <= now:
            _, order, job_id = heapq.heappop(delayed)
            if place.get(job_id) != ("delayed", order):
                continue  # stale: cancelled, cleared, acknowledged
            if job_id in queue.front:
                queue.front.discard(job_id)
                self._make_ready(queue, job_id, front=True)
            else:
                self._make_ready(queue, job_id)

    def _take(self, queue: _Queue) -> tuple[_Rank, str, str | None] | None:
        """Pop the next job to hand out: (its rank, its id, its limit key if it comes from the
        held-back ones, else `None`; "" is a key too: the queue-wide limit)."""
        place, ready = queue.place, queue.ready
        if not queue.first and not queue.ranked and not queue.open:
            # The plain path: priority-0 jobs only.
            while ready:
                order, job_id = ready.popleft()
                if place.get(job_id) == ("ready", order):
                    return (1, 0, order), job_id, None
            return None
        first, ranked, opened = queue.first, queue.ranked, queue.open
        while first and place.get(first[0][1]) != ("first", first[0][0]):
            first.popleft()
        while ready and place.get(ready[0][1]) != ("ready", ready[0][0]):
            ready.popleft()
        while ranked and place.get(ranked[0][2]) != ("ranked", ranked[0][1]):
            heapq.heappop(ranked)
        while opened:
            rank, key = opened[0]
            gate = queue.gates.get(key)
            if gate is None or gate.listed != rank:
                heapq.heappop(opened)  # stale: the key was listed again under another rank
                continue
            head = self._held_head(queue, gate)
            if head is None or head[0] != rank:
                heapq.heappop(opened)
                gate.listed = None
                self._list(queue, key, gate)  # again under its current head, if any
                continue
            break
        best: _Rank | None = None
        source = ""
        if first:
            best, source = (0, 0, first[0][0]), "first"
        if ready:
            rank = (1, 0, ready[0][0])
            if best is None or rank < best:
                best, source = rank, "ready"
        if ranked:
            rank = (1, ranked[0][0], ranked[0][1])
            if best is None or rank < best:
                best, source = rank, "ranked"
        if opened and (best is None or opened[0][0] < best):
            best, source = opened[0][0], "open"
        if best is None:
            return None
        if source == "first":
            return best, first.popleft()[1], None
        if source == "ready":
            return best, ready.popleft()[1], None
        if source == "ranked":
            return best, heapq.heappop(ranked)[2], None
        _, key = heapq.heappop(opened)
        gate = queue.gates[key]
        gate.listed = None
        return best, heapq.heappop(gate.held)[1], key

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
        gone: list[ReservedJob] = []  # the jobs expired here, handed back as such
        for name in queues:
            queue = self._queue(name)
            self._mature(queue, now)
            while len(out) < limit:
                taken = self._take(queue)
                if taken is None:
                    break
                rank, job_id, from_key = taken
                del queue.place[job_id]
                record = queue.records.get(job_id)
                cancelled = bool(queue.cancels) and job_id in queue.cancels
                if cancelled or (
                    record is not None and record.ttl > 0 and self._past_ttl(record, now)
                ):
                    if cancelled:  # cancelled while running, then its lease ran out
                        self._end_waiting(queue, job_id, Status.CANCELLED, "cancelled", now, wall)
                    elif record is not None:
                        gone.append(
                            ReservedJob(
                                job_id,
                                name,
                                queue.payloads[job_id],
                                queue.attempts.get(job_id, 0),
                                expired=True,
                            )
                        )
                        self._expire(queue, record, now, wall)
                    if from_key is not None:  # offer the key's next held job in its place
                        self._list(queue, from_key, queue.gates[from_key])
                    continue
                job_limit = queue.limits.get(job_id) if queue.limits else None
                if job_limit is not None and not self._start(
                    queue, job_id, rank, job_limit, from_key, now
                ):
                    continue  # held back: no try counted, still `queued`
                attempts = queue.attempts[job_id] = queue.attempts.get(job_id, 0) + 1
                queue.reserved[job_id] = now + lease
                if record is not None:
                    record.status = Status.RUNNING
                    record.attempts = attempts
                    record.started_at = wall
                    record.worker = worker
                    if record.unique_key:
                        self._free_key(queue, record)
                out.append(ReservedJob(job_id, name, queue.payloads[job_id], attempts))
            if len(out) >= limit:
                break
        self._wake_if_stirred()
        if gone:
            out.extend(gone)
        return out

    def _start(
        self,
        queue: _Queue,
        job_id: str,
        rank: _Rank,
        limit: Limit,
        from_key: str | None,
        now: float,
    ) -> bool:
        """Whether a limited job may start now (counted if so); if not, it is held back."""
        gate = self._gate(queue, limit.key)
        if from_key is None and self._held_head(queue, gate) is not None:
            # Jobs of its key are held already: it queues behind (or, by rank, before) them
            # without a check of its own; the key's first held job is checked when offered.
            self._hold(queue, limit.key, gate, rank, job_id)
            return False
        if not self._admit(gate, limit, now):
            self._hold(queue, limit.key, gate, rank, job_id)
            self._block(queue, limit.key, gate, limit)
            return False
        gate.running.add(job_id)
        if from_key is not None:
            self._list(queue, from_key, gate)  # offer the next held job of the key
        return True

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
        self,
        queue: _Queue,
        job_id: str,
        status: Status,
        error: str,
        now: float,
        wall: float,
        *,
        counted: str = "",
    ) -> None:
        """End a job that will never run (expired, cancelled, dropped): payload gone, record
        kept for its `failure_ttl`, counted (as `counted` if given), key freed, group turn
        passed, waiters woken, dependents resolved."""
        self._forget(queue, job_id)
        record = queue.records.get(job_id)
        if record is None:
            record = queue.records[job_id] = _Record(job_id, queue.name, status)
        outcome = Outcome(status, record.failure_ttl, error=error)
        self._end(queue, record, outcome, now, wall, counted=counted)

    def _end(
        self,
        queue: _Queue,
        record: _Record,
        outcome: Outcome,
        now: float,
        wall: float,
        *,
        counted: str = "",
    ) -> None:
        record.status = outcome.status
        record.ended_at = wall
        record.result = outcome.result
        record.error = outcome.error
        record.traceback = outcome.traceback
        record.info = outcome.info
        self._free_key(queue, record)
        if outcome.keep > 0:
            record.keep_until = now + outcome.keep
        else:
            queue.records.pop(record.id, None)
        if record.kind == "job":  # workflow records did not run: not in `recent`
            self._count(queue, counted or outcome.status, wall)
        key = (record.queue, record.id)
        event = self._ended.pop(key, None)
        if event is not None:
            event.set()
        if key in self._dependents:
            self._settle(key, outcome.status, now, wall)

    @staticmethod
    def _count(queue: _Queue, status: str, wall: float) -> None:
        """Count one end (a `Status`) or one push outcome ("coalesced", "dropped",
        "rejected") in the current minute."""
        minute = int(wall // 60)
        counts = _minute_counts(queue, minute, minute)
        counts[status] = counts.get(status, 0) + 1

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        now = time.monotonic()
        for name in queues:
            queue = self._queue(name)
            if queue.first or queue.ready or queue.ranked or queue.open:
                return
            if queue.delayed:
                timeout = min(timeout, queue.delayed[0][0] - now)
            if queue.reserved:
                timeout = min(timeout, min(queue.reserved.values()) - now)
            if queue.timed:  # a held-back job its rate lets start then
                timeout = min(timeout, queue.timed[0][0] - now)
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pushed.wait(), timeout)

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        now, wall = time.monotonic(), time.time()
        for job in jobs:
            queue = self._queues.get(job.queue) or self._queue(job.queue)
            if queue.attempts.get(job.id) != job.attempts:
                continue  # a lapsed reservation: the job is someone else's now
            self._forget(queue, job.id)
            outcome = job.outcome or Outcome(Status.SUCCEEDED, self.settings.queue_result_ttl)
            record = queue.records.get(job.id)
            if record is None:
                record = queue.records[job.id] = _Record(job.id, job.queue, Status.RUNNING)
                record.attempts = job.attempts
            self._end(queue, record, outcome, now, wall)
        if now - self._swept >= SWEEP_EVERY:
            self._sweep(now)
        self._wake_if_stirred()

    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        queue = self._queue(job.queue)
        if not self._owns(queue, job) or not self._unreserve(queue, job.id):
            return
        now = time.monotonic()
        if refund:
            queue.attempts[job.id] -= 1
        # A retry is not an end: dependents stay deferred.
        if delay > 0:
            self._make_delayed(queue, job.id, now + delay)
        else:
            # A refund goes to the head of its priority level, a retry behind the ready jobs
            # of its level.
            self._make_ready(queue, job.id, head=refund)
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

    async def save_payload(self, job: ReservedJob, payload: bytes) -> bool:
        # The checks of `extend`: this try, still reserved (not acknowledged, released, nor
        # taken over after its lease ran out). No await: atomic on the event loop.
        queue = self._queues.get(job.queue)
        if queue is None or not self._owns(queue, job) or job.id not in queue.reserved:
            return False
        queue.payloads[job.id] = payload
        return True

    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        now = time.monotonic()
        for job, seconds in leases:
            queue = self._queue(job.queue)
            if self._owns(queue, job) and job.id in queue.reserved:
                queue.reserved[job.id] = now + seconds

    async def stats(self, queue: str) -> QueueStats:
        q = self._queue(queue)
        delayed = sum(1 for where, _ in q.place.values() if where == "delayed")
        deferred = sum(1 for wait in q.waits.values() if wait.kind == "job")
        return QueueStats(
            self.name,
            queue,
            len(q.place) - delayed,  # ready, including jobs a limit holds back
            delayed,
            len(q.reserved),
            0,
            deferred=deferred,
        )

    async def queues(self) -> list[str]:
        return sorted(self._queues)

    async def clear(self, queue: str) -> int:
        q = self._queue(queue)
        doomed = [*q.place, *(job_id for job_id, w in q.waits.items() if w.kind == "job")]
        if q.group_of:
            # Every waiting job goes, lines included: no turn passes. A group whose job in
            # turn is running keeps it (empty line) until that job ends.
            for job_id in doomed:
                q.group_of.pop(job_id, None)
            for name in [n for n, g in q.groups.items() if g.holder not in q.reserved]:
                del q.groups[name]
            for group in q.groups.values():
                group.line.clear()
        for job_id in doomed:
            self._forget(q, job_id)
            record = q.records.pop(job_id, None)
            if record is not None:
                self._free_key(q, record)
        q.first.clear()
        q.ready.clear()
        q.ranked.clear()
        q.delayed.clear()
        q.open.clear()
        q.timed.clear()
        for gate in q.gates.values():
            gate.held.clear()
            gate.listed = None
            gate.timed = False
        # Their records are gone, but whatever waits for them (a workflow record, a job of
        # another queue) must not wait forever: it resolves them as cancelled.
        now, wall = time.monotonic(), time.time()
        for job_id in doomed:
            self._settle((queue, job_id), Status.CANCELLED, now, wall)
        self._wake_if_stirred()
        return len(doomed)

    # -- single jobs -------------------------------------------------------------------

    def _find(self, job_id: str, queue: str | None) -> tuple[_Queue, _Record] | None:
        """The job's queue and record (a live job's first), dropping records past their keep."""
        names: Iterable[str] = [queue] if queue is not None else list(self._queues)
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
            self._wake_if_stirred()
            if job_id not in q.records:
                return None
        return self._view(q, record, now)

    async def job_payload(self, job_id: str, queue: str | None = None) -> bytes | None:
        # Through job_status: the same job chosen, and one past its ttl reaped (then None).
        record = await self.job_status(job_id, queue)
        q = self._queues.get(record.queue) if record is not None else None
        return q.payloads.get(job_id) if q is not None else None

    def _view(self, q: _Queue, record: _Record, now: float) -> JobStatus:
        """What callers see of a stored record."""
        job_id = record.id
        status = record.status
        if status is Status.SCHEDULED and record.due <= now:
            status = Status.QUEUED  # due: ready, whether or not a reserve has moved it yet
        wait = q.waits.get(job_id)
        waiting_for: tuple[str, ...] = ()
        if wait is not None and wait.kind == "job":
            waiting_for = tuple(dep_id for _, dep_id in wait.pending)
        description, meta = read_info(record.info)
        return JobStatus(
            id=job_id,
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
            kind=record.kind,
            waiting_for=waiting_for,
            progress=record.progress,
            priority=record.priority,
            group=record.group,
            description=description,
            meta=meta,
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
        q, record = found
        now, wall = time.monotonic(), time.time()
        try:
            if record.kind != "job":
                # A workflow record: cancel its members that have not ended (running ones are
                # asked to); it ends itself once they have.
                if record.status in ENDED:
                    return False
                self._cancel_tree((q.name, job_id), ask_running=True, now=now, wall=wall)
                return True
            if q.waiting(job_id):  # ready, delayed, held back or deferred
                self._end_waiting(q, job_id, Status.CANCELLED, "cancelled", now, wall)
                return True
            if job_id in q.reserved:
                q.cancels.add(job_id)
                return True
            return False
        finally:
            self._wake_if_stirred()

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        return [job.id for job in jobs if job.id in self._queue(job.queue).cancels]

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        q = self._queue(queue)
        first = math.floor((time.time() - window) / 60)
        totals: dict[str, int] = {}
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
            coalesced=totals.get("coalesced", 0),
            dropped=totals.get("dropped", 0),
            rejected=totals.get("rejected", 0),
        )

    # -- observing (the dashboard, metrics) -----------------------------------------------

    async def history(self, queue: str, minutes: int = 60) -> list[MinuteCounts]:
        if not isinstance(minutes, int) or minutes < 1:
            raise ValueError(f"minutes must be a whole number of at least 1, got {minutes!r}")
        q = self._queues.get(queue)
        now = int(time.time() // 60)
        out = []
        for minute in range(now - minutes + 1, now + 1):
            counts = q.counts.get(minute) if q is not None else None
            if counts:
                out.append(MinuteCounts(minute, **{f: counts.get(f, 0) for f in _MINUTE_FIELDS}))
            else:
                out.append(MinuteCounts(minute))
        return out

    async def add_history(self, rows: Sequence[tuple[str, int, Mapping[str, int]]]) -> None:
        # Into the same counters as the ends (`_count`): no await, so nothing is lost.
        current = int(time.time() // 60)
        oldest = current - int(COUNTS_KEPT // 60)
        for queue, minute, fields in rows:
            if minute < oldest:
                continue  # dropped already: the history keeps two hours
            added = {name: int(fields[name]) for name in HISTORY_FIELDS if fields.get(name)}
            if not added:
                continue
            counts = _minute_counts(self._queue(queue), minute, current)
            for name, n in added.items():
                counts[name] = counts.get(name, 0) + n

    async def browse(
        self, queue: str, state: BrowseState, offset: int = 0, limit: int = 50
    ) -> list[JobStatus]:
        if state not in _BROWSED:
            raise ValueError(f"state must be one of {', '.join(_BROWSED)}, got {state!r}")
        _check_page(offset, limit)
        q = self._queues.get(queue)
        if q is None or limit == 0:
            return []
        now = time.monotonic()
        end = offset + limit
        if state == "pending":
            if q.delayed and q.delayed[0][0] <= now:
                self._mature_delayed(q, now)  # due: ready, in the order reserve would take them
                self._wake_if_stirred()
            page = self._pending(q, end)[offset:end]
        elif state == "delayed":
            place = q.place
            due = (e for e in q.delayed if place.get(e[2]) == ("delayed", e[1]))
            page = [job_id for _, _, job_id in heapq.nsmallest(end, due)][offset:end]
        elif state == "reserved":
            leases = heapq.nsmallest(end, q.reserved.items(), key=lambda item: item[1])
            page = [job_id for job_id, _ in leases[offset:end]]
        else:
            deferred = (job_id for job_id, wait in q.waits.items() if wait.kind == "job")
            page = list(itertools.islice(deferred, offset, end))
        out = []
        for job_id in page:
            record = q.records.get(job_id)
            if record is None:  # cannot happen while every path writes records; still shown
                out.append(JobStatus(job_id, _BROWSED[state], self.name, q.name))
            else:
                out.append(self._view(q, record, now))
        return out

    @staticmethod
    def _pending(q: _Queue, count: int) -> list[str]:
        """The first `count` pending jobs: the ready ones (limit-held ones included) by the
        rank `reserve` hands them out in, then the group lines' jobs, group by group in name
        order, each line in push order."""
        place = q.place
        ranks: list[tuple[_Rank, str]] = [
            ((0, 0, order), job_id)
            for order, job_id in q.first
            if place.get(job_id) == ("first", order)
        ]
        ranks += [
            ((1, 0, order), job_id)
            for order, job_id in q.ready
            if place.get(job_id) == ("ready", order)
        ]
        ranks += [
            ((1, neg, order), job_id)
            for neg, order, job_id in q.ranked
            if place.get(job_id) == ("ranked", order)
        ]
        for gate in q.gates.values():
            ranks += [e for e in gate.held if place.get(e[1]) == ("held", e[0][2])]
        out = [job_id for _, job_id in heapq.nsmallest(count, ranks)]
        for name in sorted(q.groups):
            if len(out) >= count:
                break
            out += itertools.islice(q.groups[name].line, count - len(out))
        return out

    async def groups(self, queue: str, offset: int = 0, limit: int = 100) -> list[GroupInfo]:
        _check_page(offset, limit)
        q = self._queues.get(queue)
        if q is None or not q.groups or limit == 0:
            return []
        names = sorted(q.groups)[offset : offset + limit]
        return [GroupInfo(n, q.groups[n].holder, len(q.groups[n].line)) for n in names]

    async def prune_records(self, ended_before: float | None = None) -> int:
        dropped = self._sweep(time.monotonic())
        if ended_before is None:
            return dropped
        ended_before = check_cutoff(ended_before)
        for q in self._queues.values():
            # Ended records only: a job's record is live (waiting, deferred, running) until
            # its end sets `keep_until`, whatever its `ended_at` said before a retry.
            doomed = [
                job_id
                for job_id, record in q.records.items()
                if record.keep_until is not None
                and record.status in ENDED
                and record.ended_at is not None
                and record.ended_at < ended_before
                and job_id not in q.payloads
                and job_id not in q.waits
            ]
            for job_id in doomed:
                del q.records[job_id]
            dropped += len(doomed)
        return dropped

    def _sweep(self, now: float) -> int:
        """Drop ended records past their keep time (returns how many), and expired once keys,
        markers and limit state no job needs any more."""
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
            for key in [k for k, (_, until) in q.once.items() if until <= now]:
                del q.once[key]
            for key in [
                k
                for k, g in q.gates.items()
                if not g.running
                and g.listed is None
                and not g.timed
                and g.tat <= now
                and self._held_head(q, g) is None
            ]:
                del q.gates[key]  # a fresh gate behaves the same
        for name in [n for n, (_, until) in self._markers.items() if until <= now]:
            del self._markers[name]
        return dropped

    # -- small named values ------------------------------------------------------------

    async def get_marker(self, name: str) -> str | None:
        held = self._markers.get(name)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0]

    async def set_marker(self, name: str, value: str, ttl: float) -> None:
        self._markers[name] = (value, time.monotonic() + ttl)

    async def claim_marker(self, name: str, value: str, ttl: float) -> bool:
        # No await between the look and the store: one loop, so the claim is atomic.
        if not 0 < ttl < math.inf:
            raise ValueError(f"claim_marker {name!r}: ttl must be a positive number, not {ttl!r}")
        now = time.monotonic()
        held = self._markers.get(name)
        if held is not None and held[1] > now:
            return False
        self._markers[name] = (value, now + ttl)
        return True

    async def set_markers(self, items: Sequence[tuple[str, str, float]]) -> None:
        # Checked first, then stored with no await between: all or nothing, in order.
        check_marker_items(items)
        now = time.monotonic()
        for name, value, ttl in items:
            self._markers[name] = (value, now + ttl)

    async def get_markers(self, names: Sequence[str]) -> list[str | None]:
        now = time.monotonic()
        found: list[str | None] = []
        for name in names:
            held = self._markers.get(name)
            found.append(None if held is None or held[1] <= now else held[0])
        return found

    # -- failed store, workers ---------------------------------------------------------

    def failed_store(self) -> FailedStore:
        return self._failed

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        # Checked, deleted and pushed without yielding to the event loop: one atomic step.
        # The job's dependents were resolved when it failed: they stay as they ended.
        moving = [r for r in records if r.connection == self.name and self._failed.holds(r)]
        for record in moving:
            await self._failed.remove(record)
        # Like Redis and SQL: the job keeps its priority and rejoins its group (the turn if the
        # group is empty, else the line's tail), as its status record tells them.
        back = []
        for r in moving:
            queue = self._queues.get(r.queue)
            kept = queue.records.get(r.id) if queue is not None else None
            back.append(
                OutgoingJob(
                    r.id,
                    r.queue,
                    r.payload.encode(),
                    job=_class_of(r),
                    priority=kept.priority if kept is not None else 0,
                    group=kept.group if kept is not None else "",
                )
            )
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
