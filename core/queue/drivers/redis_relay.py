"""The relay: cross-queue dependencies and workflows on Redis Cluster (issue #17).

Each queue lives in one Cluster slot, but a dependent, a dependency, a chain or batch record
and its members may be in different queues. On a single server (and with Sentinel) the Lua
scripts reach the other queue's keys inline, atomically: nothing here runs. On a cluster
(`RedisDriver.cluster`, Lua `CLUSTER`) a script touches its own queue only; what it would do
to another queue it appends as a message to its own outbox (`<tag>:outbox`, the same slot;
lua/lib.lua, "THE RELAY", has the formats), and its reply carries the messages it appended.
This module delivers them: lua/relay.lua applies them on the target queue's slot (and may
append messages of its own there, for the next queue along), then they are removed from the
outbox they came from (LREM of the exact message: each is unique).

Delivery is at least once and every message kind is idempotent (relay.lua). A caller that
dies between its script and the delivery leaves the messages in the outbox: any later script
of that queue (every reserve of every worker) reports an outbox whose oldest message is older
than 2 s (lib.lua `STALE`), and the caller that sees it reads the outbox and delivers it. A
fresher message is left to the caller that appended it (no double work in the usual case).
A delivery that fails (the connection lost, a failover) is logged and left for that sweep:
the call that produced the messages has done its work and does not fail for it.

Cost: nothing on a single server. On a cluster the plain path (no dependencies, no workflow)
costs no round trip (the scripts answer an empty message list and read one outbox key); a
call whose end reaches another queue costs 2 round trips per step along the way (relay.lua on
the targets, pipelined across them, then the removals from the sources): a dependent in
another queue released by an ack is 2; a member of a chain in another queue whose end reaches
the record (its queue), then the next member (a third queue) is 4.

A push on a cluster whose dependency is named in another queue asks that queue first (one
pipelined round trip, only for such pushes): an unknown dependency answers `missing`, nothing
stored, as on one server. The push then subscribes the job to the dependency through the
relay; should the dependency's record vanish between that check and the subscription (ended
with a keep of 0, or cleared), the dependent resolves as if the dependency was cancelled.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from core.queue.drivers.base import FailedJob, OutgoingJob

if TYPE_CHECKING:
    from core.queue.drivers.redis import RedisDriver

__all__ = ["Outboxes", "deliver", "missing_dependencies", "relayed", "retry_failed_cluster"]

log = logging.getLogger(__name__)

#: Messages sent to relay.lua per call.
_CHUNK = 200
#: Messages read from an outbox with a stale message, per sweep.
_SWEEP = 500
#: Rounds of one delivery before the rest is left to the sweep (a runaway cascade).
_MAX_ROUNDS = 1000


class Outboxes:
    """What a driver call's scripts appended to their outboxes, by the tag of each outbox,
    and the outboxes found holding a stale message (to sweep)."""

    __slots__ = ("sent", "sweep")

    def __init__(self) -> None:
        self.sent: dict[str, list[bytes]] = {}
        self.sweep: set[str] = set()

    def take(self, tag: str, reply: Any) -> Any:
        """A cluster script reply {reply, messages, stale} (lib.lua `reply`): its own reply;
        the messages and a stale outbox noted here."""
        inner, messages, stale = reply
        if messages:
            self.sent.setdefault(tag, []).extend(messages)
        if int(stale):
            self.sweep.add(tag)
        return inner

    def __bool__(self) -> bool:
        return bool(self.sent or self.sweep)


async def relayed(driver: RedisDriver, tag: str, reply: Any) -> Any:
    """A script's reply as on a single server; on a cluster, its messages delivered first."""
    if not driver.cluster:
        return reply
    box = Outboxes()
    inner = box.take(tag, reply)
    await deliver(driver, box)
    return inner


def _target(message: bytes) -> str:
    """The tag of the queue a message is for (its fourth field)."""
    parsed = orjson.loads(message)
    return str(parsed[2])


async def deliver(driver: RedisDriver, box: Outboxes) -> int:
    """Deliver the messages in `box`, and those their delivery appends in turn, until none is
    left; returns how many were delivered. Errors are logged: the messages stay in their
    outboxes, for a sweep."""
    if not box:
        return 0
    try:
        return await _deliver(driver, box)
    except (RedisError, OSError, ValueError) as exc:  # ValueError: a message not JSON
        log.warning(
            "relay: delivery of cross-queue messages interrupted (%s); they stay in their "
            "outboxes and a worker of their queue delivers them",
            exc,
        )
        return 0


async def _deliver(driver: RedisDriver, box: Outboxes) -> int:
    client = driver.client
    swept: set[str] = set()
    delivered = 0
    for _ in range(_MAX_ROUNDS):
        pending: dict[str, list[bytes]] = {tag: list(msgs) for tag, msgs in box.sent.items()}
        for tag in box.sweep - swept:
            swept.add(tag)
            raw: list[Any] = await client.lrange(f"{tag}:outbox", 0, _SWEEP - 1)
            pending.setdefault(tag, []).extend(raw)
        if not pending:
            return delivered
        by_target: dict[str, list[bytes]] = defaultdict(list)
        for source in pending:
            pending[source] = list(dict.fromkeys(pending[source]))
            for message in pending[source]:
                by_target[_target(message)].append(message)
        calls: list[tuple[str, list[str], list[Any]]] = []
        targets: list[str] = []
        for target, messages in by_target.items():
            for at in range(0, len(messages), _CHUNK):
                calls.append(("relay", [f"{target}:outbox"], [target, *messages[at : at + _CHUNK]]))
                targets.append(target)
        replies = await driver._scripts_run(calls)
        box = Outboxes()
        for target, reply in zip(targets, replies, strict=True):
            box.take(target, reply)
        # Applied: out of the outboxes they came from (a second delivery would change nothing).
        async with client.pipeline(transaction=False) as pipe:
            for source, messages in pending.items():
                for message in messages:
                    pipe.lrem(f"{source}:outbox", 1, message)  # type: ignore[arg-type]
            await pipe.execute()
        delivered += sum(len(messages) for messages in pending.values())
    log.warning("relay: cascade still going after %d rounds; the sweep goes on", _MAX_ROUNDS)
    return delivered


async def missing_dependencies(
    driver: RedisDriver, jobs: Sequence[OutgoingJob], places: dict[str, str]
) -> dict[int, str]:
    """On a cluster: the jobs of a push (by index) that name a dependency in another queue
    which holds neither its record nor its payload, nor gets it earlier in this push, with
    that dependency's id. Those are answered `missing` without being sent (push.lua says so
    of an unknown dependency in the job's own queue). One pipelined round trip, none when no
    job names a dependency in another queue outside the push."""
    ask: dict[tuple[str, str], None] = {}
    for job in jobs:
        for dep in job.depends_on:
            queue = dep.queue or places.get(dep.id) or job.queue
            if queue != job.queue:
                ask[(queue, dep.id)] = None
    if not ask:
        return {}
    pushed = {(job.queue, job.id) for job in jobs}
    asked = [key for key in ask if key not in pushed]
    found: dict[tuple[str, str], bool] = {}
    if asked:
        async with driver.client.pipeline(transaction=False) as pipe:
            for queue, dep_id in asked:
                k = driver.keys(queue)
                pipe.exists(k.record(dep_id))
                pipe.hexists(k.payloads, dep_id)
            replies = iter(await pipe.execute())
        for key in asked:
            has_record, has_payload = next(replies), next(replies)
            found[key] = bool(has_record) or bool(has_payload)
    missing: dict[int, str] = {}
    stored: set[tuple[str, str]] = set()  # jobs of this push sent so far (not missing)
    for index, job in enumerate(jobs):
        for dep in job.depends_on:
            queue = dep.queue or places.get(dep.id) or job.queue
            key = (queue, dep.id)
            if queue != job.queue and not found.get(key, False) and key not in stored:
                missing[index] = dep.id
                break
        else:
            stored.add((job.queue, job.id))
    return missing


async def retry_failed_cluster(driver: RedisDriver, records: Sequence[FailedJob]) -> list[str]:
    """`retry_failed` on a cluster, where the failed store and each queue are in different
    slots: claim each record (failed_claim.lua, a new record id: of two retries one wins),
    move the claimed ones back (retry_failed.lua on the queue's slot only), then delete the
    records moved, by the claimed id (failed_remove.lua). A crash between the move and the
    deletion leaves the job in both places, never in neither."""
    from core.queue.drivers.redis import _translated

    store = driver.failed_store()
    groups: dict[str, list[FailedJob]] = {}
    for record in records:
        if record.connection != driver.name:
            continue
        claimed = await store.claim(record)
        if claimed is not None:
            groups.setdefault(record.queue, []).append(claimed)
    moved: list[str] = []
    for name, claimed_records in groups.items():
        k = driver.keys(name)
        args: list[Any] = [k.tag]
        for record in claimed_records:
            job_class = record.job_class
            args += (
                record.id,
                record.record_id,
                record.payload.encode(),
                "" if job_class == "?" else job_class,
            )
        async with _translated("retrying failed jobs"):
            await driver._remember([name])
            ids = await driver.script("retry_failed")(
                keys=[k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved], args=args
            )
        back = {bytes(job_id).decode() for job_id in ids}
        for record in claimed_records:
            if record.id in back:
                await store.remove(record)
        moved += [record.id for record in claimed_records if record.id in back]
    return moved
