"""The workloads, written once against the `Peer` interface; each returns one run's figures."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.marks import SLEEP
from bench.peers.base import JobKind, Peer, Unsupported
from bench.recovery import w9_redis_kill, w9_worker_kill
from bench.worker_process import WorkerProcess

Figures = dict[str, Any]
BULK_CHUNK = 10_000  # jobs per bulk call when filling a queue


async def enqueue_many(
    peer: Peer, kind: JobKind, n: int, in_flight: int, budget: float = float("inf")
) -> int:
    """Up to `n` single enqueues, `in_flight` at a time (1 for a blocking client), stopping
    after `budget` seconds; returns how many were sent."""
    deadline = time.monotonic() + budget
    lanes = 1 if peer.blocking else max(1, in_flight)
    left = [n]

    async def lane() -> int:
        sent = 0
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            await peer.enqueue(kind)
            sent += 1
        return sent

    return sum(await asyncio.gather(*(lane() for _ in range(lanes))))


async def fill(peer: Peer, kind: JobKind, n: int) -> None:
    """Queue `n` jobs before a worker starts: bulk where the library has it."""
    try:
        for start in range(0, n, BULK_CHUNK):
            await peer.enqueue_bulk(kind, min(BULK_CHUNK, n - start))
    except Unsupported:
        await enqueue_many(peer, kind, n, 32)


async def w1_enqueue(peer: Peer, n: int, budget: float, **_: Any) -> Figures:
    """W1: enqueue rate, one by one with 32 in flight, then with the bulk API."""
    started = time.perf_counter()
    sent = await enqueue_many(peer, "noop", n, 32, budget)
    figures: Figures = {"one": sent / (time.perf_counter() - started)}
    if sent < n:
        figures["partial"] = f"one by one: stopped after {budget:.0f}s at {sent} of {n}"
    started = time.perf_counter()
    try:
        await peer.enqueue_bulk("noop", n)
    except Unsupported as exc:
        figures["bulk"] = None
        figures["bulk_na"] = str(exc)
    else:
        figures["bulk"] = n / (time.perf_counter() - started)
    return figures


async def _drain(peer: Peer, kind: JobKind, n: int, budget: float) -> Figures:
    """Queue `n` jobs, start the worker, wait for the last one: first start to last done."""
    await fill(peer, kind, n)
    # Progress every 250 ms (every 10 jobs where jobs count in Redis) for runs cut short.
    with WorkerProcess(peer, marks=[n], every=10 if peer.shared_marks else 250) as worker:
        report = worker.wait(n, budget)
        spawned = worker.spawned
        partial = report is None
        report = report or worker.last
    if report is None:
        raise TimeoutError(f"no job finished within {budget:.0f}s")
    done, seconds = report["count"], report["t"] - report["first"]
    figures: Figures = {
        "jobs": done,
        "seconds": seconds,
        "rate": done / seconds if seconds > 0 else None,
        "startup": report["first"] - spawned,
    }
    if partial:
        figures["partial"] = f"stopped after {budget:.0f}s at {done} of {n} jobs"
    return figures


async def w2_noop(peer: Peer, n: int, budget: float, **_: Any) -> Figures:
    """W2: no-op jobs per second, one worker process."""
    return await _drain(peer, "noop", n, budget)


async def w2_unkept(peer: Peer, n: int, budget: float, **_: Any) -> Figures:
    """W2n: W2 with jobs whose status record and result are not kept (`result_ttl = 0`)."""
    return await _drain(peer, "noop_unkept", n, budget)


async def w2_priorities(peer: Peer, n: int, budget: float, **_: Any) -> Figures:
    """W2p: W2 with each job given a random priority 0..9 (the worker hands them out highest
    first, FIFO among equals)."""
    return await _drain(peer, "noop_prio", n, budget)


async def w2_grouped(peer: Peer, n: int, budget: float, **_: Any) -> Figures:
    """W2g: W2 with each job in the group of one of 1,000 devices, round robin (one job per
    device at a time; the worker's 32 slots are shared by the devices in turn)."""
    return await _drain(peer, "noop_grouped", n, budget)


async def w2_processes(
    peer: Peer, n: int, budget: float, processes: int = 2, flush_ms: int = 10, **_: Any
) -> Figures:
    """W2x2: W2's `n` no-op jobs drained by `queue:work --processes 2` (one parent, two worker
    processes on the one queue), timed as W2 is: from the first job's end in either process to
    the last job's end in both.

    W2 fills the queue and then starts its worker; two processes started that way would not
    start together (one would work alone while the other still imports). So the processes
    start on the empty queue, and once both are registered and idle the `n` jobs go in with
    one bulk call (one script run: they land at once, and the idle workers wake each other).
    Each process counts its jobs and adds them to a count in Redis every `flush_ms`
    (bench/marks.py `BENCH_FLUSH_MS`), so a job costs no Redis call.
    """
    if peer.name != "topiq":
        raise Unsupported("`--processes` is Topiq's worker flag")
    driver = await peer.manager.connection()  # type: ignore[attr-defined]
    argv = [*peer.worker_command(), "--processes", str(processes)]
    latest: dict[int, dict[str, Any]] = {}  # each process's last report (pid -> report)
    with WorkerProcess(peer, marks=[], argv=argv, env={"BENCH_FLUSH_MS": str(flush_ms)}) as worker:
        deadline = time.monotonic() + max(budget, 30.0)  # start-up is not in the budget
        # A worker's start is no event here: look every 0.1 s (as bench/scaling.py does).
        while len(await driver.workers()) < processes:
            if worker.proc is None or worker.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(f"{processes} worker processes did not start: {worker.tail()}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # registered comes just before waiting for jobs: let both idle
        await peer.enqueue_bulk("noop", n)
        deadline = time.monotonic() + budget
        # Each report carries its process's own count (`mine`): the drain is over once the
        # latest counts add up to `n` (the total `count` may reach `n` in one process's report
        # before the other process's last report, which holds the last job's end).
        while sum(r["mine"] for r in latest.values()) < n:
            report = worker.wait(0, deadline - time.monotonic())  # the next report
            if report is None:
                break
            latest[report["pid"]] = report
    if not latest:
        raise TimeoutError(f"no job finished within {budget:.0f}s")
    if len(latest) < processes:
        raise RuntimeError(f"{len(latest)} of {processes} worker processes ran jobs")
    done = sum(r["mine"] for r in latest.values())
    first = min(r["first"] for r in latest.values())
    seconds = max(r["t"] for r in latest.values()) - first
    figures: Figures = {
        "jobs": done,
        "seconds": seconds,
        "rate": done / seconds if seconds > 0 else None,
        # how long one process worked alone at the start
        "skew": max(r["first"] for r in latest.values()) - first,
    }
    if done < n:
        figures["partial"] = f"stopped after {budget:.0f}s at {done} of {n} jobs"
    return figures


async def w3_sleep(peer: Peer, n: int, budget: float, concurrency: int = 32, **_: Any) -> Figures:
    """W3: sleep jobs; efficiency = theoretical minimum (n * SLEEP / 32) / measured."""
    figures = await _drain(peer, "sleep", n, budget)
    figures["efficiency"] = (figures["jobs"] * SLEEP / concurrency) / figures["seconds"]
    return figures


async def w4_latency(peer: Peer, n: int, rate: float, budget: float, **_: Any) -> Figures:
    """W4: an idle worker; `n` jobs dispatched one at a time at `rate`/s; dispatch to start."""
    with WorkerProcess(peer, marks=[1, n + 1]) as worker:
        await peer.enqueue("latency", -1.0)  # warm-up: the worker is up once this one ran
        if worker.wait(1, budget) is None:
            raise TimeoutError(f"the warm-up job did not run within {budget:.0f}s")
        await asyncio.sleep(0.5)  # let the worker go idle
        loop = asyncio.get_running_loop()
        origin = loop.time()
        for i in range(n):
            delay = origin + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await peer.enqueue("latency", time.time())
        report = worker.wait(n + 1, budget)
        if report is not None:
            samples = sorted(report["lat"])
        elif peer.shared_marks:  # cut short: the samples so far are in Redis
            samples = sorted(float(x) for x in worker.redis.lrange(f"{worker.key}:lat", 0, -1))
        else:
            raise TimeoutError(f"{n} latency jobs did not all run within {budget:.0f}s")
    figures: Figures = {
        "p50": statistics.median(samples) * 1000,
        "p99": samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))] * 1000,
        "samples": len(samples),
    }
    if report is None:
        figures["partial"] = (
            f"{len(samples)} of {n} jobs had started {budget:.0f}s after the last dispatch"
        )
    return figures


def _percentiles(samples: list[float]) -> Figures:
    """p50 and p99 in ms of `samples` (seconds), nearest rank."""
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered) * 1000,
        "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000,
        "samples": len(ordered),
    }


async def w8_result(
    peer: Peer, n: int, budget: float, poll: float | None = None, **_: Any
) -> Figures:
    """W8: an idle worker; `n` round trips one after the other, each the dispatch of a job
    that returns its argument and the wait for that result through the library's own call
    (Topiq `await handle.result()`, SAQ `Queue.apply`, arq `Job.result()`). W8p: the same
    with `poll` seconds between the polls of the libraries that poll (SAQ's and arq's result
    reads, arq's worker; Topiq's call blocks on the server and has no such interval)."""
    peer.poll = poll
    with WorkerProcess(peer, marks=[1]) as worker:
        # Warm-up: the worker is up once this one's result is back. A job that arrives while
        # the worker starts may be lost to its start-up (SAQ's first sweep aborts it as
        # stale): the warm-up tries again, the measured round trips never do.
        for attempt in (1, 2, 3):
            try:
                warm = await peer.round_trip(-1, timeout=max(budget, 30.0))
                break
            except TimeoutError:
                raise TimeoutError(f"no warm-up result came: {worker.tail()}") from None
            except Exception:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.5)
        if warm != -1:
            raise AssertionError(f"the warm-up job returned {warm!r}, not -1")
        await asyncio.sleep(0.5)  # let the worker go idle
        samples: list[float] = []
        deadline = time.monotonic() + budget
        for value in range(n):
            if time.monotonic() >= deadline:
                break
            started = time.perf_counter()
            got = await peer.round_trip(value, timeout=budget)
            samples.append(time.perf_counter() - started)
            if got != value:
                raise AssertionError(f"round trip {value} returned {got!r}")
    figures = _percentiles(samples)
    if len(samples) < n:
        figures["partial"] = f"stopped after {budget:.0f}s at {len(samples)} of {n} round trips"
    return figures


async def w7_memory(peer: Peer, n: int, first: int, budget: float, **_: Any) -> Figures:
    """W7: the worker's RSS after `first` and after `n` no-op jobs."""
    await fill(peer, "noop", n)
    with WorkerProcess(peer, marks=[first, n]) as worker:
        early = worker.wait(first, budget)
        late = worker.wait(n, budget)
    if early is None or late is None:
        raise TimeoutError(f"{n} jobs did not run within {budget:.0f}s")
    return {
        "rss_first_kb": early["rss_kb"],
        "rss_last_kb": late["rss_kb"],
        "growth": (late["rss_kb"] - early["rss_kb"]) / early["rss_kb"] * 100,
        "rate": (n - first) / (late["t"] - early["t"]),
    }


WORKLOADS: dict[str, Callable[..., Awaitable[Figures]]] = {
    "W1": w1_enqueue,
    "W2": w2_noop,
    "W2n": w2_unkept,
    "W2p": w2_priorities,
    "W2g": w2_grouped,
    "W2x2": w2_processes,
    "W3": w3_sleep,
    "W4": w4_latency,
    "W5": w2_noop,  # W2 on a database backend
    "W7": w7_memory,
    "W8": w8_result,
    "W9": w9_worker_kill,
    "W9r": w9_redis_kill,
}
