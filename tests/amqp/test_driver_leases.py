"""Leases on amqp: a lease that outlasts the broker's consumer_timeout is parked in the
ladder instead of held; a lease that runs out here sends the job back with its try counted."""

from __future__ import annotations

import time
from pathlib import Path

from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import OutgoingJob, ReservedJob
from core.status import Status
from tests.amqp.support import new_queue, opened

# AMQP_CONSUMER_TIMEOUT 2 s: a lease ending more than 1 s after its delivery is parked.
SHORT = {"amqp_consumer_timeout": 2.0}


async def reserve_within(
    driver: AmqpDriver, queue: str, seconds: float, lease: float = 30.0
) -> list[ReservedJob]:
    deadline = time.monotonic() + seconds
    while True:
        jobs = await driver.reserve([queue], 1, lease)
        if jobs or time.monotonic() >= deadline:
            return jobs
        await driver.wait([queue], min(0.5, max(deadline - time.monotonic(), 0.01)))


async def test_a_parked_lease_that_ends_in_an_ack_never_comes_back(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path, **SHORT) as driver:
        await driver.push([OutgoingJob("p1", queue, b"x")])
        [job] = await driver.reserve([queue], 1, 1.5)
        held = driver._held[(queue, "p1")]
        assert held.message is None and held.token  # parked: the delivery is acknowledged
        await driver.ack([job])
        # The parked copy comes out of the ladder 1.5 s on, finds the lease "done": dropped.
        assert await reserve_within(driver, queue, 3.0) == []
        status = await driver.job_status("p1")
        assert status is not None and status.status is Status.SUCCEEDED


async def test_a_parked_lease_of_a_worker_that_died_is_the_next_try(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path, **SHORT) as first:
        await first.push([OutgoingJob("p2", queue, b"x")])
        [job] = await first.reserve([queue], 1, 1.5)
        assert job.attempts == 1
        first._held.clear()  # dies without a word: nothing acknowledged, nothing released
    async with opened(tmp_path, **SHORT) as second:
        # Due 1.5 s on; the bound only ends a failing run (a loaded broker routes late).
        [again] = await reserve_within(second, queue, 30.0, lease=0.5)
        assert (again.id, again.attempts) == ("p2", 2)
        await second.ack([again])


async def test_extend_re_parks_so_a_renewed_lease_is_not_taken_over(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path, **SHORT) as driver:
        await driver.push([OutgoingJob("p3", queue, b"x")])
        [job] = await driver.reserve([queue], 1, 1.2)
        first_token = driver._held[(queue, "p3")].token
        await driver.extend([(job, 4.0)])
        assert driver._held[(queue, "p3")].token != first_token
        # The first copy comes back at 1.2 s with a stale token: dropped, not run again.
        assert await reserve_within(driver, queue, 2.5) == []
        await driver.ack([job])


async def test_a_lease_that_runs_out_here_counts_the_try(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("l1", queue, b"x")])
        [job] = await driver.reserve([queue], 1, 0.2)
        again = await reserve_within(driver, queue, 30.0)  # back once 0.2 s are out
        assert [(j.id, j.attempts) for j in again] == [("l1", 2)]
        await driver.ack([job])  # the lapsed try's ack is ignored
        status = await driver.job_status("l1")
        assert status is not None and status.status is Status.RUNNING
        await driver.ack(again)
