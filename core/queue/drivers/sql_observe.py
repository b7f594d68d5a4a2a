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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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

#: What the merge reads of each row (`_merged`): the claim index's columns and what
#: `sql_tables.rank` needs besides.
_KEYS = (_jobs.id, _jobs.reserved_until, _jobs.available_at, _jobs.reserved_at, _jobs.priority)


@dataclass(frozen=True, slots=True)
class _Range:
    """A range of the claim index that holds jobs of one state: its conditions (besides the
    queue), the index's order in it, and the sort key of its rows in the state's order (rows
    in the range's order sort the same way by it). `mixed`: its rows sort among the other
    ranges' rows; the others follow each other, each after the one before."""

    where: tuple[Any, ...]
    order: tuple[Any, ...]
    key: Callable[[Any], Any]
    mixed: bool = False

    def select(self, queue: str, *columns: Any) -> Select[Any]:
        return select(*columns).where(_jobs.queue == queue, *self.where).order_by(*self.order)


_LEASE = (_jobs.reserved_until, _jobs.available_at, _jobs.id)
_READY = (_jobs.available_at, _jobs.id)
_UNLEASED = _jobs.reserved_until.is_(None)


def _ranges(state: str, now: datetime, limited: bool) -> list[_Range]:
    """The ranges of the claim index that hold `state`'s jobs, in the state's order.
    `limited`: the queue has limit keys, so jobs a limit holds back may be stored."""
    if state == "pending":
        ranges = [
            # Ready `at_front` jobs (their time mirrored before `FRONT`), the latest first.
            _Range((_UNLEASED, _jobs.available_at < t.FRONT), _READY, t.rank),
            # Ready jobs of a higher priority, highest first (`sql_tables.priority_time`).
            _Range((_jobs.reserved_until < t.FRONT,), _LEASE, t.rank),
            # Lost leases and due delayed `at_front` or prioritized jobs: each at its place
            # in the claim's order (`sql_tables.rank`); a claim re-places them.
            _Range(
                (_jobs.reserved_until >= t.FRONT, _jobs.reserved_until <= now),
                _LEASE,
                t.rank,
                mixed=True,
            ),
            # Ready jobs of priority 0, in the order they became ready.
            _Range(
                (_UNLEASED, _jobs.available_at >= t.FRONT, _jobs.available_at <= now),
                _READY,
                t.rank,
            ),
            # Ready jobs of a lower priority.
            _Range(
                (_jobs.reserved_until >= t.PRIO_LOW, _jobs.reserved_until < t.PRIO_LOW_END),
                _LEASE,
                t.rank,
            ),
        ]
        if limited:
            # Held back by a limit until a later time, by that time (among the delayed
            # ranges: looked for only in a queue with limit keys).
            ranges += [
                _Range(
                    (
                        _UNLEASED,
                        _jobs.available_at > now,
                        _jobs.available_at < t.LINE,
                        _jobs.held.is_not(None),
                    ),
                    _READY,
                    lambda row: (2, row.available_at, row.id),
                    mixed=True,
                ),
                _Range(
                    (
                        _jobs.reserved_until > now,
                        _jobs.reserved_until < t.PRIO_LOW,
                        _jobs.reserved_at.is_(None),
                        _jobs.held.is_not(None),
                    ),
                    _LEASE,
                    lambda row: (2, row.reserved_until, row.id),
                    mixed=True,
                ),
            ]
        # In a group's line (`sql_groups`): not claimable before its turn.
        ranges.append(
            _Range(
                (_UNLEASED, _jobs.available_at >= t.LINE, _jobs.available_at <= t.LINE_FRONT),
                _READY,
                lambda row: (3, row.available_at, row.id),
            )
        )
        return ranges
    if state == "delayed":
        return [
            _Range(
                (
                    _UNLEASED,
                    _jobs.available_at > now,
                    _jobs.available_at < t.LINE,
                    _jobs.held.is_(None),
                ),
                _READY,
                lambda row: (row.available_at, row.id),
            ),
            # Delayed `at_front` or prioritized jobs: a lease nobody holds (`sql_tables`).
            _Range(
                (
                    _jobs.reserved_until > now,
                    _jobs.reserved_until < t.PRIO_LOW,
                    _jobs.reserved_at.is_(None),
                    _jobs.held.is_(None),
                ),
                _LEASE,
                lambda row: (row.reserved_until, row.id),
                mixed=True,
            ),
        ]
    if state == "reserved":
        where = (_jobs.reserved_until > now, _jobs.reserved_until < t.PRIO_LOW)
        running = (*where, _jobs.reserved_at.is_not(None))
        return [_Range(running, _LEASE, lambda row: (row.reserved_until, row.id))]
    if state == "deferred":
        # Deferred jobs and workflow records share `DEFERRED`; id order is push order.
        waiting = (_UNLEASED, _jobs.available_at == t.DEFERRED, _jobs.kind.is_(None))
        return [_Range(waiting, (_jobs.id,), lambda row: (row.id,))]
    raise ValueError(f"state must be one of {', '.join(_STATES)}, got {state!r}")


async def _merged(
    conn: AsyncConnection, queue: str, ranges: Sequence[_Range], offset: int, limit: int
) -> list[int]:
    """The page's row ids when some rows sort among other ranges' rows: the first
    `offset + limit` rows of every range, sorted by their keys, cut."""
    ranked: list[tuple[Any, int]] = []
    for part in ranges:
        query = part.select(queue, *_KEYS).limit(offset + limit)
        ranked += [(part.key(row), row.id) for row in (await conn.execute(query)).all()]
    ranked.sort(key=lambda pair: pair[0])
    return [row_id for _, row_id in ranked[offset : offset + limit]]


async def _chained(
    conn: AsyncConnection, queue: str, ranges: Sequence[_Range], offset: int, limit: int
) -> list[int]:
    """The page's row ids when the ranges follow each other: a range the offset passes is
    counted (at most `offset` index entries), the page read with OFFSET and LIMIT."""
    page: list[int] = []
    for part in ranges:
        if offset:
            skipped = part.select(queue, _jobs.id).limit(offset).subquery()
            n = int(await conn.scalar(select(func.count()).select_from(skipped)) or 0)
            if n < offset:
                offset -= n
                continue
        query = part.select(queue, _jobs.id).offset(offset).limit(limit - len(page))
        page += [int(row_id) for row_id in (await conn.scalars(query)).all()]
        offset = 0
        if len(page) >= limit:
            break
    return page


async def browse(
    conn: AsyncConnection,
    queue: str,
    state: str,
    offset: int,
    limit: int,
    connection: str,
) -> list[JobStatus]:
    """Up to `limit` jobs of `queue` in `state` from `offset`, as their statuses.

    When no row of a `mixed` range is stored (the usual case), the ranges follow each other
    and the page is read with OFFSET (`_chained`); otherwise rows are merged (`_merged`)."""
    check_page(offset, limit)
    now = t.now()
    limits = t.queue_limits.c
    limited = False
    if state == "pending":
        keys = select(limits.limit_key).where(limits.queue == queue).limit(1)
        limited = (await conn.scalar(keys)) is not None
    ranges = _ranges(state, now, limited)
    if not limit:
        return []
    mixed = False
    for part in ranges:
        if part.mixed:
            found = await conn.scalar(part.select(queue, _jobs.id).limit(1))
            mixed = mixed or found is not None
    if mixed:
        page = await _merged(conn, queue, ranges, offset, limit)
    else:
        page = await _chained(conn, queue, [p for p in ranges if not p.mixed], offset, limit)
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
