"""The worker: reserves jobs, runs them concurrently, and applies the retry policy.

One loop reserves as many jobs as there are free slots, acknowledging finished ones in the same
round trip, and waits on the backend (which blocks where it can) when nothing is ready. Each job
runs in its own task under its timeout; a heartbeat renews the leases of running jobs; a watchdog
thread ends the process if a job blocks the loop past its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from core.errors import PayloadError, Retry, WorkerLostError
from core.job import Job
from core.queue.drivers.base import Driver, FailedStore, ReservedJob, WorkerInfo
from core.queue.payload import JobLoader
from core.queue.queue_manager import QueueManager
from core.worker.execution import call_failed, call_handle, describe, failed_record
from core.worker.options import StopReason, WorkerOptions
from core.worker.watchdog import Watchdog

__all__ = ["Worker", "WorkerCounts"]

logger = logging.getLogger("topiq.worker")

T = TypeVar("T")
_DEFAULT_TIMEOUT = 60.0


@dataclass(slots=True)
class WorkerCounts:
    """What a worker's finished tries came to."""

    done: int = 0  # succeeded
    retried: int = 0  # failed or asked for a retry, and will run again
    failed: int = 0  # failed for good (recorded in the failed-job store)
    returned: int = 0  # handed back unfinished because the worker was stopping


@dataclass(slots=True)
class _Running:
    reserved: ReservedJob
    deadline: float  # monotonic time its timeout ends
    label: str


class Worker:
    """Runs jobs from one connection's queues until a stop reason occurs.

    `await Worker(manager, options).run()` returns the `StopReason`.
    """

    def __init__(self, manager: QueueManager, options: WorkerOptions) -> None:
        self.manager = manager
        self.options = options
        self.connection = manager.connection_name(options.connection)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        settings = manager.settings
        self._margin = settings.queue_lease_margin
        self._loader = JobLoader(settings.queue_allowed_modules)
        self._default_lease = (options.timeout or _DEFAULT_TIMEOUT) + self._margin
        self._running: dict[str, _Running] = {}
        # Reserved ahead of a free slot, so that a finishing job is replaced without waiting
        # for a round trip to the backend.
        self._buffer: deque[ReservedJob] = deque()
        self._prefetch = (
            options.prefetch if options.prefetch is not None else options.concurrency // 4
        )
        self._done: list[ReservedJob] = []
        self._changed = asyncio.Event()
        self._stop_reason: StopReason | None = None
        self._force = asyncio.Event()
        self._started = 0
        self._processed = 0
        self.counts = WorkerCounts()
        self._started_at = time.time()
        self._watchdog = Watchdog(self._running)
        self._driver: Driver | None = None
        self._failed: FailedStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._bookkeeping: set[asyncio.Task[object]] = set()
        self._lease_requests: list[tuple[ReservedJob, float]] = []
        self._lease_batch: asyncio.Task[None] | None = None

    # -- control -----------------------------------------------------------------------

    @property
    def prefetch(self) -> int:
        """How many jobs this worker reserves ahead of a free slot."""
        return self._prefetch

    @property
    def processed(self) -> int:
        """Jobs finished (done, retried or failed) so far."""
        return self._processed

    def stop(self, reason: StopReason = StopReason.SIGNAL) -> None:
        """Stop reserving; running jobs get the grace period. A second call skips the grace."""
        if self._stop_reason is None:
            self._stop_reason = reason
            logger.info("worker %s stopping (%s)", self.id, reason.value)
        elif reason is StopReason.SIGNAL:
            logger.warning("worker %s: second stop signal, cancelling running jobs", self.id)
            self._force.set()
        self._changed.set()

    # -- main loop ---------------------------------------------------------------------

    async def run(self) -> StopReason:
        """Work until stopped; returns why it stopped."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if self.options.handle_signals else ()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            self._driver = await self._until_connected()
            if self._driver is None:
                return self._stop_reason or StopReason.SIGNAL
            self._failed = await self._with_retries(
                "open the failed-job store", lambda: self.manager.failed_store(self.connection)
            )
            async with self._watchdog:
                heartbeat = asyncio.create_task(self._heartbeat(), name="topiq-worker-heartbeat")
                try:
                    await self._work()
                finally:
                    await self._drain()
                    heartbeat.cancel()
                    await asyncio.gather(heartbeat, return_exceptions=True)
            await self._with_retries("acknowledge finished jobs", self._flush_acks)
            with contextlib.suppress(Exception):
                await self._driver.remove_worker(self.id)
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        reason = self._stop_reason or StopReason.SIGNAL
        logger.info("worker %s stopped (%s) after %d jobs", self.id, reason.value, self._processed)
        return reason

    async def _until_connected(self) -> Driver | None:
        delay = 0.1
        while self._stop_reason is None:
            try:
                return await self.manager.connection(self.connection)
            except Exception as exc:
                logger.error(
                    "worker cannot reach the %s queue (%s); retrying in %.1fs",
                    self.connection,
                    describe(exc),
                    delay,
                )
                await self._pause(delay)
                delay = min(delay * 2, 5.0)
        return None

    async def _work(self) -> None:
        assert self._driver is not None
        driver = self._driver
        opts = self.options
        queues = opts.queues
        deadline = None if opts.max_time is None else time.monotonic() + opts.max_time
        waiter: asyncio.Task[None] | None = None
        failures = 0
        topped_up = False
        try:
            while self._stop_reason is None:
                self._changed.clear()
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(StopReason.MAX_TIME)
                    break
                buffer = self._buffer
                while buffer and len(self._running) < opts.concurrency:
                    self._start(buffer.popleft())
                room = opts.concurrency + self._prefetch - len(self._running) - len(buffer)
                if opts.max_jobs is not None:
                    left = opts.max_jobs - self._started - len(buffer)
                    if left <= 0 and not buffer:
                        self.stop(StopReason.MAX_JOBS)
                        break
                    room = min(room, left)
                # With every slot busy, top the buffer up only once it is half empty: one
                # larger round trip instead of one per finished job.
                if len(self._running) >= opts.concurrency and len(buffer) > self._prefetch // 2:
                    room = 0
                elif 0 < room < (opts.concurrency + self._prefetch) // 2 and not topped_up:
                    # A small top-up: first let the jobs finishing in this turn report in.
                    topped_up = True
                    await asyncio.sleep(0)
                    continue
                topped_up = False
                if room <= 0:
                    if deadline is None:
                        await self._changed.wait()
                    else:
                        await self._wait_changed(None, deadline)
                    # One more turn of the loop lets every job finishing in this same turn
                    # report in, so the next round trip acknowledges and reserves in bulk.
                    await asyncio.sleep(0)
                    continue
                acks = self._done
                self._done = []
                try:
                    # Shielded: a reservation that reached the server must reach us too.
                    jobs = await asyncio.shield(
                        driver.reserve(queues, room, self._default_lease, acks)
                    )
                    failures = 0
                except Exception as exc:
                    self._done.extend(acks)
                    failures += 1
                    delay = min(0.1 * 2**failures, 5.0)
                    logger.error(
                        "reserving from %s failed (%s); retrying in %.1fs",
                        self.connection,
                        describe(exc),
                        delay,
                    )
                    await self._pause(delay)
                    continue
                if jobs:
                    if self._stop_reason is not None:
                        await self._return_unstarted(jobs)
                        break
                    buffer.extend(jobs)
                    continue
                if opts.stop_when_empty and not self._running and not buffer:
                    self.stop(StopReason.EMPTY)
                    break
                if waiter is None or waiter.done():
                    if waiter is not None and not waiter.cancelled() and waiter.exception():
                        await self._pause(min(0.1 * 2**failures, 5.0))
                        failures += 1
                    waiter = asyncio.create_task(
                        driver.wait(queues, opts.sleep), name="topiq-worker-wait"
                    )
                await self._wait_changed(waiter, deadline)
        finally:
            if waiter is not None:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            # Prefetched jobs that never started go back to the front of their queue at once.
            await self._return_unstarted(list(self._buffer))
            self._buffer.clear()

    async def _return_unstarted(self, jobs: list[ReservedJob]) -> None:
        """Give back jobs reserved but never started, without spending their try."""
        driver = self._driver
        assert driver is not None
        # Last first: each goes to the front of its queue, so they keep their order.
        for job in reversed(jobs):
            await self._with_retries(
                "return a job", functools.partial(driver.release, job, refund=True)
            )

    async def _wait_changed(
        self, waiter: asyncio.Task[None] | None, deadline: float | None
    ) -> None:
        changed = asyncio.create_task(self._changed.wait())
        pending: set[asyncio.Future[Any]] = {changed}
        if waiter is not None:
            pending.add(waiter)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    # -- running jobs ------------------------------------------------------------------

    def _start(self, reserved: ReservedJob) -> None:
        self._started += 1
        self._running[reserved.id] = _Running(reserved, time.monotonic() + _DEFAULT_TIMEOUT, "?")
        task = asyncio.create_task(self._process(reserved))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, reserved: ReservedJob) -> None:
        driver = self._driver
        assert driver is not None
        try:
            try:
                decoded = self._loader.load(
                    reserved.payload, job_id=reserved.id, attempts=reserved.attempts
                )
            except PayloadError as exc:
                logger.error("job %s on %s cannot be run: %s", reserved.id, reserved.queue, exc)
                await self._fail(reserved, None, exc)
                return
            job = decoded.job
            max_tries = self.options.max_tries or decoded.max_tries
            timeout = self.options.timeout or decoded.timeout
            label = type(job).__qualname__
            if reserved.attempts > max_tries:
                lost = WorkerLostError(
                    f"{label} was reserved {reserved.attempts - 1} times and its worker was lost "
                    f"on the last allowed try (max_tries={max_tries})"
                )
                logger.error("job %s %s failed for good: %s", job.job_id, label, lost)
                await self._fail(reserved, job, lost)
                return
            await self._run(reserved, job, label, max_tries, timeout)
        finally:
            self._running.pop(reserved.id, None)
            self._processed += 1
            self._changed.set()

    async def _run(
        self, reserved: ReservedJob, job: Job, label: str, max_tries: int, timeout: float
    ) -> None:
        driver = self._driver
        assert driver is not None
        lease = timeout + self._margin
        if lease != self._default_lease:
            # Reserved under the default lease; give it the one its own timeout needs, so a
            # job that dies with its worker comes back neither too early nor too late.
            await self._set_lease(reserved, lease)
        run = self._running[reserved.id]
        run.deadline = time.monotonic() + timeout
        run.label = label
        started = time.perf_counter()
        try:
            await call_handle(job, timeout)
        except asyncio.CancelledError:
            logger.warning(
                "job %s %s returned to its queue: the worker is stopping", job.job_id, label
            )
            await self._bookkeep("return a job", lambda: driver.release(reserved, refund=True))
            self.counts.returned += 1
            raise
        except Retry as request:
            delay = request.delay if request.delay is not None else job.backoff(reserved.attempts)
            await self._retry_or_fail(reserved, job, label, max_tries, request, delay)
        except Exception as exc:
            await self._retry_or_fail(
                reserved, job, label, max_tries, exc, job.backoff(reserved.attempts)
            )
        else:
            self._done.append(reserved)
            self.counts.done += 1
            logger.info(
                "job %s %s try %d/%d done in %.1fms",
                job.job_id,
                label,
                reserved.attempts,
                max_tries,
                (time.perf_counter() - started) * 1000,
            )

    async def _set_lease(self, reserved: ReservedJob, lease: float) -> None:
        """Renew a lease, batched with the others asked for in the same turn of the loop."""
        self._lease_requests.append((reserved, lease))
        if self._lease_batch is None or self._lease_batch.done():
            self._lease_batch = asyncio.create_task(self._send_leases())
        await asyncio.shield(self._lease_batch)

    async def _send_leases(self) -> None:
        driver = self._driver
        assert driver is not None
        await asyncio.sleep(0)  # jobs starting in this same turn join the batch
        batch, self._lease_requests = self._lease_requests, []
        try:
            await driver.extend(batch)
        except Exception as exc:
            # Not fatal: the heartbeat renews every running job's lease shortly.
            logger.warning("could not set the leases of %d job(s): %s", len(batch), describe(exc))

    async def _retry_or_fail(
        self,
        reserved: ReservedJob,
        job: Job,
        label: str,
        max_tries: int,
        exc: BaseException,
        delay: float,
    ) -> None:
        driver = self._driver
        assert driver is not None
        if reserved.attempts < max_tries:
            logger.warning(
                "job %s %s try %d/%d %s; retrying in %gs",
                job.job_id,
                label,
                reserved.attempts,
                max_tries,
                "asked for a retry" if isinstance(exc, Retry) else f"failed ({describe(exc)})",
                delay,
            )
            await self._bookkeep("release a job", lambda: driver.release(reserved, delay))
            self.counts.retried += 1
            return
        logger.error(
            "job %s %s try %d/%d failed for good: %s",
            job.job_id,
            label,
            reserved.attempts,
            max_tries,
            describe(exc),
        )
        await self._fail(reserved, job, exc)

    async def _fail(self, reserved: ReservedJob, job: Job | None, exc: BaseException) -> None:
        """Call `failed()` once, record the failure, then remove the job from its queue."""
        if job is not None:
            await call_failed(job, exc, float(job.timeout or _DEFAULT_TIMEOUT))
        store = self._failed
        assert store is not None
        record = failed_record(self.connection, reserved, exc)
        await self._bookkeep("record a failed job", lambda: store.add(record))
        self._done.append(reserved)
        self.counts.failed += 1

    # -- background duties -------------------------------------------------------------

    async def _heartbeat(self) -> None:
        driver = self._driver
        assert driver is not None
        interval = max(0.2, min(5.0, self._margin / 3))
        while True:
            try:
                now = time.monotonic()
                leases = [
                    (run.reserved, max(0.0, run.deadline - now) + self._margin)
                    for run in self._running.values()
                ]
                leases += [(job, self._default_lease) for job in self._buffer]
                if leases:
                    await driver.extend(leases)
                await driver.report_worker(self._info(), ttl=interval * 3)
                requested = await driver.restart_requested_at()
                if requested is not None and requested > self._started_at:
                    self.stop(StopReason.RESTART)
            except Exception as exc:
                logger.warning("worker heartbeat failed: %s", describe(exc))
            await asyncio.sleep(interval)

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            connection=self.connection,
            queues=self.options.queues,
            concurrency=self.options.concurrency,
            started_at=self._started_at,
            seen_at=time.time(),
            processed=self._processed,
            running=tuple(self._running),
        )

    async def _drain(self) -> None:
        """Let running jobs finish (within the grace period when stopping early)."""
        if self._tasks:
            bounded = self._stop_reason in (
                StopReason.SIGNAL,
                StopReason.RESTART,
                StopReason.MAX_TIME,
            )
            until = time.monotonic() + self.options.grace if bounded else None
            logger.info("worker %s waiting for %d running job(s)", self.id, len(self._tasks))
            forced = asyncio.create_task(self._force.wait())
            try:
                while self._tasks and not self._force.is_set():
                    timeout = None if until is None else until - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    await asyncio.wait(
                        {*self._tasks, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
            finally:
                forced.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Releases and failure records started by cancelled jobs run on, shielded: wait for them.
        await asyncio.gather(*self._bookkeeping, return_exceptions=True)

    async def _flush_acks(self) -> None:
        if self._done and self._driver is not None:
            acks = self._done
            self._done = []
            try:
                await self._driver.ack(acks)
            except Exception:
                self._done.extend(acks)
                raise

    async def _bookkeep(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """`_with_retries`, shielded from cancellation and awaited by `_drain`."""
        task = asyncio.create_task(self._with_retries(what, op))
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        return await asyncio.shield(task)

    async def _with_retries(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a bookkeeping operation, retrying while the backend is unreachable.

        Giving up is safe: a job whose release or acknowledgement is lost comes back when its
        lease expires (at-least-once), so after a while the last error is raised.
        """
        delay = 0.1
        for attempt in range(12):
            try:
                return await op()
            except Exception as exc:
                if attempt == 11:
                    raise
                logger.warning("could not %s (%s); retrying in %.1fs", what, describe(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")
