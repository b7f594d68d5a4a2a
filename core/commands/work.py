"""`queue:work` (the seed's `--queue-work`): run a worker until a stop reason.

`queue:work --failed` (Masonite's) runs no worker: it moves the failed jobs back as
`queue:retry all` does (`--queue a,b`: of those queues) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import Any

from core.commands._common import (
    guarded,
    non_negative_int,
    open_connection,
    positive_int,
    positive_seconds,
    queue_list,
    seconds,
)
from core.commands._endpoint import add_endpoint_flags
from core.errors import ConfigurationError
from core.queue.drivers.base import Driver
from core.queue.payload import validate_queue
from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import QueueConnection, Settings, queue_location
from core.worker.options import ExitCode, WorkerOptions
from core.worker.worker import Worker, exit_code

HELP = {"queue:work": "run a worker that processes queued jobs (also: --queue-work)"}

logger = logging.getLogger("topiq.worker")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue",
        default=None,
        type=queue_list,
        help="queue(s) to work, comma-separated in priority order (default: QUEUE_DEFAULT)",
    )
    parser.add_argument(
        "--connection", default=None, help="redis, database, memory (default: QUEUE_CONNECTION)"
    )
    parser.add_argument("--max-jobs", type=positive_int, help="stop after this many jobs")
    parser.add_argument("--max-time", type=positive_seconds, help="stop after this many seconds")
    parser.add_argument(
        "--sleep",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="longest wait in seconds when no job is ready (default: WORKER_SLEEP); "
        "Redis wakes a waiting worker at once on dispatch",
    )
    # Masonite's names (`craft queue:work --poll 5 --attempts 2`): the same settings, and a
    # bad value is reported under the name that was typed.
    parser.add_argument(
        "--poll", dest="sleep", type=seconds, metavar="SECONDS", help="Masonite's --sleep"
    )
    parser.add_argument(
        "--max-tries", type=positive_int, metavar="N", help="override every job's max_tries"
    )
    parser.add_argument(
        "--attempts",
        dest="max_tries",
        type=positive_int,
        metavar="N",
        help="Masonite's --max-tries",
    )
    parser.add_argument("--timeout", type=positive_seconds, help="override every job's timeout (s)")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=None,
        help="jobs run at once in this process (default: WORKER_CONCURRENCY, 1)",
    )
    parser.add_argument(
        "--prefetch",
        type=non_negative_int,
        default=None,
        help="jobs reserved ahead of a free slot, so a finished job is replaced without a "
        "round trip (default: a quarter of --concurrency; 0 for strict fairness)",
    )
    parser.add_argument(
        "--grace",
        type=seconds,
        default=None,
        help="seconds running jobs get to finish after SIGTERM (default: WORKER_GRACE, 30)",
    )
    parser.add_argument(
        "--stop-when-empty", action="store_true", help="exit once the queues are empty"
    )
    add_endpoint_flags(parser)
    parser.add_argument(
        "--failed",
        action="store_true",
        help="instead of working: move every failed job (of --connection; of the --queue "
        "queues when given) back to its queue with its tries reset, as `queue:retry all` "
        "does, say what moved, and exit (0; 1 if some could not be moved)",
    )
    parser.add_argument(
        "--with-scheduler",
        action="store_true",
        help="also run the scheduler: enqueue the ticks of the schedules in SCHEDULE_MODULE "
        "(app.schedule); any number of schedulers enqueue each tick once",
    )


def options_from(args: argparse.Namespace, settings: Settings) -> WorkerOptions:
    """The worker options the flags ask for, with the settings as defaults."""
    queues = tuple(
        q.strip() for q in (args.queue or settings.queue_default).split(",") if q.strip()
    )
    for queue in queues:  # --queue is checked by its type; QUEUE_DEFAULT is checked here
        try:
            validate_queue(queue)
        except ValueError as exc:
            raise ConfigurationError(f"QUEUE_DEFAULT: {exc}") from None
    return WorkerOptions(
        connection=args.connection,
        queues=queues,
        concurrency=args.concurrency or settings.worker_concurrency,
        prefetch=args.prefetch,
        max_jobs=args.max_jobs,
        max_time=args.max_time,
        sleep=settings.worker_sleep if args.sleep is None else args.sleep,
        max_tries=args.max_tries,
        timeout=args.timeout,
        grace=settings.worker_grace if args.grace is None else args.grace,
        stop_when_empty=args.stop_when_empty,
        with_scheduler=args.with_scheduler,
    )


#: Flags of a working worker, meaningless with `--failed` (which does not start one).
_WORKING_FLAGS = (
    "max_jobs",
    "max_time",
    "sleep",
    "max_tries",
    "timeout",
    "concurrency",
    "prefetch",
    "grace",
    "metrics_port",
)
_SWITCHES = ("stop_when_empty", "with_scheduler")


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    if args.failed:
        return await guarded(_retry_failed(args, settings))
    options = options_from(args, settings)
    async with QueueManager(settings) as manager:
        if manager.connection_name(options.connection) == "sync":
            raise ConfigurationError(
                "the sync connection runs jobs inside dispatch(); a worker needs redis, "
                "database or memory (--connection or QUEUE_CONNECTION)"
            )
        set_default_manager(manager)
        worker = Worker(manager, options)
        connection = worker.connection
        failed = settings.failed_connection_for[QueueConnection(connection)]
        logger.info(
            "worker %s starting: connection=%s queues=%s concurrency=%d prefetch=%d "
            "max_jobs=%s max_time=%s timeout=%s max_tries=%s sleep=%gs grace=%gs; jobs at %s%s; "
            "settings from %s",
            worker.id,
            connection,
            ",".join(options.queues),
            options.concurrency,
            worker.prefetch,
            options.max_jobs or "-",
            options.max_time or "-",
            options.timeout or "per job",
            options.max_tries or "per job",
            options.sleep,
            options.grace,
            queue_location(settings, connection),
            ""
            if failed.value == connection
            else f", failed jobs at {failed.value} {queue_location(settings, failed)}",
            getattr(args, "settings_from", "the environment and .env"),
        )
        check = asyncio.create_task(_check_backend(manager, connection), name="topiq-redis-check")
        try:
            async with contextlib.AsyncExitStack() as stack:
                if args.metrics_port is not None:
                    from core.observe_http import worker_endpoint

                    await stack.enter_async_context(
                        worker_endpoint(worker, args.metrics_host, args.metrics_port)
                    )
                reason = await worker.run()
        finally:
            check.cancel()
            await asyncio.gather(check, return_exceptions=True)
            set_default_manager(None)
    return exit_code(worker, reason)  # ends the process itself if a given-up job still runs


# -- --failed (Masonite's `queue:work --failed`) ----------------------------------------------


#: Flags with a second name (Masonite's), both named when refused.
_ALSO = {"sleep": "--sleep/--poll", "max_tries": "--max-tries/--attempts"}


def _flag(dest: str) -> str:
    return _ALSO.get(dest) or "--" + dest.replace("_", "-")


async def _retry_failed(args: argparse.Namespace, settings: Settings) -> int:
    """`queue:work --failed`: what `queue:retry all` (or `--queue`) does, then exit.

    Exit 0 when every failed job read was moved back (or there was none), 1 when some were
    skipped (another retry is moving them, they changed since they were read, or their
    connection lives inside one process)."""
    given = [_flag(d) for d in _WORKING_FLAGS if getattr(args, d, None) is not None]
    given += [_flag(d) for d in _SWITCHES if getattr(args, d, False)]
    if given:
        raise ConfigurationError(
            f"queue:work --failed moves failed jobs back and exits without working: "
            f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no meaning with it"
        )
    # Imported here: a worker that works never loads the failed commands' modules.
    from core.commands.failed import all_failed, retry_batches, retry_message

    names = [] if args.queue is None else [q.strip() for q in args.queue.split(",") if q.strip()]
    queues: list[str | None] = [*names] if names else [None]
    async with open_connection(settings, args.connection) as conn:
        store = await conn.failed_store()
        records = await all_failed(store, queues)
        retried, skipped = await retry_batches(conn, store, records)
    if records:
        print(retry_message(records, retried, skipped), flush=True)
    else:
        where = f" of queue {', '.join(names)}" if names else ""
        print(f"No failed jobs{where} to retry on the {conn.name} connection.", flush=True)
    return ExitCode.ERROR if skipped else ExitCode.OK


# -- is the Redis server fit to keep a queue? --------------------------------------------------


async def _check_backend(manager: QueueManager, connection: str) -> None:
    """Once the worker's connection is open, warn if its Redis server may lose jobs."""
    if connection != QueueConnection.REDIS:
        return
    while True:  # the worker itself reports an unreachable server and retries
        try:
            driver: Driver = await manager.connection(connection)
            break
        except Exception:
            await asyncio.sleep(1.0)
    client: Any = getattr(driver, "client", None)
    if client is None:
        return
    with contextlib.suppress(Exception):  # a check, never a reason for the worker to stop
        level, line = await redis_durability(client)
        where = queue_location(manager.settings, connection).partition(" ")[0]
        logger.log(level, "%s", line.replace("the Redis server", f"Redis at {where}", 1))


async def redis_durability(client: Any) -> tuple[int, str]:
    """(log level, one line) about how the Redis server behind `client` may lose jobs.

    It loses every job on a restart when it has neither AOF (`appendonly no`) nor RDB save
    points (`save ""`), and may drop jobs under memory pressure when its `maxmemory-policy` is
    anything but `noeviction`: a WARNING. Otherwise an INFO line says how it keeps the queue;
    when `CONFIG` is disabled or not allowed, an INFO line says what to check by hand.
    """
    from redis.exceptions import ResponseError

    try:
        values: dict[str, str] = {}
        for name in ("appendonly", "save", "maxmemory-policy"):
            reply = await client.config_get(name)
            for key, value in reply.items():
                values[_text(key)] = _text(value)
    except ResponseError as exc:
        return logging.INFO, (
            f"cannot read the Redis server's configuration ({exc}); make sure it keeps the "
            "queue across restarts (appendonly yes) and never evicts it (maxmemory-policy "
            "noeviction): see docs/operations.md, Running Redis for a queue"
        )
    problems = []
    aof = values.get("appendonly", "no") != "no"
    save = values.get("save", "").strip()
    if not aof and not save:
        problems.append(
            "it keeps nothing on restart (appendonly no and no save points): a restart loses "
            "every queued job; set appendonly yes"
        )
    policy = values.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy}: when full it may evict queued jobs; set "
            "maxmemory-policy noeviction"
        )
    if not problems:
        kept = (
            "keeps the queue in its append-only file"
            if aof
            else f"keeps RDB snapshots only (save {save}): a restart loses the jobs since the "
            "last one; appendonly yes keeps them all"
        )
        return logging.INFO, f"the Redis server {kept} and never evicts it (noeviction)"
    return logging.WARNING, (
        "the Redis server may lose jobs: "
        + "; ".join(problems)
        + " (docs/operations.md, Running Redis for a queue)"
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
