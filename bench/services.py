"""The servers a run needs: a private Redis and Mosquitto (own ports, nothing persisted), a
private RabbitMQ node for the amqp rows, and the project's MariaDB when it answers
(`scripts/services up` starts it)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

MYSQL = {"host": "127.0.0.1", "port": 3306, "user": "topiq", "password": "topiq"}
MYSQL_DB = "topiq_test"  # the account may create databases named topiq_test*


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start: {log.read_text()[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within 15 s")


def _terminate(proc: subprocess.Popen[bytes] | None, seconds: float) -> None:
    """SIGTERM a server of ours that is still running; SIGKILL it if it has not exited after
    `seconds` (a server that will not stop must not keep the run from ending)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Server:
    """A server process of ours on its own port: `with Server.redis(dir) as redis:`."""

    def __init__(self, what: str, argv: list[str], port: int, workdir: Path) -> None:
        self.what, self.argv, self.port = what, argv, port
        self.log = workdir / f"{what}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.failed = ""  # why it could not start, for a server that is optional

    @classmethod
    def redis(cls, workdir: Path) -> Server:
        port = free_port()
        argv = [
            shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
            "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
        ]  # fmt: skip
        return cls("redis", argv, port, workdir)

    @classmethod
    def mosquitto(cls, workdir: Path) -> Server:
        port = free_port()
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        server = cls("mosquitto", [binary, "-p", str(port)], port, workdir)
        server.optional = True
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    optional = False  # a server some workloads can do without: a failed start is noted

    def __enter__(self) -> Self:
        try:
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            _wait_port(self.port, self.proc, self.what, self.log)
        except (OSError, RuntimeError) as exc:
            if not self.optional:
                raise
            self.failed = f"{self.what} could not start: {exc}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _terminate(self.proc, 10)


def redis_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def mysql_status() -> tuple[str | None, str]:
    """(MariaDB version, "") when it answers with the test account, else (None, reason)."""
    try:
        import pymysql
    except ImportError:
        return None, "PyMySQL is not installed"
    try:
        conn = pymysql.connect(**MYSQL, database=MYSQL_DB, connect_timeout=3)  # type: ignore[arg-type]
    except Exception as exc:
        return None, f"MariaDB not answering at 127.0.0.1:3306 as topiq ({exc.args[-1]})"
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
        return str(row[0]) if row else "?", ""
    finally:
        conn.close()


def mysql_url(name: str) -> str:
    return f"mysql+aiomysql://topiq:topiq@127.0.0.1:3306/{MYSQL_DB}_{name}?charset=utf8mb4"


def mosquitto_version() -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout
        found = re.search(r"version (\S+)", out)
        if found:
            return found.group(1)
    return "?"


# -- RabbitMQ (the amqp rows: W1a, W2a, W4a) ------------------------------------------------

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts; run as whoever calls them
SERVICES_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"  # `scripts/services up rabbitmq`


def _speaks_amqp(port: int) -> bool:
    """Whether a broker on the port has booted: it answers the AMQP 0-9-1 header with a
    connection.start method frame (RabbitMQ opens its listeners last)."""
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as conn:
            conn.settimeout(2)
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            return conn.recv(3) == b"\x01\x00\x00"
    except OSError:
        return False


class Rabbit:
    """The broker of the amqp rows: `with Rabbit(dir) as rabbit:` then `rabbit.url`, or
    `rabbit.failed` (why there is none: the rows show n/a with it).

    A private node of our own when rabbitmq-server is installed (its own node name, port,
    Erlang cookie and data under the scratch directory, stopped at the end), else the broker
    of `scripts/services` on 127.0.0.1:5672 when one answers there."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir / "rabbitmq"
        self.url = ""
        self.failed = ""
        self.version = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def _env(self, port: int) -> dict[str, str]:
        d = self.workdir
        return {
            **os.environ,
            "HOME": str(d),  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": f"topiqbench{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "detached": "1",  # the script execs the VM: the process we hold is the node
        }

    def __enter__(self) -> Self:
        if (RABBITMQ_BIN / "rabbitmq-server").exists():
            self._start_private()
        elif _speaks_amqp(5672):
            self.url = SERVICES_AMQP_URL
        else:
            self.failed = (
                "no RabbitMQ: rabbitmq-server is not installed and nothing answers AMQP on "
                "127.0.0.1:5672 (`scripts/services up` installs and starts one)"
            )
        if self.url:
            self.version = rabbitmq_version()
        return self

    def _start_private(self) -> None:
        port = free_port()
        self.workdir.mkdir(parents=True)
        (self.workdir / "rabbitmq.conf").write_text(
            f"loopback_users = none\nlisteners.tcp.default = 127.0.0.1:{port}\n"
            "disk_free_limit.absolute = 1MB\n"
        )
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("")
        log = self.workdir / "server.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self._env(port),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 90
        while not _speaks_amqp(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                self.failed = f"the private RabbitMQ did not start: {log.read_text()[-300:]}"
                return
            time.sleep(0.1)
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"

    def _stop(self) -> None:
        _terminate(self.proc, 30)  # a broker may take a while to write its state

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


def rabbitmq_version() -> str:
    """The installed broker's version (Debian's package layout), else '?'."""
    found = sorted((RABBITMQ_BIN.parent / "lib").glob("rabbitmq_server-*"))
    return found[-1].name.split("-", 1)[1] if found else "?"
