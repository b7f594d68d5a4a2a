"""Pushes acknowledged by replicas: `REDIS_WAIT_REPLICAS` and `REDIS_WAIT_TIMEOUT`.

Redis replicates asynchronously: a push answered by the primary can be lost when the primary
dies before a replica received it, and its replica is promoted. With `REDIS_WAIT_REPLICAS=N`
each push ends with Redis' `WAIT N <timeout>`, which blocks until N replicas acknowledged every
write the connection made before it. WAIT covers the writes of its own connection only, so it
travels in the same pipeline as the push scripts, with no extra round trip:

* one server or Sentinel: the scripts and one WAIT, in one pipeline (one connection);
* Redis Cluster: each script goes to its queue's slot primary; one WAIT per primary, pinned to
  that primary (`target_nodes`), after its scripts: the cluster pipeline sends each node's
  commands in order on one connection of that node.

Fewer acknowledgements than asked (or a WAIT that failed: a node that was demoted meanwhile,
and the cluster client resent the push elsewhere) raise `NotReplicatedError` (a
`ConnectionLostError`): the jobs are stored on the primary and will run unless it fails before a
replica has them. Errors of the scripts themselves are raised as without WAIT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from core.errors import NotReplicatedError
from core.queue.drivers.base import OutgoingJob

if TYPE_CHECKING:
    from core.queue.drivers.redis import RedisDriver

__all__ = ["push_replicated", "scripts_replicated"]


async def push_replicated(
    driver: RedisDriver,
    calls: Sequence[tuple[str, list[str], list[Any]]],
    jobs: Sequence[OutgoingJob],
) -> list[Any]:
    """Run the push script `calls` and WAIT for `REDIS_WAIT_REPLICAS` replicas in one pipeline;
    the scripts' replies, in order, or `NotReplicatedError`."""
    if not calls:
        return []
    replies, waits = await _run_waited(driver, calls)
    _check(waits, driver.settings.redis_wait_replicas, driver.settings.redis_wait_timeout, jobs)
    return replies


async def scripts_replicated(
    driver: RedisDriver, calls: Sequence[tuple[str, list[str], list[Any]]]
) -> tuple[list[Any], str]:
    """Run the script `calls` and WAIT for `REDIS_WAIT_REPLICAS` replicas as a push does (the
    relay: relay.lua on its targets); the scripts' replies, in order, and why their writes may
    not be replicated ("" when they are). A script's error is raised."""
    if not calls:
        return [], ""
    replies, waits = await _run_waited(driver, calls)
    wanted = driver.settings.redis_wait_replicas
    least, failed = _least(waits)
    if failed is not None:
        return replies, f"the WAIT failed ({failed})"
    if least < wanted:
        return replies, (
            f"{least} of {wanted} replica(s) acknowledged within "
            f"{driver.settings.redis_wait_timeout:g}s"
        )
    return replies, ""


async def _run_waited(
    driver: RedisDriver, calls: Sequence[tuple[str, list[str], list[Any]]]
) -> tuple[list[Any], list[Any]]:
    """The scripts and one WAIT per primary they ran on, in one pipeline: the scripts' replies
    (an error raised) and the WAITs' answers."""
    wanted = driver.settings.redis_wait_replicas
    timeout_ms = max(1, int(driver.settings.redis_wait_timeout * 1000))
    client: Any = driver.client
    replies: list[Any] = [None] * len(calls)
    waits: list[Any] = []
    todo = list(range(len(calls)))
    for attempt in (1, 2):
        # The driver's pipeline: after a lost connection a cluster client reads the slot map
        # again before its next command (redis-py's cluster pipeline does not by itself).
        async with driver.pipeline(transaction=False) as pipe:
            for i in todo:
                name, keys, args = calls[i]
                # execute_command: the cluster pipeline refuses `evalsha()`, not EVALSHA itself
                pipe.execute_command("EVALSHA", driver.script(name).sha, len(keys), *keys, *args)
            if driver.cluster:
                primaries: dict[str, Any] = {}
                for i in todo:
                    node = client.get_node_from_key(calls[i][1][0])
                    primaries.setdefault(node.name, node)
                for node in primaries.values():
                    pipe.execute_command("WAIT", wanted, timeout_ms, target_nodes=node)
            else:
                pipe.execute_command("WAIT", wanted, timeout_ms)
            results = list(await pipe.execute(raise_on_error=False))
        waits.extend(results[len(todo) :])
        for i, reply in zip(todo, results, strict=False):
            replies[i] = reply
        # A server that lost its scripts (a restart, a promoted replica: scripts are not
        # replicated) answers NOSCRIPT and runs nothing: load them and send only those calls
        # again (the others ran and must not run twice).
        todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
        if not todo or attempt == 2:
            break
        for name in {calls[i][0] for i in todo}:
            await client.script_load(driver.script(name).script)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies, waits


def _least(waits: Sequence[Any]) -> tuple[int, BaseException | None]:
    """The fewest replicas a WAIT saw, and the first WAIT that failed."""
    counts = [w for w in waits if not isinstance(w, BaseException)]
    failed = next((w for w in waits if isinstance(w, BaseException)), None)
    return (min(counts) if counts and failed is None else 0), failed


def _check(waits: Sequence[Any], wanted: int, timeout: float, jobs: Sequence[OutgoingJob]) -> None:
    """Raise `NotReplicatedError` unless every WAIT saw `wanted` replicas."""
    least, failed = _least(waits)
    if least >= wanted:
        return
    ids = [job.id for job in jobs]
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    why = (
        f"the WAIT failed ({failed})"
        if failed is not None
        else f"{least} of {wanted} replica(s) acknowledged it within {timeout:g}s"
    )
    raise NotReplicatedError(
        f"push of {len(ids)} job(s) ({shown}) is stored on the Redis primary but may or may "
        f"not have been replicated: {why} (REDIS_WAIT_REPLICAS={wanted}). The jobs will run "
        "unless the primary fails before a replica has them. If they must not be lost, look "
        "them up by id (job_status, `queue:job <id>`) once Redis answers again and dispatch "
        "again only the ones it does not know; check that the replicas are up and in sync, "
        "or raise REDIS_WAIT_TIMEOUT.",
        job_ids=ids,
        acknowledged=least,
    )
