"""`health` (#15 §6) and `core.health.check_health`: exit 0 when the backend answers and a
live worker exists, 1 otherwise with the reason on one line; `--no-workers` asks only for the
backend; `--json` prints the `Health` fields. Real servers, real worker processes, and a real
socket that accepts and never answers for a backend that hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from core.health import Health, check_health
from core.queue.queue_manager import QueueManager
from tests.conftest import Backend, make_settings
from tests.processes import ROOT, wait_until, workers
from tests.servers import free_port
from tests.test_worker_processes import PrivateRedis

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "health", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_no_live_worker_is_unhealthy_unless_no_workers_is_asked(
    server_backend: Backend,
) -> None:
    env = server_backend.env()
    lonely = health(env)
    assert lonely.returncode == 1
    assert lonely.stderr.strip() == (
        f"topiq: unhealthy: no live worker on connection {server_backend.connection!r}"
    )
    assert lonely.stdout == ""
    answered = health(env, "--no-workers", "--json")
    assert answered.returncode == 0, answered.stderr
    assert orjson.loads(answered.stdout) == {
        "ok": True,
        "connection": server_backend.connection,
        "backend": True,
        "workers": 0,
        "error": "",
    }


def test_a_live_worker_makes_it_healthy_and_its_end_unhealthy(
    server_backend: Backend, tmp_path: Path
) -> None:
    env = server_backend.env()
    with workers(1, [], env, tmp_path) as [proc]:
        wait_until(lambda: "starting:" in proc.output, 60, "the worker to start")
        wait_until(lambda: health(env).returncode == 0, 30, "the worker's first heartbeat")
        ok = health(env)
        assert ok.stdout.startswith(
            f"healthy: the {server_backend.connection} backend answers; 1 live worker(s)"
        )
        as_json = orjson.loads(health(env, "--json").stdout)
        assert as_json["ok"] is True and as_json["workers"] == 1
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # A worker that stops removes itself: no live worker at once.
    assert health(env).returncode == 1


@pytest.mark.parametrize("kind", ["redis", "database"])
def test_a_backend_that_is_down_is_unhealthy_with_the_reason(kind: str) -> None:
    port = free_port()
    url = (
        f"redis://127.0.0.1:{port}/0"
        if kind == "redis"
        else f"mysql+aiomysql://topiq:topiq@127.0.0.1:{port}/topiq_test"
    )
    env = {"QUEUE_CONNECTION": kind, "REDIS_URL" if kind == "redis" else "DB_URL": url}
    started = time.monotonic()
    down = health(env, "--no-workers")
    assert down.returncode == 1
    assert down.stdout == ""
    [line] = down.stderr.strip().splitlines()
    assert line.startswith(f"topiq: unhealthy: cannot reach the {kind} backend: ")
    assert time.monotonic() - started < 30
    as_json = health(env, "--json")
    assert as_json.returncode == 1
    answer = orjson.loads(as_json.stdout)
    assert answer["ok"] is False and answer["backend"] is False and answer["workers"] == 0
    assert answer["error"].startswith(f"cannot reach the {kind} backend: ")
    assert "topiq:topiq" not in as_json.stdout + as_json.stderr  # no password shown


def test_a_backend_that_never_answers_times_out(silent_port: int) -> None:
    env = {"QUEUE_CONNECTION": "redis", "REDIS_URL": f"redis://127.0.0.1:{silent_port}/0"}
    started = time.monotonic()
    hung = health(env, "--timeout", "1", "--no-workers")
    elapsed = time.monotonic() - started
    assert hung.returncode == 1
    assert "unhealthy" in hung.stderr and "1 s" in hung.stderr, hung.stderr
    assert elapsed < 15  # the interpreter's start, plus the one second


async def test_check_health_never_raises_and_reports_a_hung_backend(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        settings = make_settings(
            queue_connection="redis", redis_url=f"redis://127.0.0.1:{server.port}/0"
        )
        async with QueueManager(settings) as manager:
            driver = await manager.connection()
            assert (await check_health(driver, need_workers=False)).ok
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)  # hung: connected, never answering
            try:
                hung = await check_health(driver, timeout=0.5)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            server.kill()
            down = await check_health(driver, timeout=5)
    finally:
        server.kill()
    assert hung == Health(False, "redis", False, 0, "backend 'redis' did not answer within 0.5 s")
    assert hung.to_dict()["error"] == hung.error
    assert not down.ok and not down.backend
    assert down.error.startswith("backend 'redis' failed: ")
    assert "\n" not in down.error


async def test_check_health_counts_live_workers_on_every_driver(backend: Backend) -> None:
    from core.queue.drivers.base import WorkerInfo

    async with QueueManager(backend.settings()) as manager:
        driver = await manager.connection()
        assert (await check_health(driver)).error == (
            f"no live worker on connection {backend.connection!r}"
        )
        now = time.time()
        for n in range(2):
            info = WorkerInfo(f"h:{n}", "h", n, backend.connection, ("q",), 1, now, now, 0, ())
            await driver.report_worker(info, ttl=30)
        assert await check_health(driver) == Health(True, backend.connection, True, 2)
        await driver.remove_worker("h:0")
        await driver.remove_worker("h:1")
        assert (await check_health(driver, need_workers=False)).ok
