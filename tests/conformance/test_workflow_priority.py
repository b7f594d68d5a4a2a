"""Priorities on every driver (SPEC13 "Priority and order", point 3).

Driver-level: `reserve` hands out `at_front` jobs first (the latest first), then higher
`priority`, then among equals the order in which jobs became ready (push order; due order for
delayed ones; a retried job behind the ready jobs of its level; a refunded job or one whose
lease expired at the head of its level). A job keeps its priority for its whole life.
"""

from __future__ import annotations

import asyncio

import pytest

from core.queue.drivers import Driver, Pushed
from core.queue.drivers.base import MAX_PRIORITY
from core.status import Status
from tests.conformance.workflow_support import (
    n_of,
    new_id,
    outgoing,
    reserve_one,
    status_of,
    take,
)

pytestmark = pytest.mark.timeout(60)


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


async def test_rule_at_front_then_priority_then_ready_order(driver: Driver, queue: str) -> None:
    low, high1, mid, neg, high2, front1, front2 = ids(7)
    await driver.push(
        [
            outgoing(low, queue, 0),
            outgoing(high1, queue, 1, priority=5),
            outgoing(mid, queue, 2, priority=1),
            outgoing(neg, queue, 3, priority=-4),
        ]
    )
    await driver.push([outgoing(high2, queue, 4, priority=5)])
    await driver.push([outgoing(front1, queue, 5, at_front=True)])
    await driver.push([outgoing(front2, queue, 6, at_front=True, priority=-9)])
    assert await take(driver, queue) == [front2, front1, high1, high2, mid, low, neg]


async def test_rule_extreme_priorities_order_exactly(driver: Driver, queue: str) -> None:
    top, below_top, zero, above_bottom, bottom = ids(5)
    await driver.push(
        [
            outgoing(zero, queue),
            outgoing(bottom, queue, priority=-MAX_PRIORITY),
            outgoing(below_top, queue, priority=MAX_PRIORITY - 1),
            outgoing(above_bottom, queue, priority=-MAX_PRIORITY + 1),
            outgoing(top, queue, priority=MAX_PRIORITY),
        ]
    )
    assert await take(driver, queue) == [top, below_top, zero, above_bottom, bottom]
    assert (await status_of(driver, top, queue)).priority == MAX_PRIORITY
    assert (await status_of(driver, bottom, queue)).priority == -MAX_PRIORITY


async def test_rule_fifo_among_equal_priorities(driver: Driver, queue: str) -> None:
    jobs = ids(30)
    # One push call for the first half, one call each for the rest; two levels interleaved.
    await driver.push(
        [outgoing(j, queue, i, priority=3 * (i % 2)) for i, j in enumerate(jobs[:15])]
    )
    for i, j in enumerate(jobs[15:], start=15):
        await driver.push([outgoing(j, queue, i, priority=3 * (i % 2))])
    odd = [j for i, j in enumerate(jobs) if i % 2]
    even = [j for i, j in enumerate(jobs) if not i % 2]
    # Handed out a few at a time: the order holds across reserve calls.
    got: list[str] = []
    while len(got) < len(jobs):
        batch = await take(driver, queue, 4)
        assert batch, "jobs left behind"
        got += batch
    assert got == odd + even


async def test_rule_a_retried_job_goes_behind_the_ready_jobs_of_its_level(
    driver: Driver, queue: str
) -> None:
    a, b, c, low, top = ids(5)
    await driver.push([outgoing(a, queue, priority=2), outgoing(b, queue, priority=2)])
    held = await reserve_one(driver, queue, a)
    await driver.push([outgoing(c, queue, priority=2), outgoing(low, queue)])
    await driver.push([outgoing(top, queue, priority=7)])
    await driver.release(held, 0, error="E")
    record = await status_of(driver, a, queue)
    assert (record.status, record.priority) == (Status.RETRYING, 2)
    # Behind b and c (ready at its level), still ahead of the lower level: priority kept.
    assert await take(driver, queue) == [top, b, c, a, low]


async def test_rule_a_delayed_retry_keeps_its_priority_when_due(driver: Driver, queue: str) -> None:
    a, low, low2 = ids(3)
    await driver.push([outgoing(a, queue, priority=4)])
    held = await reserve_one(driver, queue, a)
    await driver.release(held, 0.2, error="E")
    await driver.push([outgoing(low, queue)])
    await asyncio.sleep(0.3)  # until its retry is due: the delay is the behaviour
    await driver.push([outgoing(low2, queue)])
    assert await take(driver, queue) == [a, low, low2]


async def test_rule_a_refunded_job_goes_to_the_head_of_its_level(
    driver: Driver, queue: str
) -> None:
    a, b, c, low, top = ids(5)
    await driver.push([outgoing(a, queue, 1, priority=2)])
    held = await reserve_one(driver, queue, a)
    await driver.push(
        [
            outgoing(b, queue, 2, priority=2),
            outgoing(c, queue, 3, priority=2),
            outgoing(low, queue, 4),
            outgoing(top, queue, 5, priority=9),
        ]
    )
    await driver.release(held, refund=True)
    record = await status_of(driver, a, queue)
    assert (record.status, record.priority, record.attempts) == (Status.QUEUED, 2, 0)
    assert await take(driver, queue) == [top, a, b, c, low]


async def test_rule_a_job_whose_lease_expired_goes_to_the_head_of_its_level(
    driver: Driver, queue: str
) -> None:
    a, b, c, low, top = ids(5)
    await driver.push([outgoing(a, queue, 1, priority=2)])
    [lapsed] = await driver.reserve([queue], 1, lease=0.2)
    assert lapsed.id == a
    await driver.push(
        [
            outgoing(b, queue, 2, priority=2),
            outgoing(c, queue, 3, priority=2),
            outgoing(low, queue, 4),
            outgoing(top, queue, 5, priority=9),
        ]
    )
    await asyncio.sleep(0.3)  # the lease must expire: time is the behaviour
    held = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in held] == [top, a, b, c, low]
    assert held[1].attempts == 2
    assert (await status_of(driver, a, queue)).priority == 2


async def test_rule_replace_keeps_the_holders_place_and_priority(
    driver: Driver, queue: str
) -> None:
    before, holder, after, low = ids(4)
    await driver.push(
        [
            outgoing(before, queue, 1, priority=3),
            outgoing(holder, queue, 2, priority=3, check_id=True),
            outgoing(after, queue, 3, priority=3),
            outgoing(low, queue, 4, priority=1),
        ]
    )
    # The replacement asks for another priority: the holder keeps its own, and its place.
    replacing = outgoing(holder, queue, 20, priority=0, check_id=True, on_duplicate="replace")
    assert await driver.push([replacing]) == [Pushed(holder, "replaced")]
    assert (await status_of(driver, holder, queue)).priority == 3
    held = await driver.reserve([queue], 10, lease=30)
    assert [(h.id, n_of(h.payload)) for h in held] == [
        (before, 1),
        (holder, 20),
        (after, 3),
        (low, 4),
    ]


async def test_rule_replace_by_unique_key_keeps_the_holders_priority(
    driver: Driver, queue: str
) -> None:
    first, other, late = ids(3)
    await driver.push([outgoing(first, queue, 1, priority=5, unique_key="k")])
    await driver.push([outgoing(other, queue, 2, priority=4)])
    replacing = outgoing(late, queue, 9, priority=0, unique_key="k", on_duplicate="replace")
    assert await driver.push([replacing]) == [Pushed(first, "replaced")]
    held = await driver.reserve([queue], 10, lease=30)
    assert [(h.id, n_of(h.payload)) for h in held] == [(first, 9), (other, 2)]


async def test_rule_delayed_prioritized_jobs_are_ordered_when_due(
    driver: Driver, queue: str
) -> None:
    ready_low, later, sooner, ready_high = ids(4)
    await driver.push(
        [
            outgoing(ready_low, queue, 1),
            outgoing(later, queue, 2, priority=5, delay=0.25),
            outgoing(sooner, queue, 3, priority=5, delay=0.1),
        ]
    )
    await asyncio.sleep(0.35)  # both due: the delay is the behaviour
    # Pushed after both became due: behind them at its level (due order, then push order);
    # all three ahead of the lower job that was ready first.
    await driver.push([outgoing(ready_high, queue, 4, priority=5)])
    assert await take(driver, queue) == [sooner, later, ready_high, ready_low]


async def test_rule_a_due_prioritized_job_passes_lower_ready_jobs(
    driver: Driver, queue: str
) -> None:
    low1, low2, urgent = ids(3)
    await driver.push([outgoing(urgent, queue, priority=1, delay=0.1)])
    await driver.push([outgoing(low1, queue), outgoing(low2, queue)])
    await asyncio.sleep(0.2)  # due: the delay is the behaviour
    assert await take(driver, queue) == [urgent, low1, low2]


async def test_rule_priority_is_per_queue_and_earlier_queues_go_first(
    driver: Driver, queue: str
) -> None:
    other = f"{queue}-other"
    plain, urgent = ids(2)
    await driver.push([outgoing(urgent, other, priority=100), outgoing(plain, queue)])
    assert await take(driver, [queue, other]) == [plain, urgent]


async def test_rule_stats_count_prioritized_jobs_and_status_shows_priority(
    driver: Driver, queue: str
) -> None:
    a, b, c, d = ids(4)
    await driver.push(
        [
            outgoing(a, queue, priority=3),
            outgoing(b, queue, priority=-1),
            outgoing(c, queue),
            outgoing(d, queue, priority=8, delay=60),
        ]
    )
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.deferred) == (3, 1, 0, 0)
    assert stats.size == 4
    for job_id, priority in ((a, 3), (b, -1), (c, 0), (d, 8)):
        assert (await status_of(driver, job_id, queue)).priority == priority
    assert await take(driver, queue, 1) == [a]
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (2, 1, 1)
    record = await status_of(driver, a, queue)
    assert (record.status, record.priority) == (Status.RUNNING, 3)
    assert await driver.clear(queue) == 3
    assert (await driver.stats(queue)).size == 1
