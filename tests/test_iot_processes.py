"""IoT-native queueing end to end (issue #14): devices, broker, app and workers all real.

The devices are Mosquitto's own `mosquitto_pub`; the broker is the test session's Mosquitto;
the app is `python main.py serve --app tests.iot_app:router`; the jobs run in `queue:work`
processes; the queue is Redis, SQLite or MariaDB. Each job appends its device, seq, pid and
start/end times to one file (tests/iot_app.py), which is what the assertions read:

* per-device order: 4 workers with random job durations; per device no two jobs overlap
  and they run in the order the device sent its readings, each exactly once;
* fairness: a device with 10,000 waiting jobs does not hold up another device's one job;
* coalescing: 1,000 readings arriving while the device's job runs end in at most 2 more runs,
  the last one with the last value, and `queue:stats --json` counts the readings replaced.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.iot_app import FAIR_SECONDS, Fair
from tests.jobs import events
from tests.mqtt.conftest import AppProcess, Broker, broker, mosquitto_pub
from tests.processes import ROOT, WorkerProcess, wait_until, workers

__all__ = ["broker"]  # the fixture, from tests/mqtt/conftest.py

# Generous: MariaDB on a busy 2-core machine takes its time over 10,000 and 1,000 jobs.
pytestmark = [pytest.mark.process, pytest.mark.mqtt, pytest.mark.slow, pytest.mark.timeout(300)]

APP = "tests.iot_app:router"


def environment(backend: Backend, broker: Broker, log: Path) -> dict[str, str]:
    """What the app and the workers run with: the backend's settings, the broker, the log.

    Two settings differ from the other process tests': the app's offline spool is a file of
    the test's own (not the project's `storage/spool.sqlite3`, which other runs share), and
    leases keep their default margin (10 s, not 2): "each reading ran exactly once" holds
    while a worker can still renew its leases, and on a busy machine SQLite's writer lock is
    sometimes held for longer than 2 s (a lease run out is a job run again: at least once).
    """
    return broker.env(
        **{
            **backend.env(),
            "QUEUE_LEASE_MARGIN": "10",
            "MQTT_SPOOL_PATH": str(log.parent / "spool.sqlite3"),
            "IOT_TEST_LOG": str(log),
        }
    )


async def started(procs: Iterable[WorkerProcess]) -> None:
    """Every worker is up and polling (it says so in its log)."""
    for proc in procs:
        await asyncio.to_thread(
            wait_until, partial(lambda p: "starting:" in p.output, proc), 60, "a worker to start"
        )


def stop(procs: Iterable[WorkerProcess]) -> None:
    """SIGTERM each worker; each must exit cleanly."""
    procs = list(procs)
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(30) == 0, proc.output[-3000:]


async def start_app(env: dict[str, str]) -> AppProcess:
    app = await AppProcess(["serve", "--app", APP], env).start()
    await app.wait_for_line("connected to the MQTT broker")  # logged once subscribed
    return app


async def until(check: Any, timeout: float, what: str) -> None:
    await asyncio.to_thread(wait_until, check, timeout, what)


def ends(log: Path, prefix: str) -> list[dict[str, Any]]:
    return [e for e in events(log, "end") if e["device"].startswith(prefix)]


def queue_stats(env: dict[str, str], queue: str) -> dict[str, Any]:
    """`python main.py queue:stats --queue <queue> --json`: that queue's entry."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "queue:stats", "--queue", queue, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = json.loads(done.stdout)["queues"]
    assert entry["queue"] == queue
    return entry  # type: ignore[no-any-return]


@pytest.fixture
def run() -> str:
    """A device-id prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:8]}"


# -- (a) per-device order under 4 worker processes -------------------------------------------


async def test_each_device_s_readings_run_one_at_a_time_in_order_under_4_workers(
    server_backend: Backend, broker: Broker, tmp_path: Path, run: str
) -> None:
    """The app's default settings: its handlers run concurrently (MQTT_HANDLER_CONCURRENCY),
    but one group's messages one at a time, so a device's readings are dispatched in the
    order they came; the queue runs them in that order, one at a time."""
    devices, readings = 8, 25
    log = tmp_path / "events.jsonl"
    env = environment(server_backend, broker, log)
    names = [f"{run}-d{i}" for i in range(devices)]
    with workers(4, ["--concurrency", "4"], env, tmp_path) as procs:
        await started(procs)
        app = await start_app(env)
        try:
            began = time.monotonic()
            # Every device publishes its readings in a burst, all devices at once.
            await asyncio.gather(
                *(
                    mosquitto_pub(
                        broker,
                        f"devices/{name}/telemetry",
                        lines=[json.dumps({"seq": seq}) for seq in range(readings)],
                    )
                    for name in names
                )
            )
            total = devices * readings
            await until(
                lambda: len({(e["device"], e["seq"]) for e in ends(log, run)}) >= total,
                120,
                f"{total} readings to run",
            )
            took = time.monotonic() - began
            stop(procs)
        finally:
            assert await app.stop() == 0, app.log[-3000:]

    done = ends(log, run)
    # Every reading ran exactly once (nothing ran twice, nothing is missing).
    runs = Counter((e["device"], e["seq"]) for e in done)
    twice = [key for key, count in runs.items() if count > 1]
    worker_lines = [line for p in procs for line in p.output.splitlines()]
    assert runs == {(name, seq): 1 for name in names for seq in range(readings)}, (
        f"ran twice: {twice}; their records: "
        f"{[e for e in events(log) if (e['device'], e['seq']) in twice]}; app warnings: "
        f"{[line for line in app.lines if 'WARNING' in line or 'ERROR' in line][-20:]}; "
        f"workers' warnings: {[line for line in worker_lines if 'WARN' in line][-20:]}"
    )
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in sorted(done, key=lambda e: e["start"]):
        by_device[e["device"]].append(e)
    for name in names:
        line = by_device[name]
        # In the order the device sent them...
        dispatched = [e["seq"] for e in events(log, "dispatched") if e["device"] == name]
        assert [e["seq"] for e in line] == list(range(readings)), (
            f"{name} ran {[e['seq'] for e in line]}; the app dispatched {dispatched}"
        )
        # ... and never two at once: each starts after the previous one ended.
        overlaps = [
            (a["seq"], b["seq"]) for a, b in itertools.pairwise(line) if b["start"] < a["end"]
        ]
        assert not overlaps, f"{name}: overlapping runs {overlaps}"
    pids = {e["pid"] for e in done}
    assert len(pids) > 1, "one worker process did everything: the test proved nothing"
    # Devices did run side by side (groups serialise a device, not the queue).
    spans = sorted((e["start"], e["end"]) for e in done)
    side_by_side = sum(b[0] < a[1] for a, b in itertools.pairwise(spans))
    assert side_by_side > 0
    print(
        f"order: {len(done)} readings of {devices} devices in {took:.2f}s by "
        f"{len(pids)} processes; {side_by_side} starts while another job ran"
    )


# -- (b) fairness ----------------------------------------------------------------------------


async def test_a_device_with_10000_waiting_jobs_does_not_hold_up_another_s_one_job(
    server_backend: Backend, tmp_path: Path, run: str
) -> None:
    """One worker, one job at a time: A's 10,000 jobs are queued first, B's one job while A's
    first runs; B's job starts when that one ends (before A's second), and A's third starts
    only after it. Without groups B would wait for all 10,000."""
    log = tmp_path / "events.jsonl"
    env = {**server_backend.env(), "QUEUE_LEASE_MARGIN": "10", "IOT_TEST_LOG": str(log)}
    a, b = f"{run}-A", f"{run}-B"
    async with QueueManager(server_backend.settings()) as manager:
        began = time.monotonic()
        for start in range(0, 10_000, 5_000):
            await manager.bulk([Fair(a, seq) for seq in range(start, start + 5_000)])
        queued = time.monotonic() - began
        with workers(1, ["--concurrency", "1"], env, tmp_path) as procs:
            await until(
                lambda: any(e["device"] == a for e in events(log, "start")),
                60,
                "A's first job to start",
            )
            pushed = time.time()
            await manager.push(Fair(b, 0))
            await until(lambda: any(e["device"] == b for e in events(log, "end")), 30, "B's job")
            await until(lambda: len(ends(log, a)) >= 3, 30, "A's third job to end")
            stop(procs)
        waiting = (await manager.stats(server_backend.overrides["queue_default"]))[0]

    starts = events(log, "start")
    order = [(e["device"], e["seq"]) for e in sorted(starts, key=lambda e: e["t"])]
    b_start = next(e for e in starts if e["device"] == b)["t"]
    third_a = next(e for e in starts if e["device"] == a and e["seq"] == 2)["t"]
    # The worker became free when the first job running at B's push ended (A's first, unless
    # the push itself took a whole job's time): B's started within two job durations of it,
    # counted in jobs (before A's third started), not in wall-clock time, which a loaded
    # machine stretches (MariaDB at load average 12 took 478 ms for one 200 ms turn).
    free = min(e["end"] for e in ends(log, a) if e["end"] >= pushed)
    assert b_start < third_a, order[:6]
    assert order[0] == (a, 0) and [seq for dev, seq in order if dev == a][:3] == [0, 1, 2]
    assert waiting.pending + waiting.delayed >= 10_000 - 4  # A's line is still there
    print(
        f"fairness: starts {order[:4]}; B started {(b_start - free) * 1000:.1f} ms "
        f"({(b_start - free) / FAIR_SECONDS:.2f} job durations) after "
        f"a worker became free, ahead of "
        f"{waiting.pending + waiting.delayed} waiting jobs of A (queued in {queued:.1f}s)"
    )


# -- (c) coalescing --------------------------------------------------------------------------


async def test_1000_readings_arriving_while_the_device_s_job_runs_end_in_one_more_run(
    server_backend: Backend, broker: Broker, tmp_path: Path, run: str
) -> None:
    log = tmp_path / "events.jsonl"
    gate = Path(f"{log}.gate")
    env = environment(server_backend, broker, log)
    queue = server_backend.overrides["queue_default"]
    device, flood = f"{run}-d", 1_000
    topic = f"devices/{device}/latest"
    async with QueueManager(server_backend.settings()) as manager:
        with workers(2, ["--concurrency", "4"], env, tmp_path) as procs:
            await started(procs)
            app = await start_app(env)
            try:
                await mosquitto_pub(broker, topic, json.dumps({"seq": 0}))
                await until(lambda: bool(events(log, "start")), 60, "the first run to start")
                await mosquitto_pub(
                    broker, topic, lines=[json.dumps({"seq": n}) for n in range(1, flood + 1)]
                )

                # Every reading is handled once the queue counts it: replaced or waiting.
                async def counted() -> int:
                    [s] = await manager.stats(queue)
                    return s.coalesced + s.pending + s.delayed

                deadline = time.monotonic() + 90
                while await counted() < flood:
                    assert time.monotonic() < deadline, f"counted {await counted()} of {flood}"
                    await asyncio.sleep(0.05)
                assert [e["seq"] for e in events(log, "start")] == [0]  # still blocked
                await asyncio.to_thread(gate.touch)  # the first run may end now
                await until(
                    lambda: any(e["seq"] == flood for e in events(log, "end")),
                    60,
                    "the last reading to run",
                )
                await until(
                    lambda: len(events(log, "end")) == len(events(log, "start")),
                    30,
                    "every run to end",
                )
                # The last run's record is written before its worker acknowledges it.
                deadline = time.monotonic() + 30
                while (after := (await manager.stats(queue))[0]).size:
                    assert time.monotonic() < deadline, after
                    await asyncio.sleep(0.05)
                stop(procs)
            finally:
                assert await app.stop() == 0, app.log[-3000:]
        shown = queue_stats(env, queue)

    runs = [e["seq"] for e in sorted(events(log, "end"), key=lambda e: e["start"])]
    assert runs[0] == 0
    more = runs[1:]
    assert 1 <= len(more) <= 2, runs
    assert more[-1] == flood  # the last run has the last value
    # Every reading either became a run or replaced a waiting one.
    assert after.coalesced == flood - len(more), after
    assert shown["coalesced"] == after.coalesced
    print(f"coalescing: {flood} readings while a run was held -> runs {runs}, "
          f"coalesced {shown['coalesced']}")  # fmt: skip
