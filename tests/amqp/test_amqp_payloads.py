"""Payloads on amqp: a job's payload is kept in the store beside its record (`job_payload`
reads it there, since a queue cannot show a message without taking it), and a checkpoint
(`save_payload`) is written over it, so that every later try reads the checkpoint, also the
broker's own redelivery of the message as it was published."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from core.queue.drivers.amqp_records import Record
from core.queue.drivers.base import OutgoingJob, ReservedJob
from tests.amqp.support import new_queue, opened, reserve_within

#: Every byte value, then what is no UTF-8 at all (a lone continuation byte, a cut sequence).
RAW = bytes(range(256)) + b"\x80\xff\xfe\xc3"


async def test_a_checkpoint_survives_a_redelivery_after_the_workers_connection_drops(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as first, opened(tmp_path) as second:
        await first.push([OutgoingJob("c1", queue, b"step 0")])
        held = await reserve_within(first, queue, 5.0)
        assert await first.save_payload(held, b"step 2") is True
        # The worker's connection goes without a word: the broker gives the message out again
        # as it was published; the next try must start from the checkpoint, not step 0.
        assert first._conn is not None
        await first._conn.close()
        again = await reserve_within(second, queue, 10.0)
        assert (again.id, again.attempts, again.payload) == ("c1", 2, b"step 2")
        # The first worker's try is gone with its connection: its save writes nothing.
        assert await first.save_payload(held, b"stale") is False
        assert await second.job_payload("c1", queue) == b"step 2"
        assert await second.save_payload(again, b"step 3") is True
        await second.ack([again])
        assert await second.job_payload("c1", queue) is None


async def test_a_payload_of_any_bytes_round_trips(tmp_path: Path, amqp_url: str) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("b1", queue, RAW), OutgoingJob("b2", queue, b"")])
        assert await driver.job_payload("b1", queue) == RAW
        assert await driver.job_payload("b1") == RAW
        assert await driver.job_payload("b2", queue) == b""
        held = await reserve_within(driver, queue, 5.0)
        assert (held.id, held.payload) == ("b1", RAW)
        saved = RAW[::-1] + b"\x00"
        assert await driver.save_payload(held, saved) is True
        assert await driver.job_payload("b1", queue) == saved
        await driver.release(held, 0, error="step failed")
        again = await reserve_within(driver, queue, 5.0)
        if again.id == "b2":  # the empty one came first
            assert again.payload == b""
            await driver.ack([again])
            again = await reserve_within(driver, queue, 5.0)
        assert (again.id, again.attempts, again.payload) == ("b1", 2, saved)
        # An empty checkpoint is a checkpoint too (not "none").
        assert await driver.save_payload(again, b"") is True
        await driver.release(again, refund=True)
        refunded = await reserve_within(driver, queue, 5.0)
        assert (refunded.id, refunded.payload) == ("b1", b"")
        await driver.ack([refunded])


async def test_a_stale_holders_save_writes_nothing(tmp_path: Path, amqp_url: str) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("s1", queue, b"pushed")])
        held = await reserve_within(driver, queue, 5.0)
        # Another worker's try started (as the broker's redelivery to it would start one),
        # while this driver still thinks it holds the job: the store says otherwise.
        name = driver._m("job", "s1")
        record = Record.loads(await driver._store.get_marker(name))
        assert record is not None
        record.attempts += 1
        record.worker = "another-worker"
        await driver._store.set_marker(name, record.dumps(), 600.0)
        assert await driver.save_payload(held, b"stale") is False
        assert await driver.job_payload("s1", queue) == b"pushed"
        after = Record.loads(await driver._store.get_marker(name))
        assert after is not None
        assert (after.attempts, after.worker, after.extra.get("ckpt")) == (
            2,
            "another-worker",
            None,
        )


async def test_a_save_after_the_lease_ran_out_writes_nothing(tmp_path: Path, amqp_url: str) -> None:
    """A worker frozen past its lease (SIGSTOP, a long GC pause) wakes up to save: its lease
    ran out in its own process, so the job is on its way to another worker, even if no
    reserve has sent it back yet."""
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("f1", queue, b"pushed")])
        held = await reserve_within(driver, queue, 5.0)
        await driver.extend([(held, 0.05)])
        deadline = time.monotonic() + 5.0
        while driver._held[(queue, "f1")].lease_until > time.monotonic():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await driver.save_payload(held, b"late") is False
        assert await driver.job_payload("f1", queue) == b"pushed"
        again = await reserve_within(driver, queue, 5.0)
        assert (again.attempts, again.payload) == (2, b"pushed")
        await driver.ack([again])


async def test_a_save_keeps_a_cancel_asked_while_the_job_runs(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("k1", queue, b"pushed")])
        held = await reserve_within(driver, queue, 5.0)
        assert await driver.cancel("k1", queue) is True
        assert await driver.save_payload(held, b"step 1") is True
        assert await driver.cancel_requested([held]) == ["k1"]
        assert await driver.job_payload("k1", queue) == b"step 1"


async def test_saves_of_many_held_jobs_at_once_each_land_on_their_own_job(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob(f"m{n}", queue, b"0") for n in range(20)])
        held: list[ReservedJob] = []
        deadline = time.monotonic() + 10.0
        while len(held) < 20 and time.monotonic() < deadline:
            held += await driver.reserve([queue], 20 - len(held), 30.0)
        assert len(held) == 20
        saved = await asyncio.gather(*(driver.save_payload(j, j.id.encode()) for j in held))
        assert saved == [True] * 20
        for job in held:
            assert await driver.job_payload(job.id, queue) == job.id.encode()
        await driver.ack(held)


async def test_an_ended_jobs_payload_leaves_the_store_with_its_end(
    tmp_path: Path, amqp_url: str
) -> None:
    """A payload is kept for as long as a job may still run: the end (an ack, a cancel while
    waiting) takes it out of the store in the same write, rather than leaving it for the live
    keep time (days) after a job that ran in milliseconds."""
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("e1", queue, b"run me"), OutgoingJob("e2", queue, b"x")])
        name = driver._m("payload", "e1")
        assert await driver._store.get_marker(name) is not None
        held = await reserve_within(driver, queue, 5.0)
        assert held.id == "e1"
        await driver.ack([held])
        assert await driver._store.get_marker(name) is None
        assert await driver.cancel("e2", queue) is True
        assert await driver._store.get_marker(driver._m("payload", "e2")) is None
