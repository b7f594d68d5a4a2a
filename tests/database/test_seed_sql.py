"""The database driver's side of issue #16: schema version 6 (`queue_job_records.info`), the
batched `prune_records(ended_before=)`, and `save_payload` on MySQL's and SQLite's columns.

* A version-5 database (records and waiting jobs in it) upgrades to 6; its records read with no
  description or meta; the release before (which names no `info`) still writes records.
* Two processes, and three engines of one process, upgrading one version-5 database at once:
  each ends at version 6, the column is added once, the version row written once.
* The prune with a cutoff walks the records in batches (the batch size made small here so
  that batch edges fall between records of one id on two queues).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from sqlalchemy import Index, MetaData, Table, func, insert, inspect, select

from core.queue.drivers import sql_lifecycle as life
from core.queue.drivers import sql_tables as t
from core.queue.drivers.base import Outcome, OutgoingJob
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.sql_migrations import LATEST_VERSION, create_engine, migrate, schema_version
from core.status import Status
from tests.database.conftest import settings_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests.jobs:Echo"

# The tables as the release before version 6 made them: today's, without `info`. Its
# statements name only these columns.
_V5 = MetaData()
for _table in t.metadata.sorted_tables:
    Table(
        _table.name,
        _V5,
        *(
            c._copy()
            for c in _table.columns
            if not (_table.name == "queue_job_records" and c.name == "info")
        ),
        *(
            Index(i.name, *(c.name for c in i.columns), unique=i.unique, **i.dialect_kwargs)
            for i in _table.indexes
        ),
        **t._MYSQL_OPTIONS,
    )
V5_RECORDS = _V5.tables["queue_job_records"]


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def own_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of the test's own: a new SQLite file, or a new MariaDB database (a prune
    with a cutoff deletes every old record of the database, never another test's)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/seed/queue.sqlite3"
    return str(request.getfixturevalue("empty_mysql"))


def _v5_record(job_id: str, queue: str, status: str = "succeeded") -> dict[str, object]:
    now = t.now()
    return {
        "uuid": job_id,
        "queue": queue,
        "connection": "database",
        "job": JOB,
        "status": status,
        "attempts": 1,
        "max_tries": 3,
        "enqueued_at": now,
        "started_at": now,
        "ended_at": now,
        "result": "1",
        "keep_until": t.now(3600),
    }


async def _make_v5(url: str) -> dict[str, str]:
    """A version-5 database holding an ended record and a waiting job; their ids."""
    ids = {"ended": uuid.uuid4().hex, "waiting": uuid.uuid4().hex}
    now = t.now()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_V5.create_all)
            await conn.execute(
                insert(t.queue_schema_version),
                [{"version": v, "applied_at": now} for v in (1, 2, 3, 4, 5)],
            )
            await conn.execute(insert(V5_RECORDS).values(**_v5_record(ids["ended"], "old5")))
            await conn.execute(
                insert(_V5.tables["queue_jobs"]).values(
                    uuid=ids["waiting"],
                    queue="old5",
                    payload=orjson.dumps({"n": 1}).decode(),
                    attempts=0,
                    available_at=now,
                    created_at=now,
                    state="waiting",
                    job=JOB,
                )
            )
    finally:
        await engine.dispose()
    return ids


async def _describe(url: str) -> tuple[int, int, list[str]]:
    """The schema version, the number of version rows, and the records table's columns."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(t.queue_schema_version))
            columns = await conn.run_sync(
                lambda sync: [c["name"] for c in inspect(sync).get_columns("queue_job_records")]
            )
        return await schema_version(engine), int(rows or 0), columns
    finally:
        await engine.dispose()


async def test_version_5_with_records_migrates_to_6_and_reads_right(own_url: str) -> None:
    ids = await _make_v5(own_url)
    engine = create_engine(own_url)
    try:
        assert await schema_version(engine) == 5
        assert await migrate(engine) == LATEST_VERSION
        assert await migrate(engine) == LATEST_VERSION  # again: nothing to do
    finally:
        await engine.dispose()
    version, rows, columns = await _describe(own_url)
    assert (version, rows) == (LATEST_VERSION, LATEST_VERSION)
    assert columns.count("info") == 1
    async with DatabaseDriver("database", settings_for(own_url)) as driver:
        old = await driver.job_status(ids["ended"], "old5")
        assert old is not None and (old.status, old.value()) == (Status.SUCCEEDED, 1)
        assert (old.description, old.meta) == ("", None)  # NULL: no description, no meta
        [held] = await driver.reserve(["old5"], 10, lease=30)
        assert held.id == ids["waiting"]
        assert await driver.save_payload(held, orjson.dumps({"n": 1, "step": 1})) is True
        held.outcome = Outcome(
            Status.FAILED, 60, error="E", info=orjson.dumps({"description": "d", "meta": {"k": 1}})
        )
        await driver.ack([held])
        ended = await driver.job_status(ids["waiting"], "old5")
        assert ended is not None and (ended.status, ended.description, ended.meta) == (
            Status.FAILED,
            "d",
            {"k": 1},
        )


async def test_the_release_before_still_writes_records_on_version_6(own_url: str) -> None:
    """A rolling deploy: version-5 code, which names no `info`, acknowledges beside
    version-6 code; its records read with no description or meta."""
    await _make_v5(own_url)
    async with DatabaseDriver("database", settings_for(own_url)) as driver:  # migrates
        job_id = uuid.uuid4().hex
        engine = create_engine(own_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(insert(V5_RECORDS).values(**_v5_record(job_id, "mixed")))
        finally:
            await engine.dispose()
        record = await driver.job_status(job_id, "mixed")
        assert record is not None and (record.status, record.description, record.meta) == (
            Status.SUCCEEDED,
            "",
            None,
        )
        assert await driver.prune_records(ended_before=time.time() + 1) == 2  # with the v5 one


def _migrate_process(url: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--env-file", os.devnull, "queue:migrate"],
        cwd=cwd,
        env={"DB_URL": url, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_upgrading_version_5_at_once(own_url: str, tmp_path: Path) -> None:
    asyncio.run(_make_v5(own_url))
    procs = [_migrate_process(own_url, tmp_path) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert f"schema version {LATEST_VERSION}" in out
    version, rows, columns = asyncio.run(_describe(own_url))
    assert (version, rows) == (LATEST_VERSION, LATEST_VERSION)  # each version written once
    assert columns.count("info") == 1


async def test_three_engines_upgrading_version_5_at_once(own_url: str) -> None:
    ids = await _make_v5(own_url)
    engines = [create_engine(own_url) for _ in range(3)]
    try:
        assert (
            await asyncio.gather(*(migrate(engine) for engine in engines)) == [LATEST_VERSION] * 3
        )
    finally:
        for engine in engines:
            await engine.dispose()
    version, rows, columns = await _describe(own_url)
    assert (version, rows) == (LATEST_VERSION, LATEST_VERSION)
    assert columns.count("info") == 1
    async with DatabaseDriver("database", settings_for(own_url)) as driver:
        record = await driver.job_status(ids["ended"], "old5")
        assert record is not None and record.status is Status.SUCCEEDED


# -- prune_records(ended_before=) in batches ----------------------------------------------------


async def _end(driver: DatabaseDriver, jobs: list[tuple[str, str]], status: Status) -> None:
    """Push, reserve and acknowledge `jobs` ((id, queue)) with `status`, kept an hour."""
    await driver.push([OutgoingJob(job_id, queue, b"{}", job=JOB) for job_id, queue in jobs])
    held = await driver.reserve(sorted({queue for _, queue in jobs}), len(jobs), lease=30)
    assert sorted((h.id, h.queue) for h in held) == sorted(jobs)
    for job in held:
        job.outcome = Outcome(
            status, 3600, result=b"1", error="E" if status is Status.FAILED else ""
        )
    await driver.ack(held)


async def test_prune_with_a_cutoff_walks_every_batch(
    own_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(life, "PRUNE_BATCH", 2)
    # Ids shared by two queues, so that a batch may end between the two records of one id.
    shared = [uuid.uuid4().hex for _ in range(4)]
    old = [(job_id, q) for job_id in shared for q in ("qa", "qb")]
    old += [(uuid.uuid4().hex.upper(), "qa") for _ in range(3)]  # other letters, same order
    async with DatabaseDriver("database", settings_for(own_url)) as driver:
        await _end(driver, old[:6], Status.SUCCEEDED)
        await _end(driver, old[6:], Status.FAILED)
        await asyncio.sleep(0.05)  # the cutoff lies strictly between the two sets of ends
        cutoff = time.time()
        await asyncio.sleep(0.05)
        # Newer records of the same ids on a third queue, and of new ids.
        recent = [(job_id, "qc") for job_id in shared] + [(uuid.uuid4().hex, "qa")]
        await _end(driver, recent, Status.SUCCEEDED)
        waiting = OutgoingJob(shared[0], "qd", b"{}", job=JOB)
        await driver.push([waiting])

        assert await driver.prune_records(ended_before=cutoff) == len(old)
        for job_id, queue in old:
            assert await driver.job_status(job_id, queue) is None, (job_id, queue)
        for job_id, queue in recent:
            record = await driver.job_status(job_id, queue)
            assert record is not None and record.status is Status.SUCCEEDED
        live = await driver.job_status(shared[0], "qd")
        assert live is not None and live.status is Status.QUEUED
        assert await driver.prune_records(ended_before=cutoff) == 0
        assert await driver.prune_records(ended_before=time.time() + 1) == len(recent)
        assert await driver.size("qd") == 1


async def test_prune_refuses_a_cutoff_that_is_not_a_time(own_url: str) -> None:
    async with DatabaseDriver("database", settings_for(own_url)) as driver:
        for bad in (float("nan"), "yesterday", True):
            with pytest.raises(ValueError, match="ended_before"):
                await driver.prune_records(ended_before=bad)  # type: ignore[arg-type]
        # Far in the future: everything ended goes, no overflow.
        assert await driver.prune_records(ended_before=1e300) == 0


# -- save_payload and info on the columns ---------------------------------------------------------


async def test_large_payloads_and_meta_fit_their_columns(own_url: str) -> None:
    """MySQL's TEXT stops at 64 KiB: a checkpoint or a meta past it must be kept whole."""
    big = {"workspace": {"rows": ["é" * 100] * 2000}}  # about 400 KB of UTF-8
    job_id = uuid.uuid4().hex
    async with DatabaseDriver("database", settings_for(own_url)) as driver:
        await driver.push([OutgoingJob(job_id, "big", b"{}", job=JOB)])
        [held] = await driver.reserve(["big"], 1, lease=30)
        assert await driver.save_payload(held, orjson.dumps(big)) is True
        await driver.release(held, 0, error="next step")
        [again] = await driver.reserve(["big"], 1, lease=30)
        assert orjson.loads(again.payload) == big
        again.outcome = Outcome(
            Status.SUCCEEDED, 60, info=orjson.dumps({"description": "big", "meta": big})
        )
        await driver.ack([again])
        record = await driver.job_status(job_id, "big")
        assert record is not None and (record.description, record.meta) == ("big", big)
