"""The heartbeat: renews the lease of every job the worker holds (prefetched, running,
finished but not yet acknowledged, failed but not yet recorded), reports the worker, sends the
queues' history counts (`core.worker.history`) and looks for a restart request; when renewal
fails, it cancels the jobs whose lease would lapse."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from core.execution import describe
from core.queue.drivers.base import Driver, ReservedJob, WorkerInfo
from core.worker.options import StopReason

if TYPE_CHECKING:
    from core.worker.worker import Worker

__all__ = ["Heartbeat"]

logger = logging.getLogger("topiq.worker")


class Heartbeat:
    """A worker's heartbeat, run as one of its background tasks."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def run(self) -> None:
        """Every `interval`: renew leases, report this worker, look for a restart request.

        A beat runs as a task of its own, never cancelled mid-call (a command cut off half-way
        can leave a connection unusable): when one has not finished in time, the leases it was
        renewing count as not renewed, and the next beat waits for it instead of piling up.
        """
        interval = self._worker._heartbeat_every
        beat: asyncio.Task[bool] | None = None
        # The history goes in a task of its own, beside the beat: a slow write of it (SQLite
        # under load) must never make the leases look unrenewed.
        history: asyncio.Task[None] | None = None
        sweep: asyncio.Task[None] | None = None
        try:
            while True:
                if beat is None or beat.done():
                    beat = asyncio.create_task(self._beat(interval), name="topiq-worker-beat")
                if history is None or history.done():
                    history = asyncio.create_task(self.send_history(), name="topiq-history")
                if sweep is None or sweep.done():  # the backend's upkeep, beside the beat too
                    sweep = asyncio.create_task(self._sweep(), name="topiq-backend-sweep")
                await asyncio.wait({beat}, timeout=max(interval, self._worker._margin / 2))
                if not (beat.done() and not beat.cancelled() and beat.result()):
                    self._check_lapsing(interval)
                await asyncio.sleep(interval)
        finally:
            # Stopping: let a beat (and a history write) in flight finish its calls (bounded),
            # then give up on it.
            busy = {t for t in (beat, history, sweep) if t is not None and not t.done()}
            if busy:
                await asyncio.wait(busy, timeout=self._worker._margin)
                for task in busy:
                    task.cancel()
                await asyncio.gather(*busy, return_exceptions=True)

    async def _beat(self, interval: float) -> bool:
        """One heartbeat; whether every lease held here was renewed."""
        driver = self._worker._driver
        assert driver is not None
        renewed = await self._renew_leases(driver)
        try:
            await driver.report_worker(self._info(), ttl=interval * 3)
            requested = await driver.restart_requested_at()
            if requested is not None and requested > self._worker._started_at:
                self._worker.stop(StopReason.RESTART)
        except Exception as exc:
            logger.warning("worker heartbeat failed: %s", describe(exc))
        return renewed

    async def _sweep(self) -> None:
        """The backend's periodic upkeep (`Driver.sweep`)."""
        driver = self._worker._driver
        if driver is None:
            return
        try:
            await driver.sweep()
        except Exception as exc:
            logger.warning("backend upkeep failed: %s", describe(exc))

    async def send_history(self, timeout: float | None = None) -> None:
        """Add the history counted since the last beat to the backend's; kept for the next
        beat if that fails (bounded: `HistoryCounts`). `timeout` bounds the last send, at
        stop."""
        driver = self._worker._driver
        history = self._worker.history
        if driver is None or not len(history):
            return
        rows = history.take()
        try:
            async with asyncio.timeout(timeout):
                await driver.add_history(rows)
        except Exception as exc:
            history.put_back(rows)
            logger.warning("could not add to the queues' history: %s", describe(exc))

    async def _renew_leases(self, driver: Driver) -> bool:
        """Renew the lease of every job held here; whether that worked."""
        now = time.monotonic()
        margin = self._worker._margin
        running = [
            (run, max(0.0, run.deadline - now) + margin) for run in self._worker._running.values()
        ]
        buffered = [(held, self._worker._prestart_lease) for held in self._worker._buffer]
        failures = list(self._worker._failures.values())
        leases: list[tuple[ReservedJob, float]] = [(run.reserved, s) for run, s in running]
        leases += [(held.reserved, s) for held, s in buffered]
        leases += [(failure.reserved, margin) for failure in failures]
        leases += [(job, margin) for job in self._worker._unacked.values()]
        leases += [(run.reserved, margin) for run, _ in self._worker._given_up]
        if not leases:
            return True
        try:
            await driver.extend(leases)
        except Exception as exc:
            logger.warning(
                "could not renew the leases of %d job(s): %s", len(leases), describe(exc)
            )
            return False
        for run, seconds in running:
            run.lease_until = max(run.lease_until, now + seconds)
        for held, seconds in buffered:
            held.lease_until = max(held.lease_until, now + seconds)
        for failure in failures:
            failure.lease_until = now + margin
        return True

    def _check_lapsing(self, interval: float) -> None:
        """Renewal failed: cancel the jobs whose lease ends before the next try could renew it."""
        lapsing = time.monotonic() + interval
        for run in list(self._worker._running.values()):
            if run.lease_until <= lapsing:
                self._worker._lose(run)
        for held in list(self._worker._buffer):
            if held.lease_until <= lapsing:
                self._worker._buffer.remove(held)
                self._worker._lapsed(held)

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self._worker.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            connection=self._worker.connection,
            queues=self._worker.options.queues,
            concurrency=self._worker.options.concurrency,
            started_at=self._worker._started_at,
            seen_at=time.time(),
            processed=self._worker._processed,
            running=tuple(self._worker._running),
        )
