"""Fixtures for the operations tests: running `python main.py ...` in-process or as a process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from core.cli import main
from core.queue.queue_manager import QueueManager
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import ROOT, Backend

T = TypeVar("T")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():
    PYTHON = sys.executable


@dataclass(frozen=True)
class Result:
    """What a command printed and returned."""

    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Ops:
    """Runs commands against one backend, the way an operator would."""

    backend: Backend
    env_file: Path  # /dev/null: a developer's .env must not leak into the tests
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    @property
    def queue(self) -> str:
        return str(self.backend.overrides["queue_default"])

    @property
    def connection(self) -> str:
        return self.backend.connection

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.backend.env(), "LOG_LEVEL": "WARNING", **extra}

    def cli(self, *argv: str, **env: str) -> Result:
        """`python main.py ARGV` in this process (main() runs its own event loop)."""
        for key, value in self.env(**env).items():
            self.monkeypatch.setenv(key, value)
        self.capsys.readouterr()
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            code = main(["--env-file", str(self.env_file), *argv])
        finally:
            # main() installs its own log handler on the captured stderr; put pytest's back.
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    def spawn(self, *argv: str, **env: str) -> Result:
        """`python main.py ARGV` as a real process, from the project directory."""
        full_env = {**os.environ, **self.env(**env)}
        proc = subprocess.run(
            [PYTHON, "main.py", "--env-file", str(self.env_file), *argv],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def call(self, action: Callable[[QueueManager], Awaitable[T]]) -> T:
        """Run `action(manager)` on a fresh manager in its own event loop."""

        async def go() -> T:
            async with QueueManager(self.backend.settings()) as manager:
                return await action(manager)

        return asyncio.run(go())

    def work(self, **options: Any) -> None:
        """Run an in-process worker on the test queue until it is empty."""
        options.setdefault("queues", (self.queue,))
        options.setdefault("sleep", 0.05)
        options.setdefault("stop_when_empty", True)

        async def go(manager: QueueManager) -> None:
            await Worker(manager, WorkerOptions(**options)).run()

        self.call(go)


@pytest.fixture
def ops(
    server_backend: Backend,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Ops:
    """Commands on every server backend in turn (redis, sqlite, mysql)."""
    return Ops(server_backend, Path(os.devnull), capsys, monkeypatch)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")
