"""The Redis driver's issue-14 rules (groups, bounded queues, counts, expired jobs handed back).

The behaviour every driver shares is judged by tests/conformance/test_iot_*.py; here the Redis
driver is checked on its own as it is written: turns passed in the scripts that end jobs, the
line's counter kept exact, group keys in the queue's Cluster slot, the plain path unchanged.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from core.queue.drivers.base import Dependency, Limit, Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.redis import RedisDriver
from core.status import Status
from tests.conftest import flush_redis, make_settings
from tests.test_redis_lifecycle import cluster_url, slot_checked

pytestmark = pytest.mark.timeout(60)

__all__ = ["cluster_url"]  # the module fixture, shared with the lifecycle tests

JOB = "tests.jobs:RecordJob"


def new_id() -> str:
    return uuid.uuid4().hex


def job(queue: str, group: str = "", job_id: str = "", **fields: Any) -> OutgoingJob:
    job_id = job_id or new_id()
    fields.setdefault("job", JOB)
    return OutgoingJob(job_id, queue, orjson.dumps({"id": job_id}), group=group, **fields)


@pytest.fixture
async def driver(redis_url: str) -> AsyncIterator[RedisDriver]:
    flush_redis(redis_url)
    async with RedisDriver("redis", make_settings(redis_url=redis_url)) as opened:
        yield opened


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0) -> None:
    """Wait for a time-driven state (a lease or a ttl running out): checks every 10 ms."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def take(driver: RedisDriver, queue: str, limit: int = 10, **kw: Any) -> list[ReservedJob]:
    return await driver.reserve([queue], limit, kw.pop("lease", 30), worker="w", **kw)


def ids(jobs: list[ReservedJob]) -> list[str]:
    return [j.id for j in jobs if not j.expired]


async def glen(driver: RedisDriver, queue: str) -> int:
    return int(await driver.client.get(f"{driver.keys(queue).tag}:glen") or 0)


# -- groups -----------------------------------------------------------------------------------


async def test_one_job_per_group_in_turn_and_the_turn_passes_at_ack(
    driver: RedisDriver, queue: str
) -> None:
    a = [job(queue, "A") for _ in range(3)]
    b = job(queue, "B")
    pushed = await driver.push([*a, b])
    assert [p.outcome for p in pushed] == ["created"] * 4
    assert ids(await take(driver, queue)) == [a[0].id, b.id]
    stats = await driver.stats(queue)
    assert (stats.pending, stats.reserved) == (2, 2)
    record = await driver.job_status(a[1].id, queue)
    assert record is not None and record.status == Status.QUEUED and record.group == "A"
    held = await driver.job_status(a[0].id, queue)
    assert held is not None and held.group == "A"
    # Acknowledged with any outcome: the next of the line takes the turn in the same script.
    first = await take(driver, queue, limit=0)  # nothing new: only checks nothing is ready
    assert first == []
    done = ReservedJob(a[0].id, queue, b"", 1, outcome=Outcome(Status.FAILED, 60, error="x"))
    assert ids(await take(driver, queue, ack=[done])) == [a[1].id]
    await driver.ack([ReservedJob(a[1].id, queue, b"", 1)])
    assert ids(await take(driver, queue)) == [a[2].id]
    await driver.ack([ReservedJob(a[2].id, queue, b"", 1), ReservedJob(b.id, queue, b"", 1)])
    assert await glen(driver, queue) == 0
    assert not await driver.client.exists(f"{driver.keys(queue).tag}:gturn")


async def test_a_retry_a_refund_and_a_lost_lease_keep_the_turn(
    driver: RedisDriver, queue: str
) -> None:
    a1, a2 = job(queue, "A"), job(queue, "A")
    await driver.push([a1, a2])
    [held] = await take(driver, queue)
    await driver.release(held, 0.0, error="retry")
    [held] = await take(driver, queue)
    assert held.id == a1.id and held.attempts == 2
    await driver.release(held, 0.0, refund=True)
    [held] = await take(driver, queue, lease=0.05)
    assert held.id == a1.id
    got: list[ReservedJob] = []

    async def back() -> bool:
        got.extend(await take(driver, queue))
        return bool(got)

    await until(back, "the lost lease to come back")
    assert ids(got) == [a1.id]  # still in turn: a2 never overtakes it


async def test_a_retry_with_a_delay_keeps_the_turn(driver: RedisDriver, queue: str) -> None:
    a1, a2 = job(queue, "A"), job(queue, "A")
    await driver.push([a1, a2])
    [held] = await take(driver, queue)
    await driver.release(held, 30.0, error="later")
    assert await take(driver, queue) == []
    record = await driver.job_status(a2.id, queue)
    assert record is not None and record.status == Status.QUEUED


async def test_turns_are_fair_a_passed_turn_goes_behind_ready_jobs(
    driver: RedisDriver, queue: str
) -> None:
    many = [job(queue, "busy") for _ in range(50)]
    await driver.push(many)
    [first] = await take(driver, queue, limit=1)
    single = job(queue, "quiet")
    await driver.push([single])
    first.outcome = None
    [nxt] = await take(driver, queue, limit=1, ack=[first])
    assert nxt.id == single.id  # ready before the busy group's next took the turn
    [after] = await take(driver, queue, limit=1, ack=[nxt])
    assert after.id == many[1].id


async def test_cancel_a_line_job_and_cancel_the_waiting_holder(
    driver: RedisDriver, queue: str
) -> None:
    a1, a2, a3 = (job(queue, "A") for _ in range(3))
    await driver.push([a1, a2, a3])
    assert await driver.cancel(a2.id, queue)
    record = await driver.job_status(a2.id, queue)
    assert record is not None and record.status == Status.CANCELLED
    assert await glen(driver, queue) == 1
    assert await driver.cancel(a1.id, queue)  # the holder, waiting: the turn passes
    assert ids(await take(driver, queue)) == [a3.id]
    assert await glen(driver, queue) == 0


async def test_a_delayed_line_job_takes_the_turn_scheduled_until_its_own_time(
    driver: RedisDriver, queue: str
) -> None:
    a1, a2 = job(queue, "A"), job(queue, "A", delay=30)
    await driver.push([a1, a2])
    before = await driver.job_status(a2.id, queue)
    assert before is not None and before.status == Status.QUEUED and before.due_at
    [held] = await take(driver, queue)
    assert await take(driver, queue, ack=[held]) == []
    after = await driver.job_status(a2.id, queue)
    assert after is not None and after.status == Status.SCHEDULED
    assert after.due_at == before.due_at
    assert (await driver.stats(queue)).delayed == 1


async def test_a_line_job_past_its_ttl_expires_when_it_takes_the_turn_and_is_handed_back(
    driver: RedisDriver, queue: str
) -> None:
    a1, a2, a3 = job(queue, "A"), job(queue, "A", ttl=0.02), job(queue, "A")
    await driver.push([a1, a2, a3])
    [held] = await take(driver, queue)

    async def past() -> bool:
        record = await driver.job_status(a2.id, queue)
        return record is not None and record.status == Status.EXPIRED

    await until(past, "a2's ttl to run out")
    got = await take(driver, queue, limit=1, ack=[held])
    assert [(j.id, j.expired, j.attempts) for j in got] == [
        (a2.id, True, 0),
        (a3.id, False, 1),
    ]
    assert [j.payload for j in got if j.expired] == [a2.payload]
    counts = await driver.recent(queue)
    assert counts.expired == 1


async def test_a_dependent_joins_its_groups_line_when_released(
    driver: RedisDriver, queue: str
) -> None:
    dep, a1 = job(queue), job(queue, "A")
    a2 = job(queue, "A", depends_on=(Dependency(dep.id),))
    a3 = job(queue, "A")
    await driver.push([dep, a1, a2, a3])
    assert ids(await take(driver, queue)) == [dep.id, a1.id]
    await driver.ack([ReservedJob(a1.id, queue, b"", 1)])
    assert ids(await take(driver, queue)) == [a3.id]  # a2 was not in the line yet
    await driver.ack([ReservedJob(dep.id, queue, b"", 1)])  # a2 joins, behind a3's turn
    assert await take(driver, queue) == []
    record = await driver.job_status(a2.id, queue)
    assert record is not None and record.status == Status.QUEUED and record.group == "A"
    assert ids(await take(driver, queue, ack=[ReservedJob(a3.id, queue, b"", 1)])) == [a2.id]


async def test_a_dependency_cascade_passes_the_turn(driver: RedisDriver, queue: str) -> None:
    dep = job(queue)
    a1 = job(queue, "A", depends_on=(Dependency(dep.id),))
    a2 = job(queue, "A")
    await driver.push([dep, a1])
    [held] = await take(driver, queue)
    held.outcome = Outcome(Status.FAILED, 60, error="no")
    await driver.ack([held])  # a1 cancelled by the cascade (never in turn: a2 takes it)
    await driver.push([a2])
    assert ids(await take(driver, queue)) == [a2.id]


async def test_replacing_a_line_job_keeps_its_place(driver: RedisDriver, queue: str) -> None:
    a1 = job(queue, "A")
    a2 = job(queue, "A", unique_key="dev", on_duplicate="replace")
    a3 = job(queue, "A")
    await driver.push([a1, a2, a3])
    newer = OutgoingJob(
        new_id(), queue, b'{"v":2}', job=JOB, group="A", unique_key="dev", on_duplicate="replace"
    )
    [pushed] = await driver.push([newer])
    assert (pushed.id, pushed.outcome) == (a2.id, "replaced")
    [held] = await take(driver, queue)
    [nxt] = await take(driver, queue, ack=[held])
    assert (nxt.id, nxt.payload) == (a2.id, b'{"v":2}')
    assert (await driver.recent(queue)).coalesced == 1


async def test_clear_removes_line_jobs_and_keeps_a_running_holders_turn(
    driver: RedisDriver, queue: str
) -> None:
    a = [job(queue, "A") for _ in range(3)]
    b = [job(queue, "B") for _ in range(2)]
    await driver.push([*a, *b])
    [running] = await take(driver, queue, limit=1)
    assert running.id == a[0].id
    assert await driver.clear(queue) == 4
    assert await glen(driver, queue) == 0
    stats = await driver.stats(queue)
    assert (stats.pending, stats.delayed, stats.reserved) == (0, 0, 1)
    assert await driver.job_status(a[1].id, queue) is None
    later_a, later_b = job(queue, "A"), job(queue, "B")
    await driver.push([later_a, later_b])
    assert ids(await take(driver, queue)) == [later_b.id]  # A's holder still runs
    assert ids(await take(driver, queue, ack=[running])) == [later_a.id]


async def test_a_failed_job_retried_rejoins_its_group(driver: RedisDriver, queue: str) -> None:
    from core.queue.drivers.base import FailedJob

    a1, a2 = job(queue, "A"), job(queue, "A")
    await driver.push([a1, a2])
    [held] = await take(driver, queue)
    held.outcome = Outcome(Status.FAILED, 60, error="boom")
    [second] = await take(driver, queue, ack=[held])
    store = driver.failed_store()
    from datetime import UTC, datetime

    await store.add(
        FailedJob(a1.id, "redis", queue, a1.payload.decode(), "boom", datetime.now(UTC))
    )
    [record] = await store.list(queue)
    assert await driver.retry_failed([record]) == [a1.id]
    assert await take(driver, queue) == []  # behind a2, which holds the turn
    assert ids(await take(driver, queue, ack=[second])) == [a1.id]


# -- bounded queues ---------------------------------------------------------------------------


async def test_reject_at_the_bound_counts_waiting_jobs_of_every_kind(
    driver: RedisDriver, queue: str
) -> None:
    bound = {"max_length": 4}
    first = [
        job(queue, **bound),
        job(queue, delay=30, **bound),
        job(queue, priority=5, **bound),
        job(queue, "A", **bound),
    ]
    assert [p.outcome for p in await driver.push(first)] == ["created"] * 4
    refused = job(queue, "A", **bound)
    [pushed] = await driver.push([refused])
    assert (pushed.id, pushed.outcome) == (refused.id, "full")
    assert await driver.job_status(refused.id, queue) is None
    # A running job is not waiting: one place frees.
    running = await take(driver, queue, limit=1)
    assert len(running) == 1
    line = job(queue, "A", **bound)
    assert [p.outcome for p in await driver.push([line])] == ["created"]
    assert [p.outcome for p in await driver.push([job(queue, "A", **bound)])] == ["full"]
    counts = await driver.recent(queue)
    assert (counts.rejected, counts.dropped) == (2, 0)


async def test_drop_oldest_drops_the_groups_line_head_else_the_ready_head(
    driver: RedisDriver, queue: str
) -> None:
    bound: dict[str, Any] = {"max_length": 3, "overflow": "drop_oldest"}
    p1, a1, a2 = job(queue, **bound), job(queue, "A", **bound), job(queue, "A", **bound)
    await driver.push([p1, a1, a2])
    a3 = job(queue, "A", **bound)
    [pushed] = await driver.push([a3])  # (a) A's line head: a2
    assert pushed.outcome == "created"
    record = await driver.job_status(a2.id, queue)
    assert record is not None and record.status == Status.CANCELLED
    assert record.error == f"dropped: queue {queue} is full (3 waiting)"
    b1 = job(queue, "B", **bound)
    await driver.push([b1])  # (b) the ready list's head: p1
    record = await driver.job_status(p1.id, queue)
    assert record is not None and record.status == Status.CANCELLED
    c1 = job(queue, "C", **bound)
    await driver.push([c1])  # (b) again, after c1's store: A's holder a1, its turn to a3
    stats = await driver.stats(queue)
    assert stats.pending == 3
    assert ids(await take(driver, queue)) == [b1.id, c1.id, a3.id]
    counts = await driver.recent(queue)
    assert (counts.dropped, counts.cancelled, counts.rejected) == (3, 0, 0)


async def test_drop_oldest_without_a_ready_plain_job_rejects(
    driver: RedisDriver, queue: str
) -> None:
    bound: dict[str, Any] = {"max_length": 2, "overflow": "drop_oldest"}
    await driver.push([job(queue, delay=30, **bound), job(queue, priority=2, **bound)])
    [pushed] = await driver.push([job(queue, **bound)])
    assert pushed.outcome == "full"
    assert (await driver.recent(queue)).rejected == 1


async def test_a_replace_or_keep_at_the_bound_is_never_refused(
    driver: RedisDriver, queue: str
) -> None:
    bound: dict[str, Any] = {"max_length": 1, "unique_key": "k"}
    await driver.push([job(queue, **bound)])
    again = await driver.push(
        [job(queue, on_duplicate="replace", **bound), job(queue, on_duplicate="keep", **bound)]
    )
    assert [p.outcome for p in again] == ["replaced", "kept"]
    assert (await driver.recent(queue)).rejected == 0


# -- one slot per queue ------------------------------------------------------------------------


async def test_group_keys_stay_in_the_queues_slot(cluster_url: str) -> None:
    settings = make_settings(redis_url=cluster_url, redis_prefix="topiq")
    queue = f"q-{new_id()[:8]}"
    async with RedisDriver("redis", settings) as driver:
        slot_checked(driver)
        await driver.client.flushall()
        jobs = [job(queue, "A"), job(queue, "A", ttl=0.01), job(queue, "A")]
        await driver.push(jobs)
        await asyncio.sleep(0.02)  # the ttl of the line's head runs out
        [held] = await take(driver, queue, limit=1)
        assert await driver.cancel(jobs[2].id, queue)
        got = await take(driver, queue, ack=[held])
        assert [(j.id, j.expired) for j in got] == [(jobs[1].id, True)]
        bound: dict[str, Any] = {"max_length": 2, "overflow": "drop_oldest"}
        b = [job(queue, "B"), job(queue, "B"), job(queue, "B", **bound)]
        assert [p.outcome for p in await driver.push(b)] == ["created"] * 3
        assert (await driver.recent(queue)).dropped == 1
        assert await driver.clear(queue) == 2
        await driver.stats(queue)
        await driver.recent(queue)


async def test_drop_oldest_spares_at_front_jobs_and_resolves_a_dependent_pushed_with_it(
    driver: RedisDriver, queue: str
) -> None:
    bound: dict[str, Any] = {"max_length": 2, "overflow": "drop_oldest"}
    plain, front = job(queue), job(queue, at_front=True)
    await driver.push([plain, front])
    # A push with dependencies counts too; it depends on the job it makes room by dropping.
    dependent = job(queue, depends_on=(Dependency(plain.id, queue),), **bound)
    [pushed] = await driver.push([dependent])
    assert pushed.outcome == "created"
    dropped = await driver.job_status(plain.id, queue)
    assert dropped is not None and dropped.status == Status.CANCELLED
    record = await driver.job_status(dependent.id, queue)
    assert record is not None and record.status == Status.CANCELLED
    assert record.error == f"dependency {plain.id} cancelled"
    assert ids(await take(driver, queue)) == [front.id]
    counts = await driver.recent(queue)
    assert (counts.dropped, counts.cancelled) == (1, 1)


async def test_the_bound_counts_jobs_held_back_by_a_limit(driver: RedisDriver, queue: str) -> None:
    limit = Limit("dev", concurrency=1)
    first, second, third = (job(queue, limit=limit) for _ in range(3))
    await driver.push([first, second, third])
    assert ids(await take(driver, queue)) == [first.id]  # the others held back
    nheld = f"{driver.keys(queue).tag}:nheld"
    await driver.client.delete(nheld)  # as after an upgrade: made again from the lists
    bound: dict[str, Any] = {"max_length": 2}
    assert [p.outcome for p in await driver.push([job(queue, **bound)])] == ["full"]
    assert int(await driver.client.get(nheld)) == 2
    assert await driver.cancel(second.id, queue)
    assert [p.outcome for p in await driver.push([job(queue, **bound)])] == ["created"]
    assert [p.outcome for p in await driver.push([job(queue, **bound)])] == ["full"]
    # The held one starts when the running one ends: the count follows.
    await driver.ack([ReservedJob(first.id, queue, b"", 1)])
    assert int(await driver.client.get(nheld)) == 0
    assert (await driver.stats(queue)).pending == 2
    assert await driver.clear(queue) == 2
    assert await driver.client.get(nheld) is None


# -- invariants under a random mix of operations ------------------------------------------------


async def group_state(driver: RedisDriver, queue: str) -> tuple[dict[str, str], int, int]:
    """The turn holders, the line counter and the jobs actually in lines."""
    tag = driver.keys(queue).tag
    turns = {
        k.decode(): v.decode()
        for k, v in (await driver.client.hgetall(f"{tag}:gturn")).items()  # type: ignore[misc]
    }
    lined = 0
    for name in turns:
        lined += await driver.client.llen(f"{tag}:gline:{name}")  # type: ignore[misc]
    return turns, await glen(driver, queue), lined


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_operations_keep_one_job_per_group_in_push_order(
    driver: RedisDriver, queue: str, seed: int
) -> None:
    import random

    rng = random.Random(seed)
    groups = ["g1", "g2", "g3", "g4"]
    pushed: dict[str, list[str]] = {g: [] for g in groups}
    group_of: dict[str, str] = {}
    started: dict[str, list[str]] = {g: [] for g in groups}
    running: dict[str, ReservedJob] = {}
    ended: set[str] = set()
    for _ in range(300):
        op = rng.random()
        if op < 0.35:
            bounded = rng.random() < 0.3
            bound: dict[str, Any] = {}
            if bounded:
                bound = {"max_length": 12, "overflow": rng.choice(["reject", "drop_oldest"])}
            batch = [
                job(
                    queue,
                    rng.choice(groups),
                    delay=rng.choice([0.0, 0.0, 0.02]),
                    ttl=rng.choice([0.0, 0.0, 0.0, 0.03]),
                    **bound,
                )
                for _ in range(rng.randint(1, 3))
            ]
            before = await driver.stats(queue)
            outcomes = await driver.push(batch)
            for j, p in zip(batch, outcomes, strict=True):
                if p.outcome == "created":
                    pushed[j.group].append(j.id)
                    group_of[j.id] = j.group
                else:
                    assert p.outcome == "full" and bounded
            if bounded:
                after = await driver.stats(queue)
                waiting = after.pending + after.delayed
                assert waiting <= max(12, before.pending + before.delayed)
                for i in [i for i in group_of if i not in ended and i not in running]:
                    record = await driver.job_status(i, queue)
                    assert record is not None
                    if record.status == Status.CANCELLED:
                        assert record.error == f"dropped: queue {queue} is full (12 waiting)"
                        ended.add(i)
        elif op < 0.6 or not running:
            for r in await take(driver, queue, limit=rng.randint(1, 4)):
                if r.expired:
                    assert r.id not in ended and r.attempts == 0
                    ended.add(r.id)
                    continue
                g = group_of[r.id]
                assert all(group_of[other] != g for other in running), "two of a group at once"
                if r.id not in started[g]:  # a refunded try comes back as try 1 again
                    started[g].append(r.id)
                running[r.id] = r
        else:
            r = running.pop(rng.choice(sorted(running)))
            what = rng.random()
            if what < 0.6:
                status = rng.choice([Status.SUCCEEDED, Status.FAILED, Status.CANCELLED])
                r.outcome = Outcome(status, 60)
                await driver.ack([r])
                ended.add(r.id)
            elif what < 0.8:
                await driver.release(r, 0.0, refund=rng.random() < 0.5, error="again")
            else:
                waiting = [i for i in group_of if i not in ended and i not in running]
                await driver.release(r, 0.0, error="again")
                if waiting:
                    victim = rng.choice(waiting)
                    if await driver.cancel(victim, queue):
                        ended.add(victim)
        turns, counter, lined = await group_state(driver, queue)
        assert counter == lined
        live = [i for i in group_of if i not in ended]
        assert counter == len(live) - len(turns)  # every live job: a holder or in a line
        stats = await driver.stats(queue)
        assert stats.pending + stats.delayed + stats.reserved == len(live)
    # Drain: everything runs or expires, each group in push order (cancelled ones left out).
    deadline = time.monotonic() + 20
    ended.update(running)  # acknowledged by the first reserve below
    while len(ended) < len(group_of) or running:
        assert time.monotonic() < deadline, "the queue did not drain"
        got = await take(driver, queue, limit=10, ack=list(running.values()))
        running = {}
        if not got:
            await asyncio.sleep(0.01)  # a delayed job's time (no event to await)
        for r in got:
            ended.add(r.id)
            if r.expired:
                continue
            if r.id not in started[group_of[r.id]]:
                started[group_of[r.id]].append(r.id)
            running[r.id] = r
    for g in groups:
        assert started[g] == [i for i in pushed[g] if i in started[g]]
    assert await group_state(driver, queue) == ({}, 0, 0)
    counts = await driver.recent(queue)
    # The mix did reach those paths.
    assert counts.expired > 0 and counts.cancelled > 0
    assert counts.dropped > 0 and counts.rejected > 0
