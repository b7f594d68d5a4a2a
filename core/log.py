"""Logging set up once at the edge, from the settings.

In JSON (`LOG_FORMAT=json`) every line logged while a job runs carries the job's fields
(`JOB_FIELDS`: `job_id`, `queue`, `job`, `attempt`, `worker`), the job's own log lines
included: the runner sets them around each try with `job_fields`, in a context variable that
the try's task, the tasks it starts, and the thread a sync `handle` runs in inherit (a
thread the job starts itself with `threading.Thread` or `run_in_executor` does not: context
variables do not cross into it; `asyncio.to_thread` copies them). A line may also pass any of
`LOG_FIELDS` as `extra` (the worker's end-of-try lines give `duration`, in seconds). The text
format is unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson

from core.settings import LogFormat, Settings

__all__ = ["JOB_FIELDS", "LOG_FIELDS", "configure_logging", "job_fields", "outside_job"]

#: The fields set for every line logged during a try.
JOB_FIELDS: tuple[str, ...] = ("job_id", "queue", "job", "attempt", "worker")
#: The fields a JSON line may carry besides its own (`extra` wins over the try's context).
LOG_FIELDS: tuple[str, ...] = (*JOB_FIELDS, "duration")

_JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "topiq_job_log_fields", default=None
)


@contextlib.contextmanager
def job_fields(
    *, job_id: str, queue: str, job: str = "", attempt: int = 0, worker: str = ""
) -> Iterator[dict[str, Any]]:
    """Tag every line logged inside the block (in this task, the tasks it starts, and
    `asyncio.to_thread` calls) with the job's fields, in JSON logs. Yields the fields: a value
    learnt inside the block (the class, once the payload is read) may be set in it."""
    fields: dict[str, Any] = {
        "job_id": job_id,
        "queue": queue,
        "job": job,
        "attempt": attempt,
        "worker": worker,
    }
    token = _JOB.set(fields)
    try:
        yield fields
    finally:
        _JOB.reset(token)


def outside_job() -> contextvars.Context:
    """A copy of the current context without a job's fields: for a task started during a try
    that serves more than that try (a batch of acknowledgements, a publisher), whose lines
    must not name the job that happened to start it."""
    context = contextvars.copy_context()
    context.run(_JOB.set, None)
    return context


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        context = _JOB.get()
        if context is not None:
            data.update(context)
        fields = record.__dict__
        for name in LOG_FIELDS:
            if name in fields:
                data[name] = fields[name]
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class _Stderr(logging.StreamHandler[Any]):
    """Writes to whatever `sys.stderr` is at the time of each record.

    A handler holding on to the stream it was built with breaks when that stream is replaced and
    closed (pytest's capture, a daemon redirecting its output).
    """

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(settings: Settings) -> None:
    """Send Topiq's logs to stderr at `LOG_LEVEL`, as text or JSON (`LOG_FORMAT`)."""
    handler = _Stderr()
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s[%(process)d] %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
