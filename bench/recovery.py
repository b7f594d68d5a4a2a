"""W9 and W9r: what a crash costs. Each queues `n` short numbered jobs, starts one worker and,
once half of them have started, kills something with SIGKILL: the worker process (W9, then a
new worker is started at once, as a supervisor would) or the Redis server holding the queue
(W9r: a private `redis-server` with `appendonly yes`, restarted on the same data directory).

Every job notes its start and its end in the harness's own Redis (bench/marks.py
`numbered`), which no kill touches, so the tally is made from what the jobs themselves saw:

- in flight: jobs started and not ended at the kill;
- recovery: seconds from the kill until each of those has started again or ended, and a job
  not started before the kill has started (W9r: after the restarted server answered): the
  queue moves again; n/a when some never do within the budget;
- lost: jobs that never ended by the end of the wait (the budget after the kill);
- run twice: jobs that ended more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.peers.base import Peer
from bench.worker_process import WorkerProcess

Figures = dict[str, Any]
Event = tuple[str, int, float]  # ("s" start or "e" end, the job's number, epoch seconds)


async def queue_numbered(peer: Peer, n: int, in_flight: int = 32) -> None:
    """Jobs 0..n-1, `in_flight` enqueue calls at a time (1 for a blocking client)."""
    numbers = iter(range(n))
    lanes = 1 if peer.blocking else in_flight

    async def lane() -> None:
        for index in numbers:
            await peer.enqueue_numbered(index)

    await asyncio.gather(*(lane() for _ in range(lanes)))


def events(client: redis.Redis, key: str) -> list[Event]:
    """Every start and end the jobs noted, oldest first."""
    out: list[Event] = []
    raw: bytes | str
    for raw in client.lrange(f"{key}:ev", 0, -1):
        text = raw.decode() if isinstance(raw, bytes) else raw
        kind, index, at = text.split()
        out.append((kind, int(index), float(at)))
    return sorted(out, key=lambda e: e[2])


def tally(noted: list[Event], n: int, killed_at: float, up_at: float = 0.0) -> Figures:
    """The figures of one run from the jobs' own notes (see the module's docstring); `up_at`:
    when the restarted server answered (W9r), before which no start counts as the queue
    moving again (a worker's prefetched jobs start without a server)."""
    up_at = max(up_at, killed_at)
    started = {i for kind, i, at in noted if kind == "s" and at < killed_at}
    ended = {i for kind, i, at in noted if kind == "e" and at < killed_at}
    in_flight = started - ended
    back: dict[int, float] = {}  # an in-flight job's first start or end after the kill
    again: set[int] = set()  # in-flight jobs started again after the kill
    fresh: float | None = None  # the first start after the kill of a job not started before
    for kind, i, at in noted:
        if at < killed_at:
            continue
        if i in in_flight:
            back.setdefault(i, at)
            if kind == "s":
                again.add(i)
        elif kind == "s" and i not in started and fresh is None and at >= up_at:
            fresh = at
    ends: dict[int, int] = {}
    for kind, i, _ in noted:
        if kind == "e":
            ends[i] = ends.get(i, 0) + 1
    figures: Figures = {
        "in_flight": len(in_flight),
        "lost": n - len(ends),
        "twice": sum(1 for count in ends.values() if count > 1),
        "again": len(again),
        "started_before": len(started),
    }
    missing = len(in_flight) - len(back)
    if missing or (fresh is None and len(started) < n):
        figures["recovery"] = None
        figures["recovery_na"] = (
            f"{missing} of {len(in_flight)} jobs in flight at the kill did not run again"
            if missing
            else "no job started after the kill"
        )
    else:
        figures["recovery"] = max([*back.values(), fresh or killed_at]) - killed_at
    return figures


async def _run(
    peer: Peer,
    n: int,
    budget: float,
    recover: float,
    kill: str,
    marks_url: str,
    restart_redis: Any = None,
) -> Figures:
    """Queue, start a worker, kill at the half (or after `budget` s), wait `recover` s."""
    await queue_numbered(peer, n)
    if restart_redis is not None:
        await asyncio.sleep(1.5)  # everysec: the queued jobs are on disk before the clock
    half = n // 2
    env = {"BENCH_REDIS_URL": marks_url}  # the marks stay out of the killed Redis's way
    notes: list[str] = []
    worker = WorkerProcess(peer, marks=[half], env=env, label="w9-first")
    key = worker.key
    client = redis.Redis.from_url(marks_url)
    later: WorkerProcess | None = None
    try:
        with worker:
            # The kill comes at the half, or `budget` s after the first start (start-up is
            # not in the budget: 30 s at the least from the worker's spawn).
            deadline = time.monotonic() + max(budget, 30.0)
            first = False
            while True:
                # One-second slices: a worker that died is seen, and no read outlives the
                # client's socket timeout.
                if client.blpop([key], timeout=1) is not None:
                    break
                if worker.proc is not None and worker.proc.poll() is not None:
                    raise RuntimeError(f"the worker exited: {worker.tail()}")
                if not first and int(client.get(f"{key}:started") or 0) > 0:
                    first = True
                    deadline = max(deadline, time.monotonic() + budget)
                if time.monotonic() >= deadline:
                    started = int(client.get(f"{key}:started") or 0)
                    notes.append(f"{started} of {n} jobs had started when the budget ended: "
                                 "killed then")  # fmt: skip
                    break
            killed_at = up_at = time.time()
            if kill == "worker":
                assert worker.proc is not None
                os.killpg(worker.proc.pid, signal.SIGKILL)
                worker.proc.wait()
                # The new worker reports to the same key, so its jobs' notes go on the same list.
                later = WorkerProcess(peer, marks=[], env={**env, "BENCH_KEY": key}, label="w9-new")
                later.__enter__()
            else:
                await restart_redis()
                up_at = time.time()
            deadline = killed_at + recover
            ended_all = False
            while time.time() < deadline:
                if client.hlen(f"{key}:ended") >= n:
                    ended_all = True
                    break
                alive = worker if kill != "worker" else later
                if alive is not None and alive.proc is not None and alive.proc.poll() is not None:
                    # The worker gave up on the lost server: start another, as a supervisor would.
                    notes.append("the worker exited when Redis went away; a new one was started")
                    alive.stop()
                    later = WorkerProcess(
                        peer, marks=[], env={**env, "BENCH_KEY": key}, label="w9-again"
                    )
                    later.__enter__()
                    if kill != "worker":
                        worker = later
                await asyncio.sleep(0.1)
            if ended_all:
                await asyncio.sleep(0.5)  # a late duplicate still counts as one
    finally:
        if later is not None:
            later.stop()
    noted = events(client, key)
    figures = tally(noted, n, killed_at, up_at)
    client.close()
    if kill != "worker":
        figures["down"] = up_at - killed_at
    if not ended_all:
        last = max((at for _, _, at in noted), default=0.0)
        if last > killed_at + recover - 2:  # still running jobs: the rest may be queued, not lost
            figures["lost_na"] = (
                f"still running jobs {recover:.0f}s after the kill, {n - figures['lost']} of {n} "
                "done: the jobs not done may still be queued"
            )
            figures["lost"] = None
        else:
            lost = figures["lost"]
            notes.append(f"{lost} of {n} jobs never ran to the end within {recover:.0f}s")
    if notes:
        figures["note"] = "; ".join(dict.fromkeys(notes))
    return figures


async def w9_worker_kill(
    peer: Peer, n: int, budget: float, recover: float, job_timeout: float = 0.0, **_: Any
) -> Figures:
    """W9: SIGKILL the worker once half the jobs have started, start a new one at once."""
    peer.job_timeout = job_timeout
    return await _run(peer, n, budget, recover, "worker", peer.ctx.redis_url)


class AofRedis:
    """A private redis-server with the append-only file on, on a data directory of its own."""

    def __init__(self, workdir: Path, fsync: str) -> None:
        from bench.services import free_port

        self.port = free_port()
        self.dir = workdir / f"aof-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "redis.log"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.argv = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", fsync, "--dir", str(self.dir),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        try:
            while True:  # listening, and done loading the append-only file
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log.read_text()[-300:]}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


async def w9_redis_kill(
    peer: Peer,
    n: int,
    budget: float,
    recover: float,
    fsync: str = "everysec",
    job_timeout: float = 0.0,
    **_: Any,
) -> Figures:
    """W9r: kill -9 the queue's Redis (AOF on, `appendfsync fsync`) once half the jobs have
    started; restart it at once on the same data directory; the worker keeps running."""
    server = AofRedis(Path(peer.ctx.workdir), fsync)
    server.start()
    # The queue lives on the AOF server; the jobs' notes stay on the harness's Redis.
    queued = type(peer)(dataclasses.replace(peer.ctx, redis_url=server.url))
    queued.job_timeout = job_timeout
    try:
        await queued.open()

        async def restart() -> None:
            server.kill()
            await asyncio.to_thread(server.start)

        try:
            return await _run(
                queued, n, budget, recover, "redis", peer.ctx.redis_url, restart_redis=restart
            )
        finally:
            with contextlib.suppress(Exception):
                await queued.close()
    finally:
        server.stop()
