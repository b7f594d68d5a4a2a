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
A queue may see no script again (its worker gone, no push): every worker also sweeps the
outboxes of all known queues with its heartbeat (`sweep_outboxes`, `RedisDriver.sweep`).
A delivery that fails (the connection lost, a failover) is logged and left for the sweep:
the call that produced the messages has done its work and does not fail for it. An entry
that is not a message (relay.lua could not apply it) is moved to `<tag>:outbox:bad`, logged;
the others are delivered. With REDIS_WAIT_REPLICAS the targets' writes are WAITed for before
the removal from the sources (a failover of a target must not lose them); short of the
replicas, the messages stay for the sweep.

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
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import NoScriptError, ResponseError

from core.queue.drivers.base import FailedJob, OutgoingJob
from core.queue.drivers.redis_durability import scripts_replicated

if TYPE_CHECKING:
    from core.queue.drivers.redis import RedisDriver

__all__ = [
    "Outboxes",
    "deliver",
    "missing_dependencies",
    "relayed",
    "retry_failed_cluster",
    "sweep_outboxes",
]

log = logging.getLogger(__name__)

#: Messages sent to relay.lua per call.
_CHUNK = 200
#: Messages read from an outbox with a stale message, per sweep.
_SWEEP = 500
#: lib.lua's STALE: a message older than this (ms) is swept, its deliverer presumed dead.
_STALE_MS = 2000
#: The append time of a message (lib.lua `emit`), as relay.lua's `reply` reads it.
_APPENDED = re.compile(rb'^\[[^,]*,"(\d+)"')
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


#: Fields after the kind, per message kind (lib.lua, "THE RELAY"): at least, at most.
_FIELDS = {"r": (4, 4), "s": (2, 2), "x": (2, 3)}
#: Bad entries kept per outbox in `<tag>:outbox:bad` (the newest), for an operator to read.
_BAD_KEPT = 1000
#: How much of a bad entry a log line shows.
_SHOWN = 200


def _target(message: bytes, prefix: str) -> str:
    """The tag of the queue a message is for (its third field); ValueError naming what is
    wrong with a message that is not one (lib.lua, "THE RELAY": the format)."""
    try:
        parsed = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(parsed, list) or len(parsed) < 4:
        raise ValueError("not a JSON array [seq, ms, target tag, kind, ...]")
    target, kind = parsed[2], parsed[3]
    if not (
        isinstance(target, str)
        and target.startswith(f"{prefix}:{{{prefix}:")
        and target.endswith("}")
    ):
        raise ValueError(f"target {target!r} is no queue's tag")
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ValueError(f"unknown message kind {kind!r}")
    rest = parsed[4:]
    if not fields[0] <= len(rest) <= fields[1] or not all(isinstance(f, str) for f in rest):
        raise ValueError(f"kind {kind!r} takes {fields[0]}-{fields[1]} strings after it")
    return target


def _failed_on_it(exc: ResponseError) -> bool:
    """Whether relay.lua failed on one of its messages (a script error), rather than the
    server refusing to run it for now (a failover: CLUSTERDOWN, TRYAGAIN, READONLY, ...)."""
    from core.queue.drivers.redis import _REFUSED_FOR_NOW

    text = str(exc)
    return not isinstance(exc, (NoScriptError, *_REFUSED_FOR_NOW)) and (
        "relay.lua" in text or "user_script" in text
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _show(message: bytes) -> str:
    text = message[:_SHOWN].decode("utf-8", "replace")
    return text + (f"... ({len(message)} bytes)" if len(message) > _SHOWN else "")


async def deliver(driver: RedisDriver, box: Outboxes) -> int:
    """Deliver the messages in `box`, and those their delivery appends in turn, until none is
    left; returns how many were delivered. Never raises (but a cancellation): a message that
    is not one is set aside (`<tag>:outbox:bad`, logged); a failed delivery is logged and its
    messages stay in their outboxes, for a sweep (`sweep_outboxes`, any worker's heartbeat)."""
    if not box:
        return 0
    try:
        return await _deliver(driver, box)
    except Exception as exc:
        sources = sorted({*box.sent, *box.sweep})
        shown = ", ".join(f"{tag}:outbox" for tag in sources[:3])
        more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
        log.warning(
            "relay: delivery of the cross-queue messages of %s%s failed (%s: %s); they stay "
            "in their outboxes and are delivered by a later sweep (every worker sweeps the "
            "outboxes holding a message older than 2 s)",
            shown,
            more,
            type(exc).__name__,
            exc,
        )
        return 0


async def _set_aside(driver: RedisDriver, bad: list[tuple[str, bytes, str]]) -> None:
    """Move entries that are not messages out of their outboxes, to `<tag>:outbox:bad` (the
    same slot), one ERROR log each."""
    async with driver.pipeline(transaction=False) as pipe:
        for source, message, why in bad:
            log.error(
                "relay: outbox %s:outbox holds an entry that is not a relay message (%s), "
                "moved to %s:outbox:bad: %s",
                source,
                why,
                source,
                _show(message),
            )
            pipe.rpush(f"{source}:outbox:bad", message)
            pipe.ltrim(f"{source}:outbox:bad", -_BAD_KEPT, -1)
            pipe.lrem(f"{source}:outbox", 1, message)
        await pipe.execute()


async def _apply(
    driver: RedisDriver, calls: list[tuple[str, list[str], list[Any]]]
) -> list[Any] | None:
    """relay.lua `calls`; their replies, or None when REDIS_WAIT_REPLICAS asked for replicas
    that did not acknowledge the targets' writes (then nothing is removed from the sources:
    a failover of a target would lose what relay.lua did there; a sweep delivers again)."""
    if not driver.settings.redis_wait_replicas:
        return await driver._scripts_run(calls)
    replies, short = await scripts_replicated(driver, calls)
    if short:
        log.warning(
            "relay: messages applied on %s but not acknowledged by REDIS_WAIT_REPLICAS=%d "
            "replica(s) (%s); they stay in their outboxes and are delivered again by a sweep",
            ", ".join(sorted({call[2][0] for call in calls})[:3]),
            driver.settings.redis_wait_replicas,
            short,
        )
        return None
    return replies


async def _apply_each(
    driver: RedisDriver, calls: list[tuple[str, list[str], list[Any]]], sources: dict[bytes, str]
) -> list[tuple[list[Any], Any]] | None:
    """After relay.lua failed on a chunk: each message alone, those it fails on set aside;
    (relay.lua's arguments, its reply) of the others, or None as `_apply`."""
    done: list[tuple[list[Any], Any]] = []
    bad: list[tuple[str, bytes, str]] = []
    for _name, keys, args in calls:
        target = args[0]
        for message in args[1:]:
            try:
                got = await _apply(driver, [("relay", keys, [target, message])])
            except ResponseError as exc:
                if not _failed_on_it(exc):
                    raise
                bad.append((sources[message], message, f"relay.lua failed on it: {exc}"))
                continue
            if got is None:
                return None
            done.append(([target, message], got[0]))
    if bad:
        await _set_aside(driver, bad)
    return done


async def _deliver(driver: RedisDriver, box: Outboxes) -> int:
    client = driver.client
    prefix = driver.prefix
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
        sources: dict[bytes, str] = {}
        bad: list[tuple[str, bytes, str]] = []
        for source in pending:
            good = []
            for message in dict.fromkeys(pending[source]):
                try:
                    target = _target(message, prefix)
                except ValueError as exc:
                    bad.append((source, message, str(exc)))
                    continue
                good.append(message)
                sources[message] = source
                by_target[target].append(message)
            pending[source] = good
        if bad:
            await _set_aside(driver, bad)
        calls: list[tuple[str, list[str], list[Any]]] = []
        for target, messages in by_target.items():
            for at in range(0, len(messages), _CHUNK):
                calls.append(("relay", [f"{target}:outbox"], [target, *messages[at : at + _CHUNK]]))
        if not calls:
            return delivered
        try:
            replies = await _apply(driver, calls)
            applied = None
            if replies is not None:
                applied = [(call[2], r) for call, r in zip(calls, replies, strict=True)]
        except ResponseError as exc:  # relay.lua failed: find the message, apply the others
            if not _failed_on_it(exc):
                raise
            applied = await _apply_each(driver, calls, sources)
        if applied is None:
            return delivered
        box = Outboxes()
        refused: list[tuple[str, bytes, str]] = []
        for args, reply in applied:
            answer = box.take(args[0], reply)
            for n, why in zip(answer[::2], answer[1::2], strict=True):
                message = args[int(n)]
                refused.append((sources[message], message, f"relay.lua refused it: {_text(why)}"))
        if refused:
            await _set_aside(driver, refused)
        # Applied: out of the outboxes they came from (a second delivery would change nothing).
        async with client.pipeline(transaction=False) as pipe:
            for source, messages in pending.items():
                for message in messages:
                    pipe.lrem(f"{source}:outbox", 1, message)  # type: ignore[arg-type]
            await pipe.execute()
        delivered += sum(len(messages) for messages in pending.values())
    log.warning("relay: cascade still going after %d rounds; the sweep goes on", _MAX_ROUNDS)
    return delivered


def _stale(head: bytes, now_ms: float) -> bool:
    """Whether an outbox whose first entry is `head` holds a message older than lib.lua's
    STALE (or an entry that is not a message: to set aside)."""
    found = _APPENDED.match(head)
    return found is None or now_ms - int(found.group(1)) > _STALE_MS


async def sweep_outboxes(driver: RedisDriver) -> int:
    """Deliver the messages a dead deliverer left in any known queue's outbox (the first older
    than 2 s; entries that are not messages set aside): what a script of that queue reports
    too, but a queue may see no script again (its worker gone, no push). One pipelined LINDEX
    per queue (one key each), then a delivery of the stale outboxes only; how many delivered."""
    client = driver.client
    names: set[Any] = await client.smembers(f"{driver.prefix}:queues")
    tags = [driver.keys(_text(name)).tag for name in names]
    if not tags:
        return 0
    async with driver.pipeline(transaction=False) as pipe:
        for tag in tags:
            pipe.lindex(f"{tag}:outbox", 0)
        heads = await pipe.execute(raise_on_error=False)
    now_ms = time.time() * 1000
    box = Outboxes()
    for tag, head in zip(tags, heads, strict=True):
        if isinstance(head, bytes) and _stale(head, now_ms):
            box.sweep.add(tag)
    return await deliver(driver, box)


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
