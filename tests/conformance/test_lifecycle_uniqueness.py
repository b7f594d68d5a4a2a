"""Job ids and unique keys on every driver: what `push` does with a duplicate.

Driver-level (SPEC12 "Uniqueness"): `check_id` with `on_duplicate` reject/keep/replace, the
unique key's holder waiting, running (a successor goes in) or held by `unique_for`, keys freed
only by their holder. Competing dispatcher processes are in tests/test_uniqueness_processes.py.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from core.queue.drivers import Driver, Outcome, OutgoingJob, Pushed
from core.status import Status

pytestmark = pytest.mark.timeout(60)


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, n: int, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", "tests.jobs:RecordJob")
    return OutgoingJob(job_id, queue, orjson.dumps({"n": n}), **fields)


def by_id(job_id: str, queue: str, n: int, on_duplicate: Any = "reject", **f: Any) -> OutgoingJob:
    return outgoing(job_id, queue, n, check_id=True, on_duplicate=on_duplicate, **f)


def by_key(key: str, queue: str, n: int, on_duplicate: Any = "reject", **f: Any) -> OutgoingJob:
    return outgoing(new_id(), queue, n, unique_key=key, on_duplicate=on_duplicate, **f)


def n_of(payload: bytes) -> int:
    return int(orjson.loads(payload)["n"])


async def take_all(driver: Driver, queue: str) -> list[tuple[str, int, int]]:
    """(id, n, attempts) of every ready job, in order."""
    return [(h.id, n_of(h.payload), h.attempts) for h in await driver.reserve([queue], 100, 30)]


# -- ids -----------------------------------------------------------------------------------


async def test_a_waiting_id_is_rejected_or_kept(driver: Driver, queue: str) -> None:
    job_id = new_id()
    assert await driver.push([by_id(job_id, queue, 1)]) == [Pushed(job_id, "created")]
    assert await driver.push([by_id(job_id, queue, 2)]) == [Pushed(job_id, "duplicate")]
    assert await driver.push([by_id(job_id, queue, 3, "keep")]) == [Pushed(job_id, "kept")]
    assert await driver.size(queue) == 1
    assert await take_all(driver, queue) == [(job_id, 1, 1)]


async def test_replace_swaps_a_waiting_jobs_payload_in_its_place(
    driver: Driver, queue: str
) -> None:
    first, job_id, last = new_id(), new_id(), new_id()
    await driver.push([by_id(first, queue, 1), by_id(job_id, queue, 2), by_id(last, queue, 3)])
    [pushed] = await driver.push([by_id(job_id, queue, 20, "replace")])
    assert pushed == Pushed(job_id, "replaced")
    assert await take_all(driver, queue) == [(first, 1, 1), (job_id, 20, 1), (last, 3, 1)]


async def test_replace_keeps_the_tries_of_a_retrying_job(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([by_id(job_id, queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.release(held, 0, error="E")
    assert await driver.push([by_id(job_id, queue, 2, "replace")]) == [Pushed(job_id, "replaced")]
    assert await take_all(driver, queue) == [(job_id, 2, 2)]


async def test_replace_keeps_a_scheduled_jobs_due_time(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([by_id(job_id, queue, 1, delay=60)])
    assert await driver.push([by_id(job_id, queue, 2, "replace")]) == [Pushed(job_id, "replaced")]
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed) == (0, 1)
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SCHEDULED


@pytest.mark.parametrize(
    ("on_duplicate", "outcome"), [("reject", "duplicate"), ("keep", "kept"), ("replace", "kept")]
)
async def test_a_running_id_is_never_replaced(
    driver: Driver, queue: str, on_duplicate: str, outcome: Any
) -> None:
    job_id = new_id()
    await driver.push([by_id(job_id, queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    assert await driver.push([by_id(job_id, queue, 2, on_duplicate)]) == [Pushed(job_id, outcome)]
    assert await driver.size(queue) == 1
    assert await driver.reserve([queue], 1, lease=30) == []
    await driver.ack([held])
    assert await driver.size(queue) == 0


async def test_an_ended_id_is_free_and_its_new_job_replaces_the_record(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([by_id(job_id, queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([held])
    assert await driver.push([by_id(job_id, queue, 2)]) == [Pushed(job_id, "created")]
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.QUEUED
    assert (record.attempts, record.error, record.ended_at) == (0, "", None)
    assert await take_all(driver, queue) == [(job_id, 2, 1)]


async def test_ids_are_checked_per_queue(driver: Driver, queue: str) -> None:
    job_id = new_id()
    assert await driver.push([by_id(job_id, queue, 1)]) == [Pushed(job_id, "created")]
    other = f"{queue}-other"
    assert await driver.push([by_id(job_id, other, 2)]) == [Pushed(job_id, "created")]
    assert await take_all(driver, other) == [(job_id, 2, 1)]


async def test_one_push_of_the_same_id_twice_stores_it_once(driver: Driver, queue: str) -> None:
    job_id = new_id()
    pushed = await driver.push([by_id(job_id, queue, 1), by_id(job_id, queue, 2, "keep")])
    assert pushed == [Pushed(job_id, "created"), Pushed(job_id, "kept")]
    assert await take_all(driver, queue) == [(job_id, 1, 1)]


# -- unique keys ---------------------------------------------------------------------------


async def test_a_waiting_holder_rejects_keeps_or_takes_the_new_payload(
    driver: Driver, queue: str
) -> None:
    [first] = await driver.push([by_key("dev-1", queue, 1)])
    holder = first.id
    assert first.outcome == "created"
    dup = by_key("dev-1", queue, 2)
    assert await driver.push([dup]) == [Pushed(holder, "duplicate")]
    kept = by_key("dev-1", queue, 3, "keep")
    assert await driver.push([kept]) == [Pushed(holder, "kept")]
    replacing = by_key("dev-1", queue, 4, "replace")
    assert await driver.push([replacing]) == [Pushed(holder, "replaced")]
    for job in (dup, kept, replacing):  # each job keeps its own id: none of them was stored
        assert await driver.job_status(job.id, queue) is None
    assert await take_all(driver, queue) == [(holder, 4, 1)]


async def test_replace_by_key_keeps_the_holders_place_and_tries(driver: Driver, queue: str) -> None:
    before = new_id()
    await driver.push([outgoing(before, queue, 0)])
    [first] = await driver.push([by_key("k", queue, 1)])
    after = new_id()
    await driver.push([outgoing(after, queue, 9)])
    await driver.push([by_key("k", queue, 2, "replace")])
    assert await take_all(driver, queue) == [(before, 0, 1), (first.id, 2, 1), (after, 9, 1)]


async def test_a_running_holder_lets_one_successor_in(driver: Driver, queue: str) -> None:
    [first] = await driver.push([by_key("dev-1", queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == first.id
    successor = by_key("dev-1", queue, 2, "replace")
    assert await driver.push([successor]) == [Pushed(successor.id, "created")]
    # The successor is the waiting holder now.
    assert await driver.push([by_key("dev-1", queue, 3, "replace")]) == [
        Pushed(successor.id, "replaced")
    ]
    assert await driver.push([by_key("dev-1", queue, 4)]) == [Pushed(successor.id, "duplicate")]
    assert await take_all(driver, queue) == [(successor.id, 3, 1)]


async def test_a_key_is_freed_when_its_job_ends(driver: Driver, queue: str) -> None:
    [first] = await driver.push([by_key("k", queue, 1)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.ack([held])
    [again] = await driver.push([by_key("k", queue, 2)])
    assert again.outcome == "created" and again.id != first.id


async def test_keys_are_freed_only_by_their_holder(driver: Driver, queue: str) -> None:
    await driver.push([by_key("k", queue, 1)])
    [first] = await driver.reserve([queue], 1, lease=30)
    [successor] = await driver.push([by_key("k", queue, 2)])
    assert successor.outcome == "created"
    first.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([first])  # the first job ends: the key names the successor, it stays
    assert await driver.push([by_key("k", queue, 3)]) == [Pushed(successor.id, "duplicate")]
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == successor.id
    await driver.release(held, 0, error="E")
    assert (await driver.push([by_key("k", queue, 4)]))[0].outcome == "created"


@pytest.mark.parametrize(
    ("on_duplicate", "outcome"), [("reject", "duplicate"), ("keep", "kept"), ("replace", "kept")]
)
async def test_unique_for_holds_the_key_while_running_and_after_the_end(
    driver: Driver, queue: str, on_duplicate: str, outcome: Any
) -> None:
    [first] = await driver.push([by_key("k", queue, 1, unique_for=60)])
    [held] = await driver.reserve([queue], 1, lease=30)
    late = by_key("k", queue, 2, on_duplicate)
    assert await driver.push([late]) == [Pushed(first.id, outcome)]
    await driver.ack([held])
    assert await driver.push([late]) == [Pushed(first.id, outcome)]
    assert await driver.size(queue) == 0
    assert await driver.job_status(late.id, queue) is None


async def test_unique_for_with_a_waiting_holder_allows_replace(driver: Driver, queue: str) -> None:
    [first] = await driver.push([by_key("k", queue, 1, unique_for=60)])
    assert await driver.push([by_key("k", queue, 2, "replace")]) == [Pushed(first.id, "replaced")]
    assert await take_all(driver, queue) == [(first.id, 2, 1)]


async def test_unique_for_ends_after_its_time(driver: Driver, queue: str) -> None:
    [first] = await driver.push([by_key("k", queue, 1, unique_for=0.4)])
    [held] = await driver.reserve([queue], 1, lease=30)
    await driver.ack([held])
    assert (await driver.push([by_key("k", queue, 2)]))[0].outcome == "duplicate"
    await asyncio.sleep(0.5)  # the key's time is under test
    [again] = await driver.push([by_key("k", queue, 3)])
    assert again.outcome == "created" and again.id != first.id


async def test_keys_are_per_queue(driver: Driver, queue: str) -> None:
    other = f"{queue}-other"
    [a] = await driver.push([by_key("k", queue, 1)])
    [b] = await driver.push([by_key("k", other, 2)])
    assert (a.outcome, b.outcome) == ("created", "created")
    assert await take_all(driver, other) == [(b.id, 2, 1)]


async def test_one_push_with_a_key_twice_stores_one_job(driver: Driver, queue: str) -> None:
    jobs = [by_key("k", queue, 1), by_key("k", queue, 2, "replace"), by_key("k", queue, 3)]
    pushed = await driver.push(jobs)
    holder = jobs[0].id
    assert pushed == [
        Pushed(holder, "created"),
        Pushed(holder, "replaced"),
        Pushed(holder, "duplicate"),
    ]
    assert await take_all(driver, queue) == [(holder, 2, 1)]


async def test_the_id_is_checked_before_the_key(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([by_id(job_id, queue, 1)])
    # The id is waiting: the id rule answers, whatever the key says.
    both = by_id(job_id, queue, 2, "keep", unique_key="k")
    assert await driver.push([both]) == [Pushed(job_id, "kept")]
    [holder] = await driver.push([by_key("k", queue, 3)])
    assert holder.outcome == "created"
    # A free id with a held key: the key's holder answers.
    fresh = by_id(new_id(), queue, 4, unique_key="k")
    assert await driver.push([fresh]) == [Pushed(holder.id, "duplicate")]
    assert await driver.job_status(fresh.id, queue) is None
