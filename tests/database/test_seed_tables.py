"""RouteMQ's tables (the seed's `queue_jobs`/`queue_failed_jobs`) found in place: refused with
a line saying what to run, then converted by `queue:migrate` keeping every job (issue 10,
point 9). The tables are created here as RouteMQ created them, on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from core.cli import main
from core.errors import ConfigurationError
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.sql_migrations import LATEST_VERSION, create_engine, schema_version
from core.queue.queue_manager import QueueManager
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.database.conftest import settings_for
from tests.jobs import events

ROOT = Path(__file__).resolve().parents[2]
QUEUE = "seed-q"

_JOBS = """CREATE TABLE queue_jobs (
    id {id},
    queue VARCHAR(255) NOT NULL,
    payload TEXT NOT NULL,
    attempts INT NOT NULL DEFAULT 0,
    reserved_at DATETIME NULL,
    available_at DATETIME NOT NULL,
    created_at DATETIME NOT NULL
)"""
_FAILED = """CREATE TABLE queue_failed_jobs (
    id {id},
    connection VARCHAR(255) NOT NULL,
    queue VARCHAR(255) NOT NULL,
    payload TEXT NOT NULL,
    exception TEXT NOT NULL,
    failed_at DATETIME NOT NULL
)"""


def routemq_payload(log: str, n: int) -> str:
    """A payload as RouteMQ's `Job.serialize()` wrote it: `class` is `module.ClassName`."""
    return json.dumps(
        {
            "class": "tests.jobs.RecordJob",
            "data": {"log": log, "n": n, "data_": {}},
            "max_tries": 2,
            "timeout": 30,
            "retry_after": 0,
            "queue": QUEUE,
        }
    )


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def seed_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/routemq.sqlite3"
    return str(request.getfixturevalue("empty_mysql"))


async def make_seed_tables(url: str, log: str, *, recorded_v1: bool = False) -> None:
    """RouteMQ's two tables with waiting, reserved, delayed and failed jobs, one unreadable.

    `recorded_v1`: as left by an earlier Topiq that auto-migrated over them and recorded
    schema version 1 anyway.
    """
    engine = create_engine(url)
    sqlite = engine.dialect.name == "sqlite"
    key = "INTEGER PRIMARY KEY AUTOINCREMENT" if sqlite else "INT AUTO_INCREMENT PRIMARY KEY"
    jobs: list[dict[str, Any]] = [
        {"payload": routemq_payload(log, 1), "reserved": None, "available": "2020-01-01 10:00:00"},
        {"payload": routemq_payload(log, 2), "reserved": "2020-01-01 10:00:05"},  # worker gone
        {"payload": "not json at all", "reserved": None},
        {"payload": routemq_payload(log, 3), "reserved": None, "available": "2999-01-01 00:00:00"},
    ]
    try:
        async with engine.begin() as conn:
            await conn.execute(text(_JOBS.format(id=key)))
            await conn.execute(text(_FAILED.format(id=key)))
            for job in jobs:
                await conn.execute(
                    text(
                        "INSERT INTO queue_jobs (queue, payload, attempts, reserved_at, "
                        "available_at, created_at) VALUES (:q, :p, 1, :r, :a, :c)"
                    ),
                    {
                        "q": QUEUE,
                        "p": job["payload"],
                        "r": job["reserved"],
                        "a": job.get("available", "2020-01-01 10:00:00"),
                        "c": "2020-01-01 09:59:00",
                    },
                )
            for payload, error in ((routemq_payload(log, 4), "ValueError: boom"), ("{}", "E")):
                await conn.execute(
                    text(
                        "INSERT INTO queue_failed_jobs (connection, queue, payload, exception, "
                        "failed_at) VALUES ('database', :q, :p, :e, '2020-01-02 08:00:00')"
                    ),
                    {"q": QUEUE, "p": payload, "e": error},
                )
            if recorded_v1:
                await conn.execute(
                    text(
                        "CREATE TABLE queue_schema_version "
                        "(version INT PRIMARY KEY, applied_at DATETIME)"
                    )
                )
                await conn.execute(
                    text("INSERT INTO queue_schema_version VALUES (1, '2024-01-01 00:00:00')")
                )
    finally:
        await engine.dispose()


async def columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: {c["name"] for c in inspect(sync).get_columns(table)}
            )
    finally:
        await engine.dispose()


@pytest.mark.parametrize("recorded_v1", [False, True], ids=["untouched", "marked-v1"])
async def test_a_driver_on_routemq_tables_says_what_to_run_and_changes_nothing(
    seed_url: str, tmp_path: Path, recorded_v1: bool
) -> None:
    await make_seed_tables(seed_url, str(tmp_path / "log"), recorded_v1=recorded_v1)
    for auto in (True, False):
        settings = settings_for(seed_url, db_auto_migrate=auto)
        with pytest.raises(ConfigurationError) as caught:
            await DatabaseDriver("database", settings).open()
        message = str(caught.value)
        assert "python main.py queue:migrate" in message and "RouteMQ" in message
        assert "\n" not in message
    assert "uuid" not in await columns(seed_url, "queue_jobs")  # nothing converted by itself


@pytest.mark.parametrize("recorded_v1", [False, True], ids=["untouched", "marked-v1"])
async def test_queue_migrate_converts_routemq_tables_keeping_every_job(
    seed_url: str,
    tmp_path: Path,
    recorded_v1: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = str(tmp_path / "events.jsonl")
    await make_seed_tables(seed_url, log, recorded_v1=recorded_v1)
    monkeypatch.setenv("DB_URL", seed_url)
    # main() runs its own event loop: run it in a thread, off this test's loop.
    code = await asyncio.to_thread(main, ["--env-file", "/dev/null", "queue:migrate"])
    assert code == 0, capsys.readouterr().err
    assert f"schema version {LATEST_VERSION}" in capsys.readouterr().out
    assert {"uuid", "reserved_until"} <= await columns(seed_url, "queue_jobs")
    assert "record_id" in await columns(seed_url, "queue_failed_jobs")
    engine = create_engine(seed_url)
    try:
        assert await schema_version(engine) == LATEST_VERSION
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert not {n for n in names if n.startswith("routemq_")}  # nothing left behind
    finally:
        await engine.dispose()

    settings = settings_for(seed_url, queue_default=QUEUE)
    async with QueueManager(settings) as manager:
        [stats] = await manager.stats(QUEUE)
        # Two ready, the one RouteMQ had reserved (its worker is gone), one unreadable, one
        # delayed until 2999; two failed records.
        assert (stats.pending, stats.delayed, stats.reserved, stats.failed) == (3, 1, 0, 2)
        await Worker(
            manager, WorkerOptions(queues=(QUEUE,), sleep=0.05, stop_when_empty=True)
        ).run()
        runs = events(log, "run")
        assert sorted(e["n"] for e in runs) == [1, 2]
        assert {e["attempts"] for e in runs} == {2}  # RouteMQ's try counted, then this one
        store = await manager.failed_store()
        records = {r.exception.splitlines()[0][:40]: r for r in await store.list(QUEUE)}
        assert len(records) == 3
        unreadable = next(r for r in records.values() if r.payload == "not json at all")
        assert "not valid JSON" in unreadable.exception  # kept, with the reason
        converted = next(r for r in records.values() if '"n":4' in r.payload)
        assert json.loads(converted.payload)["job"] == "tests.jobs:RecordJob"
        assert converted.failed_at.year == 2020
        assert await (await manager.connection()).retry_failed([converted]) == [converted.id]
        await Worker(
            manager, WorkerOptions(queues=(QUEUE,), sleep=0.05, stop_when_empty=True)
        ).run()
        assert sorted(e["n"] for e in events(log, "run")) == [1, 2, 4]

    # Running it again changes nothing: the conversion left no RouteMQ table behind.
    code = await asyncio.to_thread(main, ["--env-file", "/dev/null", "queue:migrate"])
    assert code == 0
    async with QueueManager(settings) as manager:
        [stats] = await manager.stats(QUEUE)
        assert (stats.pending, stats.delayed, stats.failed) == (0, 1, 2)


def test_a_worker_started_on_routemq_tables_stops_with_one_line(
    seed_url: str, tmp_path: Path
) -> None:
    asyncio.run(make_seed_tables(seed_url, str(tmp_path / "log")))
    worker = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--env-file", "/dev/null", "queue:work"],
        cwd=ROOT,
        env={"DB_URL": seed_url, "QUEUE_CONNECTION": "database", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode != 0
    lines = [line for line in worker.stderr.splitlines() if "queue:migrate" in line]
    assert len(lines) == 1, worker.stderr
    assert "RouteMQ" in lines[0] and "Traceback" not in worker.stderr
