"""Moved to `core.execution` (shared by the worker and the `sync` connection); kept so that
imports of the earlier path go on working."""

from core.execution import (
    JobAbandonedError,
    JobThreads,
    call_failed,
    call_handle,
    describe,
    failed_record,
)

__all__ = [
    "JobAbandonedError",
    "JobThreads",
    "call_failed",
    "call_handle",
    "describe",
    "failed_record",
]
