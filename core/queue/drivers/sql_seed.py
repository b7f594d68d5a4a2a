"""Converting RouteMQ's queue tables (the seed implementation) into Topiq's.

RouteMQ created `queue_jobs` (id, queue, payload, attempts, reserved_at, available_at,
created_at) and `queue_failed_jobs` (id, connection, queue, payload, exception, failed_at), the
tables the seed documents, without a job id column. Its payloads are JSON objects

    {"class": "app.jobs.mail.SendMail", "data": {...}, "max_tries": 3, "timeout": 60,
     "retry_after": 0, "queue": "default"}

(`class` is the module path and the class name joined by a dot). `queue:migrate` converts:

1. each seed-shaped table is renamed `routemq_<name>` (its rows stay untouched there);
2. Topiq's table is created under the name;
3. the rows are copied, each job getting an id derived from its table and row number (so a
   copy interrupted half way and run again inserts nothing twice), and each payload becoming a
   Topiq payload where it can; one that cannot be read stays as it was, and the worker that
   takes it records it in the failed store with the reason;
4. the `routemq_` table is dropped.

A waiting job keeps its tries spent and its time; one RouteMQ had reserved is ready again
(stop RouteMQ's workers before converting). Times are taken as UTC, as RouteMQ wrote them.
While seed-shaped or `routemq_` tables remain, the driver refuses to start and says to run
`python main.py queue:migrate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
)

from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import new_record_id

__all__ = ["convert", "convert_payload", "leftovers"]

_BATCH = 500
_PREFIX = "routemq_"

_seed = MetaData()
#: RouteMQ's tables, as they are read once renamed.
_seed_jobs = Table(
    f"{_PREFIX}queue_jobs",
    _seed,
    Column("id", Integer, primary_key=True),
    Column("queue", String(255)),
    Column("payload", Text),
    Column("attempts", Integer),
    Column("reserved_at", DateTime),
    Column("available_at", DateTime),
    Column("created_at", DateTime),
)
_seed_failed = Table(
    f"{_PREFIX}queue_failed_jobs",
    _seed,
    Column("id", Integer, primary_key=True),
    Column("connection", String(255)),
    Column("queue", String(255)),
    Column("payload", Text),
    Column("exception", Text),
    Column("failed_at", DateTime),
)
_PAIRS = ((t.queue_jobs, _seed_jobs), (t.queue_failed_jobs, _seed_failed))


def leftovers(connection: Connection) -> list[str]:
    """The tables a conversion must still deal with: seed-shaped ones, or renamed ones."""
    found = inspect(connection)
    names = set(found.get_table_names())
    out = []
    for ours, seed in _PAIRS:
        if ours.name in names and "uuid" not in {c["name"] for c in found.get_columns(ours.name)}:
            out.append(ours.name)
        if seed.name in names:
            out.append(seed.name)
    return out


def convert(connection: Connection) -> int:
    """Convert whatever `leftovers` lists; returns the number of rows copied.

    Runs inside the migration lock, before the numbered steps (which then find Topiq's two
    tables made).
    """
    found = inspect(connection)
    names = set(found.get_table_names())
    for ours, seed in _PAIRS:
        columns = {c["name"] for c in found.get_columns(ours.name)} if ours.name in names else set()
        if ours.name in names and "uuid" not in columns and seed.name not in names:
            connection.execute(text(f"ALTER TABLE {ours.name} RENAME TO {seed.name}"))
    # Every table, not only these two: an earlier Topiq may have recorded schema version 1
    # over RouteMQ's tables without creating its own.
    t.metadata.create_all(connection, checkfirst=True)
    copied = 0
    names = set(inspect(connection).get_table_names())
    if _seed_jobs.name in names:
        copied += _copy(connection, _seed_jobs, t.queue_jobs, _job_row)
    if _seed_failed.name in names:
        copied += _copy(connection, _seed_failed, t.queue_failed_jobs, _failed_row)
    return copied


def _copy(
    connection: Connection,
    seed: Table,
    ours: Table,
    row_for: Callable[[Any], dict[str, Any]],
) -> int:
    copied, after = 0, -1
    while True:
        rows = connection.execute(
            select(seed).where(seed.c.id > after).order_by(seed.c.id).limit(_BATCH)
        ).all()
        if not rows:
            break
        connection.execute(
            insert(ours)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("OR IGNORE", dialect="sqlite"),
            [row_for(row) for row in rows],
        )
        copied += len(rows)
        after = rows[-1].id
    seed.drop(connection)
    return copied


def _job_id(table: str, row_id: int) -> str:
    """The id of a converted row: the same on every run of the conversion."""
    return hashlib.sha256(f"routemq:{table}:{row_id}".encode()).hexdigest()[:32]


def _time(value: datetime | None) -> datetime:
    return t.to_db_time(value) if value is not None else t.now()


def _job_row(row: Any) -> dict[str, Any]:
    job_id = _job_id("queue_jobs", row.id)
    created = _time(row.created_at)
    return {
        "uuid": job_id,
        "queue": str(row.queue or "default")[:190],
        "payload": convert_payload(row.payload or "", job_id, row.queue, created),
        "attempts": int(row.attempts or 0),
        "reserved_at": None,  # RouteMQ's worker is gone: the job is ready again
        "reserved_until": None,
        "available_at": _time(row.available_at),
        "created_at": created,
    }


def _failed_row(row: Any) -> dict[str, Any]:
    job_id = _job_id("queue_failed_jobs", row.id)
    failed_at = _time(row.failed_at)
    return {
        "uuid": job_id,
        "connection": str(row.connection or "database")[:255],
        "queue": str(row.queue or "default")[:190],
        "payload": convert_payload(row.payload or "", job_id, row.queue, failed_at),
        "exception": row.exception or "",
        "failed_at": failed_at,
        "record_id": new_record_id(),
    }


def convert_payload(raw: str, job_id: str, queue: str | None, created: datetime) -> str:
    """A RouteMQ payload as a Topiq payload; anything else unchanged.

    `{"class": "pkg.mod.Name", "data": {...}, ...}` becomes `{"id", "job": "pkg.mod:Name",
    "queue", "data", "max_tries", "timeout", "retry_after", "created_at"}`. A payload that is
    not JSON, not a RouteMQ object, or Topiq's already, is returned as it is: the worker
    records an unreadable one in the failed store with the reason, nothing is dropped.
    """
    try:
        old = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if not isinstance(old, dict) or "job" in old:
        return raw
    path, data = old.get("class"), old.get("data", {})
    if not isinstance(path, str) or "." not in path.strip(".") or not isinstance(data, dict):
        return raw
    module, _, name = path.rpartition(".")
    envelope = {
        "id": job_id,
        "job": f"{module}:{name}",
        "queue": queue or old.get("queue") or "default",
        "data": data,
        "max_tries": old.get("max_tries", 3),
        "timeout": old.get("timeout", 60),
        "retry_after": old.get("retry_after", 0),
        "created_at": int(created.replace(tzinfo=UTC).timestamp() * 1000),
    }
    return orjson.dumps(envelope).decode()
