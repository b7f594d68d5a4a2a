"""Observing the queue tables (the dashboard, metrics): history, browse, groups.

Used by `database.DatabaseDriver` inside its transactions; nothing here opens one.

* History lives in `queue_counts`, next to the ends `sql_lifecycle.count` writes: the
  `status` column holds the field's name (`succeeded`, ..., `started`, `wait_ms`, ...), each
  writer adds to rows of its own `shard`, and `history` sums the shards of each minute (a
  range of the table's primary key). `prune_counts` drops the minutes older than two hours.
* `browse` walks the claim index (`queue_jobs_claim`: queue, reserved_until, available_at,
  id). A state is a few ranges of it, each read in index order with `LIMIT offset + limit`;
  the ranges' rows are merged in the state's order and the page cut from them. So a page
  costs O(offset + limit) index entries per range, never a scan of the queue; only the page's
  rows are then read in full. Pending jobs come in the order `reserve` hands them out
  (`sql_tables.rank`: `at_front` jobs, higher priorities, lost leases at the head of their
  priority, then the order they became ready), then the jobs a limit holds back until a
  later time (by that time), then the jobs waiting in their group's line (by group order).
  The due leases (lost leases, delayed `at_front` or prioritized jobs now due) are ranked
  among the rows read, as the claim ranks them.
* `groups` pages `queue_groups` by its primary key and counts each listed group's line on
  `queue_jobs_group_line`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, get_args

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import HISTORY_FIELDS, BrowseState, GroupInfo, MinuteCounts
from core.status import JobStatus, Status

__all__ = ["add_history", "browse", "check_page", "groups", "history", "history_rows"]

_jobs = t.queue_jobs.c
_counts = t.queue_counts.c
_groups = t.queue_groups.c

#: Every field of `MinuteCounts` but the minute: the `status` values `history` reads.
_FIELDS = frozenset(MinuteCounts.__dataclass_fields__) - {"minute"}
_STATES: tuple[str, ...] = get_args(BrowseState)


def check_page(offset: int, limit: int) -> None:
    """Refuse an offset or limit that is not a whole number >= 0."""
    for name, value in (("offset", offset), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")


# -- history ------------------------------------------------------------------------------


async def history(conn: AsyncConnection, queue: str, first: int, last: int) -> list[MinuteCounts]:
    """The minutes `first`..`last` of `queue`, oldest first, every shard summed, zeros where
    nothing was counted: one grouped SELECT on a range of the primary key."""
    query = (
        select(_counts.minute, _counts.status, func.sum(_counts.count))
        .where(_counts.queue == queue, _counts.minute >= first, _counts.minute <= last)
        .group_by(_counts.minute, _counts.status)
    )
    found: dict[int, dict[str, int]] = defaultdict(dict)
    for minute, status, n in (await conn.execute(query)).all():
        if status in _FIELDS:
            found[int(minute)][str(status)] = int(n or 0)
    return [MinuteCounts(minute, **found.get(minute, {})) for minute in range(first, last + 1)]


def history_rows(
    rows: Sequence[tuple[str, int, Mapping[str, int]]], shard: int
) -> list[dict[str, Any]]:
    """The `queue_counts` rows that add `rows` (see `Driver.add_history`) in `shard`: one per
    queue, minute and field of `HISTORY_FIELDS` (others ignored, zeros skipped), the same
    key's additions summed, sorted so that every writer locks rows in one order."""
    sums: dict[tuple[str, int, str], int] = defaultdict(int)
    for n, row in enumerate(rows):
        try:
            queue, minute, counts = row
        except (TypeError, ValueError):
            raise ValueError(
                f"history row {n} must be (queue, minute, {{field: count}}), got {row!r}"
            ) from None
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"history row {n}: the queue must be a name, got {queue!r}")
        if isinstance(minute, bool) or not isinstance(minute, int) or minute < 0:
            raise ValueError(f"history row {n}: the minute must be epoch minutes, got {minute!r}")
        if not isinstance(counts, Mapping):
            raise ValueError(f"history row {n}: the counts must be a mapping, got {counts!r}")
        for field, value in counts.items():
            if field not in HISTORY_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"history row {n}: {field} must be a whole number >= 0, got {value!r}"
                )
            if value:
                sums[(queue, minute, field)] += value
    return [
        {"queue": queue, "minute": minute, "status": field, "shard": shard, "count": n}
        for (queue, minute, field), n in sorted(sums.items())
    ]


async def add_history(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Add `rows` (from `history_rows`) to the stored counts: one multi-row upsert."""
    if rows:
        await conn.execute(life.upsert_counts(conn.dialect.name), rows)


# -- browse -------------------------------------------------------------------------------

#: What a part of a state reads of each row before the page is cut: the claim index's
#: columns and what `sql_tables.rank` needs besides.
_KEYS = (_jobs.id, _jobs.reserved_until, _jobs.available_at, _jobs.reserved_at, _jobs.priority)


def _part(queue: str, *where: Any, order: Sequence[Any], limit: int) -> Select[Any]:
    return select(*_KEYS).where(_jobs.queue == queue, *where).order_by(*order).limit(limit)


def _parts(queue: str, state: str, now: datetime, n: int) -> list[tuple[Select[Any], Any]]:
    """The index ranges of `state`, each with its sort key (rows in the order of each range's
    index walk sort the same way by it)."""
    lease = (_jobs.reserved_until, _jobs.available_at, _jobs.id)
    ready = (_jobs.available_at, _jobs.id)
    unleased = _jobs.reserved_until.is_(None)
    if state == "pending":
        return [
            # Higher priorities, then lost leases and due delayed `at_front` or prioritized
            # jobs: the claim's first part (`sql_tables.claim`), cut in two at `FRONT`.
            (_part(queue, _jobs.reserved_until < t.FRONT, order=lease, limit=n), t.rank),
            (
                _part(
                    queue,
                    _jobs.reserved_until >= t.FRONT,
                    _jobs.reserved_until <= now,
                    order=lease,
                    limit=n,
                ),
                t.rank,
            ),
            (_part(queue, unleased, _jobs.available_at <= now, order=ready, limit=n), t.rank),
            (
                _part(
                    queue,
                    _jobs.reserved_until >= t.PRIO_LOW,
                    _jobs.reserved_until < t.PRIO_LOW_END,
                    order=lease,
                    limit=n,
                ),
                t.rank,
            ),
            # Held back by a limit until a later time: among the delayed ranges.
            (
                _part(
                    queue,
                    unleased,
                    _jobs.available_at > now,
                    _jobs.available_at < t.LINE,
                    _jobs.held.is_not(None),
                    order=ready,
                    limit=n,
                ),
                lambda row: (2, row.available_at, row.id),
            ),
            (
                _part(
                    queue,
                    _jobs.reserved_at.is_(None),
                    _jobs.reserved_until > now,
                    _jobs.reserved_until < t.PRIO_LOW,
                    _jobs.held.is_not(None),
                    order=lease,
                    limit=n,
                ),
                lambda row: (2, row.reserved_until, row.id),
            ),
            # In a group's line (`sql_groups`): never claimable until its turn.
            (
                _part(
                    queue,
                    unleased,
                    _jobs.available_at >= t.LINE,
                    _jobs.available_at <= t.LINE_FRONT,
                    order=ready,
                    limit=n,
                ),
                lambda row: (3, row.id),
            ),
        ]
    if state == "delayed":
        return [
            (
                _part(
                    queue,
                    unleased,
                    _jobs.available_at > now,
                    _jobs.available_at < t.LINE,
                    _jobs.held.is_(None),
                    order=ready,
                    limit=n,
                ),
                lambda row: (row.available_at, row.id),
            ),
            # Delayed `at_front` or prioritized jobs: a lease nobody holds (`sql_tables`).
            (
                _part(
                    queue,
                    _jobs.reserved_until > now,
                    _jobs.reserved_until < t.PRIO_LOW,
                    _jobs.reserved_at.is_(None),
                    _jobs.held.is_(None),
                    order=lease,
                    limit=n,
                ),
                lambda row: (row.reserved_until, row.id),
            ),
        ]
    if state == "reserved":
        return [
            (
                _part(
                    queue,
                    _jobs.reserved_until > now,
                    _jobs.reserved_until < t.PRIO_LOW,
                    _jobs.reserved_at.is_not(None),
                    order=lease,
                    limit=n,
                ),
                lambda row: (row.reserved_until, row.id),
            )
        ]
    if state == "deferred":
        # Deferred jobs and workflow records share `DEFERRED`; id order is push order.
        return [
            (
                _part(
                    queue,
                    unleased,
                    _jobs.available_at == t.DEFERRED,
                    _jobs.kind.is_(None),
                    order=(_jobs.id,),
                    limit=n,
                ),
                lambda row: (row.id,),
            )
        ]
    raise ValueError(f"state must be one of {', '.join(_STATES)}, got {state!r}")


async def browse(
    conn: AsyncConnection,
    queue: str,
    state: str,
    offset: int,
    limit: int,
    connection: str,
) -> list[JobStatus]:
    """Up to `limit` jobs of `queue` in `state` from `offset`, as their statuses."""
    check_page(offset, limit)
    now = t.now()
    parts = _parts(queue, state, now, offset + limit)
    if not limit:
        return []
    ranked: list[tuple[Any, int]] = []
    for query, key in parts:
        ranked += [(key(row), row.id) for row in (await conn.execute(query)).all()]
    ranked.sort(key=lambda pair: pair[0])
    page = [row_id for _, row_id in ranked[offset : offset + limit]]
    if not page:
        return []
    query = select(*life.LIVE).where(_jobs.id.in_(page))
    rows = {row.id: row for row in (await conn.execute(query)).all()}
    # The rows ranked, read again by id in the same transaction: the same snapshot.
    out = [life.live_status(rows[row_id], now, connection) for row_id in page if row_id in rows]
    deferred = [s.id for s in out if s.status is Status.DEFERRED]
    if deferred:
        waits = await _waiting_for(conn, queue, deferred)
        out = [replace(s, waiting_for=waits[s.id]) if s.id in waits else s for s in out]
    return out


async def _waiting_for(
    conn: AsyncConnection, queue: str, job_ids: Sequence[str]
) -> dict[str, tuple[str, ...]]:
    """The dependencies not ended yet of deferred jobs of `queue`, each in push order: one
    SELECT on `queue_dependencies`' primary key."""
    deps = t.queue_dependencies.c
    query = (
        select(deps.job_uuid, deps.dep_uuid)
        .where(deps.job_queue == queue, deps.job_uuid.in_(job_ids), deps.status.is_(None))
        .order_by(deps.job_uuid, deps.seq)
    )
    found: dict[str, list[str]] = defaultdict(list)
    for job_id, dep in (await conn.execute(query)).all():
        found[str(job_id)].append(str(dep))
    return {job_id: tuple(d) for job_id, d in found.items()}


# -- groups -------------------------------------------------------------------------------


async def groups(conn: AsyncConnection, queue: str, offset: int, limit: int) -> list[GroupInfo]:
    """Up to `limit` groups of `queue` holding or waiting for a turn, by name, from `offset`:
    a page of `queue_groups`' primary key (a group with no holder has an empty line), then
    one grouped COUNT of the page's lines on `queue_jobs_group_line`. A holder whose job is
    gone (it ended under the release before groups, without passing the turn; the next push
    or prune passes it) shows as "" (none)."""
    check_page(offset, limit)
    if not limit:
        return []
    query = (
        select(_groups.group_key, _groups.holder)
        .where(_groups.queue == queue, _groups.holder.is_not(None))
        .order_by(_groups.group_key)
        .limit(limit)
        .offset(offset)
    )
    rows = (await conn.execute(query)).all()
    if not rows:
        return []
    names = [str(row.group_key) for row in rows]
    lines = select(_jobs.group_key, func.count()).where(
        _jobs.group_key.in_(names), _jobs.queue == queue, _jobs.group_seq.is_not(None)
    )
    waiting = {str(g): int(n) for g, n in (await conn.execute(lines.group_by(_jobs.group_key)))}
    holders = sorted({str(row.holder) for row in rows})
    stored = select(_jobs.uuid).where(_jobs.uuid.in_(holders), _jobs.queue == queue)
    alive = {str(uuid) for uuid in (await conn.scalars(stored)).all()}
    return [
        GroupInfo(
            str(row.group_key),
            str(row.holder) if row.holder in alive else "",
            waiting.get(str(row.group_key), 0),
        )
        for row in rows
    ]
