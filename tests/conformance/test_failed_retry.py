"""Retrying failed jobs, on every driver: record ids, claims, and the atomic move back.

`queue:retry` relies on these primitives (see core/commands/failed.py): a job is never in
neither place, a newer failure is never deleted, and two retries at once queue a job once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.queue.drivers.base import FailedJob, claimed_at
from core.queue.queue_manager import QueueManager
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


async def _fail(manager: QueueManager, log: str, n: int) -> FailedJob:
    """Dispatch a job, then record it in the failed store as a worker would after its last try."""
    job_id = await manager.push(RecordJob(log, n))
    driver = await manager.connection()
    [reserved] = await driver.reserve([manager.settings.queue_default], 1, lease=30)
    assert reserved.id == job_id
    store = await manager.failed_store()
    await store.add(
        FailedJob(
            reserved.id,
            manager.connection_name(),
            reserved.queue,
            reserved.payload.decode(),
            "RuntimeError: boom",
            datetime.now(UTC),
        )
    )
    await driver.ack([reserved])
    record = await store.get(job_id)
    assert record is not None
    return record


async def test_each_stored_record_gets_a_new_record_id(manager: QueueManager, log: str) -> None:
    first = await _fail(manager, log, 1)
    store = await manager.failed_store()
    assert len(first.record_id) == 32
    assert [r.record_id for r in await store.list()] == [first.record_id]
    await store.add(first)  # the same job failing again: a new record, a new record id
    again = await store.get(first.id)
    assert again is not None and again.record_id not in ("", first.record_id)
    assert await store.count() == 1


async def test_retry_failed_moves_records_back_with_tries_afresh(
    manager: QueueManager, log: str
) -> None:
    records = [await _fail(manager, log, n) for n in range(3)]
    driver = await manager.connection()
    store = await manager.failed_store()
    assert await driver.retry_failed(records) == [r.id for r in records]
    assert await store.count() == 0
    back = await driver.reserve([manager.settings.queue_default], 10, lease=30)
    assert [(job.id, job.attempts) for job in back] == [(r.id, 1) for r in records]
    assert [job.payload.decode() for job in back] == [r.payload for r in records]


async def test_retry_failed_leaves_a_newer_failure_alone(manager: QueueManager, log: str) -> None:
    """A record read before the job failed again names the old failure: nothing moves."""
    old = await _fail(manager, log, 1)
    store = await manager.failed_store()
    await store.add(old)  # failed again since `old` was read (a retry that ran meanwhile)
    driver = await manager.connection()
    assert await driver.retry_failed([old]) == []
    newer = await store.get(old.id)
    assert newer is not None and newer.record_id != old.record_id
    assert await manager.size() == 0


async def test_two_retries_at_once_queue_each_job_once(manager: QueueManager, log: str) -> None:
    records = [await _fail(manager, log, n) for n in range(20)]
    driver = await manager.connection()
    first, second = await asyncio.gather(driver.retry_failed(records), driver.retry_failed(records))
    assert sorted(first + second) == sorted(r.id for r in records)
    assert await manager.size() == 20
    assert await (await manager.failed_store()).count() == 0


async def test_retry_failed_skips_records_of_another_connection(
    manager: QueueManager, log: str
) -> None:
    record = await _fail(manager, log, 1)
    elsewhere = replace(record, connection="elsewhere")
    driver = await manager.connection()
    assert await driver.retry_failed([elsewhere]) == []
    assert await (await manager.failed_store()).count() == 1


async def test_claim_and_remove_match_one_record_exactly(manager: QueueManager, log: str) -> None:
    record = await _fail(manager, log, 1)
    store = await manager.failed_store()
    claims = await asyncio.gather(store.claim(record), store.claim(record))
    [mine] = [claim for claim in claims if claim is not None]  # exactly one caller wins
    assert mine.record_id not in ("", record.record_id)
    claimed = claimed_at(mine.record_id)  # marked as a claim, so other retries leave it alone
    assert claimed is not None and abs(claimed - time.time()) < 60
    assert claimed_at(record.record_id) is None
    # A fresh record id is hex and can never read as a claim, whatever its digits.
    assert claimed_at("c" + "1" * 31) is None and claimed_at("0" * 32) is None
    assert await store.claim(record) is None  # the old record id no longer matches
    assert await store.remove(record) is False
    await store.add(record)  # the job failed again after its claim: a newer failure
    assert await store.remove(mine) is False
    newer = await store.get(record.id)
    assert newer is not None
    assert await store.remove(newer) is True
    assert await store.get(record.id) is None
    assert await store.remove(newer) is False
