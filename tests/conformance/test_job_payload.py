"""`Driver.job_payload(job_id, queue=None)` on every driver: the payload of one job, for the
dashboard's job page (`JobStatus` carries none, so listings never fetch payloads).

* While the backend keeps the job (waiting, delayed, deferred, running, a group's line) it is
  the payload as pushed, byte for byte; after a `replace` push, the new one.
* Once the job has ended (any way) it is `None`, as for an unknown id or a queue the job is
  not on.
* Without `queue`, the job chosen is the one `job_status` shows (the live one of an id on
  several queues).

Nothing here waits for time to pass.
"""

from __future__ import annotations

import orjson
import pytest

from core.queue.drivers import Driver, OutgoingJob
from core.status import Status
from tests.conformance.iot_support import grouped, reserve_runnable
from tests.conformance.workflow_support import (
    JOB,
    end,
    new_id,
    outgoing,
    reserve_one,
    status_of,
)

pytestmark = pytest.mark.timeout(60)


def payload(n: int) -> bytes:
    """What `outgoing(..., n)` pushes."""
    return orjson.dumps({"n": n})


async def assert_payload(driver: Driver, job_id: str, queue: str, expected: bytes | None) -> None:
    """The same answer with the queue given and without it."""
    assert await driver.job_payload(job_id, queue) == expected
    assert await driver.job_payload(job_id) == expected


async def test_a_waiting_job_has_its_payload_byte_for_byte(driver: Driver, queue: str) -> None:
    job_id = new_id()
    raw = orjson.dumps({"text": "Grüße <script>", "nested": {"list": [1, 2.5, None]}})
    await driver.push([OutgoingJob(job_id, queue, raw, job=JOB)])
    assert (await status_of(driver, job_id)).status is Status.QUEUED
    await assert_payload(driver, job_id, queue, raw)


async def test_delayed_and_deferred_jobs_have_their_payloads(driver: Driver, queue: str) -> None:
    later, dep, deferred = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(later, queue, 1, delay=600),
            outgoing(dep, queue, 2),
            outgoing(deferred, queue, 3, depends_on=[dep]),
        ]
    )
    assert (await status_of(driver, later)).status is Status.SCHEDULED
    assert (await status_of(driver, deferred)).status is Status.DEFERRED
    await assert_payload(driver, later, queue, payload(1))
    await assert_payload(driver, deferred, queue, payload(3))


async def test_a_running_job_has_its_payload_until_it_ends(driver: Driver, queue: str) -> None:
    ok, failed = new_id(), new_id()
    await driver.push([outgoing(ok, queue, 1), outgoing(failed, queue, 2)])
    first = await reserve_one(driver, queue, ok)
    second = await reserve_one(driver, queue, failed)
    assert (await status_of(driver, ok)).status is Status.RUNNING
    await assert_payload(driver, ok, queue, payload(1))
    await assert_payload(driver, failed, queue, payload(2))
    await end(driver, first, Status.SUCCEEDED)
    await end(driver, second, Status.FAILED)
    # The records are kept; the payloads are not.
    assert (await status_of(driver, ok)).status is Status.SUCCEEDED
    assert (await status_of(driver, failed)).status is Status.FAILED
    await assert_payload(driver, ok, queue, None)
    await assert_payload(driver, failed, queue, None)


async def test_a_cancelled_waiting_job_has_no_payload(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, 1)])
    assert await driver.cancel(job_id, queue) is True
    assert (await status_of(driver, job_id)).status is Status.CANCELLED
    await assert_payload(driver, job_id, queue, None)


async def test_an_unknown_id_or_a_wrong_queue_has_no_payload(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, 1)])
    await assert_payload(driver, new_id(), queue, None)
    assert await driver.job_payload(job_id, f"{queue}-other") is None
    assert await driver.job_payload(job_id, f"{queue}-never-used") is None
    assert await driver.job_payload(job_id, queue) == payload(1)


async def test_jobs_in_a_groups_line_have_their_payloads(driver: Driver, queue: str) -> None:
    holder, line = new_id(), new_id()
    await driver.push([grouped(holder, queue, "dev-1", 1), grouped(line, queue, "dev-1", 2)])
    await assert_payload(driver, line, queue, payload(2))
    held = await reserve_runnable(driver, queue, 10)
    assert [h.id for h in held] == [holder]
    await assert_payload(driver, holder, queue, payload(1))
    await assert_payload(driver, line, queue, payload(2))
    await end(driver, held[0], Status.SUCCEEDED)
    await assert_payload(driver, holder, queue, None)
    await assert_payload(driver, line, queue, payload(2))


async def test_a_replace_push_shows_the_new_payload(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, 1)])
    pushed = await driver.push([outgoing(job_id, queue, 2, check_id=True, on_duplicate="replace")])
    assert pushed[0].outcome == "replaced"
    await assert_payload(driver, job_id, queue, payload(2))


async def test_an_id_on_two_queues_reads_the_live_one_without_a_queue(
    driver: Driver, queue: str
) -> None:
    job_id, other = new_id(), f"{queue}-second"
    await driver.push([outgoing(job_id, queue, 1)])
    await end(driver, await reserve_one(driver, queue, job_id), Status.SUCCEEDED)
    await driver.push([outgoing(job_id, other, 2)])
    assert (await status_of(driver, job_id)).queue == other
    assert await driver.job_payload(job_id) == payload(2)
    assert await driver.job_payload(job_id, queue) is None
    assert await driver.job_payload(job_id, other) == payload(2)
