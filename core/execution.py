"""Running one try of a job, for whoever runs it: the worker, and the `sync` connection.

One try, in this order:

1. `hooks.starting(job)` (the application's `before_run` hooks; one that raises fails the try);
2. the job's middleware, outermost first, around
3. `handle()`, under its timeout (a plain `def handle` in a thread);
4. then, on success: `job.succeeded(result)` (what it raises is logged: the job still
   succeeded), then `hooks.finished(job, succeeded, result)`;
   on a try that will be retried: `hooks.finished(job, retrying, exc)`;
   on the last failure: `job.failed(exc)`, `hooks.failing(job, exc)`,
   `hooks.finished(job, failed, exc)`;
   on a cancel: `hooks.finished(job, cancelled, exc)` (`failed()` is not called).

The runner decides *when* a job is retried or recorded (leases, the failed-job store); this
module says *what* runs around `handle()` and how the outcome is written (`Outcome`), so the
two runners cannot drift apart. It knows nothing of the worker or of MQTT.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import orjson

from core import tracing
from core.errors import JobTimeoutError
from core.events import EventKind, JobEvent, events
from core.hooks import hooks
from core.job import Job, JobMiddleware
from core.queue.drivers.base import FailedJob, Outcome, ReservedJob
from core.status import Status

__all__ = [
    "JobAbandonedError",
    "JobThreads",
    "call_failed",
    "call_handle",
    "call_succeeded",
    "cancelled_outcome",
    "describe",
    "emit",
    "failed_outcome",
    "failed_record",
    "first_wait",
    "job_path",
    "on_cancelled",
    "on_failed",
    "on_retrying",
    "on_succeeded",
    "run_try",
    "succeeded_outcome",
    "wants_success_calls",
]

logger = logging.getLogger("topiq.worker")

#: Whether each job class's `handle` function is a coroutine function (asked once per
#: function). Keyed on, and asked of, the class's own function: never an instance attribute,
#: which a payload could otherwise set to poison the answer for every later job of the class.
_ASYNC_HANDLE: dict[Callable[..., Any], bool] = {}


class JobAbandonedError(JobTimeoutError):
    """A try outlived its timeout and would not stop: its worker gave it up and exits.

    An async `handle` that swallows its cancellation, or a sync `handle` whose thread (which
    cannot be killed) is still running a moment past the timeout.
    """


class JobThreads:
    """The threads sync `handle`s run in: one per slot of the worker.

    Kept apart from the event loop's default executor, so `asyncio.to_thread` inside jobs never
    waits behind them. `busy` counts threads still running a `handle`, abandoned ones included.
    """

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="topiq-job")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    def start(self, function: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `function` in a thread with the caller's context; never `await` the result
        directly (cancelling that would not stop the thread): use `asyncio.wait`."""
        context = contextvars.copy_context()

        def run() -> Any:
            try:
                return context.run(function)
            finally:
                with self._lock:
                    self._busy -= 1

        with self._lock:
            self._busy += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        # An abandoned thread's error is nobody's to read: take it so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def shutdown(self) -> None:
        """Let the threads go; does not wait for one still running."""
        self._executor.shutdown(wait=False, cancel_futures=True)


async def call_handle(
    job: Job,
    timeout: float,
    threads: JobThreads | None = None,
    *,
    stop_within: float = 0.0,
    on_stuck: Callable[[JobAbandonedError], None] | None = None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
) -> Any:
    """Run `job.handle()`, cancelled after `timeout` seconds (then `JobTimeoutError`).

    A plain `def handle` runs in one of `threads` so it cannot stall the event loop. A thread
    cannot be stopped: if it is still running `stop_within` seconds past the timeout, this
    raises `JobAbandonedError` and the thread is left to itself. An async `handle` that
    swallows its cancellation and is still running `stop_within` seconds later cannot be
    stopped either: `on_stuck` is called (from the event loop) with the error to record, and
    this call keeps waiting for the job, whose result no longer matters. Without `threads`
    (the sync connection), sync handles use the loop's default executor. `on_thread` is
    given the future of a sync handle's thread as it starts (to learn when it really ends).
    """
    cls = type(job)
    function = cls.handle
    is_async = _ASYNC_HANDLE.get(function)
    if is_async is None:
        is_async = _ASYNC_HANDLE[function] = inspect.iscoroutinefunction(function)
    handle = job.handle  # the method itself: the loader refuses data that would shadow it
    if not is_async:
        return await _call_in_thread(job, handle, timeout, threads, stop_within, on_thread)
    if timeout <= 0:
        return await handle()
    # A bare timer and a flag: what asyncio.timeout() does, at a third of its cost per job.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    expired = finished = False

    def stuck() -> None:
        if not finished and on_stuck is not None:
            on_stuck(
                JobAbandonedError(
                    f"{cls.__qualname__} timed out after {timeout:g}s and did not stop within "
                    f"{stop_within:g}s of being cancelled (try {job.attempts})"
                )
            )

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()
        if on_stuck is not None:
            loop.call_later(stop_within, stuck)

    timer = loop.call_later(timeout, expire)
    try:
        result = await handle()
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise _timed_out(job, timeout) from None
        raise
    finally:
        finished = True
        timer.cancel()
    if expired:  # the job swallowed our cancellation and returned: the try still timed out
        task.uncancel()
        raise _timed_out(job, timeout)
    return result


def _timed_out(job: Job, timeout: float) -> JobTimeoutError:
    return JobTimeoutError(
        f"{type(job).__qualname__} timed out after {timeout:g}s (try {job.attempts})"
    )


async def _call_in_thread(
    job: Job,
    handle: Callable[[], Any],
    timeout: float,
    threads: JobThreads | None,
    stop_within: float,
    on_thread: Callable[[asyncio.Future[Any]], None] | None,
) -> Any:
    if threads is None:
        future = asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, handle
        )
    else:
        future = threads.start(handle)
    if on_thread is not None:
        on_thread(future)
    # asyncio.wait never cancels the future: cancelling this call leaves the thread running.
    await asyncio.wait({future}, timeout=timeout if timeout > 0 else None)
    if future.done():
        return future.result()
    await asyncio.wait({future}, timeout=stop_within)
    if future.done():
        raise _timed_out(job, timeout)
    raise JobAbandonedError(
        f"{type(job).__qualname__} timed out after {timeout:g}s and its thread, which cannot "
        f"be stopped, was still running {stop_within:g}s later (try {job.attempts})"
    )


async def _call_quietly(job: Job, call: Callable[[], Any], timeout: float, what: str) -> None:
    """Call one of the job's own callbacks (sync or async) under `timeout`; what it raises is
    logged as `what`, never propagated."""
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            outcome = call()
            if inspect.isawaitable(outcome):
                await outcome
    except Exception:
        logger.exception("job %s %s: %s", job.job_id, type(job).__qualname__, what)


async def call_failed(job: Job, exception: BaseException, timeout: float) -> None:
    """Call `job.failed(exception)`; what it raises is logged, never propagated."""
    await _call_quietly(job, lambda: job.failed(exception), timeout, "failed() raised")


def describe(exc: BaseException) -> str:
    """The exception's type and message, one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def failed_record(connection: str, reserved: ReservedJob, exc: BaseException) -> FailedJob:
    """The failed-store record for a job that failed for good."""
    return FailedJob(
        id=reserved.id,
        connection=connection,
        queue=reserved.queue,
        payload=reserved.payload.decode("utf-8", "replace"),
        exception="".join(traceback.format_exception(exc)),
        failed_at=datetime.now(UTC),
    )


# -- one try: hooks, middleware, handle -------------------------------------------------


def run_try(
    job: Job,
    timeout: float,
    threads: JobThreads | None = None,
    *,
    stop_within: float = 0.0,
    on_stuck: Callable[[JobAbandonedError], None] | None = None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
) -> Awaitable[Any]:
    """`hooks.starting(job)`, then the job's middleware (outermost first) around `call_handle`;
    await it for `handle()`'s result as the middleware passes it on.

    The timeout covers `handle()` itself; what a middleware does around `call_next()` is not
    timed. With no hook and no middleware this is `call_handle` itself (the hot path). When
    the process traces (core/tracing.py), all of it runs in the try's `run <Class>` span.
    """
    chain: Sequence[JobMiddleware] = job.middleware()
    if not chain and not hooks.any_run_hooks:
        return tracing.running(
            job,
            call_handle(
                job,
                timeout,
                threads,
                stop_within=stop_within,
                on_stuck=on_stuck,
                on_thread=on_thread,
            ),
        )
    return tracing.running(
        job, _wrapped_try(job, chain, timeout, threads, stop_within, on_stuck, on_thread)
    )


async def _wrapped_try(
    job: Job,
    chain: Sequence[JobMiddleware],
    timeout: float,
    threads: JobThreads | None,
    stop_within: float,
    on_stuck: Callable[[JobAbandonedError], None] | None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None,
) -> Any:
    if hooks.any_run_hooks:
        await hooks.starting(job)

    def link(index: int) -> Callable[[], Awaitable[Any]]:
        if index == len(chain):
            return lambda: call_handle(
                job,
                timeout,
                threads,
                stop_within=stop_within,
                on_stuck=on_stuck,
                on_thread=on_thread,
            )
        middleware = chain[index]
        rest = link(index + 1)
        return lambda: middleware(job, rest)

    return await link(0)()


def wants_success_calls(job: Job) -> bool:
    """Whether `on_succeeded` has anything to call for this job (skipped on the hot path)."""
    return hooks.any_run_hooks or type(job).succeeded is not Job.succeeded


async def call_succeeded(job: Job, result: Any, timeout: float) -> None:
    """Call `job.succeeded(result)`; what it raises is logged, and the job still succeeded."""
    await _call_quietly(
        job,
        lambda: job.succeeded(result),
        timeout,
        "succeeded() raised (the job still succeeded)",
    )


async def on_succeeded(job: Job, result: Any, timeout: float) -> None:
    """After a try succeeded: `job.succeeded(result)`, then the `after_run` hooks."""
    if type(job).succeeded is not Job.succeeded:
        await call_succeeded(job, result, timeout)
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.SUCCEEDED, result)


async def on_retrying(job: Job, exc: BaseException) -> None:
    """After a try that failed (or asked for a retry) and will run again."""
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.RETRYING, exc)


async def on_failed(job: Job, exc: BaseException, timeout: float) -> None:
    """After the last try failed: `job.failed(exc)`, `on_failure` hooks, `after_run` hooks."""
    await call_failed(job, exc, timeout)
    if hooks.any_run_hooks:
        await hooks.failing(job, exc)
        await hooks.finished(job, Status.FAILED, exc)


async def on_cancelled(job: Job, exc: BaseException) -> None:
    """After a running try was cancelled on request (`failed()` is not called)."""
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.CANCELLED, exc)


# -- outcomes: what the acknowledgement writes ------------------------------------------

#: As payloads are written: datetimes and dataclasses are refused rather than guessed at.
_RESULT_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
#: Outcomes of jobs that returned None, per keep time: shared, nothing to encode.
_NO_RESULT: dict[float, Outcome] = {}


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def succeeded_outcome(job: Job, result: Any, keep: float, max_bytes: int) -> Outcome:
    """The record of a try that succeeded, with `result` as JSON when it can be kept.

    A result that is not JSON, or larger than `max_bytes`, is not kept: the job still
    succeeded (its work is done), the record says why there is no result, and a warning is
    logged.
    """
    if result is None:
        outcome = _NO_RESULT.get(keep)
        if outcome is None:
            outcome = Outcome(Status.SUCCEEDED, keep)
            if len(_NO_RESULT) < 64:
                _NO_RESULT[keep] = outcome
        return outcome
    if keep <= 0:
        return Outcome(Status.SUCCEEDED, keep)  # nothing is kept: no need to encode it
    try:
        raw = orjson.dumps(result, default=_refuse, option=_RESULT_OPTIONS)
    except TypeError as exc:
        note = f"result of type {type(result).__name__} is not JSON ({exc}); not kept"
    else:
        if len(raw) <= max_bytes:
            return Outcome(Status.SUCCEEDED, keep, raw)
        note = (
            f"result of {len(raw)} bytes is over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); not kept"
        )
    logger.warning("job %s %s: %s", job.job_id, type(job).__qualname__, note)
    return Outcome(Status.SUCCEEDED, keep, None, note)


def failed_outcome(exc: BaseException, keep: float) -> Outcome:
    """The record of a job that failed for good."""
    return Outcome(
        Status.FAILED, keep, None, describe(exc), "".join(traceback.format_exception(exc))
    )


def cancelled_outcome(keep: float, reason: str = "cancelled while running") -> Outcome:
    """The record of a running job cancelled on request."""
    return Outcome(Status.CANCELLED, keep, None, reason)


# -- events -------------------------------------------------------------------------------


def job_path(job: Job | None) -> str:
    """The job's class path, `module:QualName` ("" without a job)."""
    if job is None:
        return ""
    cls = type(job)
    return f"{cls.__module__}:{cls.__qualname__}"


def first_wait(attempts: int, since: float | None, now: float | None = None) -> float | None:
    """Seconds from when a job began to wait (`Decoded.since`: its dispatch, or the time it
    fell due) to `now` (default: the current time), for a first try only; `None` for a later
    try or when the start of the wait is not known. Never negative (clocks of two hosts)."""
    if attempts != 1 or since is None:
        return None
    waited = (time.time() if now is None else now) - since
    return waited if waited > 0 else 0.0


def emit(
    kind: EventKind,
    reserved: ReservedJob,
    connection: str,
    job: Job | None = None,
    *,
    worker: str = "",
    started: float | None = None,
    error: str = "",
    waited: float | None = None,
) -> None:
    """Announce a change of one job's state (callers check `events.active` first: cheap).

    `waited` is for `started` of a first try (`first_wait`)."""
    duration = None if started is None else time.perf_counter() - started
    events.emit(
        JobEvent(
            kind,
            reserved.id,
            reserved.queue,
            connection,
            job=job_path(job),
            attempts=reserved.attempts,
            duration=duration,
            error=error,
            worker=worker,
            waited=waited,
        )
    )
