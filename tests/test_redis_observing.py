"""The Redis driver's observing reads (#15): history, add_history, browse, groups.

The behaviour every driver shares is judged by tests/conformance/test_observing.py; here the
Redis driver is checked as it is written: browse's pending order is the order reserve.lua hands
jobs out (checked against reserve itself on a mix of priorities, at_front jobs, refunds, limit
holds and group lines), pages cost O(offset + limit), history is the counts hashes the scripts
write (EXPIRE kept), and every call keeps to the queue's Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from core.queue.drivers.base import (
    Dependency,
    GroupInfo,
    Limit,
    MinuteCounts,
    OutgoingJob,
    ReservedJob,
)
from core.queue.drivers.redis import RedisDriver
from core.status import Status
from tests.conftest import flush_redis, make_settings
from tests.test_redis_lifecycle import cluster_url, slot_checked

pytestmark = pytest.mark.timeout(60)

__all__ = ["cluster_url"]  # the module fixture, shared with the lifecycle tests

JOB = "tests.jobs:RecordJob"


def new_id() -> str:
    return uuid.uuid4().hex


def job(queue: str, job_id: str = "", **fields: Any) -> OutgoingJob:
    job_id = job_id or new_id()
    fields.setdefault("job", JOB)
    return OutgoingJob(job_id, queue, orjson.dumps({"id": job_id}), **fields)


@pytest.fixture
async def driver(redis_url: str) -> AsyncIterator[RedisDriver]:
    flush_redis(redis_url)
    async with RedisDriver("redis", make_settings(redis_url=redis_url)) as opened:
        yield opened


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


async def browse_ids(driver: RedisDriver, queue: str, state: Any, page: int = 1000) -> list[str]:
    """Every job of `state`, read page by page of `page`."""
    out: list[str] = []
    while True:
        got = await driver.browse(queue, state, len(out), page)
        out += [r.id for r in got]
        if len(got) < page:
            return out


async def drain_ids(driver: RedisDriver, queue: str) -> list[str]:
    """The ids reserve hands out, one call per job, acknowledging each (so that limits and
    group turns let the next ones go), until none is left."""
    out: list[str] = []
    held: list[ReservedJob] = []
    while True:
        held = await driver.reserve([queue], 1, 30, ack=held, worker="w")
        if not held:
            return out
        out += [j.id for j in held]


# -- browse: pending in the order jobs are handed out ------------------------------------------


async def test_pending_is_the_order_reserve_hands_jobs_out(driver: RedisDriver, queue: str) -> None:
    await driver.push([job(queue, "plain0")])
    [taken] = await driver.reserve([queue], 1, 30, worker="w")
    await driver.release(taken, refund=True)  # a refund: back to the head of the list
    # front1 goes to the list's head (nothing prioritized yet), marked in <tag>:fronts; front2,
    # pushed once the prio set exists, goes there, before every priority.
    names = ["plain1", "front1", "p5", "plain2", "low", "front2", "p5b", "p9", "plain3"]
    options: dict[str, dict[str, Any]] = {
        "front1": {"at_front": True},
        "front2": {"at_front": True},
        "p5": {"priority": 5},
        "p5b": {"priority": 5},
        "p9": {"priority": 9},
        "low": {"priority": -3},
    }
    for name in names:  # one at a time: each its own readiness time
        await driver.push([job(queue, name, **options.get(name, {}))])
    listed = await browse_ids(driver, queue, "pending")
    assert listed == [
        *("front2", "front1", "p9", "p5", "p5b"),
        *("plain0", "plain1", "plain2", "plain3", "low"),
    ]
    assert await browse_ids(driver, queue, "pending", page=2) == listed
    assert await drain_ids(driver, queue) == listed


@pytest.mark.parametrize("seed", range(8))
async def test_pending_order_matches_reserve_on_random_mixes(
    driver: RedisDriver, queue: str, seed: int
) -> None:
    """Pushes of random priorities and at_front flags, single and bulk, with refunds and
    retries (released at once) in between: browse's order, read in pages, is reserve's."""
    rnd = random.Random(seed)
    for step in range(40):
        batch = [
            job(
                queue,
                f"s{step}-{n}",
                priority=rnd.choice((0, 0, 0, 4, 9, -2)),
                at_front=rnd.random() < 0.2,
            )
            for n in range(rnd.choice((1, 1, 3)))
        ]
        await driver.push(batch)
        roll = rnd.random()
        if roll < 0.2:
            for taken in await driver.reserve([queue], rnd.choice((1, 2)), 30, worker="w"):
                await driver.release(taken, refund=rnd.random() < 0.5)
        elif roll < 0.35:  # some run and end: the prio set may empty (fronts to the list)
            await driver.ack(await driver.reserve([queue], rnd.randint(1, 6), 30, worker="w"))
    listed = await browse_ids(driver, queue, "pending", page=rnd.choice((1, 7, 50)))
    assert len(listed) == (await driver.stats(queue)).pending
    assert await drain_ids(driver, queue) == listed


async def test_pending_lists_limit_held_and_group_line_jobs_after_the_ready_ones(
    driver: RedisDriver, queue: str
) -> None:
    limit = Limit("dev", concurrency=1)
    await driver.push([job(queue, f"l{i}", limit=limit) for i in range(3)])
    [running] = await driver.reserve([queue], 1, 30, worker="w")
    await driver.push([job(queue, "plain")])
    assert await driver.reserve([queue], 1, 30, worker="w") != []  # holds l1, l2 back
    await driver.push([job(queue, f"{g}{i}", group=g) for g in "ba" for i in range(3)])
    listed = await browse_ids(driver, queue, "pending")
    # Ready: the groups' holders; held back by the limit: l1, l2; lines by group name.
    assert listed == ["b0", "a0", "l1", "l2", "a1", "a2", "b1", "b2"]
    assert [r.id for r in await driver.browse(queue, "pending", 3, 3)] == ["l2", "a1", "a2"]
    stats = await driver.stats(queue)
    assert stats.pending == len(listed)
    records = await driver.browse(queue, "pending", 0, 50)
    assert {r.status for r in records} == {Status.QUEUED}
    assert {r.group for r in records if r.id[0] in "ab"} == {"a", "b"}
    del running


async def test_delayed_reserved_and_deferred_orders(driver: RedisDriver, queue: str) -> None:
    await driver.push([job(queue, f"d{i}", delay=100 - i) for i in range(4)])
    assert await browse_ids(driver, queue, "delayed") == ["d3", "d2", "d1", "d0"]
    [first] = await driver.browse(queue, "delayed", 0, 1)
    assert first.status == Status.SCHEDULED and first.due_at is not None
    await driver.push([job(queue, f"r{i}") for i in range(3)])
    held = await driver.reserve([queue], 3, 30, worker="w")
    await driver.extend([(held[0], 90), (held[1], 60)])
    assert await browse_ids(driver, queue, "reserved") == ["r2", "r1", "r0"]
    assert {r.status for r in await driver.browse(queue, "reserved")} == {Status.RUNNING}
    # One call (one millisecond): push order still, by the record's dseq; ids sort otherwise.
    after = (Dependency("d0", queue),)
    await driver.push([job(queue, f"w{i}", depends_on=after) for i in (3, 0, 2, 1)])
    assert await browse_ids(driver, queue, "deferred") == ["w3", "w0", "w2", "w1"]
    [one] = await driver.browse(queue, "deferred", 2, 1)
    assert one.id == "w2" and one.status == Status.DEFERRED and one.waiting_for == ("d0",)
    assert await driver.browse(queue, "pending") == []


async def test_browse_refuses_bad_arguments(driver: RedisDriver, queue: str) -> None:
    with pytest.raises(ValueError, match="unknown state 'waiting'"):
        await driver.browse(queue, "waiting", 0, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset must be an integer of at least 0"):
        await driver.browse(queue, "pending", -1, 10)
    with pytest.raises(ValueError, match="limit must be an integer of at least 0"):
        await driver.browse(queue, "pending", 0, -5)
    await driver.push([job(queue, "x")])
    assert await driver.browse(queue, "delayed", 0, 0) == []
    assert await driver.browse(queue, "pending", 0, 0) == []


async def test_a_page_deep_in_a_long_queue_jumps_to_its_offset(
    driver: RedisDriver, queue: str
) -> None:
    n = 20_000  # half prioritized: the order interleaves the list and the prio set
    for start in range(0, n, 10_000):
        await driver.push(
            [job(queue, f"j{i:06d}", priority=i % 2) for i in range(start, start + 10_000)]
        )

    async def calls() -> tuple[int, int]:
        """Commands run so far (scripts' included): HEXISTS, and LRANGE + ZRANGE."""
        stats = await driver.client.info("commandstats")
        count = {
            name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in ("hexists", "lrange", "zrange")
        }
        return count["hexists"], count["lrange"] + count["zrange"]

    async def timed(offset: int) -> tuple[float, int, list[str]]:
        checks, ranges = await calls()
        began = time.perf_counter()
        page = await driver.browse(queue, "pending", offset, 50)
        took = time.perf_counter() - began
        after = await calls()
        # A jump to the offset: a few range reads, not one per slice of the jobs before it.
        assert after[1] - ranges <= 6, f"{after[1] - ranges} range reads for one page"
        return took, after[0] - checks, [r.id for r in page]

    odd = [f"j{i:06d}" for i in range(1, n, 2)]
    even = [f"j{i:06d}" for i in range(0, n, 2)]
    head, checks, ids = await timed(0)
    assert ids == odd[:50]
    assert checks <= 2 * 50 + 16  # only the page's entries are looked at (and their records)
    deep, checks, ids = await timed(n - 70)
    assert ids == even[-70:-20]
    assert checks <= 2 * 50 + 16
    assert head < 0.25 and deep < 0.25, f"pages took {head:.3f}s and {deep:.3f}s"


# -- groups ----------------------------------------------------------------------------------


async def test_groups_by_name_with_holder_and_waiting(driver: RedisDriver, queue: str) -> None:
    assert await driver.groups(queue) == []
    await driver.push(
        [
            job(queue, f"{g}{i}", group=g)
            for g in ("zeta", "alpha", "mid")
            for i in range(3 if g != "mid" else 1)
        ]
    )
    assert await driver.groups(queue) == [
        GroupInfo("alpha", "alpha0", 2),
        GroupInfo("mid", "mid0", 0),
        GroupInfo("zeta", "zeta0", 2),
    ]
    assert await driver.groups(queue, 1, 1) == [GroupInfo("mid", "mid0", 0)]
    assert await driver.groups(queue, 3, 10) == []
    held = await driver.reserve([queue], 3, 30, worker="w")
    await driver.ack([j for j in held if j.id != "zeta0"])
    assert await driver.groups(queue) == [
        GroupInfo("alpha", "alpha1", 1),
        GroupInfo("zeta", "zeta0", 2),
    ]


# -- history ---------------------------------------------------------------------------------


async def test_history_counts_ends_and_what_workers_add(
    driver: RedisDriver, redis_url: str, queue: str
) -> None:
    await driver.push([job(queue, f"j{i}") for i in range(3)])
    held = await driver.reserve([queue], 3, 30, worker="w")
    await driver.ack(held[:2])
    assert await driver.cancel(held[2].id, queue)
    history = await driver.history(queue, 5)
    assert len(history) == 5
    now = history[-1].minute
    assert [m.minute for m in history] == list(range(now - 4, now + 1))
    assert abs(now - time.time() // 60) <= 1
    ended = sum(m.succeeded for m in history), sum(m.cancelled for m in history)
    assert ended == (2, 0)  # a running job's cancel is a request: it ends when its worker sees it
    # Two drivers add into the same minute at once: additions, never overwrites.
    settings = make_settings(redis_url=redis_url)
    async with RedisDriver("redis", settings) as other:
        rows: list[tuple[str, int, dict[str, int]]] = [
            (queue, now, {"started": 2, "waited": 1, "wait_ms": 40, "bogus": 9}),
            (queue, now - 2, {"ran": 3, "run_ms": 300}),
        ]
        await asyncio.gather(*(d.add_history(rows) for d in (driver, other) for _ in range(5)))
    history = await driver.history(queue, 3)
    assert history[-1].started == 20 and history[-1].wait_ms == 400 and history[-1].waited == 10
    assert history[0] == MinuteCounts(now - 2, ran=30, run_ms=3000)
    assert history[-1].mean_wait == 0.04
    key = f"{driver.keys(queue).counts}:{now - 2}"
    assert 10_700 <= await driver.client.ttl(key) <= 10_800
    long = await driver.history(queue, 5000)
    assert len(long) == 5000 and long[-1].minute == now and long[0].minute == now - 4999
    assert long[-3:] == history


async def test_add_history_refuses_bad_rows_and_ignores_empty_ones(
    driver: RedisDriver, queue: str
) -> None:
    await driver.add_history([])
    await driver.add_history([(queue, 1, {"started": 0, "other": 5})])
    assert await driver.client.exists(f"{driver.keys(queue).counts}:1") == 0
    with pytest.raises(ValueError, match=r"history field 'ran' of queue .* got -1"):
        await driver.add_history([(queue, 1, {"ran": -1})])
    with pytest.raises(ValueError, match="minute must be an integer, got '1'"):
        await driver.add_history([(queue, "1", {"ran": 1})])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="minutes must be an integer of at least 1"):
        await driver.history(queue, 0)


# -- one slot per queue ------------------------------------------------------------------------


async def test_observing_calls_stay_in_the_queues_slot(cluster_url: str) -> None:
    settings = make_settings(redis_url=cluster_url, redis_prefix="topiq")
    queue = f"q-{new_id()[:8]}"
    async with RedisDriver("redis", settings) as driver:
        slot_checked(driver)
        await driver.client.flushall()
        limit = Limit("dev", concurrency=1)
        await driver.push(
            [
                job(queue, "a", limit=limit),
                job(queue, "b", limit=limit),
                job(queue, "c", priority=3),
                job(queue, "d", at_front=True),
                job(queue, "e", delay=60),
                job(queue, "g1", group="g"),
                job(queue, "g2", group="g"),
            ]
        )
        await driver.push([job(queue, "f", depends_on=(Dependency("e", queue),))])
        held = await driver.reserve([queue], 2, 30, worker="w")
        assert [j.id for j in held] == ["d", "c"]
        held += await driver.reserve([queue], 1, 30, worker="w")
        assert [r.id for r in await driver.browse(queue, "pending")] == ["b", "g1", "g2"]
        assert [r.id for r in await driver.browse(queue, "delayed")] == ["e"]
        assert len(await driver.browse(queue, "reserved")) == 3
        assert [r.id for r in await driver.browse(queue, "deferred")] == ["f"]
        assert await driver.groups(queue) == [GroupInfo("g", "g1", 1)]
        await driver.ack(held)
        minute = int(time.time() // 60)
        await driver.add_history([(queue, minute, {"ran": 3}), ("other", minute, {"ran": 1})])
        history = await driver.history(queue, 2)
        assert sum(m.succeeded for m in history) == 3
        assert sum(m.ran for m in history) == 3
