"""Connecting to the queue database, and bringing its schema up to date.

* `create_engine(dsn)` builds the asyncio engine for a `mysql+aiomysql://` or
  `sqlite+aiosqlite:///` URL, configured for a job queue (see each backend's notes below), and
  `writer(engine)` the variant whose transactions take SQLite's write lock at BEGIN.
* `check_server_version` refuses MySQL/MariaDB servers without `SKIP LOCKED`.
* `migrate(engine)` applies the numbered `STEPS` not applied yet, under a lock, so that it is
  safe to run twice and from two processes at once; `schema_version(engine)` reads the version.
* `database_error` turns a library error into `ConnectionLostError` (worth retrying) or
  `DriverError`, with a message that names the server but never its password.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, event, func, insert, inspect, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.errors import ConfigurationError, ConnectionLostError, DriverError
from core.queue.drivers import sql_seed
from core.queue.drivers import sql_tables as t
from core.queue.drivers.tls import mysql_tls

__all__ = [
    "LATEST_VERSION",
    "STEPS",
    "Step",
    "check_server_version",
    "create_engine",
    "database_error",
    "database_url",
    "is_conflict",
    "migrate",
    "refuse_seed_tables",
    "safe_url",
    "schema_version",
    "writer",
]

#: Execution option read by the SQLite `begin` hook: the statement that opens a transaction.
_BEGIN = "topiq_sqlite_begin"
_MINIMUM = {"MariaDB": (10, 6, 0), "MySQL": (8, 0, 1)}  # the first with SKIP LOCKED
#: Seconds a SQLite connection waits for another one's write lock (busy_timeout, start-up locks).
_SQLITE_LOCK_WAIT = 15.0
T = TypeVar("T")


# -- engines ----------------------------------------------------------------------------------


def database_url(dsn: str) -> URL:
    """The URL to connect with: an async driver for MySQL/MariaDB or SQLite, or a clear error.

    `mysql://` and `sqlite://` without a driver get the asyncio one (aiomysql, aiosqlite).
    """
    try:
        url = make_url(dsn)
    except (sa_exc.ArgumentError, ValueError):
        # The text itself may hold a password: do not repeat it.
        raise ConfigurationError(
            "DB_URL: not a database URL; expected mysql+aiomysql://user:pass@host:3306/name "
            "or sqlite+aiosqlite:///path/to/file.sqlite3"
        ) from None
    backend = url.get_backend_name()
    driver = url.drivername.partition("+")[2]
    wanted = {"mysql": "aiomysql", "mariadb": "aiomysql", "sqlite": "aiosqlite"}.get(backend)
    if wanted is None or driver not in ("", wanted):
        raise ConfigurationError(
            f"DB_URL: the database queue runs on MySQL/MariaDB (mysql+aiomysql://) or SQLite "
            f"(sqlite+aiosqlite:///path), not {url.drivername}://"
        )
    # mariadb:// becomes mysql://: one dialect name to write SQL variants for (SQLAlchemy's
    # mysql dialect recognises MariaDB by itself).
    return url.set(drivername=f"{'sqlite' if backend == 'sqlite' else 'mysql'}+{wanted}")


def safe_url(url: URL | str) -> str:
    """The URL as it may appear in a log or an error: without its password."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (sa_exc.ArgumentError, ValueError):
            return "<invalid database URL>"
    return url.render_as_string(hide_password=True)


def create_engine(dsn: str, *, pool_size: int = 10) -> AsyncEngine:
    """An asyncio engine for the queue database at `dsn` (no connection is made yet).

    MySQL/MariaDB: READ COMMITTED, so that a claim locks only the rows it returns and no gaps
    (REPEATABLE READ's gap locks would make concurrent claims and pushes wait on each other);
    utf8mb4; pings each pooled connection before use, so that a restarted server costs no error.

    SQLite: the file's directory is created; WAL (readers never wait for the writer, and
    several processes can share the file), `busy_timeout` (a writer waits its turn instead of
    failing at once) and `synchronous=NORMAL` (safe under WAL, far fewer fsyncs). SQLAlchemy,
    not the sqlite3 module, emits BEGIN, so that `writer(engine)` can say BEGIN IMMEDIATE.
    """
    url = database_url(dsn)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    url, connect_args = mysql_tls(url)  # TLS options: TLS or no connection
    if "charset" not in url.query:
        connect_args["charset"] = "utf8mb4"
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 10
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,  # under the servers' default wait_timeout, with room to spare
        # Every use of a connection ends its own transaction (commit, or rollback on error),
        # so the pool's extra ROLLBACK on return would only cost a round trip per operation.
        pool_reset_on_return=None,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or `None` for an in-memory or URI database."""
    path = url.database or ""
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


@contextlib.asynccontextmanager
async def _migration_lock(database: Path | None) -> AsyncIterator[None]:
    """Hold an exclusive `flock` on a side file of a SQLite database while migrating it.

    Several processes opening a new file at once (a pool of workers started together) then
    create the tables one after the other, and the later ones find them made; SQLite's own
    busy handler does not cover every lock conflict of a new file. `flock`, not `lockf`, so
    that two engines of one process exclude each other too. Polled, so that it stays
    cancellable: the lock is held for milliseconds.
    """
    if database is None:
        yield
        return
    deadline = time.monotonic() + _SQLITE_LOCK_WAIT
    # Creating or opening a small local file: not worth a thread.
    with open(database.with_name(database.name + ".migrate-lock"), "a+b") as handle:  # noqa: ASYNC230
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DriverError(
                        f"database queue at {database}: another process has been migrating "
                        f"the tables for {_SQLITE_LOCK_WAIT:g} s; try again"
                    ) from None
                await asyncio.sleep(0.005)
        yield  # closing the file releases the lock


def _retry_locked(action: Callable[[], T], deadline: float) -> T:
    """Run `action` again while SQLite says the file is locked, until `deadline` (monotonic).

    Some lock conflicts (a journal-mode change, WAL recovery by another connection) are
    reported at once instead of going through `busy_timeout`.
    """
    pause = 0.005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _sqlite_engine(url: URL) -> AsyncEngine:
    database = _sqlite_file(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, pool_reset_on_return=None)  # as for MySQL, below

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, record: Any) -> None:
        # The sqlite3 module would BEGIN (deferred) on its own before DML only; take that over.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout=5000")  # first: the next PRAGMA may have to wait
            # Turning WAL on needs the file to itself and does not wait for busy_timeout: on a
            # new file opened by several processes at once, it is tried again for a while.
            deadline = time.monotonic() + _SQLITE_LOCK_WAIT
            _retry_locked(lambda: cursor.execute("PRAGMA journal_mode=WAL"), deadline)
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql(connection.get_execution_options().get(_BEGIN, "BEGIN"))

    return engine


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The engine for transactions that write (it shares `engine`'s pool).

    On SQLite they begin with BEGIN IMMEDIATE: a transaction that reads and then writes must
    hold the write lock from the start, or a concurrent commit makes its write fail with
    SQLITE_BUSY instead of waiting for `busy_timeout`.
    """
    if engine.dialect.name == "sqlite":
        return engine.execution_options(**{_BEGIN: "BEGIN IMMEDIATE"})
    return engine


def check_server_version(version: str) -> None:
    """Raise `ConfigurationError` unless `version` (from `SELECT VERSION()`) has SKIP LOCKED.

    That is MySQL >= 8.0.1 or MariaDB >= 10.6.
    """
    product = "MariaDB" if "mariadb" in version.lower() else "MySQL"
    # Some MariaDB versions report themselves as "5.5.5-10.x.y-MariaDB" to old clients.
    match = re.match(r"(?:5\.5\.5-)?(\d+)\.(\d+)\.(\d+)", version.strip())
    if match is None:
        raise ConfigurationError(f"cannot read the database server version {version!r}")
    found = tuple(int(part) for part in match.groups())
    minimum = _MINIMUM[product]
    if found < minimum:
        raise ConfigurationError(
            f"the database queue needs {product} >= {'.'.join(map(str, minimum))} "
            f"(for SELECT ... FOR UPDATE SKIP LOCKED); the server runs {version}"
        )


# -- errors -----------------------------------------------------------------------------------

_MYSQL_CONFLICT = {1205, 1213}  # lock wait timeout, deadlock: the transaction may be re-run
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o")


def _mysql_code(exc: sa_exc.DBAPIError) -> int | None:
    args = getattr(exc.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is a MySQL deadlock or lock timeout: the transaction can simply run again."""
    return isinstance(exc, sa_exc.DBAPIError) and _mysql_code(exc) in _MYSQL_CONFLICT


def database_error(exc: BaseException, what: str, url: URL) -> DriverError:
    """The Topiq error for a library error raised while trying to `what`.

    Unreachable servers, dropped connections, lock timeouts and a busy SQLite file become
    `ConnectionLostError`; anything else `DriverError`. Never includes SQL parameters (they
    hold payloads) nor the password.
    """
    lost = isinstance(exc, OSError | sa_exc.TimeoutError)
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, sa_exc.DBAPIError):
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else reason
        if exc.connection_invalidated:
            lost = True
        elif url.get_backend_name() == "sqlite":
            lost = isinstance(exc, sa_exc.OperationalError) and any(
                word in reason.lower() for word in _SQLITE_UNAVAILABLE
            )
        else:
            lost = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
        if "no such table" in reason or _mysql_code(exc) == 1146:
            reason += " (create the tables with `python main.py queue:migrate`)"
    elif isinstance(exc, sa_exc.SQLAlchemyError):
        reason = str(exc).splitlines()[0]
    message = f"database queue at {safe_url(url)}: could not {what}: {reason[:500]}"
    return ConnectionLostError(message) if lost else DriverError(message)


# -- migrations -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One schema change: `apply` runs on a connection inside the migration lock."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _create_v1(connection: Connection) -> None:
    # checkfirst: a step interrupted half way (MySQL commits each CREATE on its own) can rerun.
    # The tables are created as sql_tables describes them now, so later steps check whether
    # their change is already there (a new database gets every column at once).
    t.metadata.create_all(
        connection,
        tables=[t.queue_jobs, t.queue_failed_jobs, t.queue_names, t.queue_workers, t.queue_meta],
        checkfirst=True,
    )


def _add_record_id(connection: Connection) -> None:
    columns = {c["name"] for c in inspect(connection).get_columns(t.queue_failed_jobs.name)}
    if "record_id" not in columns:
        # Records stored before have the empty record id; storing a job again gives a new one.
        connection.execute(
            text(
                "ALTER TABLE queue_failed_jobs ADD COLUMN record_id VARCHAR(32) NOT NULL DEFAULT ''"
            )
        )


#: The columns schema version 3 adds to `queue_jobs`: all nullable, so that the release before
#: it (which names none of them) still pushes, reserves and acknowledges during a rolling deploy.
_V3_COLUMNS = (
    "job",
    "max_tries",
    "worker",
    "state",
    "error",
    "due_at",
    "expires_at",
    "failure_ttl",
    "unique_key",
    "cancel_requested",
)


def _add_lifecycle(connection: Connection) -> None:
    dialect = connection.dialect
    found = inspect(connection)
    for table in (t.queue_jobs, t.queue_failed_jobs):
        uuid = {c["name"]: c for c in found.get_columns(table.name)}["uuid"]
        length = getattr(uuid["type"], "length", None)
        if dialect.name != "sqlite" and length is not None and length < 190:
            # Ids chosen by users: up to 190 characters (the widest indexed utf8mb4 column).
            # SQLite does not enforce a VARCHAR length: nothing to do there.
            connection.execute(
                text(
                    f"ALTER TABLE {table.name} MODIFY uuid VARCHAR(190) "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
                )
            )
    # Ids are unique per queue, as on every backend: the unique index on the id alone becomes
    # one on (id, queue), which still serves lookups by id.
    index = next(
        i for i in found.get_indexes("queue_jobs") if i["name"] == "queue_jobs_uuid_unique"
    )
    if list(index["column_names"]) == ["uuid"]:
        if dialect.name == "sqlite":
            connection.execute(text("DROP INDEX queue_jobs_uuid_unique"))
            connection.execute(
                text("CREATE UNIQUE INDEX queue_jobs_uuid_unique ON queue_jobs (uuid, queue)")
            )
        else:  # one statement: never a moment without the index
            connection.execute(
                text(
                    "ALTER TABLE queue_jobs DROP INDEX queue_jobs_uuid_unique, "
                    "ADD UNIQUE INDEX queue_jobs_uuid_unique (uuid, queue)"
                )
            )
    columns = {c["name"] for c in found.get_columns(t.queue_jobs.name)}
    for name in _V3_COLUMNS:
        if name not in columns:
            column = t.queue_jobs.c[name]
            kind = column.type.compile(dialect=dialect)
            connection.execute(text(f"ALTER TABLE queue_jobs ADD COLUMN {name} {kind} NULL"))
    t.metadata.create_all(
        connection,
        tables=[t.queue_job_records, t.queue_unique_keys, t.queue_counts],
        checkfirst=True,
    )


#: The columns schema version 4 adds: all nullable, so that the release before it (which names
#: none of them) still pushes, reserves and acknowledges during a rolling deploy.
_V4_COLUMNS = {
    "queue_jobs": (
        "priority",
        "kind",
        "rule",
        "deps",
        "dependents",
        "ttl",
        "limit_key",
        "limit_spec",
        "held",
        "workflow",
    ),
    "queue_job_records": ("kind", "progress", "priority"),
}


def _add_workflows(connection: Connection) -> None:
    dialect = connection.dialect
    found = inspect(connection)
    for name, added in _V4_COLUMNS.items():
        table = t.metadata.tables[name]
        columns = {c["name"] for c in found.get_columns(name)}
        for column in added:
            if column not in columns:
                kind = table.c[column].type.compile(dialect=dialect)
                connection.execute(text(f"ALTER TABLE {name} ADD COLUMN {column} {kind} NULL"))
    t.metadata.create_all(
        connection,
        tables=[t.queue_dependencies, t.queue_limits, t.queue_once, t.queue_markers],
        checkfirst=True,
    )


#: The columns schema version 5 adds: all nullable, so that the release before it (which names
#: none of them) still pushes, reserves and acknowledges during a rolling deploy.
_V5_COLUMNS = {
    "queue_jobs": ("group_key", "group_seq"),
    "queue_job_records": ("group_key",),
}


def _add_groups(connection: Connection) -> None:
    dialect = connection.dialect
    found = inspect(connection)
    for name, added in _V5_COLUMNS.items():
        table = t.metadata.tables[name]
        columns = {c["name"] for c in found.get_columns(name)}
        for column in added:
            if column not in columns:
                kind = table.c[column].type.compile(dialect=dialect)
                connection.execute(text(f"ALTER TABLE {name} ADD COLUMN {column} {kind} NULL"))
    # An added index (InnoDB builds it in place: pushes and claims go on meanwhile).
    line = next(i for i in t.queue_jobs.indexes if i.name == "queue_jobs_group_line")
    if line.name not in {i["name"] for i in found.get_indexes("queue_jobs")}:
        line.create(connection)
    t.metadata.create_all(connection, tables=[t.queue_groups], checkfirst=True)


#: The columns schema version 6 adds: nullable, so that the release before it (which names
#: none of them) still acknowledges and reads records during a rolling deploy.
_V6_COLUMNS = {"queue_job_records": ("info",)}


def _add_info(connection: Connection) -> None:
    dialect = connection.dialect
    found = inspect(connection)
    for name, added in _V6_COLUMNS.items():
        table = t.metadata.tables[name]
        columns = {c["name"] for c in found.get_columns(name)}
        for column in added:
            if column not in columns:  # a new database has it from version 3's CREATE
                kind = table.c[column].type.compile(dialect=dialect)
                connection.execute(text(f"ALTER TABLE {name} ADD COLUMN {column} {kind} NULL"))


def _widen_markers(connection: Connection) -> None:
    # MySQL's TEXT stops at 64 KiB: a marker may hold a job's payload (the amqp connection's
    # companion store keeps one per waiting job), which may be up to 1 MiB. SQLite's TEXT has
    # no such bound; a new MySQL database already has LONGTEXT from version 4's CREATE.
    if connection.dialect.name in ("mysql", "mariadb"):
        connection.execute(text("ALTER TABLE queue_markers MODIFY COLUMN value LONGTEXT NOT NULL"))


#: Every schema version, oldest first. Append; never edit a released step.
STEPS: tuple[Step, ...] = (
    Step(1, "queue_jobs, queue_failed_jobs, queue_names, queue_workers, queue_meta", _create_v1),
    Step(2, "queue_failed_jobs.record_id: each failure's own id", _add_record_id),
    Step(
        3,
        "job lifecycle: 190-character ids, queue_jobs' record columns, queue_job_records, "
        "queue_unique_keys, queue_counts",
        _add_lifecycle,
    ),
    Step(
        4,
        "workflows: queue_jobs' priority, dependency, limit and workflow columns, "
        "queue_dependencies, queue_limits, queue_once, queue_markers",
        _add_workflows,
    ),
    Step(
        5,
        "groups: queue_jobs' group_key and group_seq (+ index queue_jobs_group_line), "
        "queue_job_records.group_key, queue_groups",
        _add_groups,
    ),
    Step(6, "queue_job_records.info: a job's description and meta (issue #16)", _add_info),
    Step(7, "queue_markers.value: LONGTEXT on MySQL (payloads kept as markers)", _widen_markers),
)
LATEST_VERSION = STEPS[-1].version


class _SeedTables(Exception):
    """RouteMQ's tables are there and this migration may not convert them."""

    def __init__(self, tables: list[str]) -> None:
        super().__init__(", ".join(tables))
        self.tables = tables


def _apply(connection: Connection, convert_seed: bool = False) -> int:
    left = sql_seed.leftovers(connection)
    if left:
        if not convert_seed:
            raise _SeedTables(left)
        sql_seed.convert(connection)
    t.queue_schema_version.create(connection, checkfirst=True)
    current = connection.scalar(select(func.max(t.queue_schema_version.c.version))) or 0
    for step in STEPS:
        if step.version > current:
            step.apply(connection)
            connection.execute(
                insert(t.queue_schema_version).values(version=step.version, applied_at=t.now())
            )
            current = step.version
    return int(current)


async def migrate(engine: AsyncEngine, *, convert_seed: bool = False) -> int:
    """Create or upgrade the queue tables; returns the schema version now in place.

    Safe to run again (it does nothing) and concurrently: MySQL/MariaDB serialise migrations
    with `GET_LOCK`; SQLite runs them in one BEGIN IMMEDIATE transaction (its DDL is
    transactional, so a failed step leaves nothing behind), one process at a time.

    RouteMQ's tables (see `sql_seed`) are converted only with `convert_seed` (the
    `queue:migrate` command); otherwise finding them raises `ConfigurationError` saying to run
    that command.
    """
    url = engine.url
    try:
        current = await _current(engine)
        if current is not None:
            return current
        if engine.dialect.name == "sqlite":
            async with _migration_lock(_sqlite_file(url)):
                return await _sqlite_migrate(engine, convert_seed)
        async with engine.connect() as conn:
            # The lock is the connection's: each DDL statement commits on its own anyway.
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            lock = f"topiq_migrate.{url.database or ''}"[:64]
            got = await conn.scalar(text("SELECT GET_LOCK(:name, 30)"), {"name": lock})
            if got != 1:
                raise DriverError(
                    f"database queue at {safe_url(url)}: another process has been migrating "
                    "the tables for 30 s (lock topiq_migrate); try again"
                )
            try:
                return await conn.run_sync(_apply, convert_seed)
            finally:
                # A connection that broke has lost the lock with it: nothing to release then.
                with contextlib.suppress(sa_exc.SQLAlchemyError, OSError):
                    await conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock})
    except _SeedTables as found:
        raise _seed_error(url, found.tables) from None
    except DriverError:
        raise
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise database_error(exc, "create or upgrade the queue tables", url) from exc


async def _current(engine: AsyncEngine) -> int | None:
    """The version of tables that need nothing done, read without the lock; else `None`.

    Opening a queue whose tables are up to date is then a read on one connection. On SQLite,
    a read WAL lets run beside a writer: a command opened while a worker or another command
    holds the write lock for long (a `queue:retry` of many records on a loaded machine) is not
    kept waiting for it. On MySQL/MariaDB, a worker's start takes no `GET_LOCK` and creates
    nothing (issue #19: no schema work on every start when the schema is current).
    """
    async with engine.connect() as conn:

        def read(sync: Connection) -> int | None:
            if sql_seed.leftovers(sync):
                return None  # RouteMQ's tables: the migration says what to do about them
            if not sync.dialect.has_table(sync, t.queue_schema_version.name):
                return None
            found = int(sync.scalar(select(func.max(t.queue_schema_version.c.version))) or 0)
            return found if found >= LATEST_VERSION else None

        return await conn.run_sync(read)


async def _sqlite_migrate(engine: AsyncEngine, convert_seed: bool) -> int:
    """Apply the steps in one BEGIN IMMEDIATE transaction, again while the file is locked.

    The file lock keeps other migrators out, not every other connection (a worker of an
    older start writing jobs): BEGIN IMMEDIATE waits `busy_timeout` for them, and a conflict
    SQLite reports at once is tried again until the deadline.
    """
    deadline = time.monotonic() + _SQLITE_LOCK_WAIT
    pause = 0.005
    while True:
        try:
            async with writer(engine).begin() as conn:
                return await conn.run_sync(_apply, convert_seed)
        except sa_exc.OperationalError as exc:
            locked = "locked" in str(exc.orig) or "busy" in str(exc.orig)
            if not locked or time.monotonic() + pause > deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


def _seed_error(url: URL, tables: list[str]) -> ConfigurationError:
    return ConfigurationError(
        f"the queue tables at {safe_url(url)} are RouteMQ's ({', '.join(tables)}, without "
        "Topiq's job id column): run `python main.py queue:migrate` to convert them, keeping "
        "their waiting and failed jobs"
    )


async def refuse_seed_tables(engine: AsyncEngine) -> None:
    """Raise `ConfigurationError` saying to run `queue:migrate` if RouteMQ's tables are there.

    For a driver that does not migrate by itself (`DB_AUTO_MIGRATE=false`).
    """
    try:
        async with engine.connect() as conn:
            left = await conn.run_sync(sql_seed.leftovers)
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise database_error(exc, "inspect the queue tables", engine.url) from exc
    if left:
        raise _seed_error(engine.url, left)


async def schema_version(engine: AsyncEngine) -> int:
    """The version of the queue tables (0 when they were never created)."""
    try:
        async with engine.connect() as conn:
            exists = await conn.run_sync(
                lambda sync: sync.dialect.has_table(sync, t.queue_schema_version.name)
            )
            if not exists:
                return 0
            version = await conn.scalar(select(func.max(t.queue_schema_version.c.version)))
            return int(version or 0)
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise database_error(exc, "read the queue schema version", engine.url) from exc
