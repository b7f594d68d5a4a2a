"""Running one try of a job: the timeout, the thread for sync handlers, and `failed()`."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from core.errors import JobTimeoutError
from core.job import Job
from core.queue.drivers.base import FailedJob, ReservedJob

__all__ = [
    "JobAbandonedError",
    "JobThreads",
    "call_failed",
    "call_handle",
    "describe",
    "failed_record",
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
) -> Any:
    """Run `job.handle()`, cancelled after `timeout` seconds (then `JobTimeoutError`).

    A plain `def handle` runs in one of `threads` so it cannot stall the event loop. A thread
    cannot be stopped: if it is still running `stop_within` seconds past the timeout, this
    raises `JobAbandonedError` and the thread is left to itself. An async `handle` that
    swallows its cancellation and is still running `stop_within` seconds later cannot be
    stopped either: `on_stuck` is called (from the event loop) with the error to record, and
    this call keeps waiting for the job, whose result no longer matters. Without `threads`
    (the sync connection), sync handles use the loop's default executor.
    """
    cls = type(job)
    function = cls.handle
    is_async = _ASYNC_HANDLE.get(function)
    if is_async is None:
        is_async = _ASYNC_HANDLE[function] = inspect.iscoroutinefunction(function)
    handle = job.handle  # the method itself: the loader refuses data that would shadow it
    if not is_async:
        return await _call_in_thread(job, handle, timeout, threads, stop_within)
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
) -> Any:
    if threads is None:
        future = asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, handle
        )
    else:
        future = threads.start(handle)
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


async def call_failed(job: Job, exception: BaseException, timeout: float) -> None:
    """Call `job.failed(exception)`; what it raises is logged, never propagated."""
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            result = job.failed(exception)
            if inspect.isawaitable(result):
                await result
    except Exception:
        logger.exception("job %s %s: failed() raised", job.job_id, type(job).__qualname__)


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
