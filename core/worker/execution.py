"""Running one try of a job: the timeout, the thread for sync handlers, and `failed()`."""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from datetime import UTC, datetime
from typing import Any

from core.errors import JobTimeoutError
from core.job import Job
from core.queue.drivers.base import FailedJob, ReservedJob

__all__ = ["call_failed", "call_handle", "describe", "failed_record"]

logger = logging.getLogger("topiq.worker")

#: Whether each job class's `handle` is a coroutine function (asked once per class).
_ASYNC_HANDLE: dict[type[Job], bool] = {}


async def call_handle(job: Job, timeout: float) -> Any:
    """Run `job.handle()`, cancelled after `timeout` seconds (then `JobTimeoutError`).

    A plain `def handle` runs in a thread so it cannot stall the event loop; a thread cannot be
    cancelled, so past the timeout it is abandoned and the try counts as timed out.
    """
    handle = job.handle
    cls = type(job)
    is_async = _ASYNC_HANDLE.get(cls)
    if is_async is None:
        is_async = _ASYNC_HANDLE[cls] = inspect.iscoroutinefunction(handle)
    if timeout <= 0:
        return await (handle() if is_async else asyncio.to_thread(handle))
    # A bare timer and a flag: what asyncio.timeout() does, at a third of its cost per job.
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        result = await (handle() if is_async else asyncio.to_thread(handle))
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise JobTimeoutError(
                f"{cls.__qualname__} timed out after {timeout:g}s (try {job.attempts})"
            ) from None
        raise
    finally:
        timer.cancel()
    if expired:  # the job swallowed our cancellation and returned: withdraw the request
        task.uncancel()
    return result


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
