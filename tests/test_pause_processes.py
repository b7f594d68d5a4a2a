"""`queue:pause` / `queue:resume` (#15 §6) with real worker processes on Redis, SQLite and
MariaDB: a paused queue's jobs stay waiting while another queue's run, resume runs them all,
a worker killed (SIGKILL) while a queue is paused loses nothing, and the history a worker
writes with its heartbeat survives its SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.queue.drivers.base import QueueStats
from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.jobs import RecordJob, SleepJob, events
from tests.processes import ROOT, WorkerProcess, wait_until, workers

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


def cli(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    """`python main.py ARGS` against the backend, as an operator runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env={**os.environ, **backend.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def on_backend(backend: Backend, op: Any) -> Any:
    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            return await op(manager, await manager.connection())

    return asyncio.run(go())


def stats(backend: Backend, queue: str) -> QueueStats:
    async def op(manager: QueueManager, driver: Any) -> QueueStats:
        return await driver.stats(queue)  # type: ignore[no-any-return]

    result: QueueStats = on_backend(backend, op)
    return result


def send(backend: Backend, queue: str, jobs: list[Any]) -> None:
    async def op(manager: QueueManager, driver: Any) -> None:
        await manager.bulk(jobs, queue=queue)

    on_backend(backend, op)


def started(worker: WorkerProcess) -> bool:
    return "starting:" in worker.output


def test_a_paused_queue_waits_while_another_runs_and_resume_runs_it(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    queue = server_backend.settings().queue_default
    held, free = f"{queue}-held", f"{queue}-free"
    paused = cli(server_backend, "queue:pause", held, "--json")
    assert paused.returncode == 0, paused.stderr
    assert orjson.loads(paused.stdout)["paused"] is True
    args = ["--queue", f"{held},{free}", "--concurrency", "4"]
    with workers(1, args, server_backend.env(), tmp_path) as [proc]:
        wait_until(lambda: started(proc), 60, "the worker to start")
        send(server_backend, held, [RecordJob(log, n) for n in range(10)])
        send(server_backend, free, [RecordJob(log, n) for n in range(100, 110)])
        wait_until(lambda: len(events(log, "run")) >= 10, 30, "the free queue's jobs to run")
        time.sleep(1.5)  # a pause must hold: nothing to await for what does not happen
        assert sorted(e["n"] for e in events(log, "run")) == list(range(100, 110))
        waiting = stats(server_backend, held)
        assert (waiting.pending, waiting.reserved) == (10, 0)
        resumed = cli(server_backend, "queue:resume", held)
        assert resumed.returncode == 0, resumed.stderr
        assert f"Resumed queue {held}" in resumed.stdout
        wait_until(lambda: len(events(log, "run")) >= 20, 30, "the held queue's jobs to run")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
    runs = Counter(e["n"] for e in events(log, "run"))
    assert runs == {n: 1 for n in [*range(10), *range(100, 110)]}
    assert f"queue {held} resumed" in proc.output


def test_a_pause_reaches_a_busy_worker_within_about_a_second(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    queue = server_backend.settings().queue_default
    args = ["--concurrency", "2", "--prefetch", "6"]
    with workers(1, args, server_backend.env(), tmp_path) as [proc]:
        wait_until(lambda: started(proc), 60, "the worker to start")
        send(server_backend, queue, [SleepJob(log, 0.4, n) for n in range(40)])
        wait_until(lambda: len(events(log, "start")) >= 4, 30, "jobs to start")
        assert cli(server_backend, "queue:pause", queue).returncode == 0
        paused_at = time.time()
        wait_until(lambda: "is paused" in proc.output, 10, "the worker to see the pause")
        # Jobs that started by then (at most a slot's worth after the worker saw it) finish;
        # the rest, prefetched ones included, wait.
        wait_until(lambda: stats(server_backend, queue).reserved == 0, 10, "running jobs to end")
        first = events(log, "start")
        late = [e for e in first if e["t"] > paused_at + 1.2]
        assert late == [], late
        assert stats(server_backend, queue).pending == 40 - len(first)
        assert cli(server_backend, "queue:resume", queue).returncode == 0
        wait_until(lambda: len(events(log, "end")) >= 40, 60, "every job to run")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
    ends = Counter(e["n"] for e in events(log, "end"))
    assert ends == {n: 1 for n in range(40)}
    assert {e["attempts"] for e in events(log, "start")} == {1}  # nothing handed back spent


def test_sigkill_of_a_worker_while_its_queue_is_paused_loses_nothing(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    queue = server_backend.settings().queue_default
    slow = SleepJob(log, 30, n=0)
    slow.max_tries = 2
    slow.timeout = 10  # still running at the kill; its lease (timeout + 2 s margin) lapses
    send(server_backend, queue, [slow])
    send(server_backend, queue, [RecordJob(log, n) for n in range(1, 9)])
    first = WorkerProcess(
        ["--concurrency", "1", "--prefetch", "8"], server_backend.env(), tmp_path / "first.log"
    )
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the slow job to start")
        wait_until(lambda: stats(server_backend, queue).reserved == 9, 10, "the prefetch")
        assert cli(server_backend, "queue:pause", queue).returncode == 0
        wait_until(lambda: "is paused" in first.output, 10, "the worker to see the pause")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    # Nothing runs while paused, even with a fresh worker; the killed worker's jobs come back
    # (handed back at the pause, or, for the one running, when its lease lapses).
    with workers(1, ["--concurrency", "4"], server_backend.env(), tmp_path) as [second]:
        wait_until(lambda: started(second), 60, "the second worker to start")
        time.sleep(1.5)  # a pause must hold: nothing to await for what does not happen
        assert events(log, "run") == []
        held = stats(server_backend, queue)
        assert held.pending + held.reserved == 9
        assert cli(server_backend, "queue:resume", queue).returncode == 0
        wait_until(lambda: len(events(log, "run")) == 8, 30, "the jobs to run")
        wait_until(lambda: len(events(log, "start")) == 2, 30, "the slow job's second try")
        second.signal(signal.SIGTERM)
        second.wait(60)
    assert Counter(e["n"] for e in events(log, "run")) == {n: 1 for n in range(1, 9)}
    assert [e["attempts"] for e in events(log, "start")] == [1, 2]


def test_history_sent_with_the_heartbeat_survives_a_sigkill(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    queue = server_backend.settings().queue_default

    def history() -> dict[str, int]:
        async def op(manager: QueueManager, driver: Any) -> dict[str, int]:
            rows = await driver.history(queue, 5)
            return {f: sum(getattr(r, f) for r in rows) for f in ("started", "waited", "ran")}

        result: dict[str, int] = on_backend(server_backend, op)
        return result

    with workers(1, ["--concurrency", "4"], server_backend.env(), tmp_path) as [proc]:
        wait_until(lambda: started(proc), 60, "the worker to start")
        send(server_backend, queue, [RecordJob(log, n) for n in range(25)])
        wait_until(lambda: len(events(log, "run")) == 25, 30, "the jobs to run")
        wait_until(lambda: history()["ran"] == 25, 10, "the history to reach the backend")
        proc.signal(signal.SIGKILL)
        proc.wait(10)
    assert history() == {"started": 25, "waited": 25, "ran": 25}
