"""Three defects of the amqp connection, on the session's own RabbitMQ node.

* An open driver idle after its own reserve kept a consumer whose prefetch took the jobs pushed
  later into its inbox, where no other driver could reserve them (B2).
* A message of the delay router that can never be routed went round for ever; it is set aside
  in `<prefix>.unroutable`, with the reason, after a few tries.
* A push whose confirm was lost after the broker took the message (the connection dropped in
  between) undid the job's record, so the message ran without one; the record stays, marked
  unconfirmed, and the push still raises.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.connection
import pytest
from aio_pika.abc import AbstractIncomingMessage

from core.errors import ConnectionLostError
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import OutgoingJob
from core.status import Status
from tests.amqp.support import new_queue, opened


def new_prefix() -> str:
    """Broker objects of the test's own: its unroutable queue holds only its messages."""
    return f"topiqC{uuid.uuid4().hex[:8]}"


async def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    """Poll `check` (a coroutine function) until it returns something true."""
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {seconds}s"
        await asyncio.sleep(0.05)


# -- B2: an idle driver holds nothing back ---------------------------------------------------


async def test_a_driver_idle_after_its_reserve_takes_none_of_the_jobs_pushed_later(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as first, opened(tmp_path) as second:
        await first.push([OutgoingJob("a1", queue, b"x")])
        # Room for three, one there: before the fix, its consumer kept room for two more.
        [held] = await first.reserve([queue], 3, 30.0)
        await second.push([OutgoingJob("b1", queue, b"x"), OutgoingJob("b2", queue, b"x")])
        got = await second.reserve([queue], 2, 30.0)
        assert sorted((j.id, j.attempts) for j in got) == [("b1", 1), ("b2", 1)]
        await first.ack([held])
        # And after the ack (the conformance case): the next push is the other driver's.
        await second.push([OutgoingJob("b3", queue, b"x")])
        assert [j.id for j in await second.reserve([queue], 1, 30.0)] == ["b3"]
        await second.ack([*got])


async def test_what_a_reserve_had_prefetched_and_did_not_hand_out_goes_back_unspent(
    tmp_path: Path, amqp_url: str
) -> None:
    early, late = new_queue(), new_queue()
    async with opened(tmp_path) as first, opened(tmp_path) as second:
        await first.push([OutgoingJob("e1", early, b"x"), OutgoingJob("l1", late, b"x")])
        # A consumer per queue: the later queue's job is delivered too, and not handed out.
        [held] = await first.reserve([early, late], 1, 30.0)
        assert held.id == "e1"
        [back] = await second.reserve([late], 1, 30.0)
        assert (back.id, back.attempts) == ("l1", 1)  # given back: no try spent
        await first.ack([held])
        await second.ack([back])


async def test_a_workers_reserve_keeps_its_consumer_for_the_next_jobs(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as worker, opened(tmp_path) as other:
        await worker.push([OutgoingJob("w1", queue, b"x")])
        [held] = await worker.reserve([queue], 3, 30.0, worker="w-1")
        await other.push([OutgoingJob("w2", queue, b"x")])
        # Prefetched for the worker (its next reservation finds it delivered): the worker's
        # throughput depends on it.
        await until(lambda: _inbox_has(worker, queue), 10.0, "w2 delivered to the worker")
        [nxt] = await worker.reserve([queue], 2, 30.0, [held], worker="w-1")
        assert (nxt.id, nxt.attempts) == ("w2", 1)
        await worker.ack([nxt])


async def _inbox_has(driver: AmqpDriver, queue: str) -> bool:
    return bool(driver._inbox.get(queue))


# -- unroutable router messages -----------------------------------------------------------


async def _router_publish(url: str, router: str, messages: list[aio_pika.Message]) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for message in messages:
            await channel.default_exchange.publish(message, router)
    finally:
        await connection.close()


async def _set_aside(url: str, name: str, want: int, seconds: float) -> list[dict[str, Any]]:
    """The messages of the unroutable queue, once it holds `want` of them."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()

        async def count() -> int:
            try:
                probe = await connection.channel()
                declared = await probe.declare_queue(name, passive=True)
                await probe.close()
            except aiormq.exceptions.ChannelNotFoundEntity:
                return 0
            result = declared.declaration_result
            return (result.message_count or 0) >= want if result else 0

        await until(count, seconds, f"{want} message(s) set aside in {name}")
        queue = await channel.declare_queue(name, passive=True)
        out: list[dict[str, Any]] = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got: AbstractIncomingMessage = message
            out.append({"id": got.message_id, "body": got.body, **got.headers})
        return out
    finally:
        await connection.close()


@pytest.mark.timeout(90)
async def test_a_router_message_that_can_never_be_routed_is_set_aside_with_its_reason(
    tmp_path: Path, amqp_url: str
) -> None:
    prefix = new_prefix()
    queue = new_queue()
    classic = new_queue()
    async with opened(tmp_path, amqp_prefix=prefix) as driver:
        await driver.wait([queue], 0.01)  # the router's consumer runs from here
        # Another application's classic queue under the work queue's name: the broker
        # refuses the quorum declare (PRECONDITION_FAILED) every time.
        foreign = await aio_pika.connect(amqp_url)
        try:
            channel = await foreign.channel()
            await channel.declare_queue(f"{prefix}.q.{classic}", durable=True)
        finally:
            await foreign.close()
        due = int(time.time() * 1000)
        await _router_publish(
            amqp_url,
            f"{prefix}.delay.router",
            [
                aio_pika.Message(b"no queue", message_id="m-none", headers={"x-topiq-due": due}),
                aio_pika.Message(
                    b"bad name",
                    message_id="m-bad",
                    headers={"x-topiq-queue": "bad\x07name", "x-topiq-due": due},
                ),
                aio_pika.Message(
                    b"refused",
                    message_id="m-classic",
                    headers={"x-topiq-queue": classic, "x-topiq-due": due, "x-topiq-tries": 1},
                ),
            ],
        )
        aside = await _set_aside(amqp_url, f"{prefix}.unroutable", 3, 60.0)
        by_id = {m["id"]: m for m in aside}
        assert sorted(by_id) == ["m-bad", "m-classic", "m-none"]
        assert "x-topiq-queue" in by_id["m-none"]["x-topiq-unroutable"]
        assert "not a Topiq job" in by_id["m-none"]["x-topiq-unroutable"]
        assert "failed 5 times" in by_id["m-bad"]["x-topiq-unroutable"]
        assert "bad\\x07name" in by_id["m-bad"]["x-topiq-unroutable"]
        assert "failed 5 times" in by_id["m-classic"]["x-topiq-unroutable"]
        # Kept as they were: body, id and Topiq's headers.
        assert by_id["m-classic"]["body"] == b"refused"
        assert by_id["m-classic"]["x-topiq-tries"] == 1
        # The driver goes on working after the broker's refusals.
        await driver.push([OutgoingJob("ok", queue, b"x", delay=0.05)])
        held = await until(
            lambda: driver.reserve([queue], 1, 30.0), 10.0, "the delayed job after them"
        )
        assert [j.id for j in held] == ["ok"]
        await driver.ack(held)


# -- a lost confirm ---------------------------------------------------------------------


@pytest.fixture
def transports(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.StreamWriter]:
    """The writers of the AMQP connections opened from here on: aborting one drops that
    connection for real, as a network failure would."""
    writers: list[asyncio.StreamWriter] = []
    original = asyncio.open_connection

    async def open_connection(*args: Any, **kwargs: Any) -> Any:
        reader, writer = await original(*args, **kwargs)
        writers.append(writer)
        return reader, writer

    monkeypatch.setattr(aiormq.connection.asyncio, "open_connection", open_connection)
    return writers


def _publish_patched(
    monkeypatch: pytest.MonkeyPatch, routing_key: str, around: Callable[[Any], Any]
) -> None:
    """Run the one publish to `routing_key` through `around(publish)`; the others as they
    are."""
    original = aio_pika.Exchange.publish

    async def publish(self: Any, message: Any, key: str, **kwargs: Any) -> Any:
        if key != routing_key:
            return await original(self, message, key, **kwargs)

        async def call() -> Any:
            return await original(self, message, key, **kwargs)

        return await around(call)

    monkeypatch.setattr(aio_pika.Exchange, "publish", publish)


@pytest.mark.timeout(90)
async def test_a_lost_confirm_keeps_the_record_of_the_job_the_broker_took(
    tmp_path: Path,
    amqp_url: str,
    transports: list[asyncio.StreamWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as pusher, opened(tmp_path) as worker:
        ours = list(transports[:1])  # the pusher's connection

        async def confirm_lost(publish: Callable[[], Any]) -> Any:
            await publish()  # the broker has the message: it confirmed
            # The connection drops before the confirm is read: only the confirm's loss
            # is made up here; the message is really queued, the connection really gone.
            ours[0].transport.abort()
            raise ConnectionResetError("connection lost before the confirm")

        _publish_patched(monkeypatch, f"{pusher._names.work(queue)}", confirm_lost)
        job = OutgoingJob("lc1", queue, b"x", max_tries=7, unique_key="k-lc", check_id=True)
        with pytest.raises(ConnectionLostError):
            await pusher.push([job])
        monkeypatch.undo()
        # Its record stays: the message runs as pushed, not as one without a record.
        status = await worker.job_status("lc1", queue)
        assert status is not None and status.status is Status.QUEUED
        # Its unique key is still held while it waits: a second job with it is refused.
        [answer] = await worker.push([OutgoingJob("lc2", queue, b"x", unique_key="k-lc")])
        assert (answer.id, answer.outcome) == ("lc1", "duplicate")
        [got] = await until(
            lambda: worker.reserve([queue], 1, 30.0), 10.0, "the job whose confirm was lost"
        )
        assert (got.id, got.attempts) == ("lc1", 1)
        running = await worker.job_status("lc1", queue)
        assert running is not None and running.status is Status.RUNNING
        assert running.max_tries == 7
        await worker.ack([got])
        assert await worker.reserve([queue], 1, 30.0) == []


@pytest.mark.timeout(90)
async def test_a_push_cut_off_before_the_broker_can_be_repeated(
    tmp_path: Path,
    amqp_url: str,
    transports: list[asyncio.StreamWriter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = new_queue()
    async with opened(tmp_path) as pusher, opened(tmp_path) as worker:
        ours = list(transports[:1])

        async def cut_off(publish: Callable[[], Any]) -> Any:
            ours[0].transport.abort()  # gone before the message is written
            return await publish()

        _publish_patched(monkeypatch, f"{pusher._names.work(queue)}", cut_off)
        job = OutgoingJob("cu1", queue, b"x", unique_key="k-cu", check_id=True)
        with pytest.raises(ConnectionLostError):
            await pusher.push([job])
        monkeypatch.undo()
        # The caller repeats (at least once): the repeat goes in, though the first
        # push's record is there (it cannot know the message never arrived).
        [again] = await until(
            lambda: _push_when_back(pusher, job), 30.0, "the repeat after the reconnect"
        )
        assert (again.id, again.outcome) == ("cu1", "created")
        [got] = await until(lambda: worker.reserve([queue], 1, 30.0), 10.0, "the repeat")
        assert (got.id, got.attempts) == ("cu1", 1)
        await worker.ack([got])
        assert await worker.reserve([queue], 1, 30.0) == []


async def _push_when_back(driver: AmqpDriver, job: OutgoingJob) -> Any:
    try:
        return await driver.push([job])
    except ConnectionLostError:
        return None  # not reconnected yet
