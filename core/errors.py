"""The exceptions Topiq raises, under one root.

TopiqError
├── ConfigurationError        a setting is missing or wrong (raised at start)
│   └── RouteError            an MQTT route pattern is invalid (core.mqtt.errors)
├── SerializationError        a job cannot be turned into a payload (raised at dispatch)
│   ├── PayloadTooLargeError  the payload is over the configured limit
│   └── UnloadableJobError    no worker could import the job's class (`__main__`, not allowed)
├── PayloadError              a stored payload cannot be turned back into a job
│   └── UnknownJobError       the payload names a class that is not an allowed Job
├── DriverError               a queue backend failed (the cause is chained)
│   └── ConnectionLostError   the backend cannot be reached right now
│       ├── SpoolFullError    ... and the MQTT app's offline spool is full too
│       └── NotReplicatedError  a push is stored but fewer replicas than REDIS_WAIT_REPLICAS have it
├── QueueFullError            a dispatch met a queue at its `max_length` (overflow "reject")
├── JobTimeoutError           a job ran past its timeout (also a built-in TimeoutError)
├── DuplicateJobError         a dispatch met a waiting or running job with its id or unique key
├── JobNotFoundError          no job (or no kept record) has this id
├── JobFailedError            `result()` of a job that failed (its error text and traceback)
│   ├── JobCancelledError     ... that was cancelled
│   └── JobExpiredError       ... that expired before it started (`ttl`)
├── WorkerLostError           a job's lease expired on its last try: its worker died
├── RequestTimeoutError       `Job.request` got no reply in time (also a built-in TimeoutError)
└── MqttError                 the MQTT side (core.mqtt.errors)
    ├── BrokerStartError      the embedded broker cannot start (its port is taken)
    ├── PublishError          a publish did not reach the broker
    └── MessageRejected       a message a route refused
        ├── InvalidPayloadError   the payload failed validation
        └── RateLimitedError      the sender is over its rate limit

Control flow that is not an error: `Retry` (a job asks for another try).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.queue.handle import JobHandle

__all__ = [
    "ConfigurationError",
    "ConnectionLostError",
    "DriverError",
    "DuplicateJobError",
    "JobCancelledError",
    "JobExpiredError",
    "JobFailedError",
    "JobNotFoundError",
    "JobTimeoutError",
    "NotReplicatedError",
    "PayloadError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RequestTimeoutError",
    "Retry",
    "SerializationError",
    "ServerMismatchError",
    "SpoolFullError",
    "TopiqError",
    "UnknownJobError",
    "UnloadableJobError",
    "WorkerLostError",
]


class TopiqError(Exception):
    """The root of every error Topiq raises."""


class ConfigurationError(TopiqError):
    """A setting is missing or has a value that cannot be used."""


class ServerMismatchError(ConfigurationError):
    """A setting that the server's answer shows to be wrong (REDIS_CLUSTER_NODES at a Redis that
    is not a cluster node, a sentinel master the sentinels do not know, a password they refuse,
    TLS to a plaintext server): no retry fixes it. A worker stops (exit 2); `health` reports
    the backend unhealthy (exit 1) with the reason."""


class SerializationError(TopiqError, TypeError):
    """A job holds a value that JSON cannot carry; nothing was enqueued."""


class PayloadTooLargeError(SerializationError):
    """The encoded payload is larger than the configured maximum; nothing was enqueued."""


class UnloadableJobError(SerializationError):
    """The job's class is where no worker can import it (`__main__`, a function, a module outside
    `QUEUE_ALLOWED_MODULES`); nothing was enqueued."""


class PayloadError(TopiqError):
    """A stored payload cannot be decoded back into a job."""


class UnknownJobError(PayloadError):
    """A payload names a class that does not exist or is not an allowed `Job`."""


class DriverError(TopiqError):
    """A queue backend operation failed."""


class ConnectionLostError(DriverError):
    """The queue backend cannot be reached; the operation may be retried."""


class SpoolFullError(ConnectionLostError):
    """The queue backend cannot be reached and the offline spool holds its maximum: the MQTT
    app leaves the message unacknowledged, so the broker keeps it."""


class NotReplicatedError(ConnectionLostError):
    """A push is stored on the Redis primary, but fewer replicas than `REDIS_WAIT_REPLICAS`
    acknowledged it within `REDIS_WAIT_TIMEOUT`: if the primary fails before a replica has it,
    the jobs are lost. `job_ids` are the jobs of the push; look them up (`job_status`) once the
    server answers again and dispatch again only those it does not know."""

    def __init__(self, message: str, *, job_ids: Sequence[str] = (), acknowledged: int = 0):
        super().__init__(message)
        self.job_ids: list[str] = list(job_ids)
        self.acknowledged = acknowledged


class QueueFullError(TopiqError):
    """The queue holds its `max_length` of waiting jobs and its overflow policy is "reject":
    nothing was queued (of a call storing several jobs, `handles` are those it stored)."""

    def __init__(
        self,
        message: str,
        *,
        queue: str = "",
        max_length: int = 0,
        handles: Sequence[JobHandle] = (),
    ) -> None:
        super().__init__(message)
        self.queue = queue
        self.max_length = max_length
        self.handles: list[JobHandle] = list(handles)


class RequestTimeoutError(TopiqError, TimeoutError):
    """`Job.request` got no reply in time: the try fails, and `max_tries`/`retry_after`
    decide whether the command is sent again."""


class JobTimeoutError(TopiqError, TimeoutError):
    """A job ran longer than its `timeout` and was cancelled."""


class DuplicateJobError(TopiqError):
    """A dispatch met a waiting or running job with the same `job_id` or `unique_key`, and the
    job's `on_duplicate` is `"reject"`; nothing was enqueued.

    `existing` is the id of the job that holds the id or key. Of a call storing several jobs
    (`bulk`, `enqueue_many`, `push(a, b)`), the others are stored: `handles` are theirs.
    """

    def __init__(
        self, message: str, existing: str = "", *, handles: Sequence[JobHandle] = ()
    ) -> None:
        super().__init__(message)
        self.existing = existing
        self.handles: list[JobHandle] = list(handles)


class JobNotFoundError(TopiqError, LookupError):
    """No job has this id on the connection, or its record is no longer kept."""


class JobFailedError(TopiqError):
    """The job failed for good; `error` is its exception line and `traceback` its text."""

    def __init__(self, message: str, *, job_id: str = "", error: str = "", traceback: str = ""):
        super().__init__(message)
        self.job_id = job_id
        self.error = error
        self.traceback = traceback

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.traceback}" if self.traceback else text


class JobCancelledError(JobFailedError):
    """The job was cancelled before it finished."""


class JobExpiredError(JobFailedError):
    """The job was not started within its `ttl` and will not run."""


class WorkerLostError(TopiqError):
    """A job's lease expired on its last allowed try: the worker running it died or hung."""


class Retry(Exception):
    """Raise from `handle()` to ask for another try after `delay` seconds.

    The attempt still counts towards `max_tries`, but it is not reported as a failure.
    """

    def __init__(self, delay: float | None = None) -> None:
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay
