"""Dependencies on the amqp connection where it has no transaction (core/queue/drivers/
amqp_deps.py): ends and pushes racing between two drivers, and a process dying between the
steps of a resolution (simulated by writing the store as the dead process left it).

Run on both companion stores (Redis, and the database on SQLite), on the session's RabbitMQ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.queue.drivers import Driver, Outcome, create_driver
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.amqp_deps import STALE
from core.queue.drivers.amqp_records import LIVE_TTL
from core.status import Status
from tests.conformance.workflow_support import new_id, outgoing, reserve_one, status_of
from tests.conftest import Backend, _backend

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["redis", "database"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    for backend in _backend("amqp", request, tmp_path):
        if request.param == "database":
            backend.overrides["amqp_store"] = "database"
            backend.overrides["db_url"] = f"sqlite+aiosqlite:///{tmp_path}/store.db"
        yield backend


@pytest.fixture
async def drivers(backend: Backend) -> AsyncIterator[tuple[AmqpDriver, AmqpDriver]]:
    """Two drivers on one broker and store: two worker processes."""
    async with (
        create_driver(backend.connection, backend.settings()) as one,
        create_driver(backend.connection, backend.settings()) as two,
    ):
        assert isinstance(one, AmqpDriver) and isinstance(two, AmqpDriver)
        yield one, two


@pytest.fixture
def queue(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])


async def drain(queue: str, *drivers: Driver) -> list[str]:
    """Every job the drivers hand out until none has one left (each acknowledged)."""
    ids: list[str] = []
    while True:
        got = [job for d in drivers for job in await d.reserve([queue], 50, lease=30)]
        if not got:
            return ids
        ids += [job.id for job in got if not job.expired]
        for d in drivers:
            await d.ack([job for job in got if not job.expired])


async def write_status(driver: AmqpDriver, job_id: str, status: Status) -> None:
    """Write a job's record as ended, as an ack does, and nothing after it (the process
    that wrote it died before resolving what waits for it)."""
    record = await driver._read(job_id)
    assert record is not None
    record.status = status
    record.ended_at = time.time()
    await driver._write(record, 600)


async def test_two_dependencies_ending_at_once_on_two_drivers_resolve_each_dependent_once(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    for round_ in range(12):
        a, b = new_id(), new_id()
        dependents = [new_id() for _ in range(4)]
        failing = round_ % 3 == 2
        await one.push([outgoing(a, queue), outgoing(b, queue)])
        await one.push([outgoing(d, queue, depends_on=[a, b]) for d in dependents])
        held_a = await reserve_one(one, queue, a)
        held_b = await reserve_one(two, queue, b)
        held_a.outcome = Outcome(Status.FAILED if failing else Status.SUCCEEDED, 60, error="E")
        held_b.outcome = Outcome(Status.SUCCEEDED, 60)
        await asyncio.gather(one.ack([held_a]), two.ack([held_b]))
        handed = await drain(queue, one, two)
        if failing:
            assert handed == [], f"round {round_}"
        else:
            assert sorted(handed) == sorted(dependents), f"round {round_}"
        for d in dependents:
            record = await status_of(one, d, queue)
            want = Status.CANCELLED if failing else Status.SUCCEEDED
            assert record.status is want, f"round {round_}"
            assert record.attempts == (0 if failing else 1), f"round {round_}"
    assert (await one.stats(queue)).deferred == 0
    await two.recent(queue)  # sends what it counted
    assert (await one.recent(queue)).cancelled == 16  # the store's count, of both


async def test_a_dependent_pushed_while_its_dependency_ends_is_released_exactly_once(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    for round_ in range(20):
        a, dep = new_id(), new_id()
        await one.push([outgoing(a, queue)])
        held = await reserve_one(one, queue, a)
        held.outcome = Outcome(Status.SUCCEEDED, 60)
        await asyncio.gather(one.ack([held]), two.push([outgoing(dep, queue, depends_on=[a])]))
        assert await drain(queue, one, two) == [dep], f"round {round_}"
        record = await status_of(two, dep, queue)
        assert (record.status, record.attempts) == (Status.SUCCEEDED, 1), f"round {round_}"
    assert (await one.stats(queue)).deferred == 0


async def test_an_end_whose_writer_died_before_resolving_is_resolved_when_looked_at(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    a, dep, catch = new_id(), new_id(), new_id()
    await one.push([outgoing(a, queue)])
    await one.push(
        [
            outgoing(dep, queue, depends_on=[a]),
            outgoing(catch, queue, depends_on=[a], rule="failed"),
        ]
    )
    await write_status(one, a, Status.SUCCEEDED)
    assert (await one.stats(queue)).deferred == 2  # nothing resolved them
    # Another process looks: each is resolved then, once.
    assert (await status_of(two, dep, queue)).status is Status.QUEUED
    record = await status_of(two, catch, queue)
    assert (record.status, record.error) == (Status.CANCELLED, "no dependency failed")
    assert (await status_of(one, dep, queue)).status is Status.QUEUED
    assert await drain(queue, one, two) == [dep]  # a's own message is dropped: a has ended
    assert (await one.stats(queue)).deferred == 0


async def test_a_dependent_whose_slot_is_lost_is_resolved_when_looked_at(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    a, dep = new_id(), new_id()
    await one.push([outgoing(a, queue), outgoing(dep, queue, depends_on=[a])])
    # As if its pusher died after writing the record, before registering with `a`.
    await one._store.set_marker(one._m("dep", a, "0"), "", 0.001)
    await asyncio.sleep(0.01)
    assert await one._store.get_marker(one._m("dep", a, "0")) is None
    held = await reserve_one(one, queue, a)
    await one.ack([held])
    assert (await one.stats(queue)).deferred == 1  # the end found no one to resolve
    assert (await status_of(two, dep, queue)).status is Status.QUEUED
    assert await drain(queue, one, two) == [dep]


async def test_a_release_claim_left_by_a_dead_process_is_taken_over_once_stale(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    a, dep = new_id(), new_id()
    await one.push([outgoing(a, queue), outgoing(dep, queue, depends_on=[a])])
    record = await one._read(dep)
    assert record is not None
    guard = one._m("released", dep, str(record.extra["gen"]))
    # A process claimed the release a moment ago and has not written the record yet: the
    # others leave it to that process.
    assert await one._store.claim_marker(guard, repr(time.time()), LIVE_TTL)
    await one.ack([await reserve_one(one, queue, a)])
    assert (await status_of(two, dep, queue)).status is Status.DEFERRED
    assert await drain(queue, one, two) == []
    # It died: once its claim is older than STALE, the next look releases the job, once.
    await one._store.set_marker(guard, repr(time.time() - STALE - 1), LIVE_TTL)
    looks = await asyncio.gather(one.job_status(dep, queue), two.job_status(dep, queue))
    assert {s.status for s in looks if s is not None} <= {Status.QUEUED, Status.DEFERRED}
    assert (await status_of(one, dep, queue)).status is Status.QUEUED
    assert await drain(queue, one, two) == [dep]
    assert (await one.stats(queue)).deferred == 0


async def test_a_workflow_record_and_its_chain_end_once_under_two_drivers(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    from tests.conformance.workflow_support import record_job

    one, two = drivers
    members = [new_id() for _ in range(6)]
    record = new_id()
    await one.push(
        [outgoing(m, queue, i) for i, m in enumerate(members)]
        + [record_job(record, queue, "batch", members)]
    )
    ran = await drain(queue, one, two)
    assert sorted(ran) == sorted(members)
    status = await status_of(one, record, queue)
    assert status.status is Status.SUCCEEDED
    assert status.progress is not None and (status.progress.total, status.progress.succeeded) == (
        6,
        6,
    )


async def test_dependents_of_a_purged_job_and_a_cleared_deferred_one_are_resolved(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    other = f"{queue}-other"
    a, held_back, strict, loose, on_held = (new_id() for _ in range(5))
    await one.push([outgoing(a, queue)])
    await one.push([outgoing(held_back, queue, depends_on=[a])])
    await one.push(
        [
            outgoing(strict, other, depends_on=[a]),
            outgoing(loose, other, depends_on=[a], rule="ended"),
            outgoing(on_held, other, depends_on=[held_back]),
        ]
    )
    assert await one.clear(queue) == 2  # a purged, held_back ended by the clear itself
    # The purge cannot name a: its dependents learn it when they are looked at (a is not).
    record = await status_of(two, strict, other)
    assert (record.status, record.error) == (Status.CANCELLED, f"dependency {a} cancelled")
    record = await status_of(two, on_held, other)
    assert (record.status, record.error) == (
        Status.CANCELLED,
        f"dependency {held_back} cancelled",
    )
    assert (await status_of(two, loose, other)).status is Status.QUEUED
    assert await drain(other, one, two) == [loose]
    assert (await one.stats(queue)).deferred == 0
    assert (await one.stats(other)).deferred == 0


async def test_the_heartbeat_sweep_resolves_a_dependent_nobody_looks_at(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    a, b, dep, failing = new_id(), new_id(), new_id(), new_id()
    await one.push([outgoing(a, queue), outgoing(b, queue)])
    await one.push([outgoing(dep, queue, depends_on=[a]), outgoing(failing, queue, depends_on=[b])])
    await write_status(one, a, Status.SUCCEEDED)  # their enders died before resolving them
    await write_status(one, b, Status.FAILED)
    await two.sweep()  # a worker's heartbeat
    record = await two._read(dep)  # the stored record, not a look that would resolve it
    assert record is not None and record.status is Status.QUEUED
    record = await two._read(failing)
    assert record is not None
    assert (record.status, record.error) == (Status.CANCELLED, f"dependency {b} failed")
    assert await drain(queue, one, two) == [dep]
    assert (await one.stats(queue)).deferred == 0


async def test_a_release_cut_off_before_its_publish_is_published_once_when_stale(
    drivers: tuple[AmqpDriver, AmqpDriver], queue: str
) -> None:
    one, two = drivers
    a, dep = new_id(), new_id()
    await one.push([outgoing(a, queue), outgoing(dep, queue, depends_on=[a])])
    record = await one._read(dep)
    assert record is not None
    guard = one._m("released", dep, str(record.extra["gen"]))
    # As a releaser leaves it when it dies between writing the record and publishing: its
    # claim taken, the record queued, no message.
    assert await one._store.claim_marker(guard, repr(time.time()), LIVE_TTL)
    record.status = Status.QUEUED
    record.due_at = time.time()
    record.extra["releasing"] = True
    await one._write(record, LIVE_TTL)
    await write_status(one, a, Status.SUCCEEDED)
    assert (await status_of(two, dep, queue)).status is Status.QUEUED
    assert await drain(queue, one, two) == []  # the claim is fresh: its holder may publish
    await one._store.set_marker(guard, repr(time.time() - STALE - 1), LIVE_TTL)
    await asyncio.gather(one.job_status(dep, queue), two.job_status(dep, queue))
    assert await drain(queue, one, two) == [dep]
    assert (await status_of(one, dep, queue)).status is Status.SUCCEEDED
    await two.sweep()  # its placeholder was let go: nothing deferred
    assert (await one.stats(queue)).deferred == 0
