"""The `sync` connection: `dispatch` runs the job at once, in the caller. For tests and debugging.

Each job runs every try it is allowed straight away (delays and `retry_after` are skipped),
through the same code as on a worker (`core.execution`: hooks, middleware, `succeeded()`,
`failed()`, events). Jobs are stored the way the memory connection stores them, so ids,
`unique_key`, status records and results work as elsewhere: `handle.status()` and
`handle.result()` read what the run left. If the last try fails, `failed()` is called, the
failure is recorded in memory, and the exception propagates to the caller of `dispatch` so that
a test sees it.

Workflows and dependencies follow the memory connection's rules, with every job run as soon as
it is ready: a chain runs member by member, stopping at the first failure (the rest end
`cancelled`), then its `catch` and `finally_`; a batch runs every member (each one has ended
before the next is stored, so a failure cancels nothing), then its callbacks. A failing member
of a workflow does not raise: the workflow handle's `result()` reports it. A job whose
dependencies ran already runs or is cancelled as their records say. Rate and concurrency limits
do not apply (jobs run one at a time, inline).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from core.errors import Retry
from core.events import EventKind, events
from core.execution import (
    Site,
    describe,
    emit,
    failed_outcome,
    failed_record,
    first_wait,
    job_path,
    on_failed,
    on_retried,
    on_retrying,
    on_succeeded,
    run_try,
    succeeded_outcome,
    wants_success_calls,
)
from core.log import job_fields
from core.queue.drivers.base import OutgoingJob, Pushed, ReservedJob
from core.queue.drivers.memory import MemoryDriver
from core.queue.payload import JobLoader
from core.settings import Settings

if TYPE_CHECKING:
    from core.job import Job
    from core.queue.queue_manager import QueueManager

__all__ = ["SyncDriver"]

#: The lease of a job running inline: nothing else reserves from a sync connection's queues
#: but jobs dispatched from inside a running job, which must never be handed the running one.
_LEASE = 366 * 86400.0
#: The `worker` named in the status records of jobs run inline.
WORKER = "sync"


class SyncDriver(MemoryDriver):
    kind = "sync"

    def __init__(self, name: str, settings: Settings, manager: QueueManager | None = None) -> None:
        super().__init__(name, settings)
        self._manager = manager
        # Sync runs whatever the caller dispatches: the caller is trusted, so any module goes.
        self._loader = JobLoader([""])
        #: The queues jobs were stored on, in order: where released jobs are looked for.
        self._seen: dict[str, None] = {}
        #: What a try needs beyond handle(): step checkpoints, RQ callbacks (core.execution).
        self._site = Site(name, ("",), settings.queue_max_payload_bytes, self.save_payload)

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        """Store each job (ready now: delays and limits are skipped) and run what became ready
        (it, and the jobs its end released) before the next one.

        Every job of the call is stored and run, even after one has failed for good: then the
        first failure is raised once they all have (the others' records say how each ended;
        a note on the exception names every job of the call that failed)."""
        workflow = any(outgoing.kind != "job" for outgoing in jobs)
        out: list[Pushed] = []
        failures: list[tuple[str, Exception]] = []
        for outgoing in jobs:
            ready = outgoing
            if outgoing.delay or outgoing.limit is not None:
                ready = replace(outgoing, delay=0.0, limit=None)
            [pushed] = await super().push([ready])
            out.append(pushed)
            self._seen.setdefault(ready.queue)
            if pushed.outcome in ("created", "replaced"):
                await self._run(failures if not workflow else None)
        if failures:
            first = failures[0][1]
            if len(jobs) > 1:
                failed = ", ".join(job_id for job_id, _ in failures)
                first.add_note(
                    f"sync connection: {len(failures)} of the {len(jobs)} jobs stored by this "
                    f"call failed ({failed}); every one of them was stored and run"
                )
            raise first
        return out

    async def _run(self, failures: list[tuple[str, Exception]] | None) -> None:
        """Run every ready job to its end (retries at once), until none is ready: the job just
        stored, and the jobs released by its end. A job that fails for good is added to
        `failures` as (id, exception) and the others still run; `None`: a workflow, whose
        records tell."""
        while True:
            held = await self.reserve(list(self._seen), 1, _LEASE, worker=WORKER)
            # Jobs it expired come back too (`ReservedJob.expired`): already ended, never run.
            held = [job for job in held if not job.expired]
            if not held:
                return  # nothing (more) is ready: the job expired, is deferred, or ran
            reserved = held[0]
            try:
                with job_fields(
                    job_id=reserved.id,
                    queue=reserved.queue,
                    attempt=reserved.attempts,
                    worker=WORKER,
                ) as fields:
                    await self._try(reserved, fields)
            except Exception as exc:
                if failures is not None:
                    failures.append((reserved.id, exc))

    async def _try(self, reserved: ReservedJob, fields: dict[str, Any]) -> bool:
        """One try; whether the job has ended (False: it goes round again at once)."""
        settings = self.settings
        try:
            decoded = self._loader.load(
                reserved.payload, job_id=reserved.id, attempts=reserved.attempts
            )
        except Exception as exc:
            await self._record_failure(reserved, exc, settings.queue_failure_ttl)
            raise
        job = decoded.job
        fields["job"] = job_path(job)
        result_ttl = decoded.result_ttl
        failure_ttl = decoded.failure_ttl
        started = time.perf_counter()
        if events.active:
            emit(
                EventKind.STARTED,
                reserved,
                self.name,
                job,
                worker=WORKER,
                waited=first_wait(reserved.attempts, decoded.since),
            )
        try:
            result = await run_try(job, decoded.timeout, site=self._site, reserved=reserved)
        except Exception as exc:
            reason = describe(exc)
            if reserved.attempts < decoded.max_tries:
                await on_retrying(job, exc)
                await self.release(reserved, error=reason)
                await on_retried(job, decoded.timeout)
                self._announce(EventKind.RETRYING, reserved, job, started, reason)
                return False
            await on_failed(job, exc, decoded.timeout, self._site, reserved)
            keep = settings.queue_failure_ttl if failure_ttl is None else failure_ttl
            await self._record_failure(reserved, exc, keep, job)
            self._announce(EventKind.FAILED, reserved, job, started, reason)
            if isinstance(exc, Retry):
                raise RuntimeError(
                    f"{type(job).__qualname__} asked to retry on its last try"
                ) from exc
            raise
        if wants_success_calls(job):
            await on_succeeded(job, result, decoded.timeout)
        keep = settings.queue_result_ttl if result_ttl is None else result_ttl
        reserved.outcome = succeeded_outcome(job, result, keep, settings.queue_max_payload_bytes)
        await self.ack([reserved])
        self._announce(EventKind.SUCCEEDED, reserved, job, started)
        return True

    def _announce(
        self,
        kind: EventKind,
        reserved: ReservedJob,
        job: Job,
        started: float | None = None,
        error: str = "",
    ) -> None:
        """Announce a change of the job's state, when anyone listens."""
        if events.active:
            emit(kind, reserved, self.name, job, worker=WORKER, started=started, error=error)

    async def _record_failure(
        self, reserved: ReservedJob, exc: BaseException, keep: float, job: Job | None = None
    ) -> None:
        await self.failed_store().add(failed_record(self.name, reserved, exc))
        reserved.outcome = failed_outcome(exc, keep, job)
        await self.ack([reserved])
