"""`JobHandle`: what `dispatch` returns, and what `queue.job(job_id)` rebuilds from an id.

    handle = await dispatch(Report(kind="daily"))
    str(handle)                       # the job id (a handle *is* that string)
    status = await handle.status()    # JobStatus: status, attempts, timestamps, worker, error
    value = await handle.result(timeout=30)
    await handle.cancel()

A handle holds no connection: each call goes through the manager that made it (or the default
one, for a handle rebuilt or unpickled elsewhere), so handles can be stored, compared with ids,
pickled and sent to other processes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Self

from core.errors import (
    JobCancelledError,
    JobExpiredError,
    JobFailedError,
    JobNotFoundError,
)
from core.status import JobStatus, Status

if TYPE_CHECKING:
    from core.queue.drivers import Driver
    from core.queue.queue_manager import QueueManager

__all__ = ["JobHandle"]

#: Longest single wait on the driver inside `result()`: a lost wake-up costs at most this.
_SLICE = 30.0
#: What `result()` raises for a job that did not succeed, and the verb its message uses.
_ENDINGS: dict[Status, tuple[type[JobFailedError], str]] = {
    Status.FAILED: (JobFailedError, "failed"),
    Status.CANCELLED: (JobCancelledError, "was cancelled"),
    Status.EXPIRED: (JobExpiredError, "expired before it started"),
}


class JobHandle(str):
    """A job's id (it compares, hashes and prints as the id) that can ask about the job.

    Attributes:
        id: The job id, as a plain `str`.
        queue: The job's queue, when known (`None`: the driver looks it up).
        connection: The queue connection's name (`""`: the default connection).
    """

    queue: str | None
    connection: str
    _manager: QueueManager | None

    def __new__(
        cls,
        job_id: str,
        queue: str | None = None,
        connection: str = "",
        manager: QueueManager | None = None,
    ) -> Self:
        handle = super().__new__(cls, job_id)
        handle.queue = queue
        handle.connection = connection
        handle._manager = manager
        return handle

    @property
    def id(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r}, queue={self.queue!r}, connection={self.connection!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The manager stays behind: the receiving process uses its own default manager.
        return (JobHandle, (self.id, self.queue, self.connection))

    # -- asking about the job ------------------------------------------------------------

    async def _driver(self) -> Driver:
        manager = self._manager
        if manager is None:
            from core.queue.queue_manager import queue

            manager = await queue._manager()
        return await manager.connection(self.connection or None)

    def _learn(self, record: JobStatus) -> None:
        if self.queue is None and record.queue:
            self.queue = record.queue  # later calls go straight to the job's queue

    def _not_found(self) -> JobNotFoundError:
        where = f" on connection {self.connection!r}" if self.connection else ""
        return JobNotFoundError(
            f"no job {self.id!r}{where}: the id is unknown, or its record is no longer kept "
            "(result_ttl / failure_ttl)"
        )

    async def status(self) -> JobStatus:
        """The job's record: status, attempts, timestamps, worker, error.

        Raises:
            JobNotFoundError: the connection has no record of this id.
        """
        record = await (await self._driver()).job_status(self.id, self.queue)
        if record is None:
            raise self._not_found()
        self._learn(record)
        return record

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return what its `handle()` returned (decoded JSON).

        `timeout` is in seconds (`None`: wait as long as it takes). The wait blocks on the
        server where the driver can (Redis), rather than polling.

        Raises:
            JobFailedError: it failed for good (`error` and `traceback` say why).
            JobCancelledError: it was cancelled.
            JobExpiredError: it was not started within its `ttl`.
            TimeoutError: it has not ended within `timeout`.
            JobNotFoundError: the connection has no record of this id.
        """
        driver = await self._driver()
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = _SLICE if deadline is None else max(0.0, deadline - time.monotonic())
            record = await driver.wait_ended(self.id, self.queue, min(left, _SLICE))
            if record is None:
                raise self._not_found()
            self._learn(record)
            if record.ended:
                return self._outcome(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id!r} has not ended within {timeout:g}s (it is {record.status})"
                )

    def _outcome(self, record: JobStatus) -> Any:
        if record.status == Status.SUCCEEDED:
            return record.value()
        what = f"{record.kind or 'job'} {self.id!r}" + (f" ({record.job})" if record.job else "")
        error_type, verb = _ENDINGS.get(record.status, (JobFailedError, str(record.status)))
        reason = f": {record.error}" if record.error and record.error not in verb else ""
        raise error_type(
            f"{what} {verb}{reason}", job_id=self.id, error=record.error, traceback=record.traceback
        )

    async def cancel(self) -> bool:
        """Cancel the job: a waiting one is removed, a running one is cancelled in its worker
        (within about a second). `False` if it has ended already or is unknown."""
        return await (await self._driver()).cancel(self.id, self.queue)
