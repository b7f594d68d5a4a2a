"""Failures that must be recorded: a job that failed for good stays held here (its lease
renewed by the heartbeat) until the failed-job store has its record; then it is acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.events import EventKind, events
from core.execution import Site, describe, emit, failed_outcome, failed_record, on_failed
from core.job import Job
from core.log import outside_job
from core.queue.drivers.base import Driver, FailedJob, FailedStore, ReservedJob
from core.queue.queue_manager import QueueManager
from core.worker.state import Running, WorkerCounts

__all__ = ["Failure", "FailureRecorder"]

logger = logging.getLogger("topiq.worker")


@dataclass(slots=True)
class Failure:
    """A job that failed for good, held (lease renewed) until its failure is recorded."""

    reserved: ReservedJob
    job: Job | None
    exc: BaseException
    record: FailedJob
    failed_timeout: float
    failure_ttl: float
    started: float | None = None  # perf_counter at the start of its try
    hooked: bool = False  # `failed()` was called
    busy: bool = False  # a recording attempt is in flight
    held: bool = False  # a recording attempt failed: it waits for the store
    lease_until: float = field(default_factory=time.monotonic)


class FailureRecorder:
    """Records a worker's failed jobs; `held` are those whose record is not stored yet."""

    def __init__(
        self,
        manager: QueueManager,
        connection: str,
        worker_id: str,
        margin: float,
        counts: WorkerCounts,
        finish: Callable[[ReservedJob], None],
        track: Callable[[asyncio.Task[Any]], Any],
    ) -> None:
        self.manager = manager
        self.connection = connection
        self.id = worker_id
        self._margin = margin
        self.counts = counts
        self._finish = finish
        self._track = track
        self._failed: FailedStore | None = None
        self._store_down = False
        self.held: dict[str, Failure] = {}
        self._recorder: asyncio.Task[None] | None = None
        #: The worker's `Site` (RQ's failure callback needs its connection name).
        self.site: Site | None = None

    async def fail(
        self, run: Running, job: Job | None, exc: BaseException, failed_timeout: float
    ) -> None:
        """Call `failed()` once, record the failure, then acknowledge the job.

        A failed-job store that does not answer does not hold up the worker: the job stays
        reserved here (the heartbeat renews its lease) and is recorded when the store answers.
        `failed()` is called only once the store has answered, so that a worker stopping
        before it could record does not leave a second call to the next worker.
        """
        reserved = run.reserved
        failure = Failure(
            reserved,
            job,
            exc,
            failed_record(self.connection, reserved, exc),
            failed_timeout,
            run.failure_ttl,
            started=run.started or None,
            lease_until=time.monotonic() + self._margin,
        )
        self.held[reserved.id] = failure
        task = self._track(asyncio.create_task(self.record(failure)))
        await asyncio.shield(task)

    async def store(self) -> FailedStore:
        if self._failed is None:
            self._failed = await self.manager.failed_store(self.connection)
        return self._failed

    async def open_store_at_start(self) -> None:
        try:
            await self.store()
        except Exception as exc:
            self._store_down = True
            logger.error(
                "the failed-job store is unreachable (%s); jobs keep running, and a job that "
                "fails for good stays reserved until its failure can be recorded",
                describe(exc),
            )

    async def record(self, failure: Failure) -> bool:
        """One attempt to record a failure; on success the job is acknowledged."""
        if failure.busy or self.held.get(failure.reserved.id) is not failure:
            return False
        failure.busy = True
        try:
            if not failure.hooked:
                if failure.job is not None:
                    # The store answers: `failed()` (and the hooks) can be followed by its
                    # record.
                    await (await self.store()).get(failure.reserved.id)
                    await on_failed(
                        failure.job,
                        failure.exc,
                        failure.failed_timeout,
                        self.site,
                        failure.reserved,
                    )
                failure.hooked = True
            await (await self.store()).add(failure.record)
        except Exception as exc:
            if not failure.held:
                failure.held = True
                logger.error(
                    "cannot record the failure of job %s yet (%s); it stays reserved until "
                    "the failed-job store answers",
                    failure.reserved.id,
                    describe(exc),
                )
            self._store_down = True
            if self._recorder is None or self._recorder.done():
                # Records every held failure: not tagged with this job's log fields.
                self._recorder = asyncio.create_task(self.record_held(), context=outside_job())
            return False
        finally:
            failure.busy = False
        if self._store_down:
            logger.warning("the failed-job store answers again")
            self._store_down = False
        if self.held.get(failure.reserved.id) is failure:
            # Else a later reservation of the same job (this one's lease lapsed while its
            # record was written, and the job came back here) holds the place: its own.
            del self.held[failure.reserved.id]
        self.counts.failed += 1
        reserved = failure.reserved
        reserved.outcome = failed_outcome(failure.exc, failure.failure_ttl, failure.job)
        self._finish(reserved)
        if events.active:
            emit(
                EventKind.FAILED,
                reserved,
                self.connection,
                failure.job,
                worker=self.id,
                started=failure.started,
                error=describe(failure.exc),
            )
        return True

    async def record_held(self) -> None:
        """Retry recording held failures, with backoff, until none is left."""
        delay = 0.2
        while self.held:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            for failure in list(self.held.values()):
                if not await self.record(failure):
                    break

    async def settle(self, driver: Driver, grace: float) -> None:
        """Stopping: give held failures until the grace ends, then hand the rest back."""
        recorder = self._recorder
        if self.held and recorder is not None and not recorder.done():
            logger.warning(
                "worker %s waiting up to %gs to record %d failed job(s)",
                self.id,
                grace,
                len(self.held),
            )
            await asyncio.wait({recorder}, timeout=grace)
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
        for failure in list(self.held.values()):
            # Back to its queue with its try spent: the next worker to reserve it finds it past
            # max_tries and records it (calling `failed()` if it was not called here).
            logger.error(
                "job %s: its failure could not be recorded (the failed-job store is "
                "unreachable); handed back for the next worker to record",
                failure.reserved.id,
            )
            with contextlib.suppress(Exception):
                await driver.release(failure.reserved, error=describe(failure.exc))
            del self.held[failure.reserved.id]
