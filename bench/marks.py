"""What a benchmark job does besides its work: count itself and tell the harness.

This runs inside the worker process of every library, so it uses only the standard library and
the synchronous `redis` client that every environment here has. The harness waits in BLPOP on
`BENCH_KEY`; the job that reaches a mark pushes a report there, so no side polls.

Environment (set by the harness for the worker process):
    BENCH_REDIS_URL: the harness's private Redis.
    BENCH_KEY: the list the harness waits on.
    BENCH_MARKS: counts at which to report, comma-separated (the last one means done).
    BENCH_EVERY: also report progress (for runs cut short): every this many jobs when counting
        in Redis, else at most every this many milliseconds.
    BENCH_SHARED: "1" to count in Redis, for workers that run each job in a new process (RQ).
    BENCH_FLUSH_MS: for several worker processes on one queue (bench/scaling.py): count here,
        and every this many milliseconds add what this process did since to a count in Redis
        and report {"pid", "count" (the total), "first", "t" (this process's last job end)}
        from a thread, so a job costs no Redis call and the harness sums the processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from typing import Any

import redis

#: W3's job in every library: seconds of asyncio.sleep. Here, not in bench/jobs.py, because
#: the peers' environments cannot import Topiq's `core`.
SLEEP = 0.01

_count = 0
_first = 0.0
_last_report = 0.0
_samples: list[float] = []
_client: redis.Redis | None = None
_config: tuple[str, frozenset[int], int, bool] | None = None


def _setup() -> tuple[str, frozenset[int], int, bool]:
    global _config
    if _config is None:
        marks = frozenset(int(m) for m in os.environ.get("BENCH_MARKS", "").split(",") if m)
        _config = (
            os.environ.get("BENCH_KEY", "bench:done"),
            marks,
            int(os.environ.get("BENCH_EVERY", "0") or 0),
            os.environ.get("BENCH_SHARED") == "1",
        )
    return _config


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1"))
    return _client


def rss_kb() -> int:
    """This process's resident set size in KiB (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def begin() -> None:
    """Called first thing by a job: the clock starts with the first job to start."""
    global _first
    key, _, _, shared = _setup()
    if shared:
        _redis().set(f"{key}:first", repr(time.time()), nx=True)
    elif not _first:
        _first = time.time()


def hit(sent: float = 0.0) -> None:
    """Called last by a job (or first, with `sent`, by a latency job): count it, report marks.

    Args:
        sent: when the dispatcher sent the job (epoch seconds); the delay to now is recorded.
            0 means no sample (not a latency job); a negative value is a warm-up job.
    """
    global _count, _last
    now = time.time()
    due = False
    key, marks, every, shared = _setup()
    if _flush_ms():
        if not _first:
            _start_flusher(now)
        _last = now  # before the count: a flush that sees this job sees its time
        _count += 1
        return
    if shared:
        client = _redis()
        if sent > 0:
            client.rpush(f"{key}:lat", repr(now - sent))
        client.set(f"{key}:first", repr(now), nx=True)
        count = int(client.incr(f"{key}:count"))
        due = bool(every) and count % every == 0
    else:
        if sent > 0:
            _samples.append(now - sent)
        begin()
        _count += 1
        count = _count
        due = bool(every) and now - _last_report >= every / 1000
    if count in marks or due:
        _report(key, count, now, shared)


def _report(key: str, count: int, now: float, shared: bool) -> None:
    global _last_report
    _last_report = now
    client = _redis()
    first = float(client.get(f"{key}:first") or now) if shared else _first
    report: dict[str, Any] = {"count": count, "first": first, "t": now, "rss_kb": rss_kb()}
    if count == max(_setup()[1], default=-1):
        report["lat"] = (
            [float(x) for x in client.lrange(f"{key}:lat", 0, -1)] if shared else _samples
        )
    client.rpush(key, json.dumps(report))


_last = 0.0
_flushing: threading.Thread | None = None


def _flush_ms() -> int:
    return int(os.environ.get("BENCH_FLUSH_MS", "0") or 0)


def _start_flusher(now: float) -> None:
    """The first job of this process: note the start and begin flushing counts (BENCH_FLUSH_MS)."""
    global _first, _flushing
    _first = now
    _flushing = threading.Thread(target=_flush_loop, name="bench-marks", daemon=True)
    _flushing.start()


def _flush_loop() -> None:
    key = _setup()[0]
    client = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1"))
    pid, sent, pause = os.getpid(), 0, _flush_ms() / 1000
    while True:
        time.sleep(pause)
        count = _count
        last = _last  # set before the count: at least as new as job `count`
        if count == sent:
            continue
        total = int(client.incrby(f"{key}:count", count - sent))
        sent = count
        report = {"pid": pid, "count": total, "mine": count, "first": _first, "t": last}
        client.rpush(key, json.dumps(report))


async def timed_sleep(seconds: float) -> None:
    """W3's job in every library: mark its start, await `seconds`, mark its end."""
    begin()
    await asyncio.sleep(seconds)
    hit()


async def numbered(index: int) -> None:
    """W9's job in every library (bench/recovery.py): note its start, await `SLEEP` seconds,
    note its end. The notes go to a list the harness reads after the run (`<key>:ev`), the
    ends also to a hash counting each job's ends (`<key>:ended`); the job whose start is the
    mark (half the jobs) tells the harness, which then kills the worker or the server."""
    key, marks, _, _ = _setup()
    client = _redis()
    pipe = client.pipeline(transaction=False)
    pipe.rpush(f"{key}:ev", f"s {index} {time.time()!r}")
    pipe.incr(f"{key}:started")
    started = int(pipe.execute()[1])
    if started in marks:
        client.rpush(key, json.dumps({"count": started, "t": time.time()}))
    await asyncio.sleep(SLEEP)
    pipe = client.pipeline(transaction=False)
    pipe.rpush(f"{key}:ev", f"e {index} {time.time()!r}")
    pipe.hincrby(f"{key}:ended", str(index), 1)
    pipe.execute()
