"""Group commit (core/mqtt/commit.py): pushes made while one is on its way go together, each
caller gets its own jobs' outcomes, errors reach every caller of the batch, and an app
acknowledges a message only once its job is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from core.errors import ConnectionLostError
from core.mqtt import MqttApp, Router
from core.mqtt.commit import GroupCommit
from core.queue.drivers.base import OutgoingJob, Pushed
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from tests.conftest import flush_redis, make_settings
from tests.mqtt.conftest import Broker, mosquitto_pub, running
from tests.mqtt.jobs import EchoJob

pytestmark = [pytest.mark.timeout(60)]


class Backend:
    """A push that records the jobs of every call and holds it until `gate` is set, or until
    `release()` lets the oldest held call go."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = asyncio.Event()
        self.held: list[asyncio.Event] = []
        self.fail: BaseException | None = None

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        self.calls.append([job.id for job in jobs])
        mine = asyncio.Event()
        self.held.append(mine)
        gate = asyncio.ensure_future(self.gate.wait())
        released = asyncio.ensure_future(mine.wait())
        try:
            await asyncio.wait({gate, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gate.cancel()
            released.cancel()
        if self.fail is not None:
            raise self.fail
        return [
            Pushed(job.id, "duplicate" if job.id.startswith("dup") else "created") for job in jobs
        ]

    def release(self) -> None:
        self.held.pop(0).set()


def job(job_id: str) -> Any:
    """A stand-in `OutgoingJob`: the commit reads nothing but what the push returns."""

    class Stub:
        id = job_id

    return Stub()


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_push_made_when_none_is_on_its_way_goes_at_once() -> None:
    backend = Backend()
    backend.gate.set()
    commit = GroupCommit(backend.push)
    assert await commit.push([job("a"), job("b")]) == [
        Pushed("a", "created"),
        Pushed("b", "created"),
    ]
    assert backend.calls == [["a", "b"]]


async def test_pushes_made_while_one_is_on_its_way_go_together_with_their_own_outcomes() -> None:
    backend = Backend()
    commit = GroupCommit(backend.push)
    first = asyncio.ensure_future(commit.push([job("a")]))
    await settle()
    later = [
        asyncio.ensure_future(commit.push([job("b")])),
        asyncio.ensure_future(commit.push([job("dup-c"), job("d")])),
        asyncio.ensure_future(commit.push([job("e")])),
    ]
    await settle()
    assert backend.calls == [["a"]]  # the others wait for it
    backend.gate.set()
    assert await first == [Pushed("a", "created")]
    results = await asyncio.gather(*later)
    assert backend.calls == [["a"], ["b", "dup-c", "d", "e"]]
    assert results == [
        [Pushed("b", "created")],
        [Pushed("dup-c", "duplicate"), Pushed("d", "created")],
        [Pushed("e", "created")],
    ]
    assert (commit.pushes, commit.jobs) == (2, 5)


async def test_a_batch_stays_within_max_batch_and_never_splits_a_callers_jobs() -> None:
    backend = Backend()
    commit = GroupCommit(backend.push, max_batch=3)
    first = asyncio.ensure_future(commit.push([job("a")]))
    await settle()
    later = [
        asyncio.ensure_future(commit.push([job("b"), job("c")])),
        asyncio.ensure_future(commit.push([job("d"), job("e")])),
        asyncio.ensure_future(commit.push([job("f")])),
    ]
    await settle()
    backend.gate.set()
    await asyncio.gather(first, *later)
    assert backend.calls == [["a"], ["b", "c"], ["d", "e", "f"]]


async def test_an_error_of_the_backend_reaches_every_caller_of_the_batch() -> None:
    backend = Backend()
    commit = GroupCommit(backend.push)
    first = asyncio.ensure_future(commit.push([job("a")]))
    await settle()
    later = [asyncio.ensure_future(commit.push([job(n)])) for n in "bc"]
    await settle()
    backend.fail = ConnectionLostError("redis is down")
    backend.gate.set()
    for future in (first, *later):
        with pytest.raises(ConnectionLostError, match="redis is down"):
            await future
    # Idle again: the next push goes at once.
    backend.fail = None
    assert await commit.push([job("d")]) == [Pushed("d", "created")]
    assert backend.calls[-1] == ["d"]


async def test_a_caller_that_stopped_waiting_has_nothing_stored() -> None:
    backend = Backend()
    commit = GroupCommit(backend.push)
    first = asyncio.ensure_future(commit.push([job("a")]))
    await settle()
    gone = asyncio.ensure_future(commit.push([job("b")]))
    kept = asyncio.ensure_future(commit.push([job("c")]))
    await settle()
    gone.cancel()
    backend.gate.set()
    await first
    assert await kept == [Pushed("c", "created")]
    assert backend.calls == [["a"], ["c"]]


async def test_a_cancelled_flush_leaves_its_callers_unacknowledged_not_dropped() -> None:
    backend = Backend()
    commit = GroupCommit(backend.push)
    first = asyncio.ensure_future(commit.push([job("a")]))
    await settle()
    waiting = asyncio.ensure_future(commit.push([job("b")]))
    await settle()
    backend.release()
    await first
    await settle()
    assert backend.calls == [["a"], ["b"]]  # the flusher's push of "b" is on its way
    flusher = commit._flusher
    assert flusher is not None
    flusher.cancel()
    # ConnectionLostError: the app holds the message and runs its handler again.
    with pytest.raises(ConnectionLostError):
        await waiting
    await settle()
    backend.gate.set()
    assert await commit.push([job("c")]) == [Pushed("c", "created")]  # idle again


async def test_a_managers_batcher_takes_its_connections_pushes_and_only_while_it_is_set() -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        driver = await manager.connection()
        batcher = GroupCommit(driver.push)
        manager.batchers["memory"] = batcher
        handle = await manager.push(EchoJob("t", "d", {"n": 1}))
        assert batcher.jobs == 1
        assert await manager.size() == 1
        assert str(handle)
        del manager.batchers["memory"]
        await manager.push(EchoJob("t", "d", {"n": 2}))
        assert batcher.jobs == 1  # straight to the driver again
        assert await manager.size() == 2


@pytest.mark.mqtt
async def test_an_app_on_redis_stores_every_message_of_a_burst_once(
    broker: Broker, prefix: str, redis_url: str
) -> None:
    """300 QoS 1 messages at once from one publisher: one job each, none lost or doubled, all
    through the group commit, every message acknowledged."""
    flush_redis(redis_url)
    settings = broker.settings(
        queue_connection="redis", redis_url=redis_url, queue_default="mqtt-group-commit"
    )
    router = Router()

    @router.on(f"{prefix}/devices/{{device_id}}/reading", qos=1)
    async def reading(device_id: str, payload: Any) -> None:
        await dispatch(EchoJob(f"{prefix}/results/{device_id}", device_id, payload))

    count = 300
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            app = MqttApp(router, settings)
            async with running(app):
                grouped = manager.batchers["redis"]
                lines = [f'{{"n": {n}}}' for n in range(count)]
                await mosquitto_pub(broker, f"{prefix}/devices/d-1/reading", lines=lines)
                await until(lambda: app.stats.handled >= count, 30, f"{count} messages handled")
                await until(lambda: app.stats.unacked == 0, 10, "every message acknowledged")
                assert await manager.size("mqtt-group-commit") == count
        finally:
            set_default_manager(None)
    assert app.stats.handled == manager.dispatched == count
    assert grouped.jobs == count
    assert "redis" not in manager.batchers  # the app took its batcher away as it stopped


def test_mqtt_group_commit_false_turns_it_off_and_the_argument_wins() -> None:
    on = make_settings(queue_connection="memory")
    off = make_settings(queue_connection="memory", mqtt_group_commit=False)
    assert MqttApp(Router(), on).group_commit is True
    assert MqttApp(Router(), off).group_commit is False
    assert MqttApp(Router(), off, group_commit=True).group_commit is True
