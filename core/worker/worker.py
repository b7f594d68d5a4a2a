"""The worker: reserves jobs, runs them concurrently, and applies the retry policy.

One loop reserves as many jobs as there are free slots, acknowledging finished ones in the same
round trip, and waits on the backend (which blocks where it can) when nothing is ready; when it
has no room to reserve, finished jobs are acknowledged on their own, batched, at once. Each job
runs in its own task under its timeout; a heartbeat renews the leases of every job the worker
holds (prefetched, running, finished but not yet acknowledged, failed but not yet recorded); a
watchdog thread ends the process if a job blocks the loop past its timeout.

A job that will not stop (it swallows its cancellation, or a sync `handle` outlives its timeout
in a thread, which cannot be killed) is given up: its try fails, the worker takes no new job, the
others get the grace period and go back unspent, and the worker stops with `StopReason.STUCK`
so that supervisord starts a fresh process.

What runs around `handle()` in one try (hooks, middleware, `succeeded()`/`failed()`, the
outcome written with the acknowledgement) is `core.execution`, shared with the `sync`
connection. While jobs run, the worker asks the backend every half second whether any of them
was cancelled (`queue:cancel`, `handle.cancel()`): such a job's task is cancelled, and it is
acknowledged as `cancelled`: never retried, `failed()` not called. In the background, at most
once a minute, it deletes status records past their keep time (`prune_records`).

The parts with little state of their own live beside this module: `state` (the records of held
jobs), `loading` (a payload to a job), `failures` (recording jobs failed for good), `cancels`
(cancel requests), `heartbeat` (lease renewal) and `background` (pruning, duty calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from core.errors import (
    ConfigurationError,
    DriverError,
    Retry,
    WorkerLostError,
)
from core.events import EventKind, JobEvent, events
from core.execution import (
    JobAbandonedError,
    JobThreads,
    Site,
    describe,
    emit,
    first_wait,
    job_path,
    on_retried,
    on_retrying,
    on_succeeded,
    run_try,
    succeeded_outcome,
)
from core.hooks import hooks
from core.job import Job
from core.log import job_fields, outside_job
from core.queue.drivers.base import Driver, ReservedJob
from core.queue.payload import JobLoader
from core.queue.queue_manager import QueueManager
from core.steps import POST_DUE
from core.worker.background import Duties
from core.worker.cancels import CancelRequests
from core.worker.failures import FailureRecorder
from core.worker.heartbeat import Heartbeat
from core.worker.history import HistoryCounts
from core.worker.loading import load
from core.worker.options import ExitCode, StopReason, WorkerOptions
from core.worker.pauses import Pauses
from core.worker.state import (
    DEFAULT_TIMEOUT,
    Buffered,
    Running,
    WorkerCounts,
    job_timeout,
    set_thread,
)
from core.worker.watchdog import Watchdog

if TYPE_CHECKING:
    from core.mqtt.outcomes import OutcomePublisher

__all__ = ["Worker", "WorkerCounts", "exit_code"]

logger = logging.getLogger("topiq.worker")

T = TypeVar("T")

#: In a payload whose dispatch asked for its outcome over MQTT (the envelope's `reply` key).
_REPLY_KEY = b'"reply"'


class Worker:
    """Runs jobs from one connection's queues until a stop reason occurs.

    `await Worker(manager, options).run()` returns the `StopReason`. After a run that gave a
    job up, `must_end_process` says whether a job's task or thread is still running, which only
    ending the process can stop (`queue:work` does so with `os._exit`).
    """

    def __init__(self, manager: QueueManager, options: WorkerOptions) -> None:
        self.manager = manager
        self.options = options
        self.connection = manager.connection_name(options.connection)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        settings = manager.settings
        self._margin = settings.queue_lease_margin
        self._loader = JobLoader(settings.queue_allowed_modules)
        self._default_lease = (options.timeout or DEFAULT_TIMEOUT) + self._margin
        self._result_ttl = settings.queue_result_ttl
        self._failure_ttl = settings.queue_failure_ttl
        self._max_result = settings.queue_max_payload_bytes
        self._cancels = CancelRequests(self)
        self._duties = Duties(self._margin)
        self._heartbeat = Heartbeat(self)
        # Tries started and ended, per queue and minute, sent with each heartbeat.
        self.history = HistoryCounts()
        self._pauses = Pauses(self)
        # Jobs reserved ahead of a free slot hold only this short lease (renewed by the
        # heartbeat), so a worker that dies with them buffered gives them back quickly.
        self._prestart_lease = self._margin
        # How long a job may take to stop after its cancellation before it is given up.
        self._stop_within = max(0.5, min(self._margin / 2, 5.0))
        self._heartbeat_every = max(0.2, min(5.0, self._margin / 3))
        self._running: dict[str, Running] = {}
        # Reserved ahead of a free slot, so that a finishing job is replaced without waiting
        # for a round trip to the backend.
        self._buffer: deque[Buffered] = deque()
        self._prefetch = (
            options.prefetch if options.prefetch is not None else options.concurrency // 4
        )
        self._done: list[ReservedJob] = []  # finished, acknowledgement not yet sent
        self._unacked: dict[str, ReservedJob] = {}  # finished, acknowledgement not yet stored
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()  # set by `stop`: ends a backoff pause at once
        self._stop_reason: StopReason | None = None
        self._force = asyncio.Event()
        self._started = 0
        self._processed = 0
        self.counts = WorkerCounts()
        self._started_at = time.time()
        self._watchdog = Watchdog(self._running)
        self._threads = JobThreads(options.concurrency)
        self._driver: Driver | None = None
        self._failed_jobs = FailureRecorder(
            manager, self.connection, self.id, self._margin, self.counts, self._finish, self._track
        )
        # What a try needs beyond handle(): step checkpoints, RQ callbacks (core.execution).
        self._site = Site(
            self.connection,
            tuple(settings.queue_allowed_modules),
            settings.queue_max_payload_bytes,
            self._save_payload,
            self._threads,
            self._stop_within,
            self._hook_stuck,
        )
        self._failed_jobs.site = self._site
        # Failed for good, held (lease renewed) until recorded: the recorder's own dict.
        self._failures = self._failed_jobs.held
        self._given_up: list[tuple[Running, JobAbandonedError]] = []
        self._abandoned: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._bookkeeping: set[asyncio.Task[Any]] = set()
        self._lease_requests: list[tuple[Running, float]] = []
        self._lease_batch: asyncio.Task[None] | None = None
        # Publishes job outcomes over MQTT; made for the first job that asks for it.
        self._outcomes: OutcomePublisher | None = None

    # -- control -----------------------------------------------------------------------

    @property
    def prefetch(self) -> int:
        """How many jobs this worker reserves ahead of a free slot."""
        return self._prefetch

    @property
    def processed(self) -> int:
        """Jobs finished (done, retried or failed) so far."""
        return self._processed

    @property
    def _prune_every(self) -> float:
        """Seconds between two prunes of expired status records (tests shorten it)."""
        return self._duties.prune_every

    @_prune_every.setter
    def _prune_every(self, seconds: float) -> None:
        self._duties.prune_every = seconds

    @property
    def must_end_process(self) -> bool:
        """Whether a job given up is still running (a task or a thread): only exiting ends it."""
        return self._threads.busy > 0 or any(not task.done() for task in self._tasks)

    def stop(self, reason: StopReason = StopReason.SIGNAL) -> None:
        """Stop reserving; running jobs get the grace period. A second call skips the grace."""
        if self._stop_reason is None:
            self._stop_reason = reason
            logger.info("worker %s stopping (%s)", self.id, reason.value)
        elif reason is StopReason.SIGNAL:
            logger.warning("worker %s: second stop signal, cancelling running jobs", self.id)
            self._force.set()
        self._stopping.set()
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
            hooks.load()
            if self.options.with_scheduler:
                from core.schedule import schedule

                schedule.load(self.manager.settings.schedule_module)
            self._driver = await self._until_connected()
            if self._driver is None:
                return self._stop_reason or StopReason.SIGNAL
            # Not waited for: a failed-job store that is down must not keep jobs from running.
            opener = asyncio.create_task(self._failed_jobs.open_store_at_start())
            async with self._watchdog:
                heartbeat = asyncio.create_task(
                    self._heartbeat.run(), name="topiq-worker-heartbeat"
                )
                duties = [
                    asyncio.create_task(self._cancels.watch(), name="topiq-worker-cancels"),
                    asyncio.create_task(self._pauses.watch(), name="topiq-worker-pauses"),
                    asyncio.create_task(
                        self._duties.prune_records(self._driver), name="topiq-worker-prune"
                    ),
                ]
                scheduler = self._start_scheduler()
                try:
                    await self._work()
                finally:
                    if scheduler is not None:  # no new ticks once stopping; a push ends first
                        scheduler[0].stop()
                        await asyncio.wait({scheduler[1]}, timeout=self._margin)
                        scheduler[1].cancel()
                        await asyncio.gather(scheduler[1], return_exceptions=True)
                    await self._drain()
                    await self._settle_given_up()
                    await self._failed_jobs.settle(self._driver, self.options.grace)
                    for duty in duties:
                        duty.cancel()
                    heartbeat.cancel()
                    await asyncio.gather(heartbeat, *duties, return_exceptions=True)
                    await self._heartbeat.send_history(self._margin)
                    await self._duties.end_calls()
            self._closing = True
            if self._flusher is not None:
                await asyncio.gather(self._flusher, return_exceptions=True)
            await self._with_retries("acknowledge finished jobs", self._flush_acks)
            if self._outcomes is not None:
                await self._outcomes.close(self._margin)
            with contextlib.suppress(Exception):
                await self._driver.remove_worker(self.id)
            opener.cancel()  # only if the store still has not answered
            await asyncio.gather(opener, return_exceptions=True)
        finally:
            self._threads.shutdown()
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        reason = self._stop_reason or StopReason.SIGNAL
        if self.counts.given_up:
            reason = StopReason.STUCK
        if reason is StopReason.STUCK:
            logger.critical(
                "worker %s stopped: %d job(s) would not stop and were given up; exiting so "
                "that a fresh worker process takes over",
                self.id,
                self.counts.given_up,
            )
        else:
            logger.info(
                "worker %s stopped (%s) after %d jobs", self.id, reason.value, self._processed
            )
        return reason

    def _start_scheduler(self) -> tuple[Any, asyncio.Task[None]] | None:
        """`--with-scheduler`: the app's schedules enqueued by this process too."""
        if not self.options.with_scheduler:
            return None
        from core.schedule import Scheduler

        scheduler = Scheduler(self.manager)
        return scheduler, asyncio.create_task(scheduler.run(), name="topiq-worker-scheduler")

    async def _until_connected(self) -> Driver | None:
        delay = 0.1
        while self._stop_reason is None:
            try:
                return await self.manager.connection(self.connection)
            except ConfigurationError:
                raise  # a wrong setting (e.g. TLS the server does not speak): no retry helps
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
        waiting_on: list[str] = []  # the queues `waiter` waits on
        failures = 0
        topped_up = False
        await self._pauses.refresh()
        try:
            while self._stop_reason is None:
                self._changed.clear()
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(StopReason.MAX_TIME)
                    break
                buffer = self._buffer
                while buffer and len(self._running) < opts.concurrency:
                    waiting = buffer.popleft()
                    if waiting.lease_until > time.monotonic():
                        self._start(waiting)
                    else:
                        self._lapsed(waiting)
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
                    # No reservation will carry the acknowledgements: send them on their own.
                    self._flush_soon()
                    if deadline is None:
                        await self._changed.wait()
                    else:
                        await self._wait_changed(None, deadline)
                    # One more turn of the loop lets every job finishing in this same turn
                    # report in, so the next round trip acknowledges and reserves in bulk.
                    await asyncio.sleep(0)
                    continue
                active = self._pauses.active(queues)
                if not active:
                    # Every queue is paused: wait for a resume (or a stop).
                    self._flush_soon()
                    if opts.stop_when_empty and not self._running and not buffer:
                        self.stop(StopReason.EMPTY)
                        break
                    await self._wait_changed(None, deadline)
                    continue
                # Jobs that start at once take the lease their timeout needs; jobs that will
                # wait in the buffer a short one, renewed while they wait.
                free = opts.concurrency - len(self._running)
                if not buffer and 0 < free < room:
                    # Nothing buffered and slots free (an idle worker): take only what starts
                    # now, under the lease it runs with, so a job starts without a lease
                    # round trip first. The prefetch follows in the next turn.
                    room = free
                lease = self._default_lease if room <= free else self._prestart_lease
                acks = self._done
                self._done = []
                asked = time.monotonic()
                # Whether the wait under way had already ended when this reservation was sent.
                woken_before = waiter is None or waiter.done()
                try:
                    # Shielded: a reservation that reached the server must reach us too.
                    jobs = await asyncio.shield(
                        driver.reserve(active, room, lease, acks, worker=self.id)
                    )
                    failures = 0
                except Exception as exc:
                    self._done[:0] = acks
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
                self._acknowledged(acks)
                if jobs and any(job.expired for job in jobs):
                    self._expired([job for job in jobs if job.expired])
                    jobs = [job for job in jobs if not job.expired]
                if jobs and self._pauses.paused:
                    # Reserved as its queue was being paused: handed back unstarted.
                    jobs = self._hand_back_paused(jobs, lease, asked)
                if jobs:
                    held = [Buffered(job, lease, asked + lease) for job in jobs]
                    if self._stop_reason is not None:
                        await self._return_unstarted(held)
                        break
                    buffer.extend(held)
                    continue
                if opts.stop_when_empty and not self._running and not buffer:
                    self.stop(StopReason.EMPTY)
                    break
                if waiter is not None and not waiter.done() and waiting_on != active:
                    # A queue was paused or resumed: wait on the queues taken from now.
                    waiter.cancel()
                    await asyncio.gather(waiter, return_exceptions=True)
                    waiter = None
                if (
                    waiter is not None
                    and waiter.done()
                    and not woken_before
                    and not waiter.cancelled()
                    and waiter.exception() is None
                ):
                    # Woken while that reservation was on its way: the wake-up may be for a job
                    # pushed after the reservation looked. Look again now, not after a sleep.
                    waiter = None
                    continue
                if waiter is None or waiter.done():
                    if waiter is not None and not waiter.cancelled() and waiter.exception():
                        await self._pause(min(0.1 * 2**failures, 5.0))
                        failures += 1
                    waiting_on = active
                    waiter = asyncio.create_task(
                        driver.wait(active, opts.sleep), name="topiq-worker-wait"
                    )
                await self._wait_changed(waiter, deadline)
        finally:
            if waiter is not None:
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            # Prefetched jobs that never started go back to the front of their queue at once.
            unstarted = list(self._buffer)
            self._buffer.clear()
            await self._return_unstarted(unstarted)

    def _expired(self, jobs: list[ReservedJob]) -> None:
        """Jobs the backend found past their `ttl` in this reservation: already ended (never
        run, never acknowledged); announced so that listeners can report the end, and their
        outcome published over MQTT when their dispatch asked for it."""
        for job in jobs:
            if _REPLY_KEY in job.payload:
                self._outcome_publisher().expired(job)
        if events.active:
            for job in jobs:
                events.emit(
                    JobEvent(
                        EventKind.EXPIRED,
                        job.id,
                        job.queue,
                        self.connection,
                        attempts=job.attempts,
                        error="expired before it started (ttl)",
                        worker=self.id,
                    )
                )

    def _paused_changed(self) -> None:
        """Queues were paused or resumed: hand back the prefetched jobs of the paused ones
        (unspent, to the front of their queues) and let the loop reserve from the others."""
        paused = self._pauses.paused
        held = [waiting for waiting in self._buffer if waiting.reserved.queue in paused]
        for waiting in held:
            self._buffer.remove(waiting)
        if held:
            self._return_later(held)
        self._changed.set()

    def _hand_back_paused(
        self, jobs: list[ReservedJob], lease: float, asked: float
    ) -> list[ReservedJob]:
        """The jobs of `jobs` whose queue is not paused; the others are handed back."""
        paused = self._pauses.paused
        back = [Buffered(job, lease, asked + lease) for job in jobs if job.queue in paused]
        if back:
            self._return_later(back)
        return [job for job in jobs if job.queue not in paused]

    def _return_later(self, held: list[Buffered]) -> None:
        """Hand back jobs of paused queues that were reserved but not started, in the
        background (awaited by `_drain`)."""
        logger.info(
            "worker %s hands back %d prefetched job(s) of paused queue(s) unstarted",
            self.id,
            len(held),
        )

        async def hand_back() -> None:
            try:
                await self._return_unstarted(held)
            except Exception as exc:
                logger.error(
                    "could not hand back %d job(s) of paused queue(s) (%s); their leases "
                    "return them",
                    len(held),
                    describe(exc),
                )

        self._track(asyncio.create_task(hand_back()))

    async def _return_unstarted(self, jobs: list[Buffered]) -> None:
        """Give back jobs reserved but never started, without spending their try."""
        driver = self._driver
        assert driver is not None
        # Last first: each goes to the front of its queue, so they keep their order.
        for held in reversed(jobs):
            await self._with_retries(
                "return a job", functools.partial(driver.release, held.reserved, refund=True)
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
        """Sleep, but wake at once when a stop is requested.

        Only a stop ends it early: a job ending meanwhile must not, or a backoff after a
        failed reservation would be cut short by every job still finishing, and the next
        tries fail at once while the server restarts, each doubling the pause (a Redis
        back in 0.1 s left a busy worker waiting 3.2 s).
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- running jobs ------------------------------------------------------------------

    def _start(self, held: Buffered) -> None:
        self._started += 1
        reserved = held.reserved
        run = Running(
            reserved,
            deadline=time.monotonic() + DEFAULT_TIMEOUT,
            label="?",
            lease=held.lease,
            lease_until=held.lease_until,
        )
        self._running[reserved.id] = run
        task = asyncio.create_task(self._process(run))
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, run: Running) -> None:
        reserved = run.reserved
        # Every line logged for this try (the job's own too) carries its fields in JSON logs.
        with job_fields(
            job_id=reserved.id, queue=reserved.queue, attempt=reserved.attempts, worker=self.id
        ) as fields:
            await self._process_job(run, fields)

    async def _process_job(self, run: Running, fields: dict[str, Any]) -> None:
        reserved = run.reserved
        try:
            job, max_tries, timeout, error = load(
                run, self._loader, self.options, self._result_ttl, self._failure_ttl
            )
            run.max_tries = max_tries
            if job is not None:
                fields["job"] = job_path(job)
            if reserved.attempts > max_tries:
                label = type(job).__qualname__ if job is not None else "job"
                lost = WorkerLostError(
                    f"{label} was reserved {reserved.attempts - 1} times and its worker was lost "
                    f"on the last allowed try (max_tries={max_tries})"
                )
                lost.__cause__ = error
                logger.error("job %s %s failed for good: %s", reserved.id, label, lost)
                await self._failed_jobs.fail(run, job, lost, timeout)
                return
            if job is None:
                assert error is not None
                logger.error("job %s on %s cannot be run: %s", reserved.id, reserved.queue, error)
                await self._failed_jobs.fail(run, None, error, timeout)
                return
            await self._run(run, job, max_tries, timeout)
        except DriverError as exc:
            # The backend stayed unreachable through every retry of a release: the job is no
            # longer renewed here, so its lease returns it to its queue (at-least-once).
            logger.error(
                "job %s: could not hand it back (%s); its lease returns it", reserved.id, exc
            )
        except Exception as exc:
            # A defect in handling this job (not in the job itself): it must still end up
            # somewhere, so record it as failed rather than let the task die with it.
            logger.exception("job %s: the worker could not handle it", reserved.id)
            if not (run.given_up or run.lost) and reserved.id not in self._failures:
                await self._failed_jobs.fail(run, None, exc, DEFAULT_TIMEOUT)
        finally:
            if self._running.get(reserved.id) is run:
                del self._running[reserved.id]
            if not run.given_up:
                self._processed += 1
            self._changed.set()

    async def _run(self, run: Running, job: Job, max_tries: int, timeout: float) -> None:
        driver = self._driver
        assert driver is not None
        reserved = run.reserved
        label = type(job).__qualname__
        run.job = job
        lease = timeout + self._margin
        run.label = label
        started = run.started = time.perf_counter()
        tried = False  # whether run_try was entered (its end counts in the history)
        try:
            if lease != run.lease:
                # Reserved under a short or the default lease: give it the one its own timeout
                # needs before it runs (a job that blocks the loop at once must not keep the
                # wrong one), so a job that dies with its worker comes back neither too early
                # nor too late. Batched with the other jobs starting in this turn.
                await self._set_lease(run, lease)
                if run.lease_until <= time.monotonic():
                    # Not renewed, and the short lease it was reserved under has lapsed.
                    self._lose(run)
                    return
            run.deadline = time.monotonic() + timeout
            waited = first_wait(reserved.attempts, run.since)
            self.history.started(reserved.queue, waited)
            announce = events.active
            if announce:
                emit(
                    EventKind.STARTED,
                    reserved,
                    self.connection,
                    job,
                    worker=self.id,
                    waited=waited,
                )
            logger.debug(
                "job %s %s try %d/%d started", job.job_id, label, reserved.attempts, max_tries
            )
            tried = True
            result = await run_try(
                job,
                timeout,
                self._threads,
                stop_within=self._stop_within,
                on_stuck=functools.partial(self._give_up, run),
                on_thread=functools.partial(set_thread, run),
                site=self._site,
                reserved=reserved,
            )
        except asyncio.CancelledError:
            run.settled = True
            if run.given_up or run.lost:
                return  # not ours to release any more; the task ends here
            if run.cancelling:
                await self._cancels.cancelled(run, job)
                return
            logger.warning(
                "job %s %s returned to its queue: the worker is stopping", job.job_id, label
            )
            await self._bookkeep("return a job", lambda: driver.release(reserved, refund=True))
            self.counts.returned += 1
            if events.active:
                emit(
                    EventKind.RETURNED,
                    reserved,
                    self.connection,
                    job,
                    worker=self.id,
                    started=started,
                )
            raise
        except JobAbandonedError as exc:
            run.settled = True
            self.history.ran(reserved.queue, time.perf_counter() - started)
            self._give_up(run, exc)
        except BaseException as exc:
            # Exception, and SystemExit or KeyboardInterrupt raised by the job's code (its
            # handle, a step, a hook, a callback): the try failed with it, the task goes on.
            run.settled = True
            if tried:
                self.history.ran(reserved.queue, time.perf_counter() - started)
            if run.given_up or run.lost:
                return
            if run.cancelling:
                # It stopped on its cancel with an error of its own: still cancelled, not retried.
                await self._cancels.cancelled(run, job)
                return
            if isinstance(exc, Retry) and exc.delay is not None:
                delay = exc.delay
            else:
                delay = self._backoff(job, reserved)
            await self._retry_or_fail(run, job, exc, delay)
        else:
            run.settled = True
            ran_for = time.perf_counter() - started
            self.history.ran(reserved.queue, ran_for)
            if run.given_up or run.lost:
                return
            if hooks.any_run_hooks or type(job).succeeded is not Job.succeeded:
                await on_succeeded(job, result, timeout)
                if run.given_up or run.lost:
                    return
            reserved.outcome = succeeded_outcome(job, result, run.result_ttl, self._max_result)
            self._finish(reserved, result)
            self.counts.done += 1
            if announce:
                emit(
                    EventKind.SUCCEEDED,
                    reserved,
                    self.connection,
                    job,
                    worker=self.id,
                    started=started,
                )
            duration = time.perf_counter() - started
            logger.info(
                "job %s %s try %d/%d done in %.1fms",
                job.job_id,
                label,
                reserved.attempts,
                max_tries,
                duration * 1000,
                extra={"duration": round(duration, 6)},
            )

    def _backoff(self, job: Job, reserved: ReservedJob) -> float:
        try:
            delay = float(job.backoff(reserved.attempts))
            if math.isfinite(delay) and delay >= 0:
                return delay
            raise ValueError(f"{delay!r} is not a usable delay")
        except Exception as exc:
            logger.warning(
                "job %s: retry_after gives no usable delay (%s); retrying at once",
                reserved.id,
                describe(exc),
            )
            return 0.0

    async def _set_lease(self, run: Running, lease: float) -> None:
        """Renew a lease, batched with the others asked for in the same turn of the loop."""
        run.lease = lease
        self._lease_requests.append((run, lease))
        if self._lease_batch is None or self._lease_batch.done():
            self._lease_batch = self._track(
                asyncio.create_task(self._send_leases(), context=outside_job())
            )
        await asyncio.shield(self._lease_batch)

    async def _send_leases(self) -> None:
        driver = self._driver
        assert driver is not None
        await asyncio.sleep(0)  # jobs starting in this same turn join the batch
        batch, self._lease_requests = self._lease_requests, []
        asked = time.monotonic()
        try:
            await driver.extend([(run.reserved, lease) for run, lease in batch])
        except Exception as exc:
            # Not fatal: the heartbeat renews every running job's lease shortly.
            logger.warning("could not set the leases of %d job(s): %s", len(batch), describe(exc))
            return
        for run, lease in batch:
            run.lease_until = max(run.lease_until, asked + lease)

    async def _retry_or_fail(
        self, run: Running, job: Job, exc: BaseException, delay: float
    ) -> None:
        driver = self._driver
        assert driver is not None
        reserved, label, max_tries = run.reserved, run.label, run.max_tries
        ran = {"duration": round(time.perf_counter() - run.started, 6)} if run.started else None
        if reserved.attempts < max_tries:
            asked = isinstance(exc, Retry)
            reason = describe(exc)
            if await self._no_longer_held(run, job, reason):
                return
            logger.warning(
                "job %s %s try %d/%d %s; retrying in %gs",
                job.job_id,
                label,
                reserved.attempts,
                max_tries,
                "asked for a retry" if asked else f"failed ({reason})",
                delay,
                extra=ran,
            )
            # The hooks hear of this try before the next one can start anywhere.
            await on_retrying(job, exc)
            await self._bookkeep(
                "release a job", lambda: driver.release(reserved, delay, error=reason)
            )
            self.counts.retried += 1
            if events.active:
                emit(
                    EventKind.RETRYING,
                    reserved,
                    self.connection,
                    job,
                    worker=self.id,
                    started=run.started or None,
                    error=reason,
                )
            # The post-task hook owed for a body that raised: once the retry is scheduled.
            await on_retried(job, self.options.timeout or job_timeout(job), self._site)
            return
        logger.error(
            "job %s %s try %d/%d failed for good: %s",
            job.job_id,
            label,
            reserved.attempts,
            max_tries,
            describe(exc),
            extra=ran,
        )
        timeout = self.options.timeout or job_timeout(job)
        await self._failed_jobs.fail(run, job, exc, timeout)

    async def _no_longer_held(self, run: Running, job: Job, reason: str) -> bool:
        """Before a retry's hooks and release: whether the try is no longer this worker's
        (its lease lapsed, say while the process was frozen, and another worker may hold or
        have finished the job). Then it is logged as lost, and neither the retry hooks nor
        the owed post-task hook run for it. Asked of the backend (the checkpoint's check,
        writing the payload it has) only when the job owes a post-task hook or its lease may
        have lapsed: a plain job's retry costs no round trip more."""
        reserved = run.reserved
        if POST_DUE not in job.__dict__ and run.lease_until > time.monotonic():
            return False
        driver = self._driver
        assert driver is not None
        try:
            held = await driver.save_payload(reserved, reserved.payload)
        except Exception as exc:  # not answered, or a driver without it: the release decides
            logger.debug("job %s: could not ask whether it is still held: %s", reserved.id, exc)
            return False
        if held:
            return False
        job.__dict__.pop(POST_DUE, None)
        if not (run.given_up or run.lost):
            run.lost = True
            if self._running.get(reserved.id) is run:
                del self._running[reserved.id]
            self.counts.lost += 1
        logger.error(
            "job %s %s try %d/%d failed (%s), but its reservation was gone (its lease lapsed; "
            "another worker may have it): lost here, not retried from here, no hook run",
            reserved.id,
            run.label,
            reserved.attempts,
            run.max_tries,
            reason,
        )
        return True

    async def _save_payload(self, reserved: ReservedJob, payload: bytes) -> bool:
        """A step job's checkpoint (`Site.save`): False, and its try stops as a lost one,
        when its reservation is no longer this worker's."""
        driver = self._driver
        assert driver is not None
        saved = await self._with_retries(
            "save a step job's progress", lambda: driver.save_payload(reserved, payload)
        )
        if saved:
            return True
        run = self._running.get(reserved.id)
        if run is not None and run.reserved is reserved and not (run.given_up or run.lost):
            run.lost = True
            del self._running[reserved.id]
            self.counts.lost += 1
            logger.error(
                "job %s %s: its reservation was gone when its progress was to be saved (its "
                "lease lapsed; another worker may have it); this try stops",
                reserved.id,
                run.label,
            )
        return False

    def _hook_stuck(self, exc: JobAbandonedError) -> None:
        """A hook or callback whose errors are logged only (`Site.stuck`: post-task and
        failure hooks, RQ's failure and stopped callbacks) would not stop: the job's outcome
        stands; this worker stops taking jobs and exits as for a stuck `handle` (the process
        ends if its thread or task still runs then)."""
        logger.critical(
            "%s; giving it up: this worker takes no new job, lets the others finish within "
            "the grace period and exits",
            exc,
        )
        self.stop(StopReason.STUCK)

    def _give_up(self, run: Running, exc: JobAbandonedError) -> None:
        """A job that will not stop: its try fails, and this worker stops for a restart.

        Its retry or failure is recorded when the worker has drained, just before it exits, so
        the retry never runs while this process still runs the abandoned try.
        """
        if run.given_up or run.lost:
            return
        run.given_up = True
        if self._running.get(run.reserved.id) is run:
            del self._running[run.reserved.id]
        if run.task is not None and run.task is not asyncio.current_task():
            self._abandoned.add(run.task)
        self._given_up.append((run, exc))
        self._processed += 1
        self.counts.given_up += 1
        logger.critical(
            "job %s %s would not stop: %s; giving it up: this worker takes no new job, lets "
            "the others finish within the grace period, records the try as failed and exits",
            run.reserved.id,
            run.label,
            describe(exc),
        )
        self.stop(StopReason.STUCK)

    async def _settle_given_up(self) -> None:
        """Apply the retry policy to the tries given up, now that no other job runs here."""
        while self._given_up:
            run, exc = self._given_up.pop(0)
            job = run.job
            if run.cancelling:
                await self._cancels.finish_cancelled(run, job)  # cancelled: never retried
                continue
            if job is None:
                await self._failed_jobs.fail(run, None, exc, DEFAULT_TIMEOUT)
                continue
            await self._retry_or_fail(run, job, exc, self._backoff(job, run.reserved))

    def _lose(self, run: Running) -> None:
        """Its lease lapsed while the backend was unreachable: another worker may run it now."""
        if run.given_up or run.lost:
            return
        run.lost = True
        if self._running.get(run.reserved.id) is run:
            del self._running[run.reserved.id]
        self.counts.lost += 1
        logger.error(
            "job %s %s: its lease could not be renewed before it expired (the %s backend is "
            "unreachable); cancelled, since another worker may already have it",
            run.reserved.id,
            run.label,
            self.connection,
        )
        task = run.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            asyncio.get_running_loop().call_later(self._stop_within, self._check_stopped, run, task)

    def _check_stopped(self, run: Running, task: asyncio.Task[None]) -> None:
        if not task.done():
            self._abandoned.add(task)
            logger.critical(
                "job %s %s did not stop when cancelled; this worker exits so that it ends",
                run.reserved.id,
                run.label,
            )
            self.stop(StopReason.STUCK)

    def _finish(self, reserved: ReservedJob, result: Any = None) -> None:
        """A job is done with here: acknowledge it (its lease is renewed until that is stored),
        and publish its outcome over MQTT when its dispatch asked for it (in the background).

        `result` is the return value of a job that succeeded.
        """
        if _REPLY_KEY in reserved.payload:
            # Its publishing task serves every job: started outside this job's log fields.
            outside_job().run(self._outcome_publisher().ended, reserved, result)
        self._done.append(reserved)
        self._unacked[reserved.id] = reserved
        self._changed.set()
        if self._stop_reason is not None:
            self._flush_soon()

    def _outcome_publisher(self) -> OutcomePublisher:
        if self._outcomes is None:
            # Imported here: a worker whose jobs never ask for outcomes loads no MQTT client.
            from core.mqtt.outcomes import OutcomePublisher

            self._outcomes = OutcomePublisher()
        return self._outcomes

    def _acknowledged(self, jobs: list[ReservedJob]) -> None:
        for job in jobs:
            if self._unacked.get(job.id) is job:
                del self._unacked[job.id]

    def _flush_soon(self) -> None:
        """Send the acknowledgements waiting, on their own, unless a flush is under way."""
        if self._done and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_loop(), context=outside_job())

    async def _flush_loop(self) -> None:
        driver = self._driver
        assert driver is not None
        delay = 0.1
        await asyncio.sleep(0)  # jobs finishing in this same turn join the batch
        while self._done:
            acks, self._done = self._done, []
            try:
                await asyncio.shield(driver.ack(acks))
            except Exception as exc:
                self._done[:0] = acks
                if self._closing:
                    return
                logger.warning(
                    "could not acknowledge %d finished job(s) (%s); retrying in %.1fs",
                    len(acks),
                    describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._acknowledged(acks)

    async def _flush_acks(self) -> None:
        if self._done and self._driver is not None:
            acks = self._done
            self._done = []
            try:
                await self._driver.ack(acks)
            except Exception:
                self._done[:0] = acks
                raise
            self._acknowledged(acks)

    # -- lapsed leases, stopping -------------------------------------------------------

    def _lapsed(self, held: Buffered) -> None:
        logger.error(
            "job %s: its lease lapsed while it waited for a slot (its renewal failed or was "
            "late); not started, since another worker may have it",
            held.reserved.id,
        )

    async def _drain(self) -> None:
        """Let running jobs finish (within the grace period when stopping early)."""
        if self._live_tasks():
            bounded = self._stop_reason in (
                StopReason.SIGNAL,
                StopReason.RESTART,
                StopReason.MAX_TIME,
                StopReason.STUCK,
            )
            until = time.monotonic() + self.options.grace if bounded else None
            logger.info("worker %s waiting for %d running job(s)", self.id, len(self._live_tasks()))
            forced = asyncio.create_task(self._force.wait())
            try:
                while (live := self._live_tasks()) and not self._force.is_set():
                    timeout = None if until is None else until - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        break
                    await asyncio.wait(
                        {*live, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
            finally:
                forced.cancel()
            live = self._live_tasks()
            for task in live:
                task.cancel()
            if live:
                await asyncio.wait(live, timeout=self._stop_within)
            for run in list(self._running.values()):
                if run.task is not None and not run.task.done():
                    self._refused(run)
        # Releases and failure records started by cancelled jobs run on, shielded: wait for them.
        while self._bookkeeping:
            await asyncio.gather(*self._bookkeeping, return_exceptions=True)

    def _live_tasks(self) -> set[asyncio.Task[None]]:
        return {task for task in self._tasks if task not in self._abandoned and not task.done()}

    def _refused(self, run: Running) -> None:
        """A job that did not stop when cancelled: hand it back unspent; the process must end."""
        driver = self._driver
        assert driver is not None
        run.given_up = True
        del self._running[run.reserved.id]
        if run.task is not None:
            self._abandoned.add(run.task)
        logger.critical(
            "job %s %s did not stop within %gs of being cancelled; returned to its queue "
            "unspent, and this worker process ends without waiting for it",
            run.reserved.id,
            run.label,
            self._stop_within,
        )
        self._bookkeep_later(
            "return a job", functools.partial(driver.release, run.reserved, refund=True)
        )
        self.counts.returned += 1
        if events.active:
            emit(
                EventKind.RETURNED,
                run.reserved,
                self.connection,
                run.job,
                worker=self.id,
                started=run.started or None,
            )

    def _track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Keep a background task referenced, and let `_drain` wait for it."""
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        return task

    def _bookkeep_later(self, what: str, op: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        return self._track(asyncio.create_task(self._with_retries(what, op)))

    async def _bookkeep(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """`_with_retries`, shielded from cancellation and awaited by `_drain`."""
        return await asyncio.shield(self._bookkeep_later(what, op))

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


def exit_code(worker: Worker, reason: StopReason) -> int:
    """The process exit code for a worker that stopped for `reason`.

    When a job that was given up still runs (a thread, or a task that swallows cancellation),
    only the end of the process stops it: this ends the process at once, as the watchdog does,
    instead of returning (the interpreter would wait for that thread forever).
    """
    code = ExitCode.STUCK if reason is StopReason.STUCK else ExitCode.OK
    if worker.must_end_process:
        logger.critical(
            "worker %s: a job that would not stop is still running; ending the process "
            "(exit code %d)",
            worker.id,
            code,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return int(code)
