"""Schedulers as real processes: `schedule:run` twice on one backend enqueues each tick once,
`queue:work --with-scheduler` enqueues and runs ticks, SIGTERM/SIGINT end a scheduler cleanly,
`schedule:list` shows next runs and the last tick enqueued.

The schedules come from a module each test writes (SCHEDULE_MODULE names it, PYTHONPATH finds
it), so the example `app/schedule.py` stays empty.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from core.queue.queue_manager import QueueManager
from core.schedule import MARKER_TTL
from tests.conftest import Backend
from tests.jobs import events
from tests.processes import ROOT, wait_until

_ENQUEUED = re.compile(r"schedule (\S+): enqueued tick (\S+) as job (\S+)")


class Process:
    """`python main.py ARGS` with its output in a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def enqueued(self) -> list[tuple[str, int]]:
        """(schedule, tick in epoch ms) of every tick this process enqueued."""
        return [
            (name, int(datetime.fromisoformat(at).timestamp() * 1000))
            for name, at, _ in _ENQUEUED.findall(self.output)
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextmanager
def started(*processes: Process) -> Iterator[tuple[Process, ...]]:
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


def schedule_module(tmp_path: Path, body: str) -> dict[str, str]:
    """Write a schedule module; the environment that makes a process load it."""
    module = f"schedule_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        "from core.schedule import schedule\nfrom tests.jobs import RecordJob\n\n" + body
    )
    return {"SCHEDULE_MODULE": module, "PYTHONPATH": str(tmp_path)}


async def jobs_waiting(backend: Backend) -> int:
    settings = backend.settings()
    async with QueueManager(settings) as manager:
        stats = await (await manager.connection()).stats(settings.queue_default)
        return stats.pending + stats.delayed + stats.reserved


def test_two_schedulers_enqueue_each_tick_of_a_one_second_interval_once(
    server_backend: Backend, tmp_path: Path
) -> None:
    name = f"every-second-{uuid.uuid4().hex[:6]}"
    env = {
        **server_backend.env(),
        **schedule_module(
            tmp_path, f"schedule.every('1s', RecordJob('/dev/null'), name={name!r})\n"
        ),
    }
    one = Process(["schedule:run"], env, tmp_path / "scheduler-1.log")
    two = Process(["schedule:run"], env, tmp_path / "scheduler-2.log")
    with started(one, two):
        wait_until(
            lambda: "scheduler running" in one.output and "scheduler running" in two.output,
            30,
            "both schedulers to start",
        )
        began = time.time()
        # Ten seconds of ticks, seen through the schedulers' own lines.
        wait_until(
            lambda: len(one.enqueued()) + len(two.enqueued()) >= 10, 20, "ten ticks enqueued"
        )
        took = time.time() - began
        for process in (one, two):
            process.proc.send_signal(signal.SIGTERM)
        assert one.proc.wait(15) == 0 and two.proc.wait(15) == 0
    ticks = sorted(tick for _, tick in one.enqueued() + two.enqueued())
    print(
        f"{server_backend.kind}: {len(ticks)} ticks enqueued in {took:.1f}s "
        f"({len(one.enqueued())} by one, {len(two.enqueued())} by the other)"
    )
    assert len(ticks) == len(set(ticks)), f"a tick was enqueued twice: {ticks}"
    assert 10 <= len(ticks) <= 11  # one more may land between the tenth and the SIGTERM
    assert [b - a for a, b in itertools.pairwise(ticks)] == [1000] * (len(ticks) - 1)
    # A tick or two may come before both are running (they start one after the other).
    assert 7.5 <= took <= 11.5
    assert asyncio.run(jobs_waiting(server_backend)) == len(ticks)  # 10 jobs, not 20


def test_a_worker_with_the_scheduler_enqueues_and_runs_ticks(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "jobs.log")
    env = {
        **server_backend.env(),
        **schedule_module(
            tmp_path,
            f"schedule.every('1s', RecordJob({log!r}), name='worker-{uuid.uuid4().hex[:6]}')\n",
        ),
    }
    # The seed's form of the worker command.
    worker = Process(["--queue-work", "--with-scheduler"], env, tmp_path / "worker.log")
    with started(worker):
        wait_until(lambda: len(events(log, "run")) >= 3, 30, "three ticks run by the worker")
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(15) == 0
    runs = events(log, "run")
    assert len({run["id"] for run in runs}) == len(runs)  # each tick is its own job
    assert len(worker.enqueued()) >= len(runs)
    assert "scheduler stopped" in worker.output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_schedule_run_cleanly(tmp_path: Path, sig: int) -> None:
    backend = Backend(
        "sqlite",
        {"queue_default": "q-signal", "db_url": f"sqlite+aiosqlite:///{tmp_path}/queue.db"},
    )
    env = {
        **backend.env(),
        **schedule_module(tmp_path, "schedule.every('1 hour', RecordJob('/dev/null'))\n"),
    }
    process = Process(["schedule:run"], env, tmp_path / "scheduler.log")
    with started(process):
        wait_until(lambda: "scheduler running" in process.output, 30, "the scheduler to start")
        sent = time.monotonic()
        process.proc.send_signal(sig)
        code = process.proc.wait(15)
        took = time.monotonic() - sent
    print(f"{signal.Signals(sig).name}: exit {code} after {took:.2f}s")
    assert code == 0
    assert took < 3.0  # it sleeps for the next tick an hour away, yet stops at once
    assert "scheduler stopped" in process.output
    assert "Traceback" not in process.output


def test_schedule_list_shows_next_runs_and_the_last_tick(tmp_path: Path) -> None:
    backend = Backend(
        "sqlite",
        {"queue_default": "q-list", "db_url": f"sqlite+aiosqlite:///{tmp_path}/queue.db"},
    )
    env = {
        **backend.env(),
        **schedule_module(
            tmp_path,
            "schedule.cron('0 3 * * *', RecordJob('/dev/null'), name='nightly',"
            " timezone='Europe/Berlin', queue='reports')\n"
            "schedule.every('30s', RecordJob('/dev/null'), missed='skip')\n",
        ),
    }

    async def mark() -> None:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            await driver.set_marker("schedule:nightly:last", "1767060000000", MARKER_TTL)

    asyncio.run(mark())
    out = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "schedule:list", "--json", "--next", "3"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [row["name"] for row in rows] == ["nightly", "tests.jobs:RecordJob[every 30s]"]
    nightly, poll = rows
    assert nightly["kind"] == "cron" and nightly["expression"] == "0 3 * * *"
    assert nightly["timezone"] == "Europe/Berlin" and nightly["queue"] == "reports"
    assert nightly["job"] == "tests.jobs:RecordJob"
    assert len(nightly["next"]) == 3
    for moment in nightly["next"]:
        assert moment[11:19] == "03:00:00" and moment[19:] in ("+01:00", "+02:00")
    assert datetime.fromisoformat(nightly["last"]).timestamp() == 1767060000
    stamps = [datetime.fromisoformat(m).timestamp() for m in poll["next"]]
    assert [b - a for a, b in itertools.pairwise(stamps)] == [30, 30]
    assert all(s % 30 == 0 for s in stamps)  # aligned to the epoch
    assert poll["last"] is None and poll["missed"] == "skip" and poll["queue"] == "q-list"
    table = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "schedule:list"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert "nightly" in table.stdout and "cron 0 3 * * *" in table.stdout
