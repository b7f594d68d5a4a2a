"""The app and jobs of tests/test_iot_processes.py (`serve --app tests.iot_app:router`).

Devices publish `{"seq": n}` to `devices/<id>/telemetry` (a group route: one job per device
at a time, in order) or `devices/<id>/latest` (group + coalesce: only the latest waiting
reading of a device is kept). Every job appends what it did to the file named by
`IOT_TEST_LOG` (one `write` of one line, O_APPEND: lines of concurrent workers never mix),
with its device, seq, pid and the wall-clock times of its start and end: all the processes
run on one machine, so their `time.time()` is one clock.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import orjson

from core.job import Job
from core.mqtt import Router
from core.queue.queue_manager import dispatch

#: Longest random duration of a `Reading` (seconds; `IOT_MAX_SECONDS` overrides).
MAX_SECONDS = 0.03
#: `Fair`'s fixed duration: long enough that "within two job durations" is not a matter of
#: scheduling noise on a loaded machine.
FAIR_SECONDS = 0.2


def log_path() -> str:
    return os.environ["IOT_TEST_LOG"]


def record(event: str, **data: Any) -> None:
    """Append one event line to the shared log in one write."""
    line = orjson.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **data}) + b"\n"
    fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class Reading(Job):
    """One telemetry reading; takes a random time, records its start and end."""

    def __init__(self, device: str, seq: int) -> None:
        super().__init__()
        self.device = device
        self.seq = seq

    async def handle(self) -> None:
        start = time.time()
        record("start", device=self.device, seq=self.seq)
        limit = float(os.environ.get("IOT_MAX_SECONDS", MAX_SECONDS))
        await asyncio.sleep(random.uniform(0, limit))
        record("end", device=self.device, seq=self.seq, start=start, end=time.time())


class LatestReading(Reading):
    """A reading of which only the latest matters. It waits, after its start, until the
    test opens the gate (the file `<IOT_TEST_LOG>.gate` exists). One try, and time enough
    for a slow queue to take 1,000 readings meanwhile: a second run of one reading shows."""

    max_tries = 1
    timeout = 240

    async def handle(self) -> None:
        start = time.time()
        record("start", device=self.device, seq=self.seq)
        gate = Path(log_path() + ".gate")
        deadline = time.monotonic() + 230
        # Another process opens the gate: a file offers no event to await, so poll it.
        while not await asyncio.to_thread(gate.exists) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        record("end", device=self.device, seq=self.seq, start=start, end=time.time())


class Fair(Reading):
    """A job of the device named in its data, `FAIR_SECONDS` long (its own `group`)."""

    group = "{device}"

    async def handle(self) -> None:
        start = time.time()
        record("start", device=self.device, seq=self.seq)
        await asyncio.sleep(FAIR_SECONDS)
        record("end", device=self.device, seq=self.seq, start=start, end=time.time())


router = Router()


@router.on("devices/{device_id}/telemetry", qos=1, group="{device_id}")
async def telemetry(device_id: str, payload: Any) -> None:
    """Every reading runs, one per device at a time, in the order the device sent them."""
    await dispatch(Reading(device_id, int(payload["seq"])))
    record("dispatched", device=device_id, seq=int(payload["seq"]))


@router.on("devices/{device_id}/latest", qos=1, group="{device_id}", coalesce="{device_id}")
async def latest(device_id: str, payload: Any) -> None:
    """Only the latest waiting reading of a device runs."""
    await dispatch(LatestReading(device_id, int(payload["seq"])))
