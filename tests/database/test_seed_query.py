"""The seed's "Query Failed Jobs (Database)" example works as written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.queue.drivers.base import FailedJob
from core.queue.queue_manager import QueueManager, set_default_manager
from tests.database.conftest import settings_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def default_manager(db_url: str) -> Iterator[QueueManager]:
    manager = QueueManager(settings_for(db_url))
    set_default_manager(manager)
    try:
        yield manager
    finally:
        set_default_manager(None)


async def test_seed_query(default_manager: QueueManager, db_url: str) -> None:
    # A fresh SQLite file has the seed's queue to itself; the shared MariaDB database gets a
    # queue name of its own.
    name = "emails" if db_url.startswith("sqlite") else f"emails-{uuid.uuid4().hex[:8]}"
    store = await default_manager.failed_store("database")
    now = datetime.now(UTC)
    older = FailedJob(uuid.uuid4().hex, "database", name, '{"n": 1}', "E: old", now - timedelta(1))
    newer = FailedJob(uuid.uuid4().hex, "database", name, '{"n": 2}', "E: new\nTraceback", now)
    other = FailedJob(uuid.uuid4().hex, "database", f"{name}-x", "{}", "E", now)
    for record in (older, newer, other):
        await store.add(record)

    # -- the seed, verbatim but for the queue name --
    from sqlalchemy import select

    from app.models.queue_failed_job import QueueFailedJob
    from core.model import Model

    session = await Model.get_session()
    result = await session.execute(
        select(QueueFailedJob)
        .where(QueueFailedJob.queue == name)
        .order_by(QueueFailedJob.failed_at.desc())
    )
    failed_jobs = result.scalars().all()
    # --

    assert [job.uuid for job in failed_jobs] == [newer.id, older.id]
    job = failed_jobs[0]
    assert job.exception == "E: new\nTraceback" and job.payload == '{"n": 2}'
    assert job.connection == "database" and job.queue == name
    assert abs(job.failed_at.replace(tzinfo=UTC) - now) < timedelta(milliseconds=2)
    await session.close()
    await default_manager.close()


def test_seed_query_in_a_plain_script_exits_cleanly(tmp_path: Path) -> None:
    """A script that never closes its session still exits without a leaked connection."""
    script = tmp_path / "report.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            from datetime import UTC, datetime

            from sqlalchemy import select

            from app.models.queue_failed_job import QueueFailedJob
            from core.model import Model
            from core.queue.drivers.base import FailedJob
            from core.queue.queue_manager import QueueManager


            async def main() -> None:
                async with QueueManager() as manager:
                    store = await manager.failed_store("database")
                    now = datetime.now(UTC)
                    await store.add(FailedJob("j1", "database", "emails", "{}", "Boom", now))
                session = await Model.get_session()
                result = await session.execute(
                    select(QueueFailedJob)
                    .where(QueueFailedJob.queue == "emails")
                    .order_by(QueueFailedJob.failed_at.desc())
                )
                failed_jobs = result.scalars().all()
                for job in failed_jobs:
                    print(f"Failed at: {job.failed_at}")
                    print(f"Exception: {job.exception}")
                    print(f"Payload: {job.payload}")


            asyncio.run(main())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(script)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QUEUE_CONNECTION": "database"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Exception: Boom" in done.stdout
    assert "Payload: {}" in done.stdout
    assert "Warning" not in done.stderr and "unclosed" not in done.stderr.lower(), done.stderr
    assert (tmp_path / "storage" / "topiq.sqlite3").exists()  # the SQLite default, created
