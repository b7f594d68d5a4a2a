"""The lifecycle event stream: one place where every job's changes of state are announced.

The manager emits `dispatched`; whoever runs a try (the worker, the `sync` connection) emits
`started`, then one of `succeeded`, `retrying`, `failed`, `cancelled`, `returned` (handed back
unfinished by a stopping worker). A worker emits `expired` for a job its backend
found past its `ttl` inside a reservation (ended there, never run). The
dashboard, the metrics and MQTT status messages subscribe here rather than each hooking the
worker:

    from core.events import events

    unsubscribe = events.subscribe(lambda event: print(event.kind, event.job_id))

Listeners run in the emitting process, on its event loop, in the order they subscribed. A
listener may be a plain function or a coroutine function (its coroutine runs as a task); an
exception in a listener is logged and never reaches the job.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventKind", "EventStream", "JobEvent", "events"]

logger = logging.getLogger("topiq.events")


class EventKind(enum.StrEnum):
    DISPATCHED = "dispatched"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    RETURNED = "returned"


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something that happened to one job."""

    kind: EventKind
    job_id: str
    queue: str
    connection: str
    job: str = ""  # the class path, `module:QualName`
    attempts: int = 0  # the try it is about (0 before the first)
    at: float = field(default_factory=time.time)  # epoch seconds
    duration: float | None = None  # seconds the try ran, for the ends of a try
    error: str = ""  # the one-line reason, for `retrying`, `failed`, `cancelled`
    worker: str = ""
    #: For `started` of a first try: seconds from dispatch (or from when a delayed job became
    #: due) to this start; `None` otherwise or when unknown.
    waited: float | None = None


Listener = Callable[[JobEvent], Any]


class EventStream:
    """Fan-out of `JobEvent`s to subscribed listeners, in process."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every event from now on; returns the function that stops it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    @property
    def active(self) -> bool:
        """Whether anyone listens (emitters may skip building events when no one does)."""
        return bool(self._listeners)

    def emit(self, event: JobEvent) -> None:
        """Hand `event` to every listener; never raises."""
        for listener in tuple(self._listeners):
            try:
                outcome = listener(event)
                if inspect.isawaitable(outcome):
                    task = asyncio.ensure_future(outcome)
                    self._tasks.add(task)
                    task.add_done_callback(self._settled)
            except Exception:
                logger.exception("event listener %r failed on %s", listener, event.kind)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("event listener failed: %r", task.exception())


#: The process's event stream.
events = EventStream()
