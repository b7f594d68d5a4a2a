"""The observing primitives on every driver (SPEC15, `Driver.history`/`add_history`/`browse`/
`groups`/`pause`/`resume`/`paused`): what the dashboard and the metrics read.

* `history(queue, minutes)`: one `MinuteCounts` per minute, oldest first, the current minute
  last, zeros where nothing happened. The ends are the ones `recent` counts (an ack with any
  outcome, a cancel, a ttl expiry, and the push outcomes coalesced/dropped/rejected), in the
  minute they happened; the `HISTORY_FIELDS` are what `add_history` added.
* `add_history(rows)` adds, never overwrites: any number of separately opened drivers (workers)
  may add into one minute at once and nothing is lost. Fields outside `HISTORY_FIELDS` are
  ignored (a worker cannot forge the ends the driver counts itself).
* `browse(queue, state, offset, limit)`: the records of the jobs in one state. `pending` in the
  order `reserve` hands them out (`at_front` first, the latest first; then higher priority; then
  the order jobs became ready, a refunded job at the head of its level), `delayed` by due time,
  `reserved` by lease expiry, `deferred` in push order. `offset`/`limit` page through that order.
* `groups(queue, offset, limit)`: the groups holding or waiting for a turn, ordered by name, each
  with its turn holder and how many jobs wait in its line.
* `pause`/`resume`/`paused`: markers kept by the backend, so another driver instance (another
  worker) sees them; names up to 190 characters.

Latitude a driver has (the tests leave it open):

* `pending` lists the jobs waiting for their group's turn (group lines) and those a limit holds
  back too (they are counted as pending by `stats`), but where among the pending jobs they come
  is the driver's choice: their turn depends on other jobs ending. Every other pending job is in
  exact hand-out order on every driver.
* Jobs with an equal due time (`delayed`) or lease expiry (`reserved`) may come in any order
  among themselves: the tests give each job its own time.
* Group names are ordered as the backend orders strings; the tests use lowercase ASCII names,
  which every backend orders alike.

Bad arguments (an unknown state, a negative offset or limit, fewer than one minute) raise
`ValueError` naming what is wrong. Tests that are about time (ttl) wait for it; the rest never
sleep.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

import pytest

from core.queue.drivers import Driver, Outcome, OutgoingJob
from core.queue.drivers.base import (
    HISTORY_FIELDS,
    GroupInfo,
    Limit,
    MinuteCounts,
)
from core.status import JobStatus, Status
from tests.conformance.iot_support import bounded, grouped, reserve_runnable, split
from tests.conformance.workflow_support import (
    JOB,
    end,
    new_id,
    outgoing,
    record_job,
    reserve_one,
    second_driver,
    status_of,
    take,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(90)

#: The ends `history` counts, as `MinuteCounts` fields.
ENDS = ("succeeded", "failed", "cancelled", "expired", "coalesced", "dropped", "rejected")


def ids(n: int) -> list[str]:
    return [new_id() for _ in range(n)]


def this_minute() -> int:
    return int(time.time() // 60)


def totals(history: Sequence[MinuteCounts], fields: Sequence[str]) -> dict[str, int]:
    """Each field summed over the minutes of `history`."""
    return {name: sum(getattr(m, name) for m in history) for name in fields}


def minute_of(history: Sequence[MinuteCounts], minute: int) -> MinuteCounts:
    found = [m for m in history if m.minute == minute]
    assert len(found) == 1, f"minute {minute} not once in {[m.minute for m in history]}"
    return found[0]


async def listed(driver: Driver, queue: str, state: str, limit: int = 1000) -> list[str]:
    """The ids `browse` lists for `state` (one page of up to `limit`)."""
    return [r.id for r in await driver.browse(queue, state, 0, limit)]  # type: ignore[arg-type]


def long_name(prefix: str, last: str = "x") -> str:
    """A queue name of exactly 190 characters (the longest allowed) starting with `prefix`."""
    return prefix + "-" + "n" * (190 - len(prefix) - 2) + last


# -- history -----------------------------------------------------------------------------------


async def test_history_is_one_entry_per_minute_oldest_first_all_zeros_when_idle(
    driver: Driver, queue: str
) -> None:
    before = this_minute()
    history = await driver.history(queue, 5)
    after = this_minute()
    assert len(history) == 5
    assert history[-1].minute in (before, after)  # the current minute is the last
    assert [m.minute for m in history] == list(
        range(history[-1].minute - 4, history[-1].minute + 1)
    )
    assert all(m == MinuteCounts(m.minute) for m in history)
    # The default is the last hour; an unknown queue reads as zeros too.
    hour = await driver.history(queue)
    assert len(hour) == 60 and hour[0].minute == hour[-1].minute - 59
    assert all(m == MinuteCounts(m.minute) for m in hour)
    unknown = await driver.history(f"{queue}-never-used", 3)
    assert len(unknown) == 3 and all(m == MinuteCounts(m.minute) for m in unknown)
    assert unknown[-1].minute in (before, this_minute())
    [single] = await driver.history(queue, 1)
    assert single == MinuteCounts(single.minute) and single.minute in (before, this_minute())


async def test_history_counts_the_ends_by_ack_cancel_and_expiry_like_recent(
    driver: Driver, queue: str
) -> None:
    ok, bad, stopped, waiting, late, other = ids(6)
    await driver.push(
        [
            outgoing(ok, queue, 1),
            outgoing(bad, queue, 2),
            outgoing(stopped, queue, 3),
            outgoing(waiting, queue, 4),
        ]
    )
    await driver.push([outgoing(other, f"{queue}-other", 9)])
    await end(driver, await reserve_one(driver, queue, ok), Status.SUCCEEDED)
    await end(driver, await reserve_one(driver, queue, bad), Status.FAILED)
    await end(driver, await reserve_one(driver, queue, stopped), Status.CANCELLED)
    assert await driver.cancel(waiting, queue) is True
    await driver.push([outgoing(late, queue, 5, ttl=0.2)])
    await asyncio.sleep(0.3)  # past its ttl: time is the behaviour
    _, expired = split(await driver.reserve([queue], 10, lease=30))
    assert [h.id for h in expired] == [late]
    # Three minutes: the ends above may straddle a minute boundary.
    history = await driver.history(queue, 3)
    assert totals(history, ENDS) == {
        "succeeded": 1,
        "failed": 1,
        "cancelled": 2,
        "expired": 1,
        "coalesced": 0,
        "dropped": 0,
        "rejected": 0,
    }
    assert sum(m.ended for m in history) == 5
    recent = await driver.recent(queue)
    assert totals(history, ENDS) == {name: getattr(recent, name) for name in ENDS}
    # Workers' fields stay zero until a worker adds them; another queue is its own.
    assert totals(history, HISTORY_FIELDS) == dict.fromkeys(HISTORY_FIELDS, 0)
    assert totals(await driver.history(f"{queue}-other", 3), ENDS) == dict.fromkeys(ENDS, 0)


async def test_history_counts_coalesced_dropped_and_rejected_pushes(
    driver: Driver, queue: str
) -> None:
    a, b, c, d, e = ids(5)
    await driver.push([outgoing(a, queue, unique_key="k")])
    [replaced] = await driver.push([outgoing(b, queue, unique_key="k", on_duplicate="replace")])
    assert replaced.outcome == "replaced"
    await driver.push([bounded(c, queue, 2)])
    [full] = await driver.push([bounded(d, queue, 2)])
    assert full.outcome == "full"
    [dropping] = await driver.push([bounded(e, queue, 2, "drop_oldest")])
    assert dropping.outcome == "created"
    history = await driver.history(queue, 3)
    got = totals(history, ENDS)
    assert (got["coalesced"], got["rejected"], got["dropped"]) == (1, 1, 1)
    # A dropped job is counted as dropped, not as cancelled; pushes are not ends.
    assert got["cancelled"] == 0 and sum(m.ended for m in history) == 0


async def test_history_puts_each_end_in_the_minute_it_happened(driver: Driver, queue: str) -> None:
    jobs = ids(3)
    await driver.push([outgoing(j, queue, i) for i, j in enumerate(jobs)])
    spans = []  # (minute before, minute after) each ack
    for j in jobs:
        held = await reserve_one(driver, queue, j)
        before = this_minute()
        await end(driver, held, Status.SUCCEEDED)
        spans.append((before, this_minute()))
    history = await driver.history(queue, 3)
    assert sum(m.succeeded for m in history) == 3
    for m in history:
        surely = sum(1 for a, b in spans if a == b == m.minute)
        maybe = sum(1 for a, b in spans if a <= m.minute <= b)
        assert surely <= m.succeeded <= maybe, (m, spans)


# -- add_history -------------------------------------------------------------------------------


async def test_add_history_adds_the_worker_fields_into_their_minutes(
    driver: Driver, queue: str
) -> None:
    now = this_minute()
    row = {"started": 3, "waited": 2, "wait_ms": 250, "ran": 3, "run_ms": 1200}
    await driver.add_history([(queue, now, row), (queue, now - 2, {"started": 1, "ran": 1})])
    await driver.add_history([(queue, now, {"started": 1, "run_ms": 300})])
    history = await driver.history(queue, 5)
    if history[-1].minute != now:  # the minute turned: read the rows where they went
        history = await driver.history(queue, 6)
    current = minute_of(history, now)
    assert (current.started, current.waited, current.wait_ms, current.ran, current.run_ms) == (
        4,
        2,
        250,
        3,
        1500,
    )
    assert current.mean_wait == pytest.approx(0.125)
    assert current.mean_run == pytest.approx(0.5)
    earlier = minute_of(history, now - 2)
    assert (earlier.started, earlier.ran, earlier.run_ms) == (1, 1, 0)
    assert minute_of(history, now - 1) == MinuteCounts(now - 1)
    # Rows of several queues in one call land in their own queues.
    await driver.add_history([(queue, now, {"started": 1}), (f"{queue}-b", now, {"started": 7})])
    assert minute_of(await driver.history(f"{queue}-b", 6), now).started == 7
    assert minute_of(await driver.history(queue, 6), now).started == 5
    await driver.add_history([])  # nothing to add: nothing happens


async def test_add_history_ignores_unknown_fields_and_never_forges_ends(
    driver: Driver, queue: str
) -> None:
    now = this_minute()
    await driver.add_history(
        [(queue, now, {"started": 2, "bogus": 5, "succeeded": 9, "failed": 9, "expired": 9})]
    )
    current = minute_of(await driver.history(queue, 6), now)
    assert current == MinuteCounts(now, started=2)
    assert (await driver.recent(queue)).succeeded == 0


async def test_add_history_and_driver_ends_share_one_minute_entry(
    driver: Driver, queue: str
) -> None:
    job = new_id()
    await driver.push([outgoing(job, queue)])
    await end(driver, await reserve_one(driver, queue, job), Status.SUCCEEDED)
    now = this_minute()
    await driver.add_history([(queue, now, {"started": 1, "ran": 1, "run_ms": 40})])
    history = await driver.history(queue, 3)
    assert totals(history, ("succeeded", "started", "ran", "run_ms")) == {
        "succeeded": 1,
        "started": 1,
        "ran": 1,
        "run_ms": 40,
    }


async def test_history_keeps_minutes_for_at_least_two_hours(driver: Driver, queue: str) -> None:
    now = this_minute()
    await driver.add_history([(queue, now - 90, {"ran": 2}), (queue, now - 30, {"ran": 3})])
    history = await driver.history(queue, 120)
    assert len(history) == 120 and history[0].minute == history[-1].minute - 119
    assert minute_of(history, now - 90).ran == 2
    assert minute_of(history, now - 30).ran == 3
    assert sum(m.ran for m in history) == 5
    # A shorter window leaves the older minute out.
    assert sum(m.ran for m in await driver.history(queue, 60)) == 3


async def test_add_history_from_two_separately_opened_drivers_at_once_loses_nothing(
    backend: Backend, driver: Driver, queue: str
) -> None:
    now = this_minute()
    row = {"started": 1, "waited": 1, "wait_ms": 7, "ran": 1, "run_ms": 11}
    calls = 25
    async with second_driver(backend, driver) as other:

        async def report(d: Driver) -> None:
            for _ in range(calls):
                # Two minutes per call, one of them shared by every call of both drivers.
                await d.add_history([(queue, now, row), (queue, now - 1, {"started": 1})])

        await asyncio.gather(report(driver), report(other), report(driver), report(other))
        for reader in (driver, other):
            history = await reader.history(queue, 6)
            current = minute_of(history, now)
            n = 4 * calls
            assert (current.started, current.waited, current.wait_ms, current.ran) == (
                n,
                n,
                7 * n,
                n,
            )
            assert current.run_ms == 11 * n
            assert minute_of(history, now - 1).started == n


async def test_add_history_rows_for_one_minute_in_one_call_add_up(
    driver: Driver, queue: str
) -> None:
    now = this_minute()
    await driver.add_history([(queue, now, {"ran": 1, "run_ms": 5})] * 3)
    current = minute_of(await driver.history(queue, 6), now)
    assert (current.ran, current.run_ms) == (3, 15)


# -- browse ------------------------------------------------------------------------------------


async def test_browse_pending_lists_jobs_in_the_order_reserve_hands_them_out(
    driver: Driver, queue: str
) -> None:
    low, plain1, plain2, high, front1, front2, refunded = ids(7)
    await driver.push([outgoing(refunded, queue, 0)])
    # A refunded job goes back to the head of its level (priority 0).
    await driver.release(await reserve_one(driver, queue, refunded), refund=True)
    await driver.push(
        [
            outgoing(plain1, queue, 1),
            outgoing(low, queue, 2, priority=-3),
            outgoing(high, queue, 3, priority=4),
            outgoing(plain2, queue, 4),
        ]
    )
    await driver.push([outgoing(front1, queue, 5, at_front=True)])
    await driver.push([outgoing(front2, queue, 6, at_front=True, priority=-9)])
    expected = [front2, front1, high, refunded, plain1, plain2, low]
    assert await listed(driver, queue, "pending") == expected
    assert await take(driver, queue) == expected


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_browse_pending_matches_reserve_over_random_mixes_page_by_page(
    driver: Driver, queue: str, seed: int
) -> None:
    rng = random.Random(seed)
    jobs = ids(60)
    batch: list[OutgoingJob] = []
    for i, job_id in enumerate(jobs):
        batch.append(
            outgoing(
                job_id,
                queue,
                i,
                priority=rng.choice([0, 0, 0, 1, 2, -1, 7]),
                at_front=rng.random() < 0.15,
            )
        )
        if rng.random() < 0.3:  # several pushes: the order of pushes counts too
            await driver.push(batch)
            batch = []
    await driver.push(batch)
    # Some jobs go back: refunded (head of their level) or retried (behind their level).
    for held in await driver.reserve([queue], 6, lease=30):
        if rng.random() < 0.5:
            await driver.release(held, refund=True)
        else:
            await driver.release(held, 0.0, error="again")
    pages: list[str] = []
    for offset in range(0, 60, 7):
        pages += await listed_page(driver, queue, offset, 7)
    assert sorted(pages) == sorted(jobs)
    assert await take(driver, queue, 100) == pages


async def test_browse_pending_records_are_the_jobs_status_records(
    driver: Driver, queue: str
) -> None:
    a, b = ids(2)
    await driver.push([outgoing(a, queue, 1, priority=2), grouped(b, queue, "dev-1", 2)])
    records = await driver.browse(queue, "pending", 0, 10)
    assert [r.id for r in records] == [a, b]
    for record in records:
        assert isinstance(record, JobStatus)
        alone = await status_of(driver, record.id, queue)
        assert record.status is Status.QUEUED
        assert (record.queue, record.job, record.attempts) == (queue, JOB, 0)
        assert (record.priority, record.group, record.connection) == (
            alone.priority,
            alone.group,
            alone.connection,
        )
        assert record.enqueued_at == pytest.approx(alone.enqueued_at, abs=0.01)
    assert (records[0].priority, records[1].group) == (2, "dev-1")


async def test_browse_pages_with_offset_and_limit(driver: Driver, queue: str) -> None:
    jobs = ids(8)
    await driver.push([outgoing(j, queue, i) for i, j in enumerate(jobs)])
    pages = [await listed_page(driver, queue, offset, 3) for offset in (0, 3, 6)]
    assert pages == [jobs[0:3], jobs[3:6], jobs[6:8]]
    assert await listed_page(driver, queue, 8, 3) == []
    assert await listed_page(driver, queue, 100, 3) == []
    assert await listed_page(driver, queue, 2, 0) == []
    assert await listed_page(driver, queue, 7, 50) == jobs[7:]
    # Running jobs leave the pending list: the first page starts at the next to hand out.
    assert await take(driver, queue, 2) == jobs[:2]
    assert await listed_page(driver, queue, 0, 3) == jobs[2:5]
    # Reserved in one call: one lease expiry, so either order (latitude).
    running = await listed_page(driver, queue, 0, 1, "reserved")
    running += await listed_page(driver, queue, 1, 3, "reserved")
    assert sorted(running) == sorted(jobs[:2])


async def listed_page(
    driver: Driver, queue: str, offset: int, limit: int, state: str = "pending"
) -> list[str]:
    return [r.id for r in await driver.browse(queue, state, offset, limit)]  # type: ignore[arg-type]


async def test_browse_delayed_lists_jobs_by_due_time_retries_included(
    driver: Driver, queue: str
) -> None:
    late, soon, middle, retried, ready = ids(5)
    await driver.push([outgoing(late, queue, 1, delay=300)])
    await driver.push([outgoing(soon, queue, 2, delay=100), outgoing(middle, queue, 3, delay=200)])
    await driver.push([outgoing(retried, queue, 4), outgoing(ready, queue, 5)])
    held = await reserve_one(driver, queue, retried)
    await driver.release(held, 150, error="try again")
    records = await driver.browse(queue, "delayed", 0, 10)
    assert [r.id for r in records] == [soon, retried, middle, late]
    dues = [r.due_at for r in records]
    assert all(d is not None for d in dues) and dues == sorted(dues)  # type: ignore[type-var]
    assert [r.status for r in records] == [
        Status.SCHEDULED,
        Status.RETRYING,
        Status.SCHEDULED,
        Status.SCHEDULED,
    ]
    assert records[1].error == "try again" and records[1].attempts == 1
    assert await listed(driver, queue, "pending") == [ready]
    assert await listed_page(driver, queue, 1, 2, "delayed") == [retried, middle]


async def test_browse_reserved_lists_running_jobs_by_lease_expiry(
    driver: Driver, queue: str
) -> None:
    a, b, c = ids(3)
    await driver.push([outgoing(a, queue, 1), outgoing(b, queue, 2), outgoing(c, queue, 3)])
    [held_a] = await driver.reserve([queue], 1, lease=300, worker="w-a")
    [held_b] = await driver.reserve([queue], 1, lease=100, worker="w-b")
    [held_c] = await driver.reserve([queue], 1, lease=200, worker="w-c")
    assert [h.id for h in (held_a, held_b, held_c)] == [a, b, c]
    records = await driver.browse(queue, "reserved", 0, 10)
    assert [r.id for r in records] == [b, c, a]
    assert [(r.status, r.attempts, r.worker) for r in records] == [
        (Status.RUNNING, 1, "w-b"),
        (Status.RUNNING, 1, "w-c"),
        (Status.RUNNING, 1, "w-a"),
    ]
    await driver.extend([(held_a, 50)])
    assert await listed(driver, queue, "reserved") == [a, b, c]
    await driver.ack([held_b])
    assert await listed(driver, queue, "reserved") == [a, c]
    assert await listed(driver, queue, "pending") == []


async def test_browse_deferred_lists_waiting_jobs_in_push_order_without_workflow_records(
    driver: Driver, queue: str
) -> None:
    first, second, third, fourth, batch = ids(5)
    dep = new_id()
    await driver.push([outgoing(dep, queue, 0)])
    await driver.push([outgoing(second, queue, 2, depends_on=[dep])])
    await driver.push([outgoing(first, queue, 1, depends_on=[dep], priority=9)])
    await driver.push([record_job(batch, queue, "batch", [dep])])
    await driver.push(
        [outgoing(third, queue, 3, depends_on=[dep]), outgoing(fourth, queue, 4, depends_on=[dep])]
    )
    records = await driver.browse(queue, "deferred", 0, 10)
    # Push order, whatever their priority; the batch's record never runs: not listed.
    assert [r.id for r in records] == [second, first, third, fourth]
    assert all(r.status is Status.DEFERRED and r.waiting_for == (dep,) for r in records)
    assert await listed_page(driver, queue, 1, 2, "deferred") == [first, third]
    assert await listed(driver, queue, "pending") == [dep]
    await end(driver, await reserve_one(driver, queue, dep), Status.SUCCEEDED)
    assert await listed(driver, queue, "deferred") == []
    assert sorted(await listed(driver, queue, "pending")) == sorted([first, second, third, fourth])


async def test_browse_lists_each_waiting_job_in_exactly_one_state_as_stats_counts_them(
    driver: Driver, queue: str
) -> None:
    plain, front, ranked, holder, line1, line2, gated1, gated2 = ids(8)
    later, dep, deferred, running = ids(4)
    one = Limit("gw", concurrency=1)
    await driver.push([outgoing(running, queue, 0)])
    await reserve_one(driver, queue, running)
    await driver.push(
        [
            outgoing(gated1, queue, 1, limit=one),
            outgoing(gated2, queue, 2, limit=one),
        ]
    )
    # One gated job runs, the other is held back by the limit (still pending).
    assert [h.id for h in await reserve_runnable(driver, queue, 10)] == [gated1]
    await driver.push(
        [
            outgoing(plain, queue, 3),
            outgoing(ranked, queue, 4, priority=3),
            grouped(holder, queue, "dev-1", 5),
            grouped(line1, queue, "dev-1", 6),
            grouped(line2, queue, "dev-1", 7),
            outgoing(later, queue, 8, delay=600),
            outgoing(dep, queue, 9, delay=700),
            outgoing(deferred, queue, 10, depends_on=[dep]),
            outgoing(front, queue, 11, at_front=True),
        ]
    )
    stats = await driver.stats(queue)
    pending = await listed(driver, queue, "pending")
    delayed = await listed(driver, queue, "delayed")
    reserved = await listed(driver, queue, "reserved")
    waiting = await listed(driver, queue, "deferred")
    assert sorted(pending) == sorted([plain, front, ranked, holder, line1, line2, gated2])
    assert (len(pending), len(delayed), len(reserved), len(waiting)) == (
        stats.pending,
        stats.delayed,
        stats.reserved,
        stats.deferred,
    )
    assert delayed == [later, dep]
    assert sorted(reserved) == sorted([running, gated1])
    assert waiting == [deferred]
    # Line jobs and limit-held jobs may sit anywhere among the pending ones (latitude); the
    # rest are in hand-out order, and a line keeps its push order.
    assert [j for j in pending if j in (front, ranked, plain, holder)] == [
        front,
        ranked,
        plain,
        holder,
    ]
    assert [j for j in pending if j in (line1, line2)] == [line1, line2]


async def test_browse_a_queue_of_ten_thousand_jobs_in_pages(driver: Driver, queue: str) -> None:
    jobs = [f"big-{i:05d}-{new_id()[:8]}" for i in range(10_000)]
    for start in range(0, len(jobs), 2000):
        await driver.push([outgoing(j, queue, 0) for j in jobs[start : start + 2000]])
    assert (await driver.stats(queue)).pending == 10_000
    # Deep pages answer with the right jobs.
    assert await listed_page(driver, queue, 9_990, 50) == jobs[9_990:]
    assert await listed_page(driver, queue, 5_000, 3) == jobs[5_000:5_003]
    assert await listed_page(driver, queue, 0, 2) == jobs[:2]
    # Walking the whole queue page by page sees every job once, in hand-out order.
    walked: list[str] = []
    for offset in range(0, 10_000, 2500):
        walked += await listed_page(driver, queue, offset, 2500)
    assert walked == jobs
    assert await listed_page(driver, queue, 10_000, 50) == []


async def test_browse_an_unknown_or_empty_queue_lists_nothing(driver: Driver, queue: str) -> None:
    for state in ("pending", "delayed", "reserved", "deferred"):
        assert await driver.browse(f"{queue}-never-used", state, 0, 50) == []  # type: ignore[arg-type]
        assert await driver.browse(queue, state) == []  # type: ignore[arg-type]


# -- groups ------------------------------------------------------------------------------------


async def test_groups_show_holder_and_waiting_count_ordered_by_name(
    driver: Driver, queue: str
) -> None:
    b1, a1, a2, a3, c1, c2, plain = ids(7)
    await driver.push(
        [
            grouped(b1, queue, "sensor-b", 1),
            grouped(a1, queue, "sensor-a", 2),
            grouped(c1, queue, "sensor-c", 3),
            grouped(a2, queue, "sensor-a", 4),
            grouped(c2, queue, "sensor-c", 5),
            grouped(a3, queue, "sensor-a", 6),
            outgoing(plain, queue, 7),
        ]
    )
    assert await driver.groups(queue) == [
        GroupInfo("sensor-a", a1, 2),
        GroupInfo("sensor-b", b1, 0),
        GroupInfo("sensor-c", c1, 1),
    ]
    # A running holder keeps the turn; when it ends the next in line holds it.
    held = {h.id: h for h in await reserve_runnable(driver, queue, 10)}
    assert set(held) == {a1, b1, c1, plain}
    assert (await driver.groups(queue))[0] == GroupInfo("sensor-a", a1, 2)
    await driver.ack([held[a1], held[b1]])
    assert await driver.groups(queue) == [
        GroupInfo("sensor-a", a2, 1),
        GroupInfo("sensor-c", c1, 1),
    ]
    # A cancelled line job leaves the line; a cancelled holder passes the turn.
    assert await driver.cancel(a3, queue) is True
    assert await driver.cancel(a2, queue) is True
    held[c1].outcome = Outcome(Status.FAILED, 60, error="boom")
    await driver.ack([held[c1]])
    assert await driver.groups(queue) == [GroupInfo("sensor-c", c2, 0)]
    assert await driver.groups(f"{queue}-never-used") == []


async def test_groups_page_with_offset_and_limit(driver: Driver, queue: str) -> None:
    names = [f"dev-{i:02d}" for i in range(25)]
    jobs: dict[str, list[str]] = {}
    pushes = []
    for i, name in enumerate(reversed(names)):  # pushed in the reverse of name order
        jobs[name] = ids(1 + i % 3)
        pushes += [grouped(j, queue, name, i) for j in jobs[name]]
    await driver.push(pushes)
    everything = await driver.groups(queue, 0, 100)
    assert [g.group for g in everything] == names
    assert everything == [GroupInfo(n, jobs[n][0], len(jobs[n]) - 1) for n in names]
    assert await driver.groups(queue, 0, 10) == everything[:10]
    assert await driver.groups(queue, 10, 10) == everything[10:20]
    assert await driver.groups(queue, 20, 10) == everything[20:]
    assert await driver.groups(queue, 25, 10) == []
    assert await driver.groups(queue, 3, 0) == []
    assert len(await driver.groups(queue)) == 25  # the default limit (100) holds them all


async def test_groups_of_a_queue_without_groups_are_empty(driver: Driver, queue: str) -> None:
    await driver.push([outgoing(new_id(), queue), outgoing(new_id(), queue, delay=60)])
    assert await driver.groups(queue) == []


# -- bad arguments -----------------------------------------------------------------------------


async def test_bad_arguments_are_refused_naming_what_is_wrong(driver: Driver, queue: str) -> None:
    with pytest.raises(ValueError, match="running"):
        await driver.browse(queue, "running", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset"):
        await driver.browse(queue, "pending", -1, 10)
    with pytest.raises(ValueError, match="limit"):
        await driver.browse(queue, "pending", 0, -5)
    with pytest.raises(ValueError, match="offset"):
        await driver.groups(queue, -1, 10)
    with pytest.raises(ValueError, match="limit"):
        await driver.groups(queue, 0, -1)
    with pytest.raises(ValueError, match="minutes"):
        await driver.history(queue, 0)


# -- pause, resume, paused ---------------------------------------------------------------------


async def test_pause_is_seen_by_a_second_driver_and_resume_undoes_it(
    backend: Backend, driver: Driver, queue: str
) -> None:
    other_queue = f"{queue}-other"
    assert await driver.paused([queue, other_queue]) == set()
    async with second_driver(backend, driver) as other:
        await driver.pause(queue)
        assert await other.paused([queue, other_queue]) == {queue}
        assert await driver.paused([queue]) == {queue}
        await driver.pause(queue)  # twice: still paused, once resumed is enough
        # Dispatches go on while paused: nothing is lost.
        job = new_id()
        await other.push([outgoing(job, queue)])
        assert (await driver.stats(queue)).pending == 1
        await other.resume(queue)
        assert await driver.paused([queue, other_queue]) == set()
        assert await other.paused([queue]) == set()
        assert await listed(driver, queue, "pending") == [job]
    assert await driver.paused([]) == set()


async def test_paused_of_many_queues_is_one_read_with_the_markers_semantics(
    backend: Backend, driver: Driver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,200 queues (more than one SQL batch of names): paused, resumed (an expired marker),
    # never paused, and a long name (a hashed marker). What `paused` says matches the markers.
    names = [f"{queue}-{n}" for n in range(1200)]
    long = long_name(queue, "z")
    for name in (names[0], names[599], names[1199], long, names[7]):
        await driver.pause(name)
    await driver.resume(names[7])
    await driver.set_marker("paused:" + names[8], "0", 60)  # a value other than "1"
    if backend.kind != "memory":
        # Redis and SQL read every marker in one round trip, not one `get_marker` per queue
        # (hundreds at once would exhaust Redis' connection pool).
        async def one_by_one(name: str) -> str | None:
            raise AssertionError(f"paused read {name} on its own")

        monkeypatch.setattr(driver, "get_marker", one_by_one)
    started = time.monotonic()
    found = await driver.paused([*names, long])
    took = time.monotonic() - started
    assert found == {names[0], names[599], names[1199], long}
    assert took < 5, took
    assert await driver.paused([]) == set()


async def test_resume_of_a_queue_never_paused_changes_nothing(driver: Driver, queue: str) -> None:
    await driver.resume(queue)
    await driver.resume(queue)
    assert await driver.paused([queue]) == set()
    await driver.pause(queue)
    assert await driver.paused([queue]) == {queue}


async def test_long_queue_names_are_paused_browsed_and_counted_apart(
    backend: Backend, driver: Driver, queue: str
) -> None:
    name, sibling = long_name(queue, "x"), long_name(queue, "y")
    assert len(name) == len(sibling) == 190
    async with second_driver(backend, driver) as other:
        await driver.pause(name)
        # Same first 189 characters: still two queues.
        assert await other.paused([name, sibling, queue]) == {name}
        await other.pause(sibling)
        await driver.resume(name)
        assert await other.paused([name, sibling]) == {sibling}
    a, b = ids(2)
    await driver.push([grouped(a, name, "g", 1), grouped(b, name, "g", 2)])
    assert await listed(driver, name, "pending") == [a, b]
    assert await driver.groups(name) == [GroupInfo("g", a, 1)]
    assert await listed(driver, sibling, "pending") == []
    held = await reserve_runnable(driver, name)
    assert [h.id for h in held] == [a]
    await driver.ack(held)
    now = this_minute()
    await driver.add_history([(name, now, {"started": 1})])
    history = await driver.history(name, 3)
    assert totals(history, ("succeeded",)) == {"succeeded": 1}
    assert minute_of(await driver.history(name, 6), now).started == 1
    assert totals(await driver.history(sibling, 3), ("succeeded", "started")) == {
        "succeeded": 0,
        "started": 0,
    }
