"""The database queue's tables, as SQLAlchemy Core `Table` objects, and its clock.

Every time is stored as naive UTC with millisecond precision (`DATETIME(3)` on MySQL/MariaDB,
an ISO string on SQLite, which compares correctly because every value has the same format).
Times come from the Python clock of the process that writes them, so hosts sharing a database
must keep their clocks in sync (NTP): a lease is `reserved_until`, compared with another host's
"now".

`queue_jobs` is one row per job that is not finished:

* ready: `reserved_until IS NULL AND available_at <= now`
* delayed: `reserved_until IS NULL AND available_at > now`
* reserved: `reserved_until > now`; once `reserved_until <= now` the lease has expired and the
  job is ready again, ahead of every other job.

Ready jobs are taken in `(available_at, id)` order: the order in which they became ready, then
the order in which they were pushed.

`at_front` jobs (schema version 3) use the same columns, so the claim index serves them as it
serves every job:

* ready now: `available_at` is before 2000-01-01 (their push time mirrored, `front_time`) and
  before the queue's current head, so they come before every other ready job and a later one
  before an earlier one (a stack); `due_at` keeps the real time.
* delayed: stored as a lease that nobody holds (`reserved_at IS NULL`, `reserved_until` = the
  due time). When it is due, the claim takes it with the expired leases, at the head of the
  queue; `stats` counts it as delayed, not reserved.

A job's status while it is stored is read from this row (`state`, the lease, `attempts`);
once it ends, its record moves to `queue_job_records`.

The statements whose shape matters (they must follow an index, or differ per dialect) are
here with the tables: `claim`, `held` and `upsert`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    bindparam,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine

from core.queue.drivers.base import ReservedJob

__all__ = [
    "DEFERRED",
    "FRONT",
    "LINE",
    "LINE_FRONT",
    "PRIO_HIGH",
    "PRIO_LOW",
    "PRIO_LOW_END",
    "claim",
    "from_db_time",
    "front_time",
    "held",
    "is_priority_time",
    "metadata",
    "now",
    "placement",
    "priority_time",
    "queue_counts",
    "queue_dependencies",
    "queue_failed_jobs",
    "queue_groups",
    "queue_job_records",
    "queue_jobs",
    "queue_limits",
    "queue_markers",
    "queue_meta",
    "queue_names",
    "queue_once",
    "queue_schema_version",
    "queue_unique_keys",
    "queue_workers",
    "rank",
    "to_db_time",
    "upsert",
]

_MYSQL = ("mysql", "mariadb")

#: A 64-bit auto-increment key; SQLite only auto-increments `INTEGER PRIMARY KEY` (64-bit).
BigId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
#: Millisecond times: MySQL's plain DATETIME drops the fraction.
Time: TypeEngine[datetime] = DateTime().with_variant(mysql.DATETIME(fsp=3), *_MYSQL)
#: Payloads up to 16 MiB (and beyond): MySQL's TEXT stops at 64 KiB, MEDIUMTEXT just below 16 MiB.
LongText: TypeEngine[str] = Text().with_variant(mysql.LONGTEXT(), *_MYSQL)

# utf8mb4 for any text, binary collation so that queue names and job ids compare exactly as on
# SQLite ("Emails" is not "emails"). VARCHAR(190) keeps an indexed utf8mb4 column under 767 bytes.
_MYSQL_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

metadata = MetaData()

queue_jobs = Table(
    "queue_jobs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("uuid", String(190), nullable=False),  # 36 before schema version 3
    Column("queue", String(190), nullable=False),
    Column("payload", LongText, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("reserved_at", Time, nullable=True),
    Column("reserved_until", Time, nullable=True),
    Column("available_at", Time, nullable=False),
    Column("created_at", Time, nullable=False),
    # Schema version 3 (the job lifecycle): all nullable, so that a release without them still
    # pushes, reserves and acknowledges; a row it wrote reads with these unknown.
    Column("job", Text, nullable=True),  # the class path
    Column("max_tries", Integer, nullable=True),
    Column("worker", String(255), nullable=True),  # the worker of the last try
    Column("state", String(16), nullable=True),  # "queued" or "retrying" while not running
    Column("error", Text, nullable=True),  # why the last try failed
    Column("due_at", Time, nullable=True),  # when it became ready, for an `at_front` job
    Column("expires_at", Time, nullable=True),  # due time + ttl: expires if not started by then
    Column("failure_ttl", Double, nullable=True),  # seconds to keep it cancelled or expired
    Column("unique_key", String(190), nullable=True),  # the key it was pushed with
    Column("cancel_requested", Integer, nullable=True),  # 1: cancel it (it is running)
    # Schema version 4 (workflows and limits): all nullable, so that the release before it
    # still pushes, reserves and acknowledges (see "Workflows" in the module notes).
    Column("priority", Integer, nullable=True),  # NULL: 0
    Column("kind", String(8), nullable=True),  # "chain"/"batch" for a workflow record
    Column("rule", String(16), nullable=True),  # when a job with dependencies may run
    Column("deps", Integer, nullable=True),  # dependencies not ended yet; NULL: not deferred
    Column("dependents", Integer, nullable=True),  # 1: some job depends on this one
    Column("ttl", Double, nullable=True),  # a deferred job's ttl, counted once it is due
    Column("limit_key", String(190), nullable=True),  # the limit its starts count against
    Column("limit_spec", String(120), nullable=True),  # "rate period burst concurrency"
    Column("held", Integer, nullable=True),  # 1: held back by its rate, 2: by concurrency
    Column("workflow", Text, nullable=True),  # a workflow record's counts (JSON)
    # Schema version 5 (groups): nullable, so that the release before still pushes, reserves
    # and acknowledges. `group_key`: the job's group (a turn holder, a job in the line or a
    # deferred one); `group_seq`: its place in the group's line while it waits there (NULL
    # once it holds the turn). A job in a line is stored like a deferred one (at `LINE`,
    # never claimable by any release), with its own due time in `due_at`.
    Column("group_key", String(190), nullable=True),
    Column("group_seq", BigInteger, nullable=True),
    # One job per id and queue (per id before schema version 3); serves lookups by id alone.
    Index("queue_jobs_uuid_unique", "uuid", "queue", unique=True),
    # The claim index. Ready jobs: equality on (queue, reserved_until IS NULL), a range on
    # available_at, rows already in (available_at, id) order: no sort, LIMIT stops the scan.
    # Expired leases: a range on (queue, reserved_until) that skips the NULLs. Also covers
    # COUNTs per state and the MIN()s that `wait` asks for.
    Index("queue_jobs_claim", "queue", "reserved_until", "available_at", "id"),
    # The head of a group's line (schema version 5). SQLite indexes only the jobs in a line;
    # MySQL/MariaDB have no partial index: ungrouped rows all share the NULL prefix. The
    # group first, so that no statement on a whole queue ever prefers it to the claim index.
    Index(
        "queue_jobs_group_line",
        "group_key",
        "queue",
        "group_seq",
        sqlite_where=text("group_seq IS NOT NULL"),
    ),
    **_MYSQL_OPTIONS,
)

queue_failed_jobs = Table(
    "queue_failed_jobs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("uuid", String(190), nullable=False),  # 36 before schema version 3
    Column("connection", String(255), nullable=False),
    Column("queue", String(190), nullable=False),
    Column("payload", LongText, nullable=False),
    Column("exception", LongText, nullable=False),
    Column("failed_at", Time, nullable=False),
    # This failure's own id, new each time the job's record is stored (schema version 2):
    # `queue:retry` deletes a record by it, never a newer failure of the same job.
    Column("record_id", String(32), nullable=False, server_default=""),
    Index("queue_failed_jobs_uuid_unique", "uuid", unique=True),
    Index("queue_failed_jobs_failed_at", "failed_at"),  # newest first; prune
    Index("queue_failed_jobs_queue", "queue", "failed_at"),  # one queue, newest first
    **_MYSQL_OPTIONS,
)

#: Jobs that ended (schema version 3): how, and with what result, until `keep_until`.
queue_job_records = Table(
    "queue_job_records",
    metadata,
    Column("uuid", String(190), primary_key=True),
    Column("queue", String(190), primary_key=True),
    Column("connection", String(255), nullable=False),
    Column("job", Text, nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_tries", Integer, nullable=True),
    Column("enqueued_at", Time, nullable=True),
    Column("due_at", Time, nullable=True),
    Column("started_at", Time, nullable=True),
    Column("ended_at", Time, nullable=False),
    Column("worker", String(255), nullable=True),
    Column("error", Text, nullable=True),
    Column("traceback", LongText, nullable=True),
    Column("result", LongText, nullable=True),  # JSON
    Column("keep_until", Time, nullable=False),
    # Schema version 4: NULL in records the release before wrote ("job", no progress, 0).
    Column("kind", String(8), nullable=True),
    Column("progress", Text, nullable=True),  # a workflow record's counts (JSON)
    Column("priority", Integer, nullable=True),
    Column("group_key", String(190), nullable=True),  # schema version 5
    # Schema version 6: `Outcome.info` (JSON: the job's description and meta); NULL for none,
    # and in records the release before wrote.
    Column("info", LongText, nullable=True),
    Index("queue_job_records_keep_until", "keep_until"),  # prune
    **_MYSQL_OPTIONS,
)

#: Unique keys (schema version 3): the job last stored under each key of a queue, and until
#: when the key stays taken whatever that job does (`unique_for`; NULL: while it waits).
#: A row is never freed eagerly: whether the key is taken is read from its job's row.
queue_unique_keys = Table(
    "queue_unique_keys",
    metadata,
    Column("queue", String(190), primary_key=True),
    Column("unique_key", String(190), primary_key=True),
    Column("uuid", String(190), nullable=False),
    Column("held_until", Time, nullable=True),
    **_MYSQL_OPTIONS,
)

#: How many jobs ended each way per queue and minute (schema version 3), for `recent`. Each
#: driver adds to rows of its own `shard` (random): workers acknowledging at once do not wait
#: for each other's counter row; `recent` sums the shards.
queue_counts = Table(
    "queue_counts",
    metadata,
    Column("queue", String(190), primary_key=True),
    Column("minute", BigInteger, primary_key=True, autoincrement=False),  # epoch minutes
    Column("status", String(16), primary_key=True),
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("count", BigInteger, nullable=False),
    **_MYSQL_OPTIONS,
)

#: Dependencies (schema version 4): one row per (dependent job, dependency), in push order
#: (`seq`); `status` is how the dependency ended once that end was applied to the dependent
#: (NULL: not yet), so an end applied twice counts once. Rows go when the dependent leaves
#: `deferred`.
queue_dependencies = Table(
    "queue_dependencies",
    metadata,
    Column("job_queue", String(190), primary_key=True),
    Column("job_uuid", String(190), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("dep_queue", String(190), nullable=False),
    Column("dep_uuid", String(190), nullable=False),
    Column("status", String(16), nullable=True),
    Index("queue_dependencies_dep", "dep_uuid", "dep_queue"),  # the dependents of a job
    **_MYSQL_OPTIONS,
)

#: Limit state per queue and key (schema version 4): the GCRA theoretical arrival time
#: (epoch seconds), the ids of the key's jobs reserved last (checked against their rows, so
#: the running count never drifts), and the time its concurrency-parked jobs wait until.
queue_limits = Table(
    "queue_limits",
    metadata,
    Column("queue", String(190), primary_key=True),
    Column("limit_key", String(190), primary_key=True),
    Column("tat", Double, nullable=False),
    Column("running", Text, nullable=False),  # JSON list of job ids
    Column("parked_until", Time, nullable=True),
    **_MYSQL_OPTIONS,
)

#: Groups (schema version 5): per queue and group, the job in turn (`holder`; NULL: none, the
#: line is empty) and the last place handed out in its line (`seq`). Its row is the lock that
#: orders every push into the group and every end of its holder (`sql_groups`).
queue_groups = Table(
    "queue_groups",
    metadata,
    Column("queue", String(190), primary_key=True),
    Column("group_key", String(190), primary_key=True),
    Column("holder", String(190), nullable=True),
    Column("seq", BigInteger, nullable=False, default=0),
    **_MYSQL_OPTIONS,
)

#: Once keys (schema version 4): a push per queue and key while the key lives.
queue_once = Table(
    "queue_once",
    metadata,
    Column("queue", String(190), primary_key=True),
    Column("once_key", String(190), primary_key=True),
    Column("uuid", String(190), nullable=False),
    Column("expires_at", Time, nullable=False),
    **_MYSQL_OPTIONS,
)

#: Small named values that expire (schema version 4): a schedule's last tick.
queue_markers = Table(
    "queue_markers",
    metadata,
    Column("name", String(190), primary_key=True),
    Column("value", LongText, nullable=False),  # LongText: schema version 7
    Column("expires_at", Time, nullable=False),
    **_MYSQL_OPTIONS,
)

#: Every queue a job was ever pushed to, so that an emptied queue is still listed.
queue_names = Table(
    "queue_names",
    metadata,
    Column("name", String(190), primary_key=True),
    Column("created_at", Time, nullable=False),
    **_MYSQL_OPTIONS,
)

#: The worker registry: one row per worker, alive until `expires_at`.
queue_workers = Table(
    "queue_workers",
    metadata,
    Column("id", String(190), primary_key=True),
    Column("info", Text, nullable=False),  # WorkerInfo.to_json()
    Column("expires_at", Time, nullable=False),
    **_MYSQL_OPTIONS,
)

#: Small named values: `restart_at` (epoch seconds of the last `queue:restart`).
queue_meta = Table(
    "queue_meta",
    metadata,
    Column("name", String(190), primary_key=True),
    Column("value", Text, nullable=False),
    **_MYSQL_OPTIONS,
)

#: One row per applied migration step (see `sql_migrations`).
queue_schema_version = Table(
    "queue_schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Time, nullable=False),
    **_MYSQL_OPTIONS,
)


def now(offset: float = 0.0) -> datetime:
    """Naive UTC now (plus `offset` seconds), truncated to the millisecond.

    Truncated here because MySQL rounds extra digits: a time written and read back must be
    the time that was compared.
    """
    moment = datetime.now(UTC).replace(tzinfo=None)
    if offset:
        moment += timedelta(seconds=offset)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def to_db_time(moment: datetime) -> datetime:
    """A timezone-aware (or naive UTC) time as the naive UTC millisecond time the tables hold."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def from_db_time(moment: datetime) -> datetime:
    """A time read from the tables, as a timezone-aware UTC time."""
    return moment.replace(tzinfo=UTC)


# -- statements ---------------------------------------------------------------------------------

_jobs = queue_jobs.c
_CLAIMED = (
    _jobs.id,
    _jobs.uuid,
    _jobs.queue,
    _jobs.payload,
    _jobs.attempts,
    _jobs.reserved_until,
    _jobs.available_at,
    # Read from the rows the claim fetches anyway: a job past its ttl, or whose cancel was
    # asked for, is found here instead of being handed out, without another read.
    _jobs.reserved_at,
    _jobs.expires_at,
    _jobs.cancel_requested,
    _jobs.priority,
    _jobs.limit_key,  # the rest of the limit is read only for limited jobs
    _jobs.group_key,  # a turn holder that ends here passes its group's turn
)
#: What ending a claimed row (ttl, cancel) reads besides, by id: its record's columns and
#: whether anything depends on it. Left out of the claim, which every worker runs for every
#: batch: each column of each row is parsed by the client (issue #19: fewer columns, fewer
#: times converted, on the hot path), and these serve only the rare row that ends there.
ENDING = (
    *_CLAIMED,
    _jobs.created_at,
    _jobs.job,
    _jobs.max_tries,
    _jobs.worker,
    _jobs.due_at,
    _jobs.failure_ttl,
    _jobs.dependents,
)

#: Ready `at_front` jobs sort before this time (see the module notes).
FRONT = datetime(2000, 1, 1)


def front_time(moment: datetime) -> datetime:
    """`moment` mirrored before `FRONT`: a later moment gives an earlier time."""
    return FRONT - (moment - FRONT)


#: Ready prioritized jobs are stored as a lease nobody holds (`reserved_at IS NULL`) ending at
#: a time that encodes the priority, so that the claim index orders them: higher priorities
#: before 1900-01-01 (priority p: p milliseconds before it), which the claim's part for
#: expired leases walks first; lower ones from 9000-01-01 (p milliseconds after it), which a
#: third part of the claim walks after the ready jobs. Priority 0 keeps the plain form.
PRIO_HIGH = datetime(1900, 1, 1)
PRIO_LOW = datetime(9000, 1, 1)
PRIO_LOW_END = datetime(9001, 1, 1)
#: The `available_at` of a deferred job or a workflow record: never due, for any release.
DEFERRED = datetime(9999, 1, 1)
#: The `available_at` of a job waiting in its group's line (schema version 5): never due
#: either, and apart from `DEFERRED` so that counts on the claim index tell them apart.
LINE = datetime(9998, 1, 1)
#: The same for a job pushed `at_front`: it goes to the head of the queue when it takes the turn.
LINE_FRONT = datetime(9998, 1, 2)


def priority_time(priority: int) -> datetime:
    """The `reserved_until` of a ready job of this (non-zero) priority."""
    if priority > 0:
        return PRIO_HIGH - timedelta(milliseconds=priority)
    return PRIO_LOW + timedelta(milliseconds=-priority)


def is_priority_time(moment: datetime | None) -> bool:
    """Whether a `reserved_until` is a ready prioritized job's (see `priority_time`)."""
    return moment is not None and (moment < FRONT or PRIO_LOW <= moment < PRIO_LOW_END)


def placement(priority: int, due: datetime, at: datetime) -> dict[str, Any]:
    """The claim columns of a job of `priority` that becomes ready at `due` (now: `at`).

    Priority 0: ready from `available_at`. Otherwise, not yet due: a lease nobody holds
    ending at `due` (the claim promotes it when due); due: its priority's time, with
    `available_at` the moment it became ready (its order within the priority).
    """
    if not priority:
        return {"available_at": due, "reserved_until": None, "reserved_at": None}
    if due > at:
        return {"available_at": due, "reserved_until": due, "reserved_at": None}
    return {"available_at": due, "reserved_until": priority_time(priority), "reserved_at": None}


def rank(row: Any) -> tuple[Any, ...]:
    """Where a claimable row stands: `at_front` jobs, then higher priorities; within one,
    lost leases, then the order in which jobs became ready."""
    p = row.priority or 0
    until = row.reserved_until
    if until is None:
        if row.available_at < FRONT:
            return (0, 0, row.available_at, row.id)
        return (1, -p, 1, row.available_at, row.id)
    if row.reserved_at is not None:  # a lost lease: the head of its priority
        return (1, -p, 0, until, row.id)
    if is_priority_time(until):
        return (1, -p, 1, row.available_at, row.id)
    if not p:  # a delayed `at_front` job, now due
        return (0, 1, until, row.id)
    return (1, -p, 1, until, row.id)  # a delayed prioritized job, now due


_CLAIMS: dict[str, Any] = {}


def _claim_statement(dialect: str) -> Any:
    """The claim's statement for one dialect, with its queue, time and limit as parameters:
    built once, so that each claim only binds them (see `claim`)."""
    here = _jobs.queue == bindparam("claim_queue")
    at = bindparam("claim_at", type_=Time)
    limit = bindparam("claim_limit", type_=Integer)
    expired = (
        select(*_CLAIMED, literal(0).label("part"))
        .where(here, _jobs.reserved_until <= at)
        .order_by(_jobs.reserved_until, _jobs.available_at, _jobs.id)
    )
    ready = (
        select(*_CLAIMED, literal(1).label("part"))
        .where(here, _jobs.reserved_until.is_(None), _jobs.available_at <= at)
        .order_by(_jobs.available_at, _jobs.id)
    )
    low = (
        select(*_CLAIMED, literal(2).label("part"))
        .where(here, _jobs.reserved_until >= PRIO_LOW, _jobs.reserved_until < PRIO_LOW_END)
        .order_by(_jobs.reserved_until, _jobs.available_at, _jobs.id)
    )
    parts = [part.limit(limit).with_for_update(skip_locked=True) for part in (expired, ready, low)]
    if dialect == "sqlite":
        return union_all(*(select(part.subquery()) for part in parts))
    return union_all(*parts)


async def claim(conn: AsyncConnection, queue: str, at: datetime, limit: int) -> list[Row[Any]]:
    """Lock and return up to `limit` rows of `queue` to reserve, front of the queue first.

    One statement of three ordered, limited parts: first jobs whose lease expired (their
    worker died), which also holds ready jobs of a higher priority (`priority_time`) and due
    delayed `at_front` or prioritized jobs; then ready jobs, in the order they became ready;
    then ready jobs of a lower priority. Each part walks `queue_jobs_claim` in its order, so
    the database stops after `limit` rows; SKIP LOCKED passes over rows another transaction
    is claiming. SQLite (one writer, no FOR UPDATE) wants each limited part wrapped in a
    subquery; MySQL/MariaDB in parentheses, which SQLAlchemy writes for them. The rows are
    ordered by `rank`. Prioritized rows fetched but not taken that are due delayed jobs or
    lost leases are put in their priority's place (`placement`), so that they stop taking
    room in the first part.
    """
    query = _CLAIMS.get(conn.dialect.name)
    if query is None:
        query = _CLAIMS[conn.dialect.name] = _claim_statement(conn.dialect.name)
    params = {"claim_queue": queue, "claim_at": at, "claim_limit": limit}
    rows = (await conn.execute(query, params)).all()
    # UNION ALL promises no order: restore it. Rows past `limit` stay locked until the commit.
    ordered = sorted(rows, key=rank)
    for row in ordered[limit:]:
        until = row.reserved_until
        if row.priority and until is not None and not is_priority_time(until):
            due = until if row.reserved_at is None else row.available_at
            await conn.execute(
                update(queue_jobs)
                .where(_jobs.id == row.id)
                .values(placement(row.priority, due, at))
            )
    return ordered[:limit]


def held(jobs: Sequence[ReservedJob]) -> ColumnElement[bool]:
    """Rows still reserved under these reservations: same uuid, queue and try count.

    Grouped by queue and try count, `uuid IN (...)` per group, so that the unique
    `(uuid, queue)` index serves it.
    """
    groups: dict[tuple[str, int], list[str]] = defaultdict(list)
    for job in jobs:
        groups[(job.queue, job.attempts)].append(job.id)
    return and_(
        or_(
            *(
                and_(_jobs.uuid.in_(ids), _jobs.queue == queue, _jobs.attempts == n)
                for (queue, n), ids in groups.items()
            )
        ),
        _jobs.reserved_until.is_not(None),
    )


#: `held` for reservations of one queue and one try count (every job of a usual batch), with
#: the ids, queue and try count as parameters (see `held_one`): a statement built on it once
#: is only bound on each call, not built, keyed and looked up in the compile cache again.
HELD_ONE = and_(
    _jobs.uuid.in_(bindparam("held_ids", expanding=True)),
    _jobs.queue == bindparam("held_queue"),
    _jobs.attempts == bindparam("held_attempts"),
    _jobs.reserved_until.is_not(None),
)


def held_one(jobs: Sequence[ReservedJob]) -> dict[str, Any] | None:
    """The parameters of `HELD_ONE` for `jobs`, or `None` if they are of several queues or
    try counts (then `held` builds the condition)."""
    if not jobs:
        return None
    first = jobs[0]
    queue, attempts = first.queue, first.attempts
    for job in jobs:
        if job.queue != queue or job.attempts != attempts:
            return None
    return {"held_ids": [job.id for job in jobs], "held_queue": queue, "held_attempts": attempts}


async def upsert(conn: AsyncConnection, table: Table, values: Mapping[str, Any]) -> None:
    """Insert a row, or update the row with the same key (`uuid` if the table has one)."""
    if conn.dialect.name == "sqlite":
        key = ["uuid"] if "uuid" in table.c else [c.name for c in table.primary_key]
        lite = sqlite_insert(table).values(**values)
        await conn.execute(lite.on_conflict_do_update(index_elements=key, set_=dict(values)))
    else:
        my = mysql_insert(table).values(**values)
        await conn.execute(my.on_duplicate_key_update(**values))
