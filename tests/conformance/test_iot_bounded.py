"""Bounded queues, the IoT counts and expired jobs handed back, on every driver (SPEC14 §2-§4).

`max_length` counts the queue's waiting jobs (pending + delayed: ready, scheduled, retrying,
held, group lines; not running, not deferred) in the push's atomic step. "reject" stores
nothing (`Pushed` "full", counted `rejected`); "drop_oldest" stores the new job and drops the
head of its own group's line, else the oldest ready priority-0 job (a dropped holder passes
its turn), else rejects. A dropped job ends `cancelled` with the "dropped: ..." error, counted
`dropped`, its dependents resolved. Pushes that replace, keep or are duplicates add nothing
and are never refused. Every "replaced" push counts `coalesced`. `reserve` hands back the jobs
it expired (`ReservedJob.expired`) besides up to `limit` runnable ones.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from core.queue.drivers import Driver
from core.queue.drivers.base import Limit, OnDuplicate, Overflow
from core.status import Status
from tests.conformance.iot_support import (
    bounded,
    dropped_error,
    grouped,
    reserve_runnable,
    run_in_turn,
    split,
    take_ids,
)
from tests.conformance.workflow_support import (
    both,
    n_of,
    new_id,
    outgoing,
    reserve_one,
    second_driver,
    status_of,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(90)


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


# -- reject ----------------------------------------------------------------------------------


async def test_bounded_reject_at_max_length_stores_nothing_and_counts_rejected(
    driver: Driver, queue: str
) -> None:
    jobs = ids(3)
    for i, job_id in enumerate(jobs):
        [pushed] = await driver.push([bounded(job_id, queue, 3, n=i)])
        assert pushed.outcome == "created"
    refused = new_id()
    [pushed] = await driver.push([bounded(refused, queue, 3, n=9)])
    assert (pushed.id, pushed.outcome) == (refused, "full")
    assert await driver.job_status(refused, queue) is None
    stats = await driver.stats(queue)
    assert (stats.pending, stats.size) == (3, 3)
    recent = await driver.recent(queue)
    assert (recent.rejected, recent.dropped, recent.cancelled) == (1, 0, 0)
    assert await take_ids(driver, queue) == jobs


async def test_bounded_one_push_call_fills_the_queue_then_refuses_the_rest(
    driver: Driver, queue: str
) -> None:
    jobs = ids(5)
    pushed = await driver.push([bounded(j, queue, 3, n=i) for i, j in enumerate(jobs)])
    assert [(p.id, p.outcome) for p in pushed] == [
        (jobs[0], "created"),
        (jobs[1], "created"),
        (jobs[2], "created"),
        (jobs[3], "full"),
        (jobs[4], "full"),
    ]
    assert (await driver.recent(queue)).rejected == 2
    assert await take_ids(driver, queue) == jobs[:3]


async def test_bounded_count_includes_delayed_and_line_jobs_not_running_or_deferred(
    driver: Driver, queue: str
) -> None:
    a1, a2, later, dep, x, y = ids(6)
    pushed = await driver.push(
        [
            bounded(a1, queue, 3, group="A"),  # ready (the holder)
            bounded(a2, queue, 3, group="A"),  # in A's line
            bounded(later, queue, 3, delay=60),  # scheduled
        ]
    )
    assert [p.outcome for p in pushed] == ["created"] * 3
    [full] = await driver.push([bounded(new_id(), queue, 3)])
    assert full.outcome == "full"
    await reserve_one(driver, queue, a1)  # running: no longer waiting
    [deferred] = await driver.push([bounded(dep, queue, 3, depends_on=[a1])])
    assert deferred.outcome == "created"
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED
    # 2 waiting (a2, later): the running holder and the deferred job are not counted.
    [room] = await driver.push([bounded(x, queue, 3)])
    assert room.outcome == "created"
    [over] = await driver.push([bounded(y, queue, 3)])
    assert over.outcome == "full"
    assert (await driver.recent(queue)).rejected == 2


async def test_bounded_retrying_jobs_count_as_waiting(driver: Driver, queue: str) -> None:
    first, second = ids(2)
    await driver.push([bounded(first, queue, 1)])
    held = await reserve_one(driver, queue, first)
    await driver.release(held, 60, error="E")  # retrying: waiting again
    [pushed] = await driver.push([bounded(second, queue, 1)])
    assert pushed.outcome == "full"


async def test_bounded_jobs_held_by_a_limit_count_as_waiting(driver: Driver, queue: str) -> None:
    busy, held_back = ids(2)
    one = Limit("gw", concurrency=1)
    await driver.push([outgoing(busy, queue, limit=one), outgoing(held_back, queue, limit=one)])
    await reserve_one(driver, queue, busy)
    assert await take_ids(driver, queue) == []  # held_back waits for the limit
    [pushed] = await driver.push([bounded(new_id(), queue, 1)])
    assert pushed.outcome == "full"


async def test_bounded_retries_and_refunds_are_never_refused(driver: Driver, queue: str) -> None:
    first, second, third = ids(3)
    await driver.push([outgoing(first, queue), outgoing(second, queue)])
    held = await reserve_one(driver, queue, first)
    [pushed] = await driver.push([bounded(third, queue, 1)])  # second waits: full
    assert pushed.outcome == "full"
    await driver.release(held, 0, error="E")  # back over the bound: still stored
    assert (await driver.stats(queue)).pending == 2
    [again] = await reserve_runnable(driver, queue, 1)
    assert again.id == second
    await driver.release(again, refund=True)
    got = await reserve_runnable(driver, queue)
    assert sorted(h.id for h in got) == sorted([first, second])
    assert (await driver.recent(queue)).rejected == 1


async def test_bounded_a_released_dependent_is_never_refused(driver: Driver, queue: str) -> None:
    dep, waiting, filler1, filler2 = ids(4)
    await driver.push([outgoing(dep, queue), bounded(waiting, queue, 2, depends_on=[dep])])
    held = await reserve_one(driver, queue, dep)
    pushed = await driver.push([bounded(filler1, queue, 2), bounded(filler2, queue, 2)])
    assert [p.outcome for p in pushed] == ["created", "created"]  # the deferred job: not counted
    await driver.ack([held])  # releases `waiting` into a full queue: it is not refused
    assert await take_ids(driver, queue) == [filler1, filler2, waiting]
    assert (await driver.recent(queue)).rejected == 0


# -- drop_oldest -----------------------------------------------------------------------------


async def test_bounded_drop_oldest_drops_the_oldest_ready_job_and_stores_the_new_one(
    driver: Driver, queue: str
) -> None:
    p1, p2, p3, new = ids(4)
    await driver.push([outgoing(p1, queue, 1), outgoing(p2, queue, 2), outgoing(p3, queue, 3)])
    [pushed] = await driver.push([bounded(new, queue, 3, "drop_oldest", n=4)])
    assert (pushed.id, pushed.outcome) == (new, "created")
    record = await status_of(driver, p1, queue)
    assert (record.status, record.error, record.attempts) == (
        Status.CANCELLED,
        dropped_error(queue, 3),
        0,
    )
    recent = await driver.recent(queue)
    assert (recent.dropped, recent.cancelled, recent.rejected) == (1, 0, 0)
    assert (await driver.stats(queue)).pending == 3
    assert await take_ids(driver, queue) == [p2, p3, new]


async def test_bounded_drop_oldest_spares_prioritized_and_scheduled_jobs(
    driver: Driver, queue: str
) -> None:
    urgent, front, later, p1, p2, new = ids(6)
    await driver.push(
        [
            outgoing(urgent, queue, priority=5),
            outgoing(front, queue, at_front=True),
            outgoing(later, queue, delay=60),
            outgoing(p1, queue),
            outgoing(p2, queue),
        ]
    )
    [pushed] = await driver.push([bounded(new, queue, 5, "drop_oldest")])
    assert pushed.outcome == "created"
    assert (await status_of(driver, p1, queue)).status is Status.CANCELLED
    for kept in (urgent, front, later, p2):
        assert (await status_of(driver, kept, queue)).status in (Status.QUEUED, Status.SCHEDULED)
    assert sorted(await take_ids(driver, queue)) == sorted([front, urgent, p2, new])


async def test_bounded_drop_oldest_without_a_plain_ready_job_rejects(
    driver: Driver, queue: str
) -> None:
    s1, s2, new = ids(3)
    await driver.push([outgoing(s1, queue, delay=60), outgoing(s2, queue, delay=60)])
    [pushed] = await driver.push([bounded(new, queue, 2, "drop_oldest")])
    assert (pushed.id, pushed.outcome) == (new, "full")
    assert await driver.job_status(new, queue) is None
    recent = await driver.recent(queue)
    assert (recent.rejected, recent.dropped) == (1, 0)
    for kept in (s1, s2):
        assert (await status_of(driver, kept, queue)).status is Status.SCHEDULED


async def test_bounded_drop_oldest_of_a_grouped_push_drops_its_own_lines_head(
    driver: Driver, queue: str
) -> None:
    plain, a1, a2, a3, a4 = ids(5)
    await driver.push(
        [
            outgoing(plain, queue),
            grouped(a1, queue, "A", 1),
            grouped(a2, queue, "A", 2),
            grouped(a3, queue, "A", 3),
        ]
    )
    [pushed] = await driver.push([bounded(a4, queue, 4, "drop_oldest", n=4, group="A")])
    assert pushed.outcome == "created"
    record = await status_of(driver, a2, queue)
    assert (record.status, record.error) == (Status.CANCELLED, dropped_error(queue, 4))
    for kept in (plain, a1, a3, a4):
        assert (await status_of(driver, kept, queue)).status is Status.QUEUED
    assert (await driver.recent(queue)).dropped == 1
    held = await reserve_runnable(driver, queue)
    assert [h.id for h in held] == [plain, a1]
    await driver.ack(held)
    assert await run_in_turn(driver, queue, 2) == [a3, a4]


async def test_bounded_drop_oldest_of_a_group_holder_passes_the_turn(
    driver: Driver, queue: str
) -> None:
    b1, b2, new = ids(3)
    await driver.push([grouped(b1, queue, "B", 1), grouped(b2, queue, "B", 2)])
    # No line of its own (no group): the oldest ready job is B's holder.
    [pushed] = await driver.push([bounded(new, queue, 2, "drop_oldest")])
    assert pushed.outcome == "created"
    record = await status_of(driver, b1, queue)
    assert (record.status, record.error) == (Status.CANCELLED, dropped_error(queue, 2))
    # b2 took the turn in the same step: ready now, with the new job.
    assert sorted(await take_ids(driver, queue)) == sorted([b2, new])


async def test_bounded_drop_oldest_of_a_grouped_push_with_an_empty_line_drops_the_oldest_ready(
    driver: Driver, queue: str
) -> None:
    plain, a1, a2 = ids(3)
    await driver.push([outgoing(plain, queue), grouped(a1, queue, "A")])
    # A's line is empty: the oldest ready priority-0 job goes (the plain one).
    [pushed] = await driver.push([bounded(a2, queue, 2, "drop_oldest", group="A")])
    assert pushed.outcome == "created"
    assert (await status_of(driver, plain, queue)).status is Status.CANCELLED
    assert (await status_of(driver, a2, queue)).status is Status.QUEUED
    assert await run_in_turn(driver, queue, 2) == [a1, a2]


async def test_bounded_drop_oldest_of_its_own_groups_holder_lets_the_new_job_run(
    driver: Driver, queue: str
) -> None:
    a1, a2 = ids(2)
    await driver.push([grouped(a1, queue, "A", 1)])
    # The only ready job is A's holder: it is dropped, and the new job of A (never its own
    # victim) takes the turn.
    [pushed] = await driver.push([bounded(a2, queue, 1, "drop_oldest", n=2, group="A")])
    assert pushed.outcome == "created"
    record = await status_of(driver, a1, queue)
    assert (record.status, record.error) == (Status.CANCELLED, dropped_error(queue, 1))
    [held] = await reserve_runnable(driver, queue)
    assert (held.id, n_of(held.payload)) == (a2, 2)


async def test_bounded_dependents_of_a_dropped_job_are_cancelled(
    driver: Driver, queue: str
) -> None:
    victim, child, new = ids(3)
    await driver.push([outgoing(victim, queue), outgoing(child, queue, depends_on=[victim])])
    [pushed] = await driver.push([bounded(new, queue, 1, "drop_oldest")])
    assert pushed.outcome == "created"
    assert (await status_of(driver, victim, queue)).status is Status.CANCELLED
    record = await status_of(driver, child, queue)
    assert (record.status, record.error) == (Status.CANCELLED, f"dependency {victim} cancelled")
    recent = await driver.recent(queue)
    assert (recent.dropped, recent.cancelled) == (1, 1)
    assert await take_ids(driver, queue) == [new]


async def test_bounded_a_dropped_job_record_is_kept_for_its_failure_ttl(
    driver: Driver, queue: str
) -> None:
    gone, kept, new1, new2 = ids(4)
    await driver.push([outgoing(gone, queue, failure_ttl=0), outgoing(kept, queue)])
    await driver.push([bounded(new1, queue, 2, "drop_oldest")])
    await driver.push([bounded(new2, queue, 2, "drop_oldest")])
    assert await driver.job_status(gone, queue) is None
    assert (await status_of(driver, kept, queue)).status is Status.CANCELLED
    assert (await driver.recent(queue)).dropped == 2


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
@pytest.mark.parametrize("on_duplicate", ["replace", "keep", "reject"])
async def test_bounded_pushes_that_add_nothing_are_never_refused_and_never_drop(
    driver: Driver, queue: str, overflow: Overflow, on_duplicate: OnDuplicate
) -> None:
    holder, other = ids(2)
    await driver.push([outgoing(holder, queue, 1, unique_key="k"), outgoing(other, queue, 2)])
    by_key = bounded(new_id(), queue, 2, overflow, n=3, unique_key="k", on_duplicate=on_duplicate)
    by_id = bounded(holder, queue, 2, overflow, n=4, check_id=True, on_duplicate=on_duplicate)
    expected = {"replace": "replaced", "keep": "kept", "reject": "duplicate"}[on_duplicate]
    for job in (by_key, by_id):
        [pushed] = await driver.push([job])
        assert (pushed.id, pushed.outcome) == (holder, expected)
    recent = await driver.recent(queue)
    assert (recent.rejected, recent.dropped) == (0, 0)
    assert (await driver.stats(queue)).pending == 2
    held = await reserve_runnable(driver, queue)
    assert [h.id for h in held] == [holder, other]
    assert n_of(held[0].payload) == (4 if on_duplicate == "replace" else 1)


async def test_bounded_the_bound_is_per_queue(driver: Driver, queue: str) -> None:
    other = f"{queue}-other"
    await driver.push([bounded(new_id(), queue, 1)])
    [pushed] = await driver.push([bounded(new_id(), other, 1)])
    assert pushed.outcome == "created"
    assert (await driver.recent(other)).rejected == 0


# -- counting --------------------------------------------------------------------------------


async def test_counting_coalesced_counts_every_replace(driver: Driver, queue: str) -> None:
    holder = new_id()
    await driver.push([outgoing(holder, queue, 0, unique_key="dev-7")])
    for n in (1, 2):
        [pushed] = await driver.push(
            [outgoing(new_id(), queue, n, unique_key="dev-7", on_duplicate="replace")]
        )
        assert pushed.outcome == "replaced"
    [by_id] = await driver.push([outgoing(holder, queue, 3, check_id=True, on_duplicate="replace")])
    assert by_id.outcome == "replaced"
    # A keep and a reject are not coalescing.
    await driver.push([outgoing(new_id(), queue, 4, unique_key="dev-7", on_duplicate="keep")])
    await driver.push([outgoing(new_id(), queue, 5, unique_key="dev-7")])
    recent = await driver.recent(queue)
    assert (recent.coalesced, recent.dropped, recent.rejected) == (3, 0, 0)
    assert (await driver.recent(f"{queue}-other")).coalesced == 0
    [held] = await reserve_runnable(driver, queue)
    assert (held.id, n_of(held.payload)) == (holder, 3)


async def test_counting_a_replace_while_the_holder_runs_is_a_new_successor_not_coalesced(
    driver: Driver, queue: str
) -> None:
    holder = new_id()
    await driver.push([outgoing(holder, queue, 0, unique_key="dev-7")])
    await reserve_one(driver, queue, holder)
    successor = new_id()
    [pushed] = await driver.push(
        [outgoing(successor, queue, 1, unique_key="dev-7", on_duplicate="replace")]
    )
    assert (pushed.id, pushed.outcome) == (successor, "created")
    [again] = await driver.push(
        [outgoing(new_id(), queue, 2, unique_key="dev-7", on_duplicate="replace")]
    )
    assert (again.id, again.outcome) == (successor, "replaced")
    assert (await driver.recent(queue)).coalesced == 1


# -- expired jobs handed back ----------------------------------------------------------------


async def test_expired_reserve_hands_back_the_jobs_it_expired_besides_limit_runnable(
    driver: Driver, queue: str
) -> None:
    e1, e2, p1, p2, p3 = ids(5)
    await driver.push(
        [
            outgoing(e1, queue, 1, ttl=0.2),
            outgoing(e2, queue, 2, ttl=0.2),
            outgoing(p1, queue, 3),
            outgoing(p2, queue, 4),
            outgoing(p3, queue, 5),
        ]
    )
    await asyncio.sleep(0.3)  # past their ttl: time is the behaviour
    runnable, expired = split(await driver.reserve([queue], 2, lease=30))
    assert [h.id for h in runnable] == [p1, p2]
    assert [(h.id, h.queue, n_of(h.payload), h.attempts) for h in expired] == [
        (e1, queue, 1, 0),
        (e2, queue, 2, 0),
    ]
    assert all(h.expired for h in expired) and not any(h.expired for h in runnable)
    for job_id in (e1, e2):
        assert (await status_of(driver, job_id, queue)).status is Status.EXPIRED
    assert (await driver.recent(queue)).expired == 2
    # Handed back once: the next reserve has only the runnable rest.
    assert await take_ids(driver, queue) == [p3]
    stats = await driver.stats(queue)
    assert (stats.pending, stats.reserved) == (0, 3)


async def test_expired_hand_back_carries_the_payload_as_pushed(driver: Driver, queue: str) -> None:
    job_id = new_id()
    payload = orjson.dumps({"n": 7, "reading": [1.5, 2.5], "device": "d-1"})
    job = outgoing(job_id, queue, ttl=0.2)
    job.payload = payload
    await driver.push([job])
    await asyncio.sleep(0.3)  # past its ttl
    held = await driver.reserve([queue], 1, lease=30)
    assert [(h.id, h.expired, h.payload, h.attempts) for h in held] == [(job_id, True, payload, 0)]
    # It holds no lease: nothing is running.
    assert (await driver.stats(queue)).reserved == 0
    assert await driver.reserve([queue], 1, lease=30) == []


async def test_expired_hand_back_with_nothing_runnable(driver: Driver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, ttl=0.2)])
    await asyncio.sleep(0.3)  # past its ttl
    runnable, expired = split(await driver.reserve([queue], 5, lease=30))
    assert (runnable, [h.id for h in expired]) == ([], [job_id])


async def test_expired_scheduled_job_past_its_ttl_is_handed_back(
    driver: Driver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=0.1, ttl=0.1)])
    await asyncio.sleep(0.35)  # due, then past its ttl
    runnable, expired = split(await driver.reserve([queue], 5, lease=30))
    assert (runnable, [(h.id, h.expired) for h in expired]) == ([], [(job_id, True)])


# -- under concurrency -----------------------------------------------------------------------


@pytest.mark.parametrize("overflow", ["reject", "drop_oldest"])
async def test_bounded_the_count_is_exact_under_concurrent_pushes(
    backend: Backend, driver: Driver, queue: str, overflow: Overflow
) -> None:
    async with second_driver(backend, driver) as other:
        mine, theirs = ids(12), ids(12)

        async def push_all(d: Driver, jobs: list[str]) -> list[str]:
            return [(await d.push([bounded(j, queue, 10, overflow)]))[0].outcome for j in jobs]

        outcomes = await both(push_all(driver, mine), push_all(other, theirs))
    flat = outcomes[0] + outcomes[1]
    stats = await driver.stats(queue)
    assert stats.pending == 10
    recent = await driver.recent(queue)
    if overflow == "reject":
        assert (flat.count("created"), flat.count("full")) == (10, 14)
        assert recent.rejected == 14
    else:
        assert flat.count("created") == 24
        assert recent.dropped == 14
    assert len(await take_ids(driver, queue)) == 10
