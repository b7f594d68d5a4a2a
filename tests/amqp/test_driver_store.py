"""What the amqp driver keeps in its companion store: failed records retried, cancels,
unique keys, pauses, counts; and prefetched jobs given back when a queue is no longer asked
for."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from core.queue.drivers.base import FailedJob, Outcome, OutgoingJob
from core.status import Status
from tests.amqp.support import new_queue, opened


async def test_retry_failed_claims_pushes_then_removes(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        store = driver.failed_store()
        await store.add(FailedJob("f1", "amqp", queue, '{"n": 1}', "boom", datetime.now(UTC)))
        [record] = await store.list(queue)
        assert await driver.retry_failed([record]) == ["f1"]
        assert await store.get("f1") is None
        assert await driver.retry_failed([record]) == []  # gone: never pushed twice
        [job] = await driver.reserve([queue], 5, 30.0)
        assert (job.id, job.payload, job.attempts) == ("f1", b'{"n": 1}', 1)
        await driver.ack([job])


async def test_a_cancelled_waiting_job_is_dropped_when_delivered(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("c1", queue, b"x"), OutgoingJob("c2", queue, b"y")])
        assert await driver.cancel("c1") is True
        assert [j.id for j in await driver.reserve([queue], 5, 30.0)] == ["c2"]
        assert (await driver.recent(queue)).cancelled == 1


async def test_a_running_job_is_asked_to_cancel(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob("c3", queue, b"x")])
        [job] = await driver.reserve([queue], 1, 30.0)
        assert await driver.cancel_requested([job]) == []
        assert await driver.cancel("c3") is True
        assert await driver.cancel_requested([job]) == ["c3"]
        job.outcome = Outcome(Status.CANCELLED, 60.0, error="cancelled")
        await driver.ack([job])
        assert await driver.cancel("c3") is False


async def test_a_unique_key_is_free_again_once_its_job_starts(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        first = OutgoingJob("u1", queue, b"x", unique_key="k")
        again = OutgoingJob("u2", queue, b"x", unique_key="k")
        assert [p.outcome for p in await driver.push([first])] == ["created"]
        assert [(p.id, p.outcome) for p in await driver.push([again])] == [("u1", "duplicate")]
        [job] = await driver.reserve([queue], 1, 30.0)
        assert [p.outcome for p in await driver.push([again])] == ["created"]
        await driver.ack([job])


async def test_a_queue_no_longer_asked_for_gives_its_prefetch_back_unspent(
    tmp_path: Path,
) -> None:
    queue, other = new_queue(), new_queue()
    async with opened(tmp_path) as driver:
        await driver.push([OutgoingJob(f"b{n}", queue, b"x") for n in range(3)])
        [job] = await driver.reserve([queue], 1, 30.0)
        await driver.ack([job])  # room again: the broker delivers the next one
        await driver.wait([queue], 5.0)
        assert len(driver._inbox[queue]) == 1
        # The worker pauses `queue`: it now asks for `other` only.
        assert await driver.reserve([other], 3, 30.0) == []
        assert not driver._inbox.get(queue)
    async with opened(tmp_path) as second:
        jobs = await second.reserve([queue], 5, 30.0)
        assert sorted((j.id, j.attempts) for j in jobs) == [("b1", 1), ("b2", 1)]
        await second.ack(jobs)


async def test_pauses_are_kept_apart_from_the_stores_own_queues(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        await driver.pause(queue)
        assert await driver.paused([queue, "other"]) == {queue}
        assert await driver._store.paused([queue]) == set()
        await driver.resume(queue)
        assert await driver.paused([queue]) == set()


async def test_clear_drops_the_delayed_jobs_of_its_queue_when_they_come_due(
    tmp_path: Path,
) -> None:
    queue, other = new_queue(), new_queue()
    async with opened(tmp_path) as driver:
        await driver.push(
            [
                OutgoingJob("w1", queue, b"x"),
                OutgoingJob("w2", queue, b"x"),
                OutgoingJob("d1", queue, b"x", delay=0.6, unique_key="k"),
                OutgoingJob("o1", other, b"x", delay=0.6),
            ]
        )
        assert await driver.clear(queue) == 2  # the delayed one is not counted
        await driver.push([OutgoingJob("after", queue, b"x", delay=0.6)])
        deadline = time.monotonic() + 10
        got: list[str] = []
        while time.monotonic() < deadline and sorted(got) != ["after", "o1"]:
            await driver.wait([queue, other], 0.5)
            jobs = await driver.reserve([queue, other], 5, 30.0)
            got += [j.id for j in jobs]
            await driver.ack(jobs)
        assert sorted(got) == ["after", "o1"]  # d1 was dropped, o1 of another queue was not
        assert await driver.job_status("d1") is None
        # Its unique key went with it.
        pushed = await driver.push([OutgoingJob("d2", queue, b"x", unique_key="k")])
        assert [p.outcome for p in pushed] == ["created"]
