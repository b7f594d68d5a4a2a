"""Jobs and an MQTT app for tests/test_metrics_processes.py.

`GateJob` holds its worker slot until the test writes to a named pipe (once it has scraped
the worker mid-run). The router `app` dispatches one `tests.jobs:RecordJob` per message on
`topiq-test/<run>/in`; a message on `topiq-test/<run>/hold` is held by its handler until one
arrives on `topiq-test/<run>/release`, so the test can see it counted as received and not
acknowledged.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from core.job import Job
from core.mqtt import Router
from core.queue.queue_manager import dispatch
from tests.jobs import RecordJob, record


class GateJob(Job):
    """Runs until someone writes to the named pipe `gate` (a FIFO the test made), then
    records its end."""

    def __init__(self, log: str, gate: str) -> None:
        self.log = log
        self.gate = gate

    async def handle(self) -> None:
        record(self.log, event="gate-start", id=self.job_id)
        await asyncio.to_thread(Path(self.gate).read_bytes)  # until the writer closes it
        record(self.log, event="gate-end", id=self.job_id)


app = Router()
_release = asyncio.Event()


@app.on("topiq-test/{run}/in", qos=1)
async def take(run: str, payload: Any) -> None:
    await dispatch(RecordJob(os.environ["METRICS_TEST_LOG"], int(payload["n"])))


@app.on("topiq-test/{run}/hold", qos=1)
async def hold(run: str, payload: Any) -> None:
    await _release.wait()


@app.on("topiq-test/{run}/release", qos=1)
async def release(run: str, payload: Any) -> None:
    _release.set()
