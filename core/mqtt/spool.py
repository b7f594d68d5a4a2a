"""The MQTT app's offline spool: where dispatched jobs wait while their queue backend cannot be
reached, so that the message can be acknowledged anyway (docs/iot.md, "Offline spool").

    spool = Spool(settings, stats)
    await spool.open()                # entries left by an earlier run are replayed too
    manager.spool = spool             # `QueueManager._store` spools through it
    replay = asyncio.create_task(spool.replay(manager))

The spool is a local SQLite file (`MQTT_SPOOL_PATH`, WAL, `synchronous=FULL`: a commit is on
disk before `add` returns) holding at most `MQTT_SPOOL_MAX` jobs. One entry is one push call's
`OutgoingJob`s, every field kept (`delay` as an absolute due time, `ttl` as an absolute
deadline), in order. Adds that arrive while a write is on disk are written together in the next
transaction (one fsync for all of them). Reads and writes run on one thread of the spool's own,
never on the event loop.

One process owns a spool file (an exclusive `flock`): a second one finds it taken and runs
without a spool (its pushes raise `ConnectionLostError` as if there were none) until the file is
free. A process with `MQTT_CLIENT_ID_SUFFIX` (a pool under supervisord) gets a file of its own,
the suffix before the extension: `storage/spool-00.sqlite3`.

The replay task pushes the oldest entries of each connection first; a job the backend already
knows (`job_status` is not `None`: pushed before a crash, or stored by a push whose reply was
lost) is skipped, the others are pushed with `check_id=True` and a once key of their own
(`spool:<id>`, see `replayed`), and the entries are deleted after their push. The backend takes
the once key in the push's atomic step whatever it did with the job, including when it took
the job into another one (its value coalesced into the waiting job of its `unique_key`:
"replaced" or "kept"), so a replay repeated after a crash before the delete is refused
("duplicate") and changes nothing. Such a job never has a record of its own: the id that took
it is also written into its row before the delete, and a row with such an id is skipped (it
outlives the key). An unreachable backend is retried with a capped backoff; a job the backend
refuses (an unknown dependency, a full queue, any other error) is logged and dropped, never
retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from core.errors import ConnectionLostError, SerializationError, SpoolFullError
from core.queue.drivers.base import Dependency, Driver, Limit, OutgoingJob, Pushed
from core.settings import Settings

if TYPE_CHECKING:
    from core.mqtt.stats import MqttStats
    from core.queue.queue_manager import QueueManager

__all__ = ["Spool", "SpoolEntry", "replayed", "spool_files", "spool_path", "spooled_by_queue"]

logger = logging.getLogger("topiq.mqtt.spool")

T = TypeVar("T")

#: Jobs the replay task reads (and deletes, in one transaction) at a time.
REPLAY_BATCH = 512
#: Status reads the replay task has in flight at once.
STATUS_READS = 64
#: Least life of the once key a replayed job is pushed with (`spool:<id>`, or the job's
#: `failure_ttl` when longer): a replay repeated within it (killed between its push and the
#: delete of its entries) is refused by the backend, even for a job coalesced into another.
REPLAY_ONCE_FOR = 86400.0
#: Backoff of the replay task while the backend cannot be reached: first wait, then the cap.
REPLAY_BACKOFF = 0.2
REPLAY_BACKOFF_MAX = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    entry INTEGER NOT NULL,
    connection TEXT NOT NULL,
    queue TEXT NOT NULL,
    fields BLOB NOT NULL,
    payload BLOB NOT NULL,
    spooled_at REAL NOT NULL,
    -- 1: the backend may know the job (its push failed without an answer, or a replay pushed
    -- it): the replay reads its status first. 0: it was never sent anywhere.
    maybe_sent INTEGER NOT NULL DEFAULT 1,
    -- The job a replay's push answered when it was not this one (its value coalesced into
    -- the waiting job of its unique key): the job was pushed, the next replay skips it.
    answered TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS spool_jobs_connection ON spool_jobs (connection, seq);
"""
_FIELDS = tuple(f.name for f in dataclasses.fields(OutgoingJob))


# -- where the file is ---------------------------------------------------------------------------


def spool_path(settings: Settings) -> Path:
    """This process's spool file: `MQTT_SPOOL_PATH`, with `MQTT_CLIENT_ID_SUFFIX` (made safe for
    a file name) before the extension when it is set."""
    path = Path(settings.mqtt_spool_path).expanduser()
    suffix = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.mqtt_client_id_suffix)
    if not suffix:
        return path
    return path.with_name(f"{path.stem}{suffix}{path.suffix}")


def spool_files(settings: Settings) -> list[Path]:
    """Every spool file of this project that exists: `MQTT_SPOOL_PATH` and the files of the
    processes with a client id suffix beside it."""
    base = Path(settings.mqtt_spool_path).expanduser()
    if not base.parent.is_dir():
        return []
    found = {p for p in base.parent.glob(f"{_glob_escape(base.stem)}*{_glob_escape(base.suffix)}")}
    return sorted(p for p in found if p.is_file() and not p.name.endswith(("-wal", "-shm")))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def spooled_by_queue(settings: Settings, connection: str) -> dict[str, int]:
    """Jobs of `connection` waiting in this project's spool files, per queue (read only; {}
    when there is no spool file)."""
    counts: Counter[str] = Counter()
    for path in spool_files(settings):
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            ) as db:
                rows = db.execute(
                    "SELECT queue, COUNT(*) FROM spool_jobs WHERE connection = ? GROUP BY queue",
                    (connection,),
                ).fetchall()
        except sqlite3.Error:  # not a spool (yet): no table, or not SQLite at all
            continue
        for queue, count in rows:
            counts[str(queue)] += int(count)
    return dict(counts)


# -- entries -------------------------------------------------------------------------------------


def encode_job(job: OutgoingJob, now: float) -> tuple[bytes, bytes]:
    """The stored form of one job: (its fields as JSON, its payload). `delay` becomes the
    absolute `due` time and `ttl` the absolute `expires` time (0: never)."""
    data: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(job, name)
        if name == "payload":
            continue
        if name == "delay":
            data["due"] = now + value
        elif name == "ttl":
            data["expires"] = now + job.delay + value if value > 0 else 0.0
        elif name == "depends_on":
            data[name] = [[d.id, d.queue] for d in value]
        elif name == "limit":
            data[name] = None if value is None else dataclasses.asdict(value)
        else:
            data[name] = value
    try:
        return orjson.dumps(data), bytes(job.payload)
    except TypeError as exc:
        raise SerializationError(f"job {job.id} cannot be written to the spool: {exc}") from None


def decode_job(fields: bytes, payload: bytes, now: float) -> OutgoingJob:
    """The job `encode_job` stored, its delay and ttl counted from `now`. A job whose ttl ran
    out in the spool gets the shortest ttl, so the backend expires it (status `expired`)."""
    data = orjson.loads(fields)
    values: dict[str, Any] = {name: data[name] for name in _FIELDS if name in data}
    values["payload"] = payload
    values["delay"] = max(0.0, float(data.get("due", now)) - now)
    expires = float(data.get("expires", 0.0))
    values["ttl"] = 0.0 if expires <= 0 else max(expires - now - values["delay"], 0.001)
    values["depends_on"] = tuple(Dependency(i, q) for i, q in data.get("depends_on", ()))
    limit = data.get("limit")
    values["limit"] = None if limit is None else Limit(**limit)
    return OutgoingJob(**values)


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """A stored job with its place: `seq` orders jobs, `entry` groups one push call's jobs."""

    seq: int
    entry: int
    job: OutgoingJob
    #: The backend may know it already (its push failed without an answer, or a replay
    #: pushed it before): its status is read before it is pushed.
    maybe_sent: bool = True
    #: The job a replay's push of it answered, when another one (coalesced): pushed already.
    answered: str = ""


@dataclass(slots=True)
class _Add:
    connection: str
    rows: list[tuple[bytes, bytes]]
    queues: list[str]
    maybe_sent: bool
    done: asyncio.Future[None]


# -- the spool -----------------------------------------------------------------------------------


class Spool:
    """A `JobSpool` (core.queue.queue_manager) on a local SQLite file; see the module doc.

    Args:
        settings: `MQTT_SPOOL_PATH`, `MQTT_SPOOL_MAX`, `MQTT_CLIENT_ID_SUFFIX`.
        stats: The app's counters (`spooled`, `replayed`, `spool_dropped`, `spool_full`,
            `spool_depth`), when given.
        path: Another file than the settings name.
    """

    def __init__(
        self, settings: Settings, stats: MqttStats | None = None, *, path: Path | None = None
    ) -> None:
        self.path = path if path is not None else spool_path(settings)
        self.max_jobs = settings.mqtt_spool_max
        self.stats = stats
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._held: Counter[str] = Counter()  # jobs on disk, per connection
        self._pending: Counter[str] = Counter()  # jobs being written, per connection
        self._next_entry = 1
        self._adds: list[_Add] = []
        self._writer: asyncio.Task[None] | None = None
        self._stored = asyncio.Event()  # set after each write: wakes the replay task
        self._full = False  # in a "full" episode (warned once)
        self._unavailable = ""  # why the file cannot be used (another process has it)
        self._outage: set[str] = set()  # connections in an outage (warned once)
        self._closed = False
        self._opening: asyncio.Lock | None = None
        self._asked: tuple[object, str, bool] | None = None  # the last `holds` call
        #: Transactions written (each one fsync): concurrent adds share one.
        self.writes = 0

    # -- the JobSpool protocol ---------------------------------------------------------------

    def holds(self, connection: str) -> bool:
        """Whether jobs of `connection` are in the spool or on their way into it (O(1))."""
        held = self._held[connection] > 0 or self._pending[connection] > 0
        # `QueueManager._store` adds at once (no await between) when this is true: such
        # jobs were never sent to the backend, and their replay need not ask it about them.
        self._asked = (_current_task(), connection, held)
        return held

    async def add(self, connection: str, jobs: Sequence[OutgoingJob]) -> None:
        """Write one push call's `jobs`, on disk before returning. `SpoolFullError` when they
        would take the spool past `MQTT_SPOOL_MAX` jobs (nothing is stored);
        `ConnectionLostError` when the file cannot be used or written."""
        # Before any await: did this task's `holds` just send these jobs here unsent?
        unsent = self._asked == (_current_task(), connection, True)
        self._asked = None
        if not jobs:
            return
        if self._closed:
            raise ConnectionLostError("the offline spool is closed (the app is stopping)")
        if self._db is None:
            await self.open(create=True)
            if self._db is None:
                raise ConnectionLostError(self._unavailable)
        count = len(jobs)
        taken = self.depth + sum(self._pending.values())
        if taken + count > self.max_jobs:
            self._refuse(connection, count, taken)
        self._room_again(taken)
        now = time.time()
        rows = [encode_job(job, now) for job in jobs]
        if connection not in self._outage:
            self._outage.add(connection)
            logger.warning(
                "could not reach the queue connection %s: dispatched jobs go to the offline "
                "spool %s and are pushed in order once it answers",
                connection,
                self.path,
            )
        self._pending[connection] += count
        add = _Add(
            connection, rows, [job.queue for job in jobs], not unsent, self._loop().create_future()
        )
        self._adds.append(add)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_adds(), name="topiq-spool-writer")
        # Shielded: a cancelled handler does not unwrite its jobs; they are replayed.
        await asyncio.shield(add.done)

    # -- the file ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs in the spool file."""
        return sum(self._held.values())

    def held(self, connection: str) -> int:
        """Jobs of `connection` in the spool file."""
        return self._held[connection]

    async def open(self, *, create: bool = False) -> None:
        """Open the file (creating it and its folder with `create`) and count what it holds.
        No file and no `create`: nothing to do (it is made by the first `add`). Taken by
        another process: logged once, and `add` raises `ConnectionLostError` until it is free."""
        if self._db is not None or self._closed:
            return
        if not create and not self.path.exists():
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # concurrent first adds open it once
            if self._db is None:
                await self._open_file()

    async def _open_file(self) -> None:
        try:
            await self._run(self._open)
        except _Unusable as exc:
            if not self._unavailable:
                logger.warning("%s; this app runs without an offline spool meanwhile", exc)
            self._unavailable = str(exc)
            return
        self._unavailable = ""
        # Jobs behind an earlier run's entries are spooled without a new outage warning.
        self._outage.update(conn for conn, count in self._held.items() if count)
        if self.depth:
            logger.info(
                "the offline spool %s holds %d jobs from an earlier run; replaying them",
                self.path,
                self.depth,
            )
        self._update_depth()

    async def close(self) -> None:
        """Finish the writes in progress and close the file (its jobs stay for the next run)."""
        self._closed = True
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._executor is not None:
            with contextlib.suppress(RuntimeError):
                await self._run(self._close)
            self._executor.shutdown(wait=False)
            self._executor = None

    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="topiq-spool")
        return await self._loop().run_in_executor(self._executor, call, *args)

    # On the spool's thread ---------------------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _Unusable(f"the offline spool {self.path} is used by another process") from None
        try:
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(spool_jobs)")}
            if "answered" not in columns:  # a file of an earlier version
                db.execute("ALTER TABLE spool_jobs ADD COLUMN answered TEXT NOT NULL DEFAULT ''")
            rows = db.execute(
                "SELECT connection, COUNT(*), MAX(entry) FROM spool_jobs GROUP BY connection"
            ).fetchall()
        except sqlite3.Error as exc:
            os.close(fd)
            raise _Unusable(
                f"the offline spool {self.path} cannot be used ({exc}); move it away to start "
                "a new one"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._held = Counter({str(conn): int(count) for conn, count, _ in rows})
        self._next_entry = max((int(top) for _, _, top in rows), default=0) + 1
        self._db = db
        self._lock_fd = fd

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with it

    def _insert(self, adds: list[_Add], entries: list[int], now: float) -> None:
        db = self._db
        assert db is not None
        with db:  # one transaction, one fsync (synchronous=FULL)
            db.executemany(
                "INSERT INTO spool_jobs (entry, connection, queue, fields, payload, spooled_at, "
                "maybe_sent) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (entry, add.connection, queue, fields, payload, now, int(add.maybe_sent))
                    for add, entry in zip(adds, entries, strict=True)
                    for queue, (fields, payload) in zip(add.queues, add.rows, strict=True)
                ],
            )

    def _read(self, connection: str, limit: int) -> list[tuple[int, int, bytes, bytes, int, str]]:
        db = self._db
        assert db is not None
        query = (
            "SELECT seq, entry, fields, payload, maybe_sent, answered FROM spool_jobs "
            "WHERE connection = ? ORDER BY seq LIMIT ?"
        )
        rows = db.execute(query, (connection, limit)).fetchall()
        if len(rows) == limit:  # whole entries only: the last one may go on
            last = rows[-1][1]
            rest = [row for row in rows if row[1] != last]
            if rest:
                return rest
            query = (
                "SELECT seq, entry, fields, payload, maybe_sent, answered FROM spool_jobs "
                "WHERE entry = ? AND connection = ? ORDER BY seq"
            )
            return db.execute(query, (last, connection)).fetchall()
        return rows

    def _mark_sent(self, connection: str, upto: int) -> None:
        db = self._db
        assert db is not None
        with db:  # on disk before the push: a crash after it makes the next run ask
            db.execute(
                "UPDATE spool_jobs SET maybe_sent = 1 WHERE connection = ? AND seq <= ? "
                "AND maybe_sent = 0",
                (connection, upto),
            )

    def _answer(self, answers: list[tuple[str, int]]) -> None:
        db = self._db
        assert db is not None
        with db:  # on disk before the delete: a crash between them makes the next run skip
            db.executemany("UPDATE spool_jobs SET answered = ? WHERE seq = ?", answers)

    def _delete(self, connection: str, upto: int) -> int:
        db = self._db
        assert db is not None
        with db:
            cursor = db.execute(
                "DELETE FROM spool_jobs WHERE connection = ? AND seq <= ?", (connection, upto)
            )
        return cursor.rowcount

    # -- writing -------------------------------------------------------------------------------

    def _room_again(self, taken: int) -> None:
        """End a "full" episode: a push fitted, or the replay made room."""
        if self._full and taken < self.max_jobs:
            self._full = False
            logger.info("the offline spool %s has room again (%d jobs)", self.path, taken)

    def _refuse(self, connection: str, count: int, taken: int) -> None:
        if self.stats is not None:
            self.stats.spool_full += 1
        if not self._full:
            self._full = True
            logger.warning(
                "the offline spool %s is full (%d jobs, MQTT_SPOOL_MAX=%d): messages are left "
                "unacknowledged, so the broker keeps them, until the replay makes room",
                self.path,
                taken,
                self.max_jobs,
            )
        raise SpoolFullError(
            f"the offline spool is full ({taken} of {self.max_jobs} jobs); "
            f"{count} job(s) of connection {connection} were not stored"
        )

    async def _write_adds(self) -> None:
        """Write every waiting add, then the ones that came meanwhile, until none is left."""
        while self._adds:
            adds, self._adds = self._adds, []
            entries = list(range(self._next_entry, self._next_entry + len(adds)))
            self._next_entry += len(adds)
            error: BaseException | None = None
            try:
                await self._run(self._insert, adds, entries, time.time())
            except BaseException as exc:  # handed to each add's caller
                error = exc
            for add in adds:
                count = len(add.rows)
                self._pending[add.connection] -= count
                if error is None:
                    self._held[add.connection] += count
                    if self.stats is not None:
                        self.stats.spooled += count
                    add.done.set_result(None)
                else:
                    add.done.set_exception(
                        ConnectionLostError(
                            f"the offline spool {self.path} could not be written: {error}"
                        )
                    )
                    add.done.exception()  # retrieved: a cancelled caller must not warn
            if error is None:
                self.writes += 1
                self._update_depth()
                self._stored.set()
            elif isinstance(error, asyncio.CancelledError):
                raise error

    def _update_depth(self) -> None:
        if self.stats is not None:
            self.stats.spool_depth = self.depth

    # -- replaying -----------------------------------------------------------------------------

    async def replay(self, manager: QueueManager) -> None:
        """Push the spooled jobs to their backends, oldest first, until cancelled."""
        failures: Counter[str] = Counter()
        retry_at: dict[str, float] = {}
        while True:
            self._stored.clear()
            connections = [c for c, n in self._held.items() if n > 0]
            if not connections:
                await self._stored.wait()
                continue
            loop = self._loop()
            for conn in connections:
                if retry_at.get(conn, 0.0) > loop.time():
                    continue
                try:
                    await self.replay_batch(manager, conn)
                except Exception as exc:
                    failures[conn] += 1
                    delay = min(REPLAY_BACKOFF_MAX, REPLAY_BACKOFF * 2 ** min(failures[conn], 8))
                    retry_at[conn] = loop.time() + delay
                    if not isinstance(exc, ConnectionLostError):  # the file, or a bug
                        logger.exception(
                            "the offline spool could not replay jobs of connection %s; "
                            "trying again in %.1fs",
                            conn,
                            delay,
                        )
                        continue
                    log = logger.info if failures[conn] == 1 else logger.debug
                    log(
                        "the offline spool waits for the queue connection %s (%d jobs held; "
                        "next try in %.1fs): %s",
                        conn,
                        self._held[conn],
                        delay,
                        exc,
                    )
                    continue
                if failures.pop(conn, 0):
                    retry_at.pop(conn, None)
                if self._held[conn] == 0:
                    self._outage.discard(conn)
                    logger.info(
                        "the offline spool replayed every job of connection %s; new jobs go "
                        "to the queue directly again",
                        conn,
                    )
            waiting = [retry_at[c] for c in connections if retry_at.get(c, 0.0) > loop.time()]
            if len(waiting) == len(connections):  # every one is backing off
                await asyncio.sleep(max(0.0, min(waiting) - loop.time()))

    async def replay_batch(self, manager: QueueManager, connection: str) -> int:
        """Replay the oldest entries of `connection` (up to `REPLAY_BATCH` jobs, whole
        entries) and delete them; returns how many jobs were pushed. `ConnectionLostError`
        when the backend cannot be reached (nothing deleted)."""
        if self._db is None:
            return 0
        rows = await self._run(self._read, connection, REPLAY_BATCH)
        if not rows:
            self._held[connection] = 0
            return 0
        now = time.time()
        entries: list[SpoolEntry] = []
        for seq, entry, fields, payload, maybe_sent, answered in rows:
            try:
                job = decode_job(fields, payload, now)
            except Exception as exc:  # a damaged row: dropped, never retried forever
                self._dropped(f"spooled job #{seq}", connection, f"unreadable: {exc}")
                continue
            job = replayed(job)
            entries.append(SpoolEntry(seq, entry, job, bool(maybe_sent), str(answered)))
        driver = await manager.connection(connection)
        asked = [e.job for e in entries if e.maybe_sent and not e.answered]
        known = dict(zip((id(j) for j in asked), await self._known(driver, asked), strict=True))
        todo = [e for e in entries if not e.answered and not known.get(id(e.job), False)]
        if any(not e.maybe_sent for e in entries):
            await self._run(self._mark_sent, connection, rows[-1][0])
        pushed, already, answers = (
            await self._push(driver, connection, todo) if todo else (0, 0, [])
        )
        if answers:
            # Coalesced into another job: its own id never gets a record, so a replay killed
            # before the delete would find nothing under it and push its value again.
            await self._run(self._answer, answers)
        deleted = await self._run(self._delete, connection, rows[-1][0])
        self._held[connection] = max(0, self._held[connection] - deleted)
        self._update_depth()
        self._room_again(self.depth + sum(self._pending.values()))
        if self.stats is not None:
            self.stats.replayed += pushed
        skipped = len(entries) - len(todo) + already
        if skipped:
            logger.info(
                "the offline spool skipped %d job(s) of connection %s the queue already knew",
                skipped,
                connection,
            )
        return pushed

    async def _known(self, driver: Driver, jobs: list[OutgoingJob]) -> list[bool]:
        """Whether the backend knows each job's id already (a few reads in flight at once)."""
        known: list[bool] = []
        for start in range(0, len(jobs), STATUS_READS):
            chunk = jobs[start : start + STATUS_READS]
            found = await asyncio.gather(
                *(driver.job_status(j.id, j.queue) for j in chunk), return_exceptions=True
            )
            for status in found:
                if isinstance(status, ConnectionLostError):
                    raise status
                if isinstance(status, BaseException) and not isinstance(status, Exception):
                    raise status  # cancelled
                # A record that cannot be read: pushed anyway, `check_id` keeps a copy out.
                known.append(status is not None and not isinstance(status, Exception))
        return known

    async def _push(
        self, driver: Driver, connection: str, todo: list[SpoolEntry]
    ) -> tuple[int, int, list[tuple[str, int]]]:
        """Push the entries' jobs in one call (one at a time if that call fails for another
        reason than the connection); returns how many the backend took, how many it had
        already (an earlier replay pushed them: their once key or id is taken), and (answered
        id, seq) of those it took into another job than their own (replaced or kept)."""
        jobs = [e.job for e in todo]
        try:
            results: Sequence[Pushed | None] = await driver.push(jobs) or [None] * len(jobs)
        except ConnectionLostError:
            raise
        except Exception:
            results = []
            for job in jobs:
                try:
                    alone = await driver.push([job])
                    results.append(alone[0] if alone else None)
                except ConnectionLostError:
                    raise
                except Exception as exc:
                    self._dropped(job.id, connection, f"{type(exc).__name__}: {exc}")
                    results.append(Pushed(job.id, "spooled"))  # a marker: not taken
        taken = already = 0
        answers: list[tuple[str, int]] = []
        for entry, done in zip(todo, results, strict=True):
            job = entry.job
            outcome = "created" if done is None else done.outcome
            if outcome == "missing":
                assert done is not None
                self._dropped(job.id, connection, f"its dependency {done.id} is unknown")
            elif outcome == "full":
                self._dropped(job.id, connection, f"queue {job.queue} is full")
            elif outcome == "duplicate" and done is not None and _refused_by_key(job, done):
                self._dropped(job.id, connection, f"a duplicate of job {done.id}")
            elif outcome == "duplicate":
                # Its own id, or its once key: an earlier replay pushed it (it may have gone
                # into another job); nothing was stored or changed now.
                already += 1
            elif outcome in ("created", "replaced", "kept"):
                taken += 1
                if done is not None and done.id != job.id:
                    answers.append((done.id, entry.seq))
            # "spooled": not taken.
        return taken, already, answers

    def _dropped(self, job: str, connection: str, why: str) -> None:
        if self.stats is not None:
            self.stats.spool_dropped += 1
        logger.error(
            "the offline spool dropped job %s of connection %s: the queue refused it (%s)",
            job,
            connection,
            why,
        )


def replayed(job: OutgoingJob) -> OutgoingJob:
    """A spooled job as the replay pushes it: with `check_id`, and with a once key of its
    own (`spool:<id>`, living `REPLAY_ONCE_FOR` or the job's `failure_ttl`, the longer) unless
    it has one. The backend takes the key in the push's atomic step whatever the push did
    (stored, or answered by the holder of its id or unique key), so a second push of it is
    refused ("duplicate") and changes nothing."""
    if job.once_key:  # its own key is taken by every push it lets through as well
        return dataclasses.replace(job, check_id=True)
    return dataclasses.replace(
        job,
        check_id=True,
        once_key=f"spool:{job.id}",
        once_for=max(job.failure_ttl, REPLAY_ONCE_FOR),
    )


def _refused_by_key(job: OutgoingJob, done: Pushed) -> bool:
    """Whether a "duplicate" answer refused the job for its unique key (it is not pushed),
    rather than for its once key or id (an earlier replay pushed it). Only a unique key with
    `on_duplicate="reject"` refuses so; a once key taken by an earlier replay of such a job
    answers alike and the job is logged as dropped again (nothing stored either time)."""
    return done.id != job.id and bool(job.unique_key) and job.on_duplicate == "reject"


def _current_task() -> object:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


class _Unusable(Exception):
    """The spool file is locked by another process, or is not a spool."""
