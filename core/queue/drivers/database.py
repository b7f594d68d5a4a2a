"""The `database` connection: a job queue in MySQL/MariaDB (aiomysql) or SQLite (aiosqlite).

Same semantics as the memory driver, on the tables of `sql_tables`:

* Claiming is one short transaction: acknowledge the finished jobs (DELETE), then per queue
  select expired leases first (they go to the front), then ready jobs in `(available_at, id)`
  order, `FOR UPDATE SKIP LOCKED` on MySQL/MariaDB so that concurrent workers take different
  rows without waiting, then one UPDATE that increments `attempts` and sets the lease. SQLite
  runs the same statements in a BEGIN IMMEDIATE transaction: one writer at a time.
* A reservation is the pair (uuid, attempts): ack, release and extend match both, so a worker
  whose lease expired and whose job was taken again changes nothing.
* A refunded release keeps the job's `(available_at, id)`: everything that was behind it when it
  was claimed is still behind it, so it is first again. A plain release is ready at once but
  behind the others (`available_at` = now); a delayed one at its time.
* Nothing notifies a waiting worker: `wait` sleeps until the next delayed job or lease expiry,
  at most its timeout (the worker's `--sleep`).
* The job lifecycle (see `sql_lifecycle`): a stored job's status is read from its row; `ack`
  moves each job's record to `queue_job_records` in the transaction that deletes it; a job past
  its `ttl`, or whose cancel was asked for while it ran and whose lease then ran out, ends in
  the claim that finds it (it is never handed out); `prune_records`, which workers call about
  once a minute, deletes records past their keep time and counters older than two hours.
* Groups and bounded queues (see `sql_groups`): a job of a group that is not in turn waits in
  its group's line, never claimable; the transaction that ends the job in turn hands the turn
  on. A push with `max_length` counts its queue's waiting jobs under a lock of its queue.
  `reserve` returns the jobs its claim expired besides the runnable ones
  (`ReservedJob.expired`).
* Observing (see `sql_observe`): `history` sums the shards of `queue_counts`, where
  `add_history` adds the workers' counts; `browse` pages ranges of the claim index in hand-out
  order; `groups` pages `queue_groups`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    null,
    or_,
    select,
    text,
    union,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.errors import ConfigurationError, DriverError
from core.queue.drivers import sql_groups as groups
from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_observe as observe
from core.queue.drivers import sql_tables as t
from core.queue.drivers import sql_workflow as wf
from core.queue.drivers.base import (
    BrowseState,
    Driver,
    FailedJob,
    FailedStore,
    GroupInfo,
    MinuteCounts,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
    check_marker_items,
    claim_record_id,
    new_record_id,
    pause_marker,
)
from core.queue.drivers.memory import check_cutoff
from core.queue.drivers.sql_migrations import (
    LATEST_VERSION,
    check_server_version,
    create_engine,
    database_error,
    is_conflict,
    migrate,
    refuse_seed_tables,
    safe_url,
    schema_version,
    writer,
)
from core.settings import Settings
from core.status import JobStatus, Status

__all__ = ["DatabaseDriver", "DatabaseFailedStore"]

T = TypeVar("T")

_ATTEMPTS = 3  # runs of a transaction that hit a MySQL deadlock or lock timeout
_LIMIT_ROUNDS = 4  # claims per queue and reserve while limits hold jobs back
_MIN_WAIT = 0.01  # seconds: a job that is due but locked by another claim is taken very soon
_jobs = t.queue_jobs.c
_failed = t.queue_failed_jobs.c
_records = t.queue_job_records.c
_counts = t.queue_counts.c
_keys = t.queue_unique_keys.c


#: The UPDATE that reserves claimed rows, with its values as parameters: built once, so that
#: each claim only binds them.
_TAKE = (
    update(t.queue_jobs)
    .where(_jobs.id.in_(bindparam("take_ids", expanding=True)))
    .values(
        attempts=_jobs.attempts + 1,
        reserved_at=bindparam("take_at", type_=t.Time),
        reserved_until=bindparam("take_until", type_=t.Time),
        worker=bindparam("take_worker"),
        state="queued",  # started once: given back, it is queued again, not waiting
        held=null(),  # no longer held back by a limit
    )
)


class DatabaseDriver(Driver):
    """The queue on MySQL/MariaDB or SQLite, from `settings.database_dsn`.

    `open()` connects, checks the server and (with `DB_AUTO_MIGRATE`) creates the tables.
    """

    kind = "database"
    blocks = False

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self._engine: AsyncEngine | None = None
        self._writer: AsyncEngine | None = None
        self._store = DatabaseFailedStore(self)
        self._registered: set[str] = set()  # queue names this process has put in queue_names
        self._shard = random.randrange(1024)  # its own rows of queue_counts
        # Set when this process's ack, release or cancel made jobs ready (a dependent
        # released, a job parked by its key's concurrency limit): wakes its own `wait`.
        # Other processes' waits sleep until their timeout, as for any push.
        self._wake: asyncio.Event | None = None
        self._ready_after_commit = False

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the server version, then migrate (or check the schema version)."""
        if self._engine is not None:
            return
        engine = create_engine(self.settings.database_dsn, pool_size=self.settings.db_pool_size)
        try:
            if engine.dialect.name != "sqlite":
                try:
                    async with engine.connect() as conn:
                        version = str(await conn.scalar(text("SELECT VERSION()")))
                except (sa_exc.SQLAlchemyError, OSError) as exc:
                    raise database_error(exc, "connect", engine.url) from exc
                check_server_version(version)
            if self.settings.db_auto_migrate:
                await migrate(engine)
            else:
                await refuse_seed_tables(engine)
                found = await schema_version(engine)
                if found < LATEST_VERSION:
                    raise ConfigurationError(
                        f"the queue tables at {safe_url(engine.url)} are at version {found}, "
                        f"this Topiq needs {LATEST_VERSION}: run `python main.py queue:migrate` "
                        "(or set DB_AUTO_MIGRATE=true)"
                    )
        except BaseException:
            await engine.dispose()
            raise
        self._engine, self._writer = engine, writer(engine)

    async def close(self) -> None:
        """Close every pooled connection. Idempotent."""
        engine, self._engine, self._writer = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    async def _run(
        self, what: str, op: Callable[[AsyncConnection], Awaitable[T]], *, write: bool = True
    ) -> T:
        """Run `op` in one transaction, again on a deadlock; library errors become ours."""
        engine = self._writer if write else self._engine
        if engine is None:
            raise DriverError(f"the {self.name!r} queue connection is not open")
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                self._ready_after_commit = False
                async with engine.begin() as conn:
                    result = await op(conn)
                if self._ready_after_commit and self._wake is not None:
                    self._wake.set()
                return result
            except (sa_exc.SQLAlchemyError, OSError) as exc:
                if attempt < _ATTEMPTS and is_conflict(exc):
                    continue
                raise database_error(exc, what, engine.url) from exc
        raise AssertionError("unreachable")

    # -- primitives --------------------------------------------------------------------

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        """Store every job in one transaction.

        Runs of plain jobs go in one multi-row INSERT each, and so do runs of jobs with an id
        check and nothing else to check or place (`sql_lifecycle.push_checked_many`, a look
        for the lot first); any other job with an id check or a unique key is checked and
        stored on its own (`sql_lifecycle.push_checked`), in list order.
        """
        if not jobs:
            return []
        created = t.now()
        try:
            rows = [life.job_row(job, created) for job in jobs]
        except UnicodeDecodeError as exc:
            raise DriverError(
                f"a payload for the database queue must be UTF-8 text: {exc}"
            ) from None
        new = sorted({job.queue for job in jobs} - self._registered)
        keep = self.settings.queue_failure_ttl

        async def op(conn: AsyncConnection) -> list[Pushed]:
            if new:
                await conn.execute(
                    insert(t.queue_names)
                    .prefix_with("IGNORE", dialect="mysql")
                    .prefix_with("OR IGNORE", dialect="sqlite"),
                    [{"name": name, "created_at": created} for name in new],
                )
            out: list[Pushed] = []
            plain: list[dict[str, Any]] = []
            entering: list[tuple[OutgoingJob, int]] = []  # grouped rows of `plain` to place
            # Jobs with only an id check, (place in `out`, job, row): stored in `flush`.
            checking: list[tuple[int, OutgoingJob, dict[str, Any]]] = []
            fronts: dict[str, datetime] = {}
            ends = life.Ends()

            async def flush() -> None:
                nonlocal checking
                if checking:  # never both this and `plain`: each is flushed before the other
                    found = await life.push_checked_many(
                        conn,
                        [(job, row) for _, job, row in checking],
                        created,
                        self.name,
                        keep,
                        ends,
                    )
                    for (n, _, _), pushed in zip(checking, found, strict=True):
                        out[n] = pushed
                    checking = []
                await flush_plain()

            async def flush_plain() -> None:
                nonlocal plain, entering
                if entering:
                    placed = await groups.enter_many(
                        conn, [(job, plain[n]) for job, n in entering], created
                    )
                    for (job, n), row in zip(entering, placed, strict=True):
                        if row["due_at"] is not None and not row.get("group_seq"):
                            # at_front, ready now and in turn: before the current head
                            row = {**row, "available_at": await life.front(conn, job.queue, fronts)}
                        plain[n] = row
                await life.insert_plain(conn, plain)
                plain, entering = [], []

            for job, row in zip(jobs, rows, strict=True):
                if job.depends_on or job.kind != "job" or job.once_key:
                    await flush()
                    out.append(await self._push_special(conn, job, row, created, fronts, ends))
                    continue
                checked = job.check_id or job.unique_key
                if job.group and not checked and job.max_length <= 0:
                    if checking:  # the jobs with an id check before it first
                        await flush()
                    entering.append((job, len(plain)))  # placed in `flush`, all at once
                    plain.append(row)
                    out.append(Pushed(job.id))
                    continue
                if job.group or job.max_length > 0:
                    await flush()
                    out.append(await self._push_placed(conn, job, row, created, fronts, ends))
                    continue
                if row["due_at"] is not None:  # at_front, ready now: before the current head
                    row = {**row, "available_at": await life.front(conn, job.queue, fronts)}
                if not checked:
                    if checking:
                        await flush()
                    plain.append(row)
                    out.append(Pushed(job.id))
                    continue
                if job.unique_key:
                    await flush()
                    out.append(
                        await life.push_checked(conn, job, row, created, self.name, keep, ends)
                    )
                    continue
                await flush_plain()
                checking.append((len(out), job, row))
                out.append(Pushed(job.id))  # decided in `flush`
            await flush()
            for job, pushed in zip(jobs, out, strict=True):
                if pushed.outcome == "replaced":
                    ends[(job.queue, "coalesced")] += 1
                elif pushed.outcome == "full":
                    ends[(job.queue, "rejected")] += 1
            await self._settle(conn, ends)
            await life.count(conn, ends, self._shard)
            return out

        pushed = await self._run("push jobs", op)
        self._registered.update(new)
        return pushed

    async def _push_special(
        self,
        conn: AsyncConnection,
        job: OutgoingJob,
        row: dict[str, Any],
        created: datetime,
        fronts: dict[str, datetime],
        ends: life.Ends,
    ) -> Pushed:
        """Push a job with dependencies, a workflow record or a job with a once key."""
        if job.once_key:
            taken = await wf.take_once(conn, job, created)
            if taken is not None:
                return taken
        deps: list[tuple[str, str, str | None]] = []
        place: life.Place | None = None
        if job.depends_on or job.kind != "job":
            # A deferred job joins its group when it is released; its push is checked
            # against `max_length` as any (its release never is).
            deps, missing = await wf.find_dependencies(conn, job, created)
            if missing is not None:
                if job.once_key:
                    await wf.release_once(conn, job)
                return Pushed(missing, "missing")
            row = wf.deferred_row(row, job, len(deps))
            if job.kind == "job" and job.max_length > 0:
                place = self._admitter(conn, job, row, created, ends)
        else:
            place = self._placer(conn, job, row, created, fronts, ends)
        if job.check_id or job.unique_key:
            keep = self.settings.queue_failure_ttl
            pushed = await life.push_checked(conn, job, row, created, self.name, keep, ends, place)
        else:
            pushed = await self._insert_one(conn, job, row, place)
        if pushed.outcome != "created" or pushed.id != job.id:
            if job.once_key and pushed.outcome in ("full", "missing"):
                await wf.release_once(conn, job)  # nothing stored: the key is not taken
            elif job.once_key:
                # Answered by a holder (duplicate, kept, replaced): the key stays taken, for
                # the holder, so a second push with it stores nothing whatever this one did.
                await wf.hold_once(conn, job, pushed.id)
            return pushed
        if deps:
            await wf.register_dependencies(conn, job, deps, ends)
        return pushed

    def _placer(
        self,
        conn: AsyncConnection,
        job: OutgoingJob,
        row: dict[str, Any],
        created: datetime,
        fronts: dict[str, datetime],
        ends: life.Ends,
    ) -> life.Place:
        """What decides, once the id and key checks have passed, the row a job that will be
        ready or scheduled is stored as: refused or making room by its queue's
        `max_length`, the turn or the line of its group, before the head if `at_front`."""

        async def place() -> dict[str, Any] | None:
            if job.max_length > 0:
                keep = self.settings.queue_failure_ttl
                if not await groups.admit(conn, job, created, self.name, keep, ends):
                    return None
            if job.group:
                seq = await groups.enter(conn, job.queue, job.group, job.id, created)
                if seq is not None:
                    return groups.line_row(row, seq, job.at_front)
            if row["due_at"] is not None:  # at_front, ready now: before the current head
                return {**row, "available_at": await life.front(conn, job.queue, fronts)}
            return row

        return place

    def _admitter(
        self,
        conn: AsyncConnection,
        job: OutgoingJob,
        row: dict[str, Any],
        created: datetime,
        ends: life.Ends,
    ) -> life.Place:
        """The `max_length` check alone, for a deferred job (stored as `row` if admitted)."""

        async def place() -> dict[str, Any] | None:
            keep = self.settings.queue_failure_ttl
            if not await groups.admit(conn, job, created, self.name, keep, ends):
                return None
            return row

        return place

    async def _insert_one(
        self,
        conn: AsyncConnection,
        job: OutgoingJob,
        row: dict[str, Any],
        place: life.Place | None,
    ) -> Pushed:
        """Store a job without id or key checks, placed by `place` when given."""
        if place is not None:
            placed = await place()
            if placed is None:
                return Pushed(job.id, "full")
            row = dict(placed)
        await life.insert_plain(conn, [row])
        return Pushed(job.id)

    async def _push_placed(
        self,
        conn: AsyncConnection,
        job: OutgoingJob,
        row: dict[str, Any],
        created: datetime,
        fronts: dict[str, datetime],
        ends: life.Ends,
    ) -> Pushed:
        """Push a job with a group or a `max_length` (see `_placer`)."""
        place = self._placer(conn, job, row, created, fronts, ends)
        if job.check_id or job.unique_key:
            keep = self.settings.queue_failure_ttl
            return await life.push_checked(conn, job, row, created, self.name, keep, ends, place)
        return await self._insert_one(conn, job, row, place)

    async def _settle(self, conn: AsyncConnection, ends: life.Ends) -> None:
        """Apply what the ends of this transaction leave (`sql_workflow.settle`): dependents
        resolved, limit slots freed, group turns passed."""
        if not (ends.resolve or ends.stopped or ends.records or ends.turns):
            return
        self._ready_after_commit = True
        ctx = wf.Context(conn, self.name, self.settings.queue_failure_ttl, self._result_ttl, ends)
        while ends.records:
            record_id, queue = ends.records.pop(0)
            await wf.cancel_members(ctx, record_id, queue, running=True)
        await wf.settle(ctx)

    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
        *,
        worker: str = "",
    ) -> list[ReservedJob]:
        """Acknowledge `ack` and claim up to `limit` jobs, in one transaction.

        A claimed job past its ttl, or whose cancel was asked for, ends instead (its record
        written) and is not handed out. The ended jobs are counted last, just before the
        commit: every worker updates those counter rows.
        """
        if limit <= 0 and not ack:
            return []

        async def op(conn: AsyncConnection) -> list[ReservedJob]:
            counted = life.Ends()
            if ack:
                await life.ack_rows(conn, ack, self.name, self._result_ttl, counted)
                await self._settle(conn, counted)
            taken = await self._claim(conn, queues, limit, lease, worker, counted)
            while len(taken) < limit and (counted.reaped or counted.resolve or counted.turns):
                # Jobs ended in the claim (ttl, cancel) took room, released dependents or
                # passed their group's turn: look again. Each round ends rows or is the last.
                counted.reaped = 0
                await self._settle(conn, counted)
                more = await self._claim(conn, queues, limit - len(taken), lease, worker, counted)
                taken += more
            await self._settle(conn, counted)
            await life.count(conn, counted, self._shard)
            # The jobs it expired, handed back besides the runnable ones (`expired`).
            return taken + counted.handed

        return await self._run("reserve jobs", op)

    async def _claim(
        self,
        conn: AsyncConnection,
        queues: Sequence[str],
        limit: int,
        lease: float,
        worker: str,
        counted: Counter[tuple[str, str]],
    ) -> list[ReservedJob]:
        if limit <= 0:
            return []
        now = t.now()
        out: list[ReservedJob] = []
        picked: list[Row[Any]] = []
        for name in queues:
            for _ in range(_LIMIT_ROUNDS):
                if len(out) + len(picked) >= limit:
                    break
                held_back = False
                for row in await t.claim(conn, name, now, limit - len(out) - len(picked)):
                    limited = row.limit_key is not None and life.live_state(row, now) == "waiting"
                    if limited and not await wf.check_limit(
                        conn, row, now, lease, {row.uuid for row in picked}
                    ):
                        held_back = True  # not handed out: look further in this queue
                        continue
                    picked.append(row)
                if not held_back:
                    break
                # Mark the jobs taken so far, so that the next look passes over them.
                out += await self._take(conn, picked, now, lease, worker, counted)
                picked = []
        return out + await self._take(conn, picked, now, lease, worker, counted)

    async def _take(
        self,
        conn: AsyncConnection,
        picked: list[Row[Any]],
        now: datetime,
        lease: float,
        worker: str,
        counted: Counter[tuple[str, str]],
    ) -> list[ReservedJob]:
        """End the claimed rows that ended meanwhile (ttl, cancel); reserve the others."""
        ends: list[tuple[int, Status]] = []
        for row in picked:
            state = life.live_state(row, now)
            if state == "cancelled":
                ends.append((row.id, Status.CANCELLED))
            elif state == "expired":
                ends.append((row.id, Status.EXPIRED))
        if ends:
            keep = self.settings.queue_failure_ttl
            # The claim reads neither a record's columns nor `dependents` (the plain path
            # never needs them): read them now, for these rows only (locked by the claim).
            query = select(*t.ENDING).where(_jobs.id.in_([row_id for row_id, _ in ends]))
            full = {row.id: row for row in (await conn.execute(query)).all()}
            ending = [
                (
                    full[row_id],
                    status,
                    "cancelled" if status is Status.CANCELLED else life.ttl_error(full[row_id]),
                )
                for row_id, status in ends
            ]
            watched = {row.id for row in full.values() if row.dependents is not None}
            await life.end_rows(conn, ending, now, self.name, keep, counted)
            if isinstance(counted, life.Ends):
                counted.reaped += len(ending)
                counted.resolve += [
                    (row.uuid, row.queue, status.value)
                    for row, status, _ in ending
                    if row.id in watched
                ]
                counted.handed += [
                    ReservedJob(
                        row.uuid, row.queue, row.payload.encode(), row.attempts, expired=True
                    )
                    for row, status, _ in ending
                    if status is Status.EXPIRED
                ]
            gone = {row.id for row, _, _ in ending}
            picked = [row for row in picked if row.id not in gone]
        if not picked:
            return []
        params = {
            "take_ids": [row.id for row in picked],
            "take_at": now,
            "take_until": t.now(lease),
            "take_worker": worker,
        }
        await conn.execute(_TAKE, params)
        return [
            ReservedJob(row.uuid, row.queue, row.payload.encode(), row.attempts + 1)
            for row in picked
        ]

    @property
    def _result_ttl(self) -> float:
        return self.settings.queue_result_ttl

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        """Sleep until the next delayed job or lease expiry in `queues`, at most `timeout`."""
        if timeout <= 0:
            return
        soonest = []
        for name in queues:
            here = _jobs.queue == name
            soonest.append(
                select(func.min(_jobs.available_at))
                .where(here, _jobs.reserved_until.is_(None))
                .scalar_subquery()
            )
            soonest.append(
                select(func.min(_jobs.reserved_until))
                .where(here, _jobs.reserved_until.is_not(None))
                .scalar_subquery()
            )
            # Ready jobs of a lower priority (see `sql_tables.placement`): ready now.
            soonest.append(
                select(func.min(_jobs.reserved_until))
                .where(here, _jobs.reserved_until >= t.PRIO_LOW)
                .where(_jobs.reserved_until < t.PRIO_LOW_END)
                .scalar_subquery()
            )

        async def op(conn: AsyncConnection) -> list[datetime]:
            # One MIN per queue and column: each is a single index lookup.
            row = (await conn.execute(select(*soonest))).one()
            low = [t.FRONT for moment in row[2::3] if moment is not None]
            return low + [moment for moment in row if moment is not None]

        wake = self._wake = self._wake or asyncio.Event()
        wake.clear()
        due = await self._run("look for due jobs", op, write=False)
        if due:
            until = (min(due) - t.now()).total_seconds()
            timeout = min(timeout, max(until, _MIN_WAIT))
        if wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        """Delete finished jobs still held under these reservations, writing their records."""
        if not jobs:
            return

        async def op(conn: AsyncConnection) -> None:
            counted = life.Ends()
            await life.ack_rows(conn, jobs, self.name, self._result_ttl, counted)
            await self._settle(conn, counted)
            await life.count(conn, counted, self._shard)

        await self._run("acknowledge jobs", op)

    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        """Return a reserved job: after `delay`, at once behind the others, or (refund) first.

        Refunded, it is `queued` again; otherwise `retrying`, with `error` kept.
        """
        values: dict[str, Any] = {"reserved_at": None, "reserved_until": None}
        if refund:
            values["attempts"] = _jobs.attempts - 1
            values["state"] = "queued"
        else:
            values["state"] = "retrying"
            values["error"] = error or None
        if delay > 0:
            values["available_at"] = t.now(delay)
        elif not refund:
            values["available_at"] = t.now()

        async def op(conn: AsyncConnection) -> None:
            query = select(_jobs.id, _jobs.priority, _jobs.limit_key, _jobs.available_at)
            row = (await conn.execute(query.where(t.held([job])).with_for_update())).first()
            if row is None:
                return
            here = dict(values)
            if "available_at" not in here and not row.priority and row.available_at < t.FRONT:
                # A refunded `at_front` job goes to the head of its priority level, as every
                # refund does, not before every priority: `FRONT` is before every ready job
                # of priority 0 and after the `at_front` ones.
                here["available_at"] = t.FRONT
            if row.priority:  # back in its priority's place (see `sql_tables.placement`)
                due = here.get("available_at", row.available_at)
                here.update(t.placement(row.priority, due, t.now()))
            await conn.execute(update(t.queue_jobs).where(_jobs.id == row.id).values(**here))
            if row.limit_key is not None:
                await wf.release_slots(conn, [(job.queue, row.limit_key, job.id)])

        await self._run("release a job", op)

    async def save_payload(self, job: ReservedJob, payload: bytes) -> bool:
        """One UPDATE of the job's `payload`, matched as `extend` and `release` match it
        (`sql_tables.held`: same id, queue and try, still reserved): a row acknowledged,
        released, or taken over by a later try after its lease ran out is not written."""
        statement = (
            update(t.queue_jobs).where(t.held([job])).values(payload=payload.decode("utf-8"))
        )

        async def op(conn: AsyncConnection) -> bool:
            return int((await conn.execute(statement)).rowcount) == 1

        return await self._run("save a job's payload", op)

    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        """Renew the leases still held, each to its own time, in one UPDATE."""
        if not leases:
            return
        until = {job.id: t.now(seconds) for job, seconds in leases}
        new_until = case(until, value=_jobs.uuid, else_=_jobs.reserved_until)

        async def op(conn: AsyncConnection) -> None:
            jobs = [job for job, _ in leases]
            await conn.execute(
                update(t.queue_jobs).where(t.held(jobs)).values(reserved_until=new_until)
            )

        await self._run("extend leases", op)

    async def stats(self, queue: str) -> QueueStats:
        """Pending, delayed, reserved and deferred counts in one grouped COUNT.

        Jobs held back by a limit count as pending; workflow records not at all.
        """
        now = t.now()
        free = _jobs.reserved_at.is_(None)  # an `at_front` job's delay is a lease nobody holds
        loose = _jobs.held.is_(None)  # not held back by a limit
        query = select(
            func.count(),
            func.sum(
                case(
                    (
                        and_(
                            _jobs.reserved_until.is_(None),
                            _jobs.available_at > now,
                            _jobs.available_at < t.LINE,  # not in a line, not deferred
                            loose,
                        ),
                        1,
                    ),
                    (
                        and_(
                            free,
                            _jobs.reserved_until > now,
                            _jobs.reserved_until < t.PRIO_LOW,
                            loose,
                        ),
                        1,
                    ),
                )
            ),
            func.sum(case((and_(_jobs.reserved_until > now, ~free), 1))),
            func.sum(case((and_(_jobs.deps.is_not(None), _jobs.kind.is_(None)), 1))),
            func.sum(case((_jobs.kind.is_not(None), 1))),
        ).where(_jobs.queue == queue)

        async def op(conn: AsyncConnection) -> tuple[int, ...]:
            row = (await conn.execute(query)).one()
            return tuple(int(n or 0) for n in row)

        total, delayed, reserved, deferred, records = await self._run("count jobs", op, write=False)
        pending = total - delayed - reserved - deferred - records
        return QueueStats(self.name, queue, pending, delayed, reserved, 0, deferred=deferred)

    async def size(self, queue: str) -> int:
        """Jobs of `queue` not yet finished: one COUNT, less the workflow records (found
        among the deferred rows only)."""
        records = (
            select(func.count())
            .where(
                _jobs.queue == queue,
                _jobs.reserved_until.is_(None),
                _jobs.available_at == t.DEFERRED,
                _jobs.kind.is_not(None),
            )
            .scalar_subquery()
        )
        query = select(func.count() - records).where(_jobs.queue == queue)

        async def op(conn: AsyncConnection) -> int:
            count = await conn.scalar(query)
            return int(count or 0)

        return await self._run("count jobs", op, write=False)

    async def queues(self) -> list[str]:
        """Every queue a job was pushed to, in name order."""
        query = union(select(t.queue_names.c.name), select(_jobs.queue).distinct())

        async def op(conn: AsyncConnection) -> list[str]:
            return sorted({str(name) for name in (await conn.scalars(query)).all()})

        return await self._run("list queues", op, write=False)

    async def clear(self, queue: str) -> int:
        """Delete the jobs of `queue` not held under a live lease, in one transaction.

        What waits on a cleared job (its dependents and workflow records, in any queue)
        resolves it as `cancelled`, as `cancel` would, though the cleared jobs leave no
        records. The cleared deferred jobs drop their dependency rows first, so that no end
        resolves them; the jobs nothing depends on go in one DELETE; those with dependents
        go `PRUNE_BATCH` at a time, each batch's ends settled before the next is read.
        """
        now = t.now()
        clearable = and_(
            _jobs.queue == queue,
            or_(
                _jobs.reserved_until.is_(None),
                _jobs.reserved_until <= now,
                _jobs.reserved_at.is_(None),
            ),
            _jobs.kind.is_(None),  # workflow records end with their members
        )
        deps = t.queue_dependencies.c
        cleared_deferred = (
            select(_jobs.id)
            .where(_jobs.uuid == deps.job_uuid, _jobs.queue == deps.job_queue, clearable)
            .exists()
        )
        with_dependents = (
            select(_jobs.id, _jobs.uuid)
            .where(clearable, _jobs.dependents.is_not(None))
            .order_by(_jobs.id)
            .limit(life.PRUNE_BATCH)
            .with_for_update()
        )

        async def op(conn: AsyncConnection) -> int:
            await groups.reset(conn, queue, before=True)
            await conn.execute(
                delete(t.queue_dependencies).where(deps.job_queue == queue, cleared_deferred)
            )
            result = await conn.execute(
                delete(t.queue_jobs).where(clearable, _jobs.dependents.is_(None))
            )
            cleared = int(result.rowcount)
            ends = life.Ends()
            while rows := (await conn.execute(with_dependents)).all():
                await conn.execute(delete(t.queue_jobs).where(_jobs.id.in_([r.id for r in rows])))
                cleared += len(rows)
                cancelled = Status.CANCELLED.value
                ends.resolve.extend((str(row.uuid), queue, cancelled) for row in rows)
                await self._settle(conn, ends)
            await groups.reset(conn, queue, before=False)
            await life.count(conn, ends, self._shard)
            return cleared

        return await self._run("clear a queue", op)

    def failed_store(self) -> FailedStore:
        """The `queue_failed_jobs` table."""
        return self._store

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        """Delete the records still held as read and insert their jobs, in one transaction.

        The records are locked first (`FOR UPDATE`; SQLite's writer holds the file): a second
        retry running at once waits, then finds them gone.
        """
        wanted = {(r.id, r.record_id): r for r in records if r.connection == self.name}
        if not wanted:
            return []
        ids = sorted({job_id for job_id, _ in wanted})
        created = t.now()

        async def op(conn: AsyncConnection) -> list[str]:
            rows = (
                await conn.execute(
                    select(_failed.id, _failed.uuid, _failed.record_id)
                    .where(_failed.uuid.in_(ids))
                    .order_by(_failed.id)
                    .with_for_update()
                )
            ).all()
            held = [wanted[key] for row in rows if (key := (row.uuid, row.record_id)) in wanted]
            if not held:
                return []
            moved = [record.id for record in held]
            await conn.execute(
                delete(t.queue_failed_jobs).where(
                    _failed.id.in_([row.id for row in rows if row.uuid in set(moved)])
                )
            )
            await self._register(conn, {record.queue for record in held}, created)
            # A job still stored (a late ack that never landed) starts afresh, record reset.
            # A job of a group (its record or row says which) rejoins it: the turn if the
            # group is empty, else the line's tail.
            fresh: list[dict[str, Any]] = []
            for record in held:
                here = (_jobs.uuid == record.id) & (_jobs.queue == record.queue)
                was = (_records.uuid == record.id) & (_records.queue == record.queue)
                group = await conn.scalar(select(_jobs.group_key).where(here))
                if group is None:
                    group = await conn.scalar(select(_records.group_key).where(was))
                await conn.execute(delete(t.queue_jobs).where(here))
                await life.forget_record(conn, record.id, record.queue)
                row: dict[str, Any] = {
                    "uuid": record.id,
                    "queue": record.queue,
                    "payload": record.payload,
                    "attempts": 0,
                    "available_at": created,
                    "created_at": created,
                    "job": None if record.job_class == "?" else record.job_class,
                    "state": "waiting",
                    "reserved_until": None,
                    "reserved_at": None,
                    "due_at": None,
                    "group_key": group,
                    "group_seq": None,
                }
                if group is not None:
                    seq = await groups.enter(conn, record.queue, group, record.id, created)
                    if seq is not None:
                        row = groups.line_row(row, seq)
                fresh.append(row)
            await conn.execute(insert(t.queue_jobs), fresh)
            return moved

        moved = await self._run("retry failed jobs", op)
        self._registered.update(r.queue for r in records if r.id in set(moved))
        return moved

    async def _register(self, conn: AsyncConnection, queues: set[str], at: datetime) -> None:
        """Put queue names this process has not stored yet into `queue_names`."""
        new = sorted(queues - self._registered)
        if new:
            await conn.execute(
                insert(t.queue_names)
                .prefix_with("IGNORE", dialect="mysql")
                .prefix_with("OR IGNORE", dialect="sqlite"),
                [{"name": name, "created_at": at} for name in new],
            )

    # -- single jobs -------------------------------------------------------------------

    async def job_status(self, job_id: str, queue: str | None = None) -> JobStatus | None:
        """The job's row in `queue_jobs` (a stored job), else its record (an ended one)."""

        async def op(conn: AsyncConnection) -> JobStatus | None:
            return await life.read_status(conn, job_id, queue, self.name)

        return await self._run("read a job's status", op, write=False)

    async def job_payload(self, job_id: str, queue: str | None = None) -> bytes | None:
        """The `payload` column of the job's `queue_jobs` row (the latest, as `job_status`
        chooses): one SELECT on the uuid index. An ended job has no row: `None`."""
        query = select(_jobs.payload).where(_jobs.uuid == job_id)
        if queue is not None:
            query = query.where(_jobs.queue == queue)
        query = query.order_by(_jobs.id.desc()).limit(1)

        async def op(conn: AsyncConnection) -> bytes | None:
            payload: str | None = (await conn.execute(query)).scalar()
            return None if payload is None else payload.encode("utf-8")

        return await self._run("read a job's payload", op, write=False)

    async def cancel(self, job_id: str, queue: str | None = None) -> bool:
        """A waiting job ends `cancelled` at once; a running one is flagged for its worker."""
        keep = self.settings.queue_failure_ttl

        async def op(conn: AsyncConnection) -> bool:
            counted = life.Ends()
            done = await life.cancel(conn, job_id, queue, self.name, keep, counted)
            await self._settle(conn, counted)
            await life.count(conn, counted, self._shard)
            return done

        return await self._run("cancel a job", op)

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        """The ids among `jobs`, still held, whose cancel was asked for: one SELECT."""
        if not jobs:
            return []
        query = select(_jobs.uuid).where(t.held(jobs), _jobs.cancel_requested.is_not(None))

        async def op(conn: AsyncConnection) -> list[str]:
            return [str(uuid) for uuid in (await conn.scalars(query)).all()]

        return await self._run("look for cancel requests", op, write=False)

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        """Sums of the per-minute counters of the last `window` seconds."""

        async def op(conn: AsyncConnection) -> RecentCounts:
            return await life.recent(conn, queue, window)

        return await self._run("count ended jobs", op, write=False)

    # -- observing (the dashboard, metrics; see `sql_observe`) ------------------------------

    async def history(self, queue: str, minutes: int = 60) -> list[MinuteCounts]:
        """`queue`'s last `minutes` minutes from `queue_counts`, every shard summed, one
        entry per minute (zeros where nothing was counted), oldest first."""
        if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
            raise ValueError(f"minutes must be a whole number >= 1, got {minutes!r}")
        last = life.minute_now()

        async def op(conn: AsyncConnection) -> list[MinuteCounts]:
            return await observe.history(conn, queue, last - minutes + 1, last)

        return await self._run("read a queue's history", op, write=False)

    async def add_history(self, rows: Sequence[tuple[str, int, Mapping[str, int]]]) -> None:
        """Add workers' counts to `queue_counts`, in this driver's shard: one multi-row
        upsert that adds to the stored counts, in one transaction. `prune_records` drops the
        minutes older than two hours."""
        values = observe.history_rows(rows, self._shard)
        if not values:
            return

        async def op(conn: AsyncConnection) -> None:
            await observe.add_history(conn, values)

        await self._run("add to a queue's history", op)

    async def browse(
        self, queue: str, state: BrowseState, offset: int = 0, limit: int = 50
    ) -> list[JobStatus]:
        """A page of `queue`'s jobs in `state`, read along the claim index (`sql_observe`)."""

        async def op(conn: AsyncConnection) -> list[JobStatus]:
            return await observe.browse(conn, queue, state, offset, limit, self.name)

        observe.check_page(offset, limit)
        return await self._run("list a queue's jobs", op, write=False)

    async def groups(self, queue: str, offset: int = 0, limit: int = 100) -> list[GroupInfo]:
        """A page of `queue`'s groups from `queue_groups`, by name (`sql_observe`)."""

        async def op(conn: AsyncConnection) -> list[GroupInfo]:
            return await observe.groups(conn, queue, offset, limit)

        observe.check_page(offset, limit)
        return await self._run("list a queue's groups", op, write=False)

    async def prune_records(self, ended_before: float | None = None) -> int:
        """Delete records past their keep time, counters older than two hours, unique-key
        rows whose job is gone and whose `unique_for` has passed, and the limit rows of idle
        keys (`sql_workflow.prune_limits`); with `ended_before` (epoch seconds), also every
        record that ended earlier (`sql_lifecycle.prune_ended`). Returns the records deleted.

        In batches of `sql_lifecycle.PRUNE_BATCH` rows, each its own short transaction.
        """
        deleted = 0
        while True:
            batch = await self._run("prune job records", life.prune_records)
            deleted += batch
            if batch < life.PRUNE_BATCH:
                break
        if ended_before is not None:
            cutoff = check_cutoff(ended_before)
            before = t.to_db_time(datetime.fromtimestamp(cutoff, UTC))
            after: tuple[str, str] | None = None
            while True:

                async def old(
                    conn: AsyncConnection, after: tuple[str, str] | None = after
                ) -> tuple[int, tuple[str, str] | None]:
                    return await life.prune_ended(conn, before, after)

                batch, after = await self._run("prune old job records", old)
                deleted += batch
                if after is None:
                    break
        await self._run("prune job counters", life.prune_counts)
        await self._run("prune unique keys", life.prune_keys)
        await self._run("prune once keys and markers", wf.prune_once)
        await self._run("prune idle limit keys", wf.prune_limits)
        await self._run("prune idle groups", groups.prune)
        return deleted

    # -- small named values ------------------------------------------------------------

    async def paused(self, queues: Sequence[str]) -> set[str]:
        """One query (`name IN (...)` on `queue_markers`, in batches), not one per queue."""
        if not queues:
            return set()
        by_marker = {pause_marker(q): q for q in queues}

        async def op(conn: AsyncConnection) -> dict[str, str]:
            return await wf.get_markers(conn, list(by_marker))

        values = await self._run("read pause markers", op, write=False)
        return {by_marker[name] for name, value in values.items() if value == "1"}

    async def get_marker(self, name: str) -> str | None:
        """The value in `queue_markers`, unless it expired."""

        async def op(conn: AsyncConnection) -> str | None:
            return await wf.get_marker(conn, name)

        return await self._run("read a marker", op, write=False)

    async def set_marker(self, name: str, value: str, ttl: float) -> None:
        """Upsert the row of `queue_markers`."""

        async def op(conn: AsyncConnection) -> None:
            await wf.set_marker(conn, name, value, ttl)

        await self._run("write a marker", op)

    async def claim_marker(self, name: str, value: str, ttl: float) -> bool:
        """Take over an expired row or insert a new one, in one transaction
        (`sql_workflow.claim_marker`)."""
        if not 0 < ttl < float("inf"):
            raise ValueError(f"claim_marker {name!r}: ttl must be a positive number, not {ttl!r}")
        if len(name) > wf.MARKER_NAME_LENGTH:
            # Checked here: the INSERT IGNORE would store a cut name on MySQL, not refuse it.
            raise ValueError(
                f"claim_marker {name[:40]!r}...: a marker name is at most "
                f"{wf.MARKER_NAME_LENGTH} characters, not {len(name)}"
            )

        async def op(conn: AsyncConnection) -> bool:
            return await wf.claim_marker(conn, name, value, ttl)

        return await self._run("claim a marker", op)

    async def set_markers(self, items: Sequence[tuple[str, str, float]]) -> None:
        """One transaction of batched upserts (`sql_workflow.set_markers`): all or nothing."""
        check_marker_items(items)
        for index, (name, _, _) in enumerate(items):
            if len(name) > wf.MARKER_NAME_LENGTH:
                raise ValueError(
                    f"set_markers item {index} ({name[:40]!r}...): a marker name is at most "
                    f"{wf.MARKER_NAME_LENGTH} characters, not {len(name)}"
                )
        if not items:
            return

        async def op(conn: AsyncConnection) -> None:
            await wf.set_markers(conn, items)

        await self._run("write markers", op)

    async def get_markers(self, names: Sequence[str]) -> list[str | None]:
        """One transaction of `name IN (...)` reads in batches (`sql_workflow.get_markers`)."""
        if not names:
            return []

        async def op(conn: AsyncConnection) -> dict[str, str]:
            return await wf.get_markers(conn, names)

        found = await self._run("read markers", op, write=False)
        return [found.get(name) for name in names]

    # -- worker registry and the restart signal ---------------------------------------------

    async def report_worker(self, info: WorkerInfo, ttl: float) -> None:
        """Upsert the worker's row; rows whose heartbeat expired are deleted on the way."""
        values = {"id": info.id, "info": info.to_json().decode(), "expires_at": t.now(ttl)}
        workers = t.queue_workers.c

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.queue_workers).where(workers.expires_at < t.now()))
            await t.upsert(conn, t.queue_workers, values)

        await self._run("report a worker", op)

    async def remove_worker(self, worker_id: str) -> None:
        """Delete a stopped worker's row."""

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(delete(t.queue_workers).where(t.queue_workers.c.id == worker_id))

        await self._run("remove a worker", op)

    async def workers(self) -> list[WorkerInfo]:
        """Workers whose last report has not expired, by id."""
        workers = t.queue_workers.c
        query = select(workers.info).where(workers.expires_at > t.now()).order_by(workers.id)

        async def op(conn: AsyncConnection) -> list[WorkerInfo]:
            return [WorkerInfo.from_json(raw) for raw in (await conn.scalars(query)).all()]

        return await self._run("list workers", op, write=False)

    async def request_restart(self, at: float) -> None:
        """Store `at` as the `restart_at` value in `queue_meta`."""

        async def op(conn: AsyncConnection) -> None:
            await t.upsert(conn, t.queue_meta, {"name": "restart_at", "value": repr(at)})

        await self._run("request a restart", op)

    async def restart_requested_at(self) -> float | None:
        """The `restart_at` value in `queue_meta`, if any."""
        meta = t.queue_meta.c

        async def op(conn: AsyncConnection) -> float | None:
            value = await conn.scalar(select(meta.value).where(meta.name == "restart_at"))
            return None if value is None else float(value)

        return await self._run("read the restart time", op, write=False)


class DatabaseFailedStore(FailedStore):
    """Failed jobs in `queue_failed_jobs`, one row per job id (uuid)."""

    def __init__(self, driver: DatabaseDriver) -> None:
        self._driver = driver

    @staticmethod
    def _record(row: Row[Any]) -> FailedJob:
        return FailedJob(
            id=row.uuid,
            connection=row.connection,
            queue=row.queue,
            payload=row.payload,
            exception=row.exception,
            failed_at=t.from_db_time(row.failed_at),
            record_id=row.record_id,
        )

    async def add(self, record: FailedJob) -> None:
        """Insert the record, replacing an earlier one with the same job id."""
        values = {
            "uuid": record.id,
            "connection": record.connection,
            "queue": record.queue,
            "payload": record.payload,
            "exception": record.exception,
            "failed_at": t.to_db_time(record.failed_at),
            "record_id": new_record_id(),
        }

        async def op(conn: AsyncConnection) -> None:
            await t.upsert(conn, t.queue_failed_jobs, values)

        await self._driver._run("record a failed job", op)

    async def list(
        self, queue: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[FailedJob]:
        """Records, newest `failed_at` first, optionally of one queue."""
        query = select(t.queue_failed_jobs).order_by(_failed.failed_at.desc(), _failed.id.desc())
        if queue is not None:
            query = query.where(_failed.queue == queue)
        query = query.limit(limit).offset(offset)

        async def op(conn: AsyncConnection) -> list[FailedJob]:
            return [self._record(row) for row in (await conn.execute(query)).all()]

        return await self._driver._run("list failed jobs", op, write=False)

    async def get(self, job_id: str) -> FailedJob | None:
        """One record by job id."""
        query = select(t.queue_failed_jobs).where(_failed.uuid == job_id)

        async def op(conn: AsyncConnection) -> FailedJob | None:
            row = (await conn.execute(query)).first()
            return None if row is None else self._record(row)

        return await self._driver._run("read a failed job", op, write=False)

    async def _delete(self, what: str, *where: ColumnElement[bool]) -> int:
        async def op(conn: AsyncConnection) -> int:
            return int((await conn.execute(delete(t.queue_failed_jobs).where(*where))).rowcount)

        return await self._driver._run(what, op)

    async def forget(self, job_id: str) -> bool:
        """Delete one record; `False` if there was none."""
        return await self._delete("forget a failed job", _failed.uuid == job_id) > 0

    async def claim(self, record: FailedJob) -> FailedJob | None:
        """A conditional UPDATE of the record id: one caller's changes the row."""
        new = claim_record_id(time.time())
        held = and_(_failed.uuid == record.id, _failed.record_id == record.record_id)

        async def op(conn: AsyncConnection) -> int:
            result = await conn.execute(
                update(t.queue_failed_jobs).where(held).values(record_id=new)
            )
            return int(result.rowcount)

        won = await self._driver._run("claim a failed job", op)
        return replace(record, record_id=new) if won else None

    async def remove(self, record: FailedJob) -> bool:
        """Delete the record if it still has this record id."""
        held = and_(_failed.uuid == record.id, _failed.record_id == record.record_id)
        return await self._delete("remove a failed job", held) > 0

    async def flush(self, queue: str | None = None) -> int:
        """Delete every record (of one queue)."""
        where = [] if queue is None else [_failed.queue == queue]
        return await self._delete("flush failed jobs", *where)

    async def prune(self, before: datetime) -> int:
        """Delete records that failed before `before`."""
        return await self._delete("prune failed jobs", _failed.failed_at < t.to_db_time(before))

    async def count(self, queue: str | None = None) -> int:
        """How many records (of one queue)."""
        query = select(func.count()).select_from(t.queue_failed_jobs)
        if queue is not None:
            query = query.where(_failed.queue == queue)

        async def op(conn: AsyncConnection) -> int:
            return int(await conn.scalar(query) or 0)

        return await self._driver._run("count failed jobs", op, write=False)
