"""The driver additions of issue #16 on every driver (memory, sqlite, mysql, redis).

Driver-level, as the base class documents them:

* `save_payload` (a multi-step job's checkpoint, RQ's `save_meta`) writes only while the caller
  still holds the reservation; a retry, a refund and a lost lease's redelivery read what it
  wrote. After an ack, a release or a takeover of the lease it is `False` and writes nothing.
* `Outcome.info` is kept with the ended record and read back as `JobStatus.description` and
  `.meta`; what is not a JSON object of the right shape is ignored.
* `prune_records(ended_before=)` deletes every ended record (succeeded, failed, cancelled,
  expired; jobs and workflow records) that ended before the cutoff, whatever its keep time,
  and never a waiting, scheduled, deferred, retrying or running job.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from core.queue.drivers import Driver, Outcome
from core.status import Status
from tests.conformance.workflow_support import (
    new_id,
    outgoing,
    record_job,
    reserve_one,
    status_of,
)

pytestmark = pytest.mark.timeout(60)


def checkpoint(step: int) -> bytes:
    return orjson.dumps({"n": 0, "step": step, "workspace": {"done": list(range(step))}})


# -- save_payload ---------------------------------------------------------------------------


async def test_save_payload_while_held_is_read_by_a_retry_and_a_refund(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    assert await driver.save_payload(held, checkpoint(1)) is True
    assert await driver.job_payload(job_id, queue) == checkpoint(1)
    assert await driver.save_payload(held, checkpoint(2)) is True  # again, same try
    assert await driver.save_payload(held, checkpoint(2)) is True  # the same bytes again
    await driver.release(held, 0, error="step 3 failed")
    again = await reserve_one(driver, queue, job_id)
    assert (again.attempts, again.payload) == (2, checkpoint(2))
    assert await driver.save_payload(again, checkpoint(3)) is True
    await driver.release(again, refund=True)
    refunded = await reserve_one(driver, queue, job_id)
    assert (refunded.attempts, refunded.payload) == (2, checkpoint(3))


async def test_save_payload_is_read_by_a_lost_lease_redelivery(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    assert await driver.save_payload(held, checkpoint(1)) is True
    await driver.extend([(held, 0.05)])  # the worker dies: its lease runs out
    await asyncio.sleep(0.2)
    taken = await reserve_one(driver, queue, job_id)
    assert (taken.attempts, taken.payload) == (2, checkpoint(1))


async def test_save_payload_after_a_takeover_of_the_lease_writes_nothing(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    old = await reserve_one(driver, queue, job_id)
    await driver.extend([(old, 0.05)])
    await asyncio.sleep(0.2)
    new = await reserve_one(driver, queue, job_id)
    assert new.attempts == 2
    assert await driver.save_payload(old, checkpoint(9)) is False
    assert await driver.job_payload(job_id, queue) == new.payload
    assert orjson.loads(new.payload) == {"n": 0}
    assert await driver.save_payload(new, checkpoint(1)) is True
    assert await driver.job_payload(job_id, queue) == checkpoint(1)


async def test_save_payload_after_a_release_writes_nothing(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    await driver.release(held, 0, error="boom")
    assert await driver.save_payload(held, checkpoint(1)) is False
    again = await reserve_one(driver, queue, job_id)
    assert orjson.loads(again.payload) == {"n": 0}
    # A refund gives the try back: the try number is the old one again, but the refunded
    # reservation is not held any more either.
    await driver.release(again, refund=True)
    assert await driver.save_payload(again, checkpoint(2)) is False
    assert await driver.job_payload(job_id, queue) == again.payload


async def test_save_payload_after_an_ack_writes_nothing(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    await driver.ack([held])
    assert await driver.save_payload(held, checkpoint(1)) is False
    assert await driver.job_payload(job_id, queue) is None
    record = await status_of(driver, job_id, queue)
    assert record.status is Status.SUCCEEDED and record.value() == 1


async def test_save_payload_of_an_unknown_or_waiting_job_writes_nothing(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    # Same id, another queue: not this reservation.
    elsewhere = type(held)(job_id, f"{queue}-other", held.payload, held.attempts)
    assert await driver.save_payload(elsewhere, checkpoint(1)) is False
    # A try number this job never had.
    future = type(held)(job_id, queue, held.payload, held.attempts + 1)
    assert await driver.save_payload(future, checkpoint(1)) is False
    unknown = type(held)(new_id(), queue, b"{}", 1)
    assert await driver.save_payload(unknown, checkpoint(1)) is False
    assert await driver.job_payload(job_id, queue) == held.payload
    # A job that waits was never handed to anyone.
    waiting = new_id()
    await driver.push([outgoing(waiting, queue, 7)])
    assert await driver.save_payload(type(held)(waiting, queue, b"{}", 0), b"{}") is False
    assert orjson.loads(await driver.job_payload(waiting, queue) or b"null") == {"n": 7}


# -- Outcome.info ---------------------------------------------------------------------------


async def test_info_is_read_back_as_description_and_meta(driver: Driver, queue: str) -> None:
    ok, bad, stop, plain = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(job_id, queue) for job_id in (ok, bad, stop, plain)])
    held = {h.id: h for h in await driver.reserve([queue], 4, lease=30)}
    assert set(held) == {ok, bad, stop, plain}
    meta = {"progress": 0.5, "tags": ["a", "é"], "nested": {"k": None}}
    held[ok].outcome = Outcome(
        Status.SUCCEEDED,
        60,
        result=b"1",
        info=orjson.dumps({"description": "count words at nvie.com", "meta": meta}),
    )
    held[bad].outcome = Outcome(
        Status.FAILED, 60, error="E", info=orjson.dumps({"description": "fails ✓"})
    )
    held[stop].outcome = Outcome(
        Status.CANCELLED, 60, error="cancelled", info=orjson.dumps({"meta": {"stopped": True}})
    )
    held[plain].outcome = Outcome(Status.SUCCEEDED, 60)
    await driver.ack(list(held.values()))

    record = await status_of(driver, ok, queue)
    assert (record.status, record.description, record.meta) == (
        Status.SUCCEEDED,
        "count words at nvie.com",
        meta,
    )
    record = await status_of(driver, bad, queue)
    assert (record.status, record.description, record.meta) == (Status.FAILED, "fails ✓", None)
    record = await status_of(driver, stop, queue)
    assert (record.status, record.description, record.meta) == (
        Status.CANCELLED,
        "",
        {"stopped": True},
    )
    record = await status_of(driver, plain, queue)
    assert (record.status, record.description, record.meta) == (Status.SUCCEEDED, "", None)
    # Without the queue, the same record.
    found = await driver.job_status(ok)
    assert found is not None and found.meta == meta


async def test_info_that_is_not_a_json_object_of_the_right_shape_is_ignored(
    driver: Driver, queue: str
) -> None:
    infos = [
        b"not json {",
        b"[1, 2]",
        b'"text"',
        orjson.dumps({"description": 5, "meta": [1, 2]}),
        orjson.dumps({"description": "kept", "meta": "not a dict"}),
    ]
    ids = [new_id() for _ in infos]
    await driver.push([outgoing(job_id, queue) for job_id in ids])
    held = {h.id: h for h in await driver.reserve([queue], len(ids), lease=30)}
    for job_id, info in zip(ids, infos, strict=True):
        held[job_id].outcome = Outcome(Status.SUCCEEDED, 60, result=b"1", info=info)
    await driver.ack(list(held.values()))
    seen = [await status_of(driver, job_id, queue) for job_id in ids]
    assert [(r.status, r.value()) for r in seen] == [(Status.SUCCEEDED, 1)] * len(ids)
    assert [(r.description, r.meta) for r in seen] == [("", None)] * 4 + [("kept", None)]


async def test_a_waiting_or_running_job_reads_no_info(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    record = await status_of(driver, job_id, queue)
    assert (record.status, record.description, record.meta) == (Status.QUEUED, "", None)
    await reserve_one(driver, queue, job_id)
    record = await status_of(driver, job_id, queue)
    assert (record.status, record.description, record.meta) == (Status.RUNNING, "", None)


# -- prune_records(ended_before=) -----------------------------------------------------------


async def forget_earlier_records(driver: Driver) -> None:
    """Delete the records earlier tests of the session left (the MySQL database is the
    session's, and only its job tables are emptied between tests), so that counts are exact."""
    await driver.prune_records(ended_before=time.time() + 1)


async def test_prune_records_ended_before_deletes_only_records_that_ended_earlier(
    driver: Driver, queue: str
) -> None:
    await forget_earlier_records(driver)
    live_queue = f"{queue}-live"
    # Jobs that have not ended, all pushed (and some started) before the cutoff.
    running, retrying, waiting, scheduled, deferred = (new_id() for _ in range(5))
    await driver.push([outgoing(running, live_queue)])
    await reserve_one(driver, live_queue, running)
    await driver.push([outgoing(retrying, live_queue)])
    await driver.release(await reserve_one(driver, live_queue, retrying), 60, error="later")
    await driver.push(
        [
            outgoing(waiting, live_queue),
            outgoing(scheduled, live_queue, delay=60),
            outgoing(deferred, live_queue, depends_on=[waiting]),
        ]
    )
    live = {
        running: Status.RUNNING,
        retrying: Status.RETRYING,
        waiting: Status.QUEUED,
        scheduled: Status.SCHEDULED,
        deferred: Status.DEFERRED,
    }

    # Records of every ending, each kept for an hour, ended before the cutoff.
    expired = new_id()
    await driver.push([outgoing(expired, queue, ttl=0.05)])
    await asyncio.sleep(0.15)  # past its ttl
    handed = await driver.reserve([queue], 5, lease=30)
    assert [(h.id, h.expired) for h in handed] == [(expired, True)]
    succeeded, failed, cancelled, member, batch = (new_id() for _ in range(5))
    await driver.push(
        [
            outgoing(succeeded, queue, failure_ttl=3600),
            outgoing(failed, queue),
            outgoing(cancelled, queue, failure_ttl=3600),
            outgoing(member, queue),
            record_job(batch, queue, "batch", [member], failure_ttl=3600),
        ]
    )
    assert await driver.cancel(cancelled, queue) is True
    held = await driver.reserve([queue], 3, lease=30)
    assert [h.id for h in held] == [succeeded, failed, member]
    held[0].outcome = Outcome(Status.SUCCEEDED, 3600, result=b"1")
    held[1].outcome = Outcome(Status.FAILED, 3600, error="E")
    held[2].outcome = Outcome(Status.SUCCEEDED, 3600, result=b"2")
    await driver.ack(held)
    old = [expired, succeeded, failed, cancelled, member, batch]
    ended = {job_id: (await status_of(driver, job_id, queue)).status for job_id in old}
    assert ended == {
        expired: Status.EXPIRED,
        succeeded: Status.SUCCEEDED,
        failed: Status.FAILED,
        cancelled: Status.CANCELLED,
        member: Status.SUCCEEDED,
        batch: Status.SUCCEEDED,
    }

    await asyncio.sleep(0.05)  # the cutoff is a moment strictly between the two sets of ends
    cutoff = time.time()
    await asyncio.sleep(0.05)
    recent = new_id()
    await driver.push([outgoing(recent, queue)])
    [last] = await driver.reserve([queue], 1, lease=30)
    last.outcome = Outcome(Status.SUCCEEDED, 3600, result=b"3")
    await driver.ack([last])

    assert await driver.prune_records(ended_before=cutoff) == len(old)
    for job_id in old:
        assert await driver.job_status(job_id, queue) is None, job_id
    assert (await status_of(driver, recent, queue)).status is Status.SUCCEEDED
    for job_id, status in live.items():
        assert (await status_of(driver, job_id, live_queue)).status is status

    # A cutoff in the future: every ended record goes, the live jobs stay.
    assert await driver.prune_records(ended_before=time.time() + 3600) == 1
    assert await driver.job_status(recent, queue) is None
    for job_id, status in live.items():
        assert (await status_of(driver, job_id, live_queue)).status is status
    assert await driver.prune_records(ended_before=time.time() + 3600) == 0
    assert await driver.prune_records() == 0
    stats = await driver.stats(live_queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.deferred) == (1, 2, 1, 1)
    assert await driver.job_payload(waiting, live_queue) is not None


async def test_prune_records_without_a_cutoff_keeps_records_within_their_keep_time(
    driver: Driver, queue: str
) -> None:
    await forget_earlier_records(driver)
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    held.outcome = Outcome(Status.SUCCEEDED, 3600, result=b"1")
    await driver.ack([held])
    assert await driver.prune_records() == 0
    assert await driver.prune_records(ended_before=None) == 0
    assert (await status_of(driver, job_id, queue)).status is Status.SUCCEEDED
    # A cutoff before the end keeps it too.
    assert await driver.prune_records(ended_before=time.time() - 3600) == 0
    assert (await status_of(driver, job_id, queue)).status is Status.SUCCEEDED
