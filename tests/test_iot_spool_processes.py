"""The offline spool end to end (docs/iot.md, "Offline spool"): a real app process
(`python main.py serve`), a real worker process, the session's Mosquitto with `mosquitto_pub` as
the devices, and a Redis of the test's own (AOF, fsync always) that the test stops and starts.

Each message's job appends its `n` to a file when it runs (tests/iot_spool_apps.py), so a job
lost or run twice shows as a missing or repeated line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from core.queue.queue_manager import QueueManager
from tests.conftest import make_settings
from tests.iot_spool_apps import runs
from tests.mqtt.conftest import AppProcess, Broker, mosquitto_pub
from tests.processes import WorkerProcess
from tests.servers import private_mosquitto
from tests.test_worker_processes import PrivateRedis

pytestmark = [pytest.mark.mqtt, pytest.mark.redis, pytest.mark.process, pytest.mark.slow]

RATE = 200  # messages per second
BEFORE, OUTAGE, AFTER = 2.0, 10.0, 2.0  # seconds of the stream: Redis up, stopped, up again


# -- helpers ---------------------------------------------------------------------------------------


def spool_depth(path: Path) -> int:
    """Jobs in the app's spool file (0 when there is none)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            return int(db.execute("SELECT COUNT(*) FROM spool_jobs").fetchone()[0])
        except sqlite3.OperationalError:  # the table is not made yet
            return 0


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for what another process makes true (files offer no event to await)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def queue_size(url: str, queue: str) -> int:
    """Jobs of `queue` not finished in Redis (-1 while it cannot be reached)."""
    settings = make_settings(queue_connection="redis", redis_url=url)
    try:
        async with QueueManager(settings) as manager:
            return await manager.size(queue)
    except Exception:
        return -1


async def settled(
    url: str, queue: str, file: Path, spool: Path, count: int, timeout: float
) -> None:
    """Every one of `count` jobs has run, the spool is empty and nothing waits in Redis."""
    deadline = time.monotonic() + timeout
    while True:
        if (
            len(set(runs(file))) >= count
            and spool_depth(spool) == 0
            and await queue_size(url, queue) == 0
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout}s: {len(set(runs(file)))} of {count} jobs ran, "
                f"{spool_depth(spool)} spooled, {await queue_size(url, queue)} in Redis"
            )
        await asyncio.sleep(0.1)


def the_broker() -> Broker:
    server = private_mosquitto()
    if server is None:
        pytest.skip("mosquitto is not installed; `scripts/services up` installs it")
    return Broker("127.0.0.1", server.port)


@contextlib.asynccontextmanager
async def redis_of_our_own(workdir: Path) -> AsyncIterator[PrivateRedis]:
    await asyncio.to_thread(workdir.mkdir)
    server = PrivateRedis(workdir)
    try:
        yield server
    finally:
        server.kill()


def env_for(broker: Broker, tmp_path: Path, run: str, url: str) -> dict[str, str]:
    return broker.env(
        MQTT_CLEAN_SESSION="false",  # the persistent session: nothing unacknowledged is lost
        MQTT_CLIENT_ID=f"spool-{run}",
        MQTT_HANDLER_CONCURRENCY="20",
        QUEUE_CONNECTION="redis",
        QUEUE_DEFAULT=f"spool-{run}",
        REDIS_URL=url,
        MQTT_SPOOL_PATH=str(tmp_path / "spool" / "spool.sqlite3"),
        SPOOL_TEST_RUNS=str(tmp_path / "runs.txt"),
    )


async def start_app(env: dict[str, str]) -> AppProcess:
    app = await AppProcess(["serve", "--app", "tests.iot_spool_apps:router"], env).start()
    await app.wait_for_line("connected to the MQTT broker")
    return app


def start_worker(env: dict[str, str], log: Path) -> WorkerProcess:
    return WorkerProcess(["--concurrency", "8"], env, log)


# -- (a) Redis stopped for 10 s under 200 messages a second ---------------------------------------


@pytest.mark.timeout(150)
async def test_redis_stopped_for_10s_under_200_messages_a_second_runs_every_job_once(
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:12]
    broker = the_broker()
    async with redis_of_our_own(tmp_path / "redis") as redis_server:
        redis_server.start()
        url = f"redis://127.0.0.1:{redis_server.port}/0"
        env = env_for(broker, tmp_path, run, url)
        spool = tmp_path / "spool" / "spool.sqlite3"
        total = int(RATE * (BEFORE + OUTAGE + AFTER))
        app = await start_app(env)
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            publisher = await asyncio.create_subprocess_exec(
                "mosquitto_pub",
                *("-h", broker.host, "-p", str(broker.port), "-q", "1"),
                *("-t", f"topiq-test/{run}/in", "-l"),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert publisher.stdin is not None
            started = time.monotonic()
            stop_at, start_at = int(RATE * BEFORE), int(RATE * (BEFORE + OUTAGE))
            stopped_for = 0.0
            for n in range(total):
                if n == stop_at:
                    redis_server.kill()  # SIGKILL; the AOF (fsync always) keeps every write
                    stopped = time.monotonic()
                elif n == start_at:
                    redis_server.start()  # same port and AOF
                    stopped_for = time.monotonic() - stopped
                publisher.stdin.write(json.dumps({"n": n}).encode() + b"\n")
                if n % 10 == 9:  # the stream's pace: 200 a second, in steps of 10
                    await publisher.stdin.drain()
                    ahead = started + (n + 1) / RATE - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            publisher.stdin.close()
            output, _ = await asyncio.wait_for(publisher.communicate(), 30)
            assert publisher.returncode == 0, output.decode()
            streamed = time.monotonic() - started
            await app.wait_for_line("dispatched jobs go to the offline spool")
            await settled(url, f"spool-{run}", tmp_path / "runs.txt", spool, total, 90)
            done = time.monotonic() - started
        finally:
            code = await app.stop()
            worker.stop()
        counts = Counter(runs(tmp_path / "runs.txt"))
        assert sorted(counts) == list(range(total)), "some message's job never ran"
        twice = {n: c for n, c in counts.items() if c != 1}
        assert not twice, f"jobs run more than once: {twice}"
        assert code == 0, app.log
        # The spool took the outage: no message was held unacknowledged or dropped.
        assert "held unacknowledged" not in app.log, app.log
        assert "acknowledged and dropped" not in app.log, app.log
        summary = app.log.splitlines()
        spooled = next(line for line in summary if "offline spool:" in line)
        print(
            f"\nRedis stopped {stopped_for:.1f}s: {total} messages in {streamed:.1f}s, "
            f"{len(counts)} jobs ran once each, all done {done:.1f}s after the first message; "
            f"{spooled.split('offline spool:')[1].strip()}"
        )


# -- (b) the app SIGKILLed with a non-empty spool -----------------------------------------------


@pytest.mark.timeout(120)
async def test_an_app_killed_with_a_full_spool_replays_it_after_its_restart(
    tmp_path: Path,
) -> None:
    run = uuid.uuid4().hex[:12]
    broker = the_broker()
    count = 300
    async with redis_of_our_own(tmp_path / "redis") as redis_server:
        url = f"redis://127.0.0.1:{redis_server.port}/0"  # not started yet: down
        # Ids from the message: the messages the broker sends again after the kill (their
        # acknowledgement lost with the process) are the same jobs, not new ones.
        env = {**env_for(broker, tmp_path, run, url), "SPOOL_TEST_JOB_IDS": "1"}
        spool = tmp_path / "spool" / "spool.sqlite3"
        app = await start_app(env)
        try:
            await mosquitto_pub(
                broker, f"topiq-test/{run}/in", lines=[json.dumps({"n": n}) for n in range(count)]
            )
            await until(lambda: spool_depth(spool) >= count, 60, f"{count} jobs spooled")
            await app.kill()  # SIGKILL
        finally:
            await app.kill()
        at_kill = spool_depth(spool)
        assert at_kill >= count
        assert runs(tmp_path / "runs.txt") == []

        redis_server.start()
        worker = start_worker(env, tmp_path / "worker.log")
        again = await start_app(env)
        try:
            line = await again.wait_for_line("from an earlier run")
            await settled(url, f"spool-{run}", tmp_path / "runs.txt", spool, count, 60)
        finally:
            code = await again.stop()
            worker.stop()
        counts = Counter(runs(tmp_path / "runs.txt"))
        assert sorted(counts) == list(range(count)), "a spooled job was lost"
        twice = {n: c for n, c in counts.items() if c != 1}
        assert not twice, f"jobs run more than once: {twice}"
        assert code == 0, again.log
        print(f"\nSIGKILL with {at_kill} jobs spooled; after the restart: {line.strip()}")


# -- SIGTERM keeps the spool for the next start --------------------------------------------------


@pytest.mark.timeout(90)
async def test_sigterm_leaves_the_spool_on_disk_for_the_next_start(tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:12]
    broker = the_broker()
    count = 50
    async with redis_of_our_own(tmp_path / "redis") as redis_server:
        url = f"redis://127.0.0.1:{redis_server.port}/0"  # down
        env = env_for(broker, tmp_path, run, url)
        spool = tmp_path / "spool" / "spool.sqlite3"
        app = await start_app(env)
        try:
            await mosquitto_pub(
                broker, f"topiq-test/{run}/in", lines=[json.dumps({"n": n}) for n in range(count)]
            )
            await until(lambda: spool_depth(spool) >= count, 60, f"{count} jobs spooled")
            started = time.monotonic()
            code = await app.stop(signal.SIGTERM, timeout=20)
            took = time.monotonic() - started
        finally:
            await app.kill()
        assert code == 0, app.log
        assert spool_depth(spool) == count
        assert f"{count} jobs left in" in app.log, app.log
        # The replay task waiting for Redis does not hold the stop up.
        assert took < 5, f"SIGTERM took {took:.1f}s"

        redis_server.start()
        worker = start_worker(env, tmp_path / "worker.log")
        again = await start_app(env)
        try:
            await settled(url, f"spool-{run}", tmp_path / "runs.txt", spool, count, 60)
        finally:
            await again.stop()
            worker.stop()
        assert sorted(runs(tmp_path / "runs.txt")) == list(range(count))


# -- a full spool: messages held unacknowledged, nothing lost ------------------------------------


@pytest.mark.timeout(120)
async def test_a_full_spool_leaves_messages_to_the_broker_and_loses_none(tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:12]
    broker = the_broker()
    count, bound = 60, 20
    async with redis_of_our_own(tmp_path / "redis") as redis_server:
        url = f"redis://127.0.0.1:{redis_server.port}/0"  # down
        env = {**env_for(broker, tmp_path, run, url), "MQTT_SPOOL_MAX": str(bound)}
        spool = tmp_path / "spool" / "spool.sqlite3"
        app = await start_app(env)
        worker: WorkerProcess | None = None
        try:
            await mosquitto_pub(
                broker, f"topiq-test/{run}/in", lines=[json.dumps({"n": n}) for n in range(count)]
            )
            await app.wait_for_line("is full (20 jobs, MQTT_SPOOL_MAX=20)")
            await app.wait_for_line("held unacknowledged")  # the app's own outage path
            # The full spool holds its bound (writes in progress when it refused included).
            await until(lambda: spool_depth(spool) == bound, 20, f"{bound} jobs spooled")
            redis_server.start()
            worker = start_worker(env, tmp_path / "worker.log")
            await settled(url, f"spool-{run}", tmp_path / "runs.txt", spool, count, 90)
            await app.wait_for_line("has room again")
        finally:
            code = await app.stop()
            if worker is not None:
                worker.stop()
        counts = Counter(runs(tmp_path / "runs.txt"))
        assert sorted(counts) == list(range(count)), "a message's job was lost"
        assert all(c == 1 for c in counts.values()), counts
        assert code == 0, app.log
        # The spool's own warning, once per episode (each held message's first retry logs
        # its error too, as for any outage).
        assert app.log.count("MQTT_SPOOL_MAX=20)") == 1, app.log
        assert "acknowledged and dropped" not in app.log, app.log
