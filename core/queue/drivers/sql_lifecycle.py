"""The job lifecycle on the queue tables: statuses, records of ended jobs, ids and unique keys.

Used by `database.DatabaseDriver` inside its transactions; nothing here opens one.

* A stored job's status is read from its `queue_jobs` row (`live_status`): writing a record at
  each step would cost the hot path a statement per job. `state` says what the lease cannot:
  "waiting" (never started), "queued" (started before, or given back with its try refunded),
  "retrying". Rows of the release before (state NULL) read from their lease and tries.
* A job that ends (acknowledged, expired, cancelled) moves to `queue_job_records` in the
  transaction that deletes its row (`end_rows`, `ack_rows`), and its queue's per-minute counter
  of that status goes up (`count`).
* Unique keys are never freed by a write: `queue_unique_keys` names the job last stored under
  a key, and whether that job still holds it is read from its row when the next job with the
  key is pushed (`take_key`). The key row is locked first (`FOR UPDATE`; SQLite has one writer
  at a time), so competing dispatchers decide one after the other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Row,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob, Pushed, RecentCounts, ReservedJob
from core.queue.drivers.memory import read_info
from core.status import JobStatus, Progress, Status

__all__ = [
    "ACKED",
    "LIVE",
    "PRUNE_BATCH",
    "Ends",
    "Place",
    "ack_rows",
    "cancel",
    "count",
    "end_rows",
    "epoch",
    "forget_dependencies",
    "forget_record",
    "front",
    "in_line",
    "insert_plain",
    "job_row",
    "live_state",
    "live_status",
    "minute_now",
    "progress_of",
    "prune_counts",
    "prune_ended",
    "prune_keys",
    "prune_records",
    "push_checked",
    "push_checked_many",
    "read_status",
    "recent",
    "record_status",
    "ttl_error",
    "upsert_counts",
]

COUNTS_KEPT = 2 * 3600  # seconds of per-minute counters `prune_counts` keeps
PRUNE_BATCH = 1000  # rows per DELETE, so that a prune never holds many locks for long
_jobs = t.queue_jobs.c
_records = t.queue_job_records.c
_keys = t.queue_unique_keys.c
_counts = t.queue_counts.c

#: The `queue_jobs` columns a status or a record is made from.
_ACKED = (
    _jobs.id,
    _jobs.uuid,
    _jobs.queue,
    _jobs.attempts,
    _jobs.reserved_at,
    _jobs.reserved_until,
    _jobs.available_at,
    _jobs.created_at,
    _jobs.job,
    _jobs.max_tries,
    _jobs.worker,
    _jobs.state,
    _jobs.error,
    _jobs.due_at,
    _jobs.expires_at,
    _jobs.failure_ttl,
    _jobs.unique_key,
    _jobs.cancel_requested,
    _jobs.priority,
    _jobs.dependents,
    _jobs.limit_key,
    _jobs.group_key,
)
#: What an acknowledgement reads of the rows it deletes (a reserved job is never deferred nor
#: a workflow record: the other columns of `LIVE` are NULL there).
ACKED = _ACKED
LIVE = (
    *_ACKED,
    _jobs.kind,
    _jobs.rule,
    _jobs.deps,
    _jobs.ttl,
    _jobs.limit_spec,
    _jobs.held,
    _jobs.workflow,
    _jobs.group_seq,
)


class Ends(Counter[tuple[str, str]]):
    """How many jobs ended per (queue, status) in one transaction (the caller writes the
    counts), and what those ends leave for the same transaction: `resolve` the ended jobs
    that have dependents (uuid, queue, status), `stopped` the limited jobs that stopped
    running (queue, limit key, uuid). See `sql_workflow.settle`."""

    def __init__(self) -> None:
        super().__init__()
        self.resolve: list[tuple[str, str, str]] = []
        self.stopped: list[tuple[str, str, str]] = []
        self.records: list[tuple[str, str]] = []  # workflow records to cancel (uuid, queue)
        #: Jobs of a group that ended and may have held its turn (queue, group, uuid).
        self.turns: list[tuple[str, str, str]] = []
        #: Jobs a claim ended as expired, handed back by `reserve` (`ReservedJob.expired`).
        self.handed: list[ReservedJob] = []
        self.reaped = 0  # jobs a claim ended instead of handing them out


def _follow(counted: Counter[tuple[str, str]], row: Any, status: str) -> None:
    if not isinstance(counted, Ends):
        return
    if getattr(row, "dependents", None):
        counted.resolve.append((row.uuid, row.queue, status))
    group = getattr(row, "group_key", None)
    # A job in a line or a deferred one never holds a turn.
    if group is not None and not in_line(row) and getattr(row, "deps", None) is None:
        counted.turns.append((row.queue, group, row.uuid))


def in_line(row: Any) -> bool:
    """Whether a stored job waits in its group's line (see `sql_groups`)."""
    return getattr(row, "group_seq", None) is not None


def epoch(moment: datetime | None) -> float | None:
    """A time from the tables as epoch seconds."""
    return None if moment is None else t.from_db_time(moment).timestamp()


def due_time(row: Any) -> datetime | None:
    """When the job became (or becomes) ready: its `available_at`, unless that is an
    `at_front` mirror or its delay is kept as a lease nobody holds (see `sql_tables`).
    `None` while it is deferred."""
    if getattr(row, "deps", None) is not None:
        return None
    if in_line(row):
        return row.due_at  # type: ignore[no-any-return]
    if row.reserved_at is None and row.reserved_until is not None:
        if t.is_priority_time(row.reserved_until):
            return row.available_at  # type: ignore[no-any-return]
        return row.reserved_until  # type: ignore[no-any-return]
    if row.available_at <= t.FRONT:  # `FRONT` itself: a refunded `at_front` job
        return row.due_at or row.created_at  # type: ignore[no-any-return]
    return row.available_at  # type: ignore[no-any-return]


def live_state(row: Any, now: datetime) -> str:
    """What a stored job is doing: "running", "waiting", or how it has ended without anyone
    writing it yet: "expired" (past its ttl) or "cancelled" (a cancel was asked for while it
    ran, and it is no longer running)."""
    if row.reserved_at is not None and row.reserved_until is not None and row.reserved_until > now:
        return "running"
    if row.cancel_requested:
        return "cancelled"
    if row.attempts == 0 and row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "waiting"


def ttl_error(row: Any) -> str:
    due = due_time(row) or row.created_at
    ttl = (row.expires_at - due).total_seconds()
    return f"not started within its ttl of {ttl:g}s"


def live_status(row: Any, now: datetime, connection: str) -> JobStatus:
    """The status of a job from its `queue_jobs` row."""
    state = live_state(row, now)
    due = due_time(row)
    ended: datetime | None = None
    error = row.error or ""
    if state == "running":
        status = Status.RUNNING
    elif state == "cancelled":
        status, ended, error = Status.CANCELLED, row.reserved_until, "cancelled"
    elif state == "expired":
        status, ended, error = Status.EXPIRED, row.expires_at, ttl_error(row)
    elif due is None:
        status = Status.DEFERRED
    elif in_line(row):
        status = Status.QUEUED  # waiting for its group's turn
    elif row.state == "retrying" or (row.state is None and row.attempts > 0):
        status = Status.RETRYING
    elif row.held:
        status = Status.QUEUED  # held back by its limit: it keeps its place
    elif due > now:
        status = Status.SCHEDULED
    else:
        status = Status.QUEUED
    return JobStatus(
        id=row.uuid,
        status=status,
        connection=connection,
        queue=row.queue,
        job=row.job or "",
        attempts=row.attempts,
        max_tries=row.max_tries,
        enqueued_at=epoch(row.created_at),
        due_at=epoch(due),
        started_at=epoch(row.reserved_at),
        ended_at=epoch(ended),
        worker=row.worker or "",
        error=error,
        kind=row.kind or "job",
        priority=row.priority or 0,
        progress=progress_of(row.workflow, row.deps),
        group=row.group_key or "",
    )


def progress_of(workflow: str | None, pending: int | None) -> Progress | None:
    """A workflow record's `Progress` from its counts (JSON) and its members not ended."""
    if not workflow:
        return None
    counts = orjson.loads(workflow)
    return Progress(
        total=int(counts["total"]),
        pending=int(pending or 0),
        succeeded=int(counts.get("succeeded", 0)),
        failed=int(counts.get("failed", 0)),
        cancelled=int(counts.get("cancelled", 0)),
    )


def record_status(row: Any) -> JobStatus:
    """The status of an ended job from its `queue_job_records` row."""
    description, meta = read_info(row.info)
    return JobStatus(
        id=row.uuid,
        status=Status(row.status),
        connection=row.connection,
        queue=row.queue,
        job=row.job or "",
        attempts=row.attempts,
        max_tries=row.max_tries,
        enqueued_at=epoch(row.enqueued_at),
        due_at=epoch(row.due_at),
        started_at=epoch(row.started_at),
        ended_at=epoch(row.ended_at),
        worker=row.worker or "",
        error=row.error or "",
        traceback=row.traceback or "",
        result=None if row.result is None else row.result.encode(),
        kind=row.kind or "job",
        priority=row.priority or 0,
        progress=progress_of(row.progress, 0),
        group=row.group_key or "",
        description=description,
        meta=meta,
    )


def _record(row: Any, connection: str, outcome: Outcome, now: datetime) -> dict[str, Any]:
    record: dict[str, Any] = {
        "uuid": row.uuid,
        "connection": connection,
        "queue": row.queue,
        "job": row.job,
        "status": outcome.status.value,
        "attempts": row.attempts,
        "max_tries": row.max_tries,
        "enqueued_at": row.created_at,
        "due_at": due_time(row),
        "started_at": row.reserved_at,
        "ended_at": now,
        "worker": row.worker,
        "error": outcome.error or None,
        "traceback": outcome.traceback or None,
        "result": None if outcome.result is None else outcome.result.decode(),
        "keep_until": t.now(outcome.keep),
    }
    # Schema version 4's columns, only when set: a plain job's record sends no more NULLs.
    kind, progress = getattr(row, "kind", None), getattr(row, "workflow", None)
    if kind is not None or progress is not None or row.priority is not None:
        record.update(kind=kind, progress=progress, priority=row.priority)
    group = getattr(row, "group_key", None)
    if group is not None:  # schema version 5's column, only when set
        record["group_key"] = group
    if outcome.info is not None:  # schema version 6's column, only when set
        record["info"] = outcome.info.decode("utf-8", "replace")
    return record


_UPSERTS: dict[tuple[str, str], Any] = {}


def _upsert(dialect: str, table: Table, add: str = "") -> Any:
    """The statement that inserts rows of `table`, replacing a row with the same key (or, for
    the column `add`, adding the new value to the stored one). Built once per table and
    dialect, so that SQLAlchemy compiles it once; run with a list of rows, it is one INSERT."""
    cached = _UPSERTS.get((dialect, table.name))
    if cached is not None:
        return cached
    keys = [c.name for c in table.primary_key]
    names = [c.name for c in table.columns if c.name not in keys]
    if dialect == "sqlite":
        lite = sqlite_insert(table)
        new = lite.excluded
        sets = {n: (table.c[n] + new[n]) if n == add else new[n] for n in names}
        statement: Any = lite.on_conflict_do_update(index_elements=keys, set_=sets)
    else:
        my = mysql_insert(table)
        sets = {n: (table.c[n] + my.inserted[n]) if n == add else my.inserted[n] for n in names}
        statement = my.on_duplicate_key_update(sets)
    _UPSERTS[(dialect, table.name)] = statement
    return statement


async def write_records(conn: AsyncConnection, records: Sequence[Mapping[str, Any]]) -> None:
    """Store records of ended jobs (one statement), replacing older ones of the same ids."""
    if records:
        rows = list(records)
        if any(row.keys() != rows[0].keys() for row in rows):
            names = {name: None for row in rows for name in row}
            rows = [{**names, **row} for row in rows]
        await conn.execute(_upsert(conn.dialect.name, t.queue_job_records), rows)


async def count(conn: AsyncConnection, ended: Counter[tuple[str, str]], shard: int) -> None:
    """Add to this minute's counters of how jobs ended, per (queue, status), in the caller's
    `shard`; one statement. Sorted, so that the rows are locked in one order."""
    if not ended:
        return
    minute = minute_now()
    rows = [
        {"queue": queue, "minute": minute, "status": status, "shard": shard, "count": n}
        for (queue, status), n in sorted(ended.items())
    ]
    await conn.execute(upsert_counts(conn.dialect.name), rows)


def upsert_counts(dialect: str) -> Any:
    """The statement that adds rows to `queue_counts` (their `count` to a stored row's)."""
    return _upsert(dialect, t.queue_counts, "count")


def minute_now() -> int:
    """The counters' current minute: epoch minutes."""
    return int(time.time() // 60)


#: The longest a record is kept (the dispatch limit of result_ttl and failure_ttl, 3650 days).
_MAX_KEEP = 3650 * 24 * 3600.0


def _failure_keep(value: Any, default: float) -> float:
    """A row's `failure_ttl` column as seconds to keep its record. The column is not trusted
    (a row written by hand, or by other code): a value that is not a number is read as the
    default, and one past the longest keep as that, instead of overflowing the keep time in
    reserve/cancel and so failing every reserve of the queue."""
    if value is None:
        return default
    try:
        keep = float(value)
    except (TypeError, ValueError):
        return default
    if math.isnan(keep):
        return default
    return min(keep, _MAX_KEEP)


async def end_rows(
    conn: AsyncConnection,
    rows: Sequence[tuple[Any, Status, str]],
    now: datetime,
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
    tally: str = "",
) -> None:
    """End stored jobs that will never run (expired, cancelled): rows deleted, records kept
    for each job's `failure_ttl`, counted into `counted` (the caller writes the counts) under
    their status, or under `tally` when given (a drop by `max_length` counts "dropped")."""
    if not rows:
        return
    await conn.execute(delete(t.queue_jobs).where(_jobs.id.in_([row.id for row, _, _ in rows])))
    records = []
    for row, status, error in rows:
        keep = _failure_keep(row.failure_ttl, default_keep)
        if keep > 0:
            records.append(_record(row, connection, Outcome(status, keep, error=error), now))
        if not getattr(row, "kind", None):  # workflow records are not jobs that ran
            counted[(row.queue, tally or status.value)] += 1
        _follow(counted, row, status.value)
        if getattr(row, "deps", None) is not None:
            await forget_dependencies(conn, row.uuid, row.queue)
    await write_records(conn, records)


async def forget_dependencies(conn: AsyncConnection, job_id: str, queue: str) -> None:
    """Drop the dependency rows of a job that is no longer deferred."""
    deps = t.queue_dependencies.c
    await conn.execute(
        delete(t.queue_dependencies).where(deps.job_uuid == job_id, deps.job_queue == queue)
    )


async def ack_rows(
    conn: AsyncConnection,
    jobs: Sequence[ReservedJob],
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
) -> None:
    """Delete the rows still held under these reservations and write how each ended.

    MariaDB and SQLite delete and read the rows in one statement (RETURNING); MySQL locks and
    reads them first. The counters go into `counted`, for the caller to write last: they are
    the rows every worker updates, so their locks are held only until the commit.
    """
    jobs = await _ack_plain(conn, jobs, connection, default_keep, counted)
    if not jobs:
        return
    if conn.dialect.delete_returning:
        result = await conn.execute(delete(t.queue_jobs).where(t.held(jobs)).returning(*ACKED))
        rows = result.all()
    else:
        query = select(*ACKED).where(t.held(jobs)).with_for_update()
        rows = (await conn.execute(query)).all()
        if rows:
            await conn.execute(delete(t.queue_jobs).where(_jobs.id.in_([r.id for r in rows])))
    if not rows:
        return
    outcomes = {(job.id, job.queue): job.outcome for job in jobs}
    now = t.now()
    records = []
    for row in rows:
        outcome = outcomes.get((row.uuid, row.queue)) or Outcome(Status.SUCCEEDED, default_keep)
        if outcome.keep > 0:
            records.append(_record(row, connection, outcome, now))
        counted[(row.queue, outcome.status.value)] += 1
        _follow(counted, row, outcome.status.value)
        if row.limit_key is not None and isinstance(counted, Ends):
            counted.stopped.append((row.queue, row.limit_key, row.uuid))
    await write_records(conn, records)


#: A row whose end leaves nothing to settle (no dependents, limit or group) and whose record
#: the database can copy from the row itself.
_SIMPLE = and_(_jobs.dependents.is_(None), _jobs.limit_key.is_(None), _jobs.group_key.is_(None))


def _plain_keep(job: ReservedJob, default_keep: float) -> float | None:
    """The keep time of a job that succeeded with nothing to store beside its row (no
    result, error or info), else `None`."""
    outcome = job.outcome
    if outcome is None:
        return default_keep
    if (
        outcome.status is Status.SUCCEEDED
        and outcome.result is None
        and outcome.info is None
        and not outcome.error
        and not outcome.traceback
    ):
        return outcome.keep
    return None


def _copied_records() -> Any:
    """SELECT of the records of succeeded jobs made from their `queue_jobs` rows, columns in
    `queue_job_records` order (as `_record` writes them for a reserved job: its due time is
    its `available_at` unless that is an `at_front` mirror). The connection's name, the time
    they ended and the time they are kept until are parameters (`rec_connection`, `rec_now`,
    `rec_keep_until`)."""
    due = case(
        (_jobs.available_at <= t.FRONT, func.coalesce(_jobs.due_at, _jobs.created_at)),
        else_=_jobs.available_at,
    )
    values: dict[str, Any] = {
        "uuid": _jobs.uuid,
        "queue": _jobs.queue,
        "connection": bindparam("rec_connection", type_=String),
        "job": _jobs.job,
        "status": literal(Status.SUCCEEDED.value, String),
        "attempts": _jobs.attempts,
        "max_tries": _jobs.max_tries,
        "enqueued_at": _jobs.created_at,
        "due_at": due,
        "started_at": _jobs.reserved_at,
        "ended_at": bindparam("rec_now", type_=t.Time),
        "worker": _jobs.worker,
        "error": null(),
        "traceback": null(),
        "result": null(),
        "keep_until": bindparam("rec_keep_until", type_=t.Time),
        "kind": null(),
        "progress": null(),
        "priority": _jobs.priority,
        "group_key": null(),
        "info": null(),
    }
    return select(*(values[c.name] for c in _records_table.columns))


async def _ack_plain(
    conn: AsyncConnection,
    jobs: Sequence[ReservedJob],
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
) -> Sequence[ReservedJob]:
    """Acknowledge the jobs that succeeded with nothing to store beside their row, and whose
    row leaves nothing to settle, without reading the rows: the database copies each record
    from its row (one INSERT ... SELECT per keep time, usually one), then deletes the rows.
    Returns the jobs left for the general path: the others, and any of these whose row was
    not deleted (not simple, or no longer held: that path finds out which).

    SQLite only: it has one writer, so from the copy on no other connection changes a row
    until this transaction ends, and the DELETE with the same condition finds the same rows.
    MySQL/MariaDB run at READ COMMITTED, where the SELECT of an INSERT ... SELECT takes no
    locks: a row could start or stop matching between the copy and the DELETE (a lapsed
    holder's ack racing another worker's claim or refund), leaving a record without its end
    or an end without its record. There every job takes the general path (rows locked and
    read back by the DELETE ... RETURNING or SELECT ... FOR UPDATE of `ack_rows`).
    """
    if conn.dialect.name != "sqlite":
        return jobs
    by_keep: dict[float, list[ReservedJob]] = {}
    rest: list[ReservedJob] = []
    for job in jobs:
        keep = _plain_keep(job, default_keep)
        if keep is None:
            rest.append(job)
        else:
            by_keep.setdefault(keep, []).append(job)
    if not by_keep:
        return jobs
    now = t.now()
    plain = [job for group in by_keep.values() for job in group]
    dialect = conn.dialect.name
    one = t.held_one(plain)
    for keep, group in by_keep.items():
        if keep > 0:
            params = {"rec_connection": connection, "rec_now": now, "rec_keep_until": t.now(keep)}
            if one is not None and len(by_keep) == 1:
                await conn.execute(_statement(dialect, "copy"), {**params, **one})
            else:
                copy = _copied_records().where(t.held(group), _SIMPLE)
                statement = _copy_statement(dialect).from_select(_RECORD_COLUMNS, copy)
                await conn.execute(statement, params)
    status = Status.SUCCEEDED.value
    if conn.dialect.delete_returning:
        if one is not None:
            result = await conn.execute(_statement(dialect, "delete"), one)
        else:
            removal = delete(t.queue_jobs).where(t.held(plain), _SIMPLE)
            result = await conn.execute(removal.returning(_jobs.uuid, _jobs.queue))
        gone = result.all()
        for row in gone:
            counted[(row.queue, status)] += 1
        if len(gone) == len(plain):
            return rest
        done = {(row.uuid, row.queue) for row in gone}
        rest += [job for job in plain if (job.id, job.queue) not in done]
        return rest
    # MySQL: no RETURNING; one DELETE per queue, so that its row count is that queue's.
    by_queue: dict[str, list[ReservedJob]] = {}
    for job in plain:
        by_queue.setdefault(job.queue, []).append(job)
    for queue, group in by_queue.items():
        result = await conn.execute(delete(t.queue_jobs).where(t.held(group), _SIMPLE))
        deleted = int(result.rowcount)
        if deleted:
            counted[(queue, status)] += deleted
        if deleted < len(group):
            rest += group  # the general path matches only those still stored
    return rest


_records_table = t.queue_job_records
_RECORD_COLUMNS = [c.name for c in _records_table.columns]
_COPIES: dict[str, Any] = {}
_STATEMENTS: dict[tuple[str, str], Any] = {}


def _statement(dialect: str, name: str) -> Any:
    """`_ack_plain`'s statements for a batch of one queue and try count (`sql_tables.HELD_ONE`),
    built once per dialect: "copy" (the records) and "delete" (the rows, returning their ids)."""
    cached = _STATEMENTS.get((dialect, name))
    if cached is None:
        if name == "copy":
            copy = _copied_records().where(t.HELD_ONE, _SIMPLE)
            cached = _copy_statement(dialect).from_select(_RECORD_COLUMNS, copy)
        else:
            removal = delete(t.queue_jobs).where(t.HELD_ONE, _SIMPLE)
            cached = removal.returning(_jobs.uuid, _jobs.queue)
        _STATEMENTS[(dialect, name)] = cached
    return cached


def _copy_statement(dialect: str) -> Any:
    """The INSERT that `_ack_plain` adds a SELECT to, replacing an older record of the same
    job (as `write_records` does), for one dialect."""
    cached = _COPIES.get(dialect)
    if cached is not None:
        return cached
    keys = [c.name for c in _records_table.primary_key]
    names = [name for name in _RECORD_COLUMNS if name not in keys]
    if dialect == "sqlite":
        lite = sqlite_insert(_records_table)
        statement: Any = lite.on_conflict_do_update(
            index_elements=keys, set_={n: lite.excluded[n] for n in names}
        )
    else:
        my = mysql_insert(_records_table)
        statement = my.on_duplicate_key_update({n: my.inserted[n] for n in names})
    _COPIES[dialect] = statement
    return statement


# -- push with an id check or a unique key --------------------------------------------------

#: Decides, inside a push, the row to store (or `None`: refused as "full").
Place = Callable[[], Awaitable[Mapping[str, Any] | None]]


async def _stored(conn: AsyncConnection, job_id: str, queue: str) -> Any:
    query = select(*LIVE).where(_jobs.uuid == job_id, _jobs.queue == queue).with_for_update()
    return (await conn.execute(query)).first()


async def _duplicate(
    conn: AsyncConnection, holder: Row[Any], job: OutgoingJob, *, replaceable: bool
) -> Pushed:
    if job.on_duplicate == "reject":
        return Pushed(holder.uuid, "duplicate")
    if job.on_duplicate == "replace" and replaceable:
        values = _replacement(job)
        await conn.execute(update(t.queue_jobs).where(_jobs.id == holder.id).values(**values))
        return Pushed(holder.uuid, "replaced")
    return Pushed(holder.uuid, "kept")


def _replacement(job: OutgoingJob) -> dict[str, Any]:
    """What a waiting holder takes of a duplicate that replaces it: it keeps its id, tries,
    place in the queue and due time."""
    values: dict[str, Any] = {"payload": job.payload.decode("utf-8")}
    if job.job:
        values["job"] = job.job
    if job.max_tries is not None:
        values["max_tries"] = job.max_tries
    return values


async def _check_id(
    conn: AsyncConnection, job: OutgoingJob, now: datetime, ender: _Ender
) -> Pushed | None:
    """The outcome if a job with this id is waiting or running on its queue; `None` if the id
    is free (an ended job's record is dropped)."""
    row = await _stored(conn, job.id, job.queue)
    if row is not None:
        state = live_state(row, now)
        if state in ("waiting", "running"):
            return await _duplicate(conn, row, job, replaceable=state == "waiting")
        await ender.end(row, state)  # ended without anyone writing it: write it now
    await forget_record(conn, job.id, job.queue)
    return None


async def forget_record(conn: AsyncConnection, job_id: str, queue: str) -> None:
    """Drop an ended job's record: a new job with its id starts afresh."""
    here = (_records.uuid == job_id) & (_records.queue == queue)
    await conn.execute(delete(t.queue_job_records).where(here))


class _Ender:
    """Ends rows found expired or cancelled on the way (see `end_rows`)."""

    def __init__(
        self,
        conn: AsyncConnection,
        now: datetime,
        connection: str,
        default_keep: float,
        counted: Counter[tuple[str, str]],
    ) -> None:
        self.conn, self.now, self.connection, self.keep = conn, now, connection, default_keep
        self.counted = counted

    async def end(self, row: Row[Any], state: str) -> None:
        if state == "expired":
            ending = [(row, Status.EXPIRED, ttl_error(row))]
        else:
            ending = [(row, Status.CANCELLED, "cancelled")]
        await end_rows(self.conn, ending, self.now, self.connection, self.keep, self.counted)


async def _take_key(
    conn: AsyncConnection, job: OutgoingJob, now: datetime, ender: _Ender
) -> Pushed | None:
    """Lock the job's unique key; the outcome if its holder keeps it, `None` once the key
    names this job (the caller stores it)."""
    here = (_keys.queue == job.queue) & (_keys.unique_key == job.unique_key)
    held_until = t.now(job.unique_for) if job.unique_for > 0 else None
    for _ in range(2):
        key = (
            await conn.execute(select(_keys.uuid, _keys.held_until).where(here).with_for_update())
        ).first()
        if key is not None:
            break
        # Nobody stored a job under this key yet (or its row was pruned): take it. A
        # dispatcher doing the same at once makes this insert a no-op: then lock its row.
        taken = await conn.execute(
            insert(t.queue_unique_keys)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("OR IGNORE", dialect="sqlite")
            .values(queue=job.queue, unique_key=job.unique_key, uuid=job.id, held_until=held_until)
        )
        if taken.rowcount:
            return None
    else:  # pragma: no cover - the second look always finds the row the insert ran into
        raise sa_exc.InvalidRequestError(f"unique key {job.unique_key!r} vanished while locked")
    held = key.held_until is not None and key.held_until > now
    holder = await _stored(conn, key.uuid, job.queue)
    if holder is not None and holder.unique_key != job.unique_key:
        holder = None  # the id was reused by a job without this key
    state = "gone" if holder is None else live_state(holder, now)
    if holder is not None and state in ("expired", "cancelled"):
        await ender.end(holder, state)
        holder, state = None, "gone"
    if holder is not None and state == "waiting" and (holder.state == "waiting" or held):
        return await _duplicate(conn, holder, job, replaceable=True)
    if held:
        # Running or ended, and `unique_for` keeps the key: never replaced.
        if job.on_duplicate == "reject":
            return Pushed(key.uuid, "duplicate")
        return Pushed(key.uuid, "kept")
    # Its job started (the key was its only while it waited) or ended: this job takes it.
    await conn.execute(
        update(t.queue_unique_keys).where(here).values(uuid=job.id, held_until=held_until)
    )
    return None


async def push_checked(
    conn: AsyncConnection,
    job: OutgoingJob,
    row: Mapping[str, Any],
    now: datetime,
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
    place: Place | None = None,
) -> Pushed:
    """Push one job with an id check and/or a unique key: checks and store in the caller's
    transaction, so that competing dispatchers decide one after the other. Jobs found ended
    on the way (past their ttl) are counted into `counted`.

    `place`, when given, is asked once, after the checks found no duplicate and before the
    store, for the row to store (a group's turn or line, a bounded queue's count); `None`
    from it refuses the job: outcome "full"."""
    ender = _Ender(conn, now, connection, default_keep, counted)
    placed: Mapping[str, Any] | None = None
    for _ in range(2):
        if job.check_id:
            found = await _check_id(conn, job, now, ender)
            if found is not None:
                return found
        if job.unique_key:
            found = await _take_key(conn, job, now, ender)
            if found is not None:
                return found
        if place is not None and placed is None:
            placed = await place()
            if placed is None:
                return Pushed(job.id, "full")
            row = placed
        try:
            await conn.execute(insert(t.queue_jobs).values(**row))
            return Pushed(job.id)
        except sa_exc.IntegrityError:
            if job.check_id:
                continue  # another dispatcher stored this id meanwhile: check it again
            # Stored already, without an id check: start afresh (as a plain push does).
            here = (_jobs.uuid == job.id) & (_jobs.queue == job.queue)
            await conn.execute(delete(t.queue_jobs).where(here))
            await forget_record(conn, job.id, job.queue)
            await conn.execute(insert(t.queue_jobs).values(**row))
            return Pushed(job.id)
    found = await _check_id(conn, job, now, ender)
    return found if found is not None else Pushed(job.id, "kept")


#: Ids per IN list of `push_checked_many` (MariaDB turns a list of 1000 values or more into a
#: join on a temporary table: `in_predicate_conversion_threshold`).
_IDS_PER_LIST = 500


async def push_checked_many(
    conn: AsyncConnection,
    jobs: Sequence[tuple[OutgoingJob, Mapping[str, Any]]],
    now: datetime,
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
) -> list[Pushed]:
    """`push_checked` of each job in turn, for jobs with an id check and nothing else to check
    or place (no unique key, group, `max_length`, dependencies, once key), in a few statements
    for the lot instead of three per job.

    One look (`FOR UPDATE`, per queue and `_IDS_PER_LIST` ids) finds which ids are stored.
    The jobs whose ids are free are stored at once (`_store_fresh`); a later job of the list
    with one of those ids is their duplicate, decided here as `_duplicate` would decide it
    against a waiting holder. A job whose id is held by a waiting or running job is that
    job's duplicate (`_duplicate`, on the row the look locked: what `_check_id` would read).
    A job whose stored job has ended without anyone writing it goes through `push_checked`
    in its turn (it stores a job), and so do the later jobs with its id, after the insert.
    When another dispatcher stored one of the free ids meanwhile (the insert breaks the
    unique index), nothing of the insert is kept and its jobs go through `push_checked` one
    by one.
    """
    if len(jobs) == 1:
        job, row = jobs[0]
        return [await push_checked(conn, job, row, now, connection, default_keep, counted)]
    found = await _stored_many(conn, [(job.id, job.queue) for job, _ in jobs])
    out = [Pushed(job.id) for job, _ in jobs]
    fresh: dict[tuple[str, str], dict[str, Any]] = {}  # rows of jobs to store at once
    run: list[int] = []  # the jobs `fresh` decides (stored, or duplicates of those stored)
    later: list[int] = []  # jobs left to `push_checked` after the insert, in order
    checked: set[tuple[str, str]] = set()  # ids whose jobs go through `push_checked`

    async def one(n: int) -> None:
        job, row = jobs[n]
        out[n] = await push_checked(conn, job, row, now, connection, default_keep, counted)

    async def store() -> None:
        if fresh and not await _store_fresh(conn, list(fresh.values())):
            for n in run:
                await one(n)
        checked.update(fresh)
        fresh.clear()
        run.clear()

    for n, (job, row) in enumerate(jobs):
        key = (job.id, job.queue)
        if key in fresh:
            out[n] = _fresh_duplicate(fresh[key], job)
            run.append(n)
        elif key in checked:
            later.append(n)
        elif key in found:
            state = live_state(found[key], now)
            if state in ("waiting", "running"):  # as `_check_id` decides, on the row it locked
                out[n] = await _duplicate(conn, found[key], job, replaceable=state == "waiting")
            else:  # ended, though nobody wrote it: written, and this job stored, in its turn
                checked.add(key)
                await store()
                await one(n)
        else:
            fresh[key] = dict(row)
            run.append(n)
    await store()
    for n in later:
        await one(n)
    return out


def _fresh_duplicate(row: dict[str, Any], job: OutgoingJob) -> Pushed:
    """`_duplicate` against a holder the same push is about to store (so waiting): `row`."""
    if job.on_duplicate == "reject":
        return Pushed(job.id, "duplicate")
    if job.on_duplicate == "replace":
        row.update(_replacement(job))
        return Pushed(job.id, "replaced")
    return Pushed(job.id, "kept")


def _id_lists(keys: Sequence[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(queue, ids) pairs covering `keys` (id, queue), up to `_IDS_PER_LIST` ids each."""
    ids: dict[str, list[str]] = {}
    for job_id, queue in keys:
        ids.setdefault(queue, []).append(job_id)
    return [
        (queue, names[start : start + _IDS_PER_LIST])
        for queue, names in ids.items()
        for start in range(0, len(names), _IDS_PER_LIST)
    ]


async def _stored_many(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], Any]:
    """The stored jobs of these ids (id, queue), locked as `_stored` locks one."""
    found: dict[tuple[str, str], Any] = {}
    for queue, ids in _id_lists(sorted(set(keys))):
        query = select(*LIVE).where(_jobs.queue == queue, _jobs.uuid.in_(ids)).with_for_update()
        for row in (await conn.execute(query)).all():
            found[(row.uuid, row.queue)] = row
    return found


async def _store_fresh(conn: AsyncConnection, rows: list[dict[str, Any]]) -> bool:
    """Drop the records of these new jobs' ids and insert them (in list order), under a
    savepoint. `False`, with nothing of it kept, when an id is stored already: another
    dispatcher stored it since it was looked up (its insert committed first)."""
    savepoint = await conn.begin_nested()
    try:
        for queue, ids in _id_lists([(row["uuid"], row["queue"]) for row in rows]):
            here = (_records.queue == queue) & _records.uuid.in_(ids)
            await conn.execute(delete(t.queue_job_records).where(here))
        await conn.execute(insert(t.queue_jobs), _same_columns(rows))
    except sa_exc.IntegrityError:
        await savepoint.rollback()
        return False
    await savepoint.commit()
    return True


def _same_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with every column any of them has (NULL where missing): one multi-row INSERT
    names the columns of its first row."""
    if len(rows) > 1 and any(row.keys() != rows[0].keys() for row in rows):
        names = {name: None for row in rows for name in row}
        return [{**names, **row} for row in rows]
    return rows


# -- plain pushes ---------------------------------------------------------------------------


def job_row(job: OutgoingJob, created: datetime) -> dict[str, Any]:
    """The `queue_jobs` row of a job pushed at `created` (see `sql_tables` for `at_front`)."""
    due = t.now(job.delay) if job.delay > 0 else created
    row: dict[str, Any] = {
        "uuid": job.id,
        "queue": job.queue,
        "payload": job.payload.decode("utf-8"),
        "attempts": 0,
        "available_at": due,
        "created_at": created,
        "reserved_at": None,
        "reserved_until": None,
        "job": job.job or None,
        "max_tries": job.max_tries,
        "state": "waiting",
        "due_at": None,
        # From the due time itself, so that the ttl read back (`ttl_error`) is the one given.
        "expires_at": t.to_db_time(due + timedelta(seconds=job.ttl)) if job.ttl > 0 else None,
        "failure_ttl": job.failure_ttl,
        "unique_key": job.unique_key or None,
    }
    if job.priority:
        row["priority"] = job.priority
        if not job.at_front:
            row.update(t.placement(job.priority, due, created))
    if job.group:
        row["group_key"] = job.group
    if job.limit is not None:
        limit = job.limit
        row["limit_key"] = limit.key
        row["limit_spec"] = f"{limit.rate} {limit.period!r} {limit.burst} {limit.concurrency}"
    if job.at_front and job.delay > 0:
        row["reserved_until"] = due  # a lease nobody holds, ending when it is due
    elif job.at_front:
        row["due_at"] = created  # `available_at` is set in the transaction (`front`)
    return row


async def front(conn: AsyncConnection, queue: str, fronts: dict[str, datetime]) -> datetime:
    """An `available_at` before every ready job of `queue`: one MIN on the claim index per
    queue and push, then a millisecond earlier for each further `at_front` job."""
    if queue in fronts:
        fronts[queue] -= timedelta(milliseconds=1)
        return fronts[queue]
    head = await conn.scalar(
        select(func.min(_jobs.available_at)).where(
            _jobs.queue == queue, _jobs.reserved_until.is_(None)
        )
    )
    at = t.front_time(t.now())
    if head is not None and head <= at:
        at = head - timedelta(milliseconds=1)
    fronts[queue] = at
    return at


async def insert_plain(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Insert jobs without checks in one statement."""
    if not rows:
        return
    rows = _same_columns(rows)
    try:
        await conn.execute(insert(t.queue_jobs), rows)
    except sa_exc.IntegrityError:
        # An id that is already stored (a failed job retried before its worker's late ack
        # landed) starts afresh, so that ack no longer matches: the rare path.
        for row in rows:
            here = (_jobs.uuid == row["uuid"]) & (_jobs.queue == row["queue"])
            if await conn.scalar(select(_jobs.id).where(here)) is not None:
                await conn.execute(delete(t.queue_jobs).where(here))
                await forget_record(conn, row["uuid"], row["queue"])
        await conn.execute(insert(t.queue_jobs), rows)


# -- single jobs ----------------------------------------------------------------------------


async def read_status(
    conn: AsyncConnection, job_id: str, queue: str | None, connection: str
) -> JobStatus | None:
    """The job's status from its `queue_jobs` row, else from its record while it is kept."""
    live = select(*LIVE).where(_jobs.uuid == job_id).order_by(_jobs.id.desc())
    ended = select(t.queue_job_records).where(_records.uuid == job_id)
    if queue is not None:
        live, ended = live.where(_jobs.queue == queue), ended.where(_records.queue == queue)
    now = t.now()
    row = (await conn.execute(live)).first()
    if row is not None:
        found = live_status(row, now, connection)
        if row.deps is not None and not row.kind:
            deps = t.queue_dependencies.c
            query = (
                select(deps.dep_uuid)
                .where(deps.job_uuid == row.uuid, deps.job_queue == row.queue)
                .where(deps.status.is_(None))
                .order_by(deps.seq)
            )
            waiting = tuple(str(dep) for dep in (await conn.scalars(query)).all())
            found = dataclasses.replace(found, waiting_for=waiting)
        return found
    ended = ended.where(_records.keep_until > now).order_by(_records.ended_at.desc())
    record = (await conn.execute(ended)).first()
    return None if record is None else record_status(record)


async def cancel(
    conn: AsyncConnection,
    job_id: str,
    queue: str | None,
    connection: str,
    default_keep: float,
    counted: Counter[tuple[str, str]],
) -> bool:
    """Cancel a stored job: a waiting one ends `cancelled` (counted into `counted`), a running
    one gets `cancel_requested`. `False` if none is stored, or it had expired."""
    query = select(*LIVE).where(_jobs.uuid == job_id).with_for_update()
    if queue is not None:
        query = query.where(_jobs.queue == queue)
    row = (await conn.execute(query)).first()
    if row is None:
        return False
    now = t.now()
    if row.kind:  # a workflow record: its members are cancelled (`sql_workflow`)
        if isinstance(counted, Ends):
            counted.records.append((row.uuid, row.queue))
        return True
    state = live_state(row, now)
    if state == "running":
        if not row.cancel_requested:
            await conn.execute(
                update(t.queue_jobs).where(_jobs.id == row.id).values(cancel_requested=1)
            )
        return True
    if state == "expired":  # ended already, though nobody wrote it: write it now
        ending = [(row, Status.EXPIRED, ttl_error(row))]
    else:
        ending = [(row, Status.CANCELLED, "cancelled")]
    await end_rows(conn, ending, now, connection, default_keep, counted)
    return state != "expired"


async def recent(conn: AsyncConnection, queue: str, window: float) -> RecentCounts:
    """Sums of the per-minute counters (every shard) of the last `window` seconds."""
    first = math.floor((time.time() - window) / 60)
    query = (
        select(_counts.status, func.sum(_counts.count))
        .where(_counts.queue == queue, _counts.minute >= first)
        .group_by(_counts.status)
    )
    totals = {str(status): int(n or 0) for status, n in (await conn.execute(query)).all()}
    return RecentCounts(
        window,
        succeeded=totals.get(Status.SUCCEEDED.value, 0),
        failed=totals.get(Status.FAILED.value, 0),
        cancelled=totals.get(Status.CANCELLED.value, 0),
        expired=totals.get(Status.EXPIRED.value, 0),
        coalesced=totals.get("coalesced", 0),
        dropped=totals.get("dropped", 0),
        rejected=totals.get("rejected", 0),
    )


# -- pruning --------------------------------------------------------------------------------


async def prune_records(conn: AsyncConnection) -> int:
    """Delete up to `PRUNE_BATCH` records past their keep time; returns how many."""
    now = t.now()
    doomed = (
        select(_records.uuid, _records.queue)
        .where(_records.keep_until <= now)
        .order_by(_records.keep_until)
        .limit(PRUNE_BATCH)
    )
    ids = (await conn.execute(doomed)).all()
    if not ids:
        return 0
    named = or_(*(and_(_records.uuid == r.uuid, _records.queue == r.queue) for r in ids))
    result = await conn.execute(
        delete(t.queue_job_records).where(named, _records.keep_until <= now)
    )
    return int(result.rowcount)


def _past(key: tuple[str, str]) -> ColumnElement[bool]:
    """Records after `key` in primary-key order, written as a range on `uuid` (the first
    column of the key) that MariaDB's optimizer, unlike with `(uuid, queue) > (..)`, uses."""
    uuid, queue = key
    return and_(_records.uuid >= uuid, or_(_records.uuid > uuid, _records.queue > queue))


def _up_to(key: tuple[str, str]) -> ColumnElement[bool]:
    """Records up to `key` (included) in primary-key order (see `_past`)."""
    uuid, queue = key
    return and_(_records.uuid <= uuid, or_(_records.uuid < uuid, _records.queue <= queue))


async def prune_ended(
    conn: AsyncConnection, before: datetime, after: tuple[str, str] | None
) -> tuple[int, tuple[str, str] | None]:
    """Delete the records that ended before `before`, whatever their keep time (`queue:prune
    --older-than`), among the next `PRUNE_BATCH` in primary-key order from just past `after`
    (`None`: from the start).

    Returns how many were deleted and the key to go on from (`None`: the end of the table was
    reached). One range of the primary key per batch (read, then deleted where it ended
    before the cutoff): one pass over the table for the whole prune, and no index on
    `ended_at`, which every acknowledgement would have to write. Only ended jobs and
    workflows have records: a waiting, deferred or running job is a `queue_jobs` row, never
    touched here.
    """
    query = select(_records.uuid, _records.queue)
    if after is not None:
        query = query.where(_past(after))
    rows = (
        await conn.execute(query.order_by(_records.uuid, _records.queue).limit(PRUNE_BATCH))
    ).all()
    if not rows:
        return 0, None
    last = (str(rows[-1].uuid), str(rows[-1].queue))
    span = [_up_to(last), _records.ended_at < before]
    if after is not None:
        span.append(_past(after))
    result = await conn.execute(delete(t.queue_job_records).where(*span))
    return int(result.rowcount), (last if len(rows) == PRUNE_BATCH else None)


async def prune_counts(conn: AsyncConnection) -> None:
    """Delete the counters older than `COUNTS_KEPT`."""
    oldest = minute_now() - COUNTS_KEPT // 60
    await conn.execute(delete(t.queue_counts).where(_counts.minute < oldest))


async def prune_keys(conn: AsyncConnection) -> None:
    """Delete up to `PRUNE_BATCH` unique-key rows nobody holds: their job is gone and their
    `unique_for` has passed. Each only if it still names the job it named when read, so that
    a key a dispatcher has just taken again is left alone."""
    now = t.now()
    gone = ~select(_jobs.id).where(_jobs.uuid == _keys.uuid, _jobs.queue == _keys.queue).exists()
    free = or_(_keys.held_until.is_(None), _keys.held_until <= now)
    candidates = select(_keys.queue, _keys.unique_key, _keys.uuid).where(free, gone)
    rows = (await conn.execute(candidates.limit(PRUNE_BATCH))).all()
    if rows:
        named = or_(
            *(
                and_(_keys.queue == r.queue, _keys.unique_key == r.unique_key, _keys.uuid == r.uuid)
                for r in rows
            )
        )
        await conn.execute(delete(t.queue_unique_keys).where(named, free, gone))
