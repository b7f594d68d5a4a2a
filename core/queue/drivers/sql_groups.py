"""Groups and bounded queues on the queue tables (schema version 5).

Used by `database.DatabaseDriver` inside its transactions; nothing here opens one.

Groups: one job per queue and group is in turn (its "holder": ready, scheduled, retrying,
held by a limit or running); the others wait in the group's line.

* `queue_groups` holds, per queue and group, the holder's id and the last line place handed
  out (`seq`). Its row is locked (`FOR UPDATE`; SQLite has one writer) by every push into
  the group and by every end of its holder, so that two workers ending and pushing at once
  decide one after the other: never two jobs of a group claimable.
* A job in a line is a `queue_jobs` row with `group_seq` (its place), stored like a deferred
  job (`available_at` = `LINE`, in the year 9998, no lease): no claim of this release or the
  one before ever takes it. `due_at` keeps its own due time (push time + delay).
* When the holder ends (ack, cancel, expiry, a dependency cascade, a drop), the ends of the
  transaction name it (`sql_lifecycle.Ends.turns`) and `pass_turns` hands the turn to the
  line's first job: ready now (behind the jobs already ready: fair between groups) or
  scheduled until its own due time; the ends of one transaction are passed together, in a
  few statements per queue (a worker acknowledges a batch). A retry, a refund, a lost lease
  or a limit holding the holder back change nothing here: it keeps the turn.
* A holder whose row is gone without passing the turn (acknowledged by the release before
  version 5 during a rolling deploy) is found by the next push into its group, or by
  `prune`, which hands the turn on.

Bounded queues (`OutgoingJob.max_length`): a push with a bound locks its queue's
`queue_names` row, so that bounded pushes of one queue count one after the other (pushes
without a bound lock nothing), then counts the waiting jobs (`admit`, `waiting`): ranges of
the claim index, read from the index alone but for the rows under a real-time lease (running
jobs, delayed `at_front` or prioritized ones), so that no stored counter costs every push and
claim a write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Row,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import OutgoingJob
from core.status import Status

__all__ = [
    "admit",
    "enter",
    "enter_many",
    "line_row",
    "lock_queue",
    "pass_turn",
    "pass_turns",
    "prune",
    "reset",
    "waiting",
]

_jobs = t.queue_jobs.c
_groups = t.queue_groups.c
_names = t.queue_names.c


def _here(queue: str, group: str) -> Any:
    return (_groups.queue == queue) & (_groups.group_key == group)


async def _lock(conn: AsyncConnection, queue: str, group: str) -> Any:
    """The group's row, locked; made (no holder, empty line) if there is none."""
    query = select(_groups.holder, _groups.seq).where(_here(queue, group)).with_for_update()
    for _ in range(2):
        row = (await conn.execute(query)).first()
        if row is not None:
            return row
        # A dispatcher making it at once makes this insert a no-op: then lock its row.
        await conn.execute(
            insert(t.queue_groups)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("OR IGNORE", dialect="sqlite")
            .values(queue=queue, group_key=group, holder=None, seq=0)
        )
    raise AssertionError(f"group {group!r} vanished while locked")  # pragma: no cover


async def _stored(conn: AsyncConnection, queue: str, job_id: str) -> bool:
    query = select(_jobs.id).where(_jobs.uuid == job_id, _jobs.queue == queue)
    return (await conn.scalar(query)) is not None


async def _head(conn: AsyncConnection, queue: str, group: str) -> Any:
    """The first job of the group's line, locked (the caller holds the group's row)."""
    query = (
        select(*life.LIVE)
        .where(_jobs.queue == queue, _jobs.group_key == group, _jobs.group_seq.is_not(None))
        .order_by(_jobs.group_seq)
        .limit(1)
        .with_for_update()
    )
    return (await conn.execute(query)).first()


async def _promote(conn: AsyncConnection, queue: str, group: str, now: datetime) -> str | None:
    """Hand the turn to the line's first job (ready now, or at its own due time); the new
    holder's id, or `None` when the line is empty (the group is then empty)."""
    head = await _head(conn, queue, group)
    holder = None if head is None else str(head.uuid)
    if head is not None:
        values = await _taking(conn, queue, head, now)
        await conn.execute(update(t.queue_jobs).where(_jobs.id == head.id).values(**values))
    await conn.execute(update(t.queue_groups).where(_here(queue, group)).values(holder=holder))
    return holder


async def enter(
    conn: AsyncConnection, queue: str, group: str, job_id: str, now: datetime
) -> int | None:
    """A job enters its group: `None` when it takes the turn (the group was empty), else its
    place in the line (the caller stores it with `line_row`)."""
    state = await _lock(conn, queue, group)
    holder = state.holder
    if holder is not None and not await _stored(conn, queue, holder):
        holder = await _promote(conn, queue, group, now)  # it ended without passing the turn
    if holder is None:
        await conn.execute(update(t.queue_groups).where(_here(queue, group)).values(holder=job_id))
        return None
    seq = int(state.seq) + 1
    await conn.execute(update(t.queue_groups).where(_here(queue, group)).values(seq=seq))
    return seq


async def _taking(conn: AsyncConnection, queue: str, head: Any, now: datetime) -> dict[str, Any]:
    """The columns of the line's first job as it takes the turn: ready now (behind the jobs
    ready already, or before them if it was pushed `at_front`), or scheduled until its own
    due time."""
    due = max(head.due_at or now, now)
    values: dict[str, Any] = {"group_seq": None, "due_at": None, "reserved_at": None}
    if head.available_at != t.LINE_FRONT:
        values.update(t.placement(head.priority or 0, due, now))
    elif due > now:  # a delayed `at_front` job: a lease nobody holds (see `sql_tables`)
        values.update(available_at=due, reserved_until=due)
    else:
        front = await life.front(conn, queue, {})
        values.update(available_at=front, reserved_until=None, due_at=now)
    return values


def line_row(row: Mapping[str, Any], seq: int, at_front: bool = False) -> dict[str, Any]:
    """The `queue_jobs` row of a job waiting at place `seq` of its group's line: never
    claimable, its own due time kept in `due_at`."""
    return {
        **row,
        "due_at": row["available_at"],  # the due time `job_row` computed
        "available_at": t.LINE_FRONT if at_front else t.LINE,
        "reserved_until": None,
        "reserved_at": None,
        "group_seq": seq,
    }


async def enter_many(
    conn: AsyncConnection, jobs: Sequence[tuple[OutgoingJob, dict[str, Any]]], now: datetime
) -> list[dict[str, Any]]:
    """`enter` for the jobs of one push call (no checks, no bound), in a few statements per
    queue: the rows to store, in order (the group's turn as given, or a line place)."""
    out = [row for _, row in jobs]
    by_queue: dict[str, list[int]] = {}
    for n, (job, _) in enumerate(jobs):
        by_queue.setdefault(job.queue, []).append(n)
    for queue, members in sorted(by_queue.items()):
        names = sorted({jobs[n][0].group for n in members})
        state = await _lock_many(conn, queue, names)
        holders = {g: h for g, (h, _) in state.items() if h is not None}
        if holders:
            query = select(_jobs.uuid).where(
                _jobs.queue == queue, _jobs.uuid.in_(sorted(set(holders.values())))
            )
            alive = {str(u) for u in (await conn.scalars(query)).all()}
            for group, holder in holders.items():
                if holder not in alive:  # it ended without passing the turn
                    state[group] = (await _promote(conn, queue, group, now), state[group][1])
        before = dict(state)
        for n in members:
            job = jobs[n][0]
            turn, seq = state[job.group]
            if turn is None:
                state[job.group] = (job.id, seq)
            else:
                state[job.group] = (turn, seq + 1)
                out[n] = line_row(out[n], seq + 1, job.at_front)
        changed = sorted(g for g in names if state[g] != before[g])
        if changed:
            key = _groups.group_key
            await conn.execute(
                update(t.queue_groups)
                .where(_groups.queue == queue, key.in_(changed))
                .values(
                    holder=case({g: state[g][0] for g in changed}, value=key),
                    seq=case({g: state[g][1] for g in changed}, value=key),
                )
            )
    return out


async def _lock_many(
    conn: AsyncConnection, queue: str, names: Sequence[str]
) -> dict[str, tuple[str | None, int]]:
    """The rows of these groups of `queue`, locked in key order (made where missing):
    group -> (holder, seq)."""
    query = (
        select(_groups.group_key, _groups.holder, _groups.seq)
        .where(_groups.queue == queue, _groups.group_key.in_(names))
        .order_by(_groups.group_key)
        .with_for_update()
    )
    found = {str(r.group_key): (r.holder, int(r.seq)) for r in (await conn.execute(query)).all()}
    missing = [g for g in names if g not in found]
    if missing:
        await conn.execute(
            insert(t.queue_groups)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("OR IGNORE", dialect="sqlite"),
            [{"queue": queue, "group_key": g, "holder": None, "seq": 0} for g in missing],
        )
        found = {
            str(r.group_key): (r.holder, int(r.seq)) for r in (await conn.execute(query)).all()
        }
    return found


async def pass_turns(conn: AsyncConnection, turns: Sequence[tuple[str, str, str]]) -> None:
    """`pass_turn` for every (queue, group, ended job) of a transaction, in a few statements
    per queue: the group rows locked in key order, the heads of their lines read in one
    statement, the heads and the holders updated in one statement each."""
    now = t.now()
    ended: dict[str, dict[str, set[str]]] = {}
    for queue, group, job_id in turns:
        ended.setdefault(queue, {}).setdefault(group, set()).add(job_id)
    for queue, by_group in sorted(ended.items()):
        if len(by_group) == 1:
            [(group, ids)] = by_group.items()
            for job_id in sorted(ids):
                await pass_turn(conn, queue, group, job_id)
            continue
        state = await _lock_many_existing(conn, queue, sorted(by_group))
        passing = sorted(g for g, holder in state.items() if holder in by_group[g])
        if not passing:
            continue
        heads = {str(row.group_key): row for row in await _heads(conn, queue, passing)}
        ready = [
            row.id
            for row in heads.values()
            if not row.priority and row.available_at == t.LINE and _due(row, now) <= now
        ]
        if ready:  # the usual case, in one statement
            values = {"group_seq": None, "due_at": None, **t.placement(0, now, now)}
            await conn.execute(update(t.queue_jobs).where(_jobs.id.in_(ready)).values(**values))
        for row in heads.values():
            if row.id not in ready:
                values = await _taking(conn, queue, row, now)
                await conn.execute(update(t.queue_jobs).where(_jobs.id == row.id).values(values))
        params: dict[str, Any] = {"turns_queue": queue}
        for n, group in enumerate(passing):
            params[f"turns_g{n}"] = group
            params[f"turns_h{n}"] = str(heads[group].uuid) if group in heads else None
        await conn.execute(_holders_statement(len(passing)), params)


_HOLDERS: dict[int, Any] = {}


def _holders_statement(count: int) -> Any:
    """The UPDATE that gives `count` groups of one queue their new holders (NULL: none),
    built once per count (see `_heads_statement`)."""
    cached = _HOLDERS.get(count)
    if cached is None:
        key = _groups.group_key
        names: list[Any] = [bindparam(f"turns_g{n}") for n in range(count)]
        holder = case(
            *((key == names[n], bindparam(f"turns_h{n}")) for n in range(count)),
            else_=null(),
        )
        cached = _HOLDERS[count] = (
            update(t.queue_groups)
            .where(_groups.queue == bindparam("turns_queue"), key.in_(names))
            .values(holder=holder)
        )
    return cached


def _due(row: Any, now: datetime) -> datetime:
    due: datetime = max(row.due_at or now, now)
    return due


async def _lock_many_existing(
    conn: AsyncConnection, queue: str, names: Sequence[str]
) -> dict[str, str | None]:
    query = (
        select(_groups.group_key, _groups.holder)
        .where(_groups.queue == queue, _groups.group_key.in_(names))
        .order_by(_groups.group_key)
        .with_for_update()
    )
    return {str(r.group_key): r.holder for r in (await conn.execute(query)).all()}


_HEADS: dict[tuple[str, int], Any] = {}


def _heads_statement(dialect: str, count: int) -> Any:
    """The statement of `_heads` for `count` groups, built once per dialect and count (its
    queue and groups are parameters), so that each use only binds them."""
    cached = _HEADS.get((dialect, count))
    if cached is not None:
        return cached
    queue: Any = bindparam("heads_queue")
    parts = [
        select(
            _jobs.id,
            _jobs.uuid,
            _jobs.group_key,
            _jobs.priority,
            _jobs.due_at,
            _jobs.available_at,
        )
        .where(
            _jobs.group_key == bindparam(f"heads_{n}"),
            _jobs.queue == queue,
            _jobs.group_seq.is_not(None),
        )
        .order_by(_jobs.group_seq)
        .limit(1)
        .with_for_update()
        for n in range(count)
    ]
    if count == 1:
        statement: Any = parts[0]
    elif dialect == "sqlite":
        statement = union_all(*(select(part.subquery()) for part in parts))
    else:
        statement = union_all(*parts)
    _HEADS[(dialect, count)] = statement
    return statement


async def _heads(conn: AsyncConnection, queue: str, names: Sequence[str]) -> list[Row[Any]]:
    """The first job of each group's line, locked: one statement of limited parts, each
    walking `queue_jobs_group_line` (as the claim does with its index)."""
    query = _heads_statement(conn.dialect.name, len(names))
    params = {"heads_queue": queue, **{f"heads_{n}": name for n, name in enumerate(names)}}
    return list((await conn.execute(query, params)).all())


async def pass_turn(conn: AsyncConnection, queue: str, group: str, ended: str) -> bool:
    """The job `ended` of the group has ended: if it held the turn, the line's first job
    takes it. Whether a job became ready or scheduled."""
    query = select(_groups.holder).where(_here(queue, group)).with_for_update()
    state = (await conn.execute(query)).first()
    if state is None or state.holder != ended:
        return False
    return await _promote(conn, queue, group, t.now()) is not None


# -- bounded queues -------------------------------------------------------------------------


async def lock_queue(conn: AsyncConnection, queue: str) -> None:
    """Lock the queue's `queue_names` row (made if missing): bounded pushes of one queue
    count one after the other."""
    query = select(_names.name).where(_names.name == queue).with_for_update()
    if (await conn.execute(query)).first() is None:
        await conn.execute(
            insert(t.queue_names)
            .prefix_with("IGNORE", dialect="mysql")
            .prefix_with("OR IGNORE", dialect="sqlite")
            .values(name=queue, created_at=t.now())
        )
        await conn.execute(query)


async def waiting(conn: AsyncConnection, queue: str, most: int) -> int:
    """The queue's waiting jobs (ready, scheduled, retrying, held by a limit, in a group's
    line; not running, not deferred, not workflow records), counted up to `most`.

    Ranges of the claim index (see `sql_tables`): no lease and before `DEFERRED` (priority 0
    ready or scheduled, retrying, parked by a limit, in a line); the priority times (ready
    prioritized jobs); and real-time leases nobody holds (due later: `at_front`,
    prioritized or held by a rate), the only part that reads rows (running jobs' too)."""
    here = _jobs.queue == queue
    until = _jobs.reserved_until
    plain = (
        select(_jobs.id)
        .where(here, until.is_(None), _jobs.available_at < t.DEFERRED)
        .limit(most)
        .subquery()
    )
    count = select(func.count()).select_from(plain).scalar_subquery()
    high = select(func.count()).where(here, until < t.FRONT).scalar_subquery()
    low = (
        select(func.count())
        .where(here, until >= t.PRIO_LOW, until < t.PRIO_LOW_END)
        .scalar_subquery()
    )
    later = (
        select(func.count())
        .where(here, until >= t.FRONT, until < t.PRIO_LOW, _jobs.reserved_at.is_(None))
        .scalar_subquery()
    )
    row = (await conn.execute(select(count, high, low, later))).one()
    return sum(int(n or 0) for n in row)


async def admit(
    conn: AsyncConnection,
    job: OutgoingJob,
    now: datetime,
    connection: str,
    default_keep: float,
    ends: life.Ends,
) -> bool:
    """Whether `job` may be stored under its queue's `max_length`; with "drop_oldest" a full
    queue drops one waiting job (the first of this job's group's line, else the head of the
    ready priority-0 jobs) to make room. `False`: refused ("full")."""
    await lock_queue(conn, job.queue)
    if job.group:
        await _lock(conn, job.queue, job.group)  # before its line's head (see `enter`)
    if await waiting(conn, job.queue, job.max_length) < job.max_length:
        return True
    if job.overflow != "drop_oldest":
        return False
    victim = await _head(conn, job.queue, job.group) if job.group else None
    if victim is None:
        query = (
            select(*life.LIVE)
            .where(
                _jobs.queue == job.queue,
                _jobs.reserved_until.is_(None),
                _jobs.available_at >= t.FRONT,  # not an `at_front` job
                _jobs.available_at <= t.now(),  # not `now`: this push may have waited
            )
            .order_by(_jobs.available_at, _jobs.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        victim = (await conn.execute(query)).first()
    if victim is None:
        return False
    error = f"dropped: queue {job.queue} is full ({job.max_length} waiting)"
    await life.end_rows(
        conn, [(victim, Status.CANCELLED, error)], now, connection, default_keep, ends, "dropped"
    )
    return True


# -- clear and prune ------------------------------------------------------------------------


async def reset(conn: AsyncConnection, queue: str, *, before: bool) -> None:
    """Around `clear`: `before`, lock the queue's groups (so that no push adds to a line
    being cleared); after, forget the groups whose holder was cleared (their lines were)."""
    if before:
        mine = select(_groups.group_key).where(_groups.queue == queue)
        await conn.execute(mine.with_for_update())
        return
    held = select(_jobs.id).where(_jobs.uuid == _groups.holder, _jobs.queue == queue)
    await conn.execute(delete(t.queue_groups).where(_groups.queue == queue, ~exists(held)))


async def prune(conn: AsyncConnection) -> int:
    """Delete up to `PRUNE_BATCH` rows of empty groups, and hand on the turn of groups whose
    holder is gone without passing it (see the module notes). Returns the rows deleted."""
    holder = (_jobs.uuid == _groups.holder) & (_jobs.queue == _groups.queue)
    held = exists(select(_jobs.id).where(holder))
    idle = select(_groups.queue, _groups.group_key).where(_groups.holder.is_(None))
    rows = (await conn.execute(idle.limit(life.PRUNE_BATCH))).all()
    deleted = 0
    if rows:
        named = or_(*(and_(_here(row.queue, row.group_key)) for row in rows))
        result = await conn.execute(delete(t.queue_groups).where(named, _groups.holder.is_(None)))
        deleted = int(result.rowcount)
    stale = select(_groups.queue, _groups.group_key, _groups.holder).where(
        _groups.holder.is_not(None), ~held
    )
    now = t.now()
    for row in (await conn.execute(stale.limit(life.PRUNE_BATCH))).all():
        state = await _lock(conn, row.queue, row.group_key)
        if state.holder == row.holder and not await _stored(conn, row.queue, row.holder):
            await _promote(conn, row.queue, row.group_key, now)
    return deleted
