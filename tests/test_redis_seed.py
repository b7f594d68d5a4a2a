"""The Redis driver's additions of issue #16, where they are Redis's own.

The behaviour every driver shares is in tests/conformance/test_seed_driver.py. Here:
`save_payload` as one script call that checks the try's token and the reserved set (a lease
taken over, an ack, a release), read by every later reader of `<tag>:payloads`; an outcome's
info as the record's `info` field, sent to ack.lua only by calls that carry some (the plain
path's arguments unchanged), through `ack` and through `reserve(ack=)`; `prune_records` by SCAN
of each queue's records, one slot per script call (checked on a one-node cluster), page after
page, the `done` token with the record, queue names that are glob patterns taken literally, and
prune.lua reading each record again (a record rewritten after the SCAN is kept).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from core.queue.drivers.base import Dependency, Outcome, OutgoingJob, ReservedJob
from core.queue.drivers.redis import _PRUNE_PAGE, RedisDriver
from core.status import Status
from tests.conftest import flush_redis, make_settings
from tests.test_redis_lifecycle import cluster_url, slot_checked, until

__all__ = ["cluster_url"]  # the one-node cluster fixture, used here too

pytestmark = pytest.mark.timeout(60)

JOB = "tests.jobs:RecordJob"


def new_id() -> str:
    return uuid.uuid4().hex


def outgoing(job_id: str, queue: str, **fields: Any) -> OutgoingJob:
    fields.setdefault("job", JOB)
    fields.setdefault("max_tries", 3)
    return OutgoingJob(job_id, queue, orjson.dumps({"step": 0}), **fields)


def step(n: int) -> bytes:
    return orjson.dumps({"step": n, "workspace": {"done": list(range(n))}})


def info(description: str | None = None, meta: dict[str, Any] | None = None) -> bytes:
    data: dict[str, Any] = {}
    if description is not None:
        data["description"] = description
    if meta is not None:
        data["meta"] = meta
    return orjson.dumps(data)


@pytest.fixture
async def driver(redis_url: str) -> AsyncIterator[RedisDriver]:
    flush_redis(redis_url)
    async with RedisDriver("redis", make_settings(redis_url=redis_url)) as opened:
        yield opened


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


async def reserve_one(
    driver: RedisDriver, queue: str, job_id: str, lease: float = 30
) -> ReservedJob:
    held = await driver.reserve([queue], 1, lease)
    assert [h.id for h in held] == [job_id], held
    return held[0]


async def stored_payload(driver: RedisDriver, queue: str, job_id: str) -> bytes | None:
    raw = await driver.client.hget(driver.keys(queue).payloads, job_id)
    return raw.encode() if isinstance(raw, str) else raw


class Sent:
    """The commands the driver's connections send (every packed command, in order)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[bytes] = []
        send = aioredis.connection.AbstractConnection.send_packed_command

        async def counting(conn: Any, command: Any, check_health: bool = True) -> None:
            self.commands.append(command if isinstance(command, bytes) else b"".join(command))
            await send(conn, command, check_health)

        monkeypatch.setattr(aioredis.connection.AbstractConnection, "send_packed_command", counting)


# -- save_payload -----------------------------------------------------------------------------


async def test_save_payload_writes_while_held_in_one_round_trip(
    driver: RedisDriver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    # The script's first call on a server loads it (NOSCRIPT, SCRIPT LOAD): later ones do not.
    assert await driver.save_payload(held, step(0)) is True
    sent = Sent(monkeypatch)
    assert await driver.save_payload(held, step(1)) is True
    assert len(sent.commands) == 1 and b"EVALSHA" in sent.commands[0]
    assert await stored_payload(driver, queue, job_id) == step(1)
    assert await driver.job_payload(job_id, queue) == step(1)
    assert await driver.job_payload(job_id) == step(1)  # queue:job's read, queue unknown
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.RUNNING  # the record is untouched


async def test_a_retry_reads_the_saved_payload_and_the_old_try_cannot_write(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    first = await reserve_one(driver, queue, job_id)
    assert await driver.save_payload(first, step(2)) is True
    await driver.release(first, 0, error="ValueError: step 3")
    # Released: the token is still 1, but the job is no longer in the reserved set.
    assert await driver.client.hget(driver.keys(queue).attempts, job_id) == b"1"
    assert await driver.save_payload(first, step(9)) is False
    second = await reserve_one(driver, queue, job_id)
    assert (second.attempts, second.payload) == (2, step(2))
    assert await driver.save_payload(first, step(9)) is False  # an older try's token
    assert await driver.save_payload(second, step(3)) is True
    await driver.release(second, 30, error="later")  # a delayed retry
    assert await driver.save_payload(second, step(9)) is False
    assert await stored_payload(driver, queue, job_id) == step(3)


async def test_save_payload_after_the_lease_was_taken_over_is_refused(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue, max_tries=1)])
    lost = await reserve_one(driver, queue, job_id, lease=0.05)
    assert await driver.save_payload(lost, step(1)) is True
    taken: list[ReservedJob] = []

    async def redelivered() -> bool:
        taken.extend(await driver.reserve([queue], 1, 30))
        return bool(taken)

    await until(redelivered, "the lost lease's redelivery")
    [again] = taken
    # The redelivery carries the checkpoint; past max_tries (1) the worker fails it with
    # this payload in its failed-store record.
    assert (again.id, again.attempts, again.payload) == (job_id, 2, step(1))
    assert await driver.save_payload(lost, step(9)) is False
    assert await driver.save_payload(again, step(2)) is True
    again.outcome = Outcome(Status.FAILED, 60, error="E")
    await driver.ack([again])
    assert await driver.save_payload(again, step(9)) is False  # acknowledged
    assert await stored_payload(driver, queue, job_id) is None


async def test_save_payload_after_an_ack_in_reserve_is_refused(
    driver: RedisDriver, queue: str
) -> None:
    job_id, other = new_id(), new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    await driver.push([outgoing(other, queue)])
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    await driver.reserve([queue], 1, 30, ack=[held])
    assert await driver.save_payload(held, step(1)) is False
    assert await stored_payload(driver, queue, job_id) is None
    assert not await driver.client.hexists(driver.keys(queue).payloads, job_id)


async def test_save_payload_and_prune_stay_in_the_queues_slot(cluster_url: str) -> None:
    settings = make_settings(redis_url=cluster_url, redis_prefix="topiq")
    name = f"q-{new_id()[:8]}"
    async with RedisDriver("redis", settings) as driver:
        slot_checked(driver)
        await driver.client.flushall()
        a, b = new_id(), new_id()
        await driver.push([outgoing(a, name), outgoing(b, name)])
        held = {h.id: h for h in await driver.reserve([name], 2, 30)}
        assert await driver.save_payload(held[a], step(1)) is True
        held[a].outcome = Outcome(Status.SUCCEEDED, 3600, result=b"1", info=info("d"))
        held[b].outcome = Outcome(Status.FAILED, 3600, error="E", info=info(meta={"k": 1}))
        waiter = asyncio.create_task(driver.wait_ended(a, name, 10))
        await until(
            lambda: driver.client.exists(f"{driver.keys(name).tag}:waiter:{a}"), "a's waiter"
        )
        await driver.ack(list(held.values()))
        record = await waiter
        assert record is not None and record.description == "d"
        assert await driver.prune_records(ended_before=time.time() + 60) == 2
        assert await driver.job_status(a, name) is None


# -- Outcome.info -----------------------------------------------------------------------------


async def test_info_round_trips_on_succeeded_failed_and_cancelled(
    driver: RedisDriver, queue: str
) -> None:
    ok, bad, stop = new_id(), new_id(), new_id()
    await driver.push([outgoing(ok, queue), outgoing(bad, queue), outgoing(stop, queue)])
    held = {h.id: h for h in await driver.reserve([queue], 3, 30)}
    meta = {"progress": 0.5, "names": ["a", "é"], "nested": {"k": None}}
    held[ok].outcome = Outcome(Status.SUCCEEDED, 60, result=b"1", info=info("words", meta))
    held[bad].outcome = Outcome(Status.FAILED, 60, error="E", info=info("fails"))
    held[stop].outcome = Outcome(Status.CANCELLED, 60, info=info(meta={"stopped": True}))
    await driver.ack(list(held.values()))
    seen = {job_id: await driver.job_status(job_id, queue) for job_id in held}
    assert {j: (r.status, r.description, r.meta) for j, r in seen.items() if r} == {
        ok: (Status.SUCCEEDED, "words", meta),
        bad: (Status.FAILED, "fails", None),
        stop: (Status.CANCELLED, "", {"stopped": True}),
    }
    # The record's field is the outcome's bytes, as sent.
    assert await driver.client.hget(driver.keys(queue).record(bad), "info") == info("fails")


async def test_info_through_reserve_acks_mixed_with_plain_outcomes(
    driver: RedisDriver, queue: str
) -> None:
    ids = [new_id() for _ in range(4)]
    await driver.push([outgoing(job_id, queue) for job_id in ids])
    held = await driver.reserve([queue], 4, 30)
    # Two share the default outcome, one has a result, one has info: one call, one script.
    held[0].outcome = None
    held[1].outcome = None
    held[2].outcome = Outcome(Status.SUCCEEDED, 60, result=b"[2]")
    held[3].outcome = Outcome(Status.SUCCEEDED, 60, result=b"[3]", info=info("fourth", {"n": 4}))
    await driver.push([outgoing(new_id(), queue)])
    await driver.reserve([queue], 1, 30, ack=held)
    records = [await driver.job_status(job_id, queue) for job_id in ids]
    assert [(r.status, r.description, r.meta) for r in records if r] == [
        (Status.SUCCEEDED, "", None),
        (Status.SUCCEEDED, "", None),
        (Status.SUCCEEDED, "", None),
        (Status.SUCCEEDED, "fourth", {"n": 4}),
    ]
    assert [r.result for r in records if r] == [None, None, b"[2]", b"[3]"]
    record_keys = [driver.keys(queue).record(job_id) for job_id in ids[:3]]
    assert [await driver.client.hexists(key, "info") for key in record_keys] == [False] * 3


async def test_acks_without_info_send_the_arguments_of_before(driver: RedisDriver) -> None:
    jobs = [ReservedJob(new_id(), "q", b"{}", 1) for _ in range(3)]
    jobs[1].outcome = Outcome(Status.SUCCEEDED, 60, result=b"1")
    jobs[2].outcome = Outcome(Status.FAILED, 60, error="E", traceback="tb")
    args = driver._ack_args(jobs)
    # Three outcomes of 5 (no info field), three rows of 3.
    assert args[0] == 3 and len(args) == 1 + 3 * 5 + 3 * 3
    jobs[2].outcome = Outcome(Status.FAILED, 60, error="E", traceback="tb", info=info("x"))
    args = driver._ack_args(jobs)
    assert args[0] == -3 and len(args) == 1 + 3 * 6 + 3 * 3
    assert args[1:7][5] == b"" and args[13:19][5] == info("x")


async def test_info_that_is_not_a_valid_object_reads_as_none_and_never_raises(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    held.outcome = Outcome(Status.SUCCEEDED, 60, result=b"1", info=info("fine"))
    await driver.ack([held])
    key = driver.keys(queue).record(job_id)
    for raw, expected in [
        (b"\xff\xfe not json", ("", None)),
        (b"", ("", None)),
        (b"null", ("", None)),
        (orjson.dumps({"description": ["x"], "meta": {"ok": 1}}), ("", {"ok": 1})),
    ]:
        await driver.client.hset(key, "info", raw)
        record = await driver.job_status(job_id, queue)
        assert record is not None and record.status is Status.SUCCEEDED
        assert (record.description, record.meta) == expected, raw


# -- prune_records(ended_before=) -------------------------------------------------------------


async def ended_jobs(driver: RedisDriver, queue: str, n: int, keep: float = 3600) -> list[str]:
    """Push, reserve and acknowledge `n` jobs (succeeded, kept `keep` seconds)."""
    ids = [new_id() for _ in range(n)]
    await driver.push([outgoing(job_id, queue) for job_id in ids])
    held = await driver.reserve([queue], n, 30)
    assert len(held) == n
    for job in held:
        job.outcome = Outcome(Status.SUCCEEDED, keep, result=b"1")
    await driver.ack(held)
    return ids


async def server_ms(driver: RedisDriver) -> int:
    seconds, micros = await driver.client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_prune_deletes_only_old_ended_records_and_keeps_recent_and_waiting_ones(
    driver: RedisDriver, queue: str
) -> None:
    old = await ended_jobs(driver, queue, 3)
    cancelled, member, batch = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(cancelled, queue, failure_ttl=3600),
            outgoing(member, queue),
            OutgoingJob(
                batch,
                queue,
                b"",
                kind="batch",
                depends_on=(Dependency(member),),
                rule="ended",
                failure_ttl=3600,
            ),
        ]
    )
    assert await driver.cancel(cancelled, queue)
    [m] = await driver.reserve([queue], 1, 30)
    m.outcome = Outcome(Status.FAILED, 3600, error="E")
    await driver.ack([m])
    batch_record = await driver.job_status(batch, queue)
    assert batch_record is not None and batch_record.status is Status.FAILED
    old += [cancelled, member, batch]
    ends = [await driver.client.hget(driver.keys(queue).record(j), "ended_at") for j in old]
    last_old = max(int(end or 0) for end in ends)

    async def past_the_old_ends() -> bool:
        return await server_ms(driver) > last_old + 1

    await until(past_the_old_ends, "the server's clock to pass the old ends")
    cutoff = (last_old + 1) / 1000
    recent = await ended_jobs(driver, queue, 2)
    waiting, scheduled, running = new_id(), new_id(), new_id()
    await driver.push([outgoing(running, queue)])
    await reserve_one(driver, queue, running)
    await driver.push([outgoing(waiting, queue), outgoing(scheduled, queue, delay=60)])
    deferred = new_id()
    await driver.push([outgoing(deferred, queue, depends_on=(Dependency(running),))])

    assert await driver.prune_records(ended_before=cutoff) == len(old)
    for job_id in old:
        assert not await driver.client.exists(driver.keys(queue).record(job_id)), job_id
    statuses = {j: (await driver.job_status(j, queue)) for j in [*recent, waiting, scheduled]}
    assert [r.status for r in statuses.values() if r] == [
        Status.SUCCEEDED,
        Status.SUCCEEDED,
        Status.QUEUED,
        Status.SCHEDULED,
    ]
    # A cutoff far ahead: only the ended go, never a waiting, running or deferred job.
    assert await driver.prune_records(ended_before=time.time() + 3600) == 2
    live = {j: await driver.job_status(j, queue) for j in (waiting, scheduled, running, deferred)}
    assert {j: r.status for j, r in live.items() if r} == {
        waiting: Status.QUEUED,
        scheduled: Status.SCHEDULED,
        running: Status.RUNNING,
        deferred: Status.DEFERRED,
    }
    assert await driver.prune_records(ended_before=time.time() + 3600) == 0
    assert await driver.prune_records() == 0


async def test_prune_reads_every_scan_page_of_every_queue(driver: RedisDriver) -> None:
    first, second = f"a-{new_id()[:8]}", f"b-{new_id()[:8]}"
    many = _PRUNE_PAGE * 2 + 17
    await ended_jobs(driver, first, many)
    await ended_jobs(driver, second, 5)
    keep = await ended_jobs(driver, second, 1, keep=0)  # deleted at the ack already
    assert await driver.job_status(keep[0], second) is None
    calls: list[int] = []
    prune = driver._scripts["prune"]

    async def counting(keys: list[Any], args: list[Any]) -> Any:
        calls.append(len(keys))
        return await prune(keys=keys, args=args)

    driver._scripts["prune"] = counting  # type: ignore[assignment]
    assert await driver.prune_records(ended_before=time.time() + 60) == many + 5
    assert sum(calls) == many + 5 and len(calls) >= 3
    for name in (first, second):
        assert [k async for k in driver.client.scan_iter(f"{driver.keys(name).tag}:job:*")] == []


async def test_prune_deletes_the_done_token_with_the_record(
    driver: RedisDriver, queue: str
) -> None:
    job_id = new_id()
    await driver.push([outgoing(job_id, queue)])
    held = await reserve_one(driver, queue, job_id)
    await driver.job_status(job_id, queue)
    k = driver.keys(queue)
    waiter = asyncio.create_task(driver.wait_ended(job_id, queue, 10))
    await until(lambda: driver.client.exists(f"{k.tag}:waiter:{job_id}"), "the waiter's mark")
    held.outcome = Outcome(Status.SUCCEEDED, 3600, result=b"1")
    await driver.ack([held])
    assert (await waiter) is not None
    assert await driver.client.exists(k.done(job_id))  # the token outlives the wait (60 s)
    assert await driver.prune_records(ended_before=time.time() + 60) == 1
    assert not await driver.client.exists(k.record(job_id), k.done(job_id))


async def test_queue_names_that_are_glob_patterns_are_taken_literally(
    driver: RedisDriver,
) -> None:
    pattern, plain = "q[ab]*?", "qa-x"
    await ended_jobs(driver, pattern, 2)
    await ended_jobs(driver, plain, 3)
    scanned: list[list[str]] = []
    prune = driver._scripts["prune"]

    async def recording(keys: list[Any], args: list[Any]) -> Any:
        scanned.append([(k.decode() if isinstance(k, bytes) else k) for k in keys])
        return await prune(keys=keys, args=args)

    driver._scripts["prune"] = recording  # type: ignore[assignment]
    assert await driver.prune_records(ended_before=time.time() + 60) == 5
    # Each call got only its queue's records (one slot each): the pattern matched no other.
    for keys in scanned:
        tags = {key[: key.index("}") + 1] for key in keys}
        assert len(tags) == 1, keys
    assert sorted(len(keys) for keys in scanned) == [2, 3]


async def test_prune_reads_each_record_again_a_rewritten_one_is_kept(
    driver: RedisDriver, queue: str
) -> None:
    # The SCAN saw the ended record; before the script ran, the id was pushed again.
    [job_id] = await ended_jobs(driver, queue, 1)
    k = driver.keys(queue)
    await driver.push([outgoing(job_id, queue, check_id=True)])
    prune = driver._scripts["prune"]
    future = repr((time.time() + 60) * 1000)
    assert await prune(keys=[k.record(job_id)], args=[k.tag, future]) == 0
    record = await driver.job_status(job_id, queue)
    assert record is not None and record.status is Status.QUEUED
    # A record ended with its payload still stored (a late ack of a job pushed again) is kept.
    await driver.client.hset(k.record(job_id), mapping={"status": "succeeded", "ended_at": 1})
    assert await prune(keys=[k.record(job_id)], args=[k.tag, future]) == 0
    # A key of another tag handed to it (never by SCAN: its pattern is the tag's) is left.
    other = driver.keys(f"{queue}-other")
    [elsewhere] = await ended_jobs(driver, f"{queue}-other", 1)
    assert await prune(keys=[other.record(elsewhere)], args=[k.tag, future]) == 0
    assert await driver.client.exists(other.record(elsewhere))


async def test_prune_refuses_a_cutoff_that_is_not_a_time(driver: RedisDriver) -> None:
    with pytest.raises(TypeError, match="ended_before must be epoch seconds"):
        await driver.prune_records(ended_before="14d")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nan"):
        await driver.prune_records(ended_before=float("nan"))
