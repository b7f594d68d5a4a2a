"""The amqp connection under an unlucky operator and a hostile sender (issue #18 review).

Each test states a behaviour: one that holds passes; a defect found is a strict xfail whose
reason says what goes wrong and where. Foreign messages are published straight to a Topiq
work queue with a plain AMQP client (aiormq), as another application on the same virtual host
could. Every test has a prefix of its own on the session's private node (tests/servers.py),
its queues deleted when it ends; the companion store is SQLite in the test's folder.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
import orjson
import pytest

from core.errors import ConfigurationError, ConnectionLostError, DriverError
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import OutgoingJob, ReservedJob
from core.queue.payload import encode
from core.settings import Settings
from core.status import Status
from tests.conftest import Backend, make_settings
from tests.jobs import RecordJob, events
from tests.processes import wait_until, workers
from tests.servers import PrivateRabbit, start_rabbitmq

pytestmark = pytest.mark.timeout(180)


# -- fixtures and helpers ----------------------------------------------------------------------


class Env:
    """One test's broker, prefix and store."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.prefix = f"adv{uuid.uuid4().hex[:8]}"
        self.db = f"sqlite+aiosqlite:///{tmp}/store.db"
        self.queue = f"q-{uuid.uuid4().hex[:8]}"

    def overrides(self, **extra: Any) -> dict[str, Any]:
        return {
            "amqp_url": self.url,
            "amqp_prefix": self.prefix,
            "amqp_store": "database",
            "db_url": self.db,
            "queue_default": self.queue,
            **extra,
        }

    def settings(self, **extra: Any) -> Settings:
        return make_settings(queue_connection="amqp", **self.overrides(**extra))

    def driver(self, **extra: Any) -> AmqpDriver:
        return AmqpDriver("amqp", self.settings(**extra))

    def backend(self) -> Backend:
        return Backend("amqp", self.overrides())

    def work(self, queue: str | None = None) -> str:
        return f"{self.prefix}.q.{queue or self.queue}"


@pytest.fixture
def env(amqp_url: str, rabbitmq: PrivateRabbit | None, tmp_path: Path) -> Iterator[Env]:
    made = Env(amqp_url, tmp_path)
    yield made
    if rabbitmq is not None:
        rabbitmq.delete_queues(f"{made.prefix}.")


async def publish_foreign(
    url: str, queue: str, messages: list[tuple[bytes, str | None, dict[str, Any]]]
) -> None:
    """Publish (body, message_id or None for none, headers) to broker queue `queue` as a
    client that knows nothing of Topiq would (no message_id is generated for it)."""
    conn = await aiormq.connect(url)
    try:
        channel = await conn.channel()
        await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for body, message_id, headers in messages:
            await channel.basic_publish(
                body,
                routing_key=queue,
                properties=aiormq.spec.Basic.Properties(
                    message_id=message_id, headers=headers or None, delivery_mode=2
                ),
            )
    finally:
        await conn.close()


async def take(
    driver: AmqpDriver, queue: str, want: int, seconds: float, lease: float = 30.0
) -> list[ReservedJob]:
    """Reserve until `want` jobs or `seconds` are gone."""
    got: list[ReservedJob] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        got += await driver.reserve([queue], want - len(got), lease)
        if len(got) < want:
            await driver.wait([queue], min(0.3, max(deadline - time.monotonic(), 0.01)))
    return got


def payload(job: Any, job_id: str, queue: str) -> bytes:
    return encode(job, job_id=job_id, queue=queue, max_bytes=10_000_000)


# -- a hostile sender: foreign messages on the work queue ---------------------------------------


async def test_non_numeric_tries_header_counts_as_no_tries(env: Env) -> None:
    await publish_foreign(env.url, env.work(), [(b"{}", "abc", {"x-topiq-tries": "abc"})])
    async with env.driver() as driver:
        [job] = await take(driver, env.queue, 1, 10)
        assert (job.id, job.attempts) == ("abc", 1)
        await driver.ack([job])


@pytest.mark.parametrize(
    "headers",
    [{"x-topiq-tries": -5}, {"x-topiq-tries": 10**12}, {"x-delivery-count": -7}],
    ids=["negative", "absurd", "negative-delivery-count"],
)
async def test_a_negative_tries_header_is_not_a_negative_attempt(
    env: Env, headers: dict[str, Any]
) -> None:
    """A count no Topiq publisher writes (negative, past a million) counts as no tries: it
    can neither stretch a job past max_tries nor use up its tries at once."""
    await publish_foreign(env.url, env.work(), [(b"{}", "neg", headers)])
    async with env.driver() as driver:
        [job] = await take(driver, env.queue, 1, 10)
        await driver.ack([job])
        assert job.attempts == 1, job.attempts


async def test_messages_without_an_id_are_each_handed_out(env: Env) -> None:
    """No message_id: the driver hands each out (id "") and acknowledges each; nothing comes
    back afterwards."""
    await publish_foreign(env.url, env.work(), [(b"x", None, {}), (b"y", None, {})])
    async with env.driver() as driver:
        first = await take(driver, env.queue, 1, 10)
        assert [j.payload for j in first] == [b"x"]
        await driver.ack(first)
        second = await take(driver, env.queue, 1, 10)
        assert [j.payload for j in second] == [b"y"]
        await driver.ack(second)
    async with env.driver() as again:
        assert await take(again, env.queue, 1, 3) == []


@pytest.mark.process
def test_a_worker_fails_lying_payloads_clearly_and_keeps_working(env: Env, tmp_path: Path) -> None:
    """Not JSON, a JSON list, an unknown class, a huge body: each ends in the failed store
    with an error naming what is wrong; the worker keeps running and a real job after them
    runs once."""
    log = str(tmp_path / "events.jsonl")
    unknown = orjson.dumps({"job": "tests.nowhere:Ghost", "data": {}, "id": "ghost"})
    huge = b'{"job": "tests.jobs:RecordJob", "data": {"log": "' + b"x" * 4_000_000 + b'"}}'
    good = payload(RecordJob(log, 1), "good", env.queue)
    asyncio.run(
        publish_foreign(
            env.url,
            env.work(),
            [
                (b"\xff\xfe not json", "notjson", {}),
                (b"[1, 2]", "alist", {"x-topiq-tries": "-"}),
                (unknown, "ghost", {}),
                (huge, "huge", {}),
                (good, "good", {"x-topiq-tries": 0}),
            ],
        )
    )
    with workers(1, ["--concurrency", "2"], env.backend().env(), tmp_path) as [proc]:
        wait_until(lambda: bool(events(log, "run")), 60, "the real job to run")

        async def failed() -> dict[str, str]:
            async with env.driver() as driver:
                records = await driver.failed_store().list(env.queue)
                return {r.id: r.exception for r in records}

        deadline = time.monotonic() + 30
        found: dict[str, str] = {}
        while len(found) < 4 and time.monotonic() < deadline:
            found = asyncio.run(failed())
        assert proc.proc.poll() is None, proc.output[-3000:]
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output[-3000:]
    assert [e["n"] for e in events(log, "run")] == [1]
    assert set(found) == {"notjson", "alist", "ghost", "huge"}, found
    assert "JSON" in found["notjson"]
    assert "JSON object" in found["alist"]
    assert "Ghost" in found["ghost"] or "nowhere" in found["ghost"]


# -- dispatch: odd names, half-published jobs ------------------------------------------------


@pytest.mark.parametrize("name", ["a.b.c", "with space", "colon:and#hash", "x" * 200])
async def test_odd_queue_names_round_trip(env: Env, name: str) -> None:
    async with env.driver() as driver:
        [pushed] = await driver.push([OutgoingJob("odd", name, b"x")])
        assert pushed.outcome == "created"
        [job] = await take(driver, name, 1, 10)
        assert (job.id, job.queue) == ("odd", name)
        await driver.ack([job])


async def test_a_queue_name_too_long_for_the_broker_is_refused(env: Env) -> None:
    """prefix + '.q.' + 255 characters is past AMQP's 255-byte limit: refused at dispatch."""
    async with env.driver() as driver:
        with pytest.raises((DriverError, ValueError)):
            await driver.push([OutgoingJob("long", "x" * 255, b"x")])


@pytest.mark.parametrize(
    ("name", "why"), [("x" * 255, "255-byte limit"), ("tab\there", "control characters")]
)
async def test_a_refused_dispatch_leaves_no_record_and_no_key(
    env: Env, name: str, why: str
) -> None:
    """A queue name the broker would refuse: a DriverError naming the queue and why, before
    anything is written; a second dispatch with the same key is refused the same way (not
    answered 'duplicate' by a key the first one took)."""
    async with env.driver() as driver:
        for job_id in ("long", "long2"):
            with pytest.raises(DriverError, match=why) as caught:
                await driver.push([OutgoingJob(job_id, name, b"x", unique_key="k", check_id=True)])
            assert repr(name) in str(caught.value)
            assert await driver.job_status(job_id) is None
        assert await driver.get_marker(driver._m("key", name, "k")) is None


async def test_a_returned_publish_leaves_no_record_and_no_key(env: Env) -> None:
    """The work queue deleted behind the driver's back: the broker returns the message
    (mandatory); the push raises a DriverError naming the queue and takes back the record,
    the id and the unique key it wrote."""
    async with env.driver() as driver:
        await driver.push([OutgoingJob("first", env.queue, b"x")])  # declares the queue
        conn = await aiormq.connect(env.url)
        try:
            channel = await conn.channel()
            await channel.queue_delete(env.work())
        finally:
            await conn.close()
        with pytest.raises(DriverError, match=env.work()):
            await driver.push([OutgoingJob("gone", env.queue, b"x", unique_key="k", check_id=True)])
        assert await driver.job_status("gone") is None
        assert await driver.get_marker(driver._m("key", env.queue, "k")) is None
        assert await driver.get_marker(driver._m("id", env.queue, "gone")) is None


@pytest.fixture
def own_broker() -> Iterator[PrivateRabbit]:
    """A node of the test's own (stopped and started by it; a node stopped and started by one
    test was seen refusing the next test's connections, so none is shared)."""
    rabbit = start_rabbitmq()
    if rabbit is None:
        pytest.skip("rabbitmq-server is not installed")
    try:
        yield rabbit
    finally:
        rabbit.stop()


async def _push_during_outage(
    rabbit: PrivateRabbit, tmp_path: Path
) -> tuple[BaseException | None, Env]:
    made = Env(rabbit.url, tmp_path)
    async with made.driver() as driver:
        await driver.push([OutgoingJob("before", made.queue, b"x")])
        await asyncio.to_thread(rabbit.stop)
        caught: BaseException | None = None
        try:
            try:
                await driver.push([OutgoingJob("during", made.queue, b"x", unique_key="k")])
            except BaseException as exc:
                caught = exc
        finally:
            await asyncio.to_thread(rabbit.start)
    return caught, made


@pytest.mark.timeout(240)
async def test_dispatch_during_an_outage_raises_connection_lost(
    own_broker: PrivateRabbit, tmp_path: Path
) -> None:
    caught, _ = await _push_during_outage(own_broker, tmp_path)
    assert isinstance(caught, ConnectionLostError), repr(caught)
    assert f"127.0.0.1:{own_broker.port}" in str(caught)
    assert "guest:guest" not in str(caught)


@pytest.mark.timeout(240)
async def test_a_dispatch_lost_in_an_outage_leaves_nothing_behind(
    own_broker: PrivateRabbit, tmp_path: Path
) -> None:
    caught, made = await _push_during_outage(own_broker, tmp_path)
    assert isinstance(caught, ConnectionLostError)
    async with made.driver() as driver:
        assert await driver.job_status("during") is None
        [again] = await driver.push([OutgoingJob("during2", made.queue, b"x", unique_key="k")])
        assert (again.id, again.outcome) == ("during2", "created")


# -- connection settings --------------------------------------------------------------------


async def test_a_wrong_virtual_host_is_a_configuration_error(env: Env) -> None:
    url = env.url.rstrip("/") + "/no-such-vhost"
    driver = env.driver(amqp_url=url)
    with pytest.raises(ConfigurationError, match="virtual host") as caught:
        await driver.open()
    assert "guest:guest" not in str(caught.value)


async def test_a_wrong_password_is_a_configuration_error(env: Env) -> None:
    url = env.url.replace("guest:guest@", "guest:wrong-pw@")
    driver = env.driver(amqp_url=url)
    with pytest.raises(ConfigurationError, match="user name or password") as caught:
        await driver.open()
    assert "wrong-pw" not in str(caught.value)


async def test_amqps_to_the_plaintext_port_is_refused_not_downgraded(env: Env) -> None:
    driver = env.driver(amqp_url=env.url.replace("amqp://", "amqps://", 1))
    with pytest.raises(ConnectionLostError, match="unreachable"):
        await driver.open()


# -- cancels, clears, retries ---------------------------------------------------------------


async def test_a_cancelled_waiting_job_is_dropped_not_run(env: Env) -> None:
    async with env.driver() as driver:
        await driver.push([OutgoingJob("w", env.queue, b"x"), OutgoingJob("n", env.queue, b"y")])
        assert await driver.cancel("w")
        jobs = await take(driver, env.queue, 2, 3)
        assert [j.id for j in jobs] == ["n"]
        await driver.ack(jobs)
        status = await driver.job_status("w")
        assert status is not None and status.status is Status.CANCELLED


async def test_a_cancelled_delayed_job_is_dropped_not_run(env: Env) -> None:
    async with env.driver() as driver:
        await driver.push([OutgoingJob("d", env.queue, b"x", delay=0.6)])
        assert await driver.cancel("d")
        # Its copy comes out of the ladder within a second or so; the router drops it or
        # routes it to the work queue, where reserve drops it.
        assert await take(driver, env.queue, 1, 3) == []
        status = await driver.job_status("d")
        assert status is not None and status.status is Status.CANCELLED


async def test_a_cancelled_then_redispatched_id_runs_once_with_the_new_payload(env: Env) -> None:
    async with env.driver() as driver:
        await driver.push([OutgoingJob("X", env.queue, b"old", check_id=True)])
        assert await driver.cancel("X")
        await driver.push([OutgoingJob("X", env.queue, b"new", check_id=True)])
        jobs = await take(driver, env.queue, 2, 3)
        await driver.ack(jobs)
        assert [j.payload for j in jobs] == [b"new"]


async def test_clear_lets_a_purged_jobs_unique_key_go(env: Env) -> None:
    async with env.driver() as driver:
        await driver.push([OutgoingJob("U1", env.queue, b"x", unique_key="k")])
        assert await driver.clear(env.queue) == 1
        status = await driver.job_status("U1")
        assert status is None or status.status not in (Status.QUEUED, Status.SCHEDULED)
        [second] = await driver.push([OutgoingJob("U2", env.queue, b"x", unique_key="k")])
        assert (second.id, second.outcome) == ("U2", "created")


async def test_clear_while_a_job_is_held_keeps_the_held_job(env: Env) -> None:
    """A worker holds one job (unacknowledged); clear purges the others; the held job is still
    the worker's to ack, and nothing comes back afterwards."""
    async with env.driver() as worker, env.driver() as operator:
        await worker.push([OutgoingJob(f"c{n}", env.queue, b"x") for n in range(5)])
        [held] = await take(worker, env.queue, 1, 10)
        await worker.ack([])  # nothing
        cleared = await operator.clear(env.queue)
        assert cleared >= 1
        await worker.ack([held])
        status = await operator.job_status(held.id)
        assert status is not None and status.status is Status.SUCCEEDED
        stats = await operator.stats(env.queue)
        assert stats.pending == 0
    async with env.driver() as again:
        got = await take(again, env.queue, 5, 2)
        assert [j.id for j in got] == [], [j.id for j in got]


async def test_two_retries_of_one_failed_record_at_once_push_it_once(env: Env) -> None:
    from datetime import UTC, datetime

    from core.queue.drivers.base import FailedJob

    body = payload(RecordJob("/dev/null", 3), "F1", env.queue).decode()
    async with env.driver() as one, env.driver() as two:
        store = one.failed_store()
        await store.add(
            FailedJob("F1", "amqp", env.queue, body, "ValueError: x", datetime.now(UTC))
        )
        [record] = await store.list(env.queue)
        moved = await asyncio.gather(one.retry_failed([record]), two.retry_failed([record]))
        assert sorted(len(m) for m in moved) == [0, 1], moved
        jobs = await take(one, env.queue, 2, 3)
        assert [j.id for j in jobs] == ["F1"]
        await one.ack(jobs)
        assert await store.list(env.queue) == []


# -- crashes between a publish and its ack ------------------------------------------------------


class Crash(Exception):
    pass


async def _crash_in_release(env: Env) -> list[ReservedJob]:
    """A worker retries a job (release with no delay): the copy is published, then the worker
    dies before acknowledging the delivery. What the next worker gets."""
    async with env.driver() as first:
        await first.push([OutgoingJob("R", env.queue, b"x")])
        [job] = await take(first, env.queue, 1, 10)

        async def die(_: Any) -> None:
            raise Crash

        first._unpark = die  # type: ignore[method-assign,assignment]  # after the copy's publish
        with pytest.raises(Crash):
            await first.release(job, 0.0, error="boom")
        first._held.clear()  # died: nothing acknowledged
    async with env.driver() as second:
        got = await take(second, env.queue, 3, 4)
        await second.ack(got)
        return got


async def test_a_crash_between_the_retry_copy_and_the_ack_loses_nothing(env: Env) -> None:
    got = await _crash_in_release(env)
    # Not lost, and not run twice: the redelivered original and the copy end as one try 2.
    assert [(j.id, j.attempts) for j in got] == [("R", 2)]


@pytest.mark.timeout(240)
async def test_a_parked_job_whose_worker_died_survives_a_broker_restart(
    own_broker: PrivateRabbit, tmp_path: Path
) -> None:
    """AMQP_CONSUMER_TIMEOUT 2 s: the reservation is parked (a copy in the ladder, the
    delivery acked); the worker dies, the broker restarts; the parked copy still comes back
    after the lease as the job's second try."""
    made = Env(own_broker.url, tmp_path)
    async with made.driver(amqp_consumer_timeout=2.0) as first:
        await first.push([OutgoingJob("P", made.queue, b"x")])
        assert len(await take(first, made.queue, 1, 10, lease=3.0)) == 1
        assert first._held[(made.queue, "P")].message is None  # parked
        first._held.clear()  # dies: nothing acked, nothing released
    await asyncio.to_thread(own_broker.restart)
    async with made.driver(amqp_consumer_timeout=2.0) as second:
        again = await take(second, made.queue, 1, 30, lease=1.0)
        assert [(j.id, j.attempts) for j in again] == [("P", 2)]
        await second.ack(again)
