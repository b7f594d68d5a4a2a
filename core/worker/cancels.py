"""Cancel on request: while jobs are held, the worker asks the backend every half second
whether any of them was cancelled (`queue:cancel`, `handle.cancel()`); such a job's task is
cancelled and it is acknowledged as `cancelled`: never retried, `failed()` not called."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from core.errors import JobCancelledError
from core.events import EventKind, events
from core.execution import JobAbandonedError, cancelled_outcome, describe, emit, on_cancelled
from core.job import Job
from core.queue.drivers.base import ReservedJob
from core.queue.payload import decode_envelope
from core.steps import envelope_info
from core.worker.state import Running, job_timeout, keep_time

if TYPE_CHECKING:
    from core.worker.worker import Worker

__all__ = ["CANCEL_POLL", "CancelRequests"]

logger = logging.getLogger("topiq.worker")

#: Seconds between two questions to the backend about cancel requests, while jobs run.
CANCEL_POLL = 0.5


class CancelRequests:
    """A worker's cancel requests: polled from the backend, applied to the jobs it holds."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.every = CANCEL_POLL

    async def watch(self) -> None:
        """While jobs are held here, ask the backend every half second whether any of them
        was cancelled (one call per poll), and cancel those."""
        driver = self._worker._driver
        assert driver is not None
        failing = False
        while True:
            await asyncio.sleep(self.every)
            runs = [
                run for run in self._worker._running.values() if not (run.cancelling or run.settled)
            ]
            held = [run.reserved for run in runs]
            held += [waiting.reserved for waiting in self._worker._buffer]
            if not held:
                continue
            try:
                requested = await self._worker._duties.whole_call(driver.cancel_requested(held))
            except Exception as exc:
                if not failing:
                    logger.warning("could not ask for cancel requests: %s", describe(exc))
                failing = True
                continue
            failing = False
            for job_id in requested:
                run = self._worker._running.get(job_id)
                if run is not None:
                    self.cancel(run)
                    continue
                for waiting in self._worker._buffer:
                    if waiting.reserved.id == job_id:
                        self._worker._buffer.remove(waiting)
                        self.cancel_unstarted(waiting.reserved)
                        break

    def cancel(self, run: Running) -> None:
        """Cancel a running job's task on request; one that will not stop is given up."""
        if run.cancelling or run.settled or run.given_up or run.lost:
            return
        task = run.task
        if task is None or task.done():
            return
        run.cancelling = True
        logger.warning("job %s %s: cancel requested; cancelling it", run.reserved.id, run.label)
        task.cancel()
        asyncio.get_running_loop().call_later(self._worker._stop_within, self._overdue, run, task)

    def _overdue(self, run: Running, task: asyncio.Task[None]) -> None:
        if task.done() or run.settled or run.given_up or run.lost:
            return
        within = self._worker._stop_within
        self._worker._give_up(
            run,
            JobAbandonedError(
                f"{run.label} did not stop within {within:g}s of being cancelled "
                f"(try {run.reserved.attempts})"
            ),
        )

    async def cancelled(self, run: Running, job: Job) -> None:
        """A try stopped on its cancel request: acknowledge it as cancelled."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        thread = run.thread
        if thread is not None and not thread.done():
            # A thread cannot be stopped: it counts as stopped only once it has returned.
            await asyncio.wait({thread}, timeout=self._worker._stop_within)
            if not thread.done():
                self._worker._give_up(
                    run,
                    JobAbandonedError(
                        f"{run.label} was cancelled, and its thread, which cannot be stopped, "
                        f"was still running {self._worker._stop_within:g}s later "
                        f"(try {run.reserved.attempts})"
                    ),
                )
                return
        await self.finish_cancelled(run, job)

    async def finish_cancelled(self, run: Running, job: Job | None) -> None:
        reserved = run.reserved
        logger.warning("job %s %s cancelled on request", reserved.id, run.label)
        if job is not None:
            await on_cancelled(
                job,
                JobCancelledError("cancelled on request", job_id=reserved.id),
                self._worker._site,
                self._worker.options.timeout or job_timeout(job),
            )
        reserved.outcome = cancelled_outcome(run.failure_ttl, job=job)
        self._worker.counts.cancelled += 1
        self._worker._finish(reserved)
        if events.active:
            emit(
                EventKind.CANCELLED,
                reserved,
                self._worker.connection,
                job,
                worker=self._worker.id,
                started=run.started or None,
                error="cancelled on request",
            )

    def cancel_unstarted(self, reserved: ReservedJob) -> None:
        """A job cancelled while it waited here for a slot: never started, acknowledged."""
        failure_ttl = self._worker._failure_ttl
        info = None
        with contextlib.suppress(Exception):
            envelope = decode_envelope(reserved.payload)
            failure_ttl = keep_time(envelope.get("failure_ttl"), failure_ttl)
            info = envelope_info(envelope)
        logger.warning("job %s cancelled on request before it started", reserved.id)
        reserved.outcome = cancelled_outcome(failure_ttl, "cancelled before it started", info=info)
        self._worker.counts.cancelled += 1
        self._worker._finish(reserved)
        if events.active:
            emit(
                EventKind.CANCELLED,
                reserved,
                self._worker.connection,
                worker=self._worker.id,
                error="cancelled before it started",
            )
