"""Rate and concurrency limits on every driver (SPEC13 "Limits", point 5).

Driver-level: `reserve` checks a job's `Limit` in the same atomic step as it would hand it out.
Allowed: the start is counted (GCRA for the rate, the key's running jobs for concurrency).
Not allowed: the job is not handed out, its try is not counted (attempts 0, status `queued`),
it keeps its place among its key's jobs, and jobs behind it of other keys still go out. State
is per (queue, key). An idle `wait` wakes when a held job becomes allowed.

Rate tests use intervals of 0.5 s: time is the behaviour under test there, so they wait
on the driver (`wait`) for the next allowed start, never on a guessed sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from core.queue.drivers import Driver
from core.queue.drivers.base import Limit
from core.status import Status
from tests.conformance.workflow_support import (
    end,
    new_id,
    outgoing,
    reserve_one,
    reserve_within,
    status_of,
    take,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)

#: 2 starts a second, evenly: one every 0.5 s (long enough that two calls in a row fall
#: within one interval even on a loaded machine).
RATE = Limit("api", rate=2, period=1.0)
ONE_AT_A_TIME = Limit("printer", concurrency=1)
#: Slack for clocks read on two sides (the server's and ours) and rounding to milliseconds.
SLACK = 0.03


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


# -- rate ----------------------------------------------------------------------------------


async def test_rule_rate_burst_1_refuses_a_second_start_within_the_interval_without_a_try(
    driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push([outgoing(a, queue, 1, limit=RATE), outgoing(b, queue, 2, limit=RATE)])
    started = time.monotonic()
    assert await take(driver, queue) == [a]
    assert await take(driver, queue) == []  # still within the interval
    record = await status_of(driver, b, queue)
    assert (record.status, record.attempts, record.started_at) == (Status.QUEUED, 0, None)
    stats = await driver.stats(queue)
    assert (stats.pending, stats.reserved) == (1, 1)  # a held job is pending
    held = await reserve_within(driver, queue, 2.0)  # allowed again after the interval
    elapsed = time.monotonic() - started
    assert [(h.id, h.attempts) for h in held] == [(b, 1)]
    assert elapsed >= RATE.interval - SLACK, f"second start after {elapsed:.3f}s"


async def test_rule_rate_burst_n_admits_n_starts_at_once_then_the_rate(
    driver: Driver, queue: str
) -> None:
    burst = Limit("api", rate=2, period=1.0, burst=3)
    jobs = ids(5)
    await driver.push([outgoing(j, queue, i, limit=burst) for i, j in enumerate(jobs)])
    started = time.monotonic()
    assert await take(driver, queue) == jobs[:3]
    assert await take(driver, queue) == []
    # One at a time: a slow wake-up could find the fifth allowed too, rightly.
    held = await reserve_within(driver, queue, 2.0, limit=1)
    elapsed = time.monotonic() - started
    assert [h.id for h in held] == [jobs[3]]  # one more per interval, not a second burst
    assert elapsed >= burst.interval - SLACK
    for job_id in jobs[4:]:
        assert (await status_of(driver, job_id, queue)).attempts == 0


async def test_rule_rate_fifo_among_the_held_back_jobs_of_a_key(driver: Driver, queue: str) -> None:
    jobs = ids(3)
    await driver.push([outgoing(j, queue, i, limit=RATE) for i, j in enumerate(jobs)])
    got = [h.id for h in await driver.reserve([queue], 10, lease=30)]
    while len(got) < 3:
        held = await reserve_within(driver, queue, 2.0)
        assert held, f"held-back jobs not handed out: {got}"
        assert len(held) == 1, "two starts of a burst-1 key at once"
        got.append(held[0].id)
    assert got == jobs
    # Spaced by the interval, by the records' start times (the server's clock).
    starts = [(await status_of(driver, j, queue)).started_at for j in jobs]
    assert all(isinstance(t, float) for t in starts)
    gaps = [b - a for a, b in itertools.pairwise(t for t in starts if t is not None)]
    assert min(gaps) >= RATE.interval - SLACK, gaps


async def test_rule_an_idle_wait_returns_when_a_rate_held_job_becomes_allowed(
    driver: Driver, queue: str
) -> None:
    slow = Limit("api", rate=1, period=0.5)
    a, b = ids(2)
    await driver.push([outgoing(a, queue, limit=slow), outgoing(b, queue, limit=slow)])
    started = time.monotonic()
    assert await take(driver, queue) == [a]
    assert await take(driver, queue) == []
    await driver.wait([queue], 5.0)
    waited = time.monotonic() - started
    # Not a busy return while b is held, and not asleep past b's allowed time.
    assert slow.interval / 2 <= waited < 1.5, f"an idle wait returned after {waited:.3f}s"
    held = await reserve_within(driver, queue, 2.0)
    assert [h.id for h in held] == [b]


# -- concurrency ---------------------------------------------------------------------------


async def test_rule_concurrency_1_holds_the_second_job_until_the_first_is_acked(
    driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME)]
    )
    [held] = await driver.reserve([queue], 10, lease=30)
    assert held.id == a
    assert await take(driver, queue) == []
    record = await status_of(driver, b, queue)
    assert (record.status, record.attempts) == (Status.QUEUED, 0)
    await end(driver, held, Status.FAILED)  # however it ends, its slot is free
    [nxt] = await driver.reserve([queue], 10, lease=30)
    assert (nxt.id, nxt.attempts) == (b, 1)


async def test_rule_concurrency_n_runs_n_at_once(driver: Driver, queue: str) -> None:
    two = Limit("gw", concurrency=2)
    jobs = ids(4)
    await driver.push([outgoing(j, queue, i, limit=two) for i, j in enumerate(jobs)])
    held = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in held] == jobs[:2]
    assert await take(driver, queue) == []
    await driver.ack(held[1:])
    assert await take(driver, queue) == [jobs[2]]


async def test_rule_a_retry_frees_the_slot_and_goes_behind_the_held_job(
    driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME)]
    )
    held = await reserve_one(driver, queue, a)
    await driver.release(held, 0, error="E")
    [nxt] = await driver.reserve([queue], 10, lease=30)
    assert nxt.id == b
    await driver.ack([nxt])
    [again] = await driver.reserve([queue], 10, lease=30)
    assert (again.id, again.attempts) == (a, 2)


async def test_rule_a_refund_frees_the_slot_and_keeps_the_head(driver: Driver, queue: str) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME)]
    )
    held = await reserve_one(driver, queue, a)
    await driver.release(held, refund=True)
    again = await driver.reserve([queue], 10, lease=30)
    assert [(h.id, h.attempts) for h in again] == [(a, 1)]


async def test_rule_a_lost_lease_frees_the_slot_and_a_late_ack_does_not_free_it_twice(
    driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME)]
    )
    [lapsed] = await driver.reserve([queue], 10, lease=0.2)
    assert lapsed.id == a
    await asyncio.sleep(0.3)  # the lease must expire: time is the behaviour
    held = await driver.reserve([queue], 10, lease=30)
    # The reaped job is waiting again at the head of its key, the key had one slot: a only.
    assert [(h.id, h.attempts) for h in held] == [(a, 2)]
    await driver.ack([lapsed])  # the lapsed worker's ack is ignored: no slot comes free
    assert await take(driver, queue) == []
    assert (await status_of(driver, b, queue)).attempts == 0
    await driver.ack(held)
    assert await take(driver, queue) == [b]


async def test_rule_an_idle_wait_wakes_when_a_job_of_the_key_stops(
    backend: Backend, driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME)]
    )
    held = await reserve_one(driver, queue, a)
    assert await take(driver, queue) == []
    # A driver whose `wait` a push wakes (`blocks`) is woken by the slot coming free; the
    # others are polled by the worker every `worker_sleep`, the timeout it gives them.
    timeout = 10.0 if driver.blocks else backend.settings().worker_sleep
    waiter = asyncio.create_task(driver.wait([queue], timeout))
    await asyncio.sleep(0.1)  # let it block (a wait that returns early is allowed, though)
    acked = time.monotonic()
    await driver.ack([held])
    await asyncio.wait_for(waiter, 2.0)
    assert time.monotonic() - acked < 1.0
    assert await take(driver, queue) == [b]


# -- both, and what is not blocked ---------------------------------------------------------


async def test_rule_no_head_of_line_blocking(driver: Driver, queue: str) -> None:
    a, b, free, other_key, c = ids(5)
    await driver.push(
        [
            outgoing(a, queue, limit=ONE_AT_A_TIME),
            outgoing(b, queue, limit=ONE_AT_A_TIME),
            outgoing(free, queue),
            outgoing(other_key, queue, limit=Limit("scanner", concurrency=1)),
            outgoing(c, queue, limit=ONE_AT_A_TIME),
        ]
    )
    # One reserve call: the held-back b and c do not stop the jobs behind them.
    assert await take(driver, queue) == [a, free, other_key]
    record = await status_of(driver, c, queue)
    assert (record.status, record.attempts) == (Status.QUEUED, 0)


async def test_rule_rate_and_concurrency_together(driver: Driver, queue: str) -> None:
    both = Limit("api", rate=2, period=1.0, burst=2, concurrency=1)
    a, b, c = ids(3)
    await driver.push([outgoing(j, queue, limit=both) for j in (a, b, c)])
    held = await driver.reserve([queue], 10, lease=30)
    assert [h.id for h in held] == [a]  # the burst allows two; concurrency one
    await driver.ack(held)
    assert await take(driver, queue) == [b]  # second start of the burst


async def test_rule_limit_state_is_per_queue(driver: Driver, queue: str) -> None:
    other = f"{queue}-other"
    a, b, c = ids(3)
    await driver.push(
        [
            outgoing(a, queue, limit=ONE_AT_A_TIME),
            outgoing(b, other, limit=ONE_AT_A_TIME),
            outgoing(c, other, limit=RATE),
        ]
    )
    await driver.push([outgoing(new_id(), queue, limit=RATE)])
    held = await driver.reserve([queue, other], 10, lease=30)
    assert {h.id for h in held} >= {a, b, c}
    assert len(held) == 4


async def test_rule_held_jobs_of_a_key_go_out_by_priority_then_fifo(
    driver: Driver, queue: str
) -> None:
    a, low1, low2, high = ids(4)
    await driver.push([outgoing(a, queue, limit=ONE_AT_A_TIME)])
    held = [await reserve_one(driver, queue, a)]
    await driver.push(
        [
            outgoing(low1, queue, limit=ONE_AT_A_TIME),
            outgoing(low2, queue, limit=ONE_AT_A_TIME),
            outgoing(high, queue, limit=ONE_AT_A_TIME, priority=5),
        ]
    )
    assert await take(driver, queue) == []
    order: list[str] = []
    for _ in range(3):
        await driver.ack(held)
        held = await driver.reserve([queue], 10, lease=30)
        assert len(held) == 1
        order.append(held[0].id)
    assert order == [high, low1, low2]


async def test_rule_a_held_job_can_be_cancelled(driver: Driver, queue: str) -> None:
    a, b, c = ids(3)
    await driver.push([outgoing(j, queue, limit=ONE_AT_A_TIME) for j in (a, b, c)])
    held = await reserve_one(driver, queue, a)
    assert await take(driver, queue) == []
    assert await driver.cancel(b, queue) is True
    assert (await status_of(driver, b, queue)).status is Status.CANCELLED
    await driver.ack([held])
    assert await take(driver, queue) == [c]


async def test_rule_a_held_job_expires_by_its_ttl(driver: Driver, queue: str) -> None:
    a, b = ids(2)
    await driver.push(
        [outgoing(a, queue, limit=ONE_AT_A_TIME), outgoing(b, queue, limit=ONE_AT_A_TIME, ttl=0.2)]
    )
    held = await reserve_one(driver, queue, a)
    await asyncio.sleep(0.3)  # past b's ttl while it is held back
    await driver.ack([held])
    assert await take(driver, queue) == []
    assert (await status_of(driver, b, queue)).status is Status.EXPIRED
    assert (await driver.stats(queue)).size == 0


async def test_rule_clear_removes_held_jobs(driver: Driver, queue: str) -> None:
    a, b, c, d = ids(4)
    await driver.push([outgoing(j, queue, limit=ONE_AT_A_TIME) for j in (a, b, c)])
    held = await reserve_one(driver, queue, a)
    assert await take(driver, queue) == []
    assert await driver.clear(queue) == 2
    stats = await driver.stats(queue)
    assert (stats.pending, stats.reserved) == (0, 1)
    await driver.ack([held])
    assert await take(driver, queue) == []
    # The key works on after the clear: a new job of it starts at once.
    await driver.push([outgoing(d, queue, limit=ONE_AT_A_TIME)])
    assert await take(driver, queue) == [d]
