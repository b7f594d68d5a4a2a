"""The offline spool (core/mqtt/spool.py) against its real SQLite file and a `QueueManager` on
a Redis that is not there (a free port: every push raises `ConnectionLostError`), then on the
session's Redis for the replay. The whole flow with app and worker processes:
tests/test_iot_spool_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConnectionLostError, SpoolFullError
from core.mqtt import MqttApp, MqttStats
from core.mqtt.spool import (
    Spool,
    decode_job,
    encode_job,
    replayed,
    spool_path,
    spooled_by_queue,
)
from core.origin import Origin, origin
from core.queue.drivers.base import Dependency, Limit, OutgoingJob
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.conftest import ROOT, guide_section, make_settings
from tests.iot_app import Reading
from tests.iot_spool_apps import RecordedRun
from tests.servers import free_port
from tests.test_worker_processes import PrivateRedis

pytestmark = [pytest.mark.redis]


def settings_for(tmp_path: Path, url: str | None = None, **overrides: Any) -> Settings:
    """Redis at `url`, or on a port nothing listens on (the backend is down)."""
    return make_settings(
        queue_connection="redis",
        redis_url=url or f"redis://127.0.0.1:{free_port()}/0",
        mqtt_spool_path=tmp_path / "spool" / "spool.sqlite3",
        **overrides,
    )


@contextlib.asynccontextmanager
async def spooling(
    settings: Settings, stats: MqttStats | None = None
) -> AsyncIterator[tuple[QueueManager, Spool]]:
    """A manager with the spool installed, as the MQTT app sets it up."""
    manager = QueueManager(settings)
    spool = Spool(settings, stats)
    await spool.open()
    manager.spool = spool
    try:
        yield manager, spool
    finally:
        await spool.close()
        await manager.close()


def rows(path: Path) -> list[tuple[str, str, str]]:
    """(connection, queue, job id) of every job in the spool file, in order."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        found = db.execute(
            "SELECT connection, queue, fields FROM spool_jobs ORDER BY seq"
        ).fetchall()
    return [(c, q, json.loads(f)["id"]) for c, q, f in found]


def job(log: Path, n: int) -> RecordedRun:
    return RecordedRun(str(log), n)


async def reserved_order(manager: QueueManager, queue: str, count: int) -> list[int]:
    """The `n` of the jobs Redis hands out from `queue`, in its order."""
    driver = await manager.connection()
    got = await driver.reserve([queue], count, 30)
    return [json.loads(r.payload)["data"]["n"] for r in got]


# -- writing -----------------------------------------------------------------------------------


async def test_a_push_to_a_stopped_redis_is_written_to_the_spool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    stats = MqttStats()
    caplog.set_level(logging.INFO, "topiq.mqtt.spool")
    async with spooling(settings, stats) as (manager, spool):
        assert not spool.path.exists()  # made by the first push that needs it
        handles = [await manager.push(job(tmp_path / "runs", n), "q1") for n in range(3)]
        assert spool.holds("redis") and not spool.holds("database")
        assert spool.depth == 3 and stats.spooled == 3 and stats.spool_depth == 3
    # On disk (the file and its folder were created), in push order, after the close too.
    assert rows(spool.path) == [("redis", "q1", str(h)) for h in handles]
    warnings = [r for r in caplog.records if "could not reach the queue connection" in r.message]
    assert len(warnings) == 1, "one warning per outage, not one per push"


def test_every_field_of_a_job_survives_the_spool() -> None:
    now = time.time()
    sample = OutgoingJob(
        id="job-1",
        queue="telemetry",
        payload=b'{"job":"x"}\xff',
        delay=30.0,
        job="tests.iot_spool_apps:RecordedRun",
        max_tries=4,
        at_front=True,
        check_id=True,
        unique_key="k",
        unique_for=60.0,
        on_duplicate="replace",
        ttl=120.0,
        failure_ttl=99.0,
        priority=7,
        depends_on=(Dependency("a", "q"), Dependency("b", None)),
        rule="ended",
        kind="chain",
        cancel_on_failure=True,
        limit=Limit("dev-1", rate=5, period=1.0, burst=2, concurrency=3),
        once_key="tick",
        once_for=10.0,
        group="dev-1",
        max_length=100,
        overflow="drop_oldest",
    )
    defaults = OutgoingJob("", "", b"")
    unset = [
        f.name
        for f in dataclasses.fields(OutgoingJob)
        if getattr(sample, f.name) == getattr(defaults, f.name)
    ]
    assert unset == [], f"give the sample a value for the new field(s) {unset}"
    fields, payload = encode_job(sample, now)
    back = decode_job(fields, payload, now + 10)
    assert back.delay == pytest.approx(20.0, abs=0.01)  # due 30 s after the push, 10 s passed
    assert back.ttl == pytest.approx(120.0, abs=0.01)  # counts from its due time
    assert dataclasses.replace(back, delay=30.0, ttl=120.0) == sample


def test_a_delay_and_a_ttl_spent_in_the_spool_are_spent() -> None:
    now = time.time()
    sample = OutgoingJob("j", "q", b"{}", delay=5.0, ttl=10.0)
    fields, payload = encode_job(sample, now)
    late = decode_job(fields, payload, now + 60)
    assert late.delay == 0.0  # due long ago: ready at once
    assert 0 < late.ttl <= 0.001  # expired in the spool: the backend expires it at once
    never = decode_job(*encode_job(OutgoingJob("j", "q", b"{}"), now), now + 60)
    assert never.ttl == 0.0  # no ttl stays no ttl


async def test_a_full_spool_refuses_the_whole_push_and_stores_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, mqtt_spool_max=3)
    stats = MqttStats()
    caplog.set_level(logging.INFO, "topiq.mqtt.spool")
    async with spooling(settings, stats) as (manager, spool):
        await manager.bulk([job(tmp_path / "runs", n) for n in range(2)], "q1")
        for _ in range(2):
            with pytest.raises(SpoolFullError, match="full") as caught:
                await manager.bulk([job(tmp_path / "runs", n) for n in range(2, 4)], "q1")
            assert isinstance(caught.value, ConnectionLostError)  # the app holds the message
        assert spool.depth == 2 and stats.spool_full == 2
        assert len(rows(spool.path)) == 2
        full = [r for r in caplog.records if "is full" in r.message]
        assert len(full) == 1 and full[0].levelno == logging.WARNING  # once per episode
        await manager.push(job(tmp_path / "runs", 9), "q1")  # one more fits
        assert spool.depth == 3
        assert any("has room again" in r.message for r in caplog.records)


async def test_concurrent_pushes_are_all_spooled(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with spooling(settings) as (manager, spool):
        handles = await asyncio.gather(
            *(manager.push(job(tmp_path / "r", n), "q1") for n in range(200))
        )
        assert spool.depth == 200
    assert sorted(i for _, _, i in rows(spool.path)) == sorted(map(str, handles))


async def test_adds_arriving_during_a_write_share_the_next_transaction(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with spooling(settings) as (_, spool):
        jobs = [OutgoingJob(f"j{n}", "q1", b"{}") for n in range(201)]
        await spool.add("redis", jobs[:1])  # opens the file
        assert spool.writes == 1
        await asyncio.gather(*(spool.add("redis", [j]) for j in jobs[1:]))
        assert spool.depth == 201
        assert spool.writes <= 3, f"{spool.writes} transactions for 200 concurrent adds"
    assert [i for _, _, i in rows(spool.path)] == [j.id for j in jobs]  # in the order added


async def test_a_spool_file_is_used_by_one_process_at_a_time(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    async with spooling(settings) as (manager, spool):
        await manager.push(job(tmp_path / "r", 0), "q1")
        second = Spool(settings)
        try:
            await second.open()
            assert not second.holds("redis")
            with pytest.raises(ConnectionLostError, match="used by another process"):
                await second.add("redis", [OutgoingJob("x", "q1", b"{}")])
        finally:
            await second.close()
    assert len(rows(spool.path)) == 1


async def test_a_file_that_is_not_a_spool_is_left_alone_and_pushes_are_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    path = spool_path(settings)
    path.parent.mkdir()
    path.write_bytes(b"not a database, just some bytes" * 100)
    async with spooling(settings) as (manager, spool):
        with pytest.raises(ConnectionLostError, match="cannot be used"):
            await manager.push(job(tmp_path / "r", 0), "q1")
        assert not spool.holds("redis")
    assert path.read_bytes() == b"not a database, just some bytes" * 100
    assert any("move it away" in r.message for r in caplog.records)


def test_each_process_of_a_pool_has_its_own_file(tmp_path: Path) -> None:
    settings = make_settings(mqtt_spool_path=tmp_path / "spool.sqlite3")
    assert spool_path(settings) == tmp_path / "spool.sqlite3"
    pooled = make_settings(mqtt_spool_path=tmp_path / "spool.sqlite3", mqtt_client_id_suffix="-01")
    assert spool_path(pooled) == tmp_path / "spool-01.sqlite3"


# -- replaying -----------------------------------------------------------------------------------


async def test_replay_pushes_in_order_and_new_pushes_queue_behind_the_spool(
    tmp_path: Path, redis_url: str
) -> None:
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    down = settings_for(tmp_path)
    async with spooling(down) as (manager, spool):
        for n in range(5):
            await manager.push(job(tmp_path / "r", n), queue)
    up = settings_for(tmp_path, redis_url)
    stats = MqttStats()
    async with spooling(up, stats) as (manager, spool):
        assert spool.holds("redis") and spool.depth == 5  # left by the "earlier run"
        # Redis answers, but the spool holds jobs of it: this one queues behind them.
        late = await manager.push(job(tmp_path / "r", 5), queue)
        driver = await manager.connection()
        assert spool.depth == 6 and await driver.job_status(late, queue) is None
        while spool.depth:
            await spool.replay_batch(manager, "redis")
        assert not spool.holds("redis") and stats.replayed == 6 and stats.spool_depth == 0
        assert await reserved_order(manager, queue, 10) == [0, 1, 2, 3, 4, 5]
        direct = await manager.push(job(tmp_path / "r", 6), queue)  # the spool is empty
        assert await driver.job_status(direct, queue) is not None and spool.depth == 0


async def test_replay_skips_a_job_the_backend_already_has(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A push whose reply was lost (stored, but `ConnectionLostError`) is spooled too: the
    replay finds its id and does not queue it twice, even once it has run and ended."""
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.INFO, "topiq.mqtt.spool")
    stats = MqttStats()
    async with spooling(settings_for(tmp_path, redis_url), stats) as (manager, spool):
        handle = await manager.push(job(tmp_path / "r", 1), queue)
        driver = await manager.connection()
        [reserved] = await driver.reserve([queue], 1, 30)
        await driver.ack([reserved])  # it ran and ended; its record is kept (result_ttl)
        stored = OutgoingJob(str(handle), queue, reserved.payload, job="x")
        await spool.add("redis", [stored])
        await spool.replay_batch(manager, "redis")
        assert spool.depth == 0 and stats.replayed == 0
        assert await manager.size(queue) == 0  # not queued again
        assert any("skipped 1 job" in r.message for r in caplog.records)


def maybe_sent(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute("SELECT maybe_sent FROM spool_jobs ORDER BY seq")]


async def test_only_jobs_the_backend_may_know_are_asked_about(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push that failed may have reached Redis (its reply lost); the ones queued behind the
    spool never left it. A replay that dies after its push (here: the delete fails) leaves
    every job of its batch marked, so the next replay finds them and pushes none again, even
    after they have run."""
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    async with spooling(settings_for(tmp_path)) as (manager, spool):
        for n in range(3):
            await manager.push(job(tmp_path / "r", n), queue)
        assert maybe_sent(spool.path) == [1, 0, 0]
    stats = MqttStats()
    async with spooling(settings_for(tmp_path, redis_url), stats) as (manager, spool):

        def crash(connection: str, upto: int) -> int:
            raise OSError("the process died here")

        monkeypatch.setattr(spool, "_delete", crash)
        with pytest.raises(OSError, match="died here"):
            await spool.replay_batch(manager, "redis")
        monkeypatch.undo()
        assert maybe_sent(spool.path) == [1, 1, 1] and spool.depth == 3
        driver = await manager.connection()
        ran = await driver.reserve([queue], 10, 30)
        assert len(ran) == 3
        await driver.ack(ran)  # they ran and ended
        await spool.replay_batch(manager, "redis")
        assert spool.depth == 0 and await manager.size(queue) == 0, "a job was pushed twice"


async def test_a_replay_killed_before_it_writes_a_coalesced_answer_does_not_run_it_twice(
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The replay pushes each job with its own once key (`spool:<id>`), which the backend takes
    even when the push coalesces the value into another job. Killed after the push's answer
    and before the spool writes that answer, the restarted replay pushes the value again: the
    key refuses it ("duplicate"), so it does not run a second time although the device's job
    has run meanwhile (its unique key is free: without the once key it would be queued)."""
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.INFO, "topiq.mqtt.spool")
    async with spooling(settings_for(tmp_path)) as (manager, _spool):  # Redis down
        with origin(Origin("devices/d-1/state", coalesce="d-1")):
            for n in (1, 2):
                await manager.push(Reading("d-1", n), queue)
    stats = MqttStats()
    async with spooling(settings_for(tmp_path, redis_url), stats) as (manager, spool):

        def killed(answers: list[tuple[str, int]]) -> None:
            raise OSError("the app was SIGKILLed here")  # after the push, before its answer

        monkeypatch.setattr(spool, "_answer", killed)
        with pytest.raises(OSError, match="SIGKILLed"):
            await spool.replay_batch(manager, "redis")
        monkeypatch.undo()
        driver = await manager.connection()
        ran = await driver.reserve([queue], 100, 30)
        assert [json.loads(r.payload)["data"]["seq"] for r in ran] == [2]  # the latest value
        await driver.ack(ran)  # it ran and ended
        assert await spool.replay_batch(manager, "redis") == 0  # the restarted app's replay
        assert spool.depth == 0 and stats.replayed == 0
        assert await manager.size(queue) == 0, "the coalesced value was queued to run again"
        assert await driver.reserve([queue], 100, 30) == []
        assert any("skipped 2 job" in r.message for r in caplog.records)


def test_a_replayed_job_is_pushed_with_a_once_key_of_its_own() -> None:
    stored = OutgoingJob("j-1", "q", b"{}", job="x", failure_ttl=10)
    again = replayed(stored)
    assert (again.check_id, again.once_key, again.once_for) == (True, "spool:j-1", 86400.0)
    assert replayed(dataclasses.replace(stored, failure_ttl=9e6)).once_for == 9e6
    own = dataclasses.replace(stored, once_key="tick:1", once_for=5)
    assert (replayed(own).once_key, replayed(own).once_for) == ("tick:1", 5)


async def test_a_spool_file_of_an_earlier_version_is_read_and_replayed(
    tmp_path: Path, redis_url: str
) -> None:
    """A file written before the `answered` column (a coalesced job's holder) existed gets the
    column when it is opened; its jobs are replayed as any."""
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    settings = settings_for(tmp_path, redis_url)
    path = spool_path(settings)
    path.parent.mkdir(parents=True)
    stored = OutgoingJob(uuid.uuid4().hex, queue, b'{"old": 1}', job="x")
    fields, payload = encode_job(stored, time.time())
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE spool_jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry INTEGER NOT "
            "NULL, connection TEXT NOT NULL, queue TEXT NOT NULL, fields BLOB NOT NULL, payload "
            "BLOB NOT NULL, spooled_at REAL NOT NULL, maybe_sent INTEGER NOT NULL DEFAULT 1)"
        )
        db.execute(
            "INSERT INTO spool_jobs (entry, connection, queue, fields, payload, spooled_at) "
            "VALUES (1, 'redis', ?, ?, ?, ?)",
            (queue, fields, payload, time.time()),
        )
    async with spooling(settings) as (manager, spool):
        assert spool.depth == 1
        assert await spool.replay_batch(manager, "redis") == 1 and spool.depth == 0
        driver = await manager.connection()
        assert await driver.job_status(stored.id, queue) is not None
    with contextlib.closing(sqlite3.connect(path)) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(spool_jobs)")]
    assert columns[-1] == "answered"


async def test_a_job_the_backend_refuses_is_dropped_and_logged_and_the_rest_go_on(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    stats = MqttStats()
    async with spooling(settings_for(tmp_path), stats) as (manager, spool):
        await manager.push(job(tmp_path / "r", 0), queue, depends_on="never-pushed")
        await manager.push(job(tmp_path / "r", 1), queue)
    async with spooling(settings_for(tmp_path, redis_url), stats) as (manager, spool):
        await spool.replay_batch(manager, "redis")
        assert spool.depth == 0, "a refused job must not stay in the spool"
        assert stats.spool_dropped == 1 and stats.replayed == 1
        assert await reserved_order(manager, queue, 10) == [1]
    [error] = [r for r in caplog.records if "dropped job" in r.message]
    assert error.levelno == logging.ERROR and "never-pushed" in error.message


async def test_the_replay_task_backs_off_while_redis_is_down_and_replays_once_it_is_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")  # its port is chosen, nothing listens yet
    queue = f"spool-{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:{server.port}/0"
    caplog.set_level(logging.INFO, "topiq.mqtt.spool")
    try:
        async with spooling(settings_for(tmp_path, url)) as (manager, spool):
            for n in range(10):
                await manager.push(job(tmp_path / "r", n), queue)
            replay = asyncio.create_task(spool.replay(manager))
            try:
                while not any("waits for the queue" in r.message for r in caplog.records):
                    assert not replay.done(), replay
                    await asyncio.sleep(0.02)
                assert spool.depth == 10
                await asyncio.to_thread(server.start)
                deadline = time.monotonic() + 20
                while spool.depth:  # backoff: 0.4 s, 0.8 s, ... at most 5 s
                    assert time.monotonic() < deadline, "not replayed within 20 s"
                    await asyncio.sleep(0.05)
            finally:
                replay.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replay
            assert await reserved_order(manager, queue, 20) == list(range(10))
    finally:
        server.kill()


# -- the app and queue:stats ---------------------------------------------------------------------


async def test_the_app_installs_the_spool_unless_it_is_off(tmp_path: Path) -> None:
    from core.mqtt import Router

    router = Router()
    for maximum, installed in ((0, False), (10, True)):
        settings = settings_for(tmp_path, mqtt_spool_max=maximum, mqtt_host="127.0.0.1")
        manager = QueueManager(settings)
        app = MqttApp(router, settings, manager=manager)
        spool, replay = await app._start_spool()
        assert (manager.spool is not None) is installed
        await app._stop_spool(spool, replay)
        assert manager.spool is None


def test_queue_stats_shows_the_spooled_jobs(tmp_path: Path, redis_url: str) -> None:
    queue = f"spool-{uuid.uuid4().hex[:8]}"

    async def fill() -> None:
        async with spooling(settings_for(tmp_path)) as (manager, _):
            await manager.bulk([job(tmp_path / "r", n) for n in range(3)], queue)
        async with QueueManager(settings_for(tmp_path, redis_url)) as manager:
            await manager.push(job(tmp_path / "r", 9), queue)  # Redis knows the queue

    asyncio.run(fill())
    assert spooled_by_queue(settings_for(tmp_path), "redis") == {queue: 3}
    assert spooled_by_queue(settings_for(tmp_path), "database") == {}
    env = {
        "PATH": "/usr/bin:/bin",
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": redis_url,
        "MQTT_SPOOL_PATH": str(tmp_path / "spool" / "spool.sqlite3"),
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "queue:stats", "--queue", queue, "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    [entry] = json.loads(out)["queues"]
    assert entry["spooled"] == 3 and entry["pending"] == 1


# -- the guide -----------------------------------------------------------------------------------


def test_the_guide_states_the_spool_rules() -> None:
    text = guide_section("iot.md", "spool")
    for rule in (
        "## Offline spool",
        "`MQTT_SPOOL_MAX` (`100000`)",
        "`MQTT_SPOOL_PATH`",
        "`SpoolFullError`",
        "`QUEUE_RESULT_TTL`",
        "`MQTT_CLIENT_ID_SUFFIX`",
        "`spooled`",
        "goes to the spool, behind the jobs already there",
        "On SIGTERM",
        "spool does not coalesce",
        "Coalescing happens at the replay",
        "`spool:<job id>`",
        "(logged as skipped)",
        "`JobNotFoundError`",
    ):
        assert rule in text, rule
    # The log lines the guide quotes are the ones the spool writes.
    source = (ROOT / "core" / "mqtt" / "spool.py").read_text()
    for quoted in ("is full (", "messages are left", "has room again", "from an earlier run"):
        assert quoted in text and quoted in source, quoted
