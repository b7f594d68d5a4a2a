"""Attacks on #18b (dependencies, workflow records, payloads on the amqp connection), as an
unlucky operator and a hostile sender would make them. A test that exposes a defect is a
strict xfail saying what goes wrong (review notes: /work/notes/review18b.md); the others are
attacks that held.

A process dying at one exact step is a real process (a subprocess on the same broker and
store) that calls `os._exit` at that step: nothing after it runs, as with kill -9.
Run on both companion stores (Redis, and the database on SQLite), on the session's RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from core.cli import build_parser
from core.commands import jobs as job_commands
from core.commands._common import Connection, guarded
from core.queue.drivers import OutgoingJob, ReservedJob, amqp_deps, create_driver
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import Dependency, Outcome
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conformance.workflow_support import new_id, outgoing, record_job, run, status_of
from tests.conftest import Backend, _backend

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["redis", "database"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    for backend in _backend("amqp", request, tmp_path):
        if request.param == "database":
            backend.overrides["amqp_store"] = "database"
            backend.overrides["db_url"] = f"sqlite+aiosqlite:///{tmp_path}/store.db"
        yield backend


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[AmqpDriver]:
    async with create_driver(backend.connection, backend.settings()) as opened:
        assert isinstance(opened, AmqpDriver)
        yield opened


@pytest.fixture
def fast_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat's sweep that may run at every call, and a release claim stale after 2 s
    (the real periods, 30 s and 60 s, would only make the tests slow)."""
    monkeypatch.setattr(amqp_deps, "SWEEP_EVERY", 0.0, raising=False)
    monkeypatch.setattr(amqp_deps, "STALE", 2.0, raising=False)


@pytest.fixture
def queue(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])


async def reserve_for(
    driver: AmqpDriver, queue: str, seconds: float, want: str | None = None
) -> list[ReservedJob]:
    """Reserve (waiting on the driver's own wake-up) until a job (`want`, when given) is
    handed out or `seconds` pass; what was handed out last ([] when nothing)."""
    deadline = time.monotonic() + seconds
    while True:
        got = [j for j in await driver.reserve([queue], 10, lease=30) if not j.expired]
        if got and (want is None or any(j.id == want for j in got)):
            return got
        if got:
            await driver.ack(got)
        await driver.sweep()  # as the worker's heartbeat does
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        await driver.wait([queue], min(left, 0.5))


# A worker process that reserves one job, acknowledges it as succeeded and dies (os._exit)
# at the step named by argv[2]: "end-hook" (its record written, before anything resolves
# its dependents) or "release-send:<id>" (while releasing <id>: its record written queued,
# before its message is published).
DYING_WORKER = """
import asyncio, json, os, sys
from core.queue.drivers import Outcome, create_driver
from core.queue.drivers import amqp_deps
from core.status import Status
from tests.conftest import make_settings

async def main() -> None:
    overrides = json.loads(sys.argv[1])
    step = sys.argv[2]
    queue = overrides["queue_default"]
    async with create_driver("amqp", make_settings(queue_connection="amqp", **overrides)) as d:
        if step == "end-hook":
            async def die(items):
                if items:  # every reserve calls it, mostly with no ends
                    os._exit(9)
            d._deps.ended = die
        else:
            target = step.split(":", 1)[1]
            send = d._send
            async def dying_send(q, job_id, *args, **kwargs):
                if job_id == target:
                    os._exit(9)
                return await send(q, job_id, *args, **kwargs)
            d._send = dying_send
        for _ in range(200):
            got = await d.reserve([queue], 1, lease=30)
            if got:
                break
            await d.wait([queue], 0.5)
        job = got[0]
        job.outcome = Outcome(Status.SUCCEEDED, 600, result=b"1")
        await d.ack([job])
    sys.exit(3)  # the step was never reached

asyncio.run(main())
"""


def die_at(backend: Backend, step: str) -> None:
    """Run the dying worker to its end (exit 9 = it died at `step`)."""
    done = subprocess.run(
        [sys.executable, "-c", DYING_WORKER, json.dumps(backend.overrides), step],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 9, f"the worker did not die at {step}: {done.stderr[-2000:]}"


# -- a worker killed between its job's end and the dependents' resolution ------------------


async def test_a_dependent_stranded_by_a_killed_worker_runs_without_anyone_looking(
    driver: AmqpDriver, backend: Backend, queue: str, fast_sweeps: None
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    die_at(backend, "end-hook")
    # The worker died holding A's delivery (never acknowledged): the broker gives it out
    # again; B must follow A without a job_status call (workers only reserve).
    got = await reserve_for(driver, queue, 15.0, want=b)
    assert [j.id for j in got] == [b]
    assert (await status_of(driver, a)).status is Status.SUCCEEDED  # A ran once, not twice


async def test_a_dependent_whose_release_was_cut_off_by_a_kill_still_runs(
    driver: AmqpDriver, backend: Backend, queue: str, fast_sweeps: None
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    die_at(backend, f"release-send:{b}")
    # Looked at, as an operator would (the look resolves what a dead process left).
    seen = await status_of(driver, b)
    got = await reserve_for(driver, queue, 15.0, want=b)
    assert [j.id for j in got] == [b], f"{b} says {seen.status} but never runs"


async def test_a_release_whose_publish_failed_is_retried_without_a_look(
    driver: AmqpDriver, backend: Backend, queue: str, fast_sweeps: None
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    send = driver._send
    failed: list[str] = []

    async def flaky_send(q: str, job_id: str, *args: object, **kwargs: object) -> None:
        if job_id == b and not failed:
            failed.append(job_id)
            raise ConnectionError("the broker went away (simulated)")
        await send(q, job_id, *args, **kwargs)  # type: ignore[arg-type]

    driver._send = flaky_send  # type: ignore[method-assign]
    await run(driver, queue, a)
    assert failed == [b]
    got = await reserve_for(driver, queue, 15.0, want=b)
    assert [j.id for j in got] == [b]


async def test_a_look_releases_a_dependent_whose_publish_failed(
    driver: AmqpDriver, queue: str
) -> None:
    """The documented recovery holds: once looked at, it is released, and runs once."""
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    send = driver._send
    failed: list[str] = []

    async def flaky_send(q: str, job_id: str, *args: object, **kwargs: object) -> None:
        if job_id == b and not failed:
            failed.append(job_id)
            raise ConnectionError("the broker went away (simulated)")
        await send(q, job_id, *args, **kwargs)  # type: ignore[arg-type]

    driver._send = flaky_send  # type: ignore[method-assign]
    await run(driver, queue, a)
    assert (await status_of(driver, b)).status is Status.DEFERRED or failed
    # The failed release let its claim go with a tiny ttl: a look a moment later releases.
    deadline = time.monotonic() + 10
    while (await status_of(driver, b)).status is Status.DEFERRED:
        assert time.monotonic() < deadline, "a look never released it"
        await asyncio.sleep(0.05)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [j.id for j in got] == [b]
    await driver.ack([])
    assert await driver.reserve([queue], 10, lease=30) == []


# -- cascades ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancelled", "expired", "failed"])
async def test_a_chain_of_three_is_cancelled_down_when_its_head_does_not_succeed(
    driver: AmqpDriver, queue: str, how: str
) -> None:
    a, b, c = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue, ttl=0.3 if how == "expired" else 0),
            outgoing(b, queue, depends_on=[a]),
            outgoing(c, queue, depends_on=[b]),
        ]
    )
    if how == "cancelled":
        assert await driver.cancel(a) is True
    elif how == "failed":
        await run(driver, queue, a, Status.FAILED)
    else:
        deadline = time.monotonic() + 10
        while (await status_of(driver, a)).status is not Status.EXPIRED:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert (await status_of(driver, b)).status is Status.CANCELLED
    assert (await status_of(driver, c)).status is Status.CANCELLED
    assert (await driver.stats(queue)).deferred == 0
    assert await reserve_for(driver, queue, 1.0) == []


async def test_cancelling_a_chain_record_cancels_its_members_not_ended(
    driver: AmqpDriver, queue: str
) -> None:
    a, b, c, chain = new_id(), new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue, depends_on=[a]),
            outgoing(c, queue, depends_on=[b]),
            record_job(chain, queue, "chain", [a, b, c]),
        ]
    )
    await run(driver, queue, a)
    assert await driver.cancel(chain) is True
    assert [(await status_of(driver, j)).status for j in (a, b, c)] == [
        Status.SUCCEEDED,
        Status.CANCELLED,
        Status.CANCELLED,
    ]
    assert (await status_of(driver, chain)).status is Status.CANCELLED
    assert await reserve_for(driver, queue, 1.0) == []


@pytest.mark.parametrize("cof", [True, False])
async def test_a_batch_with_a_failure_ends_failed_and_cancels_waiters_only_when_asked(
    driver: AmqpDriver, queue: str, cof: bool
) -> None:
    a, b, c, batch = new_id(), new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue, delay=3600),
            outgoing(c, queue, delay=3600),
            record_job(batch, queue, "batch", [a, b, c], cancel_on_failure=cof),
        ]
    )
    await run(driver, queue, a, Status.FAILED)
    after = [(await status_of(driver, j)).status for j in (b, c)]
    if cof:
        assert after == [Status.CANCELLED, Status.CANCELLED]
        assert (await status_of(driver, batch)).status is Status.FAILED
    else:
        assert after == [Status.SCHEDULED, Status.SCHEDULED]
        record = await status_of(driver, batch)
        assert record.status is Status.DEFERRED
        assert record.progress is not None and record.progress.failed == 1


# -- bad input -----------------------------------------------------------------------------


async def test_a_missing_dependency_stores_nothing(driver: AmqpDriver, queue: str) -> None:
    b, ghost = new_id(), new_id()
    answer = await driver.push([outgoing(b, queue, depends_on=[ghost], unique_key="k")])
    assert (answer[0].id, answer[0].outcome) == (ghost, "missing")
    assert await driver.job_status(b) is None
    assert (await driver.stats(queue)).deferred == 0
    # Nothing was claimed: the same key is free for the next push.
    again = await driver.push([outgoing(new_id(), queue, unique_key="k")])
    assert again[0].outcome != "duplicate"


async def test_a_dependency_on_another_queues_job_of_that_id_is_missing(
    driver: AmqpDriver, queue: str
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue)])
    answer = await driver.push(
        [outgoing(b, queue, depends_on=[Dependency(a, queue=queue + "-other")])]
    )
    assert answer[0].outcome == "missing"


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
async def test_a_deferred_jobs_payload_of_any_bytes_is_shown_and_released_intact(
    driver: AmqpDriver, queue: str, size: int
) -> None:
    payload = bytes(range(256)) * (size // 256) + b"\xff\xfe\x00"[: size % 3]
    payload = payload[:size]
    a, b = new_id(), new_id()
    await driver.push(
        [outgoing(a, queue), OutgoingJob(b, queue, payload, depends_on=(Dependency(a),))]
    )
    assert await driver.job_payload(b) == payload
    await run(driver, queue, a)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [(j.id, j.payload) for j in got] == [(b, payload)]


async def test_a_dependent_whose_record_was_deleted_is_not_resurrected(
    driver: AmqpDriver, queue: str
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    await driver._store.set_marker(driver._m("job", b), "", 0.001)
    await run(driver, queue, a)
    assert await reserve_for(driver, queue, 1.0) == []


# -- hostile senders -----------------------------------------------------------------------


async def publish_raw(driver: AmqpDriver, queue: str, **fields: object) -> None:
    """A message put in the work queue of `queue` by someone who is not Topiq."""
    assert driver._conn is not None
    channel = await driver._conn.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(b"not topiq", **fields),  # type: ignore[arg-type]
            routing_key=driver._names.work(queue),
        )
    finally:
        await channel.close()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"message_id": "forged", "headers": {"x-topiq-tries": 10**12, "x-topiq-queue": "zz"}},
        {"message_id": "forged2", "headers": {"x-topiq-tries": "many", "x-topiq-due": "soon"}},
    ],
    ids=["no-headers", "lying-headers", "absurd-headers"],
)
async def test_a_foreign_message_in_a_work_queue_is_one_first_try_of_that_queue(
    driver: AmqpDriver, queue: str, fields: dict[str, object]
) -> None:
    """Another publisher's message in a work queue reaches a worker (which fails it with
    its payload error, kept in the failed store) as a first try of the work queue's own: its
    lying headers neither stretch nor spend tries, nor move it to another queue."""
    await driver.push([outgoing(new_id(), queue)])  # declares the work queue
    # Two copies: without an id each is a job of its own; with one id, the second is the
    # same job (ended by then) and is dropped.
    await publish_raw(driver, queue, **fields)
    await publish_raw(driver, queue, **fields)
    expected = 1 if fields.get("message_id") else 2
    handed: list[ReservedJob] = []
    deadline = time.monotonic() + 10
    while len(handed) < 1 + expected:
        assert time.monotonic() < deadline, f"only {handed} handed out"
        got = await driver.reserve([queue], 10, lease=30)
        handed += got
        await driver.ack([j for j in got if not j.expired])
        await driver.wait([queue], 0.3)
    foreign = [j for j in handed if j.payload == b"not topiq"]
    assert [(j.queue, j.attempts, j.expired) for j in foreign] == [(queue, 1, False)] * expected
    assert len({j.id for j in foreign}) == expected and all(j.id for j in foreign)
    assert await reserve_for(driver, queue, 1.0) == []


# -- what an operator sees -------------------------------------------------------------------


async def test_queue_job_json_shows_a_deferred_job_as_fully_as_a_waiting_one(
    backend: Backend, queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope = {"job": "tests.jobs:RecordJob", "description": "nightly", "meta": {"k": 1}}
    a, b = new_id(), new_id()
    async with QueueManager(backend.settings()) as manager:
        driver = await manager.connection()
        conn = Connection(manager, "amqp", driver)
        await driver.push(
            [
                OutgoingJob(a, queue, orjson.dumps(envelope), job="tests.jobs:RecordJob"),
                OutgoingJob(
                    b,
                    queue,
                    orjson.dumps(envelope),
                    job="tests.jobs:RecordJob",
                    depends_on=(Dependency(a),),
                ),
            ]
        )
        shown = {}
        for job_id in (a, b):
            capsys.readouterr()
            parsed = build_parser("queue:job").parse_args(["queue:job", job_id, "--json"])
            assert await guarded(job_commands.show_job(parsed, conn)) == 0
            shown[job_id] = json.loads(capsys.readouterr().out)
        assert shown[a]["status"] == "queued" and shown[b]["status"] == "deferred"
        assert shown[b]["waiting_for"] == [a]
        for data in shown.values():
            assert (data["description"], data["meta"], data["job"]) == (
                "nightly",
                {"k": 1},
                "tests.jobs:RecordJob",
            )


# -- time --------------------------------------------------------------------------------


async def test_a_dependent_outlives_the_wait_for_a_dependency_due_later_than_its_keep(
    driver: AmqpDriver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deferred job is kept past its dependency's due time (shown with LIVE_TTL at 1 s)."""
    monkeypatch.setattr(amqp_deps, "LIVE_TTL", 1.0)
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue, delay=2.5), outgoing(b, queue, depends_on=[a])])
    got = await reserve_for(driver, queue, 15.0, want=a)
    assert [j.id for j in got] == [a]
    await driver.ack(got)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [j.id for j in got] == [b]


async def test_the_tail_of_a_chain_outlives_a_head_due_later_than_its_keep(
    driver: AmqpDriver, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amqp_deps, "LIVE_TTL", 1.0)
    a, b, c = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue, delay=2.5),
            outgoing(b, queue, depends_on=[a]),
            outgoing(c, queue, depends_on=[b]),
        ]
    )
    for job_id in (a, b, c):
        got = await reserve_for(driver, queue, 15.0, want=job_id)
        assert [j.id for j in got] == [job_id]
        await driver.ack(got)


# -- many at once ------------------------------------------------------------------------


async def test_forty_dependents_pushed_from_two_drivers_while_the_dependency_ends_run_once(
    driver: AmqpDriver, backend: Backend, queue: str
) -> None:
    a = new_id()
    await driver.push([outgoing(a, queue)])
    deps = [new_id() for _ in range(40)]
    async with create_driver(backend.connection, backend.settings()) as other:
        held = await driver.reserve([queue], 1, lease=30)
        assert [j.id for j in held] == [a]
        held[0].outcome = Outcome(Status.SUCCEEDED, 600, result=b"1")

        async def push_half(d: object, ids: list[str]) -> None:
            for job_id in ids:
                await d.push([outgoing(job_id, queue, depends_on=[a])])  # type: ignore[attr-defined]

        await asyncio.gather(
            push_half(driver, deps[::2]), push_half(other, deps[1::2]), driver.ack(held)
        )
        ran: list[str] = []
        deadline = time.monotonic() + 30
        while len(ran) < len(deps):
            assert time.monotonic() < deadline, f"{len(ran)} of {len(deps)} ran"
            for d in (driver, other):
                got = [j for j in await d.reserve([queue], 50, lease=30) if not j.expired]
                ran += [j.id for j in got]
                await d.ack(got)
            if len(ran) < len(deps):
                await driver.wait([queue], 0.3)
        assert sorted(ran) == sorted(deps)
        assert await reserve_for(other, queue, 1.0) == []
        assert (await driver.stats(queue)).deferred == 0


async def test_a_cancel_racing_the_release_either_wins_and_the_job_runs_at_most_once(
    driver: AmqpDriver, backend: Backend, queue: str
) -> None:
    async with create_driver(backend.connection, backend.settings()) as other:
        for _ in range(6):
            a, b = new_id(), new_id()
            await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
            held = await driver.reserve([queue], 1, lease=30)
            assert [j.id for j in held] == [a]
            held[0].outcome = Outcome(Status.SUCCEEDED, 600, result=b"1")
            _, cancelled = await asyncio.gather(driver.ack(held), other.cancel(b))
            status = (await status_of(driver, b)).status
            ran: list[str] = []
            for d in (driver, other):
                got = [j for j in await d.reserve([queue], 10, lease=30) if not j.expired]
                ran += [j.id for j in got]
                await d.ack(got)
            if cancelled:
                assert status is Status.CANCELLED and ran == [], (status, ran)
            else:
                assert ran == [b], (status, ran)
            assert (await driver.stats(queue)).deferred == 0


async def test_the_same_dependency_named_twice_releases_once(
    driver: AmqpDriver, queue: str
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a, a])])
    await run(driver, queue, a)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [j.id for j in got] == [b]
    await driver.ack(got)
    assert await reserve_for(driver, queue, 1.0) == []


async def test_a_dependents_ttl_counts_from_its_release_not_its_push(
    driver: AmqpDriver, queue: str
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue, delay=1.5), outgoing(b, queue, ttl=0.5, depends_on=[a])])
    got = await reserve_for(driver, queue, 10.0, want=a)
    await driver.ack(got)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [(j.id, j.expired) for j in got] == [(b, False)]


async def test_cancelling_a_chain_with_a_running_member_ends_it_when_that_member_ends(
    driver: AmqpDriver, queue: str
) -> None:
    a, b, chain = new_id(), new_id(), new_id()
    await driver.push(
        [
            outgoing(a, queue),
            outgoing(b, queue, depends_on=[a]),
            record_job(chain, queue, "chain", [a, b]),
        ]
    )
    held = await driver.reserve([queue], 1, lease=30)
    assert [j.id for j in held] == [a]
    assert await driver.cancel(chain) is True
    assert await driver.cancel_requested(held) == [a]
    assert (await status_of(driver, b)).status is Status.CANCELLED
    assert (await status_of(driver, chain)).status is Status.DEFERRED  # A still runs
    held[0].outcome = Outcome(Status.CANCELLED, 600, error="cancelled")
    await driver.ack(held)
    record = await status_of(driver, chain)
    assert record.status is Status.CANCELLED
    assert record.progress is not None and record.progress.cancelled == 2


# -- the broker restarted ------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_dependents_released_across_a_broker_restart_all_run_without_a_look(
    driver: AmqpDriver, queue: str, rabbitmq: object, fast_sweeps: None
) -> None:
    """The dependency's end is stored while the broker is down (the store is not): its
    dependents' releases cannot publish. Once the broker is back, every dependent must run
    (at least once), without anyone calling job_status."""
    if rabbitmq is None:
        pytest.skip("needs the session's own RabbitMQ node (it is stopped and started)")
    a = new_id()
    deps = [new_id() for _ in range(5)]
    await driver.push([outgoing(a, queue), *(outgoing(d, queue, depends_on=[a]) for d in deps)])
    held = await driver.reserve([queue], 1, lease=120)
    assert [j.id for j in held] == [a]
    held[0].outcome = Outcome(Status.SUCCEEDED, 600, result=b"1")
    rabbitmq.stop()  # type: ignore[attr-defined]
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(driver.ack(held), 20)
    finally:
        rabbitmq.start()  # type: ignore[attr-defined]
    assert (await asyncio.wait_for(driver._read(a), 10)).status is Status.SUCCEEDED  # type: ignore[union-attr]
    # A plain job pushed after the restart: once it has run, the driver works again, and
    # every dependent must have run before it or with it (they were due first).
    probe = new_id()
    deadline = time.monotonic() + 60
    while True:
        try:
            await driver.push([outgoing(probe, queue)])
            break
        except Exception:
            assert time.monotonic() < deadline, "the driver never came back"
            await asyncio.sleep(0.5)
    ran: list[str] = []
    while probe not in ran:
        assert time.monotonic() < deadline, f"the probe never ran ({ran})"
        with contextlib.suppress(Exception):  # the driver reconnecting
            got = [j for j in await driver.reserve([queue], 10, lease=30) if not j.expired]
            ran += [j.id for j in got]
            await driver.ack(got)
            await driver.sweep()  # as the worker's heartbeat does
            await driver.wait([queue], 0.5)
    more = await reserve_for(driver, queue, 5.0)
    ran += [j.id for j in more]
    assert a not in ran
    # As stored (a job_status call would resolve them: that is the look they wait for).
    left = [(d, getattr(await driver._read(d), "status", None)) for d in deps if d not in ran]
    assert left == [], f"{len(left)} of {len(deps)} dependents did not run: {left[:2]}"


# -- counts left behind --------------------------------------------------------------------


async def test_a_deferred_push_that_fails_half_way_leaves_no_deferred_count(
    driver: AmqpDriver, queue: str, monkeypatch: pytest.MonkeyPatch, fast_sweeps: None
) -> None:
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue)])

    async def broken(*args: object) -> None:
        raise ConnectionError("the store went away (simulated)")

    driver._deps._register = broken  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await driver.push([outgoing(b, queue, depends_on=[a])])
    del driver._deps._register  # the class's own again
    assert await driver.job_status(b) is None
    await driver.sweep()  # as the worker's heartbeat does
    assert (await driver.stats(queue)).deferred == 0


async def test_a_release_whose_confirm_was_lost_runs_and_leaves_no_deferred_count(
    driver: AmqpDriver, queue: str, fast_sweeps: None
) -> None:
    """The broker took the released message, its confirm never came: the job runs (its
    record was put back deferred, which a worker runs all the same); once it has ended,
    nothing says it is still deferred."""
    a, b = new_id(), new_id()
    await driver.push([outgoing(a, queue), outgoing(b, queue, depends_on=[a])])
    send = driver._send
    lost: list[str] = []

    async def confirm_lost(q: str, job_id: str, *args: object, **kwargs: object) -> None:
        await send(q, job_id, *args, **kwargs)  # type: ignore[arg-type]
        if job_id == b and not lost:
            lost.append(job_id)
            raise ConnectionError("the confirm was lost (simulated)")

    driver._send = confirm_lost  # type: ignore[method-assign]
    await run(driver, queue, a)
    assert lost == [b]
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [j.id for j in got] == [b]
    got[0].outcome = Outcome(Status.SUCCEEDED, 600, result=b"1")
    await driver.ack(got)
    assert (await status_of(driver, b)).status is Status.SUCCEEDED
    await driver.sweep()  # as the worker's heartbeat does
    assert (await driver.stats(queue)).deferred == 0


async def test_a_foreign_message_with_a_deferred_jobs_id_does_not_run_in_its_place(
    driver: AmqpDriver, queue: str
) -> None:
    a, b = new_id(), new_id()
    # The dependency in another queue: nothing reserved here can end it.
    await driver.push([outgoing(a, queue + "-dep"), outgoing(b, queue, depends_on=[a])])
    await driver.push([outgoing(new_id(), queue)])  # declares the work queue
    await publish_raw(driver, queue, message_id=b)
    got = await reserve_for(driver, queue, 3.0, want=b)
    forged = [(j.id, j.payload) for j in got if j.id == b]
    await driver.ack(got)
    assert forged == [], "a message of no push of it ran as the deferred job"
    assert (await status_of(driver, b)).status is Status.DEFERRED
    await run(driver, queue + "-dep", a)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [(j.id, j.payload) for j in got] == [(b, b'{"n":0}')]


@pytest.fixture
async def mariadb_store_driver(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[AmqpDriver, str]]:
    """A driver whose companion store is MariaDB (TOPIQ_TEST_MYSQL_URL's session database)."""
    for backend in _backend("amqp", request, tmp_path):
        backend.overrides["amqp_store"] = "database"
        backend.overrides["db_url"] = request.getfixturevalue("mysql_url")
        async with create_driver(backend.connection, backend.settings()) as opened:
            assert isinstance(opened, AmqpDriver)
            yield opened, str(backend.overrides["queue_default"])


@pytest.mark.parametrize("deferred", [False, True], ids=["plain", "deferred"])
async def test_a_100_kib_payload_survives_a_mariadb_companion_store(
    mariadb_store_driver: tuple[AmqpDriver, str], deferred: bool
) -> None:
    driver, queue = mariadb_store_driver
    payload = os.urandom(100 * 1024)
    a, b = new_id(), new_id()
    if deferred:
        await driver.push(
            [outgoing(a, queue), OutgoingJob(b, queue, payload, depends_on=(Dependency(a),))]
        )
    else:
        await driver.push([OutgoingJob(b, queue, payload)])
    assert await driver.job_payload(b) == payload
    if deferred:
        await run(driver, queue, a)
    got = await reserve_for(driver, queue, 10.0, want=b)
    assert [(j.id, j.payload == payload) for j in got] == [(b, True)]
