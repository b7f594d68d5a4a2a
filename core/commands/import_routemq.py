"""`queue:import-routemq`: move the jobs RouteMQ left in Redis into a Topiq Redis connection.

    python main.py queue:import-routemq --dry-run
    python main.py queue:import-routemq
    python main.py queue:import-routemq --from redis://old-host:6379/0 --prefix routemq --json

Waiting jobs (`routemq:queue:<q>`) become ready jobs of queue `<q>` in the order they were
dispatched, delayed ones (`:delayed`) keep their due time, the ones RouteMQ's worker had taken
(`:reserved`) are ready again with their tries kept, failed records (`routemq:queue:failed:<q>`)
go to the connection's failed store (`queue:failed`, `queue:retry`). Stop RouteMQ's workers
first: a job one of them is running would run again here. An import that stops half way (a
kill, a lost connection) is finished by running the command again: no job runs twice, none is
lost (core/queue/drivers/redis_routemq.py explains how).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core.commands._common import (
    CONNECT_TIMEOUT,
    CommandFailed,
    add_connection_flag,
    add_json_flag,
    emit,
    guarded,
    open_connection,
    positive_int,
    table,
)
from core.queue.drivers.redis import RedisDriver
from core.queue.drivers.redis_routemq import (
    KINDS,
    Importer,
    Step,
    Survey,
    Tally,
    source_is_cluster,
)
from core.settings import Settings, redact_url
from core.worker.options import ExitCode

HELP = {
    "queue:import-routemq": "move the jobs RouteMQ left in Redis (routemq:queue:* keys: waiting, "
    "delayed, reserved, failed) into a Topiq redis connection; --dry-run counts them"
}

_STOP_NOTICE = (
    "Stop RouteMQ's workers before importing: a job one of them is running would run again "
    "here. The import stops if one reserves a job meanwhile."
)


def _crash_at(text: str) -> tuple[Step, int]:
    step, _, count = text.partition(":")
    if step not in ("taken", "pushed", "cleared") or not count.isdigit():
        raise argparse.ArgumentTypeError("expected taken|pushed|cleared:N")
    return step, int(count)  # type: ignore[return-value]  # checked above


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""
    add_connection_flag(parser)
    add_json_flag(parser)
    parser.add_argument(
        "--from",
        dest="source",
        default=None,
        metavar="URL",
        help="the Redis server holding RouteMQ's keys (default: the connection's REDIS_URL; "
        "required when the connection is a Redis Cluster or Sentinel setup)",
    )
    parser.add_argument(
        "--prefix",
        default="routemq",
        help="the prefix of RouteMQ's keys (default: routemq, as in routemq:queue:<name>)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="count the jobs per queue and kind; move nothing",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=100,
        help="jobs moved per step (default 100)",
    )
    # Tests only: SIGKILL the command once N jobs passed a step (taken, pushed, cleared).
    parser.add_argument("--crash-at", type=_crash_at, default=None, help=argparse.SUPPRESS)


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run `queue:import-routemq`; returns the exit code."""
    return await guarded(_run(args, settings))


@contextlib.asynccontextmanager
async def _source(url: str) -> AsyncIterator[aioredis.Redis]:
    """The source server, reached within `CONNECT_TIMEOUT`, refused if it is a cluster."""
    shown = redact_url(url)
    try:
        client = aioredis.Redis.from_url(url, decode_responses=False)
    except ValueError as exc:
        raise CommandFailed(f"--from {shown}: {exc}") from None
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                cluster = await source_is_cluster(client)
        except TimeoutError:
            raise CommandFailed(
                f"cannot reach {shown}: no answer within {CONNECT_TIMEOUT:g}s"
            ) from None
        if cluster:
            raise CommandFailed(
                f"{shown} is a Redis Cluster node: RouteMQ kept its keys on a single server "
                "(they have no hash tag, and its worker's RPOPLPUSH crosses slots), and the "
                "import moves each job with a script over two of them, which a cluster refuses; "
                "give --from the Redis server RouteMQ used"
            )
        yield client
    finally:
        await client.aclose()


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        driver = conn.driver
        if not isinstance(driver, RedisDriver):
            raise CommandFailed(
                f"the {conn.name} connection is not Redis: RouteMQ's Redis jobs are imported "
                "into a redis connection (--connection redis); its MySQL tables are converted "
                "by queue:migrate"
            )
        url = args.source
        if url is None:
            if driver.topology != "single":
                raise CommandFailed(
                    f"the {conn.name} connection is a Redis {driver.topology} setup: give --from "
                    "the URL of the Redis server RouteMQ used"
                )
            url = settings.redis_dsn
        shown = redact_url(url)
        try:
            async with _source(url) as source:
                importer = Importer(
                    source,
                    args.prefix,
                    driver,
                    await conn.failed_store(),
                    batch=args.batch,
                    crash_at=args.crash_at,
                )
                before = await importer.survey()
                if args.dry_run:
                    _report(args, shown, conn.name, before, None, before)
                    return ExitCode.OK
                print(_STOP_NOTICE, file=sys.stderr)
                async with importer.locked():
                    tally = await importer.run()
                after = await importer.survey()
        except RedisError as exc:
            raise CommandFailed(f"Redis error while importing from {shown}: {exc}") from None
    _report(args, shown, conn.name, before, tally, after)
    everything = after.total == 0 and not after.left and not after.working
    return ExitCode.OK if everything else ExitCode.ERROR


def _report(
    args: argparse.Namespace,
    source: str,
    connection: str,
    before: Survey,
    tally: Tally | None,
    after: Survey,
) -> None:
    """The counts per queue and kind: what waits (`--dry-run`), or what moved."""
    rows: dict[str, dict[str, int]]
    if tally is None:
        rows = {q: {k: before.count(q, k) for k in KINDS} for q in before.keys}
    else:
        rows = tally.moved
    data: dict[str, Any] = {
        "source": source,
        "prefix": args.prefix,
        "connection": connection,
        "dry_run": tally is None,
        "queues": [{"queue": q, **rows[q]} for q in sorted(rows)],
        "interrupted": before.working,
        "left": [{"key": k.key, "reason": k.reason} for k in after.left],
        "remaining": {q: {k: after.count(q, k) for k in KINDS} for q in sorted(after.keys)},
    }
    if tally is not None:
        data["moved"] = tally.total
        data["resumed"] = tally.resumed
        data["unreadable"] = tally.unreadable
        data["clamped"] = tally.clamped

    def render() -> Any:
        what = "to import" if tally is None else "imported"
        notes = [f"from {source}"]
        if tally is None:
            notes.append("dry run: nothing moved")
            if before.working:
                notes.append(f"{before.working} taken by an interrupted import, finished next run")
        else:
            if tally.resumed:
                notes.append(f"{tally.resumed} finished for an interrupted import")
            if tally.unreadable:
                notes.append(
                    f"{tally.unreadable} payload(s) could not be read and were kept as they were"
                )
            notes += tally.clamped
            if after.total:
                notes.append(f"{after.total} arrived in RouteMQ's keys meanwhile: run it again")
        notes += [f"left in place: {k.key}: {k.reason}" for k in after.left]
        return table(
            f"RouteMQ's {args.prefix}:* jobs {what} into {connection}",
            ["queue", *KINDS],
            [[q, *(rows[q][k] for k in KINDS)] for q in sorted(rows)],
            caption="; ".join(notes),
        )

    emit(args, data, render)
