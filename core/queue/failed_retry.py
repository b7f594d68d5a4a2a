"""Putting failed records back on their queues: what `queue:retry` and the dashboard share.

A record is skipped while another retry's claim on it is recent (`CLAIM_LIFETIME`). Records
kept in their own connection's store go back in the driver's atomic `retry_failed`; records
kept on another backend (`QUEUE_FAILED_CONNECTION`) are claimed, pushed, then removed, so the
job is never in neither place and a second retry at the same moment skips them (and a push
whose id is still waiting or running, left by a retry killed between its push and its removal,
is not stored twice).

Records of the `memory` and `sync` connections kept in a shared store (`QUEUE_FAILED_CONNECTION`)
are skipped and stay where they are: those connections live inside one process, so pushing
them from a command or the dashboard would run the job there (`sync`) or into a queue no
worker can see (`memory`). Kept in their own connection's store, they are retried (the caller
is then the process that owns them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from core.queue.drivers.base import Driver, FailedJob, FailedStore, OutgoingJob, claimed_at

__all__ = ["CLAIM_LIFETIME", "PER_PROCESS", "every_record", "retry_records"]

logger = logging.getLogger("topiq.failed")

#: Connections that live inside one process: their failed records are never retried from
#: another one.
PER_PROCESS = frozenset({"memory", "sync"})

#: Seconds a retry's claim on a failed record keeps other retries away (it lasts a push).
CLAIM_LIFETIME = 60.0


async def retry_records(
    store: FailedStore,
    records: Sequence[FailedJob],
    driver_for: Callable[[str], Awaitable[Driver]],
) -> tuple[list[str], list[str]]:
    """Retry one batch of `records` read from `store`; returns the ids (retried, skipped:
    claimed by another retry, changed since they were read, or of a per-process connection).
    `driver_for(name)` gives the driver of a record's connection."""
    retried: list[str] = []
    skipped: list[str] = []
    by_connection: dict[str, list[FailedJob]] = {}
    now = time.time()
    for record in records:
        claimed = claimed_at(record.record_id)
        # abs(): a claim made on a host whose clock runs ahead is recent too.
        if claimed is not None and abs(now - claimed) < CLAIM_LIFETIME:
            skipped.append(record.id)  # another retry is moving it right now
        else:
            by_connection.setdefault(record.connection, []).append(record)
    for name, group in by_connection.items():
        driver = await driver_for(name)
        if name in PER_PROCESS and driver.failed_store() is not store:
            # Kept in a shared store, from a connection that lives inside another process.
            logger.warning(
                "%d failed job(s) of connection %r not retried: it lives inside one process; "
                "dispatch them again from that process",
                len(group),
                name,
            )
            skipped += [record.id for record in group]
            continue
        if driver.failed_store() is store:
            moved = set(await driver.retry_failed(group))
        else:
            moved = set(await _retry_across(store, driver, group))
        for record in group:
            (retried if record.id in moved else skipped).append(record.id)
    return retried, skipped


async def _retry_across(store: FailedStore, driver: Driver, records: list[FailedJob]) -> list[str]:
    """Retry records kept on another backend than their queue: claim, push, then remove.

    Claiming first gives each record a new record id that only this run knows, so a second
    retry at once skips it; deleting by that id last can never delete a newer failure of the
    job (its record has another id), and at no moment is the job in neither place.
    """
    claimed = [mine for record in records if (mine := await store.claim(record)) is not None]
    if claimed:
        # check_id + "keep": a copy pushed by an earlier retry that died before its removal,
        # still waiting or running, is not stored a second time.
        await driver.push(
            [
                OutgoingJob(r.id, r.queue, r.payload.encode(), check_id=True, on_duplicate="keep")
                for r in claimed
            ]
        )
        for record in claimed:
            await store.remove(record)
    return [record.id for record in claimed]


async def every_record(store: FailedStore, queue: str | None, page: int = 500) -> list[FailedJob]:
    """Every record of `store` (of one queue), newest first, read before anything changes: a
    retried job that fails again at once is then not retried again by the same retry (which
    would loop for as long as it keeps failing)."""
    records: dict[str, FailedJob] = {}
    offset = 0
    while True:
        found = await store.list(queue, limit=page, offset=offset)
        for record in found:
            records.setdefault(record.id, record)
        if len(found) < page:
            return list(records.values())
        offset += len(found)
