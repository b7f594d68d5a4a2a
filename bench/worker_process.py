"""A library's worker as a real subprocess, and the wait for the marks its jobs report."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from bench.peers.base import Peer


class WorkerDied(RuntimeError):
    """The worker process exited before its jobs were done."""


class WorkerProcess:
    """`with WorkerProcess(peer, marks=[n]) as worker:` starts the worker; exit stops it."""

    def __init__(
        self,
        peer: Peer,
        marks: list[int],
        every: int = 0,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
        label: str = "worker",
    ) -> None:
        self.peer = peer
        self.argv = argv or peer.worker_command()
        # `python -m bench.profile` samples Topiq's processes with py-spy (see profile.py).
        self.profile = os.environ.get("BENCH_PROFILE_DIR") if peer.name == "topiq" else None
        self.env = env or {}
        self.key = f"bench:marks:{uuid.uuid4().hex[:8]}"
        self.marks = marks
        self.every = every
        self.redis = redis.Redis.from_url(peer.ctx.redis_url)
        self.log = Path(peer.ctx.workdir) / f"{label}-{peer.name}-{self.key[-8:]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self.last: dict[str, Any] | None = None

    def __enter__(self) -> Self:
        env = {
            **os.environ,
            **self.peer.worker_env(),
            "PYTHONPATH": self.peer.pythonpath(),
            "BENCH_REDIS_URL": self.peer.ctx.redis_url,
            "BENCH_KEY": self.key,
            "BENCH_MARKS": ",".join(map(str, self.marks)),
            "BENCH_EVERY": str(self.every),
            "BENCH_SHARED": "1" if self.peer.shared_marks else "0",
            **self.env,
        }
        argv = self.argv
        if self.profile:
            raw = Path(self.profile) / f"{self.log.stem}.raw"
            spy = str(Path(self.profile) / "py-spy")
            argv = [spy, "record", "-r", "500", "--format", "raw", "-o", str(raw), "--", *argv]
        with self.log.open("wb") as log:
            self.spawned = time.time()
            self.proc = subprocess.Popen(
                argv,
                cwd=self.peer.ctx.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the library may fork helpers
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.redis.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait(self, count: int, budget: float) -> dict[str, Any] | None:
        """The report of mark `count`, or None when `budget` seconds pass first.

        Blocks in BLPOP (woken by the job that reaches a mark); the one-second slices only
        check that the worker is still alive.
        """
        assert self.proc is not None
        deadline = time.monotonic() + budget
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            item = self.redis.blpop([self.key], timeout=min(1.0, max(left, 0.01)))
            if item is not None:
                report: dict[str, Any] = json.loads(item[1])
                self.last = report
                if report["count"] >= count:
                    return report
            elif self.proc.poll() is not None:
                raise WorkerDied(
                    f"{self.peer.name} worker exited ({self.proc.returncode}): {self.tail()}"
                )

    def tail(self, lines: int = 8) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM the worker's process group; SIGKILL it after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            # py-spy writes its profile on SIGINT; Topiq stops the same way on either.
            os.killpg(proc.pid, signal.SIGINT if self.profile else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
