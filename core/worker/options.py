"""The worker's options and the reasons it stops."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ExitCode", "StopReason", "WorkerOptions"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker runs; the `--queue-work` flags map one to one onto these fields."""

    connection: str | None = None  # None: QUEUE_CONNECTION
    queues: tuple[str, ...] = ("default",)  # taken from in this order
    concurrency: int = 1  # jobs run at once
    prefetch: int | None = None  # jobs reserved ahead of a free slot; None: concurrency // 4
    max_jobs: int | None = None  # stop after this many jobs
    max_time: float | None = None  # stop after this many seconds
    sleep: float = 0.25  # longest idle wait before looking again (servers that notify wake sooner)
    max_tries: int | None = None  # overrides every job's max_tries
    timeout: float | None = None  # overrides every job's timeout
    grace: float = 30.0  # seconds running jobs get to finish after a stop signal
    stop_when_empty: bool = False  # stop once no job is ready
    handle_signals: bool = True  # SIGTERM/SIGINT stop it (off when the host program owns them)
    with_scheduler: bool = False  # also enqueue the ticks of the app's schedules (core.schedule)

    def __post_init__(self) -> None:
        checks = [
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.prefetch is None or self.prefetch >= 0, "--prefetch must not be negative"),
            (self.max_jobs is None or self.max_jobs >= 1, "--max-jobs must be at least 1"),
            (self.max_time is None or self.max_time > 0, "--max-time must be positive"),
            (self.sleep >= 0, "--sleep must not be negative"),
            (self.max_tries is None or self.max_tries >= 1, "--max-tries must be at least 1"),
            (self.timeout is None or self.timeout > 0, "--timeout must be positive"),
            (self.grace >= 0, "--grace must not be negative"),
            (bool(self.queues), "--queue needs at least one queue name"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class StopReason(enum.Enum):
    """Why a worker stopped; each is a clean stop (exit code 0) except `STUCK`."""

    SIGNAL = "signal"  # SIGTERM or SIGINT
    MAX_JOBS = "max-jobs"
    MAX_TIME = "max-time"
    EMPTY = "empty"  # --stop-when-empty and nothing left
    RESTART = "restart"  # `queue:restart` asked every worker to exit
    # A job would not stop (it swallowed its cancellation, or a sync `handle` outlived its
    # timeout in a thread that cannot be killed): it was given up and the worker exits so that
    # supervisord starts a fresh one (exit code `ExitCode.STUCK`).
    STUCK = "stuck"


class ExitCode(enum.IntEnum):
    """Process exit codes of `python main.py` and its commands."""

    OK = 0  # finished, or a worker stopped for a StopReason
    ERROR = 1  # a command failed (connection down, id not found, …)
    USAGE = 2  # bad flags or settings
    WATCHDOG = 3  # a job blocked the event loop past its timeout; its lease returns the job
    STUCK = 4  # a job would not stop after its timeout: its try failed, the worker exited
