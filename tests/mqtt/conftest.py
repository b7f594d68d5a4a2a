"""Fixtures for the MQTT tests: the real Mosquitto, its command-line clients as the devices,
and the app and a worker running inside the test.

The broker is the test session's own Mosquitto (tests/servers.py), or the one that
TOPIQ_TEST_MQTT_HOST / TOPIQ_TEST_MQTT_PORT name. When it is missing the tests skip with the
reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.mqtt import MqttApp
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import ON_CI, ROOT, make_settings
from tests.servers import private_mosquitto

# Set: that broker is used. Unset: the session's own Mosquitto (tests/servers.py).
MQTT_HOST_GIVEN = os.environ.get("TOPIQ_TEST_MQTT_HOST")
MQTT_PORT_GIVEN = int(os.environ.get("TOPIQ_TEST_MQTT_PORT", "1883"))
READY_TIMEOUT = 15.0  # seconds for an app or a broker to come up


def _missing(message: str) -> None:
    if ON_CI:
        pytest.fail(message)
    pytest.skip(message)


def _die_with_us() -> None:
    """In a child before exec: get SIGTERM when the test process dies, even if it crashes,
    so no broker or subscriber outlives a test run (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    # Into a pipe, the stdio of mosquitto and mosquitto_sub would hold lines back.
    line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    return await asyncio.create_subprocess_exec(
        *line_buffered,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_die_with_us,
    )


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Broker:
    """Where the test broker listens."""

    host: str
    port: int

    def settings(self, **overrides: Any) -> Settings:
        """Settings for an app on this broker: a fresh client id, memory queue, test jobs."""
        values: dict[str, Any] = {
            "mqtt_host": self.host,
            "mqtt_port": self.port,
            "mqtt_client_id": f"topiq-test-{uuid.uuid4().hex[:10]}",
            # Tests that need a persistent session ask for one; the rest leave nothing behind.
            "mqtt_clean_session": True,
            "queue_connection": "memory",
        }
        values.update(overrides)
        return make_settings(**values)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of an app or worker subprocess on this broker."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("MQTT_", "QUEUE_", "DB_", "REDIS_", "WORKER_"))
        }
        env.update(
            PYTHONUNBUFFERED="1",
            MQTT_HOST=self.host,
            MQTT_PORT=str(self.port),
            MQTT_CLEAN_SESSION="true",
            QUEUE_ALLOWED_MODULES="app.,tests.",
            WORKER_SLEEP="0.05",
            LOG_LEVEL="INFO",
        )
        env.update(extra)
        return env


@pytest.fixture
def broker() -> Broker:
    """The shared Mosquitto, with its command-line clients."""
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed; `scripts/services up` installs it")
    if not MQTT_HOST_GIVEN:
        server = private_mosquitto()
        if server is None:
            _missing("mosquitto is not installed; `scripts/services up` installs it")
            raise AssertionError("unreachable")
        return Broker("127.0.0.1", server.port)
    try:
        with socket.create_connection((MQTT_HOST_GIVEN, MQTT_PORT_GIVEN), 2):
            pass
    except OSError:
        _missing(
            f"Mosquitto is not answering at {MQTT_HOST_GIVEN}:{MQTT_PORT_GIVEN} "
            "(TOPIQ_TEST_MQTT_HOST/TOPIQ_TEST_MQTT_PORT)"
        )
    return Broker(MQTT_HOST_GIVEN, MQTT_PORT_GIVEN)


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test (or test run) uses."""
    return f"topiq-test/{uuid.uuid4().hex[:12]}"


# -- the devices: mosquitto_pub and mosquitto_sub ---------------------------------------------


async def mosquitto_pub(
    broker: Broker,
    topic: str,
    message: str | bytes | None = None,
    *,
    qos: int = 1,
    lines: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Publish like a device: one message, or one message per line of `lines` (`-l`)."""
    args = ["-h", broker.host, "-p", str(broker.port), "-q", str(qos), "-t", topic, *extra]
    if lines is not None:
        args.append("-l")
        data: bytes | None = ("\n".join(lines) + "\n").encode()
    else:
        args += ["-s"]  # the payload from stdin, byte for byte
        data = message.encode() if isinstance(message, str) else (message or b"")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(data), 20)
    assert proc.returncode == 0, f"mosquitto_pub {' '.join(args)} failed: {output.decode()}"


class MosquittoSub:
    """`mosquitto_sub` on some topics, ready once the broker acknowledged the subscription."""

    def __init__(self, broker: Broker, *topics: str, extra: Sequence[str] = ()) -> None:
        self.broker = broker
        self.topics = topics
        self.extra = extra
        self._proc: asyncio.subprocess.Process | None = None
        self.debug: list[str] = []

    async def __aenter__(self) -> MosquittoSub:
        args = ["-h", self.broker.host, "-p", str(self.broker.port), "-q", "1", "-d"]
        for topic in self.topics:
            args += ["-t", topic]
        args += ["-F", "MSG\t%t\t%p", *self.extra]
        self._proc = await _spawn("mosquitto_sub", *args)
        try:
            # `-d` prints "Subscribed (mid: …)" once the SUBACK is in: the event to wait for.
            while True:
                line = await self._line(READY_TIMEOUT)
                self.debug.append(line)
                if line.startswith("Subscribed"):
                    return self
        except BaseException:
            await self.__aexit__()
            raise

    async def _line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        raw = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError("mosquitto_sub exited: " + " | ".join(self.debug[-5:]))
        return raw.decode(errors="replace").rstrip("\n")

    async def receive(self, count: int, timeout: float = 20.0) -> list[tuple[str, str]]:
        """The next `count` messages as (topic, payload)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        found: list[tuple[str, str]] = []
        while len(found) < count:
            remaining = deadline - loop.time()
            try:
                line = await self._line(max(0.01, remaining))
            except TimeoutError:
                raise AssertionError(
                    f"mosquitto_sub got {len(found)} of {count} messages in {timeout}s: {found}"
                ) from None
            if line.startswith("MSG\t"):
                _, topic, payload = line.split("\t", 2)
                found.append((topic, payload))
            else:
                self.debug.append(line)
        return found

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()


# -- the app and a worker inside the test ----------------------------------------------------


@contextlib.asynccontextmanager
async def running(app: MqttApp) -> AsyncIterator[MqttApp]:
    """Run `app` until the block ends; enter once it is connected and subscribed."""
    task = asyncio.create_task(app.run())
    ready = asyncio.create_task(app.wait_ready())
    try:
        done, _ = await asyncio.wait(
            {task, ready}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # it died: raise why
        assert ready in done, f"the app did not connect within {READY_TIMEOUT}s"
        yield app
    finally:
        ready.cancel()
        app.stop()
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def running_worker(manager: QueueManager, queue: str) -> AsyncIterator[Worker]:
    """A worker on `queue` in this process until the block ends."""
    worker = Worker(manager, WorkerOptions(queues=(queue,), sleep=0.05, grace=5))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


# -- processes --------------------------------------------------------------------------------


class AppProcess:
    """`python main.py <args>` with stderr watched line by line."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: Path = ROOT) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.lines: list[str] = []
        self.stdout = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stdout_reader: asyncio.Task[bytes] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> AppProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "main.py"),
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        assert self._proc.stdout is not None
        self._stdout_reader = asyncio.create_task(self._proc.stdout.read())
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def wait_for_line(self, text: str, timeout: float = READY_TIMEOUT) -> str:
        """The first stderr line containing `text`, waiting for it to be written."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if text in line:
                    return line
            seen = len(self.lines)
            assert self._reader is not None
            if self._reader.done():
                raise AssertionError(f"exited without logging {text!r}:\n{self.log}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - loop.time()))
            except TimeoutError:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.log}") from None

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig`, wait for the exit; returns the exit code."""
        assert self._proc is not None
        if self._proc.returncode is None:
            self._proc.send_signal(sig)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 60) -> int:
        assert self._proc is not None and self._reader is not None
        assert self._stdout_reader is not None
        try:
            code = await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
            raise AssertionError(f"still running after {timeout}s:\n{self.log}") from None
        await self._reader
        self.stdout = (await self._stdout_reader).decode(errors="replace")
        return code

    async def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self.wait(10)


class MosquittoProcess:
    """A Mosquitto of the test's own, on its own port, persisting to `data` (so a restart keeps
    the sessions and their queued messages), started and stopped at will."""

    def __init__(self, port: int, data: Path) -> None:
        self.port = port
        self.data = data
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.output: list[str] = []

    @property
    def broker(self) -> Broker:
        return Broker("127.0.0.1", self.port)

    async def start(self) -> None:
        # /usr/sbin may be off PATH (CI): look there too.
        binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            _missing("mosquitto is not installed; `scripts/services up` installs it")
            return
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.data / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data}/\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            # As root, Mosquitto would switch to its own user and fail to write `data`.
            f"user {getpass.getuser()}\n"
        )
        self._proc = proc = await _spawn(binary, "-c", str(config))
        assert proc.stdout is not None
        try:
            # Mosquitto logs "... running" once it listens: the event to wait for.
            while True:
                raw = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
                if not raw:
                    raise AssertionError("mosquitto exited:\n" + "\n".join(self.output))
                line = raw.decode(errors="replace").rstrip()
                self.output.append(line)
                if line.endswith(" running"):
                    break
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self._proc = None
            raise
        self._drain = asyncio.create_task(self._keep_reading())

    async def _keep_reading(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for raw in self._proc.stdout:
            self.output.append(raw.decode(errors="replace").rstrip())

    async def stop(self) -> None:
        """SIGTERM: Mosquitto writes its persistence file, then exits."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await asyncio.wait_for(self._proc.wait(), 20)
            if self._drain is not None:
                await self._drain
        self._proc = None
