"""Workflows and limits across real worker processes, on every server driver (issue #13).

What only several processes show: a rate limit and a concurrency limit hold across workers
(checked inside each worker's reserve step, against the server's clock), a dependent whose two
dependencies end at the same moment on two workers is released exactly once, and a chain's
state survives its worker killed with -9.

Times come from the job records (`started_at` when a worker reserved the try, `ended_at` when
it acked), which every driver takes from one clock for all workers: the server's. The jobs
also log their own view (tests/workflow_jobs.py) so that a run count never depends on a record.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import pytest

from core.queue.handle import JobHandle
from core.queue.queue_manager import QueueManager, chain
from core.status import JobStatus, Progress, Status
from tests.conftest import Backend
from tests.jobs import events
from tests.processes import WorkerProcess, wait_until, workers
from tests.workflow_jobs import Dependent, Partner, RateLimited, Step, TwoAtOnce

pytestmark = [pytest.mark.process, pytest.mark.timeout(150)]

#: The coarsest resolution a driver keeps a record's times at (Redis: milliseconds).
CLOCK_RESOLUTION = 0.001


async def started(procs: Iterable[WorkerProcess]) -> None:
    """Every worker is up and polling (it says so in its log)."""

    def up(proc: WorkerProcess) -> bool:
        return "starting:" in proc.output

    for proc in procs:
        await asyncio.to_thread(wait_until, partial(up, proc), 60, "the workers to start")


def stop(procs: Iterable[WorkerProcess]) -> None:
    """SIGTERM each worker; each must exit cleanly."""
    procs = list(procs)
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(30) == 0, proc.output[-3000:]


async def records(handles: Iterable[JobHandle], timeout: float) -> list[JobStatus]:
    """Wait for each job's end (its handle's `result`), then read its record."""
    out = []
    for handle in handles:
        await handle.result(timeout=timeout)
        out.append(await handle.status())
    return out


def most_at_once(spans: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at one instant; one ending exactly where another starts does
    not overlap it."""
    edges = sorted((t, d) for start, end in spans for t, d in ((start, 1), (end, -1)))
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


async def test_rate_limit_5_per_second_holds_across_3_workers(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    n = 30
    async with QueueManager(server_backend.settings()) as manager:
        with workers(3, ["--concurrency", "4"], server_backend.env(), tmp_path) as procs:
            await started(procs)
            handles = await manager.bulk([RateLimited(log, i) for i in range(n)])
            done = await records(handles, timeout=60)
            stop(procs)

    assert [r.status for r in done] == [Status.SUCCEEDED] * n
    assert [r.attempts for r in done] == [1] * n
    runs = events(log, "run")
    assert Counter(e["n"] for e in runs) == {i: 1 for i in range(n)}  # each ran once
    assert len({e["pid"] for e in runs}) > 1  # the workers did compete for the starts
    starts = sorted(r.started_at for r in done if r.started_at is not None)
    assert len(starts) == n
    # No window of 1 s holds 6 starts: any 6 consecutive starts span at least a second.
    tight = [
        (starts[i], starts[i + 5] - starts[i])
        for i in range(n - 5)
        if starts[i + 5] - starts[i] < 1.0 - CLOCK_RESOLUTION
    ]
    assert not tight, f"6 starts within less than 1 s: {tight}"
    spans = [starts[i + 5] - starts[i] for i in range(n - 5)]
    print(
        f"rate: {n} starts over {starts[-1] - starts[0]:.3f}s, 6 in a row span >= {min(spans):.3f}s"
    )


@pytest.mark.parametrize("concurrency", [4, 1])
async def test_concurrency_limit_2_holds_across_3_workers(
    server_backend: Backend, log: str, tmp_path: Path, concurrency: int
) -> None:
    """Of concurrency 4, one worker alone could run 4 (a worker that acks a job of the key
    reserves in the same step, so it tends to take the next one itself); of concurrency 1,
    running 2 at once takes two processes, and the third must be held back."""
    n = 16
    args = ["--concurrency", str(concurrency)]
    async with QueueManager(server_backend.settings()) as manager:
        with workers(3, args, server_backend.env(), tmp_path) as procs:
            await started(procs)
            handles = await manager.bulk([TwoAtOnce(log, i, seconds=0.3) for i in range(n)])
            done = await records(handles, timeout=60)
            stop(procs)

    assert [r.status for r in done] == [Status.SUCCEEDED] * n
    assert [r.attempts for r in done] == [1] * n
    spans = [(r.started_at, r.ended_at) for r in done]
    assert all(start is not None and end is not None for start, end in spans)
    held = [(float(s), float(e)) for s, e in spans]  # type: ignore[arg-type]
    # The records: from the reserve that counted the start to the ack that ended it.
    assert most_at_once(held) == 2, sorted(held)
    # The jobs' own view (inside those spans): never more than 2 either, each ran once.
    starts = {e["n"]: e["t"] for e in events(log, "start")}
    ends = {e["n"]: e["t"] for e in events(log, "end")}
    assert sorted(starts) == sorted(ends) == list(range(n))
    assert most_at_once((starts[i], ends[i]) for i in range(n)) <= 2
    pids = {e["pid"] for e in events(log, "start")}
    if concurrency == 1:
        assert len(pids) > 1  # several workers took part
    print(f"concurrency: {n} jobs in {max(e for _, e in held) - min(s for s, _ in held):.3f}s "
          f"by {len(pids)} worker(s), at most 2 at once")  # fmt: skip


async def test_a_dependent_of_two_jobs_ending_together_on_two_workers_runs_once(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    pairs = 30
    async with QueueManager(server_backend.settings()) as manager:
        # Everything is stored before a worker runs: each dependent is deferred, none applies
        # an end at push time; the race is only between the two ends of its pair.
        pair_handles = []
        dependents = []
        for k in range(pairs):
            a, b = await manager.bulk([Partner(log, k, "a"), Partner(log, k, "b")])
            pair_handles.append((a, b))
            dependents.append(await manager.push(Dependent(log, k), depends_on=[a, b]))
        first = await dependents[0].status()
        assert first.status == Status.DEFERRED
        assert first.waiting_for == (pair_handles[0][0].id, pair_handles[0][1].id)
        # One job at a time per worker: the two partners of a pair run in two processes.
        with workers(3, ["--concurrency", "1"], server_backend.env(), tmp_path) as procs:
            done = await records(dependents, timeout=60)
            partners = await records([h for pair in pair_handles for h in pair], timeout=10)
            stop(procs)

    assert [r.status for r in done] == [Status.SUCCEEDED] * pairs
    assert [r.attempts for r in done] == [1] * pairs
    ran = Counter(e["pair"] for e in events(log, "dependent"))
    assert ran == {k: 1 for k in range(pairs)}, ran  # each dependent ran exactly once
    assert [r.status for r in partners] == [Status.SUCCEEDED] * 2 * pairs
    # The race was real: the partners of each pair left together from two processes.
    leaving = {(e["pair"], e["side"]): e["pid"] for e in events(log, "leave")}
    assert all(leaving[k, "a"] != leaving[k, "b"] for k in range(pairs))
    gaps = sorted(
        abs(float(a.ended_at or 0) - float(b.ended_at or 0))
        for a, b in zip(partners[::2], partners[1::2], strict=True)
    )
    # (SQLite takes one writer at a time: there, the second end waits for the first's commit.)
    close = sum(gap < 0.05 for gap in gaps)
    assert close >= pairs // 3, f"only {close} pairs ended within 50 ms of each other: {gaps}"
    print(f"dependents: partners' ends apart by median {gaps[pairs // 2] * 1000:.1f} ms, "
          f"max {gaps[-1] * 1000:.1f} ms; each of {pairs} dependents ran once")  # fmt: skip


async def test_a_chain_survives_its_worker_killed_mid_member(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    async with QueueManager(server_backend.settings()) as manager:
        flow = await chain(Step(log, 0), Step(log, 1, seconds=1.0), Step(log, 2)).dispatch(manager)
        first = WorkerProcess([], server_backend.env(), tmp_path / "first.log")
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: any(e["n"] == 1 for e in events(log, "start")),
                60,
                "the chain's second member to start",
            )
            first.signal(signal.SIGKILL)
            first.wait(10)
            killed = time.monotonic()
        finally:
            first.stop()
        mid = await flow.progress()
        assert (mid.succeeded, mid.pending) == (1, 2)  # the killed member is not ended
        with workers(1, [], server_backend.env(), tmp_path) as [second]:
            # The member's lease (timeout 3 s + margin 2 s) runs out; then it runs again.
            assert await flow.result(timeout=60) is None
            print(f"chain: done {time.monotonic() - killed:.2f}s after the kill")
            members = await records(flow.jobs, timeout=10)
            whole = await flow.status()
            stop([second])

    assert whole.status == Status.SUCCEEDED
    assert whole.kind == "chain"
    assert whole.progress == Progress(total=3, pending=0, succeeded=3)
    assert [m.status for m in members] == [Status.SUCCEEDED] * 3
    assert [m.attempts for m in members] == [1, 2, 1]
    assert [m.value() for m in members] == [0, 1, 2]
    assert [(e["n"], e["attempts"]) for e in events(log, "start")] == [
        (0, 1),
        (1, 1),
        (1, 2),
        (2, 1),
    ]
    assert [(e["n"], e["attempts"]) for e in events(log, "end")] == [(0, 1), (1, 2), (2, 1)]
