"""Workflow records (chains and batches) on every driver (SPEC13 "Workflow records", point 2).

Driver-level: a record (`kind` "chain"/"batch", empty payload, its members as dependencies with
rule "ended") is never reserved nor counted in `QueueStats`; it reads `deferred` with its
`progress` while members are pending, ends itself with its last member (`failed` / `cancelled`
/ `succeeded` with "n of total members ..." errors), is kept by the ttl rules, not counted in
`recent`, and resolves its own dependents. `cancel_on_failure` and `cancel(record)` cancel
the members still waiting.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from core.queue.drivers import Driver, Outcome, Pushed, create_driver
from core.status import Progress, Status
from tests.conformance.workflow_support import (
    end,
    new_id,
    outgoing,
    record_job,
    reserve_one,
    run,
    status_of,
    take,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


async def push_batch(
    driver: Driver, queue: str, members: list[str], record: str, **fields: object
) -> None:
    """Members then their batch record, in one push call (as `batch(...).dispatch()` does)."""
    pushed = await driver.push(
        [outgoing(m, queue, i) for i, m in enumerate(members)]
        + [record_job(record, queue, "batch", members, **fields)]
    )
    assert [p.outcome for p in pushed] == ["created"] * (len(members) + 1)


async def push_chain(driver: Driver, queue: str, members: list[str], record: str) -> None:
    """Each member after the first depends on the one before; then the chain record."""
    jobs = [outgoing(members[0], queue, 0)]
    jobs += [
        outgoing(m, queue, i, depends_on=[members[i - 1]])
        for i, m in enumerate(members[1:], start=1)
    ]
    pushed = await driver.push([*jobs, record_job(record, queue, "chain", members)])
    assert pushed[-1] == Pushed(record, "created")


async def test_rule_a_record_is_deferred_with_progress_and_never_reserved(
    driver: Driver, queue: str
) -> None:
    members, record = ids(3), new_id()
    await push_batch(driver, queue, members, record)
    status = await status_of(driver, record, queue)
    assert (status.kind, status.status) == ("batch", Status.DEFERRED)
    assert status.progress == Progress(total=3, pending=3)
    assert status.waiting_for == ()
    assert status.due_at is None and status.ended_at is None
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.deferred) == (3, 0, 0, 0)
    assert await take(driver, queue) == members
    assert (await driver.stats(queue)).reserved == 3
    member = await status_of(driver, members[0], queue)
    assert (member.kind, member.progress) == ("job", None)


async def test_rule_progress_counts_each_end_and_a_failure_fails_the_record(
    driver: Driver, queue: str
) -> None:
    ok, bad, late, gone, record = ids(5)
    await driver.push(
        [
            outgoing(ok, queue, 1),
            outgoing(bad, queue, 2),
            outgoing(late, queue, 3, ttl=0.6),
            outgoing(gone, queue, 4, delay=60),
            record_job(record, queue, "batch", [ok, bad, late, gone]),
        ]
    )
    await run(driver, queue, ok)
    assert (await status_of(driver, record, queue)).progress == Progress(4, 3, succeeded=1)
    await run(driver, queue, bad, Status.FAILED)
    assert (await status_of(driver, record, queue)).progress == Progress(4, 2, 1, failed=1)
    await asyncio.sleep(0.7)  # past late's ttl: an expiry counts as a failure
    assert await take(driver, queue) == []
    assert (await status_of(driver, record, queue)).progress == Progress(4, 1, 1, failed=2)
    # Cancelling an ended member changes nothing (an end counts once).
    assert await driver.cancel(ok, queue) is False
    assert await driver.cancel(gone, queue) is True
    before = time.time()
    status = await status_of(driver, record, queue)
    assert status.progress == Progress(4, 0, succeeded=1, failed=2, cancelled=1)
    assert status.status is Status.FAILED
    assert status.error == "2 of 4 members failed"
    assert status.ended_at is not None and status.ended_at >= before - 1
    assert status.progress.done == 4


async def test_rule_a_record_with_cancelled_members_and_no_failure_is_cancelled(
    driver: Driver, queue: str
) -> None:
    a, b, c, record = ids(4)
    await push_batch(driver, queue, [a, b, c], record)
    await run(driver, queue, a)
    assert await driver.cancel(b, queue) is True
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(Status.CANCELLED, 60, error="cancelled")  # cancelled while running
    await driver.ack([held])
    status = await status_of(driver, record, queue)
    assert status.status is Status.CANCELLED
    assert status.error == "2 of 3 members cancelled"
    assert status.progress == Progress(3, 0, succeeded=1, cancelled=2)


async def test_rule_a_record_whose_members_all_succeeded_succeeds(
    driver: Driver, queue: str
) -> None:
    members, record = ids(3), new_id()
    await push_batch(driver, queue, members, record)
    waiter = asyncio.create_task(driver.wait_ended(record, queue, 10))
    for member in members:
        await run(driver, queue, member)
    ended = await asyncio.wait_for(waiter, 5)
    assert ended is not None and ended.status is Status.SUCCEEDED
    assert (ended.kind, ended.error) == ("batch", "")
    assert ended.progress == Progress(3, 0, succeeded=3)
    assert ended.ended_at is not None


async def test_rule_a_chain_stops_at_its_first_failure(driver: Driver, queue: str) -> None:
    members, record = ids(4), new_id()
    await push_chain(driver, queue, members, record)
    status = await status_of(driver, record, queue)
    assert (status.kind, status.progress) == ("chain", Progress(4, 4))
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred) == (1, 3)  # the record is not counted
    await run(driver, queue, members[0])
    await run(driver, queue, members[1], Status.FAILED)
    status = await status_of(driver, record, queue)
    assert status.status is Status.FAILED
    assert status.error == "1 of 4 members failed"
    assert status.progress == Progress(4, 0, succeeded=1, failed=1, cancelled=2)
    assert await take(driver, queue) == []


@pytest.mark.parametrize("how", ["failed", "expired"])
async def test_rule_cancel_on_failure_cancels_the_waiting_members_not_running_ones(
    driver: Driver, queue: str, how: str
) -> None:
    first, retrying, running, queued, scheduled, deferred, outside, record = ids(8)
    await driver.push([outgoing(outside, queue, delay=60)])
    members = [first, retrying, running, queued, scheduled, deferred]
    await driver.push(
        [
            outgoing(first, queue, 1, ttl=0.2 if how == "expired" else 0.0),
            outgoing(retrying, queue, 2),
            outgoing(running, queue, 3),
            outgoing(queued, queue, 4),
            outgoing(scheduled, queue, 5, delay=60),
            outgoing(deferred, queue, 6, depends_on=[outside]),
            record_job(record, queue, "batch", members, cancel_on_failure=True),
        ]
    )
    if how == "expired":
        await asyncio.sleep(0.3)  # past first's ttl: it expires in the next reserve
        held = await driver.reserve([queue], 1, lease=30)
        assert (await status_of(driver, first, queue)).status is Status.EXPIRED
        assert [h.id for h in held if not h.expired] == []  # the others waiting: cancelled
        assert (await status_of(driver, retrying, queue)).status is Status.CANCELLED
        status = await status_of(driver, record, queue)
        assert (status.status, status.error) == (Status.FAILED, "1 of 6 members failed")
        assert status.progress == Progress(6, 0, failed=1, cancelled=5)
        return
    held = await driver.reserve([queue], 3, lease=30)
    assert [h.id for h in held] == [first, retrying, running]
    await driver.release(held[1], 60, error="E")
    assert (await status_of(driver, retrying, queue)).status is Status.RETRYING
    await end(driver, held[0], Status.FAILED)
    for job_id in (retrying, queued, scheduled, deferred):
        assert (await status_of(driver, job_id, queue)).status is Status.CANCELLED, job_id
    assert (await status_of(driver, running, queue)).status is Status.RUNNING
    assert await driver.cancel_requested([held[2]]) == []  # a running member runs on
    status = await status_of(driver, record, queue)
    assert status.status is Status.DEFERRED
    assert status.progress == Progress(6, 1, failed=1, cancelled=4)
    await end(driver, held[2], Status.SUCCEEDED)
    status = await status_of(driver, record, queue)
    assert (status.status, status.error) == (Status.FAILED, "1 of 6 members failed")
    assert status.progress == Progress(6, 0, succeeded=1, failed=1, cancelled=4)
    # The job outside the batch is untouched.
    assert (await status_of(driver, outside, queue)).status is Status.SCHEDULED


async def test_rule_without_cancel_on_failure_members_run_on(driver: Driver, queue: str) -> None:
    a, b, record = ids(3)
    await push_batch(driver, queue, [a, b], record)
    await run(driver, queue, a, Status.FAILED)
    assert (await status_of(driver, b, queue)).status is Status.QUEUED
    await run(driver, queue, b)
    status = await status_of(driver, record, queue)
    assert (status.status, status.progress) == (Status.FAILED, Progress(2, 0, 1, 1, 0))


async def test_rule_cancel_of_the_record_cancels_its_members(driver: Driver, queue: str) -> None:
    done, running, waiting, later, record = ids(5)
    await push_batch(driver, queue, [done, running, waiting, later], record)
    await run(driver, queue, done)
    held = await reserve_one(driver, queue, running)
    assert await driver.cancel(record, queue) is True
    for job_id in (waiting, later):
        assert (await status_of(driver, job_id, queue)).status is Status.CANCELLED, job_id
    assert await driver.cancel_requested([held]) == [running]  # asked, as `cancel` does
    status = await status_of(driver, record, queue)
    assert status.status is Status.DEFERRED  # until its running member stops
    assert status.progress == Progress(4, 1, succeeded=1, cancelled=2)
    held.outcome = Outcome(Status.CANCELLED, 60, error="cancelled")
    await driver.ack([held])
    status = await status_of(driver, record, queue)
    assert (status.status, status.error) == (Status.CANCELLED, "3 of 4 members cancelled")
    assert await driver.cancel(record, queue) is False  # it has ended
    assert await take(driver, queue) == []


async def test_rule_cancel_of_a_record_finds_it_without_its_queue(
    driver: Driver, queue: str
) -> None:
    members, record = ids(2), new_id()
    await push_chain(driver, queue, members, record)
    assert await driver.cancel(record) is True
    status = await status_of(driver, record)
    assert (status.status, status.progress) == (Status.CANCELLED, Progress(2, 0, cancelled=2))
    stats = await driver.stats(queue)
    assert (stats.pending, stats.deferred, stats.size) == (0, 0, 0)


async def test_rule_records_are_not_counted_in_recent(driver: Driver, queue: str) -> None:
    ok, bad, record_ok, record_bad, a, b = ids(6)
    await push_batch(driver, queue, [ok], record_ok)
    await push_batch(driver, queue, [bad], record_bad)
    await push_batch(driver, queue, [a, b], new_id())
    await run(driver, queue, ok)
    await run(driver, queue, bad, Status.FAILED)
    assert await driver.cancel(a, queue) is True
    assert await driver.cancel(b, queue) is True
    assert (await status_of(driver, record_ok, queue)).status is Status.SUCCEEDED
    assert (await status_of(driver, record_bad, queue)).status is Status.FAILED
    recent = await driver.recent(queue)
    assert (recent.succeeded, recent.failed, recent.cancelled, recent.expired) == (1, 1, 2, 0)
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved, stats.deferred) == (0, 0, 0, 0)


async def test_rule_a_succeeded_record_is_kept_for_the_connections_result_ttl(
    backend: Backend, queue: str
) -> None:
    async with create_driver(backend.connection, backend.settings(queue_result_ttl=0)) as driver:
        member, record, after = ids(3)
        await push_batch(driver, queue, [member], record, failure_ttl=600)
        await driver.push([outgoing(after, queue, depends_on=[record])])
        await run(driver, queue, member)
        assert await driver.job_status(record, queue) is None  # result ttl 0: nothing kept
        assert await take(driver, queue) == [after]  # its dependent was resolved all the same
    async with create_driver(backend.connection, backend.settings(queue_result_ttl=60)) as driver:
        member, record = ids(2)
        await push_batch(driver, queue, [member], record, failure_ttl=0)
        await run(driver, queue, member)
        assert (await status_of(driver, record, queue)).status is Status.SUCCEEDED


async def test_rule_a_failed_or_cancelled_record_is_kept_for_its_failure_ttl(
    driver: Driver, queue: str
) -> None:
    gone_member, gone, kept_member, kept = ids(4)
    await push_batch(driver, queue, [gone_member], gone, failure_ttl=0)
    await push_batch(driver, queue, [kept_member], kept, failure_ttl=0.8)
    await run(driver, queue, gone_member, Status.FAILED)
    assert await driver.cancel(kept_member, queue) is True
    assert await driver.job_status(gone, queue) is None
    assert (await status_of(driver, kept, queue)).status is Status.CANCELLED
    await asyncio.sleep(1.0)  # the keep time is the behaviour
    await driver.prune_records()
    assert await driver.job_status(kept, queue) is None


async def test_rule_a_records_own_dependents_resolve_by_how_it_ended(
    driver: Driver, queue: str
) -> None:
    # A batch that succeeds: `then` and `finally_` run, `catch` is cancelled.
    a, b, record, then, catch, finally_ = ids(6)
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue),
            record_job(record, queue, "batch", [a, b], cancel_on_failure=True),
            outgoing(then, queue, depends_on=[record]),
            outgoing(catch, queue, depends_on=[a, b], rule="failed"),
            outgoing(finally_, queue, depends_on=[record], rule="ended"),
        ]
    )
    assert (await driver.stats(queue)).deferred == 3
    await run(driver, queue, a)
    await run(driver, queue, b)
    assert (await status_of(driver, record, queue)).status is Status.SUCCEEDED
    caught = await status_of(driver, catch, queue)
    assert (caught.status, caught.error) == (Status.CANCELLED, "no dependency failed")
    # (their order among themselves: test_rule_dependents_released_at_once_go_in_push_order)
    assert sorted(await take(driver, queue)) == sorted([then, finally_])


async def test_rule_a_failed_records_then_is_cancelled_and_its_finally_runs(
    driver: Driver, queue: str
) -> None:
    a, b, record, then, catch, finally_ = ids(6)
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue),
            record_job(record, queue, "batch", [a, b]),
            outgoing(then, queue, depends_on=[record]),
            outgoing(catch, queue, depends_on=[a, b], rule="failed"),
            outgoing(finally_, queue, depends_on=[record], rule="ended"),
        ]
    )
    await run(driver, queue, a, Status.FAILED)
    # The catch runs at the first failure, before the batch is over.
    assert (await status_of(driver, record, queue)).status is Status.DEFERRED
    assert (await status_of(driver, catch, queue)).status is Status.QUEUED
    held_b = await reserve_one(driver, queue, b)
    assert (await status_of(driver, then, queue)).status is Status.DEFERRED
    await run(driver, queue, catch)
    assert (await status_of(driver, record, queue)).status is Status.DEFERRED  # b runs on
    assert (await status_of(driver, finally_, queue)).waiting_for == (record,)
    await end(driver, held_b, Status.SUCCEEDED)
    status = await status_of(driver, record, queue)
    assert (status.status, status.error) == (Status.FAILED, "1 of 2 members failed")
    skipped = await status_of(driver, then, queue)
    assert (skipped.status, skipped.error) == (Status.CANCELLED, f"dependency {record} failed")
    assert await take(driver, queue) == [finally_]


async def test_rule_a_record_in_a_chain_resolves_into_the_next_record(
    driver: Driver, queue: str
) -> None:
    a, inner, outer = ids(3)
    await driver.push(
        [
            outgoing(a, queue),
            record_job(inner, queue, "batch", [a]),
            record_job(outer, queue, "chain", [inner]),
        ]
    )
    await run(driver, queue, a, Status.FAILED)
    assert (await status_of(driver, inner, queue)).status is Status.FAILED
    status = await status_of(driver, outer, queue)
    assert (status.status, status.error) == (Status.FAILED, "1 of 1 members failed")
    assert status.progress == Progress(1, 0, failed=1)
