"""The `Job` base class: what a background task looks like to the people who write one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = ["Job"]

logger = logging.getLogger("topiq.job")


class Job:
    """A unit of background work, dispatched with `await dispatch(job)`.

    Subclasses implement `async def handle(self)` (a plain `def handle` runs in a thread so it
    cannot block the event loop) and may implement `async def failed(self, exception)`, called
    once when the job fails for good.

    Public instance attributes (names not starting with `_`) are the job's data: they are stored
    as JSON and restored on the worker without calling `__init__`, so a constructor may take
    arguments. A data attribute may not reuse a name the class defines (a method such as
    `handle` or `data`, a property, a class attribute): dispatch refuses it, naming it.

    The settings below are plain class attributes. Setting one on an instance before dispatch
    (`self.queue = "urgent"` in `__init__`, `job.timeout = 5`) overrides it for that job only:
    settings travel in the payload's own fields, not as data.

    Attributes:
        queue: The queue the job goes to.
        max_tries: How many times the job may run before it fails for good.
        timeout: Seconds one try may run before it is cancelled.
        retry_after: Seconds to wait before the next try; a list gives one delay per try,
            the last one repeated.
        connection: The queue connection to use; `None` means the configured default.
        job_id: Set at dispatch; the same on every try.
        attempts: Which try this is, 1 on the first run.
    """

    queue: str = "default"
    max_tries: int = 3
    timeout: float = 60
    retry_after: float | Sequence[float] = 0
    connection: str | None = None

    job_id: str = ""
    attempts: int = 0

    # Names that configure the job rather than carry its data.
    _settings_names: ClassVar[frozenset[str]] = frozenset(
        {"queue", "max_tries", "timeout", "retry_after", "connection", "job_id", "attempts"}
    )

    def __init__(self) -> None:
        """Jobs need no constructor arguments, but subclasses may take any."""

    async def handle(self) -> Any:
        """Do the work. Raise to fail this try; raise `Retry(delay)` to ask for another."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    async def failed(self, exception: BaseException) -> None:
        """Called exactly once when the job has failed for good. Override to react."""

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before the try after try number `attempts`."""
        delays = self.retry_after
        if isinstance(delays, int | float):
            return float(delays)
        if not delays:
            return 0.0
        return float(delays[min(attempts, len(delays)) - 1])

    def data(self) -> dict[str, Any]:
        """The job's payload data: its public instance attributes."""
        skip = self._settings_names
        return {k: v for k, v in self.__dict__.items() if k[0] != "_" and k not in skip}

    async def publish(
        self, topic: str, payload: Any, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish to MQTT from a job, over one connection per worker process.

        `payload` may be bytes, a string, or anything JSON can carry (sent as JSON).
        """
        from core.mqtt.publisher import publish

        await publish(topic, payload, qos=qos, retain=retain)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} id={self.job_id or '-'} attempts={self.attempts}>"
