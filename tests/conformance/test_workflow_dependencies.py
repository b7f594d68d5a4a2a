"""Dependencies on every driver (SPEC13 "Dependencies", point 1).

Driver-level: a job pushed with `depends_on` is `deferred` (never reserved, counted in
`QueueStats.deferred`, `waiting_for` its live dependencies, `due_at` None) until its
dependencies end; each end resolves its dependents in the same atomic step by their `rule`
("succeeded": released, or cancelled with "dependency <id> <status>" and so on down the line;
"ended": released however; "failed": released at the first failure, else cancelled with
"no dependency failed"). Two workers ending the last two dependencies at once release a
dependent exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime

import pytest

from core.queue.drivers import Driver, Outcome, Pushed
from core.queue.drivers.base import Dependency, FailedJob
from core.status import Progress, Status
from tests.conformance.workflow_support import (
    both,
    end,
    new_id,
    outgoing,
    record_job,
    reserve_one,
    run,
    second_driver,
    status_of,
    take,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)


# -- deferred ------------------------------------------------------------------------------


async def test_rule_a_job_with_live_dependencies_is_deferred(driver: Driver, queue: str) -> None:
    a, b, dep = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue, 1), outgoing(b, queue, 2, delay=60)])
    [pushed] = await driver.push([outgoing(dep, queue, 3, depends_on=[b, a], priority=4)])
    assert pushed == Pushed(dep, "created")
    record = await status_of(driver, dep, queue)
    assert record.status is Status.DEFERRED
    assert record.waiting_for == (b, a)  # in push order
    assert record.due_at is None
    assert record.priority == 4
    assert record.enqueued_at is not None and record.attempts == 0
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.deferred) == (1, 1, 0, 1)
    assert stats.size == 3
    assert await take(driver, queue) == [a]  # never reserved while deferred, priority or not
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED


async def test_rule_waiting_for_drops_dependencies_as_they_end(driver: Driver, queue: str) -> None:
    a, b, c, dep = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue), outgoing(c, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a, b, c])])
    await run(driver, queue, a)
    record = await status_of(driver, dep, queue)
    assert (record.status, record.waiting_for, record.due_at) == (Status.DEFERRED, (b, c), None)
    await run(driver, queue, b)
    assert (await status_of(driver, dep, queue)).waiting_for == (c,)


async def test_rule_released_once_every_dependency_succeeded(driver: Driver, queue: str) -> None:
    a, b, dep, low = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a, b], priority=2)])
    await run(driver, queue, a)
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED
    await driver.push([outgoing(low, queue)])
    before = time.time()
    [held] = await driver.reserve([queue], 1, lease=30)
    assert held.id == b
    await driver.ack([held])
    record = await status_of(driver, dep, queue)
    assert (record.status, record.waiting_for, record.priority) == (Status.QUEUED, (), 2)
    assert record.due_at is not None and before - 0.5 <= record.due_at <= time.time() + 0.5
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred) == (2, 0)
    # Its priority holds once released: ahead of the lower job pushed before its release.
    assert await take(driver, queue) == [dep, low]


async def test_rule_dependents_released_at_once_go_in_push_order(
    driver: Driver, queue: str
) -> None:
    a = new_id()
    dependents = [new_id() for _ in range(6)]
    await driver.push([outgoing(a, queue)])
    await driver.push([outgoing(d, queue, i, depends_on=[a]) for i, d in enumerate(dependents[:3])])
    for i, d in enumerate(dependents[3:], start=3):
        await driver.push([outgoing(d, queue, i, depends_on=[a])])
    await run(driver, queue, a)  # all six become ready in one step: push order among them
    assert await take(driver, queue) == dependents


async def test_rule_a_released_job_with_a_pending_delay_is_scheduled_from_its_push(
    driver: Driver, queue: str
) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a], delay=0.8)])
    await run(driver, queue, a)
    record = await status_of(driver, dep, queue)
    assert record.status is Status.SCHEDULED
    assert record.due_at is not None and record.enqueued_at is not None
    assert abs(record.due_at - record.enqueued_at - 0.8) < 0.1  # the delay counts from its push
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.deferred) == (0, 1, 0)
    assert await take(driver, queue) == []
    await asyncio.sleep(max(0.0, record.due_at - time.time()) + 0.05)  # the delay's end
    assert await take(driver, queue) == [dep]


async def test_rule_a_delay_passed_while_deferred_releases_at_once(
    driver: Driver, queue: str
) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a], delay=0.1)])
    await asyncio.sleep(0.2)  # its delay passes while it is deferred
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED
    await run(driver, queue, a)
    assert (await status_of(driver, dep, queue)).status is Status.QUEUED
    assert await take(driver, queue) == [dep]


async def test_rule_ttl_counts_from_the_release(driver: Driver, queue: str) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a], ttl=0.6)])
    await asyncio.sleep(0.7)  # longer than its ttl, but it was not due yet
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED
    await run(driver, queue, a)
    assert await take(driver, queue) == [dep]
    assert (await status_of(driver, dep, queue)).status is Status.RUNNING


# -- cancellation by a dependency ----------------------------------------------------------


@pytest.mark.parametrize("how", ["failed", "cancelled", "expired"])
async def test_rule_succeeded_a_dependency_that_did_not_succeed_cancels_the_dependent(
    driver: Driver, queue: str, how: str
) -> None:
    a, other, dep = new_id(), new_id(), new_id()
    await driver.push(
        [outgoing(a, queue, ttl=0.2 if how == "expired" else 0), outgoing(other, queue)]
    )
    await driver.push([outgoing(dep, queue, depends_on=[a, other], failure_ttl=60)])
    before = time.time()
    if how == "failed":
        await run(driver, queue, a, Status.FAILED)
    elif how == "cancelled":
        assert await driver.cancel(a, queue) is True
    else:
        await asyncio.sleep(0.3)  # past a's ttl
        assert await take(driver, queue) == [other]  # a expires in this reserve
        assert (await status_of(driver, a, queue)).status is Status.EXPIRED
    record = await status_of(driver, dep, queue)
    assert record.status is Status.CANCELLED
    assert record.error == f"dependency {a} {how}"
    assert record.ended_at is not None and record.ended_at >= before - 0.5
    assert record.attempts == 0
    stats = await driver.stats(queue)
    assert stats.deferred == 0
    # The dependent, and a itself when it was the one cancelled.
    assert (await driver.recent(queue)).cancelled == (2 if how == "cancelled" else 1)
    assert dep not in await take(driver, queue)


async def test_rule_a_cancelled_dependent_is_kept_for_its_failure_ttl(
    driver: Driver, queue: str
) -> None:
    a, gone, kept = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await driver.push(
        [
            outgoing(gone, queue, depends_on=[a], failure_ttl=0),
            outgoing(kept, queue, depends_on=[a], failure_ttl=0.8),
        ]
    )
    await run(driver, queue, a, Status.FAILED)
    assert await driver.job_status(gone, queue) is None
    assert (await status_of(driver, kept, queue)).status is Status.CANCELLED
    assert (await driver.recent(queue)).cancelled == 2
    await asyncio.sleep(1.0)  # the keep time is the behaviour
    await driver.prune_records()
    assert await driver.job_status(kept, queue) is None


async def test_rule_cancel_cascades_down_a_chain_of_50(driver: Driver, queue: str) -> None:
    ids = [new_id() for _ in range(51)]
    await driver.push(
        [outgoing(ids[0], queue)]
        + [outgoing(j, queue, i, depends_on=[ids[i - 1]]) for i, j in enumerate(ids[1:], start=1)]
    )
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred) == (1, 50)
    await run(driver, queue, ids[0], Status.FAILED)
    first = await status_of(driver, ids[1], queue)
    assert (first.status, first.error) == (Status.CANCELLED, f"dependency {ids[0]} failed")
    for prev, job_id in itertools.pairwise(ids[1:]):
        record = await status_of(driver, job_id, queue)
        assert (record.status, record.error) == (Status.CANCELLED, f"dependency {prev} cancelled")
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.deferred, stats.size) == (0, 0, 0, 0)
    assert (await driver.recent(queue)).cancelled == 50


async def test_rule_cancel_of_a_deferred_job_cascades(driver: Driver, queue: str) -> None:
    a, mid, last = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(mid, queue, depends_on=[a]),
            outgoing(last, queue, depends_on=[mid]),
        ]
    )
    assert await driver.cancel(mid, queue) is True
    record = await status_of(driver, mid, queue)
    assert record.status is Status.CANCELLED
    down = await status_of(driver, last, queue)
    assert (down.status, down.error) == (Status.CANCELLED, f"dependency {mid} cancelled")
    assert (await driver.stats(queue)).deferred == 0
    assert await driver.cancel(mid, queue) is False
    # Its dependency runs on, and ending it later changes nothing for the cancelled ones.
    await run(driver, queue, a)
    assert (await status_of(driver, mid, queue)).status is Status.CANCELLED
    assert await take(driver, queue) == []


# -- rules "ended" and "failed" ------------------------------------------------------------


async def test_rule_ended_releases_once_all_ended_however(driver: Driver, queue: str) -> None:
    a, b, c, dep = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue), outgoing(c, queue)])
    await driver.push([outgoing(dep, queue, depends_on=[a, b, c], rule="ended")])
    await run(driver, queue, a, Status.FAILED)
    assert await driver.cancel(b, queue) is True
    assert (await status_of(driver, dep, queue)).status is Status.DEFERRED
    await run(driver, queue, c)
    assert (await status_of(driver, dep, queue)).status is Status.QUEUED
    assert await take(driver, queue) == [dep]


async def test_rule_failed_releases_at_the_first_failure(driver: Driver, queue: str) -> None:
    a, b, catch = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue)])
    await driver.push([outgoing(catch, queue, depends_on=[a, b], rule="failed")])
    await run(driver, queue, a, Status.FAILED)
    # b has not ended: the catch job is released all the same.
    assert (await status_of(driver, catch, queue)).status is Status.QUEUED
    assert await take(driver, queue) == [b, catch]


async def test_rule_failed_counts_an_expiry_as_a_failure(driver: Driver, queue: str) -> None:
    a, b, catch = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue, ttl=0.2), outgoing(b, queue, delay=60)])
    await driver.push([outgoing(catch, queue, depends_on=[a, b], rule="failed")])
    await asyncio.sleep(0.3)  # past a's ttl
    assert await take(driver, queue) == [catch]
    assert (await status_of(driver, a, queue)).status is Status.EXPIRED


async def test_rule_a_dependent_no_longer_deferred_ignores_later_ends(
    driver: Driver, queue: str
) -> None:
    a, b, c, catch = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue), outgoing(c, queue)])
    await driver.push([outgoing(catch, queue, depends_on=[a, b, c], rule="failed")])
    await run(driver, queue, a, Status.FAILED)
    assert (await status_of(driver, catch, queue)).status is Status.QUEUED
    await run(driver, queue, b, Status.FAILED)  # a second failure: released once only
    await run(driver, queue, c)  # all ended: not cancelled ("no dependency failed") either
    record = await status_of(driver, catch, queue)
    assert (record.status, record.error) == (Status.QUEUED, "")
    assert await take(driver, queue) == [catch]
    assert await take(driver, queue) == []


async def test_rule_failed_is_cancelled_when_nothing_failed(driver: Driver, queue: str) -> None:
    a, b, catch = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue)])
    await driver.push([outgoing(catch, queue, depends_on=[a, b], rule="failed")])
    await run(driver, queue, a)
    assert await driver.cancel(b, queue) is True  # cancelled is not failed
    record = await status_of(driver, catch, queue)
    assert (record.status, record.error) == (Status.CANCELLED, "no dependency failed")
    assert await take(driver, queue) == []


# -- dependencies at push ------------------------------------------------------------------


async def test_rule_a_dependency_that_succeeded_before_the_push_releases_at_once(
    driver: Driver, queue: str
) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await run(driver, queue, a)
    assert await driver.push([outgoing(dep, queue, depends_on=[a])]) == [Pushed(dep, "created")]
    record = await status_of(driver, dep, queue)
    assert (record.status, record.waiting_for) == (Status.QUEUED, ())
    assert await take(driver, queue) == [dep]


async def test_rule_a_dependency_that_failed_before_the_push_cancels_at_once(
    driver: Driver, queue: str
) -> None:
    a, dep, catch = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    await run(driver, queue, a, Status.FAILED)
    assert await driver.push(
        [
            outgoing(dep, queue, depends_on=[a]),
            outgoing(catch, queue, depends_on=[a], rule="failed"),
        ]
    ) == [Pushed(dep, "created"), Pushed(catch, "created")]
    record = await status_of(driver, dep, queue)
    assert (record.status, record.error) == (Status.CANCELLED, f"dependency {a} failed")
    assert (await status_of(driver, catch, queue)).status is Status.QUEUED
    assert await take(driver, queue) == [catch]


async def test_rule_an_unknown_dependency_is_missing_and_nothing_is_stored(
    driver: Driver, queue: str
) -> None:
    known, unknown, dep = new_id(), new_id(), new_id()
    await driver.push([outgoing(known, queue)])
    pushed = await driver.push([outgoing(dep, queue, depends_on=[known, unknown])])
    assert pushed == [Pushed(unknown, "missing")]
    assert await driver.job_status(dep, queue) is None
    assert await driver.job_status(dep) is None
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred) == (1, 0)
    # The known dependency ending later finds no dependent to release.
    await run(driver, queue, known)
    assert await take(driver, queue) == []
    # A dependency named with a queue it is not in is unknown too.
    elsewhere = new_id()
    pushed = await driver.push(
        [outgoing(elsewhere, queue, depends_on=[Dependency(known, f"{queue}-other")])]
    )
    assert pushed == [Pushed(known, "missing")]
    assert await driver.job_status(elsewhere) is None


async def test_rule_a_dependency_whose_record_is_gone_is_missing(
    driver: Driver, queue: str
) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 0)  # its record is not kept
    await driver.ack([held])
    assert await driver.job_status(a, queue) is None
    assert await driver.push([outgoing(dep, queue, depends_on=[a])]) == [Pushed(a, "missing")]
    assert await driver.job_status(dep, queue) is None


async def test_rule_a_dependency_earlier_in_the_same_push_is_known(
    driver: Driver, queue: str
) -> None:
    a, b, c = new_id(), new_id(), new_id()
    pushed = await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue, depends_on=[a]),
            outgoing(c, queue, depends_on=[a, b]),
        ]
    )
    assert pushed == [Pushed(a, "created"), Pushed(b, "created"), Pushed(c, "created")]
    assert (await status_of(driver, c, queue)).waiting_for == (a, b)
    assert await take(driver, queue) == [a]


async def test_rule_a_dependency_on_another_queue_of_the_connection(
    driver: Driver, queue: str
) -> None:
    other = f"{queue}-other"
    a, b, dep = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, other), outgoing(b, other)])
    await driver.push([outgoing(dep, queue, depends_on=[Dependency(a, other), Dependency(b)])])
    assert (await status_of(driver, dep, queue)).waiting_for == (a, b)
    await run(driver, other, a)
    await run(driver, other, b)
    assert await take(driver, queue) == [dep]


# -- what is not an end --------------------------------------------------------------------


async def test_rule_a_retry_or_a_refund_is_not_an_end(driver: Driver, queue: str) -> None:
    a, dep = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(dep, queue, depends_on=[a])])
    held = await reserve_one(driver, queue, a)
    await driver.release(held, 0, error="E")
    held = await reserve_one(driver, queue, a)
    await driver.release(held, refund=True)
    [lapsed] = await driver.reserve([queue], 1, lease=0.1)
    await asyncio.sleep(0.2)  # a lost lease is not an end either
    held = await reserve_one(driver, queue, a)
    assert lapsed.id == a and held.attempts == 3
    record = await status_of(driver, dep, queue)
    assert (record.status, record.waiting_for) == (Status.DEFERRED, (a,))
    await end(driver, held, Status.SUCCEEDED)
    assert await take(driver, queue) == [dep]


async def test_rule_retry_failed_leaves_the_dependents_cancelled(
    driver: Driver, queue: str
) -> None:
    a, dep = new_id(), new_id()
    job = outgoing(a, queue)
    await driver.push([job, outgoing(dep, queue, depends_on=[a])])
    held = await reserve_one(driver, queue, a)
    store = driver.failed_store()
    await store.add(
        FailedJob(a, driver.name, queue, job.payload.decode(), "E: boom", datetime.now(UTC))
    )
    await end(driver, held, Status.FAILED)
    assert (await status_of(driver, dep, queue)).status is Status.CANCELLED
    stored = await store.get(a)
    assert stored is not None
    assert await driver.retry_failed([stored]) == [a]
    assert await take(driver, queue) == [a]
    record = await status_of(driver, dep, queue)
    assert (record.status, record.error) == (Status.CANCELLED, f"dependency {a} failed")


async def test_rule_clear_removes_deferred_jobs(driver: Driver, queue: str) -> None:
    other = f"{queue}-other"
    a, local, dep1, dep2 = new_id(), new_id(), new_id(), new_id()
    await driver.push([outgoing(a, other), outgoing(local, queue)])
    await driver.push(
        [outgoing(dep1, queue, depends_on=[a]), outgoing(dep2, queue, depends_on=[local])]
    )
    assert await driver.clear(queue) == 3
    assert await driver.job_status(dep1, queue) is None
    assert await driver.job_status(dep2, queue) is None
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred, stats.size) == (0, 0, 0)
    # The dependency in the other queue ends later: nothing comes back.
    await run(driver, other, a)
    assert await take(driver, queue) == []
    assert await driver.job_status(dep1, queue) is None


# -- atomic release ------------------------------------------------------------------------


async def test_rule_last_two_dependencies_ending_at_once_release_the_dependent_once(
    backend: Backend, driver: Driver, queue: str
) -> None:
    async with second_driver(backend, driver) as other:
        for round_ in range(20):
            a, b, dep = new_id(), new_id(), new_id()
            failing = round_ % 2 == 1  # every other round one of them fails: cancelled once
            await driver.push(
                [outgoing(a, queue), outgoing(b, queue), outgoing(dep, queue, depends_on=[a, b])]
            )
            held_a = await reserve_one(driver, queue, a)
            held_b = await reserve_one(other, queue, b)
            held_a.outcome = Outcome(Status.FAILED if failing else Status.SUCCEEDED, 60, error="E")
            held_b.outcome = Outcome(Status.SUCCEEDED, 60)
            got = await both(
                driver.reserve([queue], 1, lease=30, ack=[held_a]),
                other.reserve([queue], 1, lease=30, ack=[held_b]),
            )
            held = [h for batch in got for h in batch]
            held += await driver.reserve([queue], 10, lease=30)
            held += await other.reserve([queue], 10, lease=30)
            handed = [h.id for h in held]
            record = await status_of(driver, dep, queue)
            if failing:
                assert handed == [], f"round {round_}"
                assert record.status is Status.CANCELLED, f"round {round_}"
            else:
                assert handed == [dep], f"round {round_}"
                assert (record.status, record.attempts) == (Status.RUNNING, 1), f"round {round_}"
                await driver.ack(held)
        recent = await driver.recent(queue)
        assert recent.cancelled == 10
        stats = await driver.stats(queue)
        assert (stats.pending, stats.deferred, stats.reserved) == (0, 0, 0)


async def test_rule_clear_ends_the_cleared_jobs_as_cancelled_for_what_waits_on_them(
    driver: Driver, queue: str
) -> None:
    # The cleared queue holds a waiting job and a deferred one; what waits on them lives in
    # another queue of the connection: a dependent of each rule, a cascade, a batch record;
    # a batch record of the cleared queue itself is not cleared: it counts them too.
    other = f"{queue}-other"
    a, held_back = new_id(), new_id()
    strict, loose, hoping, after_strict, on_held = (new_id() for _ in range(5))
    member, record, here = new_id(), new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(member, other)])
    await driver.push([outgoing(held_back, queue, depends_on=[a])])
    await driver.push(
        [
            outgoing(strict, other, depends_on=[Dependency(a, queue)]),
            outgoing(loose, other, depends_on=[Dependency(a, queue)], rule="ended"),
            outgoing(hoping, other, depends_on=[Dependency(a, queue)], rule="failed"),
            outgoing(after_strict, other, depends_on=[strict]),
            outgoing(on_held, other, depends_on=[Dependency(held_back, queue)]),
            record_job(record, other, "batch", [member, a]),
            record_job(here, queue, "batch", [a, member]),
        ]
    )
    assert await driver.clear(queue) == 2
    assert await driver.job_status(a, queue) is None
    assert await driver.job_status(held_back, queue) is None
    expected = {
        strict: f"dependency {a} cancelled",
        after_strict: f"dependency {strict} cancelled",  # the cascade goes on
        hoping: "no dependency failed",  # the cleared job counts as not failed
        on_held: f"dependency {held_back} cancelled",  # a cleared deferred job too
    }
    for job_id, error in expected.items():
        status = await status_of(driver, job_id, other)
        assert (status.status, status.error) == (Status.CANCELLED, error), job_id
    assert (await status_of(driver, loose, other)).status is Status.QUEUED
    for batch_id, batch_queue in ((record, other), (here, queue)):
        batch = await status_of(driver, batch_id, batch_queue)
        assert batch.status is Status.DEFERRED, batch_queue
        assert batch.progress == Progress(2, 1, cancelled=1), batch_queue
    stats = await driver.stats(other)
    assert (stats.pending, stats.deferred) == (2, 0)
    assert (await driver.recent(other)).cancelled == 4
    held = await driver.reserve([other], 10, lease=30)
    assert [h.id for h in held] == [member, loose]
    await end(driver, held[0], Status.SUCCEEDED)
    for batch_id, batch_queue in ((record, other), (here, queue)):
        batch = await status_of(driver, batch_id, batch_queue)
        assert (batch.status, batch.error) == (Status.CANCELLED, "1 of 2 members cancelled")
        assert batch.progress == Progress(2, 0, succeeded=1, cancelled=1), batch_queue
    # The cleared queue is empty and nothing of it comes back.
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred, stats.size) == (0, 0, 0)
    assert await take(driver, queue) == []
