"""What the conformance suite (tests/conformance/test_iot_*.py) cannot see of the in-memory
driver's IoT rules: its group state is freed once a group is empty (no growth with the number
of devices ever seen), and the sync driver built on it never runs a job `reserve` expired and
handed back."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from core.queue.drivers.base import OutgoingJob, ReservedJob
from core.queue.drivers.memory import MemoryDriver
from core.queue.drivers.sync import SyncDriver
from core.status import Status
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(60)

Q = "telemetry"


@pytest.fixture
async def driver() -> AsyncIterator[MemoryDriver]:
    async with MemoryDriver("memory", make_settings(queue_connection="memory")) as opened:
        yield opened


def job(job_id: str, n: int = 0, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", "tests.jobs:RecordJob")
    return OutgoingJob(job_id, Q, orjson.dumps({"n": n}), **fields)


def ids(jobs: list[ReservedJob]) -> list[str]:
    return [j.id for j in jobs if not j.expired]


async def test_group_state_is_freed_when_every_group_has_run_dry(driver: MemoryDriver) -> None:
    n = 20000
    await driver.push([job(uuid.uuid4().hex, group=f"d{i % 1000}") for i in range(n)])
    assert len(driver._queue(Q).groups) == 1000
    done = 0
    held: list[ReservedJob] = []
    while True:
        held = await driver.reserve([Q], 100, 30, ack=held)
        if not held:
            break
        assert len({driver._queue(Q).group_of[j.id] for j in held}) == len(held)
        done += len(held)
    assert done == n
    q = driver._queue(Q)
    assert (q.groups, q.group_of, q.place) == ({}, {}, {})


async def test_clear_resets_groups_but_a_running_holder_keeps_its_turn(
    driver: MemoryDriver,
) -> None:
    await driver.push([job(f"a{i}", group="a") for i in range(3)] + [job("b0", group="b")])
    [a0] = await driver.reserve([Q], 1, 30)
    assert await driver.clear(Q) == 3  # a1, a2, b0
    q = driver._queue(Q)
    assert list(q.groups) == ["a"] and not q.groups["a"].line and list(q.group_of) == ["a0"]
    await driver.push([job("a3", group="a"), job("b1", group="b")])
    assert ids(await driver.reserve([Q], 10, 30)) == ["b1"]  # a3 waits for the running a0
    await driver.ack([a0])
    assert ids(await driver.reserve([Q], 10, 30)) == ["a3"]


async def test_the_sync_driver_never_runs_a_job_it_expired() -> None:
    async with SyncDriver("sync", make_settings(queue_connection="sync")) as sync:
        # Not a loadable payload: running it would raise; expiring it must not.
        [pushed] = await sync.push([OutgoingJob("late", Q, b"not a payload", ttl=1e-9)])
        assert pushed.outcome == "created"
        record = await sync.job_status("late", Q)
        assert record is not None and record.status is Status.EXPIRED
