"""What the app promises at its MQTT edge (docs/mqtt.md, "Delivery guarantee"): a QoS 1
message is acknowledged only once its handler finished, so a crash or a stop never loses one;
the unacknowledged window is bounded; a failing handler cannot block it; QoS 2 routes are
subscribed at QoS 1.

The devices are `mosquitto_pub`; the app runs as `python main.py` where it gets killed or
stopped, and the jobs its handler dispatches go to an SQLite file the test reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from core.mqtt import ConnectionOptions, MessageContext, MqttApp, Router, ValidatePayload
from tests.mqtt.conftest import (
    AppProcess,
    Broker,
    MosquittoProcess,
    free_port,
    mosquitto_pub,
    running,
)

pytestmark = [pytest.mark.mqtt]

MESSAGES = 300


# -- helpers ---------------------------------------------------------------------------------------


def stored(db: Path, run: str) -> list[int]:
    """The `n` of every job of `run` in the SQLite queue (one entry per job, repeats kept)."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        try:
            rows = conn.execute("SELECT payload FROM queue_jobs").fetchall()
        except sqlite3.OperationalError:  # the app has not created the tables yet
            return []
    found = []
    for (payload,) in rows:
        data = json.loads(payload)["data"]
        if data.get("run") == run:
            found.append(int(data["n"]))
    return found


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition another process makes true (there is no event to await)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def app_env(broker: Broker, db: Path, client_id: str, **extra: str) -> dict[str, str]:
    return broker.env(
        MQTT_CLEAN_SESSION="false",  # the persistent session the guarantee needs
        MQTT_CLIENT_ID=client_id,
        QUEUE_CONNECTION="database",
        ENABLE_MYSQL="false",
        DB_SQLITE_PATH=str(db),
        **extra,
    )


async def start_app(env: dict[str, str]) -> AppProcess:
    app = await AppProcess(["serve", "--app", "tests.mqtt.delivery_apps:durable"], env).start()
    await app.wait_for_line("connected to the MQTT broker")
    return app


@contextlib.asynccontextmanager
async def own_mosquitto(tmp_path: Path) -> Any:
    mosquitto = MosquittoProcess(free_port(), tmp_path / "mosquitto")
    await mosquitto.start()
    try:
        yield mosquitto.broker
    finally:
        await mosquitto.stop()


def lines(count: int) -> list[str]:
    return [json.dumps({"n": n}) for n in range(count)]


# -- (a) SIGKILL mid-stream: nothing lost ----------------------------------------------------------


@pytest.mark.process
@pytest.mark.timeout(120)
async def test_an_app_killed_mid_stream_loses_no_message(tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:12]
    db = tmp_path / "queue.sqlite3"
    async with own_mosquitto(tmp_path) as broker:
        env = app_env(
            broker,
            db,
            f"delivery-kill-{run}",
            MQTT_HANDLER_CONCURRENCY="4",
            DELIVERY_HANDLER_DELAY="0.01",
        )
        app = await start_app(env)
        try:
            await mosquitto_pub(broker, f"topiq-test/{run}/in", lines=lines(MESSAGES))
            await until(lambda: len(stored(db, run)) >= 50, 60, "50 jobs stored")
            await app.kill()  # SIGKILL, with messages received and not yet handled
        finally:
            await app.kill()
        at_kill = len(set(stored(db, run)))
        assert at_kill < MESSAGES, "the stream was over before the kill: nothing was tested"

        again = await start_app(env)
        try:
            await until(
                lambda: len(set(stored(db, run))) >= MESSAGES, 60, f"{MESSAGES} distinct jobs"
            )
        finally:
            code = await again.stop()
        jobs = stored(db, run)
        assert sorted(set(jobs)) == list(range(MESSAGES))
        assert code == 0, again.log
        print(
            f"\nSIGKILL: {MESSAGES} messages in, {at_kill} stored at the kill, "
            f"{len(set(jobs))} distinct jobs after the restart ({len(jobs) - MESSAGES} repeats)"
        )


# -- (b) SIGTERM with a backlog: exits 0 in the grace period, nothing lost -------------------------


@pytest.mark.process
@pytest.mark.timeout(120)
async def test_sigterm_with_a_backlog_exits_in_the_grace_period_and_loses_nothing(
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:12]
    db = tmp_path / "queue.sqlite3"
    grace = 5.0
    async with own_mosquitto(tmp_path) as broker:
        env = app_env(
            broker,
            db,
            f"delivery-term-{run}",
            MQTT_HANDLER_CONCURRENCY="4",
            MQTT_GRACE=str(grace),
            DELIVERY_HANDLER_DELAY="0.05",
        )
        app = await start_app(env)
        try:
            await mosquitto_pub(broker, f"topiq-test/{run}/in", lines=lines(MESSAGES))
            await until(lambda: len(stored(db, run)) >= 20, 60, "20 jobs stored")
            started = time.monotonic()
            code = await app.stop(signal.SIGTERM, timeout=grace + 10)
            took = time.monotonic() - started
        finally:
            await app.kill()
        assert code == 0, app.log
        assert took < grace, f"SIGTERM took {took:.1f}s, the grace period is {grace}s"
        at_stop = stored(db, run)
        assert len(at_stop) < MESSAGES, "the stream was over before SIGTERM: nothing was tested"

        again = await start_app(env)
        try:
            await until(lambda: len(stored(db, run)) >= MESSAGES, 60, f"{MESSAGES} jobs")
        finally:
            code = await again.stop()
        jobs = stored(db, run)
        assert code == 0, again.log
        # A clean stop acknowledges exactly what it handled: no message is handled twice.
        assert sorted(jobs) == list(range(MESSAGES))
        print(
            f"\nSIGTERM: exit 0 after {took:.2f}s (grace {grace}s); {len(at_stop)} of {MESSAGES} "
            f"stored before the stop, {len(jobs)} jobs after the restart, no repeats"
        )


@pytest.mark.process
@pytest.mark.timeout(90)
async def test_sigterm_cancels_handlers_past_the_grace_period_and_their_messages_come_back(
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:12]
    db = tmp_path / "queue.sqlite3"
    grace = 2.0
    async with own_mosquitto(tmp_path) as broker:
        env = app_env(
            broker,
            db,
            f"delivery-grace-{run}",
            MQTT_HANDLER_CONCURRENCY="4",
            MQTT_GRACE=str(grace),
            DELIVERY_HANDLER_DELAY="60",  # far past the grace period
        )
        app = await start_app(env)
        try:
            await mosquitto_pub(broker, f"topiq-test/{run}/in", lines=lines(20))
            # Every handler slot busy (the log line is written when a handler starts).
            await until(
                lambda: sum("delivery-test handling" in line for line in app.lines) >= 4,
                20,
                "4 handlers running",
            )
            started = time.monotonic()
            code = await app.stop(signal.SIGTERM, timeout=grace + 10)
            took = time.monotonic() - started
        finally:
            await app.kill()
        assert code == 0, app.log
        assert grace <= took < grace + 2, f"SIGTERM took {took:.1f}s with a {grace}s grace"
        assert "cancelled 4 handler(s) still running after 2s" in app.log
        assert stored(db, run) == []

        env["DELIVERY_HANDLER_DELAY"] = "0"
        again = await start_app(env)
        try:
            await until(lambda: len(stored(db, run)) >= 20, 60, "20 jobs")
        finally:
            code = await again.stop()
        assert code == 0, again.log
        assert sorted(stored(db, run)) == list(range(20))
        print(
            f"\nSIGTERM past the grace: exit 0 after {took:.2f}s (grace {grace}s); 20 of 20 later"
        )


# -- (c) a raising handler is retried, then acknowledged: the window keeps moving ------------------


class Reading(BaseModel):
    temperature: float


@pytest.mark.timeout(60)
async def test_a_raising_handler_is_retried_then_acknowledged_and_the_window_moves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs: dict[int, int] = {}
    good: asyncio.Queue[int] = asyncio.Queue()
    router = Router()

    @router.on("sensors/{kind}", qos=1, middleware=[ValidatePayload(Reading)])
    async def reading(kind: str, payload: Reading) -> None:
        n = int(payload.temperature)
        runs[n] = runs.get(n, 0) + 1
        if kind == "poison":
            raise RuntimeError(f"cannot handle {n}")
        good.put_nowait(n)

    async with own_mosquitto(tmp_path) as broker:
        settings = broker.settings(
            mqtt_clean_session=False, mqtt_receive_maximum=1, mqtt_handler_retries=2
        )
        caplog.set_level(logging.INFO, "topiq.mqtt")
        async with running(MqttApp(router, settings)) as app:
            # With a window of one message, the next ones come only once these are acknowledged.
            await mosquitto_pub(broker, "sensors/poison", '{"temperature": 0}')
            await mosquitto_pub(broker, "sensors/ok", '{"temperature": "not a number"}')
            for n in (1, 2, 3):
                await mosquitto_pub(broker, "sensors/ok", f'{{"temperature": {n}}}')
            assert [await asyncio.wait_for(good.get(), 20) for _ in range(3)] == [1, 2, 3]
        assert runs[0] == 3  # the first run and two retries
        assert app.stats.retried == 2 and app.stats.failed == 1 and app.stats.invalid == 1
        assert app.stats.handled == 3
        assert "failed on sensors/poison (18 bytes, 3 run(s)" in caplog.text
        assert "acknowledged and dropped" in caplog.text

        # Acknowledged means gone: the same session gets neither message again.
        runs.clear()
        async with running(MqttApp(router, settings)) as app:
            await mosquitto_pub(broker, "sensors/ok", '{"temperature": 4}')
            assert await asyncio.wait_for(good.get(), 20) == 4
        assert runs == {4: 1}
        assert app.stats.received == 1


@pytest.mark.timeout(60)
async def test_a_handler_raising_cancelled_error_itself_does_not_hold_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """CancelledError that the handler raises (not the app cancelling it) is a failure like any
    other: acknowledged and logged, so it cannot hold a place in the window across restarts."""
    good: asyncio.Queue[int] = asyncio.Queue()
    router = Router()

    @router.on("cancel/{kind}/{n}", qos=1)
    async def handler(kind: str, n: str) -> None:
        if kind == "bad":
            raise asyncio.CancelledError()
        good.put_nowait(int(n))

    async with own_mosquitto(tmp_path) as broker:
        settings = broker.settings(mqtt_clean_session=False, mqtt_receive_maximum=2)
        caplog.set_level(logging.INFO, "topiq.mqtt")
        async with running(MqttApp(router, settings)) as app:
            for n in range(3):
                await mosquitto_pub(broker, f"cancel/bad/{n}", "x")
            for n in range(3):
                await mosquitto_pub(broker, f"cancel/ok/{n}", "x")
            assert sorted([await asyncio.wait_for(good.get(), 20) for _ in range(3)]) == [0, 1, 2]
        assert app.stats.failed == 3
        assert "raised CancelledError" in caplog.text

        # Acknowledged: a new app on the same session gets none of them again.
        async with running(MqttApp(router, settings)) as app:
            await mosquitto_pub(broker, "cancel/ok/9", "x")
            assert await asyncio.wait_for(good.get(), 20) == 9
        assert app.stats.received == 1


# -- (d) the window is bounded ---------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_at_most_receive_maximum_messages_are_in_the_app_at_once(broker: Broker) -> None:
    window = 5
    release = asyncio.Event()
    in_hand = 0
    most = 0
    arrived = asyncio.Condition()
    done: asyncio.Queue[int] = asyncio.Queue()
    router = Router()

    @router.on("topiq-test/window/{run}/{n}", qos=1)
    async def blocks(n: str) -> None:
        nonlocal in_hand, most
        in_hand += 1
        most = max(most, in_hand)
        async with arrived:
            arrived.notify_all()
        await release.wait()
        in_hand -= 1
        done.put_nowait(int(n))

    run = uuid.uuid4().hex[:12]
    settings = broker.settings(mqtt_receive_maximum=window, mqtt_handler_concurrency=50)
    async with running(MqttApp(router, settings)) as app:
        for n in range(20):
            await mosquitto_pub(broker, f"topiq-test/window/{run}/{n}", "{}")
        async with arrived:
            await asyncio.wait_for(arrived.wait_for(lambda: in_hand == window), 20)
            # A sixth message would be in the app by now if the broker were sending it:
            # give it a second to show up (it must not).
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(arrived.wait_for(lambda: in_hand > window), 1.0)
        assert app.stats.received == window
        release.set()
        assert sorted([await asyncio.wait_for(done.get(), 20) for _ in range(20)]) == list(
            range(20)
        )
    assert most == window


@pytest.mark.timeout(60)
async def test_qos0_messages_beyond_the_window_are_dropped_and_counted(broker: Broker) -> None:
    window = 3
    release = asyncio.Event()
    router = Router()

    @router.on("topiq-test/window0/{run}", qos=0)
    async def blocks() -> None:
        await release.wait()

    run = uuid.uuid4().hex[:12]
    settings = broker.settings(mqtt_receive_maximum=window)
    async with running(MqttApp(router, settings)) as app:
        await mosquitto_pub(broker, f"topiq-test/window0/{run}", qos=0, lines=["{}"] * 10)
        await until(lambda: app.stats.dropped == 7, 20, "7 QoS 0 messages dropped")
        assert app.stats.received == window
        release.set()
    assert app.stats.handled == window


# -- (e) QoS 2 routes are subscribed at QoS 1 ------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_qos2_route_is_subscribed_at_qos1_with_a_warning(
    broker: Broker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    got: asyncio.Queue[int] = asyncio.Queue()
    router = Router()

    @router.on(f"{prefix}/exactly-once", qos=2)
    async def once(context: MessageContext) -> None:
        got.put_nowait(context.qos)

    caplog.set_level(logging.WARNING, "topiq.mqtt")
    options = ConnectionOptions.from_settings(broker.settings())
    async with running(MqttApp(router, broker.settings(), options=options)):
        await mosquitto_pub(broker, f"{prefix}/exactly-once", "{}", qos=2)
        assert await asyncio.wait_for(got.get(), 20) == 1
    assert f"subscribing to '{prefix}/exactly-once' at QoS 1, not the QoS 2" in caplog.text


# -- the queue backend down mid-stream: messages are held, not dropped -----------------------------


def stored_in_redis(url: str, run: str) -> list[int]:
    """The `n` of every job of `run` in the Redis queue (repeats kept); [] while it is down."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        found = []
        for key in client.scan_iter(match="*:payloads"):
            for payload in client.hvals(key):
                data = json.loads(payload)["data"]
                if data.get("run") == run:
                    found.append(int(data["n"]))
        return found
    except redis.exceptions.RedisError:
        return []
    finally:
        client.close()


def stored_in_redis_file(workdir: Path, run: str) -> list[int]:
    """Jobs of `run` in a stopped Redis's append-only file (what survives its restart)."""
    found = []
    for aof in workdir.rglob("*.aof"):
        text = aof.read_bytes().decode("utf-8", "replace")
        found += [int(n) for n in re.findall(rf'"run":"{run}","n":(\d+)', text)]
    return found


@pytest.mark.process
@pytest.mark.redis
@pytest.mark.timeout(150)
async def test_messages_are_held_while_the_queue_is_down_and_none_is_lost(tmp_path: Path) -> None:
    """Redis killed mid-stream and restarted: each message's push fails for a while; the app
    holds them unacknowledged (never treats an outage as a poison message) and every one has
    its job once Redis is back."""
    from tests.test_worker_processes import PrivateRedis

    run = uuid.uuid4().hex[:12]
    redis_server = PrivateRedis(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis_server.start()
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    try:
        async with own_mosquitto(tmp_path) as broker:
            env = broker.env(
                MQTT_CLEAN_SESSION="false",
                MQTT_CLIENT_ID=f"delivery-outage-{run}",
                QUEUE_CONNECTION="redis",
                REDIS_URL=url,
                MQTT_HANDLER_CONCURRENCY="4",
                MQTT_RECEIVE_MAXIMUM="20",
                DELIVERY_HANDLER_DELAY="0.01",
                # Without the offline spool: the held path is what this test is about (the
                # spool's own: tests/test_iot_spool_processes.py).
                MQTT_SPOOL_MAX="0",
            )
            app = await start_app(env)
            try:
                await mosquitto_pub(broker, f"topiq-test/{run}/in", lines=lines(MESSAGES))
                await until(lambda: len(stored_in_redis(url, run)) >= 30, 60, "30 jobs stored")
                redis_server.kill()
                at_kill = len(set(stored_in_redis_file(tmp_path / "redis", run)))
                await app.wait_for_line("could not reach the queue", timeout=30)
                # The outage itself is what is tested: longer than all of a handler's retries
                # (0.2 s + 0.4 s by default), which used to drop the messages as poison.
                await asyncio.sleep(2.0)
                redis_server.start()  # same port and AOF: the jobs stored before come back
                await until(
                    lambda: len(set(stored_in_redis(url, run))) >= MESSAGES,
                    90,
                    f"{MESSAGES} distinct jobs after the outage",
                )
            finally:
                code = await app.stop()
            jobs = stored_in_redis(url, run)
            assert sorted(set(jobs)) == list(range(MESSAGES))
            assert "acknowledged and dropped" not in app.log, app.log
            assert code == 0, app.log
            assert at_kill < MESSAGES, "the stream was over before the outage: nothing tested"
            print(
                f"\nRedis outage: {MESSAGES} messages in, about {at_kill} stored at the kill, "
                f"{len(set(jobs))} distinct jobs after ({len(jobs) - MESSAGES} repeats)"
            )
    finally:
        redis_server.kill()


@pytest.mark.process
@pytest.mark.timeout(60)
async def test_sigterm_ends_an_app_whose_sync_handler_outlives_the_grace(tmp_path: Path) -> None:
    """A plain `def` handler cannot be cancelled: the app still exits after the grace period
    (it used to wait for the thread forever), and the message comes again to the next app."""
    run = uuid.uuid4().hex[:12]
    async with own_mosquitto(tmp_path) as broker:
        env = broker.env(
            MQTT_CLEAN_SESSION="false",
            MQTT_CLIENT_ID=f"delivery-block-{run}",
            QUEUE_CONNECTION="memory",
            MQTT_GRACE="1",
        )
        argv = ["serve", "--app", "tests.mqtt.delivery_apps:blocking"]
        app = await AppProcess(argv, env).start()
        try:
            await app.wait_for_line("connected to the MQTT broker")
            await mosquitto_pub(broker, f"topiq-test/{run}/block", '{"n": 7}')
            await app.wait_for_line("delivery-test blocking n=7")
            started = time.monotonic()
            code = await app.stop(timeout=20)
            took = time.monotonic() - started
        finally:
            await app.kill()
        assert code == 0, app.log
        assert took < 15, f"exit took {took:.1f}s"
        assert "still running after the grace period" in app.log

        again = await AppProcess(argv, {**env, "DELIVERY_BLOCK_SECONDS": "0"}).start()
        try:
            await again.wait_for_line("delivery-test blocking n=7", timeout=20)
        finally:
            await again.stop()
        print(f"\nsync handler past the grace: exit 0 after {took:.2f}s; the message came again")
