"""`queue:work` (the seed's `--queue-work`): run a worker until a stop reason.

`queue:work --failed` (Masonite's) runs no worker: it moves the failed jobs back as
`queue:retry all` does (`--queue a,b`: of those queues) and exits.

`queue:work --processes N` (N > 1) runs no worker itself: it starts N `queue:work` processes
with the same flags and supervises them (`core.worker.pool`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import sys
from pathlib import Path
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
from core.queue.drivers import DRIVERS
from core.queue.drivers.base import Driver
from core.queue.payload import validate_queue
from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import QueueConnection, Settings, queue_location
from core.worker.options import ExitCode, StopReason, WorkerOptions
from core.worker.pool import (
    DRAINED,
    MAX_PROCESSES,
    ParentLink,
    Pool,
    pool_child,
)
from core.worker.worker import Worker, exit_code

HELP = {"queue:work": "run a worker that processes queued jobs (also: --queue-work)"}

logger = logging.getLogger("topiq.worker")


def process_count(text: str) -> int:
    """`--processes`'s type: a whole number from 1 to `MAX_PROCESSES`."""
    value = positive_int(text)
    if value > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_PROCESSES}, got {text!r} (past that, run more machines or "
            "supervisord pools)"
        )
    return value


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
    parser.add_argument(
        "--processes",
        type=process_count,
        default=None,
        metavar="N",
        help=f"run N worker processes (1 to {MAX_PROCESSES}) under this one, which restarts "
        "any that exits (--max-jobs and --max-time apply per process) and forwards SIGTERM/"
        "SIGINT to all; --with-scheduler runs in the first only; --metrics-port P gives "
        "process i port P+i (default: 1, this process is the worker)",
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
    "processes",
)
_SWITCHES = ("stop_when_empty", "with_scheduler")


def preload(name: str, args: argparse.Namespace, settings: Settings) -> None:
    """Import the driver of the worker's connection now, before the loop starts.

    Its client library is the largest part of a worker's start-up, and `main` runs this while
    start-up has the garbage collector paused. Nothing is opened or checked here: a wrong
    connection, or a library that is missing, is reported where the worker makes its driver,
    as it would be without this.
    """
    if args.failed or (args.processes or 1) > 1:
        return  # no worker in this process
    try:
        connection = QueueManager(settings).connection_name(args.connection)
    except ConfigurationError:
        return
    entry = DRIVERS.get(connection)
    if entry is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module(entry[0].partition(":")[0])


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    if args.failed:
        return await guarded(_retry_failed(args, settings))
    if (args.processes or 1) > 1:
        return await _run_pool(args, settings)
    parent = pool_child()  # a child of `--processes N`: it ends with its parent
    link = None if parent is None else ParentLink(parent)
    if link is not None and not link.bind():
        logger.warning("worker pool process %d ended before this worker started; exiting", parent)
        return ExitCode.OK
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
            "max_jobs=%s max_time=%s timeout=%s max_tries=%s sleep=%gs grace=%gs loop=%s; "
            "jobs at %s%s; "
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
            type(asyncio.get_running_loop()).__module__.split(".")[0],
            queue_location(settings, connection),
            ""
            if failed.value == connection
            else f", failed jobs at {failed.value} {queue_location(settings, failed)}",
            getattr(args, "settings_from", "the environment and .env"),
        )
        check = asyncio.create_task(_check_backend(manager, connection), name="topiq-redis-check")
        if link is not None:
            link.attach(worker.stop, options.grace)
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
            if link is not None:
                await link.detach()
            set_default_manager(None)
    code = exit_code(worker, reason)  # ends the process itself if a given-up job still runs
    if link is not None and reason is StopReason.EMPTY and code == ExitCode.OK:
        return DRAINED  # tells the pool not to replace this one
    return code


# -- --processes N ------------------------------------------------------------------------

#: What each child of the pool gets, flag by flag (every queue:work flag is listed here or in
#: `_NOT_PASSED`; a test checks it): the same value, as typed after parsing.
_PASSED = {
    "queue": "--queue",
    "connection": "--connection",
    "max_jobs": "--max-jobs",
    "max_time": "--max-time",
    "sleep": "--sleep",
    "max_tries": "--max-tries",
    "timeout": "--timeout",
    "concurrency": "--concurrency",
    "prefetch": "--prefetch",
    "grace": "--grace",
}
_PASSED_SWITCHES = {"stop_when_empty": "--stop-when-empty"}
#: Handled one by one in `_child_argv` (or meaningless in a child).
_NOT_PASSED = ("processes", "failed", "with_scheduler", "metrics_port", "metrics_host", "env_file")


def _child_argv(args: argparse.Namespace, slot: int) -> list[str]:
    """`python main.py [--env-file F] queue:work FLAGS` for child `slot` of the pool."""
    main = Path(__file__).resolve().parents[2] / "main.py"
    argv = [sys.executable, str(main)]
    if not main.is_file():  # installed without the project's main.py
        argv = [sys.executable, "-c", "import sys; from core.cli import main; sys.exit(main())"]
    settings_file = getattr(args, "settings_file", None)
    if settings_file is not None:
        argv += ["--env-file", str(settings_file)]
    argv.append("queue:work")
    for dest, flag in _PASSED.items():
        value = getattr(args, dest, None)
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for dest, flag in _PASSED_SWITCHES.items() if getattr(args, dest, False)]
    if args.with_scheduler and slot == 0:  # one scheduler per pool is enough
        argv.append("--with-scheduler")
    if args.metrics_port is not None:
        port = args.metrics_port + slot if args.metrics_port else 0
        argv += ["--metrics-port", str(port), "--metrics-host", args.metrics_host]
    return argv


async def _run_pool(args: argparse.Namespace, settings: Settings) -> int:
    """`queue:work --processes N`: start N workers and keep them running (core.worker.pool)."""
    processes: int = args.processes
    options = options_from(args, settings)  # what every child gets, checked once here
    connection = QueueManager(settings).connection_name(options.connection)
    if connection in ("sync", "memory"):
        raise ConfigurationError(
            f"--processes {processes} starts worker processes that share one queue; the "
            f"{connection} connection is inside one process: use redis or database "
            "(--connection or QUEUE_CONNECTION)"
        )
    port = args.metrics_port
    if port and port + processes - 1 > 65535:
        raise ConfigurationError(
            f"--metrics-port {port} with --processes {processes}: worker process i serves on "
            f"port {port}+i, and {port + processes - 1} is past 65535"
        )
    logger.info(
        "worker pool starting: %d worker processes on %s, queues %s%s%s; settings from %s",
        processes,
        connection,
        ",".join(options.queues),
        "; the scheduler runs in process 0" if args.with_scheduler else "",
        ""
        if port is None
        else f"; metrics on port {port}..{port + processes - 1}"
        if port
        else "; metrics on a free port each",
        getattr(args, "settings_from", "the environment and .env"),
    )
    pool = Pool(processes, lambda slot: _child_argv(args, slot), options.grace)
    code = await pool.run()
    logger.info("worker pool stopped (exit code %d)", code)
    return code


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
        where = queue_location(manager.settings, connection).rpartition(" (key prefix")[0]
        # "Redis at redis://host:6379/0", "the Redis Cluster at host:port,...", "the primary
        # 'name' of the Sentinels at host:port,..."
        said = where if where.startswith("the ") else f"Redis at {where}"
        logger.log(level, "%s", line.replace("the Redis server", said, 1))


async def redis_durability(client: Any) -> tuple[int, str]:
    """(log level, one line) about how the Redis server behind `client` may lose jobs.

    It loses every job on a restart when it has neither AOF (`appendonly no`) nor RDB save
    points (`save ""`), and may drop jobs under memory pressure when its `maxmemory-policy` is
    anything but `noeviction`: a WARNING. Otherwise an INFO line says how it keeps the queue;
    when `CONFIG` is disabled or not allowed, an INFO line says what to check by hand. On a
    Redis Cluster every primary is asked (each keeps its own slots), and a WARNING names the
    primaries it is about.
    """
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import ResponseError

    cluster = isinstance(client, RedisCluster)
    nodes: dict[str, dict[str, str]] = {}
    try:
        for name in ("appendonly", "save", "maxmemory-policy"):
            if cluster:
                replies = await client.config_get(name, target_nodes=RedisCluster.PRIMARIES)
            else:
                replies = {"": await client.config_get(name)}
            for node, reply in replies.items():
                for key, value in reply.items():
                    nodes.setdefault(_text(node), {})[_text(key)] = _text(value)
    except ResponseError as exc:
        return logging.INFO, (
            f"cannot read the Redis server's configuration ({exc}); make sure it keeps the "
            "queue across restarts (appendonly yes) and never evicts it (maxmemory-policy "
            "noeviction): see docs/operations.md, Running Redis for a queue"
        )
    found = {node: _durability(values) for node, values in sorted(nodes.items())}
    troubled = {node: problems for node, (problems, _) in found.items() if problems}
    if not troubled:
        kept = {line for _, line in found.values()}
        if not cluster or len(kept) == 1:
            return logging.INFO, f"the Redis server {next(iter(kept))} and never evicts it " + (
                "(noeviction)" if not cluster else "(noeviction), on every cluster primary"
            )
        return logging.INFO, "the Redis server's primaries: " + "; ".join(
            f"{node} {line}" for node, (_, line) in found.items()
        )
    if not cluster:
        [problems] = troubled.values()
        said = "; ".join(problems)
    else:
        alike: dict[str, list[str]] = {}  # the same problems: said once, naming each primary
        for node, problems in troubled.items():
            alike.setdefault("; ".join(problems), []).append(node)
        said = "; ".join(
            f"{'primary' if len(where) == 1 else 'primaries'} {', '.join(where)}: {problems}"
            for problems, where in alike.items()
        )
    return logging.WARNING, (
        f"the Redis server may lose jobs: {said} (docs/operations.md, Running Redis for a queue)"
    )


def _durability(values: dict[str, str]) -> tuple[list[str], str]:
    """What one server's configuration may lose (none: empty) and how it keeps the queue."""
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
    kept = (
        "keeps the queue in its append-only file"
        if aof
        else f"keeps RDB snapshots only (save {save}): a restart loses the jobs since the "
        "last one; appendonly yes keeps them all"
    )
    return problems, kept


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
