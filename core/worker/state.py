"""The worker's bookkeeping records: what its tries came to, and the jobs it holds."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

from core.job import Job
from core.queue.drivers.base import ReservedJob

__all__ = ["DEFAULT_MAX_TRIES", "DEFAULT_TIMEOUT", "Buffered", "Running", "WorkerCounts"]

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_TRIES = Job.max_tries


@dataclass(slots=True)
class WorkerCounts:
    """What a worker's finished tries came to."""

    done: int = 0  # succeeded
    retried: int = 0  # failed or asked for a retry, and will run again
    failed: int = 0  # failed for good (recorded in the failed-job store)
    returned: int = 0  # handed back unfinished because the worker was stopping
    lost: int = 0  # cancelled: its lease could not be renewed, another worker may have it
    given_up: int = 0  # would not stop after its timeout: try failed, the worker exits
    cancelled: int = 0  # cancelled on request while running (or waiting in the buffer)


@dataclass(slots=True)
class Buffered:
    """A job reserved ahead of a free slot, under a short lease the heartbeat renews."""

    reserved: ReservedJob
    lease: float  # seconds it was reserved for
    lease_until: float  # monotonic time its stored lease ends, as far as we know


@dataclass(slots=True)
class Running:
    reserved: ReservedJob
    deadline: float  # monotonic time its timeout ends
    label: str
    lease: float  # seconds of its lease as last asked for
    lease_until: float  # monotonic time its stored lease ends, as far as we know
    task: asyncio.Task[None] | None = None
    job: Job | None = None
    max_tries: int = DEFAULT_MAX_TRIES
    given_up: bool = False  # would not stop: whatever its task does from now on is ignored
    lost: bool = False  # its lease lapsed: cancelled, and no longer ours to ack or release
    result_ttl: float = 0.0  # seconds its record is kept after success
    failure_ttl: float = 0.0  # seconds its record is kept after failure or cancel
    cancelling: bool = False  # a cancel was asked for: its task is being cancelled
    settled: bool = False  # its try has ended (handle returned or raised): too late to cancel
    thread: asyncio.Future[Any] | None = None  # a sync handle's thread, once started
    started: float = 0.0  # perf_counter at the start of its try
    since: float | None = None  # when its wait for a first try began (`Decoded.since`)


def set_thread(run: Running, future: asyncio.Future[Any]) -> None:
    run.thread = future


def keep_time(value: Any, default: float) -> float:
    """A record keep time read from a raw payload, or `default` when it gives none usable."""
    usable = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if usable and math.isfinite(value) and value >= 0 else default


def job_timeout(job: Job) -> float:
    """The job's timeout as a number, for `failed()`'s own limit."""
    try:
        value = float(job.timeout or DEFAULT_TIMEOUT)
    except (TypeError, ValueError):
        return DEFAULT_TIMEOUT
    return value if math.isfinite(value) and value > 0 else DEFAULT_TIMEOUT
