"""Dependencies (`depends_on`) and workflow records (chains, batches) on the amqp connection.

RabbitMQ cannot hold a message aside, and the companion store has no transactions: only
markers, with `claim_marker` (set if absent, atomic) as the one primitive two writers can
meet on. What a deferred job needs is built on them (marker names in amqp_records.py):

* A deferred job (or a workflow record) is its record, status `deferred`, and what it waits
  for in `Record.extra`: `deps` (ids, in push order), `rule`, `delay` (counted from its push),
  `kind`, `cof` (a record's cancel_on_failure). Its payload waits in `<P>:payload:<id>`;
  nothing is published until it is released.
* It registers with each dependency in a slot `<P>:dep:<dependency>:<n>` (n = 0, 1, ... the
  first free one, taken with `claim_marker`: two pushes at once never take the same slot).
  Slots fill from 0 without holes, so an ender reads them in batches until the first free one.
* Two orders make it race-free without a transaction. The dependent writes its record and its
  slots, then reads its dependencies' records; the ender writes its ended record, then reads
  the slots. Whichever comes second sees the other: either the dependent finds its dependency
  ended, or the ender finds the dependent registered (or both).
* An end whose record is not kept (`keep` 0) leaves `<P>:end:<id>` (its status, a day) before
  the slots are read, so a dependent reading just after still learns how it ended.
* Resolving a dependent reads all its dependencies and applies its rule; releasing or
  cancelling it happens once per push of it, behind `<P>:released:<id>:<gen>` (a claim).
  Release = the record written queued or scheduled (due at push + delay, its ttl counting from
  then), then the message published as `push` does; cancel = the record cancelled with the
  dependency's id and status, and its own dependents resolved in turn.
* A workflow record counts its members' ends (`JobStatus.progress`) and ends itself with the
  last one; `cancel_on_failure` cancels the members still waiting at the first failure (once,
  behind `<P>:tripped:<id>:<gen>`); cancelling the record cancels its members not ended.
* Deferred jobs are counted per queue (`QueueStats.deferred`) by a placeholder job in the
  store's own queue shadowing this one (`history_queue`, never due, never reserved): the
  store counts and removes it atomically.

A process that dies between writing an end and resolving the dependents leaves them deferred
with every dependency ended: they are resolved again whenever they are looked at (`job_status`,
so `result()` and `queue:job` too, and `cancel`), and by the workers' heartbeat (`sweep`: a
page of each queue's deferred jobs every `SWEEP_EVERY` seconds). One that dies holding a
release claim (between the claim and the record's write) is taken over by the next look once
the claim is `STALE` seconds old and the record still says deferred; one that dies between
writing the released record and publishing (the record says `releasing` until the claim says
`SENT_MARK`) is published by one taker once the claim is stale, when looked at or swept. A
dependency purged by a `clear` (a purge names no job) ends when its dependent is looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from core.queue.drivers.amqp_records import (
    LIVE_TTL,
    Record,
    decode_payload,
    encode_payload,
    history_queue,
)
from core.queue.drivers.base import Outcome, OutgoingJob, Pushed
from core.status import ENDED, WAITING, JobStatus, Progress, Status

if TYPE_CHECKING:
    from core.queue.drivers.amqp import AmqpDriver

__all__ = ["Dependencies"]

logger = logging.getLogger("topiq.amqp")

#: Endings that count as a failure for the "failed" rule and a workflow's progress.
FAILURES = frozenset({Status.FAILED, Status.EXPIRED})
#: Dependent slots read per store round trip.
SLOTS = 16
#: Seconds after which a release claim whose record still says deferred is taken over (its
#: holder died between the claim and the record's write).
STALE = 60.0
#: Seconds the status of an end whose record is not kept stays readable for its dependents.
END_KEEP = 86400.0
#: The delay of the placeholder counting a deferred job: never due.
NEVER = 10 * 365 * 86400.0
#: Pauses while a cancel waits for a release under way to write its record.
CANCEL_PAUSES = 100
#: The `sent` of a record not put in line yet (later than any clear).
NOT_SENT = 2**62
#: A release claim's value once the released job's message is published.
SENT_MARK = "sent"
#: What a released job's record says until it starts.
_RELEASED = frozenset({Status.QUEUED, Status.SCHEDULED})
#: Deferred jobs listed per store round trip by `clear`.
CLEAR_PAGE = 500
#: Seconds between two sweeps of one driver for deferred jobs left unresolved, and how many
#: of a queue's deferred jobs each sweep looks at.
SWEEP_EVERY = 30.0
SWEEP_PAGE = 200


def _status(text: str | None) -> Status | None:
    try:
        return Status(text) if text else None
    except ValueError:
        return None


def _progress(statuses: Sequence[Status | None]) -> Progress:
    return Progress(
        len(statuses),
        sum(1 for s in statuses if s is None),
        sum(1 for s in statuses if s is Status.SUCCEEDED),
        sum(1 for s in statuses if s in FAILURES),
        sum(1 for s in statuses if s is Status.CANCELLED),
    )


def _kind(record: Record) -> str:
    return str(record.extra.get("kind", "job"))


def _deps(record: Record) -> list[str]:
    deps = record.extra.get("deps")
    return [str(d) for d in deps] if isinstance(deps, list) else []


class Dependencies:
    """The dependency and workflow-record rules of one `AmqpDriver` (see the module
    docstring); the driver calls in at push, at each end, and from `cancel`, `job_status`
    and `stats`."""

    def __init__(self, driver: AmqpDriver) -> None:
        from core.queue.drivers.amqp import GEN, SENT

        self._d = driver
        self._gen_header = GEN
        self._sent_header = SENT
        self._swept_at = -SWEEP_EVERY  # monotonic time of the last `sweep`
        self._sweep_from: dict[str, int] = {}  # where each queue's next sweep page starts

    # -- names -------------------------------------------------------------------------

    def _slot(self, dep_id: str, n: int) -> str:
        return self._d._m("dep", dep_id, str(n))

    def _guard_name(self, record: Record) -> str:
        return self._d._m("released", record.id, str(record.extra.get("gen", "")))

    def _shadow(self, queue: str) -> str:
        return history_queue(self._d._prefix, queue)

    # -- push --------------------------------------------------------------------------

    @staticmethod
    def wanted(jobs: Sequence[OutgoingJob]) -> bool:
        """Whether a push has jobs for this module (the driver pushes the rest itself)."""
        return any(job.depends_on or job.kind != "job" for job in jobs)

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        """Push `jobs` in order: runs of plain jobs through the driver's own push, each
        deferred job or workflow record here, so that a dependency earlier in the call is
        stored (known) before its dependent is checked."""
        out: list[Pushed] = []
        plain: list[OutgoingJob] = []
        for job in jobs:
            if not job.depends_on and job.kind == "job":
                plain.append(job)
                continue
            if plain:
                out += await self._d.push(plain)
                plain = []
            out.append(await self._push_one(job))
        if plain:
            out += await self._d.push(plain)
        return out

    async def _push_one(self, job: OutgoingJob) -> Pushed:
        d = self._d
        store = d._store
        is_job = job.kind == "job"
        # A workflow record takes no id or unique key (a once key only).
        claimed = job if is_job else replace(job, check_id=False, unique_key="")
        # An unknown dependency stores nothing and takes no key (checked first); a once key
        # taken already answers before it, as on the other connections.
        deps = job.depends_on
        found = await d._read_many([dep.id for dep in deps]) if deps else []
        for dep, record in zip(deps, found, strict=True):
            if record is None or (dep.queue is not None and record.queue != dep.queue):
                once = d._m("once", job.queue, job.once_key) if job.once_key else ""
                holder = await store.get_marker(once) if once else None
                if holder:
                    return Pushed(holder, "duplicate")
                return Pushed(dep.id, "missing")
        answer = await d._claim(claimed, {})
        if answer is not None:
            return answer
        wall = time.time()
        delay = max(job.delay, 0.0)
        record = Record(
            job.id,
            job.queue,
            Status.DEFERRED,
            job=job.job,
            max_tries=job.max_tries,
            enqueued_at=wall,
            due_at=None,
            priority=job.priority,
            ttl=job.ttl,
            failure_ttl=job.failure_ttl,
            unique_key=claimed.unique_key,
            unique_for=job.unique_for,
            check_id=claimed.check_id,
        )
        record.extra.update(
            gen=os.urandom(6).hex(),
            # Not in line yet: a `clear` of its queue cannot have purged it (`_swept`); its
            # release says when it was sent. `clear` ends deferred jobs itself.
            sent=NOT_SENT,
            deps=[dep.id for dep in deps],
            rule="ended" if not is_job else job.rule,
            delay=delay,
            kind=job.kind,
        )
        if job.cancel_on_failure:
            record.extra["cof"] = True
        # Kept for as long as it may wait: past its own delay and past the latest due time of
        # its dependencies (a dependent of a job due in 60 days must not expire before it).
        # A dependency that is itself deferred has no due time yet: its wait has no bound
        # that can be known now, so neither has this one's (the sweep resolves it if its
        # dependencies' records go).
        later = [
            NEVER if r.status is Status.DEFERRED else (r.due_at or wall) - wall
            for r in found
            if r is not None
        ]
        keep = LIVE_TTL + max([delay, *later])
        items = [d._item(record, keep)]
        if is_job:
            items.append((d._m("payload", job.id), encode_payload(job.payload), keep))
        try:
            await d._remember({job.queue})
            await store.set_markers(items)
            if is_job:
                await self._count_in(record)
            for dep in deps:
                await self._register(dep.id, job.id, keep)
        except BaseException:
            await self._unclaim(claimed)
            with contextlib.suppress(Exception):
                await d._write(record, 0.0)
            raise
        # Registered: now read the dependencies (some may have ended before the slots).
        await self._cascade([], first=[job.id])
        return Pushed(job.id)

    async def _unclaim(self, job: OutgoingJob) -> None:
        """Let go of what `_claim` took for a job that is not stored."""
        d = self._d
        if job.check_id:
            await d._free(d._m("id", job.queue, job.id), job.id)
        if job.unique_key:
            await d._free(d._m("key", job.queue, job.unique_key), job.id)
        if job.once_key:
            await d._free(d._m("once", job.queue, job.once_key), job.id)

    async def _register(self, dep_id: str, dependent: str, keep: float) -> None:
        """Take the first free slot of `dep_id` for `dependent` (kept as long as it)."""
        store = self._d._store
        n = 0
        while True:
            names = [self._slot(dep_id, i) for i in range(n, n + SLOTS)]
            for name, value in zip(names, await store.get_markers(names), strict=True):
                if value is None and await store.claim_marker(name, dependent, keep):
                    return
            n += SLOTS

    async def _dependents(self, dep_id: str) -> list[str]:
        """The dependents registered with `dep_id`, in the order they registered."""
        out: list[str] = []
        n = 0
        while True:
            names = [self._slot(dep_id, i) for i in range(n, n + SLOTS)]
            for value in await self._d._store.get_markers(names):
                if value is None:
                    return out
                out.append(value)
            n += SLOTS

    # -- ends --------------------------------------------------------------------------

    async def ended(self, items: Sequence[tuple[Record, float]]) -> None:
        """Jobs ended (their records written, each kept `keep` seconds): resolve whatever
        waits for them. An error is logged, not raised: the end itself is stored, and the
        dependents are resolved again when looked at."""
        if not items:
            return
        try:
            gone = [
                (self._d._m("end", record.id), record.status.value, END_KEEP)
                for record, keep in items
                if keep <= 0
            ]
            if gone:
                await self._d._store.set_markers(gone)
            await self._cascade([record.id for record, _ in items])
        except Exception as exc:
            logger.warning(
                "could not resolve the dependents of %d ended jobs (they are resolved when "
                "next looked at): %s",
                len(items),
                exc,
                exc_info=True,
            )

    async def _cascade(self, ended: Sequence[str], first: Sequence[str] = ()) -> None:
        """Resolve `first`, then the dependents of every id ended, and of those their
        resolution ends in turn (a work list: a chain of cancels never recurses)."""
        work: deque[str] = deque(ended)
        for job_id in first:
            work.extend(await self._resolve(job_id))
        store = self._d._store
        while work:
            batch = [work.popleft() for _ in range(len(work))]
            heads = await store.get_markers([self._slot(job_id, 0) for job_id in batch])
            for job_id, head in zip(batch, heads, strict=True):
                if head is None:
                    continue
                for dependent in await self._dependents(job_id):
                    work.extend(await self._resolve(dependent))

    async def _statuses(self, ids: Sequence[str]) -> list[Status | None]:
        """How each of `ids` ended (`None`: not yet), in one round trip."""
        if not ids:
            return []
        d = self._d
        raw = await d._store.get_markers(
            [d._m("job", i) for i in ids] + [d._m("end", i) for i in ids]
        )
        out: list[Status | None] = []
        for i in range(len(ids)):
            record = Record.loads(raw[i])
            if record is not None:
                out.append(record.status if record.status in ENDED else None)
            else:
                out.append(_status(raw[len(ids) + i]))
        return out

    @staticmethod
    def _decide(record: Record, statuses: Sequence[Status | None]) -> tuple[str, str]:
        """What a deferred record's dependencies allow now: ("release" | "cancel" |
        "finish" | "trip" | "", the cancel's error)."""
        deps = _deps(record)
        if _kind(record) != "job":
            failed = any(s in FAILURES for s in statuses)
            if record.extra.get("cof") and failed and any(s is None for s in statuses):
                return "trip", ""
            return ("finish", "") if all(s is not None for s in statuses) else ("", "")
        rule = record.extra.get("rule", "succeeded")
        done = all(s is not None for s in statuses)
        if rule == "failed":
            if any(s in FAILURES for s in statuses):
                return "release", ""
            return ("cancel", "no dependency failed") if done else ("", "")
        if rule == "ended":
            return ("release", "") if done else ("", "")
        for dep, status in zip(deps, statuses, strict=True):
            if status is not None and status is not Status.SUCCEEDED:
                return "cancel", f"dependency {dep} {status}"
        return ("release", "") if done else ("", "")

    async def _resolve(self, job_id: str) -> list[str]:
        """Apply a deferred job's (or record's) rule to its dependencies as they are now;
        the ids it ended."""
        record = await self._d._read(job_id)
        if record is None or record.status is not Status.DEFERRED:
            return []
        statuses = await self._statuses(_deps(record))
        return await self._act(record, statuses)

    async def _act(self, record: Record, statuses: Sequence[Status | None]) -> list[str]:
        action, error = self._decide(record, statuses)
        if action == "release":
            await self._release(record)
            return []
        if action == "cancel":
            return await self._cancel_deferred(record, error)
        if action == "trip":
            return await self._trip(record)
        if action == "finish":
            return await self._finish(record, statuses)
        return []

    async def _guard(self, record: Record) -> Record | None:
        """Take the right to release or end a deferred record (once per push of it); its
        record as it is now, or `None` when it is someone else's or no longer deferred."""
        d = self._d
        store = d._store
        name = self._guard_name(record)
        stamp = repr(time.time())
        if not await store.claim_marker(name, stamp, LIVE_TTL):
            held = await store.get_marker(name)
            try:
                age = time.time() - float(held or "")
            except ValueError:
                age = 0.0
            if held is None or age < STALE:
                return None
            now = await d._read(record.id)
            if now is None or now.status is not Status.DEFERRED:
                return None
            # Its holder died between the claim and the record's write: one taker of this
            # stale claim goes on.
            if not await store.claim_marker(f"{name}:{held}", stamp, LIVE_TTL):
                return None
            await store.set_marker(name, stamp, LIVE_TTL)
        now = await d._read(record.id)
        if (
            now is None
            or now.status is not Status.DEFERRED
            or now.extra.get("gen") != record.extra.get("gen")
        ):
            return None
        return now

    async def _release(self, record: Record) -> None:
        """The dependencies allow it: queued (scheduled while its delay from the push has not
        passed), then its message published as `push` publishes one."""
        d = self._d
        held = await self._guard(record)
        if held is None:
            return
        record = held
        wall = time.time()
        delay = float(record.extra.get("delay", 0.0) or 0.0)
        due = max((record.enqueued_at or wall) + delay, wall)
        record.status = Status.SCHEDULED if due > wall else Status.QUEUED
        record.due_at = due
        record.extra["sent"] = int(wall * 1000)
        # Until its claim says SENT_MARK: a release that died before publishing is found by
        # this (`_republish`).
        record.extra["releasing"] = True
        await d._write(record, d._live_keep(record))
        try:
            await self._publish(record)
        except BaseException:
            # Not published: deferred again, the claim let go; the next look releases it.
            record.status = Status.DEFERRED
            record.due_at = None
            record.extra.pop("releasing", None)
            with contextlib.suppress(Exception):
                await d._write(record, LIVE_TTL)
                await d._store.set_marker(self._guard_name(record), "", 0.001)
            raise
        await self._count_out(record)

    async def _publish(self, record: Record) -> None:
        """Publish a released job's message as `push` does, then mark its claim sent."""
        d = self._d
        payload = decode_payload(await d._store.get_marker(d._m("payload", record.id))) or b""
        await d._send(
            record.queue,
            record.id,
            payload,
            0,
            int((record.due_at or time.time()) * 1000),
            {
                self._gen_header: record.extra.get("gen", ""),
                self._sent_header: record.extra.get("sent", 0),
            },
        )
        await d._store.set_marker(self._guard_name(record), SENT_MARK, LIVE_TTL)

    async def _republish(self, record: Record) -> bool:
        """A released job whose claim was never marked sent, `STALE` seconds on: its releaser
        died between the record's write and the publish; one taker publishes it. Whether the
        record is settled (sent, or no longer waiting)."""
        d = self._d
        store = d._store
        name = self._guard_name(record)
        held = await store.get_marker(name)
        if held is None or held == SENT_MARK or record.status not in _RELEASED:
            return True
        try:
            age = time.time() - float(held)
        except ValueError:
            return False
        if age < STALE or not await store.claim_marker(f"{name}:{held}", "1", LIVE_TTL):
            return False
        now = await d._read(record.id)
        if (
            now is None
            or now.status not in _RELEASED
            or now.extra.get("gen") != record.extra.get("gen")
        ):
            return True
        logger.warning("publishing job %s again: its release was cut off", record.id)
        await self._publish(now)
        await self._count_out(now)
        return True

    async def _cancel_deferred(self, record: Record, error: str) -> list[str]:
        held = await self._guard(record)
        if held is None:
            return []
        await self._end_cancelled(held, error)
        return [held.id]

    async def _end_cancelled(self, record: Record, error: str) -> None:
        """End a deferred job (its release claim taken) as cancelled with `error`."""
        d = self._d
        d._ended(record, Outcome(Status.CANCELLED, record.failure_ttl, error=error), time.time())
        await d._write(record, record.failure_ttl)
        if record.failure_ttl <= 0:
            await d._store.set_marker(d._m("end", record.id), record.status.value, END_KEEP)
        if _kind(record) == "job":
            # Sent at once: the end that caused it may have been another process's.
            await d._count([(record.queue, Status.CANCELLED)], now=True)
        await d._release_claims(record)
        await self._count_out(record)

    async def _trip(self, record: Record) -> list[str]:
        """A record's first failed member, with cancel_on_failure: its members still waiting
        (not running ones) are cancelled, once; then the record ends if they all have."""
        d = self._d
        name = d._m("tripped", record.id, str(record.extra.get("gen", "")))
        if await d._store.claim_marker(name, "1", LIVE_TTL):
            await self._cancel_members(record, ask_running=False)
        statuses = await self._statuses(_deps(record))
        if all(s is not None for s in statuses):
            return await self._finish(record, statuses)
        return []

    async def _finish(self, record: Record, statuses: Sequence[Status | None]) -> list[str]:
        """End a workflow record whose members have all ended."""
        d = self._d
        held = await self._guard(record)
        if held is None:
            return []
        progress = _progress(statuses)
        if progress.failed:
            status = Status.FAILED
            error = f"{progress.failed} of {progress.total} members failed"
        elif progress.cancelled:
            status = Status.CANCELLED
            error = f"{progress.cancelled} of {progress.total} members cancelled"
        else:
            status, error = Status.SUCCEEDED, ""
        keep = d.settings.queue_result_ttl if status is Status.SUCCEEDED else held.failure_ttl
        d._ended(held, Outcome(status, keep, error=error), time.time())
        held.extra["progress"] = [
            progress.total,
            progress.pending,
            progress.succeeded,
            progress.failed,
            progress.cancelled,
        ]
        await d._write(held, keep)
        if keep <= 0:
            await d._store.set_marker(d._m("end", held.id), status.value, END_KEEP)
        return [held.id]  # records are not counted in `recent`

    # -- cancel ------------------------------------------------------------------------

    @staticmethod
    def handles(record: Record) -> bool:
        """Whether `cancel` / `job_status` of `record` is this module's."""
        return record.status is Status.DEFERRED or _kind(record) != "job"

    @staticmethod
    def looks(record: Record) -> bool:
        """Whether `job_status` of `record` is this module's: `handles`, or a released job
        not started yet (its release may have been cut off: `_republish`)."""
        return Dependencies.handles(record) or (
            bool(record.extra.get("releasing")) and record.status in _RELEASED
        )

    async def cancel(self, record: Record) -> bool:
        """Cancel a deferred job (its dependents resolved in turn), or a workflow record's
        members that have not ended (running ones asked to): the record ends with them."""
        d = self._d
        if _kind(record) != "job":
            if record.status in ENDED:
                return False
            await self._cancel_members(record, ask_running=True)
            await self._cascade([], first=[record.id])
            return True
        for _ in range(CANCEL_PAUSES):
            held = await self._guard(record)
            if held is not None:
                await self._end_cancelled(held, "cancelled")
                await self._cascade([held.id])
                return True
            now = await d._read(record.id)
            if now is None or now.extra.get("gen") != record.extra.get("gen"):
                return False
            if now.status is not Status.DEFERRED:
                # Released (or ended) meanwhile: cancelled as what it is now.
                return await d.cancel(record.id, record.queue)
            await asyncio.sleep(0.02)  # a release under way writes its record in a moment
        return False

    async def _cancel_members(self, record: Record, *, ask_running: bool) -> None:
        """Cancel the members of a workflow record that have not ended (nested records'
        too); running ones only when `ask_running`."""
        d = self._d
        members = _deps(record)
        for member, found in zip(members, await d._read_many(members), strict=True):
            if found is None or found.status in ENDED:
                continue
            if _kind(found) != "job":
                await self._cancel_members(found, ask_running=ask_running)
                await self._cascade([], first=[found.id])
            elif found.status in WAITING or (ask_running and found.status is Status.RUNNING):
                await d.cancel(member, found.queue)

    # -- looking -----------------------------------------------------------------------

    async def status(self, record: Record) -> JobStatus | None:
        """What `job_status` shows of a deferred job or a workflow record: resolved first if
        its dependencies allow (a resolution lost with a dead process happens here)."""
        d = self._d
        if record.extra.get("releasing") and record.status in _RELEASED:
            await self._republish(record)
        if record.status is Status.DEFERRED:
            statuses = await self._statuses(_deps(record))
            if await self._swept(_deps(record), statuses):
                statuses = await self._statuses(_deps(record))
            action, _ = self._decide(record, statuses)
            if action:
                ended = await self._act(record, statuses)
                await self._cascade(ended)
                found = await d._read(record.id)
                if found is None:
                    return None
                record = found
                if record.status is Status.DEFERRED:
                    statuses = await self._statuses(_deps(record))
        else:
            statuses = []
        view = record.view(d.name)
        kind = _kind(record)
        extra: dict[str, Any] = {"kind": kind}
        if record.status is Status.DEFERRED:
            extra["due_at"] = None
            if kind == "job":
                deps = _deps(record)
                extra["waiting_for"] = tuple(
                    dep for dep, s in zip(deps, statuses, strict=True) if s is None
                )
            else:
                extra["progress"] = _progress(statuses)
        elif kind != "job":
            counts = record.extra.get("progress")
            if isinstance(counts, list) and len(counts) == 5:
                extra["progress"] = Progress(*(int(n) for n in counts))
        if view.status is Status.SCHEDULED and (record.due_at or 0) <= time.time():
            extra["status"] = Status.QUEUED
        return replace(view, **extra)

    async def _swept(self, deps: Sequence[str], statuses: Sequence[Status | None]) -> bool:
        """Whether a dependency not ended was purged by a `clear` of its queue (a purge
        cannot name the jobs it removes: they end when looked at, here); its end resolves its
        dependents as cancelled."""
        pending = [dep for dep, status in zip(deps, statuses, strict=True) if status is None]
        if not pending:
            return False
        swept = False
        for record in await self._d._read_many(pending):
            if (
                record is not None
                and record.status in WAITING
                and record.status is not (Status.DEFERRED)
            ):
                swept = await self._d._swept(record) or swept
        return swept

    async def sweep(self) -> int:
        """Resolve the deferred jobs of the connection's queues whose dependencies allow it
        already (an end whose process died before resolving them): a page of each queue per
        `SWEEP_EVERY` seconds, the pages taking turns; how many were resolved. Called by the
        heartbeat, so that a dependent nobody looks at is not left waiting."""
        now = time.monotonic()
        if now < self._swept_at + SWEEP_EVERY:
            return 0
        self._swept_at = now
        d = self._d
        resolved = 0
        for queue in await d.queues():
            offset = self._sweep_from.get(queue, 0)
            page = await d._store.browse(self._shadow(queue), "delayed", offset, SWEEP_PAGE)
            self._sweep_from[queue] = offset + len(page) if len(page) == SWEEP_PAGE else 0
            ids = [placeholder.id for placeholder in page]
            for job_id, record in zip(ids, await d._read_many(ids) if ids else [], strict=True):
                if record is None:
                    await d._store.cancel(job_id, self._shadow(queue))  # its record is gone
                    continue
                if record.status is not Status.DEFERRED:
                    # Released or ended, and its placeholder left behind by a cut-off release.
                    if await self._republish(record):
                        await self._count_out(record)
                    continue
                statuses = await self._statuses(_deps(record))
                if self._decide(record, statuses)[0]:
                    await self._cascade(await self._act(record, statuses))
                    resolved += 1
        return resolved

    # -- counts ------------------------------------------------------------------------

    async def _count_in(self, record: Record) -> None:
        await self._d._store.push(
            [
                OutgoingJob(
                    record.id,
                    self._shadow(record.queue),
                    b"",
                    delay=NEVER,
                    check_id=True,
                    on_duplicate="keep",
                    failure_ttl=0.0,
                )
            ]
        )

    async def _count_out(self, record: Record) -> None:
        if _kind(record) == "job":
            await self._d._store.cancel(record.id, self._shadow(record.queue))

    async def clear(self, queue: str) -> int:
        """End the deferred jobs of a queue being cleared, as `clear` removes them on the
        other connections: their records gone, what waits on them resolved as if they were
        cancelled. How many there were."""
        d = self._d
        store = d._store
        shadow = self._shadow(queue)
        ids: list[str] = []
        while True:
            page = await store.browse(shadow, "delayed", len(ids), CLEAR_PAGE)
            ids += [placeholder.id for placeholder in page]
            if len(page) < CLEAR_PAGE:
                break
        count = 0
        ended: list[str] = []
        for job_id, record in zip(ids, await d._read_many(ids) if ids else [], strict=True):
            held = await self._guard(record) if record is not None else None
            if held is None or held.queue != queue or _kind(held) != "job":
                continue
            held.status = Status.CANCELLED
            await d._write(held, 0.0)
            await store.set_marker(d._m("end", job_id), Status.CANCELLED.value, END_KEEP)
            await d._release_claims(held)
            await self._count_out(held)
            ended.append(job_id)
            count += 1
        await self._cascade(ended)
        return count

    async def deferred(self, queue: str) -> int:
        """Deferred jobs of `queue` (workflow records not counted)."""
        stats = await self._d._store.stats(self._shadow(queue))
        return stats.pending + stats.delayed
