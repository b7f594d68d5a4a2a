"""The servers a run needs: a private Redis and Mosquitto (own ports, nothing persisted), and
the project's MariaDB when it answers (`scripts/services up` starts it)."""

from __future__ import annotations

import contextlib
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
