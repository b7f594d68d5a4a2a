"""Reviewer R1 (issue #17): trying to break the cluster relay as an unlucky operator and a
hostile sender would. Each defect found is a test marked xfail(strict=True) naming it (the
owner removes the mark with the fix); what held stays as a plain regression test.

Everything runs on the session's private Redis Cluster (3 primaries, 3 replicas) with queues
on different primaries, except the differential tests, which run one scenario on a single
Redis and on the cluster and compare what each answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.queue.drivers import Outcome, OutgoingJob, create_driver
from core.queue.drivers.base import Dependency
from core.queue.drivers.redis import RedisDriver
from core.queue.drivers.redis_relay import Outboxes, deliver
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.workflows import batch, chain
from tests import cluster_support
from tests.cluster_support import spread_queues
from tests.conftest import Backend, _backend
from tests.jobs import RecordJob, events
from tests.processes import WorkerProcess, wait_until

#: The cluster backend and a driver on it, as this module's `backend` and `driver`.
backend = cluster_support.backend
driver = cluster_support.driver

pytestmark = [pytest.mark.timeout(120)]


def job(id_: str, queue: str, *deps: tuple[str, str], **kw: Any) -> OutgoingJob:
    return OutgoingJob(
        id_,
        queue,
        b"{}",
        job="tests.jobs:RecordJob",
        depends_on=tuple(Dependency(d, q) for d, q in deps),
        **kw,
    )


async def run_one(driver: RedisDriver, queue: str, status: Status = Status.SUCCEEDED) -> str:
    """Reserve one job of `queue` and ack it with `status` (as a worker would)."""
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(status, 60, result=b"1")
    await driver.ack([held])
    return held.id


async def lost_ack(
    driver: RedisDriver, queue: str, status: Status = Status.SUCCEEDED
) -> list[bytes]:
    """ack.lua of one reserved job of `queue`, without the delivery that follows it: what a
    worker killed between the two leaves (its messages in the queue's outbox)."""
    [held] = await driver.reserve([queue], 1, lease=30)
    held.outcome = Outcome(status, 60, result=b"1", error="boom" if status != "succeeded" else "")
    k = driver.keys(queue)
    _removed, messages, _stale = await driver.script("ack")(
        keys=[k.reserved, k.payloads, k.attempts], args=[k.tag, *driver._ack_args([held])]
    )
    assert messages, "the ack reached no other queue"
    return list(messages)


def outbox(driver: RedisDriver, queue: str) -> str:
    return f"{driver.keys(queue).tag}:outbox"


async def status_of(driver: RedisDriver, id_: str, queue: str) -> Status | None:
    record = await driver.job_status(id_, queue)
    return None if record is None else record.status


async def age_outbox(driver: RedisDriver, queue: str) -> None:
    """Make the messages in `queue`'s outbox 3 s old (past lib.lua's STALE of 2 s) without
    waiting: their append time is rewritten (as if their deliverer died 3 s ago)."""
    key = outbox(driver, queue)
    client: Any = driver.client
    raw = await client.lrange(key, 0, -1)
    old = str(int(time.time() * 1000) - 3000)
    for i, m in enumerate(raw):
        try:
            parsed = orjson.loads(m)
        except orjson.JSONDecodeError:
            continue
        if isinstance(parsed, list) and len(parsed) > 1:
            parsed[1] = old
            await client.lset(key, i, orjson.dumps(parsed))


async def sweep(driver: RedisDriver, queue: str) -> None:
    """What any worker of `queue` does on its next reserve: sees a stale outbox, sweeps it."""
    box = Outboxes()
    box.sweep.add(driver.keys(queue).tag)
    await deliver(driver, box)


# -- hostile entries in an outbox --------------------------------------------------------


HOSTILE = {
    "not-json": b"garbage{",
    "json-object": b"{}",
    "short-array": b"[1]",
    "unknown-kind": None,  # filled in with the real tag of the target queue
    "no-such-tag": b'[1,"0","nosuchtag","r","nosuchtag\\u0000x","a\\u0000b","b","succeeded"]',
}


async def hostile_setup(driver: RedisDriver, kind: str) -> tuple[str, str, bytes]:
    a, b = spread_queues(driver, 2)
    bad = HOSTILE[kind]
    if bad is None:
        bad = orjson.dumps([1, "0", driver.keys(b).tag, "z", "x"])
    return a, b, bad


@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_a_hostile_outbox_entry_does_not_break_push_or_reserve_of_its_queue(
    driver: RedisDriver, kind: str
) -> None:
    """A garbage entry written by hand into an outbox: the queue's workers still reserve
    (no exception out of reserve, which would crash-loop a worker), its jobs still run."""
    a, _b, bad = await hostile_setup(driver, kind)
    await driver.client.rpush(outbox(driver, a), bad)
    await driver.push([job("plain", a)])
    for _ in range(3):  # every later reserve sees the stale entry and sweeps
        got = await driver.reserve([a], 1, lease=30)
        if got:
            got[0].outcome = Outcome(Status.SUCCEEDED, 60)
            await driver.ack(got)
    assert await status_of(driver, "plain", a) is Status.SUCCEEDED


@pytest.mark.parametrize(
    "kind",
    [
        "not-json",
        "unknown-kind",
        "no-such-tag",
    ],
)
async def test_a_hostile_outbox_entry_does_not_hold_back_the_queues_real_messages(
    driver: RedisDriver, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A garbage entry ahead of a real message left by a lost worker: the sweep delivers the
    real one (the dependent in the other queue runs) and sets the garbage aside, with a log
    line naming the outbox and what is wrong with the entry."""
    a, b, bad = await hostile_setup(driver, kind)
    await driver.client.rpush(outbox(driver, a), bad)
    await driver.push([job("dep", a)])
    await driver.push([job("dependent", b, ("dep", a))])
    await lost_ack(driver, a)
    await age_outbox(driver, a)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            await sweep(driver, a)
    assert await status_of(driver, "dependent", b) is Status.QUEUED, (
        f"the dependent is stuck: outbox {await driver.client.lrange(outbox(driver, a), 0, -1)}"
    )


async def test_a_hostile_outbox_entry_is_named_in_the_log(
    driver: RedisDriver, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator reading the log learns which outbox holds what bad entry."""
    a, _b, bad = await hostile_setup(driver, "not-json")
    await driver.client.rpush(outbox(driver, a), bad)
    with caplog.at_level(logging.WARNING):
        await sweep(driver, a)
    assert outbox(driver, a) in caplog.text, caplog.text
    assert bad.decode() in caplog.text, caplog.text
    # Set aside, not lost: out of the outbox, into <tag>:outbox:bad.
    assert await driver.client.lrange(outbox(driver, a), 0, -1) == []
    assert await driver.client.lrange(f"{outbox(driver, a)}:bad", 0, -1) == [bad]


# -- two deliverers of the same messages -------------------------------------------------


async def test_two_deliverers_of_a_batch_members_ends_count_each_end_once(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """The messages of two members' ends (in other queues than the batch record) delivered by
    the original deliverer and a sweeper at the same time, then once more: the record counts
    each member once and ends once."""
    a, b, c = spread_queues(driver)
    log = str(tmp_path / "events.log")
    rec = RecordJob(log, n=1)
    rec.queue = a
    m2, m3 = RecordJob(log, n=2), RecordJob(log, n=3)
    m2.queue, m3.queue = b, c
    async with QueueManager(backend.settings()) as manager:
        flow = await batch([rec, m2, m3]).dispatch(manager)
        await run_one(driver, a)
        lost = {b: await lost_ack(driver, b), c: await lost_ack(driver, c)}
        boxes = []
        for _ in range(3):
            box = Outboxes()
            for q, msgs in lost.items():
                box.sent[driver.keys(q).tag] = list(msgs)
            boxes.append(box)
        await asyncio.gather(deliver(driver, boxes[0]), deliver(driver, boxes[1]))
        await deliver(driver, boxes[2])
        progress = await flow.progress()
        assert (progress.total, progress.succeeded, progress.failed, progress.cancelled) == (
            3,
            3,
            0,
            0,
        )
        assert (await flow.status()).status is Status.SUCCEEDED
        assert flow.queue is not None
        raw = await driver.client.hgetall(driver.keys(flow.queue).record(flow.id))
        assert int(raw[b"p_succeeded"]) == 3, raw


# -- a bulk push: the dependency in another queue in the same push ----------------------


@pytest.fixture(params=["redis", "cluster"])
async def either(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RedisDriver]:
    """A single Redis and the cluster: the same scenario must answer the same on both."""
    gen: Any = _backend(request.param, request, tmp_path)
    backend = next(gen)
    try:
        async with create_driver("redis", backend.settings()) as opened:
            assert isinstance(opened, RedisDriver)
            yield opened
    finally:
        gen.close()


def two_queues(driver: RedisDriver) -> tuple[str, str]:
    if driver.cluster:
        a, b = spread_queues(driver, 2)
        return a, b
    base = f"r{uuid.uuid4().hex[:6]}"
    return f"{base}-a", f"{base}-b"


async def settle(driver: RedisDriver, *queues: str) -> None:
    """Let the relay finish: a sweep of each queue's outbox (no-op on one server)."""
    if driver.cluster:
        for q in queues:
            await age_outbox(driver, q)
            await sweep(driver, q)


async def refused_dependency(
    driver: RedisDriver, pushed: Any, first: tuple[str, str], b: str
) -> None:
    """One server refuses the dependent (`missing`, nothing stored); a cluster stores it and
    cancels it (docs/scaling.md, "Workflows across queues", a documented difference). Either
    way it never runs and is never left deferred."""
    got = [(p.outcome, p.id) for p in pushed]
    if not driver.cluster:
        assert got == [first, ("missing", "dep")], got
        assert await status_of(driver, "dependent", b) is None
        return
    assert got == [first, ("created", "dependent")], got
    record = await driver.job_status("dependent", b)
    assert record is not None and record.status is Status.CANCELLED, record
    assert record.error == "dependency dep cancelled", record.error
    assert await driver.reserve([b], 10, lease=30) == []


async def test_bulk_push_dependency_rejected_as_duplicate_answers_as_on_one_server(
    either: RedisDriver,
) -> None:
    """One push: a dependency in queue a whose unique key is taken (rejected: duplicate) and a
    dependent in queue b naming it."""
    driver = either
    a, b = two_queues(driver)
    await driver.push([job("holder", a, unique_key="k")])
    pushed = await driver.push([job("dep", a, unique_key="k"), job("dependent", b, ("dep", a))])
    await settle(driver, a, b)
    await refused_dependency(driver, pushed, ("duplicate", "holder"), b)


async def test_bulk_push_dependency_rejected_by_a_full_queue_answers_as_on_one_server(
    either: RedisDriver,
) -> None:
    """One push: a dependency refused by its bounded queue (full) and a dependent in another
    queue naming it."""
    driver = either
    a, b = two_queues(driver)
    await driver.push([job("filler", a, max_length=1)])
    pushed = await driver.push([job("dep", a, max_length=1), job("dependent", b, ("dep", a))])
    await settle(driver, a, b)
    await refused_dependency(driver, pushed, ("full", "dep"), b)


async def test_bulk_push_dependency_in_another_queue_in_the_same_push_runs_first(
    either: RedisDriver,
) -> None:
    driver = either
    a, b = two_queues(driver)
    pushed = await driver.push([job("dep", a), job("dependent", b, ("dep", a))])
    assert [p.outcome for p in pushed] == ["created", "created"]
    await settle(driver, a, b)
    assert await status_of(driver, "dependent", b) is Status.DEFERRED
    await run_one(driver, a)
    await settle(driver, a, b)
    assert await status_of(driver, "dependent", b) is Status.QUEUED


# -- a lost deliverer whose queue has no worker any more ---------------------------------


async def test_a_lost_deliverers_messages_move_without_a_worker_of_its_queue(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """Queue a's only worker is killed between its ack and the delivery, and a gets no worker
    (or push) again. The dependent in b, whose worker runs, must still be released: the
    worker of b sweeps every known queue's outbox with its heartbeat (`Driver.sweep`)."""
    a, b = spread_queues(driver, 2)
    log = tmp_path / "events.log"
    async with QueueManager(backend.settings()) as manager:
        first = await manager.push(RecordJob(str(log), n=1), queue=a)
        await manager.push(RecordJob(str(log), n=2), queue=b, depends_on=first)
    await lost_ack(driver, a)
    worker = WorkerProcess(["--queue", b, "--sleep", "0.2"], backend.env(), tmp_path / "w.log")
    try:
        wait_until(lambda: [e["n"] for e in events(log, "run")] == [2], 20, "the dependent")
    finally:
        worker.stop()


# -- kill -9 of workers while cross-queue chains run -------------------------------------


CHAINS = 80


async def test_chains_across_three_primaries_survive_workers_killed_at_random(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """80 chains a -> b -> c over three primaries, one every 0.1 s; every 0.4 s meanwhile a
    random worker is SIGKILLed and restarted. Every chain ends succeeded with 3 members counted
    once; every member
    ran, in its chain's order; a member ran again only as a later try after a lost lease (the
    killed worker held it), never the same try twice (a double release); no more repeats than
    kills; no job is
    left deferred and every outbox ends empty."""
    import random

    a, b, c = spread_queues(driver)
    log = tmp_path / "events.log"
    env = {**backend.env(), "QUEUE_LEASE_MARGIN": "1"}
    args = ["--timeout", "2", "--sleep", "0.1"]
    procs: dict[str, WorkerProcess] = {}
    kills = 0

    def start(queue: str) -> None:
        procs[queue] = WorkerProcess(["--queue", queue, *args], env, tmp_path / f"w-{queue}.log")

    try:
        for q in (a, b, c):
            start(q)
        async with QueueManager(backend.settings()) as manager:
            flows = []
            rng = random.Random(17)
            for n in range(CHAINS):
                # A chain every 0.1 s; a kill every 0.4 s: kills land while chains move.
                members = [RecordJob(str(log), n=n * 10 + i) for i in range(3)]
                for member, q in zip(members, (a, b, c), strict=True):
                    member.queue = q
                flows.append(await chain(*members).dispatch(manager))
                await asyncio.sleep(0.1)
                if n % 4 == 3:
                    q = rng.choice((a, b, c))
                    procs[q].proc.kill()
                    procs[q].proc.wait(10)
                    kills += 1
                    start(q)
            for flow in flows:
                assert await flow.result(timeout=60) is None
                progress = await flow.progress()
                assert (progress.total, progress.succeeded) == (3, 3), (flow.id, progress)
            for flow in flows:
                for handle in flow.jobs:
                    assert (await handle.status()).status is Status.SUCCEEDED
        ran = events(log, "run")
        firsts: dict[int, list[dict[str, Any]]] = {}
        for e in ran:
            firsts.setdefault(e["n"], []).append(e)
        assert sorted(firsts) == sorted(n * 10 + i for n in range(CHAINS) for i in range(3))
        for n, runs_of in firsts.items():
            # Tries only go up: a second run is a later try (the killed worker held it, its
            # lease lapsed), never the same try run twice (a double release or delivery).
            tries = [e["attempts"] for e in runs_of]
            assert tries == sorted(set(tries)), (n, runs_of)
            if n % 10:
                before = firsts[n - 1][0]["t"]
                assert runs_of[0]["t"] >= before, (n, "ran before its predecessor")
        for q in (a, b, c):
            await until_empty(driver, outbox(driver, q))
        assert len(ran) - 3 * CHAINS <= kills
        print(
            f"kills={kills} runs={len(ran)} members={3 * CHAINS} repeated={len(ran) - 3 * CHAINS}"
        )
    finally:
        for p in procs.values():
            p.stop()


async def until_empty(driver: RedisDriver, key: str, timeout: float = 10) -> None:
    """Poll a list another process empties (no event to await), every 20 ms."""
    deadline = time.monotonic() + timeout
    while await driver.client.llen(key):
        assert time.monotonic() < deadline, f"{key} still holds messages after {timeout}s"
        await asyncio.sleep(0.02)


# -- cancels and failures racing relayed ends --------------------------------------------


def box_of(driver: RedisDriver, lost: dict[str, list[bytes]]) -> Outboxes:
    box = Outboxes()
    for q, msgs in lost.items():
        box.sent[driver.keys(q).tag] = list(msgs)
    return box


async def test_cancelling_a_batch_while_a_members_success_is_in_flight_counts_it_once(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """Batch record in a, members in a, b, c. b's member succeeds but its message to the
    record is not delivered yet when the batch is cancelled; the message lands after the
    cancel (twice: a sweeper too). The record counts b's success once, the others cancelled,
    and ends once, cancelled."""
    a, b, c = spread_queues(driver)
    log = str(tmp_path / "events.log")
    members = [RecordJob(log, n=i) for i in range(3)]
    for member, q in zip(members, (a, b, c), strict=True):
        member.queue = q
    async with QueueManager(backend.settings()) as manager:
        flow = await batch(members, allow_failures=True).dispatch(manager)
        lost = {b: await lost_ack(driver, b)}
        assert await flow.cancel()
        await asyncio.gather(
            deliver(driver, box_of(driver, lost)), deliver(driver, box_of(driver, lost))
        )
        progress = await flow.progress()
        assert (progress.total, progress.succeeded, progress.cancelled) == (3, 1, 2), progress
        record = await flow.status()
        assert record.status is Status.CANCELLED, record
        assert (await flow.jobs[1].status()).status is Status.SUCCEEDED
        for q in (a, b, c):
            assert await driver.reserve([q], 10, lease=30) == []


async def test_cancel_on_failure_racing_a_members_success_counts_both_once(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """Batch (cancel on failure) with its record in a: b's member fails and c's succeeds,
    both acks' messages delivered at once by two deliverers each. c's member stays
    succeeded (not cancelled after its end), a's member is cancelled; counts add up once."""
    a, b, c = spread_queues(driver)
    log = str(tmp_path / "events.log")
    members = [RecordJob(log, n=i) for i in range(3)]
    for member, q in zip(members, (a, b, c), strict=True):
        member.queue = q
    async with QueueManager(backend.settings()) as manager:
        flow = await batch(members).dispatch(manager)
        lost = {b: await lost_ack(driver, b, Status.FAILED), c: await lost_ack(driver, c)}
        await asyncio.gather(
            deliver(driver, box_of(driver, lost)),
            deliver(driver, box_of(driver, {c: lost[c]})),
            deliver(driver, box_of(driver, {b: lost[b]})),
        )
        progress = await flow.progress()
        assert (progress.total, progress.succeeded, progress.failed, progress.cancelled) == (
            3,
            1,
            1,
            1,
        ), progress
        assert (await flow.status()).status is Status.FAILED
        assert (await flow.jobs[2].status()).status is Status.SUCCEEDED
        assert (await flow.jobs[0].status()).status is Status.CANCELLED
        assert await driver.reserve([a], 10, lease=30) == []


async def test_depends_on_a_long_ended_job_of_another_queue_is_missing(
    either: RedisDriver,
) -> None:
    """The dependency ended long ago (its record gone): `missing`, nothing stored, as on one
    server."""
    driver = either
    a, b = two_queues(driver)
    await driver.push([job("old", a)])
    [held] = await driver.reserve([a], 1, lease=30)
    held.outcome = Outcome(Status.SUCCEEDED, 0)  # keep 0: the record is deleted at once
    await driver.ack([held])
    [pushed] = await driver.push([job("late", b, ("old", a))])
    assert (pushed.outcome, pushed.id) == ("missing", "old")
    assert await status_of(driver, "late", b) is None


# -- a primary killed while a relayed release is not replicated yet ----------------------


@pytest.fixture
def own_cluster() -> Iterator[Any]:
    from tests.servers import start_redis_cluster

    started = start_redis_cluster()
    if started is None:
        pytest.skip("redis-server is not installed")
    try:
        yield started
    finally:
        started.stop()


@pytest.mark.process
async def test_a_relayed_release_lost_in_a_failover_is_not_stuck_forever(
    own_cluster: Any,
) -> None:
    """REDIS_WAIT_REPLICAS=1. The dependent in b is released by relay.lua on b's primary; the
    message is then removed from a's outbox (a's primary has it replicated). b's primary is
    killed before its replica got the release (the replica was held with SIGSTOP and its link
    dropped for that instant: async replication) and the replica is promoted. The dependent
    must still run: with REDIS_WAIT_REPLICAS the relay keeps the message in a's outbox until
    b's replica has the release, and a sweep delivers it again to the promoted replica."""
    import signal

    from tests.conftest import make_settings
    from tests.test_redis_failover import replica_of

    cluster = own_cluster
    settings = make_settings(
        queue_connection="redis",
        redis_cluster_nodes=cluster.nodes,
        redis_wait_replicas=1,
        redis_wait_timeout=1,
    )
    async with create_driver("redis", settings) as opened:
        assert isinstance(opened, RedisDriver)
        driver = opened
        a, b = spread_queues(driver, 2)
        await driver.push([job("dep", a)])
        await driver.push([job("dependent", b, ("dep", a))])
        client: Any = driver.client
        victim = client.get_node_from_key(driver.keys(b).tag).port
        heir = replica_of(cluster, victim)
        heir_server = next(s for s in cluster.servers if s.port == heir)
        heir_server.proc.send_signal(signal.SIGSTOP)
        # The primary drops its replica's link: what it writes now is not sent (as when the
        # link breaks or lags under load just before a crash).
        cluster.cli(victim, "client", "kill", "type", "replica")
        try:
            await run_one(driver, a)
            assert await status_of(driver, "dependent", b) is Status.QUEUED
            # b's replica did not acknowledge the release (WAIT): the message stays in a's
            # outbox, for a sweep to deliver again.
            assert await driver.client.llen(outbox(driver, a)) == 1
            victim_server = next(s for s in cluster.servers if s.port == victim)
            victim_server.proc.kill()
            victim_server.proc.wait(10)
        finally:
            heir_server.proc.send_signal(signal.SIGCONT)
        wait_until(
            lambda: cluster.cli(heir, "role", timeout=3).startswith("master"),
            30,
            "the replica to be promoted",
        )
        # What every worker of a and b would do for 10 s: reserve (and sweep).
        deadline = time.monotonic() + 10
        state = None
        while time.monotonic() < deadline:
            try:
                await sweep(driver, a)
                await sweep(driver, b)
                state = await status_of(driver, "dependent", b)
            except Exception:  # the client learning the new slot map
                await asyncio.sleep(0.2)
                continue
            if state is Status.QUEUED:
                break
            await asyncio.sleep(0.2)
        print(f"dependent after failover: {state}")
        assert state is Status.QUEUED, f"dependent {state} after the failover"


# -- operator commands while cross-queue workflows are in flight -------------------------


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    import subprocess
    import sys

    from tests.processes import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    return done.returncode, out


@pytest.fixture(params=["redis", "cluster"])
def single_or_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


async def test_operator_commands_on_a_batch_spanning_queues_in_flight(
    single_or_cluster: Backend, tmp_path: Path
) -> None:
    """A batch over a, b, c: a's member fails (to the failed store), b's and c's wait (no
    worker). queue:stats, queue:job (the record), queue:failed, queue:retry all, queue:clear b,
    queue:prune --older-than 0 all answer; then c's worker runs its member and the batch ends
    with each member counted once, as on one server."""
    from tests.jobs import FlakyJob

    backend = single_or_cluster
    env = backend.env()
    async with create_driver("redis", backend.settings()) as opened:
        assert isinstance(opened, RedisDriver)
        driver = opened
        a, b, c = spread_queues(driver) if driver.cluster else [f"{driver.name}-{x}" for x in "abc"]
        log = tmp_path / "events.log"
        failing = FlakyJob(str(log))
        failing.max_tries = 1
        failing.queue = a
        mb, mc = RecordJob(str(log), n=2), RecordJob(str(log), n=3)
        mb.queue, mc.queue = b, c
        async with QueueManager(backend.settings()) as manager:
            flow = await batch([failing, mb, mc], allow_failures=True).dispatch(manager)
            w = WorkerProcess(["--queue", a, "--stop-when-empty"], env, tmp_path / "wa.log")
            assert w.wait(60) == 0
            rc, out = cli(env, "queue:stats", "--json")
            assert rc == 0 and b in out and c in out, out
            rc, out = cli(env, "queue:job", flow.id, "--json")
            assert rc == 0 and "deferred" in out, out
            rc, out = cli(env, "queue:failed", "--json")
            assert rc == 0 and flow.jobs[0].id in out, out
            rc, out = cli(env, "queue:retry", "all")
            assert rc == 0, out
            w = WorkerProcess(["--queue", a, "--stop-when-empty"], env, tmp_path / "wa2.log")
            assert w.wait(60) == 0
            rc, out = cli(env, "queue:clear", b, "--force")
            assert rc == 0, out
            rc, out = cli(env, "queue:prune", "--older-than", "0")
            assert rc == 0, out
            w = WorkerProcess(["--queue", c, "--stop-when-empty"], env, tmp_path / "wc.log")
            assert w.wait(60) == 0
            record = await driver.wait_ended(flow.id, flow.queue, 20)
            assert record is not None, "the batch never ended"
            progress = await flow.progress()
            assert (
                progress.total,
                progress.succeeded,
                progress.failed,
                progress.cancelled,
            ) == (3, 1, 1, 1), progress
            assert record.status is Status.FAILED, record


# -- queue names: hash tags, length, many queues -----------------------------------------


@pytest.mark.parametrize("name", ["x}", "{a}", "a{b", "}"])
async def test_a_queue_name_with_a_brace_is_refused_naming_it(
    backend: Backend, name: str, tmp_path: Path
) -> None:
    """Braces would move a queue's hash tag: refused at dispatch, the error naming it."""
    async with QueueManager(backend.settings()) as manager:
        with pytest.raises(ValueError, match="invalid queue name"):
            await manager.push(RecordJob(str(tmp_path / "l")), queue=name)


async def test_a_chain_over_two_longest_queue_names_with_colons(driver: RedisDriver) -> None:
    """190-character names full of ':' (as a tag's separator is) on two primaries."""
    base = "q:" * 80 + uuid.uuid4().hex[:8]
    a, b = spread_queues(driver, 2, base=base[: 190 - 4])
    assert max(len(a), len(b)) <= 190
    await driver.push([job("one", a)])
    await driver.push([job("two", b, ("one", a)), job("three", a, ("two", b))])
    await run_one(driver, a)
    assert await status_of(driver, "two", b) is Status.QUEUED
    await run_one(driver, b)
    assert await status_of(driver, "three", a) is Status.QUEUED
    await run_one(driver, a)
    assert await status_of(driver, "three", a) is Status.SUCCEEDED
    for q in (a, b):
        assert await driver.client.llen(outbox(driver, q)) == 0


@pytest.mark.parametrize(
    "count",
    [
        200,
        400,
        2000,
    ],
)
async def test_a_wait_on_many_queues_wakes_on_a_push_to_any(
    driver: RedisDriver, count: int
) -> None:
    """A worker of `count` queues (about as many slots): the wait blocks, a push to the last
    queue wakes it (within 5 s of a 20 s wait: woken by the push, not by its timeout); a
    second wait, after, still wakes on a push. How fast is bench/'s question, not this one's."""
    base = f"m{uuid.uuid4().hex[:6]}"
    queues = [f"{base}-{n}" for n in range(count)]
    for target in (queues[-1], queues[7]):
        waiter = asyncio.ensure_future(driver.wait(queues, 20))
        await asyncio.sleep(1.0)  # the BLPOPs are sent (no event tells when they block)
        assert not waiter.done()
        await driver.push([job(f"j-{target}", target)])
        await asyncio.wait_for(waiter, 5)
        [held] = await driver.reserve([target], 1, lease=30)
        assert held.id == f"j-{target}"
        held.outcome = Outcome(Status.SUCCEEDED, 60)
        await driver.ack([held])


async def test_a_worker_keeps_running_its_queue_with_a_hostile_outbox_entry(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """`{}` (JSON of the wrong shape) in queue a's outbox, then jobs pushed to a before it
    and a worker of a started: the worker runs them and does not exit or crash-loop."""
    a, _b = spread_queues(driver, 2)
    log = tmp_path / "events.log"
    async with QueueManager(backend.settings()) as manager:
        for n in range(3):
            await manager.push(RecordJob(str(log), n=n), queue=a)
    await driver.client.rpush(outbox(driver, a), b"{}")
    worker = WorkerProcess(["--queue", a], backend.env(), tmp_path / "w.log")
    try:
        wait_until(
            lambda: len(events(log, "run")) == 3 or worker.proc.poll() is not None,
            20,
            "the jobs to run",
        )
        assert worker.proc.poll() is None, worker.output[-3000:]
        assert sorted(e["n"] for e in events(log, "run")) == [0, 1, 2], worker.output[-3000:]
    finally:
        worker.stop()


async def test_a_reserve_failing_on_a_hostile_outbox_entry_takes_no_job(
    driver: RedisDriver,
) -> None:
    """`{}` in a's outbox: whatever reserve answers, a job it does not hand out is not left
    reserved (running, a try counted) until its lease ends."""
    a, _b = spread_queues(driver, 2)
    await driver.push([job("victim", a)])
    await driver.client.rpush(outbox(driver, a), b"{}")
    got: list[Any] = []
    try:
        got = await driver.reserve([a], 1, lease=30)
    except Exception:  # what it raises is the other test's matter
        got = []
    record = await driver.job_status("victim", a)
    assert record is not None
    assert got or record.status is Status.QUEUED, (record.status, record.attempts)


async def test_a_chain_whose_middle_queue_has_no_worker_leaves_nothing_in_an_outbox(
    backend: Backend, driver: RedisDriver, tmp_path: Path
) -> None:
    """Chain a -> b -> c; b has no worker for a while. The end of a's member is delivered to
    b's slot by its acker at once (b's member is queued there, waiting for a worker): no
    outbox holds anything meanwhile; once b's and c's members run the chain succeeds."""
    a, b, c = spread_queues(driver)
    log = str(tmp_path / "events.log")
    members = [RecordJob(log, n=i) for i in range(3)]
    for member, q in zip(members, (a, b, c), strict=True):
        member.queue = q
    async with QueueManager(backend.settings()) as manager:
        flow = await chain(*members).dispatch(manager)
        await run_one(driver, a)
        assert (await flow.jobs[1].status()).status is Status.QUEUED
        assert (await flow.jobs[2].status()).status is Status.DEFERRED
        for q in (a, b, c):
            assert await driver.client.llen(outbox(driver, q)) == 0
        await asyncio.sleep(2.5)  # past the 2 s sweep age: nothing was waiting for it
        assert (await flow.jobs[1].status()).status is Status.QUEUED
        await run_one(driver, b)
        await run_one(driver, c)
        assert await flow.result(timeout=10) is None
        progress = await flow.progress()
        assert (progress.total, progress.succeeded) == (3, 3)


async def test_a_message_relay_lua_fails_on_is_set_aside_and_the_rest_delivered(
    driver: RedisDriver, caplog: pytest.LogCaptureFixture
) -> None:
    """A well-formed message that relay.lua cannot apply (its job record is a string, not a
    hash: WRONGTYPE) ahead of a real one in the same delivery: relay.lua applies each message
    on its own, the failing one is moved to the bad list and named in the log, the real one
    releases its dependent."""
    a, b = spread_queues(driver, 2)
    tb = driver.keys(b).tag
    await driver.client.set(f"{tb}:job:clash", "not a hash")
    bad = orjson.dumps([1, "0", tb, "s", "clash", f"{driver.keys(a).tag}\0nobody"])
    await driver.client.rpush(outbox(driver, a), bad)
    await driver.push([job("dep", a)])
    await driver.push([job("dependent", b, ("dep", a))])
    await lost_ack(driver, a)
    await age_outbox(driver, a)
    with caplog.at_level(logging.ERROR):
        await sweep(driver, a)
    assert await status_of(driver, "dependent", b) is Status.QUEUED
    assert await driver.client.lrange(outbox(driver, a), 0, -1) == []
    [moved] = await driver.client.lrange(f"{outbox(driver, a)}:bad", 0, -1)
    assert orjson.loads(moved)[4] == "clash"
    assert "refused" in caplog.text and outbox(driver, a) in caplog.text, caplog.text


async def test_sweep_is_nothing_on_one_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One server has no outboxes: the heartbeat's sweep reads no queue list, no outbox."""
    for single in _backend("redis", request, tmp_path):
        async with create_driver("redis", single.settings()) as opened:
            assert isinstance(opened, RedisDriver) and not opened.cluster
            await opened.push([job("x", "q")])  # a known queue

            async def reads() -> tuple[int, int]:
                stats = await opened.client.info("commandstats")
                return tuple(
                    stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("smembers", "lindex")
                )

            before = await reads()
            await opened.sweep()
            assert await reads() == before


async def test_a_wait_longer_than_the_cluster_socket_timeout_neither_fails_nor_loses_a_wake(
    driver: RedisDriver,
) -> None:
    """redis-py's cluster client reads with a 5 s socket timeout: a wait of 7 s on queues of 3
    primaries ends quietly (no 'Redis unreachable'), and a push during the next wait, after
    the first BLPOPs were blocked past 5 s, wakes it at once."""
    queues = spread_queues(driver, 3)
    started = time.monotonic()
    await driver.wait(queues, 7)
    assert 6.5 < time.monotonic() - started < 9
    waiter = asyncio.ensure_future(driver.wait(queues, 20))
    await asyncio.sleep(5.5)
    assert not waiter.done()
    pushed_at = time.monotonic()
    await driver.push([job("late", queues[2])])
    await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - pushed_at < 1.0
