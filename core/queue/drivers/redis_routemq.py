"""Importing the jobs RouteMQ left in Redis into a Topiq Redis connection.

RouteMQ (the seed implementation) kept, per queue, `<p>:queue:<q>` (a list of waiting jobs,
pushed at the tail), `<p>:queue:<q>:delayed` (a sorted set scored by the epoch second the job
becomes due), `<p>:queue:<q>:reserved` (the list its worker moved a job into with RPOPLPUSH
while running it) and `<p>:queue:failed:<q>` (a list of failed records); `<p>` is `routemq`.
A job is the JSON `{"id": "<q>:<microseconds>", "payload": "<Job.serialize()>", "attempts": n}`,
a failed record `{"connection", "queue", "payload", "exception", "failed_at": ISO, UTC}`.

Each job goes through three steps, so that an import killed at any point and run again runs no
job twice and loses none:

1. *take* (lua/routemq_take.lua, on the source): the job moves atomically from RouteMQ's key
   into the working hash `<p>:import:working` under a fresh random id, which becomes its Topiq
   job id: stored before anything is pushed, the id is the same on every later attempt;
2. *push* into Topiq with that id and a once key of the same name (kept `ONCE_FOR`): the push
   that finds the key taken stores nothing, so a job pushed by a run that died before step 3
   is not pushed again, even once it has run and ended. A failed record is added to the
   failed store under that id, which replaces a record of the same id (adding twice is one);
3. *clear*: the entry leaves the working hash, then the once key is deleted (one import at a
   time holds `<p>:import:lock`, so no other run can be pushing that entry).

A run first finishes the entries an interrupted run left in the working hash, in the order
they were taken. Tries are kept: a job's `attempts` is written to the queue's attempts hash
before the push (the push never touches it; the job's first reservation counts on from it), so
a job RouteMQ had reserved on its last try fails for good at its next start, as with RouteMQ.
Pending jobs are taken from the head of the list: they run in the order they were dispatched
(RouteMQ's worker took them from the tail, the newest first, against its documentation).

Payloads go through `convert_payload` (the SQL import's); one that cannot be read stays as it
was, and the worker that takes it records it in the failed store with the reason.

The source must be a single server (or a Sentinel's master): the take script touches two of
RouteMQ's keys, which a Redis Cluster would keep in different slots. RouteMQ could not run on
a cluster either (its RPOPLPUSH crosses slots). The destination may be any Redis topology: every
command there keeps to one queue's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from core.delays import LATEST_DUE
from core.errors import DriverError
from core.queue.drivers.base import FailedJob, FailedStore, OutgoingJob
from core.queue.drivers.redis import RedisDriver
from core.queue.drivers.sql_seed import convert_payload
from core.queue.payload import validate_queue

__all__ = [
    "KINDS",
    "ONCE_FOR",
    "ImportBusy",
    "Importer",
    "LeftKey",
    "RouteMQWorkerRunning",
    "Survey",
    "source_is_cluster",
]

Kind = Literal["reserved", "pending", "delayed", "failed"]
#: The order a queue's jobs are imported in: those RouteMQ's worker had taken first (they were
#: at the front of the line), then the waiting ones, then the delayed ones; failed records last.
KINDS: tuple[Kind, ...] = ("reserved", "pending", "delayed", "failed")

#: How long a pushed job's once key is kept if its import dies before clearing it: a run
#: started within this time finds it and does not push the job again.
ONCE_FOR = 30 * 86400.0
#: The import lock's lease (seconds): a run killed on another host frees it after this long.
LOCK_LEASE = 30.0

# A delayed entry scored past LATEST_DUE (the limit a dispatch's delay has; or `inf`) is
# imported due then, and the import says so.

#: Steps a test may stop the import after (`Importer.crash_at`), with SIGKILL.
Step = Literal["taken", "pushed", "cleared"]


class RouteMQWorkerRunning(DriverError):
    """A RouteMQ worker took a job while the import ran: it must be stopped first."""


class ImportBusy(DriverError):
    """Another import of the same keys holds the lock."""


@dataclass(frozen=True, slots=True)
class LeftKey:
    """A key under `<p>:queue:` that the import leaves where it is, and why."""

    key: str
    reason: str


@dataclass(slots=True)
class Survey:
    """What RouteMQ's keys hold: per queue and kind the key and its length."""

    keys: dict[str, dict[Kind, tuple[str, int]]] = field(default_factory=dict)
    left: list[LeftKey] = field(default_factory=list)
    #: Entries an interrupted import left in the working hash (finished by the next run).
    working: int = 0

    def count(self, queue: str, kind: Kind) -> int:
        return self.keys.get(queue, {}).get(kind, ("", 0))[1]

    @property
    def total(self) -> int:
        return sum(n for kinds in self.keys.values() for _, n in kinds.values())


@dataclass(frozen=True, slots=True)
class _Entry:
    """One job in the working hash: its Topiq id and what the take script stored."""

    id: str
    kind: Kind
    queue: str
    seq: int
    score: float | None
    item: bytes

    @classmethod
    def parse(cls, entry_id: bytes | str, value: bytes) -> _Entry:
        kind, queue, seq, score, item = value.split(b"\n", 4)
        name = kind.decode()
        if name not in KINDS:
            raise DriverError(f"working entry {entry_id!r} has an unknown kind {name!r}")
        return cls(
            entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            name,  # checked against KINDS above
            queue.decode(),
            int(seq),
            float(score) if score else None,
            item,
        )


@dataclass(slots=True)
class Tally:
    """What an import moved, per queue and kind, and how many payloads stayed unconverted."""

    moved: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable: int = 0  # payloads kept as they were (the worker records them as failed)
    resumed: int = 0  # entries of an interrupted run finished by this one
    #: One line per delayed entry whose score was no due time Topiq accepts (inf, nan, past
    #: 9999-01-01), saying what it became.
    clamped: list[str] = field(default_factory=list)

    def add(self, entry: _Entry) -> None:
        row = self.moved.setdefault(entry.queue, dict.fromkeys(KINDS, 0))
        row[entry.kind] += 1

    @property
    def total(self) -> int:
        return sum(sum(row.values()) for row in self.moved.values())


def _script(client: aioredis.Redis, name: str) -> AsyncScript:
    text = resources.files("core.queue.drivers").joinpath(f"lua/{name}.lua").read_text("utf-8")
    return client.register_script(text)


async def source_is_cluster(client: aioredis.Redis) -> bool:
    """Whether the server `client` talks to is a Redis Cluster node."""
    info: dict[str, Any] = await client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0) or 0))


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _created(routemq_id: Any) -> datetime:
    """When RouteMQ dispatched a job, from its id `<queue>:<epoch microseconds>`; now if the
    id says nothing."""
    if isinstance(routemq_id, str):
        tail = routemq_id.rpartition(":")[2]
        if tail.isdigit() and 0 < int(tail) < 10**17:
            return datetime.fromtimestamp(int(tail) / 1_000_000, UTC)
    return datetime.now(UTC)


def _readable(payload: str) -> tuple[str, int | None] | None:
    """A Topiq payload's class path and max_tries, or `None` if it is not one."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("job"), str):
        return None
    tries = data.get("max_tries")
    return data["job"], tries if type(tries) is int and tries >= 1 else None


class Importer:
    """Moves RouteMQ's jobs from `source` (a single Redis server) into `driver` and `store`.

    Use as `async with importer.locked(): await importer.run()`; `survey()` reads only.
    """

    def __init__(
        self,
        source: aioredis.Redis,
        prefix: str,
        driver: RedisDriver,
        store: FailedStore,
        *,
        batch: int = 100,
        crash_at: tuple[Step, int] | None = None,
    ) -> None:
        self.source = source
        self.prefix = prefix
        self.driver = driver
        self.store = store
        self.batch = batch
        self.crash_at = crash_at
        self._queue_root = f"{prefix}:queue:"
        self._working = f"{prefix}:import:working"
        self._seq = f"{prefix}:import:seq"
        self._lock = f"{prefix}:import:lock"
        self._holder = f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
        self._take = _script(source, "routemq_take")
        self._lock_script = _script(source, "routemq_lock")
        self._lock_lost = False
        self._steps: dict[str, int] = {}
        self.tally = Tally()

    # -- reading -------------------------------------------------------------------------

    def _classify(self, key: str, kind_of_key: str) -> tuple[str, Kind] | str:
        """(queue, kind) for one of RouteMQ's keys, or why it is not one."""
        rest = key[len(self._queue_root) :]
        if rest.startswith("failed:") and kind_of_key == "list":
            queue, kind = rest[len("failed:") :], "failed"
        elif rest.endswith(":delayed") and kind_of_key == "zset":
            queue, kind = rest[: -len(":delayed")], "delayed"
        elif rest.endswith(":reserved") and kind_of_key == "list":
            queue, kind = rest[: -len(":reserved")], "reserved"
        elif kind_of_key == "list":
            queue, kind = rest, "pending"
        else:
            return f"a {kind_of_key}, not one of RouteMQ's lists or sorted sets"
        try:
            validate_queue(queue)
        except ValueError as exc:
            return f"{exc} (Topiq cannot hold this queue)"
        return queue, kind  # type: ignore[return-value]  # one of the literals above

    async def survey(self) -> Survey:
        """RouteMQ's keys and their lengths; reads only (single-key commands)."""
        found = Survey()
        keys: list[str] = []
        async for raw in self.source.scan_iter(match=f"{self._escaped_root()}*", count=500):
            keys.append(_decode(raw))
        for key in sorted(keys):
            kind_of_key = _decode(await self.source.type(key))
            place = self._classify(key, kind_of_key)
            if isinstance(place, str):
                found.left.append(LeftKey(key, place))
                continue
            queue, kind = place
            size = await (self.source.zcard(key) if kind == "delayed" else self.source.llen(key))
            found.keys.setdefault(queue, {})[kind] = (key, int(size))
        found.working = int(await self.source.hlen(self._working))
        return found

    def _escaped_root(self) -> str:
        """`<p>:queue:` as a SCAN pattern that matches it literally."""
        return "".join(f"\\{c}" if c in "*?[]\\" else c for c in self._queue_root)

    # -- the lock --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold `<p>:import:lock` (renewed in the background) for the block.

        A lock held by a process of this host that no longer exists (a run killed with -9)
        is taken over at once; one held elsewhere frees itself within `LOCK_LEASE`.

        Raises:
            ImportBusy: another import holds it.
        """
        lease = int(LOCK_LEASE * 1000)
        got = await self._lock_script(keys=[self._lock], args=["take", "", self._holder, lease])
        if got != 1:
            holder = _decode(got)
            if not self._dead(holder):
                raise ImportBusy(
                    f"another import of {self.prefix}:* keys is running "
                    f"({holder.rpartition(' ')[0]}); a killed one frees {self._lock} within "
                    f"{LOCK_LEASE:g}s"
                )
            again = await self._lock_script(
                keys=[self._lock], args=["take", holder, self._holder, lease]
            )
            if again != 1:
                raise ImportBusy(f"another import of {self.prefix}:* keys took the lock just now")
        renewer = asyncio.create_task(self._renew(lease), name="routemq-import-lock")
        try:
            yield
        finally:
            renewer.cancel()
            # A renewal that failed (the server went away) must not hide the block's own error.
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await renewer
            with contextlib.suppress(Exception):
                await self._lock_script(keys=[self._lock], args=["release", "", self._holder, 0])

    @staticmethod
    def _dead(holder: str) -> bool:
        """Whether the lock's holder is a process of this host that has exited."""
        host, _, rest = holder.partition(" ")
        pid = rest.partition(" ")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, someone else's
        return False

    async def _renew(self, lease: int) -> None:
        while True:
            await asyncio.sleep(LOCK_LEASE / 3)
            done = await self._lock_script(
                keys=[self._lock], args=["renew", "", self._holder, lease]
            )
            if done != 1:
                self._lock_lost = True
                return

    # -- moving ----------------------------------------------------------------------------

    async def run(self) -> Tally:
        """Finish an interrupted run's entries, then import every queue; returns the tally.

        Raises:
            RouteMQWorkerRunning: a RouteMQ worker reserved a job meanwhile (the import stops;
                what it moved stays moved).
        """
        leftovers = await self._leftovers()
        for start in range(0, len(leftovers), self.batch):
            chunk = leftovers[start : start + self.batch]
            await self._deliver(chunk, resumed=True)
            self.tally.resumed += len(chunk)
        survey = await self.survey()
        for queue in sorted(survey.keys):
            kinds = survey.keys[queue]
            for kind in KINDS:
                if kind in kinds:
                    await self._drain(queue, kind, kinds[kind][0], kinds.get("reserved"))
        return self.tally

    async def _leftovers(self) -> list[_Entry]:
        raw: dict[Any, Any] = await self.source.hgetall(self._working)
        entries = [_Entry.parse(key, value) for key, value in raw.items()]
        return sorted(entries, key=lambda e: e.seq)

    async def _drain(
        self, queue: str, kind: Kind, key: str, reserved: tuple[str, int] | None
    ) -> None:
        reserved_key = reserved[0] if reserved else f"{self._queue_root}{queue}:reserved"
        while True:
            if self._lock_lost:
                raise ImportBusy(f"the import lost {self._lock} (stalled past its lease)")
            ids = [uuid.uuid4().hex for _ in range(self.batch)]
            flat = await self._take(keys=[key, self._working, self._seq], args=[kind, queue, *ids])
            if not flat:
                break
            entries = [_Entry.parse(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
            await self._deliver(entries)
            # RouteMQ's worker moves a job into the reserved list as it starts it: one there
            # after the list was emptied means a worker still runs (its jobs would run twice).
            if kind in ("pending", "delayed") and await self.source.llen(reserved_key):
                raise RouteMQWorkerRunning(
                    f"a RouteMQ worker reserved a job of queue {queue!r} during the import "
                    f"({reserved_key} is not empty again): stop RouteMQ's workers, then run the "
                    "command again (what was imported stays imported, once)"
                )

    def _reached(self, step: Step, count: int) -> None:
        """Test hook: SIGKILL this process once `count` more jobs passed `step`."""
        self._steps[step] = self._steps.get(step, 0) + count
        crash = self.crash_at
        if crash is not None and crash[0] == step and self._steps[step] >= crash[1]:
            os.kill(os.getpid(), signal.SIGKILL)

    async def _deliver(self, entries: Sequence[_Entry], *, resumed: bool = False) -> None:
        """Push (or record) `entries`, then clear them from the working hash.

        `resumed`: entries an interrupted run took, which it may have pushed already.
        """
        self._reached("taken", len(entries))
        jobs = [e for e in entries if e.kind != "failed"]
        if jobs:
            await self._push(jobs, resumed)
        for entry in entries:
            if entry.kind == "failed":
                await self.store.add(self._failed_record(entry))
        self._reached("pushed", len(entries))
        await self.source.hdel(self._working, *[e.id for e in entries])
        if jobs:
            by_queue: dict[str, list[str]] = {}
            for job in jobs:
                by_queue.setdefault(job.queue, []).append(self._once_key(job))
            async with self.driver.client.pipeline(transaction=False) as pipe:
                for keys in by_queue.values():
                    pipe.delete(*keys)  # one queue's keys: one Cluster slot
                await pipe.execute()
        for entry in entries:
            self.tally.add(entry)
        self._reached("cleared", len(entries))

    def _once_key(self, entry: _Entry) -> str:
        # push.lua keeps a once key at <tag>:once:<key>; the key is the entry's id.
        return f"{self.driver.keys(entry.queue).tag}:once:{entry.id}"

    async def _push(self, jobs: Sequence[_Entry], resumed: bool) -> None:
        client = self.driver.client
        todo = list(jobs)
        if resumed:
            # Pushed by the interrupted run if its once key is there (a fresh id has none).
            async with client.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.exists(self._once_key(job))
                pushed_before = await pipe.execute()
            todo = [job for job, seen in zip(jobs, pushed_before, strict=True) if not seen]
        if not todo:
            return
        outgoing: list[OutgoingJob] = []
        tries: list[tuple[_Entry, int]] = []
        now = time.time()
        for job in todo:
            payload, attempts = self._job_payload(job)
            found = _readable(payload)
            if found is None:
                self.tally.unreadable += 1
            delay = self._delay(job, now)
            outgoing.append(
                OutgoingJob(
                    job.id,
                    job.queue,
                    payload.encode(),
                    delay=delay,
                    job=found[0] if found else "",
                    max_tries=found[1] if found else None,
                    check_id=True,
                    on_duplicate="keep",
                    once_key=job.id,
                    once_for=ONCE_FOR,
                )
            )
            if attempts:
                tries.append((job, attempts))
        if tries:
            # Before the push, so no worker can reserve the job with its tries uncounted; the
            # push does not touch the attempts hash, and its once key (checked above) keeps a
            # job that already ran from getting an entry that no job owns.
            async with client.pipeline(transaction=False) as pipe:
                for job, attempts in tries:
                    pipe.hsetnx(self.driver.keys(job.queue).attempts, job.id, attempts)
                await pipe.execute()
        results = await self.driver.push(outgoing)
        odd = [r for r in results if r.outcome not in ("created", "duplicate", "kept")]
        if odd:
            raise DriverError(
                f"the push of imported jobs answered {odd[0].outcome} for {odd[0].id}"
            )

    def _delay(self, job: _Entry, now: float) -> float:
        """Seconds until `job` is due, from its sorted-set score; a score Topiq cannot keep as a
        due time (nan, or past 9999-01-01, `inf` included) becomes now or that limit, noted in
        the tally for the output. `-inf` (due long ago) is simply due now."""
        score = job.score
        if score is None or score == float("-inf"):
            return 0.0
        if score != score:  # nan
            self._clamp(job, "nan", "due now")
            return 0.0
        if score > LATEST_DUE:
            self._clamp(job, repr(score), "due at the latest Topiq accepts, 9999-01-01")
            return max(0.0, LATEST_DUE - now)
        return max(0.0, score - now)

    def _clamp(self, job: _Entry, score: str, became: str) -> None:
        routemq_id: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(job.item)
            if isinstance(data, dict):
                routemq_id = data.get("id")
        named = (
            f"job {routemq_id!r}"
            if isinstance(routemq_id, str)
            else f"entry {job.item[:60].decode(errors='replace')!r}"
        )
        self.tally.clamped.append(
            f"{self._queue_root}{job.queue}:delayed: {named} (Topiq id {job.id}) had score "
            f"{score}, no due time Topiq keeps; imported {became}"
        )

    def _job_payload(self, job: _Entry) -> tuple[str, int]:
        """The Topiq payload of a RouteMQ job and the tries it had spent."""
        text = job.item.decode(errors="replace")
        try:
            data = orjson.loads(job.item)
        except orjson.JSONDecodeError:
            return text, 0
        if not isinstance(data, dict) or not isinstance(data.get("payload"), str):
            return text, 0
        attempts = data.get("attempts")
        spent = attempts if type(attempts) is int and attempts > 0 else 0
        created = _created(data.get("id"))
        return convert_payload(data["payload"], job.id, job.queue, created), spent

    def _failed_record(self, entry: _Entry) -> FailedJob:
        text = entry.item.decode(errors="replace")
        try:
            data = orjson.loads(entry.item)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("payload"), str):
            self.tally.unreadable += 1
            return FailedJob(
                entry.id,
                self.driver.name,
                entry.queue,
                text,
                "RouteMQ's failed record could not be read; it is kept whole as the payload",
                datetime.now(UTC),
            )
        failed_at = _failed_at(data.get("failed_at"))
        payload = convert_payload(data["payload"], entry.id, entry.queue, failed_at)
        if _readable(payload) is None:
            self.tally.unreadable += 1
        exception = data.get("exception")
        return FailedJob(
            entry.id,
            self.driver.name,
            entry.queue,
            payload,
            exception if isinstance(exception, str) else "",
            failed_at,
        )


def _failed_at(value: Any) -> datetime:
    """RouteMQ's `datetime.utcnow().isoformat()` as an aware UTC time; now if unreadable."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(value)
            return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return datetime.now(UTC)
