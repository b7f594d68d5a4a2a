"""The amqp driver's primitives against a real broker: push, reserve, ack, release, tries."""

from __future__ import annotations

import time
from pathlib import Path

from core.queue.drivers.base import Outcome, OutgoingJob, ReservedJob
from core.status import Status
from tests.amqp.support import new_queue, opened


async def test_push_reserve_ack_writes_the_record(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        pushed = await driver.push(
            [OutgoingJob("j1", queue, b"one"), OutgoingJob("j2", queue, b"two")]
        )
        assert [p.id for p in pushed] == ["j1", "j2"]
        status = await driver.job_status("j1")
        assert status is not None and status.status is Status.QUEUED
        jobs = await driver.reserve([queue], 5, 30.0, worker="w1")
        assert [(j.id, j.payload, j.attempts) for j in jobs] == [
            ("j1", b"one", 1),
            ("j2", b"two", 1),
        ]
        running = await driver.job_status("j1")
        assert running is not None and running.status is Status.RUNNING and running.worker == "w1"
        jobs[0].outcome = Outcome(Status.SUCCEEDED, 60.0, result=b"42")
        await driver.ack(jobs)
        done = await driver.job_status("j1")
        assert done is not None and done.status is Status.SUCCEEDED and done.value() == 42
        assert await driver.reserve([queue], 5, 30.0) == []
        stats = await driver.stats(queue)
        assert (stats.pending, stats.reserved) == (0, 0)
        assert (await driver.recent(queue)).succeeded == 2


async def test_release_counts_tries_and_refund_does_not(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("r1", queue, b"x")])
        [job] = await driver.reserve([queue], 1, 30.0)
        await driver.release(job, error="boom")
        status = await driver.job_status("r1")
        assert status is not None and status.status is Status.RETRYING and status.error == "boom"
        [job] = await driver.reserve([queue], 1, 30.0)
        assert job.attempts == 2
        await driver.release(job, refund=True)
        [job] = await driver.reserve([queue], 1, 30.0)
        assert job.attempts == 2
        await driver.ack([job])


async def test_a_delayed_job_comes_out_of_the_ladder(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        # The delay counts from the push (the driver reads the wall clock in it), not from
        # the first empty reserve: on a loaded machine the calls between take half a second.
        pushed = time.time()
        await driver.push([OutgoingJob("d1", queue, b"x", delay=1.5)])
        status = await driver.job_status("d1")
        assert status is not None and status.status is Status.SCHEDULED
        assert await driver.reserve([queue], 1, 30.0) == []
        deadline = time.monotonic() + 20
        jobs: list[ReservedJob] = []
        while not jobs and time.monotonic() < deadline:
            await driver.wait([queue], 1.0)
            jobs = await driver.reserve([queue], 1, 30.0)
        assert [j.id for j in jobs] == ["d1"]
        # Not before its delay (due times are whole milliseconds: 1 ms of rounding).
        assert time.time() >= pushed + 1.5 - 0.001, time.time() - pushed
        await driver.ack(jobs)


async def test_a_lost_connection_redelivers_with_a_try_counted(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as first:
        await first.push([OutgoingJob("k1", queue, b"x")])
        [job] = await first.reserve([queue], 1, 30.0)
        assert job.attempts == 1
    async with opened(tmp_path) as second:
        [job] = await second.reserve([queue], 1, 30.0)
        assert job.attempts == 2
        await second.ack([job])
