"""The Redis driver: lists for ready jobs, sorted sets for delayed jobs and leases.

Every state change is one Lua script (see `lua/*.lua`, each with its KEYS/ARGV header), so it is
atomic. All keys of a queue share the hash tag `{<prefix>:<queue>}`: one queue lives in one
Redis Cluster slot, a job's status record and unique keys included (see push.lua for the key
schema). Idle workers block in BLPOP on the queue's wake list instead of polling; a caller
waiting for a job to end blocks in BLPOP on the job's `done` list.

Status records are written by the same scripts that move the job (push, reserve, release, ack),
so keeping them costs no round trip. An ended record expires by itself (PEXPIRE of its keep
time): `prune_records` has nothing to do unless asked for the records ended before a time.

Issue #13 (priorities, dependencies, workflow records, limits, once keys) adds keys described
in lua/lib.lua, whose functions every script that ends, places or releases jobs shares (it is
prepended to them). The plain path (priority 0, no dependencies, no limits) costs a few EXISTS
per script call, never one per job. A dependency or dependent in another queue is reached
through the other queue's keys (lib.lua's `Q`, the one place they are built): fine on a single
server, not on Redis Cluster yet (issue #17).

Rolling deploys: the wave-1 keys keep their meaning, so a wave-1 worker runs jobs pushed by this
driver and this driver runs jobs pushed by wave-1 code. A job pushed by wave-1 code has no
record: its status is read from where it is (`queued`, `scheduled`, `retrying`, `running`). A
job pushed here but acknowledged by a wave-1 worker keeps the record it had (`queued` or
`running`), without expiry, until something removes its key. Workers of code before issue #13
run plain jobs and `at_front` jobs pushed while nothing prioritized waits, but neither see
prioritized, deferred or limit-held jobs nor resolve dependents when they acknowledge: deploy
the new workers before pushing workflows.

Issue #14 (groups, bounded queues, expired jobs handed back) adds the group keys of lib.lua
(`<tag>:gturn`, `<tag>:gline:<group>`, `<tag>:glen`), all under the queue's tag. The turn
passes in the same script as its holder ends; the plain path costs one more EXISTS key per
reserve (lib.lua `probe`) and one per ack call. Older workers neither pass a group's turn nor
see line jobs: deploy the new workers before pushing grouped jobs.

Issue #15 (observing) reads without a new key: `history` is the `<tag>:counts:<minute>` hashes
(lua/history.lua), to which `add_history` adds the workers' fields (pipelined HINCRBY, one key
per command, the same EXPIRE); `browse` (lua/browse.lua) and `groups` (lua/groups.lua) are one
script each on the queue's keys. Each call stays in the queue's Cluster slot. Deferred jobs get
a `dseq` record field (their place in push order): older code leaves it out, browse then orders
by push time and id.

Issue #16 adds no key either: `save_payload` (lua/save_payload.lua) rewrites `<tag>:payloads`
for a job while its try holds it; an ack's outcome info is the record's `info` field (ack.lua
gets it only in calls that carry some: the plain path's arguments are unchanged);
`prune_records(ended_before=)` SCANs each queue's `<tag>:job:*` (one slot) and deletes the ended
records older than the cutoff in lua/prune.lua, per SCAN page.

Issue #17 runs the same code on a Redis Cluster (REDIS_CLUSTER_NODES: `client` is then a
`RedisCluster`). Every script and every transaction touches one slot; pipelines send each
command to its slot's primary (all at once). What would cross slots is split per slot: `wait`
blocks in one BLPOP per slot at once (the first to return wins); `prune_records` SCANs the
queue's primary; the failed store's retry claims, moves, then removes (redis_relay.py); work
reaching another queue goes through the relay (lib.lua, redis_relay.py). After a lost
connection the cluster client reads the slot map again before its next command; nothing is
sent twice by the client (a lost reply is the caller's, as on one server).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import itertools
import math
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from importlib import resources
from itertools import chain
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url as redis_parse_url
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.errors import ConfigurationError, ConnectionLostError, DriverError
from core.queue.drivers.base import (
    HISTORY_FIELDS,
    BrowseState,
    Driver,
    FailedJob,
    FailedStore,
    GroupInfo,
    MinuteCounts,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
    check_marker_items,
    claim_record_id,
    new_record_id,
    pause_marker,
)
from core.queue.drivers.redis_connect import (
    cluster_failure,
    connect_watching_tls,
    sentinel_failure,
)
from core.queue.drivers.redis_durability import push_replicated
from core.queue.drivers.redis_relay import (
    Outboxes,
    deliver,
    missing_dependencies,
    relayed,
    retry_failed_cluster,
    sweep_outboxes,
)
from core.queue.drivers.tls import check_redis_url, redis_tls_failure
from core.settings import Settings, redis_nodes
from core.status import ENDED, JobStatus, Progress, Status

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
    "cancel",
    "status",
    "recent",
    "history",
    "browse",
    "groups",
    "save_payload",
    "prune",
    "relay",
)

#: How long a waiter's mark outlives the slice it blocks for (ms). A `done` token stays 60 s
#: for late waiters: the scripts that push one set that (PEXPIRE 60000).
_WAITER_MARGIN_MS = 5_000
#: The longest a waiter blocks before reading the record again (a lost token costs this much).
_WAIT_SLICE = 1.0
#: Tokens of unanswered reservations remembered per queue (one per failed call while the
#: server is away; only the last one that reached it matters).
_UNANSWERED_KEPT = 16
#: Cluster: seconds between two sweeps of the relay's outboxes by one worker (`sweep`).
_SWEEP_EVERY = 2.0
#: Cluster: the most slots `wait` blocks a BLPOP on (a connection each, kept between waits;
#: redis-py's cluster client has at most 100 per node); the queues of further slots are
#: polled every `_POLL_EVERY` seconds (one pipelined EXISTS per slot).
_BLOCKED_SLOTS = 32
_POLL_EVERY = 0.5
#: The longest a BLPOP of `wait` blocks (then it is started again): below the client's socket
#: timeout (redis-py's default: 5 s, on every topology), which would fail a longer one as a
#: lost connection. A longer `--sleep` is served in several waits.
_BLPOP_MAX = 4.0


#: The scripts that end, place or release jobs: lua/lib.lua (shared functions) is prepended.
_WITH_LIB = frozenset(
    ("push", "reserve", "ack", "release", "cancel", "clear", "retry_failed", "relay")
)
#: The scripts that read job records: lua/record.lua (`job_reply`) is prepended.
_WITH_RECORD = frozenset(("status", "browse"))

#: `history`'s fields, in history.lua's reply order (MinuteCounts' fields after `minute`).
_MINUTE_FIELDS = tuple(f.name for f in dataclasses.fields(MinuteCounts))[1:]
#: The most minutes `history` reads from the server (older minutes are zeros: the counts
#: hashes expire three hours after their last write).
_HISTORY_READ = 1440
#: How long a counts hash outlives its last write, in seconds (as lib.lua's flush sets it).
_COUNTS_KEEP = 10800
#: SCAN's COUNT hint for `prune_records`: each page of matches is one prune.lua call.
_PRUNE_PAGE = 500


def _load_script(name: str, *, cluster: bool = False) -> str:
    """The script `name` as sent: lib.lua or record.lua first where it uses them, and before
    all, `local CLUSTER = true|false` (lib.lua: whether another queue's keys may be touched
    in this script, or must be reached through the relay)."""

    def read(file: str) -> str:
        return resources.files("core.queue.drivers").joinpath(f"lua/{file}.lua").read_text("utf-8")

    head = f"local CLUSTER = {'true' if cluster else 'false'}\n"
    if name in _WITH_LIB:
        return head + read("lib") + "\n" + read(name)
    if name in _WITH_RECORD:
        return head + read("record") + "\n" + read(name)
    return head + read(name)


#: Errors a server answers instead of running a command while it cannot take it (see
#: `_translated`).
_REFUSED_FOR_NOW = (
    ClusterDownError,
    TryAgainError,
    MasterDownError,
    SlotNotCoveredError,
    ReadOnlyError,
    BusyLoadingError,
)


@contextlib.asynccontextmanager
async def _translated(what: str) -> AsyncIterator[None]:
    """Redis client errors become Topiq errors, the cause chained."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        why = str(exc) or type(exc).__name__
        raise ConnectionLostError(f"Redis unreachable during {what}: {why}") from exc
    except _REFUSED_FOR_NOW as exc:
        # The server refused the command without running it, for a while: a cluster with a
        # slot not served during a failover (CLUSTERDOWN, TRYAGAIN), a primary demoted to a
        # replica (READONLY), a server loading its data after a restart (LOADING). Like a
        # lost connection, the call may be made again once the failover is over.
        raise ConnectionLostError(
            f"Redis cannot take commands right now during {what} (a failover or a restart "
            f"in progress?): {exc}"
        ) from exc
    except RedisError as exc:
        raise DriverError(f"Redis error during {what}: {exc}") from exc
    except RedisClusterException as exc:  # not a RedisError: the cluster client's own
        if "cannot be connected" in str(exc):  # no node of REDIS_CLUSTER_NODES answered
            raise ConnectionLostError(f"Redis Cluster unreachable during {what}: {exc}") from exc
        raise DriverError(f"Redis Cluster error during {what}: {exc}") from exc


def _raise_if_cancelled() -> None:
    """Raise the cancellation of the current task if a call swallowed it.

    redis-py sometimes completes a command whose task was cancelled meanwhile and returns its
    reply, the cancel request lost (seen with redis-py 8.1: about one cancel in ten of a
    worker's cancel poll, which then ran forever). Polling calls that are cancelled to stop
    them (`cancel_requested`, `wait_ended`) check this after each command. Never used on
    calls a caller may make while handling its own cancellation (release, ack).
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Keys:
    """The keys of one queue, all under one hash tag."""

    __slots__ = (
        "attempts",
        "cancel",
        "counts",
        "delayed",
        "front",
        "gturn",
        "payloads",
        "ready",
        "reserved",
        "tag",
        "wake",
    )

    def __init__(self, prefix: str, queue: str) -> None:
        tag = f"{prefix}:{{{prefix}:{queue}}}"
        self.tag = tag
        self.ready = f"{tag}:ready"
        self.delayed = f"{tag}:delayed"
        self.reserved = f"{tag}:reserved"
        self.payloads = f"{tag}:payloads"
        self.attempts = f"{tag}:attempts"
        self.wake = f"{tag}:wake"
        self.front = f"{tag}:front"
        self.cancel = f"{tag}:cancel"
        self.counts = f"{tag}:counts"
        self.gturn = f"{tag}:gturn"

    def record(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.tag}:done:{job_id}"

    def unique(self, key: str) -> str:
        return f"{self.tag}:unique:{key}"

    def status_keys(self) -> list[str]:
        return [self.payloads, self.attempts, self.reserved, self.delayed]


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
    def _redis(self) -> aioredis.Redis | RedisCluster:
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
            self._driver.pipeline(transaction=True) as pipe,
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
        async with self._driver.pipeline(transaction=True) as pipe:
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
            self._driver.pipeline(transaction=True) as pipe,
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
            self._driver.pipeline(transaction=True) as pipe,
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
        self._client: aioredis.Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._keys: dict[str, _Keys] = {}
        self._known_queues: set[str] = set()
        self._next_due: dict[str, float] = {}  # queue -> monotonic time work may fall due
        self._failed = RedisFailedStore(self)
        # Reservations whose reply never came (see reserve.lua, "Grants"): this driver's id,
        # a counter for its calls, and per queue the tokens of calls left unanswered.
        self._reserver = secrets.token_hex(8)
        self._grants = itertools.count(1)
        self._unanswered: dict[str, list[str]] = {}
        # On a cluster, the BLPOPs `wait` left blocked, per slot's wake keys (`_wait_slots`).
        self._blocked: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._sentinel: Any = None  # the Sentinel client asking for the primary (REDIS_SENTINELS)
        self._sweep_due = 0.0  # monotonic time of the next `sweep`

    def script(self, name: str) -> AsyncScript:
        """The registered Lua script `name` (see `lua/`)."""
        return self._scripts[name]

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The client: a `RedisCluster` on a cluster (the same command methods, routed by
        key slot), else a `Redis` (Sentinel's client for the current master included)."""
        if self._client is None:
            raise DriverError("the Redis driver is not open (use `async with driver:`)")
        return self._client

    def keys(self, queue: str) -> _Keys:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = _Keys(self.prefix, queue)
        return keys

    @contextlib.asynccontextmanager
    async def pipeline(self, *, transaction: bool = False) -> AsyncIterator[Any]:
        """A pipeline of the client (on a cluster, its commands are sent to their slots'
        primaries, all at once; with `transaction`, every command must be in one slot, as
        each one here is: MULTI/EXEC on that slot's primary).

        A lost connection makes a cluster client ask for a new slot map before its next
        command: redis-py's cluster client does that after a failed command, not after a
        failed pipeline, which would go on sending to a primary that is gone."""
        client = self.client
        async with client.pipeline(transaction=transaction) as pipe:
            try:
                yield pipe
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._lost(client)
                raise

    def _lost(self, client: Any) -> None:
        """After a connection error: a cluster client refreshes its slot map (from any node
        that answers) before its next command, so the next call reaches the new topology."""
        if self.cluster:
            client._initialize = True

    @property
    def topology(self) -> str:
        """`cluster` (REDIS_CLUSTER_NODES), `sentinel` (REDIS_SENTINELS) or `single`."""
        if self.settings.redis_cluster_nodes:
            return "cluster"
        if self.settings.redis_sentinels:
            return "sentinel"
        return "single"

    @property
    def cluster(self) -> bool:
        """Whether the server is a Redis Cluster: every command and script keeps to one slot,
        and cross-queue work goes through the relay (lua/lib.lua, CLUSTER)."""
        return self.topology == "cluster"

    def _make_client(self) -> Any:
        """A client for the configured topology, with no client-side retries: a script whose
        reply was lost must not run twice; the worker retries with backoff and leases cover
        anything reserved but never reported. Redirections (MOVED/ASK) are not retries: the
        server refused to run the command, and the cluster client follows them."""
        dsn = self.settings.redis_dsn
        check_redis_url(dsn)
        no_retry = RedisRetry(NoBackoff(), 0)
        topology = self.topology
        if topology == "single":
            return aioredis.Redis.from_url(
                dsn, decode_responses=False, retry=no_retry, health_check_interval=30
            )
        options: dict[str, Any] = dict(redis_parse_url(dsn))
        for name in ("host", "port", "path"):
            options.pop(name, None)
        tls = options.pop("connection_class", None) is not None and dsn.startswith("rediss:")
        if topology == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            if int(options.pop("db", 0) or 0) != 0:
                raise ConfigurationError(
                    "REDIS_URL names a database other than 0, but a Redis Cluster has only "
                    "database 0: drop the /N from REDIS_URL (or set REDIS_DB=0)"
                )
            nodes = redis_nodes(self.settings.redis_cluster_nodes or "")
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                decode_responses=False,
                retry=no_retry,
                ssl=tls,
                **options,
            )
        from redis.asyncio.sentinel import Sentinel

        secret = self.settings.redis_sentinel_password
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "retry": no_retry,  # a sentinel down or refusing the password: said at once
        }
        if secret is not None:
            sentinel_kwargs["password"] = secret.get_secret_value()
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            redis_nodes(self.settings.redis_sentinels or ""),
            sentinel_kwargs=sentinel_kwargs,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        if tls:
            options["ssl"] = True
        self._sentinel = sentinel
        return sentinel.master_for(
            self.settings.redis_sentinel_master or "",
            redis_class=aioredis.Redis,
            decode_responses=False,
            retry=no_retry,
            health_check_interval=30,
            **options,
        )

    async def open(self) -> None:
        if self._client is not None:
            return
        dsn = self.settings.redis_dsn
        client = self._make_client()
        self._scripts = {
            name: client.register_script(_load_script(name, cluster=self.cluster))
            for name in _SCRIPTS
        }
        async with _translated("connecting"):
            try:
                if self.cluster:
                    nodes = redis_nodes(self.settings.redis_cluster_nodes or "")
                    await connect_watching_tls(dsn, nodes, client.initialize())
                await client.ping()
            except BaseException as exc:
                await client.aclose()
                why = await self._connect_failure(client, exc)
                if why is not None:
                    await self.close()
                    raise why from None
                raise
        self._client = client

    async def replica_shortfall(self) -> str | None:
        """With REDIS_WAIT_REPLICAS: why no push can be acknowledged as replicated, when a
        primary (each primary of a cluster) has fewer connected replicas than the setting asks
        (INFO replication, `connected_slaves`): every dispatch would wait REDIS_WAIT_TIMEOUT and
        fail with NotReplicatedError. `None` when the setting is 0 or each primary has enough.
        Used by `health` (core/health.py)."""
        wanted = self.settings.redis_wait_replicas
        if wanted <= 0:
            return None
        client: Any = self.client
        if self.cluster:
            primaries = [
                (
                    node.name,
                    await client.execute_command("INFO", "replication", target_nodes=node),
                )
                for node in client.get_primaries()
            ]
        else:
            where = client.connection_pool.connection_kwargs
            primaries = [(f"{where['host']}:{where['port']}", await client.info("replication"))]
        short = [(name, _connected_replicas(info)) for name, info in primaries]
        short = [(name, count) for name, count in short if count < wanted]
        if not short:
            return None
        have = ", ".join(f"{name} has {count}" for name, count in short)
        return (
            f"REDIS_WAIT_REPLICAS={wanted}, but a primary has fewer connected replicas ({have}): "
            f"every dispatch would wait REDIS_WAIT_TIMEOUT and fail (NotReplicatedError); "
            "lower REDIS_WAIT_REPLICAS or add replicas"
        )

    async def _connect_failure(self, client: Any, exc: BaseException) -> Exception | None:
        """What a failure to connect means in terms of the settings (see redis_connect.py):
        `rediss://` that cannot be TLS, REDIS_CLUSTER_NODES at a non-cluster Redis, the
        sentinels refusing REDIS_SENTINEL_PASSWORD, not knowing REDIS_SENTINEL_MASTER or all
        down. `None`: nothing to add to `exc`."""
        if not isinstance(exc, Exception):
            return None  # cancelled
        topology = self.topology
        if topology == "cluster":
            return cluster_failure(redis_nodes(self.settings.redis_cluster_nodes or ""), exc)
        if topology == "sentinel":
            master = self.settings.redis_sentinel_master or ""
            secret = self.settings.redis_sentinel_password is not None
            return await sentinel_failure(self._sentinel, master, password=secret)
        if isinstance(exc, RedisError | OSError):  # rediss:// that cannot be TLS: stop
            where = client.connection_pool.connection_kwargs
            dsn = self.settings.redis_dsn
            return await redis_tls_failure(dsn, where["host"], where["port"], exc)
        return None

    async def close(self) -> None:
        blocked = list(self._blocked.values())
        self._blocked.clear()
        for task in blocked:
            task.cancel()
        await asyncio.gather(*blocked, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None:  # its own connections to the sentinels
            for watcher in sentinel.sentinels:
                with contextlib.suppress(RedisError, OSError):
                    await watcher.aclose()

    # -- primitives --------------------------------------------------------------------

    async def _scripts_run(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run Lua scripts: one directly, several in one pipelined round trip.

        The pipeline sends bare EVALSHAs (as raw commands: redis-py's cluster pipeline refuses
        its `evalsha` method, not the command, which it routes by the script's keys, each call
        one slot): redis-py's script-aware pipelines ask SCRIPT EXISTS before every batch, a
        second round trip each time. A server that lost its scripts (a restart; on a cluster
        also a replica promoted by a failover: Redis does not replicate its script cache)
        answers NOSCRIPT without running anything; then the scripts are loaded (SCRIPT LOAD
        goes to every primary of a cluster) and only the calls answered NOSCRIPT are sent
        again: the others ran, maybe on another node, and must not run twice.
        """
        if len(calls) == 1:
            name, keys, args = calls[0]
            return [await self._scripts[name](keys=keys, args=args)]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in (1, 2):
            async with self.pipeline() as pipe:
                for i in todo:
                    name, keys, args = calls[i]
                    sha = self._scripts[name].sha
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
                for reply in replies:
                    if isinstance(reply, RedisConnectionError | RedisTimeoutError):
                        raise reply  # inside: the cluster client then refreshes its map
            for i, reply in zip(todo, replies, strict=True):
                results[i] = reply
            missing = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not missing or attempt == 2:
                break
            for name in {calls[i][0] for i in missing}:
                await self.client.script_load(self._scripts[name].script)
            todo = missing
        for reply in results:
            if isinstance(reply, BaseException):
                raise reply
        return results

    def _ms(self, seconds: float) -> int:
        return max(0, int(seconds * 1000))

    async def _remember(self, names: Sequence[str]) -> None:
        """Add queues to the list the stats command shows (once per queue and process)."""
        new = [name for name in names if name not in self._known_queues]
        if new:
            await self.client.sadd(f"{self.prefix}:queues", *new)
            self._known_queues.update(new)

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        # Per script call: its option sets (jobs of one bulk push usually share theirs: sent
        # once), then per job (id, payload, option set number, dependencies). See push.lua.
        # Without dependencies the jobs of a queue go in one call per queue; with them, each
        # run of consecutive jobs of one queue is a call, in order, so that a dependency pushed
        # earlier in the same push is stored before its dependents (one round trip still).
        linked = any(job.depends_on or job.kind != "job" for job in jobs)
        places = await self._dependency_queues(jobs) if linked else {}
        missing: dict[int, str] = {}  # cluster: a dependency in another queue is unknown
        if linked and self.cluster:
            async with _translated("finding dependencies"):
                missing = await missing_dependencies(self, jobs, places)
        runs: list[tuple[str, dict[tuple[Any, ...], int], list[Any], list[int]]] = []
        by_queue: dict[str, int] = {}
        for index, job in enumerate(jobs):
            if index in missing:
                continue
            if linked:
                if not runs or runs[-1][0] != job.queue:
                    runs.append((job.queue, {}, [], []))
                run = runs[-1]
            else:
                at = by_queue.get(job.queue)
                if at is None:
                    at = by_queue[job.queue] = len(runs)
                    runs.append((job.queue, {}, [], []))
                run = runs[at]
            name, sets, rows, slots = run
            number = sets.setdefault(self._push_options(job), len(sets) + 1)
            rows.extend((job.id, job.payload, number, job.group, len(job.depends_on)))
            for dep in job.depends_on:
                queue = dep.queue or places.get(dep.id) or job.queue
                rows.extend((self.keys(queue).tag, dep.id))
            slots.append(index)
        calls = []
        result_ms = self._ms(self.settings.queue_result_ttl)
        for name, sets, rows, _ in runs:
            k = self.keys(name)
            keys = [k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved, k.front]
            args = [k.tag, result_ms, name, len(sets), *chain.from_iterable(sets), *rows]
            calls.append(("push", keys, args))
        async with _translated("push"):
            await self._remember(list(dict.fromkeys(job.queue for job in jobs)))
            if self.settings.redis_wait_replicas:  # WAIT in the same pipeline
                replies = await push_replicated(self, calls, jobs)
            else:
                replies = await self._scripts_run(calls) if calls else []
        if self.cluster:  # the relay: cross-queue subscriptions (redis_relay.py)
            box = Outboxes()
            tags = [self.keys(run[0]).tag for run in runs]
            replies = [box.take(tag, r) for tag, r in zip(tags, replies, strict=True)]
            await deliver(self, box)
        out: list[Pushed | None] = [None] * len(jobs)
        for index, dep_id in missing.items():
            out[index] = Pushed(dep_id, "missing")
        for (_, _, _, slots), reply in zip(runs, replies, strict=True):
            for n, index in enumerate(slots):
                out[index] = Pushed(_text(reply[2 * n + 1]), _text(reply[2 * n]))  # type: ignore[arg-type]
        return [pushed for pushed in out if pushed is not None]

    def _push_options(self, job: OutgoingJob) -> tuple[Any, ...]:
        """The job's option set, in push.lua's order."""
        limit = job.limit
        return (
            self._ms(job.delay),
            job.job,
            "" if job.max_tries is None else job.max_tries,
            1 if job.at_front else 0,
            1 if job.check_id else 0,
            job.unique_key,
            self._ms(job.unique_for),
            job.on_duplicate,
            self._ms(job.ttl),
            self._ms(job.failure_ttl),
            job.priority,
            job.rule,
            job.kind,
            1 if job.cancel_on_failure else 0,
            0 if limit is None else 1,
            "" if limit is None else limit.key,
            0 if limit is None else repr(limit.interval * 1000),
            1 if limit is None else max(1, limit.burst),
            0 if limit is None else limit.concurrency,
            job.once_key,
            self._ms(job.once_for),
            max(0, job.max_length),
            job.overflow,
        )

    async def _dependency_queues(self, jobs: Sequence[OutgoingJob]) -> dict[str, str]:
        """The queue of each dependency named without one: a job pushed earlier in the same
        call, else the known queue holding a record (or payload) of that id, the dependent's
        own queue first (one pipelined round trip). Not found: left out (push.lua then says
        "missing" on the dependent's queue)."""
        places: dict[str, str] = {}
        unknown: dict[str, str] = {}  # dependency id -> the dependent's queue
        for job in jobs:
            for dep in job.depends_on:
                if dep.queue is None and dep.id not in places:
                    unknown.setdefault(dep.id, job.queue)
            places.setdefault(job.id, job.queue)
        if not unknown:
            return places
        ask = {dep_id: queue for dep_id, queue in unknown.items() if dep_id not in places}
        if not ask:
            return places
        async with _translated("finding dependencies"):
            names = await self.queues()
            candidates = [
                (dep_id, [own, *(n for n in names if n != own)]) for dep_id, own in ask.items()
            ]
            async with self.pipeline() as pipe:
                for dep_id, order in candidates:
                    for name in order:
                        k = self.keys(name)
                        pipe.exists(k.record(dep_id))
                        pipe.hexists(k.payloads, dep_id)
                found = iter(await pipe.execute())
        for dep_id, order in candidates:
            for name in order:
                has_record, has_payload = next(found), next(found)
                if (has_record or has_payload) and dep_id not in places:
                    places[dep_id] = name
        return places

    def _ack_args(self, jobs: Sequence[ReservedJob]) -> list[Any]:
        """The outcome count, the outcomes, then (id, token, outcome number) per job (ack.lua):
        jobs that ended alike without a result share one outcome, sent once.

        An outcome with `info` (issue #16) makes every outcome of the call carry a sixth
        field (its info, b"" for none), told by a negative count; without any, the arguments
        are those of before."""
        outcomes: dict[tuple[Any, ...], int] = {}
        rows: list[Any] = []
        default = (Status.SUCCEEDED.value, self._ms(self.settings.queue_result_ttl), b"", "", "")
        wide = False
        for job in jobs:
            o = job.outcome
            key: tuple[Any, ...] = (
                default
                if o is None
                else (o.status.value, self._ms(o.keep), o.result or b"", o.error, o.traceback)
            )
            if o is not None and o.info is not None:
                key = (*key, o.info)
                wide = True
            rows += (job.id, job.attempts, outcomes.setdefault(key, len(outcomes) + 1))
        if not wide:
            return [len(outcomes), *chain.from_iterable(outcomes), *rows]
        sixes = (key if len(key) == 6 else (*key, b"") for key in outcomes)
        return [-len(outcomes), *chain.from_iterable(sixes), *rows]

    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
        *,
        worker: str = "",
    ) -> list[ReservedJob]:
        acks = _by_queue(ack)
        out: list[ReservedJob] = []
        lease_ms = max(1, int(lease * 1000))
        failure_ms = self._ms(self.settings.queue_failure_ttl)
        box = Outboxes()  # cluster: cross-queue messages of these calls (redis_relay.py)
        async with _translated("reserve"):
            runnable = 0
            for name in queues:
                want = limit - runnable
                if want <= 0 and name not in acks:
                    break
                k = self.keys(name)
                mine = acks.pop(name, ())
                args: list[Any] = [max(0, want), lease_ms, worker, k.tag, failure_ms, len(mine)]
                args += self._ack_args(mine)
                # The script may have run even if its reply is lost (the server crashed before
                # answering): the next call names this token to get those jobs back unspent.
                token = str(next(self._grants))
                unanswered = self._unanswered.get(name, [])
                args += (self._reserver, token, *unanswered)
                try:
                    reply = await self._scripts["reserve"](
                        keys=[
                            k.ready,
                            k.delayed,
                            k.reserved,
                            k.payloads,
                            k.attempts,
                            k.wake,
                            k.front,
                            k.cancel,
                        ],
                        args=args,
                    )
                except BaseException:
                    self._unanswered[name] = [*unanswered, token][-_UNANSWERED_KEPT:]
                    raise
                if unanswered:
                    del self._unanswered[name]
                if self.cluster:
                    reply = box.take(k.tag, reply)
                next_ms = int(reply[0])
                if next_ms:
                    self._next_due[name] = (
                        time.monotonic() + next_ms / 1000 if next_ms > 0 else float("inf")
                    )
                for i in range(1, len(reply), 3):
                    job_id: bytes = reply[i]
                    attempts = int(reply[i + 2])
                    if attempts < 0:  # expired by this call (reserve.lua): only reported
                        out.append(
                            ReservedJob(
                                job_id.decode(), name, reply[i + 1], -1 - attempts, expired=True
                            )
                        )
                    else:
                        out.append(ReservedJob(job_id.decode(), name, reply[i + 1], attempts))
                        runnable += 1
            if acks:
                await self._ack_groups(acks, box)
        await deliver(self, box)
        return out

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        now = time.monotonic()
        for name in queues:
            timeout = min(timeout, self._next_due.get(name, now + timeout) - now)
        if timeout < 0.001:
            return
        wake = [self.keys(name).wake for name in queues]
        async with _translated("waiting for jobs"):
            groups = _by_slot(wake) if self.cluster else [wake]
            if len(groups) > 1:
                await self._wait_slots(groups, timeout)
                return
            # In slices of at most `_BLPOP_MAX`: a longer BLPOP would outlast the client's
            # socket timeout and fail as a lost connection.
            end = now + timeout
            while True:
                block = min(end - time.monotonic(), _BLPOP_MAX)
                if block < 0.001 or await self.client.blpop(wake, timeout=block) is not None:
                    return

    async def _wait_slots(self, groups: list[list[str]], timeout: float) -> None:
        """On a cluster, queues in different slots: one BLPOP per slot, blocked at once (each
        on a connection of its own to its slot's primary); the first to return ends the wait.
        Past `_BLOCKED_SLOTS` slots (connections run out: redis-py's cluster client has 100
        per node), the further slots' wake keys are polled every `_POLL_EVERY` s meanwhile.

        The BLPOPs are not cancelled: a cancelled BLPOP's connection is closed, and a push
        reaching the server before it learns of the close hands its wake token to that dead
        connection, lost to every worker. They stay blocked for the next call, which takes
        over each of them still pending (or one that took a token meanwhile: that call returns
        at once); one that timed out empty is started again. `close` cancels what is left. An
        error of a BLPOP is raised by the call that sees it."""
        blocked = self._blocked
        loop = asyncio.get_running_loop()
        polled = groups[_BLOCKED_SLOTS:]
        wanted = {tuple(keys) for keys in groups[:_BLOCKED_SLOTS]}
        for keys, old in list(blocked.items()):
            stale = old.get_loop() is not loop
            if stale or (old.done() and (keys not in wanted or _empty_wait(old))):
                del blocked[keys]
        client = self.client
        deadline = loop.time() + timeout
        done: set[asyncio.Future[Any]] = set()
        while True:
            tasks = []
            for keys in wanted:
                task = blocked.get(keys)
                if task is None:
                    blpop = client.blpop(keys, timeout=min(timeout, _BLPOP_MAX))
                    task = blocked[keys] = asyncio.ensure_future(blpop)
                    task.add_done_callback(_retrieved)
                tasks.append(task)
            left = deadline - loop.time()
            if left <= 0:
                break
            done, _ = await asyncio.wait(
                tasks,
                timeout=min(left, _POLL_EVERY) if polled else left,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if done and all(map(_timed_out, done)) and deadline - loop.time() > 0.01:
                # Empty after `_BLPOP_MAX`, with time left: blocked again.
                for keys in wanted:
                    if blocked[keys] in done:
                        del blocked[keys]
                done = set()
            if done or (polled and await self._poll_wake(polled)):
                break
            if not polled and loop.time() >= deadline:
                break
        for keys in wanted:
            if blocked[keys] in done:
                del blocked[keys]
        errors = [task.exception() for task in done if not task.cancelled()]
        for error in errors:
            if error is not None:
                raise error

    async def _poll_wake(self, groups: list[list[str]]) -> bool:
        """Whether a wake key of `groups` (each one slot's) held a token, one taken."""
        async with self.pipeline(transaction=False) as pipe:
            for keys in groups:
                pipe.exists(*keys)
            counts = await pipe.execute()
        for keys, count in zip(groups, counts, strict=True):
            if count:
                for key in keys:
                    if await self.client.lpop(key) is not None:
                        return True
        return False

    async def _ack_groups(
        self, groups: dict[str, Sequence[ReservedJob]], box: Outboxes | None = None
    ) -> None:
        """ack.lua per queue. On a cluster the messages the acks appended (ends reaching
        other queues) go to `box`, else they are delivered here (redis_relay.py)."""
        calls = []
        for name, jobs in groups.items():
            k = self.keys(name)
            args = [k.tag, *self._ack_args(jobs)]
            calls.append(("ack", [k.reserved, k.payloads, k.attempts], args))
        replies = await self._scripts_run(calls)
        if self.cluster:
            mine = Outboxes() if box is None else box
            for name, reply in zip(groups, replies, strict=True):
                mine.take(self.keys(name).tag, reply)
            if box is None:
                await deliver(self, mine)

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        if jobs:
            async with _translated("ack"):
                await self._ack_groups(_by_queue(jobs))

    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        k = self.keys(job.queue)
        async with _translated("release"):
            done = await self._scripts["release"](
                keys=[k.ready, k.delayed, k.reserved, k.attempts, k.wake, k.payloads, k.cancel],
                args=[
                    job.id,
                    job.attempts,
                    int(delay * 1000),
                    1 if refund else 0,
                    k.tag,
                    error,
                    self._ms(self.settings.queue_failure_ttl),
                ],
            )
        await relayed(self, k.tag, done)  # a cancelled job's dependents in other queues

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

    async def save_payload(self, job: ReservedJob, payload: bytes) -> bool:
        """save_payload.lua: HSET of the payload while the caller's try holds the job (its
        attempts token, and the id in the reserved set): one round trip."""
        k = self.keys(job.queue)
        async with _translated("saving a payload"):
            done = await self._scripts["save_payload"](
                keys=[k.reserved, k.payloads, k.attempts], args=[job.id, job.attempts, payload]
            )
        return bool(int(done))

    async def stats(self, queue: str) -> QueueStats:
        k = self.keys(queue)
        async with _translated("stats"):
            pending, delayed, reserved, deferred = await self._scripts["stats"](
                keys=[k.ready, k.delayed, k.reserved], args=[k.tag]
            )
        return QueueStats(
            self.name,
            queue,
            int(pending),
            int(delayed),
            int(reserved),
            0,
            deferred=int(deferred),
        )

    async def queues(self) -> list[str]:
        async with _translated("listing queues"):
            names: set[bytes] = await self.client.smembers(f"{self.prefix}:queues")  # type: ignore[assignment]
        return sorted(name.decode() for name in names)

    async def clear(self, queue: str) -> int:
        k = self.keys(queue)
        async with _translated("clear"):
            deleted = await self._scripts["clear"](
                keys=[k.ready, k.delayed, k.payloads, k.attempts, k.wake, k.front], args=[k.tag]
            )
        return int(await relayed(self, k.tag, deleted))

    async def prune_records(self, ended_before: float | None = None) -> int:
        """Records expire by themselves (PEXPIRE): without `ended_before`, nothing to do.

        With it, per known queue: SCAN its `<tag>:job:*` keys (the queue's hash tag, so every
        page is one slot) and, per page, prune.lua deletes those ended before the cutoff,
        reading each record again (a job pushed again under the id since is kept)."""
        if ended_before is None:
            return 0
        if isinstance(ended_before, bool) or not isinstance(ended_before, int | float):
            raise TypeError(f"ended_before must be epoch seconds, got {ended_before!r}")
        if math.isnan(ended_before):
            raise ValueError("ended_before must be epoch seconds, got nan")
        cutoff = repr(float(ended_before) * 1000)
        deleted = 0
        async with _translated("pruning job records"):
            for name in await self.queues():
                k = self.keys(name)
                pattern = _glob_escape(k.record("")) + "*"
                # On a cluster, SCAN goes to the primary holding the queue's slot.
                client = self.client
                node = client.get_node_from_key(k.tag) if isinstance(client, RedisCluster) else None
                async for page in _scan_pages(client, pattern, _PRUNE_PAGE, node):
                    deleted += int(await self._scripts["prune"](keys=page, args=[k.tag, cutoff]))
        return deleted

    def failed_store(self) -> FailedStore:
        return self._failed

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        if self.cluster:  # the store and the queues are in different slots (redis_relay.py)
            return await retry_failed_cluster(self, records)
        groups: dict[str, list[Any]] = {}
        for record in records:
            if record.connection == self.name:
                args = groups.get(record.queue)
                if args is None:
                    args = groups[record.queue] = [self.keys(record.queue).tag]
                job_class = record.job_class
                args += (
                    record.id,
                    record.record_id,
                    record.payload.encode(),
                    "" if job_class == "?" else job_class,
                )
        moved: list[str] = []
        async with _translated("retrying failed jobs"):
            await self._remember(list(groups))
            for name, args in groups.items():
                k = self.keys(name)
                keys = [k.ready, k.delayed, k.payloads, k.wake, k.attempts, k.reserved]
                ids = await self._scripts["retry_failed"](
                    keys=self._failed.keys(name) + keys, args=args
                )
                moved += [job_id.decode() for job_id in ids]
        return moved

    # -- single jobs -------------------------------------------------------------------

    async def _status_reply(
        self, queue: str, job_id: str, mark_ms: int = 0, token_back: bool = False
    ) -> JobStatus | None:
        k = self.keys(queue)
        reply = await self._scripts["status"](
            keys=k.status_keys(), args=[job_id, k.tag, mark_ms, 1 if token_back else 0]
        )
        return self._decode_status(job_id, queue, reply)

    def _decode_status(self, job_id: str, queue: str, reply: Sequence[Any]) -> JobStatus | None:
        """A `JobStatus` from status.lua's reply: the record, corrected by where the job is."""
        now_ms, payload, attempts_raw, lease, due, waiting_for = reply[:6]
        rec = {_text(reply[i]): reply[i + 1] for i in range(6, len(reply), 2)}
        if not rec and payload is None:
            return None
        stored = _text(rec.get("status", b""))
        attempts = int(attempts_raw if attempts_raw is not None else rec.get("attempts", 0))
        fields: dict[str, Any] = {
            "job": _text(rec.get("job", b"")),
            "max_tries": _int(rec.get("max_tries")),
            "enqueued_at": _seconds(rec.get("enqueued_at")),
            "due_at": _seconds(rec.get("due_at")),
            "started_at": _seconds(rec.get("started_at")),
            "ended_at": _seconds(rec.get("ended_at")),
            "worker": _text(rec.get("worker", b"")),
            "error": _text(rec.get("error", b"")),
            "traceback": _text(rec.get("traceback", b"")),
            "result": rec.get("result"),
        }
        if payload:  # no class path in the record: a job pushed by wave-1 code
            envelope = _envelope(payload)
            fields["job"] = fields["job"] or str(envelope.get("job", ""))
            if fields["max_tries"] is None:
                fields["max_tries"] = _int(envelope.get("max_tries"))
            if fields["enqueued_at"] is None:
                fields["enqueued_at"] = _seconds(envelope.get("created_at"))
        kind = _text(rec.get("kind", b"job"))
        extra: dict[str, Any] = {
            "priority": _int(rec.get("priority")) or 0,
            "group": _text(rec.get("group", b"")),
            **_info(rec.get("info")),
        }
        if kind in ("chain", "batch"):
            extra["kind"] = kind
            extra["progress"] = _progress(rec)
        if stored == "deferred" and (payload is not None or kind != "job"):
            status = Status.DEFERRED
            fields["due_at"] = None
            extra["waiting_for"] = tuple(_text(w) for w in waiting_for or ())
        elif stored in ENDED or payload is None:
            # Ended; or gone without a word (acknowledged by a wave-1 worker): as recorded.
            status = Status(stored) if stored in Status.__members__.values() else Status.QUEUED
        elif lease is not None:
            status = Status.RUNNING
        else:
            if due is not None:
                fields["due_at"] = float(due) / 1000
                if stored == "retrying":
                    status = Status.RETRYING
                elif float(due) > int(now_ms):
                    status = Status.SCHEDULED
                else:
                    status = Status.QUEUED  # due: ready, whether or not a reserve moved it yet
            elif stored in ("retrying", "running"):
                status = Status.RETRYING  # a failed try, or its worker was lost
            else:
                status = Status.QUEUED
            if not rec and attempts > 0:
                status = Status.RETRYING
            expires = _int(rec.get("expires_at"))
            if expires is not None and attempts == 0 and int(now_ms) >= expires:
                status = Status.EXPIRED  # not reaped by a worker yet
                fields["ended_at"] = expires / 1000
                ttl = expires / 1000 - (fields["due_at"] or expires / 1000)
                fields["error"] = f"not started within its ttl of {ttl:g}s"
        return JobStatus(
            id=job_id,
            status=status,
            connection=self.name,
            queue=queue,
            attempts=attempts,
            **fields,
            **extra,
        )

    async def _find(self, job_id: str) -> JobStatus | None:
        """The job's record on whichever known queue has it (one pipelined round trip)."""
        names = await self.queues()
        if not names:
            return None
        calls = []
        for name in names:
            k = self.keys(name)
            calls.append(("status", k.status_keys(), [job_id, k.tag, 0, 0]))
        replies = await self._scripts_run(calls)
        found = [
            record
            for name, reply in zip(names, replies, strict=True)
            if (record := self._decode_status(job_id, name, reply)) is not None
        ]
        if not found:
            return None
        # The same id on several queues: the live one, else the latest.
        return max(
            found, key=lambda r: (r.status not in ENDED, r.ended_at or 0.0, r.enqueued_at or 0.0)
        )

    async def job_status(self, job_id: str, queue: str | None = None) -> JobStatus | None:
        async with _translated("reading a job's status"):
            if queue is None:
                return await self._find(job_id)
            return await self._status_reply(queue, job_id)

    async def job_payload(self, job_id: str, queue: str | None = None) -> bytes | None:
        """`HGET <tag>:payloads <id>` (the job's queue given); else the same for every known
        queue with the record's `enqueued_at` beside it, in one pipeline, each command on one
        queue's keys (its Cluster slot), the latest push kept, as `_find` would choose."""
        async with _translated("reading a job's payload"):
            if queue is not None:
                raw = await self.client.hget(self.keys(queue).payloads, job_id)
                return raw.encode() if isinstance(raw, str) else raw
            names = await self.queues()
            if not names:
                return None
            async with self.pipeline() as pipe:
                for name in names:
                    k = self.keys(name)
                    pipe.hget(k.payloads, job_id)
                    pipe.hget(k.record(job_id), "enqueued_at")
                replies = await pipe.execute()
        found = [
            (float(replies[i + 1] or 0), replies[i])
            for i in range(0, len(replies), 2)
            if replies[i] is not None
        ]
        return bytes(max(found, key=lambda pair: pair[0])[1]) if found else None

    async def wait_ended(self, job_id: str, queue: str | None, timeout: float) -> JobStatus | None:
        """Block on the server: the scripts that end a job push a token to its `done` list
        when a waiter has marked itself (status.lua does, with each read of the record).

        The waiter reads the record again at least every second, so a lost token costs at
        most that; a token taken is pushed back for other waiters of the same job.
        """
        deadline = time.monotonic() + timeout
        if queue is None:
            record = await self.job_status(job_id)
            if record is None or record.status in ENDED or timeout <= 0:
                return record
            queue = record.queue
        done = self.keys(queue).done(job_id)
        token = False
        async with _translated("waiting for a job to end"):
            while True:
                left = deadline - time.monotonic()
                pause = min(_WAIT_SLICE, left)
                mark = int(max(pause, 0) * 1000) + _WAITER_MARGIN_MS
                record = await self._status_reply(queue, job_id, mark, token)
                _raise_if_cancelled()
                if record is None or record.status in ENDED or pause < 0.001:
                    return record
                token = await self.client.blpop([done], timeout=pause) is not None
                _raise_if_cancelled()

    async def cancel(self, job_id: str, queue: str | None = None) -> bool:
        if queue is None:
            record = await self.job_status(job_id)
            if record is None or record.status in ENDED:
                return False
            queue = record.queue
        k = self.keys(queue)
        async with _translated("cancelling a job"):
            done = await self._scripts["cancel"](
                keys=[k.ready, k.delayed, k.reserved, k.payloads, k.attempts, k.front, k.cancel],
                args=[job_id, k.tag, self._ms(self.settings.queue_failure_ttl)],
            )
        return int(await relayed(self, k.tag, done)) > 0

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        groups = _by_queue(jobs)
        if not groups:
            return []
        async with _translated("reading cancel requests"):
            if len(groups) == 1:
                [(name, held)] = groups.items()
                flags: list[Any] = [
                    await self.client.smismember(self.keys(name).cancel, [j.id for j in held])
                ]
            else:
                async with self.pipeline() as pipe:
                    for name, held in groups.items():
                        pipe.smismember(self.keys(name).cancel, [j.id for j in held])
                    flags = await pipe.execute()
        _raise_if_cancelled()
        return [
            job.id
            for held, marks in zip(groups.values(), flags, strict=True)
            for job, mark in zip(held, marks, strict=True)
            if int(mark)
        ]

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        k = self.keys(queue)
        minutes = max(1, math.ceil(window / 60))
        async with _translated("reading recent counts"):
            counts = await self._scripts["recent"](keys=[k.counts], args=[minutes])
        succeeded, failed, cancelled, expired, coalesced, dropped, rejected = map(int, counts)
        return RecentCounts(
            window, succeeded, failed, cancelled, expired, coalesced, dropped, rejected
        )

    # -- observing (the dashboard, metrics) -----------------------------------------------
    # Every call keeps to the queue's slot: one script (or pipelined commands) per queue, each
    # touching only keys under the queue's tag (history.lua, browse.lua, groups.lua headers).

    async def history(self, queue: str, minutes: int = 60) -> list[MinuteCounts]:
        """Read from the `<tag>:counts:<minute>` hashes the scripts ending jobs write (and
        `add_history` adds to), minutes of the server's clock."""
        _check_count("minutes", minutes, least=1)
        k = self.keys(queue)
        read = min(minutes, _HISTORY_READ)
        async with _translated("reading the history"):
            reply = await self._scripts["history"](keys=[k.counts], args=[read, *_MINUTE_FIELDS])
        current, values = int(reply[0]), [int(v) for v in reply[1:]]
        width = len(_MINUTE_FIELDS)
        first = current - minutes + 1
        out = [MinuteCounts(m) for m in range(first, current - read + 1)]
        for i in range(read):
            row = values[i * width : (i + 1) * width]
            out.append(MinuteCounts(current - read + 1 + i, *row))
        return out

    async def add_history(self, rows: Sequence[tuple[str, int, Mapping[str, int]]]) -> None:
        """HINCRBY into the same per-minute hashes as the ends (EXPIRE kept: three hours past
        the last write), pipelined: one round trip, every command on one key of its queue's
        slot."""
        sums = _history_sums(rows)
        if not sums:
            return
        async with (
            _translated("adding to the history"),
            self.pipeline() as pipe,
        ):
            for (queue, minute), fields in sums.items():
                key = f"{self.keys(queue).counts}:{minute}"
                for name, n in fields.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, _COUNTS_KEEP)
            await pipe.execute()

    async def browse(
        self, queue: str, state: BrowseState, offset: int = 0, limit: int = 50
    ) -> list[JobStatus]:
        """One script reads the page's ids in the state's order (browse.lua: O(offset + limit)
        but for `deferred`, a set it sorts) and their records: one round trip."""
        if state not in _BROWSE_STATES:
            raise ValueError(
                f"unknown state {state!r}: expected one of {', '.join(_BROWSE_STATES)}"
            )
        _check_count("offset", offset, least=0)
        _check_count("limit", limit, least=0)
        if limit == 0:
            return []
        k = self.keys(queue)
        async with _translated("browsing jobs"):
            replies = await self._scripts["browse"](
                keys=[k.ready], args=[k.tag, state, offset, limit]
            )
        found = (
            self._decode_status(_text(replies[i]), queue, replies[i + 1])
            for i in range(0, len(replies), 2)
        )
        return [record for record in found if record is not None]

    async def groups(self, queue: str, offset: int = 0, limit: int = 100) -> list[GroupInfo]:
        """From the turn hash (group -> holder) and the lines' lengths: groups.lua, O(groups)
        for the names it sorts."""
        _check_count("offset", offset, least=0)
        _check_count("limit", limit, least=0)
        if limit == 0:
            return []
        k = self.keys(queue)
        async with _translated("listing groups"):
            reply = await self._scripts["groups"](keys=[k.gturn], args=[k.tag, offset, limit])
        return [
            GroupInfo(_text(reply[i]), _text(reply[i + 1]), int(reply[i + 2]))
            for i in range(0, len(reply), 3)
        ]

    # -- small named values ------------------------------------------------------------

    async def paused(self, queues: Sequence[str]) -> set[str]:
        """One round trip: a pipeline of GETs (one key per command, so it works on a cluster),
        not one request per queue."""
        if not queues:
            return set()
        async with (
            _translated("reading pause markers"),
            self.pipeline() as pipe,
        ):
            for queue in queues:
                pipe.get(f"{self.prefix}:marker:{pause_marker(queue)}")
            values = await pipe.execute()
        return {
            q
            for q, raw in zip(queues, values, strict=True)
            if raw is not None and _text(raw) == "1"
        }

    async def get_marker(self, name: str) -> str | None:
        async with _translated("reading a marker"):
            raw = await self.client.get(f"{self.prefix}:marker:{name}")
        return None if raw is None else _text(raw)

    async def set_marker(self, name: str, value: str, ttl: float) -> None:
        async with _translated("writing a marker"):
            await self.client.set(f"{self.prefix}:marker:{name}", value, px=max(1, int(ttl * 1000)))

    async def claim_marker(self, name: str, value: str, ttl: float) -> bool:
        """SET NX PX on the key `set_marker` writes: one command on one key (no hash tag
        needed on a cluster), so the server decides the race; an expired key is gone."""
        if not 0 < ttl < math.inf:
            raise ValueError(f"claim_marker {name!r}: ttl must be a positive number, not {ttl!r}")
        async with _translated("claiming a marker"):
            stored = await self.client.set(
                f"{self.prefix}:marker:{name}", value, px=max(1, int(ttl * 1000)), nx=True
            )
        return bool(stored)

    async def set_markers(self, items: Sequence[tuple[str, str, float]]) -> None:
        """One round trip: a pipeline (no transaction) of SET PX on the keys `set_marker`
        writes. The keys carry no hash tag, so on a cluster they spread over slots; the
        cluster pipeline sends each primary its own commands. A name given twice is written
        once, with its last value (the order of the items decides, not the order of nodes)."""
        check_marker_items(items)
        latest = {name: (value, ttl) for name, value, ttl in items}
        if not latest:
            return
        async with (
            _translated("writing markers"),
            self.pipeline(transaction=False) as pipe,
        ):
            for name, (value, ttl) in latest.items():
                pipe.set(f"{self.prefix}:marker:{name}", value, px=max(1, int(ttl * 1000)))
            await pipe.execute()

    async def get_markers(self, names: Sequence[str]) -> list[str | None]:
        """One round trip: a pipeline of GETs, one key per command (cluster-safe, as `paused`)."""
        if not names:
            return []
        async with (
            _translated("reading markers"),
            self.pipeline(transaction=False) as pipe,
        ):
            for name in names:
                pipe.get(f"{self.prefix}:marker:{name}")
            values = await pipe.execute()
        return [None if raw is None else _text(raw) for raw in values]

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

    async def sweep(self) -> None:
        """On a cluster, every `_SWEEP_EVERY` s at most: deliver what a dead worker left in the
        relay's outboxes of any known queue (redis_relay.py `sweep_outboxes`); a queue that
        gets no script again would keep it forever. Nothing on one server (no outboxes)."""
        if not self.cluster or time.monotonic() < self._sweep_due:
            return
        self._sweep_due = time.monotonic() + _SWEEP_EVERY
        async with _translated("sweeping the relay's outboxes"):
            await sweep_outboxes(self)

    async def remove_worker(self, worker_id: str) -> None:
        index, key = self._registry_keys(worker_id)
        async with (
            _translated("removing a worker"),
            self.pipeline(transaction=True) as pipe,
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


_BROWSE_STATES: tuple[str, ...] = ("pending", "delayed", "reserved", "deferred")


def _check_count(name: str, value: int, *, least: int) -> None:
    """A count argument (`minutes`, `offset`, `limit`): an int of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")


def _history_sums(
    rows: Sequence[tuple[str, int, Mapping[str, int]]],
) -> dict[tuple[str, int], dict[str, int]]:
    """`add_history`'s rows summed per (queue, minute), `HISTORY_FIELDS` only, zeros left out;
    a row that is not (queue name, minute, counts) raises naming it."""
    sums: dict[tuple[str, int], dict[str, int]] = {}
    for row in rows:
        try:
            queue, minute, counts = row
        except (TypeError, ValueError):
            raise ValueError(f"a history row is (queue, minute, counts), got {row!r}") from None
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"a history row's queue must be a non-empty name, got {queue!r}")
        if isinstance(minute, bool) or not isinstance(minute, int):
            raise ValueError(f"a history row's minute must be an integer, got {minute!r}")
        for name in HISTORY_FIELDS:
            n = counts.get(name, 0)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(
                    f"history field {name!r} of queue {queue!r} must be a count (an integer of "
                    f"at least 0), got {n!r}"
                )
            if n:
                fields = sums.setdefault((queue, minute), {})
                fields[name] = fields.get(name, 0) + n
    return sums


async def _scan_pages(
    client: Any, pattern: str, count: int, node: Any = None
) -> AsyncIterator[list[Any]]:
    """The keys matching `pattern`, a SCAN page at a time (pages without a match skipped);
    on a cluster, of the one `node` (its client's reply is then per node)."""
    cursor: int = 0
    while True:
        if node is None:
            cursor, keys = await client.scan(cursor, match=pattern, count=count)
        else:
            cursors, keys = await client.scan(cursor, match=pattern, count=count, target_nodes=node)
            cursor = int(next(iter(cursors.values())))
        if keys:
            yield list(keys)
        if not cursor:
            return


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern (a queue name may hold `*`, `?` or `[`)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _info(raw: Any) -> dict[str, Any]:
    """A record's `info` field (ack's outcome info: a JSON object of `description` and
    `meta`) as `JobStatus` fields; anything else in it, or not JSON, reads as none."""
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    description, meta = data.get("description"), data.get("meta")
    if isinstance(description, str):
        out["description"] = description
    if isinstance(meta, dict):
        out["meta"] = meta
    return out


def _progress(rec: dict[str, Any]) -> Progress:
    """A workflow record's member counts (lib.lua: p_total, p_succeeded, ...)."""
    total = _int(rec.get("p_total")) or 0
    succeeded = _int(rec.get("p_succeeded")) or 0
    failed = _int(rec.get("p_failed")) or 0
    cancelled = _int(rec.get("p_cancelled")) or 0
    pending = max(0, total - succeeded - failed - cancelled)
    return Progress(total, pending, succeeded, failed, cancelled)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int(value: Any) -> int | None:
    """An integer field of a record or payload (`None` when absent, empty or not a number)."""
    if value is None or value in (b"", ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _seconds(value: Any) -> float | None:
    """A time in ms since the epoch, in seconds (`None` when absent)."""
    ms = _int(value)
    return None if ms is None else ms / 1000


def _connected_replicas(info: Any) -> int:
    """`connected_slaves` of an INFO replication reply (parsed; on a cluster, maybe keyed by
    node name)."""
    if isinstance(info, dict) and "connected_slaves" not in info and len(info) == 1:
        info = next(iter(info.values()))
    if isinstance(info, dict):
        return int(info.get("connected_slaves", 0))
    return 0


def _envelope(payload: bytes) -> dict[str, Any]:
    """The payload's JSON object, or an empty one: a status read never fails on a payload."""
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A finished BLPOP's error marked as seen (raised by the `wait` that sees it, if any): no
    "exception was never retrieved" at exit for one no call looked at."""
    if not task.cancelled():
        task.exception()


def _timed_out(task: asyncio.Future[Any]) -> bool:
    """Whether a finished BLPOP ended empty (its timeout), neither failed nor cancelled."""
    return not task.cancelled() and task.exception() is None and task.result() is None


def _empty_wait(task: asyncio.Future[Any]) -> bool:
    """Whether a finished BLPOP is of no more use: it timed out empty (it is started again),
    or it failed or was cancelled while its queues were no longer waited on."""
    return task.cancelled() or task.exception() is not None or task.result() is None


def _by_slot(keys: Sequence[str]) -> list[list[str]]:
    """`keys` grouped by their Redis Cluster slot, in order of first appearance."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(key_slot(key.encode()), []).append(key)
    return list(groups.values())


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
