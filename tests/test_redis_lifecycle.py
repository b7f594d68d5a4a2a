"""The Redis driver's job lifecycle, where it differs from other drivers (issue 12).

The behaviour every driver shares is in tests/conformance/test_lifecycle_*.py. Here: every key
of a queue in that queue's Redis Cluster slot (run on a one-node cluster that refuses any script
reaching another slot), `wait_ended` blocking on the server rather than polling, jobs written by
wave-1 code read right (and new pushes runnable by wave-1 scripts, for rolling deploys), records
that expire by themselves (PEXPIRE), and no extra round trip on the job path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from core.queue.drivers.base import Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.redis import _SCRIPTS, RedisDriver, _load_script
from core.status import Status
from tests.conftest import ROOT, flush_redis, make_settings
from tests.servers import PrivateServer, free_port

pytestmark = pytest.mark.timeout(60)

JOB = "tests.jobs:RecordJob"
#: The last release before issue 12: its scripts are what a worker not yet upgraded runs.
WAVE1 = "2c381ca"


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", JOB)
    fields.setdefault("max_tries", 3)
    return OutgoingJob(job_id, queue, orjson.dumps({"id": job_id}), **fields)


@pytest.fixture
async def driver(redis_url: str) -> AsyncIterator[RedisDriver]:
    flush_redis(redis_url)
    async with RedisDriver("redis", make_settings(redis_url=redis_url)) as opened:
        yield opened


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10.0) -> None:
    """Wait for a state of the Redis server (it offers no event to await): checks every 10 ms."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def command_calls(client: aioredis.Redis, command: str) -> int:
    """How many times the server has run `command` since it started (INFO commandstats)."""
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# -- one slot per queue ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Redis Cluster serving every slot: it enforces slot rules on every command."""
    binary = shutil.which("redis-server", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path_factory.mktemp("redis-cluster")
    port = free_port()
    argv = [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)),
        *("--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf")),
        # The bus port defaults to the port + 10000, which a free port above 55535 cannot have.
        *("--cluster-port", str(free_port())),
        *("--save", "", "--appendonly", "no"),
    ]
    server = PrivateServer("redis-cluster", argv, port, workdir)
    try:
        server.wait_listening()
        import redis

        admin = redis.Redis(port=port)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):  # type: ignore[no-untyped-call]
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        admin.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


def slot_checked(driver: RedisDriver) -> None:
    """Load the driver's scripts with a `#!lua` line: on a cluster node, Redis 7 then refuses
    any key a script touches outside the slot of its KEYS (plain scripts are not checked)."""
    driver._scripts = {
        name: driver.client.register_script("#!lua\n" + _load_script(name)) for name in _SCRIPTS
    }


async def test_the_slot_check_refuses_a_script_reaching_another_slot(cluster_url: str) -> None:
    client = aioredis.Redis.from_url(cluster_url)
    try:
        reach = client.register_script("#!lua\nreturn redis.call('GET', 'x{other}')")
        with pytest.raises(Exception, match="do not hash to the same slot"):
            await reach(keys=["x{mine}"])
    finally:
        await client.aclose()


async def test_a_queues_lifecycle_stays_in_its_slot(cluster_url: str) -> None:
    settings = make_settings(redis_url=cluster_url, redis_prefix="topiq")
    first, second = f"q1-{new_id()[:8]}", f"q2-{new_id()[:8]}"
    async with RedisDriver("redis", settings) as driver:
        slot_checked(driver)
        await driver.client.flushall()
        a, b, c, d, e = (new_id() for _ in range(5))
        pushed = await driver.push(
            [
                outgoing(a, first, unique_key="dev:1", unique_for=60),
                outgoing(b, first, at_front=True, check_id=True),
                outgoing(c, first, delay=30, at_front=True),
                outgoing(d, first, ttl=0.001),
                outgoing(e, second, unique_key="dev:1", on_duplicate="replace"),
                outgoing(a, first, check_id=True, on_duplicate="keep"),
            ]
        )
        assert [p.outcome for p in pushed] == [*["created"] * 5, "kept"]
        await asyncio.sleep(0.01)  # d's ttl runs out
        held = await driver.reserve([first], 5, 30, worker="w1")
        assert [j.id for j in held if j.expired] == [d]  # d expired (handed back: issue 14)
        held = [j for j in held if not j.expired]
        assert sorted(j.id for j in held) == sorted([a, b])  # c is delayed
        [ja] = [j for j in held if j.id == a]
        [jb] = [j for j in held if j.id == b]
        await driver.extend([(ja, 30)])
        assert await driver.cancel(a)  # running: a request, found without the queue
        assert await driver.cancel_requested(held) == [a]
        await driver.release(jb, 0.0, error="boom")
        assert await driver.cancel(c, first)  # waiting: removed
        ja.outcome = Outcome(Status.CANCELLED, 60)
        [jb] = await driver.reserve([first], 1, 30, ack=[ja], worker="w1")
        jb.outcome = Outcome(Status.SUCCEEDED, 60, result=b"[1]")
        await driver.ack([jb])
        assert (await driver.wait_ended(b, first, 5)).status is Status.SUCCEEDED  # type: ignore[union-attr]
        assert (await driver.wait_ended(a, None, 5)).status is Status.CANCELLED  # type: ignore[union-attr]
        assert (await driver.job_status(d)).status is Status.EXPIRED  # type: ignore[union-attr]
        recent = await driver.recent(first)
        assert (recent.succeeded, recent.cancelled, recent.expired) == (1, 2, 1)
        await driver.wait([second], 0.01)
        assert await driver.clear(second) == 1
        assert (await driver.stats(first)).size == 0

        keys = [key.decode() async for key in driver.client.scan_iter()]
        for key in keys:
            if key in ("topiq:queues",):
                continue
            tag = key[key.index("{") + 1 : key.index("}")]
            assert tag in (f"topiq:{first}", f"topiq:{second}"), key
        # The record, unique key, counts and done token of the first queue are in its tag.
        assert f"topiq:{{topiq:{first}}}:job:{b}" in keys
        assert f"topiq:{{topiq:{first}}}:unique:dev:1" in keys
        assert any(k.startswith(f"topiq:{{topiq:{first}}}:counts:") for k in keys)


# -- waiting for the end on the server ------------------------------------------------------


async def test_wait_ended_blocks_on_the_server_and_every_waiter_wakes_at_the_ack(
    driver: RedisDriver, queue: str, redis_url: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [job] = await driver.reserve([queue], 1, 60, worker="w1")
    async with RedisDriver("redis", make_settings(redis_url=redis_url)) as other:
        waiters = [
            asyncio.create_task(other.wait_ended(job_id, queue, 30)),
            asyncio.create_task(driver.wait_ended(job_id, None, 30)),
        ]
        marker = driver.keys(queue).tag + f":waiter:{job_id}"
        await until(lambda: driver.client.exists(marker), "a waiter's mark")
        reads = await command_calls(driver.client, "evalsha")
        blpops = await command_calls(driver.client, "blpop")
        await asyncio.sleep(2.2)  # nothing happens: the waiters must stay quiet meanwhile
        # At most one read of the record per waiter per second (plus the one in flight).
        assert await command_calls(driver.client, "evalsha") - reads <= 2 * 3
        assert await command_calls(driver.client, "blpop") - blpops <= 2 * 3
        assert not any(w.done() for w in waiters)
        job.outcome = Outcome(Status.SUCCEEDED, 60, result=b'{"ok":true}')
        acked = time.monotonic()
        await driver.ack([job])
        records = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        woke = time.monotonic() - acked
    print(f"both waiters woke {woke * 1000:.0f} ms after the ack")
    assert woke < 0.5  # a token woke them, not their next one-second re-read
    assert [r.status if r else None for r in records] == [Status.SUCCEEDED] * 2
    assert [r.value() if r else None for r in records] == [{"ok": True}] * 2


async def test_a_lost_token_costs_at_most_a_second(driver: RedisDriver, queue: str) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [job] = await driver.reserve([queue], 1, 60)
    waiter = asyncio.create_task(driver.wait_ended(job_id, queue, 30))
    k = driver.keys(queue)
    await until(lambda: driver.client.exists(f"{k.tag}:waiter:{job_id}"), "the waiter's mark")
    await driver.client.delete(f"{k.tag}:waiter:{job_id}")  # the ack will see no waiter
    started = time.monotonic()
    await driver.ack([job])
    record = await asyncio.wait_for(waiter, 5)
    assert record is not None and record.status is Status.SUCCEEDED
    assert time.monotonic() - started < 1.5


async def test_a_done_token_of_an_earlier_job_with_the_id_wakes_no_one(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [job] = await driver.reserve([queue], 1, 60)
    assert (await driver.wait_ended(job_id, queue, 0.05)).status is Status.RUNNING  # type: ignore[union-attr]
    await driver.ack([job])  # leaves a token: someone was marked as waiting
    assert await driver.client.exists(driver.keys(queue).done(job_id))
    await driver.push([outgoing(job_id, queue, check_id=True)])  # the id is free again
    assert not await driver.client.exists(driver.keys(queue).done(job_id))
    started = time.monotonic()
    record = await driver.wait_ended(job_id, queue, 0.3)
    assert record is not None and record.status is Status.QUEUED
    assert time.monotonic() - started >= 0.29


# -- rolling deploys: wave-1 code beside this one -------------------------------------------


def wave1_script(name: str) -> str:
    """A Lua script as the wave-1 release shipped it (from this repository's history)."""
    return subprocess.run(
        ["git", "show", f"{WAVE1}:core/queue/drivers/lua/{name}.lua"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def wave1_payload(job_id: str, queue: str) -> bytes:
    envelope = {
        "id": job_id,
        "job": "tests.jobs:OldJob",
        "queue": queue,
        "data": {},
        "max_tries": 4,
        "timeout": 60,
        "retry_after": 0,
        "created_at": 1_700_000_000_000,
    }
    return orjson.dumps(envelope)


async def test_jobs_pushed_by_wave1_code_read_right_and_run(
    driver: RedisDriver, queue: str
) -> None:
    k = driver.keys(queue)
    push = driver.client.register_script(wave1_script("push"))
    ready, later = new_id(), new_id()
    await driver.client.sadd(f"{driver.prefix}:queues", queue)  # as the wave-1 driver does
    await push(
        keys=[k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved],
        args=[ready, wave1_payload(ready, queue), 0, later, wave1_payload(later, queue), 60_000],
    )
    now = time.time()
    record = await driver.job_status(ready, queue)
    assert record is not None
    assert (record.status, record.job, record.max_tries, record.attempts) == (
        Status.QUEUED,
        "tests.jobs:OldJob",
        4,
        0,
    )
    assert record.enqueued_at == 1_700_000_000.0
    scheduled = await driver.job_status(later)  # found without its queue, too
    assert scheduled is not None and scheduled.status is Status.SCHEDULED
    assert scheduled.queue == queue
    assert scheduled.due_at is not None and now + 55 < scheduled.due_at < now + 65

    [job] = await driver.reserve([queue], 1, 30, worker="w-new")
    running = await driver.job_status(ready, queue)
    assert running is not None
    assert (running.status, running.worker, running.attempts) == (Status.RUNNING, "w-new", 1)
    await driver.release(job, 60, error="RuntimeError: once")
    retrying = await driver.job_status(ready, queue)
    assert retrying is not None and retrying.status is Status.RETRYING
    assert retrying.error == "RuntimeError: once"

    assert await driver.cancel(later, queue)
    cancelled = await driver.job_status(later, queue)
    assert cancelled is not None and cancelled.status is Status.CANCELLED
    pttl = await driver.client.pttl(k.record(later))
    assert 0 < pttl <= driver.settings.queue_failure_ttl * 1000


async def test_a_wave1_job_without_a_record_reads_from_where_it_is(
    driver: RedisDriver, queue: str
) -> None:
    k = driver.keys(queue)
    job_id = new_id()
    # What wave-1 code leaves for a job released for a retry: payload, tries, a due time.
    await driver.client.hset(k.payloads, job_id, wave1_payload(job_id, queue))
    await driver.client.hset(k.attempts, job_id, 2)
    await driver.client.zadd(k.delayed, {job_id: int(time.time() * 1000) + 60_000})
    record = await driver.job_status(job_id, queue)
    assert record is not None
    assert (record.status, record.attempts, record.job) == (Status.RETRYING, 2, "tests.jobs:OldJob")
    await driver.client.zrem(k.delayed, job_id)
    await driver.client.zadd(k.reserved, {job_id: int(time.time() * 1000) + 60_000})
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING
    assert record.started_at is None and record.worker == ""


async def test_a_new_push_runs_on_wave1_scripts(driver: RedisDriver, queue: str) -> None:
    k = driver.keys(queue)
    reserve = driver.client.register_script(wave1_script("reserve"))
    ack = driver.client.register_script(wave1_script("ack"))
    job_id = new_id()
    [pushed] = await driver.push([outgoing(job_id, queue, unique_key="k", at_front=True)])
    assert pushed.outcome == "created"
    reply = await reserve(
        keys=[k.ready, k.delayed, k.reserved, k.payloads, k.attempts, k.wake],
        args=[1, 30_000, 0],
    )
    assert [reply[1].decode(), orjson.loads(reply[2]), int(reply[3])] == [
        job_id,
        {"id": job_id},
        1,
    ]
    assert await ack(keys=[k.reserved, k.payloads, k.attempts], args=[job_id, 1]) == 1
    assert (await driver.stats(queue)).size == 0
    # The wave-1 ack wrote no outcome: the record stays as the new push left it (documented).
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.QUEUED


# -- records expire by themselves ----------------------------------------------------------


async def test_records_expire_by_pexpire_and_zero_deletes(driver: RedisDriver, queue: str) -> None:
    k = driver.keys(queue)
    kept, gone, waiting = new_id(), new_id(), new_id()
    await driver.push([outgoing(kept, queue), outgoing(gone, queue)])
    await driver.push([outgoing(waiting, queue, delay=60, failure_ttl=120)])
    assert await driver.client.pttl(k.record(kept)) == -1  # a live job's record never expires
    jobs = await driver.reserve([queue], 2, 30)
    for job in jobs:
        keep = 30 if job.id == kept else 0
        job.outcome = Outcome(Status.SUCCEEDED, keep, result=b"1")
    await driver.ack(jobs)
    assert 29_000 < await driver.client.pttl(k.record(kept)) <= 30_000
    assert not await driver.client.exists(k.record(gone))
    assert await driver.job_status(gone, queue) is None
    assert await driver.cancel(waiting, queue)
    assert 119_000 < await driver.client.pttl(k.record(waiting)) <= 120_000
    [counts] = [key async for key in driver.client.scan_iter(f"{k.counts}:*")]
    assert 0 < await driver.client.ttl(counts) <= 10800  # the window is kept well over 2 h
    assert await driver.prune_records() == 0


async def test_a_record_kept_briefly_is_gone_when_its_time_ends(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [job] = await driver.reserve([queue], 1, 30)
    job.outcome = Outcome(Status.FAILED, 0.2, error="ValueError: x", traceback="tb")
    await driver.ack([job])
    record = await driver.job_status(job_id, queue)
    assert record is not None and (record.status, record.error) == (Status.FAILED, "ValueError: x")
    k = driver.keys(queue)

    async def gone() -> bool:
        return not await driver.client.exists(k.record(job_id))

    await until(gone, "the record to expire")
    assert await driver.job_status(job_id, queue) is None


# -- the hot path ---------------------------------------------------------------------------


async def test_the_job_path_costs_no_extra_round_trip(
    driver: RedisDriver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await driver.push([outgoing(new_id(), queue)])  # the queue is now known: no SADD
    [first] = await driver.reserve([queue], 1, 30)
    sent: list[bytes] = []
    send = aioredis.connection.AbstractConnection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(command if isinstance(command, bytes) else b"".join(command))
        await send(self, command, check_health)

    monkeypatch.setattr(aioredis.connection.AbstractConnection, "send_packed_command", counting)
    await driver.push([outgoing(new_id(), queue, unique_key=f"k{i}") for i in range(10)])
    jobs = await driver.reserve([queue], 10, 30, ack=[first], worker="w")
    for job in jobs:
        job.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    await driver.ack(jobs)
    assert len(jobs) == 10
    # One round trip per call, whatever the number of jobs: a single EVALSHA each.
    assert len(sent) == 3
    assert all(b"EVALSHA" in command for command in sent)


async def test_cancel_requested_is_one_round_trip_and_cleared_at_the_ack(
    driver: RedisDriver, queue: str
) -> None:
    ids = [new_id() for _ in range(3)]
    await driver.push([outgoing(i, queue) for i in ids])
    held: list[ReservedJob] = await driver.reserve([queue], 3, 30)
    assert await driver.cancel(ids[1], queue)
    calls = await command_calls(driver.client, "smismember")
    assert await driver.cancel_requested(held) == [ids[1]]
    assert await command_calls(driver.client, "smismember") - calls == 1
    [cancelled] = [j for j in held if j.id == ids[1]]
    cancelled.outcome = Outcome(Status.CANCELLED, 60)
    await driver.ack([cancelled])
    assert not await driver.client.sismember(driver.keys(queue).cancel, ids[1])
    assert await driver.cancel_requested(held) == []


async def test_a_release_of_a_job_asked_to_cancel_cancels_it(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    [job] = await driver.reserve([queue], 1, 30)
    assert await driver.cancel(job_id, queue)
    await driver.release(job, 0, error="RuntimeError: raced the cancel")
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.CANCELLED
    assert await driver.reserve([queue], 1, 30) == []
    assert (await driver.recent(queue)).cancelled == 1


async def test_a_poll_cancelled_mid_command_stops(driver: RedisDriver, queue: str) -> None:
    # redis-py may finish a command whose task was cancelled and drop the cancel: the polls a
    # worker cancels to stop (cancel_requested, wait_ended) must stop all the same.
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await driver.reserve([queue], 1, 60)

    async def poll_cancels() -> None:
        while True:
            try:
                await driver.cancel_requested(held)
            except Exception:  # as a worker's poll does: a failed poll is retried
                continue
            await asyncio.sleep(0)

    async def wait_end() -> None:
        while True:
            await driver.wait_ended(job_id, queue, 0.001)
            await asyncio.sleep(0)

    for poll in (poll_cancels, wait_end):
        for delay in range(100):
            task = asyncio.create_task(poll())
            await asyncio.sleep(delay / 100_000)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, f"{poll.__name__} went on after its cancel (try {delay})"


async def test_a_due_job_reads_queued_before_any_reserve_moves_it(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, delay=0.05)])
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.SCHEDULED
    await asyncio.sleep(0.1)  # the due time passes; no reserve runs
    assert await driver.client.zscore(driver.keys(queue).delayed, job_id) is not None
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.QUEUED
