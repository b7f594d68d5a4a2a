"""The `Job` base class: what a background task looks like to the people who write one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Literal

__all__ = ["Job", "JobFunction", "JobMiddleware", "job"]

#: A job middleware: `async def mw(job, call_next) -> result`, where `await call_next()` runs
#: the rest of the chain (the next middleware, then `handle()`) and returns its result.
JobMiddleware = Callable[["Job", Callable[[], Awaitable[Any]]], Awaitable[Any]]

logger = logging.getLogger("topiq.job")

#: The settings a job chooses (on its class, or on the instance before dispatch): they travel
#: in the payload's own fields, never in its data.
JOB_SETTINGS = (
    "queue",
    "max_tries",
    "timeout",
    "retry_after",
    "connection",
    "unique_key",
    "unique_for",
    "on_duplicate",
    "at_front",
    "ttl",
    "result_ttl",
    "failure_ttl",
    "priority",
    "rate_limit",
    "burst",
    "concurrency_limit",
    "limit_key",
    "group",
    "max_queue_length",
    "overflow",
    "status_topic",
)


class Job:
    """A unit of background work, dispatched with `await dispatch(job)`.

    Subclasses implement `async def handle(self)` (a plain `def handle` runs in a thread so it
    cannot block the event loop); its return value is the job's result. They may implement
    `async def succeeded(self, result)` and `async def failed(self, exception)`, called once
    when the job succeeds or fails for good, and `middleware()`, the callables that wrap each
    try (see `JobMiddleware`).

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
        job_id: The job's id: chosen at dispatch unless set before it; the same on every try.
        attempts: Which try this is, 1 on the first run.
        unique_key: At most one waiting job per key on its queue (`""`: no key).
        unique_for: Seconds the key stays taken after dispatch (0: until the job starts).
        on_duplicate: What a dispatch meeting a waiting or running job with the same
            `job_id` or `unique_key` does: "reject" (raise `DuplicateJobError`), "keep"
            (return the existing job's handle), "replace" (the waiting job takes this job's
            data and keeps its id).
        at_front: Put the job at the head of its queue.
        ttl: Seconds after becoming due by which the job must start, or it expires (0: never).
        result_ttl: Seconds the record and result are kept after success (`None`: the
            `QUEUE_RESULT_TTL` setting; 0: nothing is kept).
        failure_ttl: Seconds the record is kept after failure, cancel or expiry (`None`: the
            `QUEUE_FAILURE_TTL` setting). The failed-job store keeps failures until pruned.
        aliases: Old class paths (`"app.jobs.old_module:OldName"`) whose waiting payloads this
            class runs, so that renaming a job class strands nothing.
        priority: Higher runs first within its queue (an int; 0 by default); equal
            priorities run in the order they became ready.
        rate_limit: At most this many starts per period, e.g. "100/minute", "5/second",
            "10/30s" (`None`: no rate limit); spaced evenly unless `burst` says otherwise.
        burst: How many starts the rate limit admits at once (1: none closer than the
            rate's interval).
        concurrency_limit: At most this many jobs of the limit key running at once (`None`
            or 0: no cap).
        limit_key: Which jobs share a limit: a template formatted with the job's data
            (`"api:{customer_id}"`); `""`: every limited job of the queue without a key.
        group: Jobs of one group and queue run one at a time, in dispatch order: a template
            formatted with the job's data (`"{device_id}"`); `""`: no group (or the route's,
            when dispatched from an MQTT handler whose route has `group=`).
        max_queue_length: The most jobs the queue may hold waiting when this job is pushed
            (0: the queue's `QUEUE_MAX_LENGTHS` entry, if any).
        overflow: What a push into a full queue does: "reject" (raise `QueueFullError`) or
            "drop_oldest" (store it, cancel the oldest waiting job); `None`: the policy of
            the queue's `QUEUE_MAX_LENGTHS` entry ("reject" without one).
        status_topic: An MQTT topic the job's outcome is published to when it ends, a
            template formatted with the job's data (`"devices/{device_id}/status"`; no `+`
            or `#`); `""`: none (or the route's `status_topic=`).
        steps: A multi-step job: the steps run in order instead of `handle()`, each a method
            name of the class or a function (or dotted path, in an allowed module) called
            with the job. They share `self.workspace` (a dict, JSON), saved after each step:
            a retry, or a worker's crash, resumes at the step that did not finish. The
            job's result is the workspace.
        creation_hook: `hook(job)` in the dispatching process, once the job is stored.
        pre_task_hook: `hook(job)` before each step (or `handle()`); if it raises, the step
            does not run and the try fails with that exception.
        post_task_hook: `hook(job)` after each step (or `handle()`), however it ended:
            after `failed()` and `failure_hook` when the job failed; what it raises is
            logged and changes nothing.
        failure_hook: `hook(job, exception)` once the job has failed for good, after
            `failed()`.
        (Each hook may be a function, a method of the class, or a dotted path
        `"module.function"` in an allowed module; plain or coroutine functions.)

    Durations (`timeout`, `retry_after`, `ttl`, `unique_for`, `result_ttl`, `failure_ttl`)
    may be numbers of seconds or strings such as "90s", "10 minutes", "1h"; every setting is
    checked at dispatch, with an error naming it.
    """

    queue: str = "default"
    max_tries: int = 3
    timeout: float | str = 60
    retry_after: float | str | Sequence[float | str] = 0
    connection: str | None = None

    job_id: str = ""
    attempts: int = 0

    unique_key: str = ""
    unique_for: float | str = 0
    on_duplicate: Literal["reject", "keep", "replace"] = "reject"
    at_front: bool = False
    ttl: float | str = 0
    result_ttl: float | str | None = None
    failure_ttl: float | str | None = None
    aliases: ClassVar[Sequence[str]] = ()
    priority: int = 0
    rate_limit: str | None = None
    burst: int = 1
    concurrency_limit: int | None = None
    limit_key: str = ""
    group: str = ""
    max_queue_length: int = 0
    overflow: Literal["reject", "drop_oldest"] | None = None
    status_topic: str = ""

    # Multi-step jobs and per-class hooks (django-db-queue's semantics; docs/queue.md "Steps and
    # hooks"). Class-level only: a payload can never set them.
    steps: ClassVar[Sequence[str | Callable[..., Any]]] = ()
    creation_hook: ClassVar[str | Callable[..., Any] | None] = None
    pre_task_hook: ClassVar[str | Callable[..., Any] | None] = None
    post_task_hook: ClassVar[str | Callable[..., Any] | None] = None
    failure_hook: ClassVar[str | Callable[..., Any] | None] = None

    # Names that configure the job rather than carry its data.
    _settings_names: ClassVar[frozenset[str]] = frozenset((*JOB_SETTINGS, "job_id", "attempts"))

    def __init__(self) -> None:
        """Jobs need no constructor arguments, but subclasses may take any."""

    async def handle(self) -> Any:
        """Do the work. Raise to fail this try; raise `Retry(delay)` to ask for another."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    async def succeeded(self, result: Any) -> None:
        """Called once when a try succeeded, with `handle()`'s return value. Override to react."""

    async def failed(self, exception: BaseException) -> None:
        """Called exactly once when the job has failed for good. Override to react."""

    def middleware(self) -> Sequence[JobMiddleware]:
        """The callables that wrap each try, outermost first. Override to add some."""
        return ()

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before the try after try number `attempts`."""
        from core.delays import parse_duration

        delays = self.retry_after
        if isinstance(delays, int | float | str):
            return parse_duration(delays, "retry_after")
        if not delays:
            return 0.0
        return parse_duration(delays[min(attempts, len(delays)) - 1], "retry_after")

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
        from core.runtime import get_publisher

        await get_publisher()(topic, payload, qos=qos, retain=retain)

    async def request(
        self, topic: str, payload: Any, *, timeout: float = 10.0, qos: int = 1
    ) -> Any:
        """Send a command to a device over MQTT 5 and return its reply.

        `payload` is encoded like `publish`'s. The message carries a Response Topic private
        to this worker process and Correlation Data new for each call (so for each try); the
        reply is returned parsed like a route's payload (JSON -> object, else bytes).

        Raises:
            RequestTimeoutError: no reply within `timeout` seconds: the try fails, and
                `max_tries`/`retry_after` decide whether the command is sent again.
            ConfigurationError: the broker speaks only MQTT 3.1.1 (no response topics).
        """
        from core.runtime import get_requester

        return await get_requester()(topic, payload, timeout=timeout, qos=qos)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} id={self.job_id or '-'} attempts={self.attempts}>"


# `@job` for functions lives in core.functions (it builds Job subclasses); re-exported here so
# that `from core.job import job` works. core.functions needs nothing of this module at import.
from core.functions import JobFunction, job  # noqa: E402
