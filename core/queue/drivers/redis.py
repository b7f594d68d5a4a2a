"""The Redis driver: lists for ready jobs, sorted sets for delayed jobs and leases.

Every state change is one Lua script (see `lua/*.lua`, each with its KEYS/ARGV header), so it is
atomic. All keys of a queue share the hash tag `{<prefix>:<queue>}`: one queue lives in one
Redis Cluster slot. Idle workers block in BLPOP on the queue's wake list instead of polling.
"""

from __future__ import annotations

import builtins
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import ConnectionLostError, DriverError
from core.queue.drivers.base import (
    Driver,
    FailedJob,
    FailedStore,
    OutgoingJob,
    QueueStats,
    ReservedJob,
    WorkerInfo,
    claim_record_id,
    new_record_id,
)
from core.queue.drivers.tls import check_redis_url, redis_tls_failure
from core.settings import Settings

__all__ = ["RedisDriver", "RedisFailedStore"]

_SCRIPTS = (
    "push",
    "reserve",
    "ack",
    "release",
    "extend",
    "clear",
    "stats",
    "retry_failed",
    "failed_claim",
    "failed_remove",
)


def _load_script(name: str) -> str:
    return resources.files("core.queue.drivers").joinpath(f"lua/{name}.lua").read_text("utf-8")


@contextlib.asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    """Redis client errors become Topiq errors, the cause chained."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise ConnectionLostError(f"Redis unreachable during {what}: {exc}") from exc
    except RedisError as exc:
        raise DriverError(f"Redis error during {what}: {exc}") from exc


class _Keys:
    """The keys of one queue, all under one hash tag."""

    __slots__ = ("attempts", "delayed", "payloads", "ready", "reserved", "wake")

    def __init__(self, prefix: str, queue: str) -> None:
        tag = f"{prefix}:{{{prefix}:{queue}}}"
        self.ready = f"{tag}:ready"
        self.delayed = f"{tag}:delayed"
        self.reserved = f"{tag}:reserved"
        self.payloads = f"{tag}:payloads"
        self.attempts = f"{tag}:attempts"
        self.wake = f"{tag}:wake"


class RedisFailedStore(FailedStore):
    """Failed jobs in a hash of records plus sorted-set indexes by time, all in one slot.

    Each record's record id is kept beside it in the `rids` hash (records stored before record
    ids existed have none: they read as the empty id).
    """

    def __init__(self, driver: RedisDriver) -> None:
        self._driver = driver
        tag = f"{driver.prefix}:{{{driver.prefix}:failed}}"
        self._records = f"{tag}:records"
        self._rids = f"{tag}:rids"
        self._index = f"{tag}:index"
        self._queue_index = f"{tag}:queue:"

    def keys(self, queue: str) -> list[str]:
        """The store's keys a script about a record of `queue` needs."""
        return [self._records, self._rids, self._index, self._queue_index + queue]

    @property
    def _redis(self) -> aioredis.Redis:
        return self._driver.client

    async def add(self, record: FailedJob) -> None:
        raw = orjson.dumps(
            {
                "id": record.id,
                "connection": record.connection,
                "queue": record.queue,
                "payload": record.payload,
                "exception": record.exception,
                "failed_at": record.failed_at.timestamp(),
            }
        )
        score = record.failed_at.timestamp()
        async with (
            _translated("recording a failed job"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            pipe.hset(self._records, record.id, raw)
            pipe.hset(self._rids, record.id, new_record_id())
            pipe.zadd(self._index, {record.id: score})
            pipe.zadd(self._queue_index + record.queue, {record.id: score})
            await pipe.execute()

    @staticmethod
    def _decode(raw: bytes | str, rid: bytes | str | None) -> FailedJob:
        data = orjson.loads(raw)
        return FailedJob(
            id=data["id"],
            connection=data["connection"],
            queue=data["queue"],
            payload=data["payload"],
            exception=data["exception"],
            failed_at=datetime.fromtimestamp(data["failed_at"], UTC),
            record_id=rid.decode() if isinstance(rid, bytes) else (rid or ""),
        )

    async def _read(self, ids: Any) -> builtins.list[FailedJob]:
        """The records of `ids` (with their record ids) that exist, in order."""
        if not ids:
            return []
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(self._records, ids)
            pipe.hmget(self._rids, ids)
            raws, rids = await pipe.execute()
        return [self._decode(raw, rid) for raw, rid in zip(raws, rids, strict=True) if raw]

    async def list(
        self, queue: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[FailedJob]:
        index = self._index if queue is None else self._queue_index + queue
        async with _translated("listing failed jobs"):
            ids: Any = await self._redis.zrevrange(index, offset, offset + limit - 1)
            return await self._read(ids)

    async def get(self, job_id: str) -> FailedJob | None:
        async with _translated("reading a failed job"):
            found = await self._read([job_id])
        return found[0] if found else None

    async def claim(self, record: FailedJob) -> FailedJob | None:
        new = claim_record_id(time.time())
        async with _translated("claiming a failed job"):
            won = await self._driver.script("failed_claim")(
                keys=[self._records, self._rids], args=[record.id, record.record_id, new]
            )
        return replace(record, record_id=new) if won else None

    async def remove(self, record: FailedJob) -> bool:
        async with _translated("removing a failed job"):
            done = await self._driver.script("failed_remove")(
                keys=self.keys(record.queue), args=[record.id, record.record_id]
            )
        return bool(done)

    async def forget(self, job_id: str) -> bool:
        record = await self.get(job_id)
        if record is None:
            return False
        async with (
            _translated("forgetting a failed job"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            pipe.hdel(self._records, job_id)
            pipe.hdel(self._rids, job_id)
            pipe.zrem(self._index, job_id)
            pipe.zrem(self._queue_index + record.queue, job_id)
            deleted, _, _, _ = await pipe.execute()
        return bool(deleted)

    async def _delete(self, records: Sequence[FailedJob]) -> int:
        if not records:
            return 0
        async with (
            _translated("deleting failed jobs"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            ids = [r.id for r in records]
            pipe.hdel(self._records, *ids)
            pipe.hdel(self._rids, *ids)
            pipe.zrem(self._index, *ids)
            for name, group in _group(records).items():
                pipe.zrem(self._queue_index + name, *group)
            results = await pipe.execute()
        return int(results[0])

    async def _all(
        self, queue: str | None, below: float = float("inf")
    ) -> builtins.list[FailedJob]:
        index = self._index if queue is None else self._queue_index + queue
        async with _translated("reading failed jobs"):
            ids: Any = await self._redis.zrangebyscore(index, "-inf", f"({below}")
            return await self._read(ids)

    async def flush(self, queue: str | None = None) -> int:
        return await self._delete(await self._all(queue))

    async def prune(self, before: datetime) -> int:
        return await self._delete(await self._all(None, before.timestamp()))

    async def count(self, queue: str | None = None) -> int:
        index = self._index if queue is None else self._queue_index + queue
        async with _translated("counting failed jobs"):
            return int(await self._redis.zcard(index))


def _group(records: Sequence[FailedJob]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for record in records:
        groups[record.queue].append(record.id)
    return groups


class RedisDriver(Driver):
    kind = "redis"
    blocks = True

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self.prefix = settings.redis_prefix
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._keys: dict[str, _Keys] = {}
        self._known_queues: set[str] = set()
        self._next_due: dict[str, float] = {}  # queue -> monotonic time work may fall due
        self._failed = RedisFailedStore(self)

    def script(self, name: str) -> AsyncScript:
        """The registered Lua script `name` (see `lua/`)."""
        return self._scripts[name]

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise DriverError("the Redis driver is not open (use `async with driver:`)")
        return self._client

    def keys(self, queue: str) -> _Keys:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = _Keys(self.prefix, queue)
        return keys

    async def open(self) -> None:
        if self._client is not None:
            return
        dsn = self.settings.redis_dsn
        check_redis_url(dsn)
        # No client-side retries: a script whose reply was lost must not run twice; the worker
        # retries with backoff and leases cover anything reserved but never reported.
        client = aioredis.Redis.from_url(
            dsn,
            decode_responses=False,
            retry=RedisRetry(NoBackoff(), 0),
            health_check_interval=30,
        )
        self._scripts = {name: client.register_script(_load_script(name)) for name in _SCRIPTS}
        async with _translated("connecting"):
            try:
                await client.ping()
            except BaseException as exc:
                await client.aclose()
                if isinstance(exc, RedisError | OSError):  # rediss:// that cannot be TLS: stop
                    where = client.connection_pool.connection_kwargs
                    tls = await redis_tls_failure(dsn, where["host"], where["port"], exc)
                    if tls is not None:
                        raise tls from None
                raise
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # -- primitives --------------------------------------------------------------------

    async def _scripts_run(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> None:
        """Run Lua scripts: one directly, several in one pipelined round trip.

        The pipeline sends bare EVALSHAs: redis-py's script-aware pipelines ask SCRIPT EXISTS
        before every batch, a second round trip each time. A server that lost its scripts (a
        restart) answers NOSCRIPT; then they are loaded and the batch is sent again.
        """
        if len(calls) == 1:
            name, keys, args = calls[0]
            await self._scripts[name](keys=keys, args=args)
            return
        for attempt in (1, 2):
            async with self.client.pipeline(transaction=False) as pipe:
                for name, keys, args in calls:
                    pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                try:
                    await pipe.execute()
                    return
                except NoScriptError:
                    if attempt == 2:
                        raise
            for name in {name for name, _, _ in calls}:
                await self.client.script_load(self._scripts[name].script)

    async def push(self, jobs: Sequence[OutgoingJob]) -> None:
        groups: dict[str, list[Any]] = defaultdict(list)
        for job in jobs:
            groups[job.queue] += (job.id, job.payload, int(job.delay * 1000))
        calls = []
        for name, args in groups.items():
            k = self.keys(name)
            keys = [k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved]
            calls.append(("push", keys, args))
        async with _translated("push"):
            new = [name for name in groups if name not in self._known_queues]
            if new:  # once per queue and process: the list of queues the stats command shows
                await self.client.sadd(f"{self.prefix}:queues", *new)
                self._known_queues.update(new)
            await self._scripts_run(calls)

    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
    ) -> list[ReservedJob]:
        acks = _by_queue(ack)
        out: list[ReservedJob] = []
        lease_ms = max(1, int(lease * 1000))
        async with _translated("reserve"):
            for name in queues:
                want = limit - len(out)
                if want <= 0 and name not in acks:
                    break
                k = self.keys(name)
                args: list[Any] = [max(0, want), lease_ms, 0]
                mine = acks.pop(name, ())
                if mine:
                    args[2] = len(mine)
                    for job in mine:
                        args += (job.id, job.attempts)
                reply = await self._scripts["reserve"](
                    keys=[k.ready, k.delayed, k.reserved, k.payloads, k.attempts, k.wake],
                    args=args,
                )
                next_ms = int(reply[0])
                if next_ms:
                    self._next_due[name] = (
                        time.monotonic() + next_ms / 1000 if next_ms > 0 else float("inf")
                    )
                for i in range(1, len(reply), 3):
                    job_id: bytes = reply[i]
                    out.append(ReservedJob(job_id.decode(), name, reply[i + 1], int(reply[i + 2])))
            if acks:
                await self._ack_groups(acks)
        return out

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        now = time.monotonic()
        for name in queues:
            timeout = min(timeout, self._next_due.get(name, now + timeout) - now)
        if timeout < 0.001:
            return
        wake = [self.keys(name).wake for name in queues]
        async with _translated("waiting for jobs"):
            await self.client.blpop(wake, timeout=timeout)

    async def _ack_groups(self, groups: dict[str, Sequence[ReservedJob]]) -> None:
        calls = []
        for name, jobs in groups.items():
            k = self.keys(name)
            args: list[Any] = []
            for job in jobs:
                args += (job.id, job.attempts)
            calls.append(("ack", [k.reserved, k.payloads, k.attempts], args))
        await self._scripts_run(calls)

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        if jobs:
            async with _translated("ack"):
                await self._ack_groups(_by_queue(jobs))

    async def release(self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False) -> None:
        k = self.keys(job.queue)
        async with _translated("release"):
            await self._scripts["release"](
                keys=[k.ready, k.delayed, k.reserved, k.attempts, k.wake],
                args=[job.id, job.attempts, int(delay * 1000), 1 if refund else 0],
            )

    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        groups: dict[str, list[Any]] = defaultdict(list)
        for job, seconds in leases:
            groups[job.queue] += (job.id, job.attempts, max(1, int(seconds * 1000)))
        calls = []
        for name, args in groups.items():
            k = self.keys(name)
            calls.append(("extend", [k.reserved, k.attempts], args))
        async with _translated("extend"):
            await self._scripts_run(calls)

    async def stats(self, queue: str) -> QueueStats:
        k = self.keys(queue)
        async with _translated("stats"):
            pending, delayed, reserved = await self._scripts["stats"](
                keys=[k.ready, k.delayed, k.reserved]
            )
        return QueueStats(self.name, queue, int(pending), int(delayed), int(reserved), 0)

    async def queues(self) -> list[str]:
        async with _translated("listing queues"):
            names: set[bytes] = await self.client.smembers(f"{self.prefix}:queues")  # type: ignore[assignment]
        return sorted(name.decode() for name in names)

    async def clear(self, queue: str) -> int:
        k = self.keys(queue)
        async with _translated("clear"):
            deleted = await self._scripts["clear"](
                keys=[k.ready, k.delayed, k.payloads, k.attempts, k.wake]
            )
        return int(deleted)

    def failed_store(self) -> FailedStore:
        return self._failed

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        groups: dict[str, list[Any]] = defaultdict(list)
        for record in records:
            if record.connection == self.name:
                groups[record.queue] += (record.id, record.record_id, record.payload.encode())
        moved: list[str] = []
        async with _translated("retrying failed jobs"):
            new = [name for name in groups if name not in self._known_queues]
            if new:
                await self.client.sadd(f"{self.prefix}:queues", *new)
                self._known_queues.update(new)
            for name, args in groups.items():
                k = self.keys(name)
                keys = [k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved]
                ids = await self._scripts["retry_failed"](
                    keys=self._failed.keys(name) + keys, args=args
                )
                moved += [job_id.decode() for job_id in ids]
        return moved

    # -- workers and the restart signal ------------------------------------------------

    # The registry: one key per worker holding its report, with the heartbeat's TTL, so a dead
    # worker leaves when its TTL runs out whoever is left; and an index (sorted set, scored by
    # expiry in the server's clock) to list them, pruned by every report. Both share the hash
    # tag `{<prefix>:workers}`: one slot.

    def _registry_keys(self, worker_id: str = "") -> tuple[str, str]:
        tag = f"{self.prefix}:{{{self.prefix}:workers}}"
        return f"{tag}:index", f"{tag}:worker:{worker_id}"

    async def report_worker(self, info: WorkerInfo, ttl: float) -> None:
        index, key = self._registry_keys(info.id)
        async with _translated("worker heartbeat"):
            await self.client.eval(
                _REPORT_WORKER, 2, index, key, info.id, info.to_json(), max(1, int(ttl * 1000))
            )

    async def remove_worker(self, worker_id: str) -> None:
        index, key = self._registry_keys(worker_id)
        async with (
            _translated("removing a worker"),
            self.client.pipeline(transaction=True) as pipe,
        ):
            pipe.delete(key)
            pipe.zrem(index, worker_id)
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        index, _ = self._registry_keys()
        async with _translated("listing workers"):
            members: list[bytes] = await self.client.zrange(index, 0, -1)  # type: ignore[assignment]
            ids = [_text(member) for member in members]
            raws = await self.client.mget([self._registry_keys(i)[1] for i in ids]) if ids else []
        alive = (WorkerInfo.from_json(raw) for raw in raws if raw is not None)
        return sorted(alive, key=lambda w: w.started_at)

    async def request_restart(self, at: float) -> None:
        async with _translated("requesting a restart"):
            await self.client.set(f"{self.prefix}:restart", repr(at))

    async def restart_requested_at(self) -> float | None:
        async with _translated("reading the restart signal"):
            raw = await self.client.get(f"{self.prefix}:restart")
        return None if raw is None else float(raw)


#: KEYS[1] the registry index, KEYS[2] this worker's key; ARGV[1] its id, ARGV[2] its report,
#: ARGV[3] the TTL in ms. Stores the report, indexes it by expiry and drops expired entries.
_REPORT_WORKER = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _by_queue(jobs: Sequence[ReservedJob]) -> dict[str, Sequence[ReservedJob]]:
    if not jobs:
        return {}
    first = jobs[0].queue
    if all(job.queue == first for job in jobs):
        return {first: jobs}
    groups: dict[str, list[ReservedJob]] = defaultdict(list)
    for job in jobs:
        groups[job.queue].append(job)
    return dict(groups)
