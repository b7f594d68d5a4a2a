"""Ends the worker when a job blocks the event loop past its timeout.

An async job that calls blocking code (`time.sleep`, a sync driver) cannot be cancelled: the
loop never gets control back to deliver the cancellation. A thread watches the loop's pulse and
the running jobs' deadlines; when a deadline has passed while the loop is stalled, it logs which
job did it and ends the process. The job's lease then returns it to the queue for another worker
(supervisord restarts this one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Protocol

from core.worker.options import ExitCode

__all__ = ["Watchdog"]

logger = logging.getLogger("topiq.worker")


class Watched(Protocol):
    """What the watchdog reads of a running job."""

    deadline: float  # monotonic time its timeout ends
    label: str


class Watchdog:
    """Use as `async with Watchdog(running):` around the worker loop.

    `running` maps job ids to the jobs the worker is running; the watchdog only reads it.
    """

    def __init__(
        self, running: Mapping[str, Watched], slack: float = 1.0, pulse: float = 0.1
    ) -> None:
        self._running = running
        self._slack = slack
        self._pulse = pulse
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watchdog:
        self._beat = time.monotonic()
        self._task = asyncio.create_task(self._heartbeat(), name="topiq-watchdog-pulse")
        self._thread = threading.Thread(target=self._watch, name="topiq-watchdog", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._thread is not None:
            # The thread wakes every pulse; joining it does not block the loop for long.
            self._thread.join(timeout=self._pulse * 5)

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self._pulse)

    def _watch(self) -> None:
        while not self._stop.wait(self._pulse):
            now = time.monotonic()
            # Copying under the GIL is safe while the loop thread changes the mapping.
            for job_id, run in list(self._running.items()):
                deadline, label = run.deadline, run.label
                stalled = self._beat < deadline and now - self._beat > self._slack
                if now > deadline + self._slack and stalled:
                    logger.critical(
                        "job %s %s blocked the event loop past its timeout (%.1fs stalled); "
                        "stopping this worker so the job's lease can return it",
                        job_id,
                        label,
                        now - self._beat,
                    )
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    os._exit(ExitCode.WATCHDOG)
