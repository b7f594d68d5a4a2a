"""Groups on every driver (SPEC14 §1, the rules of `OutgoingJob.group`).

Per (queue, group) one job is in turn (ready, scheduled, retrying, running); the others wait
in the group's line in push order (status `queued`, `JobStatus.group` set, counted pending).
The turn passes only at an end of the holder (ack with any outcome, cancel while waiting, ttl
expiry met by reserve, `clear`), and the line's first job then becomes ready behind the jobs
already ready: groups are served fairly. A retry, a refund or a lost lease keep the turn.

Tests that are about time (ttl, delays, leases) wait for it; the rest never sleep.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from core.queue.drivers import Driver, Outcome
from core.queue.drivers.base import Limit
from core.status import Status
from tests.conformance.iot_support import (
    SLACK,
    grouped,
    reserve_runnable,
    run_in_turn,
    split,
    take_ids,
)
from tests.conformance.workflow_support import (
    both,
    end,
    n_of,
    new_id,
    outgoing,
    record_job,
    reserve_one,
    reserve_within,
    run,
    second_driver,
    status_of,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(90)


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


# -- one at a time, in push order ----------------------------------------------------------


async def test_group_reserve_with_a_big_limit_hands_out_one_job_per_group(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3, b1, b2, plain = ids(6)
    await driver.push(
        [
            grouped(a1, queue, "A", 1),
            grouped(a2, queue, "A", 2),
            grouped(a3, queue, "A", 3),
            grouped(b1, queue, "B", 4),
            grouped(b2, queue, "B", 5),
            outgoing(plain, queue, 6),
        ]
    )
    assert await take_ids(driver, queue, 100) == [a1, b1, plain]
    # The holders run: their lines wait.
    assert await take_ids(driver, queue, 100) == []


async def test_group_jobs_run_in_push_order_across_many_jobs(driver: Driver, queue: str) -> None:
    jobs = ids(40)
    # Pushed over several calls, some in one call: push order is the order.
    await driver.push([grouped(j, queue, "dev-1", i) for i, j in enumerate(jobs[:25])])
    for i, j in enumerate(jobs[25:], start=25):
        await driver.push([grouped(j, queue, "dev-1", i)])
    assert await run_in_turn(driver, queue, 40) == jobs
    assert await take_ids(driver, queue) == []


async def test_group_priority_and_at_front_do_not_reorder_a_line(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push(
        [
            grouped(a1, queue, "A"),
            grouped(a2, queue, "A"),
            grouped(a3, queue, "A", priority=9, at_front=True),
        ]
    )
    assert await run_in_turn(driver, queue, 3) == [a1, a2, a3]


async def test_two_groups_interleave_one_job_each_in_turn(driver: Driver, queue: str) -> None:
    a = ids(5)
    b = ids(5)
    # All of A first, then all of B: a holder's successor becomes ready behind the other
    # group's holder, so one reserve at a time alternates.
    await driver.push([grouped(j, queue, "A") for j in a] + [grouped(j, queue, "B") for j in b])
    order: list[str] = []
    for _ in range(10):
        [held] = await reserve_runnable(driver, queue, 1)
        order.append(held.id)
        await driver.ack([held])
    assert order == [x for pair in zip(a, b, strict=True) for x in pair]


async def test_groups_on_different_queues_are_independent(driver: Driver, queue: str) -> None:
    other = f"{queue}-other"
    here1, here2, there1, there2 = ids(4)
    await driver.push(
        [
            grouped(here1, queue, "A"),
            grouped(here2, queue, "A"),
            grouped(there1, other, "A"),
            grouped(there2, other, "A"),
        ]
    )
    # One holder per (queue, group): both queues' first jobs run at once.
    held_here = await reserve_one(driver, queue, here1)
    held_there = await reserve_one(driver, other, there1)
    # Ending the holder of one queue passes the turn in that queue only.
    await driver.ack([held_there])
    assert await take_ids(driver, queue) == []
    assert await take_ids(driver, other) == [there2]
    await driver.ack([held_here])
    assert await take_ids(driver, queue) == [here2]


# -- the turn passes at an end -------------------------------------------------------------


@pytest.mark.parametrize("how", [Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.EXPIRED])
async def test_group_next_becomes_ready_only_after_the_holders_ack(
    driver: Driver, queue: str, how: Status
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A", 1), grouped(a2, queue, "A", 2)])
    held = await reserve_one(driver, queue, a1)
    assert await take_ids(driver, queue) == []
    await end(driver, held, how)
    assert (await status_of(driver, a1, queue)).status is how
    [nxt] = await reserve_runnable(driver, queue)
    assert (nxt.id, n_of(nxt.payload), nxt.attempts) == (a2, 2, 1)


async def test_group_cancel_of_a_running_holder_keeps_the_turn_until_its_ack(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A")])
    held = await reserve_one(driver, queue, a1)
    assert await driver.cancel(a1, queue) is True  # a request its worker sees
    assert await take_ids(driver, queue) == []
    held.outcome = Outcome(Status.CANCELLED, 60, error="cancelled")
    await driver.ack([held])
    assert await take_ids(driver, queue) == [a2]


async def test_group_cancel_of_a_waiting_holder_passes_the_turn(driver: Driver, queue: str) -> None:
    a1, a2, a3 = ids(3)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    assert await driver.cancel(a1, queue) is True
    assert (await status_of(driver, a1, queue)).status is Status.CANCELLED
    assert await take_ids(driver, queue) == [a2]


async def test_group_cancel_of_a_scheduled_holder_passes_the_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A", delay=60), grouped(a2, queue, "A")])
    assert await take_ids(driver, queue) == []  # the holder is scheduled: the line waits
    assert await driver.cancel(a1, queue) is True
    assert await take_ids(driver, queue) == [a2]


async def test_group_ttl_expiry_of_the_holder_is_handed_back_and_passes_the_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A", 1, ttl=0.2), grouped(a2, queue, "A", 2)])
    await asyncio.sleep(0.3)  # past the holder's ttl: time is the behaviour
    runnable, expired = split(await driver.reserve([queue], 10, lease=30))
    assert [(h.id, h.expired, n_of(h.payload), h.attempts) for h in expired] == [(a1, True, 1, 0)]
    assert (await status_of(driver, a1, queue)).status is Status.EXPIRED
    # The successor took the turn in the same step: ready now (this reserve or the next).
    if not runnable:
        runnable = await reserve_runnable(driver, queue)
    assert [h.id for h in runnable] == [a2]
    assert (await driver.recent(queue)).expired == 1


async def test_group_a_line_job_past_its_ttl_expires_when_it_takes_the_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push(
        [grouped(a1, queue, "A"), grouped(a2, queue, "A", 2, ttl=0.2), grouped(a3, queue, "A")]
    )
    held = await reserve_one(driver, queue, a1)
    await asyncio.sleep(0.3)  # a2's ttl passes while it waits in the line
    await driver.ack([held])
    got: list[str] = []
    handed_back: list[tuple[str, int]] = []
    for _ in range(2):  # the expiry and the next turn: this reserve or the next
        runnable, expired = split(await driver.reserve([queue], 10, lease=30))
        got += [h.id for h in runnable]
        handed_back += [(h.id, n_of(h.payload)) for h in expired]
        if got:
            break
    assert (handed_back, got) == ([(a2, 2)], [a3])
    assert (await status_of(driver, a2, queue)).status is Status.EXPIRED
    assert (await driver.recent(queue)).expired == 1


async def test_group_a_line_job_past_its_ttl_reads_expired_and_never_runs(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push(
        [grouped(a1, queue, "A"), grouped(a2, queue, "A", ttl=0.2), grouped(a3, queue, "A")]
    )
    held = await reserve_one(driver, queue, a1)
    await asyncio.sleep(0.3)  # a2's ttl passes while it waits in the line
    assert (await status_of(driver, a2, queue)).status is Status.EXPIRED  # reads as today
    assert await take_ids(driver, queue) == []  # a1 still holds the turn
    await driver.ack([held])
    runnable, _ = split(await driver.reserve([queue], 10, lease=30))
    if not runnable:
        runnable, _ = split(await driver.reserve([queue], 10, lease=30))
    assert [h.id for h in runnable] == [a3]
    assert (await driver.recent(queue)).expired == 1


@pytest.mark.parametrize("holder_delay", [0.0, 60.0])
async def test_group_clear_removes_the_line_and_resets_the_group(
    driver: Driver, queue: str, holder_delay: float
) -> None:
    a1, a2, a3, a4 = ids(4)
    await driver.push(
        [
            grouped(a1, queue, "A", delay=holder_delay),
            grouped(a2, queue, "A"),
            grouped(a3, queue, "A"),
        ]
    )
    assert await driver.clear(queue) == 3
    assert await driver.job_status(a2, queue) is None
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.size) == (0, 0, 0)
    # The group is free: a new job takes the turn at once.
    await driver.push([grouped(a4, queue, "A")])
    assert await take_ids(driver, queue) == [a4]


async def test_group_clear_with_a_running_holder_then_its_ack_frees_the_group(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3, a4 = ids(4)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    held = await reserve_one(driver, queue, a1)
    assert await driver.clear(queue) == 2  # the line; the running holder stays
    await driver.ack([held])
    assert await take_ids(driver, queue) == []  # nothing of the old line comes back
    await driver.push([grouped(a4, queue, "A")])
    assert await take_ids(driver, queue) == [a4]


# -- the turn is kept ------------------------------------------------------------------------


async def test_group_a_retry_keeps_the_turn_and_runs_again_before_the_rest(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    held = await reserve_one(driver, queue, a1)
    await driver.release(held, 0.4, error="E")
    record = await status_of(driver, a1, queue)
    assert (record.status, record.group) == (Status.RETRYING, "A")
    assert await take_ids(driver, queue) == []  # nobody of the group while a1 retries
    again = await reserve_within(driver, queue, 5.0)
    assert [(h.id, h.attempts, h.expired) for h in again] == [(a1, 2, False)]
    # Released at once this time: still the holder, ready again, still before a2.
    await driver.release(again[0], 0, error="E")
    third = await reserve_runnable(driver, queue)
    assert [(h.id, h.attempts) for h in third] == [(a1, 3)]
    await driver.ack(third)
    assert await run_in_turn(driver, queue, 2) == [a2, a3]


async def test_group_a_refund_keeps_the_turn(driver: Driver, queue: str) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A")])
    held = await reserve_one(driver, queue, a1)
    await driver.release(held, refund=True)
    again = await reserve_runnable(driver, queue)
    assert [(h.id, h.attempts) for h in again] == [(a1, 1)]
    await driver.ack(again)
    assert await take_ids(driver, queue) == [a2]


async def test_group_a_lost_lease_keeps_the_turn_and_the_next_never_overtakes(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A")])
    [lapsed] = await driver.reserve([queue], 10, lease=0.2)  # a worker that then dies
    assert lapsed.id == a1
    await asyncio.sleep(0.3)  # the lease must lapse: time is the behaviour
    again = await reserve_runnable(driver, queue)
    assert [(h.id, h.attempts) for h in again] == [(a1, 2)]
    await driver.ack([lapsed])  # the dead worker's late ack is ignored: no turn passes
    assert await take_ids(driver, queue) == []
    await driver.ack(again)
    assert await take_ids(driver, queue) == [a2]


# -- fairness ----------------------------------------------------------------------------------


async def test_group_fairness_a_single_job_is_not_stuck_behind_a_long_line(
    driver: Driver, queue: str
) -> None:
    flood = ids(500)
    single = new_id()
    await driver.push([grouped(j, queue, "busy", i) for i, j in enumerate(flood)])
    await driver.push([grouped(single, queue, "quiet")])
    first = await reserve_runnable(driver, queue, 1)
    await driver.ack(first)  # busy's next becomes ready now: behind quiet's job
    second = await reserve_runnable(driver, queue, 1)
    assert single in [h.id for h in first + second], [h.id for h in first + second]
    assert [h.id for h in first] == [flood[0]]


# -- line jobs -----------------------------------------------------------------------------


async def test_group_line_job_status_is_queued_with_its_group_and_due_time(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    before = time.time()
    await driver.push(
        [grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A", delay=60)]
    )
    holder = await status_of(driver, a1, queue)
    assert (holder.status, holder.group) == (Status.QUEUED, "A")
    line = await status_of(driver, a2, queue)
    assert (line.status, line.group, line.attempts) == (Status.QUEUED, "A", 0)
    assert line.due_at is not None and before - 1 <= line.due_at <= time.time() + 1
    late = await status_of(driver, a3, queue)
    assert (late.status, late.group) == (Status.QUEUED, "A")
    assert late.due_at is not None and before + 59 <= late.due_at <= time.time() + 61
    plain = new_id()
    await driver.push([outgoing(plain, queue)])
    assert (await status_of(driver, plain, queue)).group == ""


async def test_group_stats_count_line_jobs_as_pending(driver: Driver, queue: str) -> None:
    a1, a2, a3, a4, later = ids(5)
    await driver.push(
        [
            grouped(a1, queue, "A"),
            grouped(a2, queue, "A"),
            grouped(a3, queue, "A"),
            grouped(a4, queue, "A", delay=60),  # in the line: pending whatever its delay
            outgoing(later, queue, delay=60),
        ]
    )
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (4, 1, 0)
    await reserve_one(driver, queue, a1)
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.size) == (3, 1, 1, 5)


async def test_group_cancel_of_a_line_job_removes_it_from_the_line(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    assert await driver.cancel(a2, queue) is True
    record = await status_of(driver, a2, queue)
    assert (record.status, record.attempts) == (Status.CANCELLED, 0)
    assert (await driver.recent(queue)).cancelled == 1
    assert (await driver.stats(queue)).pending == 2
    assert await run_in_turn(driver, queue, 2) == [a1, a3]
    assert await driver.cancel(a2, queue) is False


async def test_group_replace_of_a_line_job_keeps_its_place(driver: Driver, queue: str) -> None:
    a1, a2, a3 = ids(3)
    await driver.push(
        [
            grouped(a1, queue, "A", 1),
            grouped(a2, queue, "A", 2, unique_key="latest"),
            grouped(a3, queue, "A", 3),
        ]
    )
    [pushed] = await driver.push(
        [grouped(new_id(), queue, "A", 99, unique_key="latest", on_duplicate="replace")]
    )
    assert (pushed.id, pushed.outcome) == (a2, "replaced")
    assert (await driver.stats(queue)).pending == 3
    await run(driver, queue, a1)
    [held] = await reserve_runnable(driver, queue)
    assert (held.id, n_of(held.payload)) == (a2, 99)
    await driver.ack([held])
    assert await take_ids(driver, queue) == [a3]


async def test_group_a_job_with_dependencies_joins_the_line_when_released(
    driver: Driver, queue: str
) -> None:
    dep, a1, x, a2 = ids(4)
    await driver.push([outgoing(dep, queue), grouped(a1, queue, "A")])
    await driver.push([grouped(x, queue, "A", depends_on=[dep])])  # pushed before a2...
    await driver.push([grouped(a2, queue, "A")])
    assert (await status_of(driver, x, queue)).status is Status.DEFERRED
    held = await reserve_runnable(driver, queue)
    assert [h.id for h in held] == [dep, a1]
    await driver.ack([held[0]])  # dep ends: x is released into A's line, behind a2
    record = await status_of(driver, x, queue)
    assert (record.status, record.group) == (Status.QUEUED, "A")
    assert await take_ids(driver, queue) == []  # a1 still holds the turn
    await driver.ack([held[1]])
    assert await run_in_turn(driver, queue, 2) == [a2, x]


async def test_group_a_released_dependent_takes_a_free_turn_at_once(
    driver: Driver, queue: str
) -> None:
    dep, x = ids(2)
    await driver.push([outgoing(dep, queue), grouped(x, queue, "A", depends_on=[dep])])
    await run(driver, queue, dep)
    assert await take_ids(driver, queue) == [x]


async def test_group_a_delayed_line_job_is_scheduled_until_its_own_due_time(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    pushed_at = time.monotonic()
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A", delay=1.0)])
    await run(driver, queue, a1)  # a2 takes the turn before its due time
    record = await status_of(driver, a2, queue)
    assert (record.status, record.group) == (Status.SCHEDULED, "A")
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed) == (0, 1)
    assert await take_ids(driver, queue) == []
    held = await reserve_within(driver, queue, 5.0)
    assert [h.id for h in held] == [a2]
    assert time.monotonic() - pushed_at >= 1.0 - SLACK


async def test_group_a_delayed_line_job_already_due_is_ready_when_it_takes_the_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A", delay=0.2)])
    held = await reserve_one(driver, queue, a1)
    await asyncio.sleep(0.3)  # a2's due time passes while a1 runs
    await driver.ack([held])
    assert await take_ids(driver, queue) == [a2]


async def test_group_concurrent_acks_of_two_groups_each_pass_their_own_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2, b1, b2 = ids(4)
    await driver.push(
        [
            grouped(a1, queue, "A"),
            grouped(a2, queue, "A"),
            grouped(b1, queue, "B"),
            grouped(b2, queue, "B"),
        ]
    )
    held = await reserve_runnable(driver, queue)
    assert sorted(h.id for h in held) == sorted([a1, b1])
    await asyncio.gather(*(driver.ack([h]) for h in held))
    assert sorted(await take_ids(driver, queue)) == sorted([a2, b2])


async def test_group_a_holder_held_by_a_limit_keeps_the_turn(driver: Driver, queue: str) -> None:
    busy, a1, a2 = ids(3)
    printer = Limit("printer", concurrency=1)
    await driver.push([outgoing(busy, queue, limit=printer)])
    running = await reserve_one(driver, queue, busy)  # the printer's one slot is taken
    await driver.push([grouped(a1, queue, "A", limit=printer), grouped(a2, queue, "A")])
    # a1 is held back by its limit; a2 waits in the line behind it, never overtaking.
    assert await take_ids(driver, queue) == []
    assert (await status_of(driver, a1, queue)).status is Status.QUEUED
    await driver.ack([running])
    assert await run_in_turn(driver, queue, 2) == [a1, a2]


async def test_group_cancel_and_status_find_a_line_job_without_its_queue(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    record = await status_of(driver, a2)
    assert (record.status, record.group, record.queue) == (Status.QUEUED, "A", queue)
    assert await driver.cancel(a2) is True
    assert (await status_of(driver, a2)).status is Status.CANCELLED
    assert await run_in_turn(driver, queue, 2) == [a1, a3]


# -- under concurrency (two workers or dispatchers at once) ---------------------------------


async def test_group_two_workers_reserving_at_once_get_one_job_per_group(
    backend: Backend, driver: Driver, queue: str
) -> None:
    lines = {g: ids(3) for g in ("g0", "g1", "g2", "g3", "g4")}
    await driver.push(
        [grouped(j, queue, g, i) for g, jobs in lines.items() for i, j in enumerate(jobs)]
    )
    async with second_driver(backend, driver) as other:
        first, second = await both(
            driver.reserve([queue], 100, lease=30), other.reserve([queue], 100, lease=30)
        )
    got = sorted(h.id for h in first + second)
    assert got == sorted(jobs[0] for jobs in lines.values())
    assert await take_ids(driver, queue) == []


async def test_group_two_dispatchers_pushing_into_an_empty_group_make_one_holder(
    backend: Backend, driver: Driver, queue: str
) -> None:
    async with second_driver(backend, driver) as other:
        for _ in range(5):
            a, b = ids(2)
            await both(driver.push([grouped(a, queue, "G")]), other.push([grouped(b, queue, "G")]))
            held = await reserve_runnable(driver, queue)
            assert len(held) == 1 and held[0].id in (a, b), [h.id for h in held]
            await driver.ack(held)
            rest = await reserve_runnable(driver, queue)
            assert [h.id for h in rest] == [b if held[0].id == a else a]
            await driver.ack(rest)  # the group is empty again for the next round


async def test_group_an_ack_in_the_reserve_round_trip_hands_out_the_successor(
    driver: Driver, queue: str
) -> None:
    a1, a2, a3 = ids(3)
    await driver.push([grouped(a1, queue, "A"), grouped(a2, queue, "A"), grouped(a3, queue, "A")])
    held = await reserve_one(driver, queue, a1)
    # The worker's loop: acknowledge the finished job and take the next in one call.
    nxt = await driver.reserve([queue], 10, lease=30, ack=[held])
    assert [(h.id, h.expired) for h in nxt] == [(a2, False)]
    assert (await status_of(driver, a1, queue)).status is Status.SUCCEEDED
    last = await driver.reserve([queue], 10, lease=30, ack=nxt)
    assert [h.id for h in last] == [a3]


async def test_group_a_line_jobs_priority_places_it_when_it_takes_the_turn(
    driver: Driver, queue: str
) -> None:
    a1, a2, p1, p2 = ids(4)
    await driver.push(
        [
            grouped(a1, queue, "A"),
            grouped(a2, queue, "A", priority=5),
            outgoing(p1, queue),
            outgoing(p2, queue),
        ]
    )
    [first] = await reserve_runnable(driver, queue, 1)
    assert first.id == a1
    await driver.ack([first])
    # a2 took the turn: ready now at its own priority, ahead of the priority-0 jobs.
    assert await take_ids(driver, queue) == [a2, p1, p2]


async def test_group_replace_of_a_ready_holder_keeps_the_turn(driver: Driver, queue: str) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A", 1, unique_key="k"), grouped(a2, queue, "A", 2)])
    [pushed] = await driver.push(
        [grouped(new_id(), queue, "A", 9, unique_key="k", on_duplicate="replace")]
    )
    assert (pushed.id, pushed.outcome) == (a1, "replaced")
    [held] = await reserve_runnable(driver, queue)
    assert (held.id, n_of(held.payload)) == (a1, 9)
    await driver.ack([held])
    assert await take_ids(driver, queue) == [a2]


async def test_group_a_workflow_cancelling_its_grouped_members_passes_the_turn(
    driver: Driver, queue: str
) -> None:
    m1, g1, g2, record, g3 = ids(5)
    await driver.push(
        [
            outgoing(m1, queue),
            grouped(g1, queue, "A"),  # A's holder
            grouped(g2, queue, "A"),  # in A's line
            record_job(record, queue, "batch", [m1, g1, g2], cancel_on_failure=True),
        ]
    )
    await driver.push([grouped(g3, queue, "A")])  # not a member: behind g2 in A's line
    held = await reserve_one(driver, queue, m1)
    await end(driver, held, Status.FAILED)  # the batch cancels its waiting members
    for member in (g1, g2):
        assert (await status_of(driver, member, queue)).status is Status.CANCELLED
    assert await take_ids(driver, queue) == [g3]
