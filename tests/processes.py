"""Real worker processes for the tests whose behaviour lives in a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """`python main.py queue:work …` with its output captured in a file."""

    def __init__(
        self, args: list[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT
    ) -> None:
        self.log = log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "queue:work", *args],
                cwd=cwd,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def workers(
    count: int, args: list[str], env: Mapping[str, str], logs: Path
) -> Iterator[list[WorkerProcess]]:
    """Start `count` workers; whatever happens, none outlives the test."""
    started = [WorkerProcess(args, env, logs / f"worker-{i}.log") for i in range(count)]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition that another process makes true.

    Processes tell us things through files they append to, and a file offers no event to
    await; so this checks every 20 ms, bounded by `timeout`.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
