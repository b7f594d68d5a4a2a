"""Workflows and limits on the queue tables: dependencies, chains and batches, limits, once
keys and markers (schema version 4).

Used by `database.DatabaseDriver` inside its transactions; nothing here opens one.

* A deferred job (or a workflow record) is a `queue_jobs` row with `deps` (its dependencies
  not ended yet) and `available_at` = `sql_tables.DEFERRED`, so that no claim, of this release
  or the one before, ever takes it. `queue_dependencies` holds one row per dependency.
* Every transaction that ends jobs collects the ends of jobs with dependents
  (`sql_lifecycle.Ends.resolve`) and `settle` applies them before it commits: each
  dependent's row is locked (`FOR UPDATE`), the dependency row is marked with how it ended
  only if it was not yet (so an end applied twice counts once), and the dependent is
  released, cancelled or left deferred by its rule. Cancelled dependents and ended workflow
  records are more ends: a work list, not recursion.
* Limits: `queue_limits` holds, per queue and key, the GCRA arrival time and the ids of the
  key's jobs reserved last; the running count is those still reserved (read from their rows),
  so it never drifts. A job the limit holds back is not handed out and keeps its try: held
  by its rate, it is due again when the rate allows; held by concurrency, it is parked until
  a job of its key stops (`release_slots`), or at the latest a lease later.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Row, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from core.queue.drivers import sql_groups as groups
from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import OutgoingJob, Pushed
from core.status import Status

__all__ = [
    "Context",
    "cancel_members",
    "check_limit",
    "claim_marker",
    "find_dependencies",
    "get_marker",
    "get_markers",
    "hold_once",
    "prune_limits",
    "register_dependencies",
    "release_once",
    "set_marker",
    "set_markers",
    "settle",
    "take_once",
    "waiting_for",
]

_jobs = t.queue_jobs.c
_deps = t.queue_dependencies.c
_records = t.queue_job_records.c
_limits = t.queue_limits.c
_once = t.queue_once.c
_markers = t.queue_markers.c

_FAILED = (Status.FAILED.value, Status.EXPIRED.value)


class Context:
    """What ending jobs inside one transaction needs: the connection's name and keep times."""

    def __init__(
        self,
        conn: AsyncConnection,
        connection: str,
        failure_keep: float,
        result_keep: float,
        ends: life.Ends,
    ) -> None:
        self.conn, self.connection = conn, connection
        self.failure_keep, self.result_keep = failure_keep, result_keep
        self.ends = ends
        self.now = t.now()


def _ignore(statement: Any) -> Any:
    return statement.prefix_with("IGNORE", dialect="mysql").prefix_with(
        "OR IGNORE", dialect="sqlite"
    )


async def _lock_job(conn: AsyncConnection, job_id: str, queue: str) -> Any:
    query = select(*life.LIVE).where(_jobs.uuid == job_id, _jobs.queue == queue)
    return (await conn.execute(query.with_for_update())).first()


# -- dependencies ---------------------------------------------------------------------------


async def find_dependencies(
    conn: AsyncConnection, job: OutgoingJob, now: datetime
) -> tuple[list[tuple[str, str, str | None]], str | None]:
    """Each dependency of `job` once, as (id, queue, how it ended or `None` while live), its
    live rows locked; or the id of the first unknown one."""
    found: list[tuple[str, str, str | None]] = []
    seen: set[tuple[str, str | None]] = set()
    for dep in job.depends_on:
        if (dep.id, dep.queue) in seen:
            continue
        seen.add((dep.id, dep.queue))
        query = select(_jobs.uuid, _jobs.queue).where(_jobs.uuid == dep.id)
        if dep.queue is not None:
            query = query.where(_jobs.queue == dep.queue)
        row = (await conn.execute(query.order_by(_jobs.id.desc()).with_for_update())).first()
        if row is not None:
            found.append((dep.id, str(row.queue), None))
            continue
        ended = select(_records.queue, _records.status).where(
            _records.uuid == dep.id, _records.keep_until > now
        )
        if dep.queue is not None:
            ended = ended.where(_records.queue == dep.queue)
        record = (await conn.execute(ended.order_by(_records.ended_at.desc()))).first()
        if record is None:
            return [], dep.id
        found.append((dep.id, str(record.queue), str(record.status)))
    unique: dict[tuple[str, str], str | None] = {}
    for dep_id, queue, status in found:
        unique.setdefault((dep_id, queue), status)
    return [(dep_id, queue, status) for (dep_id, queue), status in unique.items()], None


def deferred_row(row: dict[str, Any], job: OutgoingJob, count: int) -> dict[str, Any]:
    """The `queue_jobs` row of a job that waits for `count` dependencies."""
    due = row["available_at"]  # when its delay ends (`at_front` does not apply then)
    out = {
        **row,
        "available_at": t.DEFERRED,
        "reserved_until": None,
        "reserved_at": None,
        "due_at": due,
        "expires_at": None,
        "ttl": job.ttl or None,
        "deps": count,
        "rule": job.rule,
    }
    if job.kind != "job":
        out["kind"] = job.kind
        out["workflow"] = orjson.dumps(
            {
                "total": count,
                "cof": job.cancel_on_failure,
                "succeeded": 0,
                "failed": 0,
                "cancelled": 0,
            }
        ).decode()
    return out


async def register_dependencies(
    conn: AsyncConnection,
    job: OutgoingJob,
    deps: Sequence[tuple[str, str, str | None]],
    ends: life.Ends,
) -> None:
    """Write the dependency rows of a stored deferred job; the ends of dependencies that had
    ended already are applied by `settle`, as if they had ended now."""
    await conn.execute(
        insert(t.queue_dependencies),
        [
            {
                "job_queue": job.queue,
                "job_uuid": job.id,
                "seq": seq,
                "dep_queue": queue,
                "dep_uuid": dep_id,
                "status": None,
            }
            for seq, (dep_id, queue, _) in enumerate(deps)
        ],
    )
    for dep_id, queue, status in deps:
        if status is None:
            await conn.execute(
                update(t.queue_jobs)
                .where(_jobs.uuid == dep_id, _jobs.queue == queue, _jobs.dependents.is_(None))
                .values(dependents=1)
            )
        else:
            ends.resolve.append((dep_id, queue, status))


async def waiting_for(conn: AsyncConnection, job_id: str, queue: str) -> tuple[str, ...]:
    """The dependencies of a deferred job that have not ended, in push order."""
    query = (
        select(_deps.dep_uuid)
        .where(_deps.job_uuid == job_id, _deps.job_queue == queue, _deps.status.is_(None))
        .order_by(_deps.seq)
    )
    return tuple(str(dep) for dep in (await conn.scalars(query)).all())


async def settle(ctx: Context) -> None:
    """Apply every end collected in `ctx.ends` to the dependents and limits it concerns,
    and what those lead to, until nothing is left."""
    ends = ctx.ends
    while ends.resolve or ends.stopped or ends.turns:
        if ends.stopped:
            stopped, ends.stopped = ends.stopped, []
            await release_slots(ctx.conn, stopped)
            continue
        if ends.turns:
            turns, ends.turns = ends.turns, []
            await groups.pass_turns(ctx.conn, turns)
            continue
        dep_id, queue, status = ends.resolve.pop(0)
        query = (
            select(_deps.job_queue, _deps.job_uuid)
            .where(_deps.dep_uuid == dep_id, _deps.dep_queue == queue, _deps.status.is_(None))
            .order_by(_deps.job_queue, _deps.job_uuid)
        )
        for dependent in (await ctx.conn.execute(query)).all():
            await _resolve(ctx, dependent.job_uuid, dependent.job_queue, dep_id, queue, status)


async def _resolve(
    ctx: Context, job_id: str, job_queue: str, dep_id: str, dep_queue: str, status: str
) -> None:
    conn = ctx.conn
    row = await _lock_job(conn, job_id, job_queue)
    if row is None or row.deps is None:
        return
    marked = await conn.execute(
        update(t.queue_dependencies)
        .where(
            _deps.job_uuid == job_id,
            _deps.job_queue == job_queue,
            _deps.dep_uuid == dep_id,
            _deps.dep_queue == dep_queue,
            _deps.status.is_(None),
        )
        .values(status=status)
    )
    if not marked.rowcount:
        return  # this end was applied already
    left = max(int(row.deps) - int(marked.rowcount), 0)
    if row.kind:
        await _count_member(ctx, row, status, left)
        return
    rule = row.rule or "succeeded"
    if rule == "succeeded" and status != Status.SUCCEEDED.value:
        await _cancel(ctx, row, f"dependency {dep_id} {status}")
    elif rule == "failed" and status in _FAILED:
        await _release(ctx, row)
    elif left == 0 and rule == "failed":
        await _cancel(ctx, row, "no dependency failed")
    elif left == 0:
        await _release(ctx, row)
    else:
        await conn.execute(update(t.queue_jobs).where(_jobs.id == row.id).values(deps=left))


async def _cancel(ctx: Context, row: Row[Any], error: str) -> None:
    await life.end_rows(
        ctx.conn,
        [(row, Status.CANCELLED, error)],
        ctx.now,
        ctx.connection,
        ctx.failure_keep,
        ctx.ends,
    )


async def _release(ctx: Context, row: Row[Any]) -> None:
    """A deferred job becomes ready (or scheduled, if its delay has not passed). Jobs
    released in one step are ready at one time: in push order."""
    now = ctx.now
    due = max(row.due_at or now, now)
    seq = None
    if row.group_key is not None:  # it joins its group now: the turn, or the line's tail
        seq = await groups.enter(ctx.conn, row.queue, row.group_key, row.uuid, now)
    values: dict[str, Any]
    if seq is None:
        values = {"deps": None, "due_at": None, **t.placement(row.priority or 0, due, now)}
    else:  # still never claimable: in the line
        values = {"deps": None, "due_at": due, "group_seq": seq, "available_at": t.LINE}
    if row.ttl:
        values["expires_at"] = t.to_db_time(due + timedelta(seconds=float(row.ttl)))
    await ctx.conn.execute(update(t.queue_jobs).where(_jobs.id == row.id).values(**values))
    await life.forget_dependencies(ctx.conn, row.uuid, row.queue)


async def _count_member(ctx: Context, row: Row[Any], status: str, left: int) -> None:
    """A member of a workflow record ended: count it; the last one ends the record."""
    counts = orjson.loads(row.workflow or "{}")
    name = "failed" if status in _FAILED else status
    counts[name] = int(counts.get(name, 0)) + 1
    conn = ctx.conn
    first_failure = name == "failed" and counts["failed"] == 1
    await conn.execute(
        update(t.queue_jobs)
        .where(_jobs.id == row.id)
        .values(deps=left, workflow=orjson.dumps(counts).decode())
    )
    if first_failure and counts.get("cof") and left:
        await cancel_members(ctx, row.uuid, row.queue, running=False)
        row = await _lock_job(conn, row.uuid, row.queue)
        if row is None or row.deps is None:
            return
        counts, left = orjson.loads(row.workflow or "{}"), int(row.deps)
    if left:
        return
    total = int(counts.get("total", 0))
    if counts.get("failed"):
        outcome, error = Status.FAILED, f"{counts['failed']} of {total} members failed"
    elif counts.get("cancelled"):
        outcome, error = Status.CANCELLED, f"{counts['cancelled']} of {total} members cancelled"
    else:
        outcome, error = Status.SUCCEEDED, ""
    keep = ctx.result_keep if outcome is Status.SUCCEEDED else None
    await _end_record(ctx, row, outcome, error, orjson.dumps(counts).decode(), keep)


async def _end_record(
    ctx: Context, row: Row[Any], status: Status, error: str, counts: str, keep: float | None
) -> None:
    conn = ctx.conn
    await conn.execute(delete(t.queue_jobs).where(_jobs.id == row.id))
    await life.forget_dependencies(conn, row.uuid, row.queue)
    seconds = keep if keep is not None else life._failure_keep(row.failure_ttl, ctx.failure_keep)
    if seconds > 0:
        await life.write_records(
            conn,
            [
                {
                    "uuid": row.uuid,
                    "connection": ctx.connection,
                    "queue": row.queue,
                    "job": row.job,
                    "status": status.value,
                    "attempts": 0,
                    "max_tries": row.max_tries,
                    "enqueued_at": row.created_at,
                    "due_at": None,
                    "started_at": None,
                    "ended_at": t.now(),
                    "worker": None,
                    "error": error or None,
                    "traceback": None,
                    "result": None,
                    "keep_until": t.now(seconds),
                    "kind": row.kind,
                    "progress": counts,
                    "priority": row.priority,
                }
            ],
        )
    if row.dependents:
        ctx.ends.resolve.append((row.uuid, row.queue, status.value))


async def cancel_members(ctx: Context, record_id: str, queue: str, *, running: bool) -> None:
    """Cancel the members of a workflow record that have not ended: waiting ones at once,
    running ones (with `running`) asked to cancel. A member that is itself a workflow record
    is not ended like a job: its own members are cancelled (nested ones too), and it ends
    when they have, as any record does."""
    records = [(record_id, queue)]
    while records:
        await _cancel_direct_members(ctx, *records.pop(), running, records)
    await settle(ctx)


async def _cancel_direct_members(
    ctx: Context, record_id: str, queue: str, running: bool, records: list[tuple[str, str]]
) -> None:
    """`cancel_members` for one record; its nested records are added to `records`."""
    conn = ctx.conn
    query = (
        select(_deps.dep_uuid, _deps.dep_queue)
        .where(_deps.job_uuid == record_id, _deps.job_queue == queue, _deps.status.is_(None))
        .order_by(_deps.seq)
    )
    nested: list[tuple[str, str]] = []
    for member in (await conn.execute(query)).all():
        row = await _lock_job(conn, member.dep_uuid, member.dep_queue)
        if row is None:
            continue
        if row.kind:
            nested.append((str(row.uuid), str(row.queue)))
            continue
        state = life.live_state(row, ctx.now)
        if state == "running":
            if running and not row.cancel_requested:
                await conn.execute(
                    update(t.queue_jobs).where(_jobs.id == row.id).values(cancel_requested=1)
                )
            continue
        if state == "expired":
            ending = (row, Status.EXPIRED, life.ttl_error(row))
        else:
            ending = (row, Status.CANCELLED, "cancelled")
        await life.end_rows(conn, [ending], ctx.now, ctx.connection, ctx.failure_keep, ctx.ends)
    records.extend(reversed(nested))  # depth first, in push order


# -- limits ---------------------------------------------------------------------------------


async def _spec(conn: AsyncConnection, row: Any) -> tuple[int, float, int, int]:
    """The limit of a claimed row (the claim reads only its key)."""
    spec = await conn.scalar(select(_jobs.limit_spec).where(_jobs.id == row.id))
    rate, period, burst, concurrency = str(spec or "0 0.0 1 0").split()
    return int(rate), float(period), int(burst), int(concurrency)


async def _lock_limit(conn: AsyncConnection, queue: str, key: str) -> Any:
    here = (_limits.queue == queue) & (_limits.limit_key == key)
    query = select(_limits.tat, _limits.running, _limits.parked_until).where(here)
    row = (await conn.execute(query.with_for_update())).first()
    if row is None:
        await conn.execute(
            _ignore(insert(t.queue_limits)).values(
                queue=queue, limit_key=key, tat=0.0, running="[]", parked_until=None
            )
        )
        row = (await conn.execute(query.with_for_update())).one()
    return row


async def check_limit(
    conn: AsyncConnection, row: Any, at: datetime, lease: float, taking: Collection[str] = ()
) -> bool:
    """Whether the limited job `row` may start now: if so, its start is counted; if not, it
    is held back (not handed out, its try not counted) until it can be allowed. `taking`:
    ids this claim hands out (not marked reserved yet)."""
    rate, period, burst, concurrency = await _spec(conn, row)
    key = str(row.limit_key)
    state = await _lock_limit(conn, row.queue, key)
    here = (_limits.queue == row.queue) & (_limits.limit_key == key)
    clock = t.from_db_time(at).timestamp()  # the claim's own time: one hold time per claim
    interval = period / rate if rate else 0.0
    tat = float(state.tat)
    running: list[str] = [str(i) for i in orjson.loads(state.running)]
    if concurrency and running:
        query = select(_jobs.uuid).where(
            _jobs.queue == row.queue,
            _jobs.uuid.in_(running),
            _jobs.reserved_at.is_not(None),
            _jobs.reserved_until > at,
        )
        still = {str(i) for i in (await conn.scalars(query.with_for_update(read=True))).all()}
        running = [i for i in running if i in still or i in taking]
    allowed_at = tat - (burst - 1) * interval if rate else 0.0
    if rate and clock < allowed_at:
        when = at + timedelta(seconds=allowed_at - clock)
        values = {**t.placement(row.priority or 0, t.to_db_time(when), at), "held": 1}
        await conn.execute(update(t.queue_jobs).where(_jobs.id == row.id).values(**values))
        return False
    if concurrency and len(running) >= concurrency:
        parked = state.parked_until
        if parked is None or parked <= at:
            parked = t.now(lease)
        await conn.execute(
            update(t.queue_jobs)
            .where(_jobs.id == row.id)
            .values(available_at=parked, reserved_until=None, reserved_at=None, held=2)
        )
        await conn.execute(
            update(t.queue_limits)
            .where(here)
            .values(parked_until=parked, running=orjson.dumps(running).decode())
        )
        return False
    if rate:
        tat = max(tat, clock) + interval
    if concurrency:
        running.append(str(row.uuid))
    await conn.execute(
        update(t.queue_limits).where(here).values(tat=tat, running=orjson.dumps(running).decode())
    )
    return True


async def release_slots(conn: AsyncConnection, stopped: Sequence[tuple[str, str, str]]) -> None:
    """Limited jobs stopped running: each leaves its key's running ids, and one job parked
    by the key's concurrency becomes ready."""
    for queue, key, job_id in sorted(stopped):
        here = (_limits.queue == queue) & (_limits.limit_key == key)
        query = select(_limits.running, _limits.parked_until).where(here).with_for_update()
        state = (await conn.execute(query)).first()
        if state is None:
            continue
        running = [i for i in orjson.loads(state.running) if i != job_id]
        parked = state.parked_until
        if parked is not None:
            waiting = (
                select(_jobs.id, _jobs.priority)
                .where(
                    _jobs.queue == queue,
                    _jobs.reserved_until.is_(None),
                    _jobs.available_at == parked,
                    _jobs.limit_key == key,
                )
                # Higher priority first, then push order: a sort of this key's parked
                # jobs only (those at this one time), not of the queue.
                .order_by(func.coalesce(_jobs.priority, 0).desc(), _jobs.id)
                .limit(2)
                .with_for_update()
            )
            rows = (await conn.execute(waiting)).all()
            if rows:
                now = t.now()
                await conn.execute(
                    update(t.queue_jobs)
                    .where(_jobs.id == rows[0].id)
                    .values(held=None, **t.placement(rows[0].priority or 0, now, now))
                )
            if len(rows) < 2:
                parked = None
        await conn.execute(
            update(t.queue_limits)
            .where(here)
            .values(running=orjson.dumps(running).decode(), parked_until=parked)
        )


# -- once keys and markers ------------------------------------------------------------------


async def prune_limits(conn: AsyncConnection) -> int:
    """Delete up to `PRUNE_BATCH` rows of idle limit keys: none of their jobs running (no
    running ids), none parked for a later time, and a rate that has caught up (`tat` past).
    Such a row says nothing a new one would not: the next start of its key makes a new one.
    Each is deleted only if it is still idle, so a claim taking the key now keeps it."""
    now, clock = t.now(), time.time()
    idle = (
        (_limits.running == "[]")
        & (_limits.tat < clock)
        & (_limits.parked_until.is_(None) | (_limits.parked_until <= now))
    )
    query = select(_limits.queue, _limits.limit_key).where(idle).limit(life.PRUNE_BATCH)
    rows = (await conn.execute(query)).all()
    if not rows:
        return 0
    named = or_(*(and_(_limits.queue == r.queue, _limits.limit_key == r.limit_key) for r in rows))
    return int((await conn.execute(delete(t.queue_limits).where(named, idle))).rowcount)


async def take_once(conn: AsyncConnection, job: OutgoingJob, now: datetime) -> Pushed | None:
    """Take the job's once key: `None` when taken for it, else the duplicate outcome."""
    here = (_once.queue == job.queue) & (_once.once_key == job.once_key)
    until = t.now(max(job.once_for, 0.001))
    for _ in range(2):
        row = (
            await conn.execute(select(_once.uuid, _once.expires_at).where(here).with_for_update())
        ).first()
        if row is not None:
            if row.expires_at > now:
                return Pushed(str(row.uuid), "duplicate")
            await conn.execute(
                update(t.queue_once).where(here).values(uuid=job.id, expires_at=until)
            )
            return None
        taken = await conn.execute(
            _ignore(insert(t.queue_once)).values(
                queue=job.queue, once_key=job.once_key, uuid=job.id, expires_at=until
            )
        )
        if taken.rowcount:
            return None
    raise AssertionError(f"once key {job.once_key!r} vanished while locked")  # pragma: no cover


async def release_once(conn: AsyncConnection, job: OutgoingJob) -> None:
    """Give back a once key taken for a job that was not stored after all."""
    here = (_once.queue == job.queue) & (_once.once_key == job.once_key) & (_once.uuid == job.id)
    await conn.execute(delete(t.queue_once).where(here))


async def hold_once(conn: AsyncConnection, job: OutgoingJob, holder: str) -> None:
    """Give a once key taken for `job` to the job that answered its push instead (a holder
    that kept it or took its payload), so a later push with the key is answered with it."""
    if holder == job.id:
        return
    here = (_once.queue == job.queue) & (_once.once_key == job.once_key) & (_once.uuid == job.id)
    await conn.execute(update(t.queue_once).where(here).values(uuid=holder))


async def prune_once(conn: AsyncConnection) -> None:
    """Delete once keys and markers that have expired."""
    now = t.now()
    await conn.execute(delete(t.queue_once).where(_once.expires_at <= now))
    await conn.execute(delete(t.queue_markers).where(_markers.expires_at <= now))


async def get_marker(conn: AsyncConnection, name: str) -> str | None:
    query = select(_markers.value).where(_markers.name == name, _markers.expires_at > t.now())
    value = await conn.scalar(query)
    return None if value is None else str(value)


#: Names per `IN (...)` of `get_markers` (well under any server's bound-parameter limit).
MARKER_BATCH = 500


async def get_markers(conn: AsyncConnection, names: Sequence[str]) -> dict[str, str]:
    """The values of those of `names` that are set and not expired."""
    found: dict[str, str] = {}
    for start in range(0, len(names), MARKER_BATCH):
        batch = names[start : start + MARKER_BATCH]
        query = select(_markers.name, _markers.value).where(
            _markers.name.in_(batch), _markers.expires_at > t.now()
        )
        for name, value in (await conn.execute(query)).all():
            found[str(name)] = str(value)
    return found


async def set_marker(conn: AsyncConnection, name: str, value: str, ttl: float) -> None:
    values = {"name": name, "value": value, "expires_at": t.now(ttl)}
    await t.upsert(conn, t.queue_markers, values)


#: Rows per INSERT of `set_markers` (3 parameters each: far under SQLite's 32766), and the
#: text per INSERT (values can be whole job records: a statement stays well under MariaDB's
#: max_allowed_packet, 16 MiB by default).
MARKER_ROWS = 500
MARKER_CHARS = 1 << 20


async def set_markers(conn: AsyncConnection, items: Sequence[tuple[str, str, float]]) -> None:
    """`set_marker` for each item in multi-row upserts, on the caller's transaction.

    A name given twice keeps its last item: one row per name per statement (a multi-row
    upsert hitting one key twice is legal but its outcome is the dialect's business). Rows go
    in name order, so two bulk writes over the same names lock them in the same order and
    cannot deadlock each other."""
    latest = {name: (value, ttl) for name, value, ttl in items}
    batch: list[dict[str, Any]] = []
    chars = 0
    for name in sorted(latest):
        value, ttl = latest[name]
        if batch and (len(batch) >= MARKER_ROWS or chars + len(value) > MARKER_CHARS):
            await _upsert_markers(conn, batch)
            batch, chars = [], 0
        batch.append({"name": name, "value": value, "expires_at": t.now(ttl)})
        chars += len(name) + len(value)
    if batch:
        await _upsert_markers(conn, batch)


async def _upsert_markers(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if conn.dialect.name == "sqlite":
        lite = sqlite_insert(t.queue_markers).values(rows)
        fresh = {"value": lite.excluded.value, "expires_at": lite.excluded.expires_at}
        await conn.execute(lite.on_conflict_do_update(index_elements=["name"], set_=fresh))
    else:
        my = mysql_insert(t.queue_markers).values(rows)
        await conn.execute(
            my.on_duplicate_key_update(value=my.inserted.value, expires_at=my.inserted.expires_at)
        )


#: The longest marker name the `queue_markers` key holds (its VARCHAR length).
MARKER_NAME_LENGTH = 190


async def claim_marker(conn: AsyncConnection, name: str, value: str, ttl: float) -> bool:
    """Store the marker only if no unexpired row holds `name`; whether this call stored it.

    Two statements whose row counts decide, no read first: the UPDATE takes over an expired
    row (it locks the row and checks the expiry again once it holds the lock, so of two
    takers one matches), and the INSERT IGNORE writes a row where there is none (the key
    refuses the second). A row that is there and not expired matches neither: refused.
    """
    now = t.now()
    until = t.now(ttl)
    expired = (_markers.name == name) & (_markers.expires_at <= now)
    taken = await conn.execute(
        update(t.queue_markers).where(expired).values(value=value, expires_at=until)
    )
    if taken.rowcount:
        return True
    inserted = await conn.execute(
        _ignore(insert(t.queue_markers)).values(name=name, value=value, expires_at=until)
    )
    return bool(inserted.rowcount)
