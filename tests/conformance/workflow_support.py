"""Helpers shared by the workflow conformance tests (tests/conformance/test_workflow_*.py).

The tests check SPEC13's "Semantics every driver implements identically" at the driver level,
over every backend (`backend` fixture). Fixtures stay in each test module (as in the lifecycle
tests); what is here builds jobs and reads queues.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson

from core.queue.drivers import Driver, Outcome, OutgoingJob, ReservedJob, create_driver
from core.queue.drivers.base import Dependency
from core.status import JobStatus, Status
from tests.conftest import Backend

JOB = "tests.jobs:RecordJob"


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, n: int = 0, **fields: Any) -> OutgoingJob:
    """A plain job; `depends_on` may be given as ids (same connection, queue unknown)."""
    fields.setdefault("job", JOB)
    deps = fields.pop("depends_on", ())
    fields["depends_on"] = tuple(d if isinstance(d, Dependency) else Dependency(d) for d in deps)
    return OutgoingJob(job_id, queue, orjson.dumps({"n": n}), **fields)


def record_job(
    record_id: str, queue: str, kind: Any, members: Sequence[str], **fields: Any
) -> OutgoingJob:
    """A workflow record ("chain"/"batch") over `members` (ids, in order)."""
    return OutgoingJob(
        record_id,
        queue,
        b"",
        kind=kind,
        depends_on=tuple(Dependency(m) for m in members),
        rule="ended",
        **fields,
    )


def n_of(payload: bytes) -> int:
    return int(orjson.loads(payload)["n"])


async def take(driver: Driver, queue: str | Sequence[str], limit: int = 100) -> list[str]:
    """Ids of the jobs `reserve` hands out now to run, in order (held under a 30 s lease);
    jobs it expired and hands back (`ReservedJob.expired`) are left out."""
    queues = [queue] if isinstance(queue, str) else list(queue)
    return [h.id for h in await driver.reserve(queues, limit, lease=30) if not h.expired]


async def reserve_one(driver: Driver, queue: str, job_id: str) -> ReservedJob:
    """Reserve exactly the next job and check it is `job_id`."""
    held = await driver.reserve([queue], 1, lease=30)
    assert [h.id for h in held] == [job_id], f"expected {job_id}, reserve gave {held}"
    return held[0]


async def end(driver: Driver, job: ReservedJob, status: Status, error: str = "") -> None:
    """Acknowledge a reserved job with an outcome of `status`."""
    if status is Status.SUCCEEDED:
        job.outcome = Outcome(status, 60, result=b"1")
    else:
        job.outcome = Outcome(status, 60, error=error or f"{status} here")
    await driver.ack([job])


async def run(driver: Driver, queue: str, job_id: str, status: Status = Status.SUCCEEDED) -> None:
    """Reserve `job_id` (the next ready job of `queue`) and end it with `status`."""
    await end(driver, await reserve_one(driver, queue, job_id), status)


async def status_of(driver: Driver, job_id: str, queue: str | None = None) -> JobStatus:
    record = await driver.job_status(job_id, queue)
    assert record is not None, f"no record for {job_id}"
    return record


async def reserve_within(
    driver: Driver, queue: str, timeout: float, limit: int = 100, lease: float = 30
) -> list[ReservedJob]:
    """Reserve, and while nothing comes, `wait` on the driver, for at most `timeout` seconds
    (the driver's own wake-up, not a polling sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        held = await driver.reserve([queue], limit, lease=lease)
        left = deadline - time.monotonic()
        if held or left <= 0:
            return held
        await driver.wait([queue], left)


@asynccontextmanager
async def second_driver(backend: Backend, driver: Driver) -> AsyncIterator[Driver]:
    """Another driver on the same backend, opened separately (another worker). The memory
    backend lives in its process: its "other worker" is the same driver."""
    if backend.kind == "memory":
        yield driver
        return
    async with create_driver(backend.connection, backend.settings()) as other:
        yield other


async def both(*calls: Any) -> list[Any]:
    """Run the calls at the same instant (as two workers would)."""
    return list(await asyncio.gather(*calls))
