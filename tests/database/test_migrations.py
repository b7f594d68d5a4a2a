"""Migrations: versioned, idempotent, safe from two engines or two processes at once; the
`queue:migrate` command; the server-version and URL checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    inspect,
    select,
    update,
)

from core.cli import main
from core.errors import ConfigurationError
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import OutgoingJob
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.sql_migrations import (
    LATEST_VERSION,
    check_server_version,
    create_engine,
    database_url,
    migrate,
    schema_version,
    writer,
)
from tests.database.conftest import settings_for

ROOT = Path(__file__).resolve().parents[2]
TABLES = {
    "queue_jobs",
    "queue_failed_jobs",
    "queue_names",
    "queue_workers",
    "queue_meta",
    "queue_schema_version",
}


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database without any table: a new SQLite file, or a new MariaDB database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/not/yet/there.sqlite3"
    return str(request.getfixturevalue("empty_mysql"))


async def describe(url: str) -> tuple[set[str], int, int]:
    """The tables, the schema version and the number of version rows."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            rows = await conn.scalar(select(func.count()).select_from(t.queue_schema_version))
        return names, await schema_version(engine), int(rows or 0)
    finally:
        await engine.dispose()


async def test_migrate_creates_everything_and_is_idempotent(fresh_url: str) -> None:
    engine = create_engine(fresh_url)
    try:
        assert await schema_version(engine) == 0
        assert await migrate(engine) == LATEST_VERSION == 7
        assert await migrate(engine) == LATEST_VERSION
    finally:
        await engine.dispose()
    names, version, rows = await describe(fresh_url)
    assert names >= TABLES
    assert (version, rows) == (LATEST_VERSION, LATEST_VERSION)


async def test_two_engines_migrating_at_once(fresh_url: str) -> None:
    engines = [create_engine(fresh_url) for _ in range(3)]
    try:
        assert (
            await asyncio.gather(*(migrate(engine) for engine in engines)) == [LATEST_VERSION] * 3
        )
    finally:
        for engine in engines:
            await engine.dispose()
    assert (await describe(fresh_url))[1:] == (LATEST_VERSION, LATEST_VERSION)


def test_two_processes_migrating_at_once(fresh_url: str, tmp_path: Path) -> None:
    env = {"DB_URL": fresh_url, "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "main.py"),
                "--env-file",
                os.devnull,
                "queue:migrate",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"schema version {LATEST_VERSION}" in out
        assert "topiq:***@" in out or "sqlite" in out  # the password is never printed
    assert asyncio.run(describe(fresh_url))[1:] == (LATEST_VERSION, LATEST_VERSION)


_OPEN_AND_PUSH = """
import asyncio, os, sys, time
from pathlib import Path
from core.queue.drivers.base import OutgoingJob
from core.queue.drivers.database import DatabaseDriver
from tests.database.conftest import settings_for

go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # ready
while not go.exists():  # every process starts opening the file in the same few ms
    time.sleep(0.001)

async def start(n: int) -> None:
    async with DatabaseDriver("database", settings_for(sys.argv[1])) as driver:
        await driver.push([OutgoingJob(f"job-{os.getpid()}-{n}", "start-up", b"{}")])

async def main() -> None:  # a few connections per process, each opening the file
    await asyncio.gather(*(start(n) for n in range(3)))

asyncio.run(main())
"""


def test_a_pool_of_processes_opens_a_new_sqlite_file_at_once(tmp_path: Path) -> None:
    """Six processes (supervisord starting a worker pool) open one new SQLite file together,
    three drivers each: every one migrates or finds the tables made, and pushes its job."""
    url = f"sqlite+aiosqlite:///{tmp_path}/new/queue.sqlite3"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_PUSH, url, str(go), str(tmp_path / f"ready-{i}")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    try:
        while len(list(tmp_path.glob("ready-*"))) < len(procs):  # imports done everywhere
            assert all(proc.poll() is None for proc in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        errors = [proc.communicate(timeout=60)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [proc.returncode for proc in procs] == [0] * 6, errors
    assert asyncio.run(describe(url))[1:] == (LATEST_VERSION, LATEST_VERSION)
    assert asyncio.run(_count_jobs(url)) == 18


async def _count_jobs(url: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(t.queue_jobs)) or 0)
    finally:
        await engine.dispose()


def test_migrate_command_prints_one_line_on_failure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DB_URL", "mysql+aiomysql://topiq:s3cret-pw@127.0.0.1:9/topiq")
    assert main(["--env-file", os.devnull, "queue:migrate"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "queue:migrate failed" in err and "127.0.0.1:9" in err
    assert "s3cret-pw" not in err and "Traceback" not in err


def test_migrate_command_on_the_sqlite_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DB_URL", "ENABLE_MYSQL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--env-file", os.devnull, "queue:migrate"]) == 0
    assert f"schema version {LATEST_VERSION}" in capsys.readouterr().out
    assert (tmp_path / "storage" / "topiq.sqlite3").exists()


@pytest.mark.parametrize(
    "version",
    [
        "8.0.1",
        "8.0.36",
        "8.4.0-log",
        "10.6.0-MariaDB",
        "10.11.6-MariaDB-0+deb12u1",
        "11.4.2-MariaDB",
        "5.5.5-10.6.12-MariaDB-log",
    ],
)
def test_servers_with_skip_locked_pass(version: str) -> None:
    check_server_version(version)


@pytest.mark.parametrize(
    ("version", "needs"),
    [
        ("5.7.44-log", "MySQL >= 8.0.1"),
        ("8.0.0-dmr", "MySQL >= 8.0.1"),
        ("10.5.23-MariaDB", "MariaDB >= 10.6.0"),
        ("5.5.5-10.3.39-MariaDB", "MariaDB >= 10.6.0"),
    ],
)
def test_older_servers_are_refused_by_name(version: str, needs: str) -> None:
    with pytest.raises(ConfigurationError, match="SKIP LOCKED") as caught:
        check_server_version(version)
    assert needs in str(caught.value) and version in str(caught.value)


def test_unreadable_version_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        check_server_version("banana")


def test_urls_get_the_async_driver_or_a_clear_error() -> None:
    assert database_url("mysql://u:p@h/db").drivername == "mysql+aiomysql"
    assert database_url("mariadb://u:p@h/db").drivername == "mysql+aiomysql"
    assert database_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    for bad in ("postgresql://u:s3cret@h/db", "mysql+pymysql://u:s3cret@h/db", "not a url s3cret"):
        with pytest.raises(ConfigurationError) as caught:
            database_url(bad)
        assert "s3cret" not in str(caught.value)


# -- version 2 -> 3 (the job lifecycle), with jobs in the tables --------------------------------

_V2 = MetaData()
# The tables as the release before the job lifecycle (schema version 2, commit 2c381ca) made
# them, and as its code names them: its statements must keep working on version 3.
V2_JOBS = Table(
    "queue_jobs",
    _V2,
    Column("id", t.BigId, primary_key=True, autoincrement=True),
    Column("uuid", String(36), nullable=False),
    Column("queue", String(190), nullable=False),
    Column("payload", t.LongText, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("reserved_at", t.Time, nullable=True),
    Column("reserved_until", t.Time, nullable=True),
    Column("available_at", t.Time, nullable=False),
    Column("created_at", t.Time, nullable=False),
    Index("queue_jobs_uuid_unique", "uuid", unique=True),
    Index("queue_jobs_claim", "queue", "reserved_until", "available_at", "id"),
    **t._MYSQL_OPTIONS,
)
V2_FAILED = Table(
    "queue_failed_jobs",
    _V2,
    Column("id", t.BigId, primary_key=True, autoincrement=True),
    Column("uuid", String(36), nullable=False),
    Column("connection", String(255), nullable=False),
    Column("queue", String(190), nullable=False),
    Column("payload", t.LongText, nullable=False),
    Column("exception", t.LongText, nullable=False),
    Column("failed_at", t.Time, nullable=False),
    Column("record_id", String(32), nullable=False, server_default=""),
    Index("queue_failed_jobs_uuid_unique", "uuid", unique=True),
    Index("queue_failed_jobs_failed_at", "failed_at"),
    Index("queue_failed_jobs_queue", "queue", "failed_at"),
    **t._MYSQL_OPTIONS,
)
for _table in (t.queue_names, t.queue_workers, t.queue_meta, t.queue_schema_version):
    _table.to_metadata(_V2)


def _payload(job_id: str) -> str:
    return f'{{"id": "{job_id}", "job": "tests.jobs:Echo", "data": {{}}}}'


async def _make_v2(url: str) -> dict[str, str]:
    """A version-2 database holding a job in each state and a failed record; their ids."""
    ids = {name: uuid.uuid4().hex for name in ("ready", "delayed", "running", "retrying", "failed")}
    now = t.now()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_V2.create_all)
            await conn.execute(
                insert(t.queue_schema_version), [{"version": v, "applied_at": now} for v in (1, 2)]
            )

            def job(name: str, **values: object) -> dict[str, object]:
                row: dict[str, object] = {
                    "uuid": ids[name],
                    "queue": "old",
                    "payload": _payload(ids[name]),
                    "attempts": 0,
                    "reserved_at": None,
                    "reserved_until": None,
                    "available_at": now,
                    "created_at": now,
                }
                row.update(values)
                return row

            await conn.execute(
                insert(V2_JOBS),
                [
                    job("ready"),
                    job("delayed", available_at=t.now(3600)),
                    job("running", attempts=1, reserved_at=now, reserved_until=t.now(3600)),
                    job("retrying", attempts=1, available_at=t.now(3600)),
                ],
            )
            await conn.execute(
                insert(V2_FAILED).values(
                    uuid=ids["failed"],
                    connection="database",
                    queue="old",
                    payload=_payload(ids["failed"]),
                    exception="RuntimeError: boom",
                    failed_at=now,
                    record_id="a" * 32,
                )
            )
    finally:
        await engine.dispose()
    return ids


async def test_version_2_with_jobs_migrates_to_3_and_reads_right(fresh_url: str) -> None:
    ids = await _make_v2(fresh_url)
    engine = create_engine(fresh_url)
    try:
        assert await schema_version(engine) == 2
        assert await migrate(engine) == LATEST_VERSION
        assert await migrate(engine) == LATEST_VERSION  # again: nothing to do
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            columns = await conn.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns("queue_jobs")}
            )
        assert names >= TABLES | {"queue_job_records", "queue_unique_keys", "queue_counts"}
        assert columns >= {"job", "state", "expires_at", "unique_key", "cancel_requested"}
    finally:
        await engine.dispose()

    async with DatabaseDriver("database", settings_for(fresh_url)) as driver:
        seen = {name: await driver.job_status(job_id) for name, job_id in ids.items()}
        assert seen["failed"] is None  # only in the failed store
        statuses = {name: str(status) for name, status in seen.items() if status is not None}
        assert statuses == {
            "ready": "queued",
            "delayed": "scheduled",
            "running": "running",
            "retrying": "retrying",
        }
        running = seen["running"]
        assert running is not None and (running.attempts, running.job, running.worker) == (
            1,
            "",
            "",
        )
        assert running.started_at is not None and running.enqueued_at is not None
        record = await driver.failed_store().get(ids["failed"])
        assert record is not None and record.exception == "RuntimeError: boom"
        # Ids of 190 characters, and the same id on another queue.
        long_id = "x" * 190
        pushed = await driver.push([OutgoingJob(long_id, "old", b"{}", check_id=True)])
        assert [p.outcome for p in pushed] == ["created"]
        again = await driver.push([OutgoingJob(ids["ready"], "other", b"{}", check_id=True)])
        assert [p.outcome for p in again] == ["created"]
        # The old jobs run and end with records.
        taken = await driver.reserve(["old"], 10, lease=30, worker="w-new")
        assert {job.id for job in taken} == {ids["ready"], long_id}
        await driver.ack(taken)
        done = await driver.job_status(ids["ready"], "old")
        assert done is not None and str(done) == "succeeded" and done.worker == "w-new"


async def _old_release_round(url: str, queue: str, job_id: str) -> list[str]:
    """Push, reserve and acknowledge as the release before version 3 does (its statements,
    on its view of the tables); returns the ids it reserved."""
    engine = create_engine(url)
    try:
        async with writer(engine).begin() as conn:
            now = t.now()
            await conn.execute(
                insert(V2_JOBS).values(
                    uuid=job_id,
                    queue=queue,
                    payload=_payload(job_id),
                    attempts=0,
                    available_at=now,
                    created_at=now,
                )
            )
        async with writer(engine).begin() as conn:
            c = V2_JOBS.c
            rows = (
                await conn.execute(
                    select(c.id, c.uuid, c.attempts)
                    .where(c.queue == queue, c.reserved_until.is_(None), c.available_at <= t.now())
                    .order_by(c.available_at, c.id)
                    .limit(10)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            await conn.execute(
                update(V2_JOBS)
                .where(c.id.in_([r.id for r in rows]))
                .values(attempts=c.attempts + 1, reserved_at=t.now(), reserved_until=t.now(30))
            )
        async with writer(engine).begin() as conn:
            for row in rows:
                await conn.execute(
                    delete(V2_JOBS).where(
                        c.uuid == row.uuid,
                        c.attempts == row.attempts + 1,
                        c.reserved_until.is_not(None),
                    )
                )
        return [str(row.uuid) for row in rows]
    finally:
        await engine.dispose()


async def test_the_release_before_still_pushes_reserves_and_acks_on_version_3(
    fresh_url: str,
) -> None:
    """A rolling deploy: version-2 code beside version-3 code on the migrated tables."""
    await _make_v2(fresh_url)
    async with DatabaseDriver("database", settings_for(fresh_url)) as driver:  # migrates
        old_id, new_id = uuid.uuid4().hex, uuid.uuid4().hex
        # A job pushed by the new release, with its lifecycle columns, run by the old one.
        await driver.push([OutgoingJob(new_id, "mixed", b"{}", job="tests.jobs:Echo", ttl=60)])
        assert await _old_release_round(fresh_url, "mixed", old_id) == [new_id, old_id]
        assert await driver.size("mixed") == 0
        # The old ack wrote no record: the job is simply gone (documented).
        assert await driver.job_status(new_id, "mixed") is None


# -- version 4 -> 5 (groups), with jobs in the tables ---------------------------------------------

_V5_ONLY = {"group_key", "group_seq"}
_V4 = MetaData()
# The tables as the release before groups (schema version 4) made them: today's, without what
# version 5 adds. Its statements name only these columns.
for _table in t.metadata.sorted_tables:
    if _table.name == "queue_groups":
        continue
    Table(
        _table.name,
        _V4,
        *(c._copy() for c in _table.columns if c.name not in _V5_ONLY),
        *(
            Index(i.name, *(c.name for c in i.columns), unique=i.unique)
            for i in _table.indexes
            if i.name != "queue_jobs_group_line"
        ),
        **t._MYSQL_OPTIONS,
    )
V4_JOBS = _V4.tables["queue_jobs"]


async def _make_v4(url: str) -> dict[str, str]:
    """A version-4 database holding a plain, a prioritized and a delayed job; their ids."""
    ids = {name: uuid.uuid4().hex for name in ("plain", "high", "delayed")}
    now = t.now()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_V4.create_all)
            await conn.execute(
                insert(t.queue_schema_version),
                [{"version": v, "applied_at": now} for v in (1, 2, 3, 4)],
            )
            base = {"queue": "old4", "attempts": 0, "created_at": now, "state": "waiting"}
            await conn.execute(
                insert(V4_JOBS),
                [
                    {
                        **base,
                        "uuid": ids["plain"],
                        "payload": _payload(ids["plain"]),
                        "available_at": now,
                        "reserved_until": None,
                        "priority": None,
                    },
                    {
                        **base,
                        "uuid": ids["high"],
                        "payload": _payload(ids["high"]),
                        **t.placement(5, now, now),
                        "priority": 5,
                    },
                    {
                        **base,
                        "uuid": ids["delayed"],
                        "payload": _payload(ids["delayed"]),
                        "available_at": t.now(3600),
                        "reserved_until": None,
                        "priority": None,
                    },
                ],
            )
    finally:
        await engine.dispose()
    return ids


async def _v4_release_round(url: str, queue: str, job_id: str) -> list[str]:
    """Push, reserve (the claim's ready part) and acknowledge as the release before version 5
    does, on its view of the tables; returns the ids it reserved and acknowledged."""
    engine = create_engine(url)
    c = V4_JOBS.c
    try:
        async with writer(engine).begin() as conn:
            now = t.now()
            await conn.execute(
                insert(V4_JOBS).values(
                    uuid=job_id,
                    queue=queue,
                    payload=_payload(job_id),
                    attempts=0,
                    available_at=now,
                    created_at=now,
                    state="waiting",
                    job="tests.jobs:Echo",
                )
            )
        async with writer(engine).begin() as conn:
            rows = (
                await conn.execute(
                    select(c.id, c.uuid, c.attempts)
                    .where(c.queue == queue, c.reserved_until.is_(None), c.available_at <= t.now())
                    .order_by(c.available_at, c.id)
                    .limit(10)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            await conn.execute(
                update(V4_JOBS)
                .where(c.id.in_([r.id for r in rows]))
                .values(attempts=c.attempts + 1, reserved_at=t.now(), reserved_until=t.now(30))
            )
        async with writer(engine).begin() as conn:
            for row in rows:
                await conn.execute(
                    delete(V4_JOBS).where(
                        c.uuid == row.uuid,
                        c.attempts == row.attempts + 1,
                        c.reserved_until.is_not(None),
                    )
                )
        return [str(row.uuid) for row in rows]
    finally:
        await engine.dispose()


async def test_version_4_with_jobs_migrates_to_5_and_reads_right(fresh_url: str) -> None:
    ids = await _make_v4(fresh_url)
    engine = create_engine(fresh_url)
    try:
        assert await schema_version(engine) == 4
        assert await migrate(engine) == LATEST_VERSION  # 5, and the versions after it
        assert await migrate(engine) == LATEST_VERSION  # again: nothing to do
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
            columns = await conn.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns("queue_jobs")}
            )
            indexes = await conn.run_sync(
                lambda sync: {i["name"] for i in inspect(sync).get_indexes("queue_jobs")}
            )
        assert "queue_groups" in names and columns >= _V5_ONLY
        assert "queue_jobs_group_line" in indexes
    finally:
        await engine.dispose()
    async with DatabaseDriver("database", settings_for(fresh_url)) as driver:
        seen = {name: await driver.job_status(job_id) for name, job_id in ids.items()}
        assert {name: str(s) for name, s in seen.items() if s is not None} == {
            "plain": "queued",
            "high": "queued",
            "delayed": "scheduled",
        }
        assert all(s is not None and s.group == "" for s in seen.values())
        taken = await driver.reserve(["old4"], 10, lease=30)
        assert [h.id for h in taken] == [ids["high"], ids["plain"]]
        await driver.ack(taken)


async def test_the_release_before_still_pushes_reserves_and_acks_on_version_5(
    fresh_url: str,
) -> None:
    """A rolling deploy: version-4 code beside version-5 code on the migrated tables. The
    old release never claims a job waiting in a group's line; a holder it acknowledges
    leaves the turn until the next push into the group or the next prune."""
    await _make_v4(fresh_url)
    async with DatabaseDriver("database", settings_for(fresh_url)) as driver:  # migrates
        old_id = uuid.uuid4().hex
        holder = OutgoingJob(uuid.uuid4().hex, "mixed", b"{}", job="tests.jobs:Echo", group="d")
        line = OutgoingJob(uuid.uuid4().hex, "mixed", b"{}", job="tests.jobs:Echo", group="d")
        plain = OutgoingJob(uuid.uuid4().hex, "mixed", b"{}", job="tests.jobs:Echo", ttl=60)
        await driver.push([holder, line, plain])
        ran = await _v4_release_round(fresh_url, "mixed", old_id)
        assert ran == [holder.id, plain.id, old_id]  # never the job in the line
        line_status = await driver.job_status(line.id, "mixed")
        assert line_status is not None and str(line_status) == "queued"
        assert await driver.reserve(["mixed"], 10, lease=30) == []
        await driver.prune_records()  # the turn the old ack did not pass
        [taken] = await driver.reserve(["mixed"], 10, lease=30)
        assert taken.id == line.id
        await driver.ack([taken])
        assert await driver.size("mixed") == 0
