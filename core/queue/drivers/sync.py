"""The `sync` connection: `dispatch` runs the job at once, in the caller. For tests and debugging.

Each job runs every try it is allowed straight away (delays and `retry_after` are skipped);
if the last try fails, `failed()` is called, the failure is recorded in memory, and the
exception propagates to the caller of `dispatch` so that a test sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from core.errors import Retry
from core.queue.drivers.base import OutgoingJob, ReservedJob
from core.queue.drivers.memory import MemoryDriver
from core.queue.payload import JobLoader
from core.settings import Settings
from core.worker.execution import call_failed, call_handle, failed_record

if TYPE_CHECKING:
    from core.queue.queue_manager import QueueManager

__all__ = ["SyncDriver"]


class SyncDriver(MemoryDriver):
    kind = "sync"

    def __init__(self, name: str, settings: Settings, manager: QueueManager | None = None) -> None:
        super().__init__(name, settings)
        self._manager = manager
        # Sync runs whatever the caller dispatches: the caller is trusted, so any module goes.
        self._loader = JobLoader([""])

    async def push(self, jobs: Sequence[OutgoingJob]) -> None:
        for outgoing in jobs:
            await self._run(outgoing)

    async def _run(self, outgoing: OutgoingJob) -> None:
        attempts = 0
        while True:
            attempts += 1
            decoded = self._loader.load(outgoing.payload, job_id=outgoing.id, attempts=attempts)
            job = decoded.job
            try:
                await call_handle(job, decoded.timeout)
                return
            except Exception as exc:
                if attempts < decoded.max_tries:
                    continue
                await call_failed(job, exc, decoded.timeout)
                reserved = ReservedJob(outgoing.id, outgoing.queue, outgoing.payload, attempts)
                await self.failed_store().add(failed_record(self.name, reserved, exc))
                if isinstance(exc, Retry):
                    raise RuntimeError(
                        f"{type(job).__qualname__} asked to retry on its last try"
                    ) from exc
                raise
