"""Why connecting to a Redis Cluster or through Sentinel failed, said in terms of the settings.

redis-py reports a wrong REDIS_CLUSTER_NODES as "Cluster mode is not enabled on this node", an
unknown REDIS_SENTINEL_MASTER, a refused REDIS_SENTINEL_PASSWORD and sentinels that are all down
alike as "No master found", and `rediss://` to a plaintext node as a timeout. `RedisDriver.open`
asks these helpers what the failure means: a setting the server's answer shows to be wrong is a
`ServerMismatchError` (a worker stops, no retry fixes it); sentinels that cannot be reached are
a `ConnectionLostError` naming REDIS_SENTINELS (an outage: the worker retries).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from redis.exceptions import AuthenticationError, RedisError, ResponseError

from core.errors import ConnectionLostError, ServerMismatchError
from core.queue.drivers.tls import redis_plaintext_refusal

__all__ = ["cluster_failure", "connect_watching_tls", "sentinel_failure"]

T = TypeVar("T")

#: Seconds a `rediss://` cluster connection may take before the nodes are asked, in plaintext,
#: whether they are Redis servers without TLS.
_TLS_SUSPECT_AFTER = 1.0
#: Seconds each sentinel has to answer the diagnosis's SENTINEL MASTERS.
_SENTINEL_ASK_TIMEOUT = 2.0


def _where(nodes: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{host}:{port}" for host, port in nodes)


def cluster_failure(nodes: Sequence[tuple[str, int]], exc: BaseException) -> Exception | None:
    """REDIS_CLUSTER_NODES at a Redis that is not a cluster node: the error to stop with."""
    if "cluster mode is not enabled" not in str(exc).lower():
        return None
    return ServerMismatchError(
        f"REDIS_CLUSTER_NODES: the Redis server at {_where(nodes)} is not a Redis Cluster node "
        "(cluster mode is not enabled on it): point REDIS_CLUSTER_NODES at the nodes of a "
        "cluster, or unset it to use the single server of REDIS_URL"
    )


async def connect_watching_tls(
    dsn: str, nodes: Sequence[tuple[str, int]], connecting: Awaitable[T]
) -> T:
    """Await `connecting`; with `rediss://`, when it has not ended within a second, ask the
    `nodes` in plaintext: one that answers is a Redis without TLS, and the connection would only
    time out, so stop at once saying so (`ServerMismatchError` naming REDIS_URL)."""
    task = asyncio.ensure_future(connecting)
    if not dsn.startswith("rediss:"):
        return await task
    done, _ = await asyncio.wait({task}, timeout=_TLS_SUSPECT_AFTER)
    if not done:
        for host, port in nodes:
            refusal = await redis_plaintext_refusal(dsn, host, port)
            if refusal is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise refusal
    return await task


async def sentinel_failure(sentinel: Any, master: str, *, password: bool) -> Exception | None:
    """After the Sentinel client found no primary: ask each sentinel itself, and name the
    setting at fault (REDIS_SENTINEL_PASSWORD refused, REDIS_SENTINEL_MASTER unknown to the
    sentinels that answered) or, when none answered, REDIS_SENTINELS. `None` when the
    sentinels know the master (it may be down or failing over: worth retrying as it is)."""
    refused: list[str] = []  # the password
    down: list[str] = []
    known: set[str] = set()
    answered: list[str] = []
    for watcher in sentinel.sentinels:
        where = "{host}:{port}".format(**watcher.connection_pool.connection_kwargs)
        try:
            async with asyncio.timeout(_SENTINEL_ASK_TIMEOUT):
                masters = await watcher.sentinel_masters()
        except AuthenticationError as exc:
            refused.append(f"{where} ({_short(exc)})")
        except ResponseError as exc:
            if "auth" not in str(exc).lower() and "password" not in str(exc).lower():
                return None
            refused.append(f"{where} ({_short(exc)})")
        except (RedisError, OSError, TimeoutError) as exc:
            down.append(f"{where} ({_short(exc)})")
        else:
            if master in masters:
                return None
            answered.append(where)
            known.update(str(name) for name in masters)
    if refused and not password:
        return ServerMismatchError(
            f"REDIS_SENTINEL_PASSWORD is not set, but the sentinel(s) at {', '.join(refused)} "
            "ask for a password: set REDIS_SENTINEL_PASSWORD to their requirepass"
        )
    if refused:
        return ServerMismatchError(
            f"REDIS_SENTINEL_PASSWORD: the sentinel(s) at {', '.join(refused)} refused the "
            "password: set REDIS_SENTINEL_PASSWORD to the sentinels' own password (their "
            "requirepass, not the Redis server's), or unset it when they have none"
        )
    if answered:
        monitored = ", ".join(repr(name) for name in sorted(known)) or "none"
        return ServerMismatchError(
            f"REDIS_SENTINEL_MASTER: the sentinel(s) at {', '.join(answered)} monitor no master "
            f"named {master!r} (they monitor: {monitored}): set REDIS_SENTINEL_MASTER to the "
            "name in their `sentinel monitor` line"
        )
    if down:
        return ConnectionLostError(
            f"REDIS_SENTINELS: no sentinel answered: {'; '.join(down)}; is Sentinel running there?"
        )
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "Error 111 " in str(seen):
            return "connection refused"
        seen = seen.__cause__ or seen.__context__
    return text or type(exc).__name__
