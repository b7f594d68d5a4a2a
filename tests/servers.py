"""Private Redis and Mosquitto servers for one test session.

The suite never touches a server it did not start: each pytest session starts its own
`redis-server` and `mosquitto` on free loopback ports, in a temporary folder, and ends them when
it ends (or when it dies: the children get SIGTERM with their parent). A developer's own Redis on
6379 or Mosquitto on 1883 is never flushed, and two test runs on one machine cannot disturb each
other. MariaDB is the exception (too slow to start per session): tests use a database of their
own on the server `scripts/services up` started, see `mysql_url` in `tests/conftest.py`.

`TOPIQ_TEST_REDIS_URL` / `TOPIQ_TEST_MQTT_HOST` + `TOPIQ_TEST_MQTT_PORT` point the suite at a
server of your choice instead; the Redis database named there is flushed between tests.
"""

from __future__ import annotations

import atexit
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["PrivateServer", "free_port", "private_mosquitto", "private_redis"]

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_us() -> None:
    """In a child before exec: SIGTERM when the test process dies, even if it crashes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


class PrivateServer:
    """One server process of the session's own, on a free port."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_us,
            )
        atexit.register(self.stop)

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the private {self.name} did not start on {self.port}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_started: dict[str, PrivateServer] = {}


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="topiq-test-servers-"))


def private_redis() -> PrivateServer | None:
    """The session's own redis-server (None when it is not installed)."""
    if "redis" in _started:
        return _started["redis"]
    binary = _binary("redis-server")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    server = PrivateServer(
        "redis-server",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "16",
        ],
        port,
        workdir,
    )
    server.wait_listening()
    _started["redis"] = server
    return server


def private_mosquitto() -> PrivateServer | None:
    """The session's own Mosquitto (None when it is not installed)."""
    if "mosquitto" in _started:
        return _started["mosquitto"]
    binary = _binary("mosquitto")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # The tests hold many unacknowledged messages on purpose; keep them all.
        "max_queued_messages 100000\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\n"
        # As root, Mosquitto would switch to its own user.
        f"user {getpass.getuser()}\n"
    )
    server = PrivateServer("mosquitto", [binary, "-c", str(config)], port, workdir)
    server.wait_listening()
    _started["mosquitto"] = server
    return server
