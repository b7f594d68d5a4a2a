"""`queue:work` (the seed's `--queue-work`): run a worker until a stop reason."""

from __future__ import annotations

import argparse
import logging

from core.commands._common import non_negative_int, positive_int, positive_seconds, seconds
from core.errors import ConfigurationError
from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import Settings
from core.worker.options import ExitCode, WorkerOptions
from core.worker.worker import Worker

HELP = {"queue:work": "run a worker that processes queued jobs (also: --queue-work)"}

logger = logging.getLogger("topiq.worker")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue",
        default=None,
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
        help="longest wait in seconds when no job is ready (default: WORKER_SLEEP); "
        "Redis wakes a waiting worker at once on dispatch",
    )
    parser.add_argument("--max-tries", type=positive_int, help="override every job's max_tries")
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


def options_from(args: argparse.Namespace, settings: Settings) -> WorkerOptions:
    """The worker options the flags ask for, with the settings as defaults."""
    queues = tuple(
        q.strip() for q in (args.queue or settings.queue_default).split(",") if q.strip()
    )
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
    )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    options = options_from(args, settings)
    async with QueueManager(settings) as manager:
        if manager.connection_name(options.connection) == "sync":
            raise ConfigurationError(
                "the sync connection runs jobs inside dispatch(); a worker needs redis, "
                "database or memory (--connection or QUEUE_CONNECTION)"
            )
        set_default_manager(manager)
        worker = Worker(manager, options)
        logger.info(
            "worker %s starting: connection=%s queues=%s concurrency=%d prefetch=%d "
            "max_jobs=%s max_time=%s timeout=%s max_tries=%s grace=%gs",
            worker.id,
            worker.connection,
            ",".join(options.queues),
            options.concurrency,
            worker.prefetch,
            options.max_jobs or "-",
            options.max_time or "-",
            options.timeout or "per job",
            options.max_tries or "per job",
            options.grace,
        )
        try:
            await worker.run()
        finally:
            set_default_manager(None)
    return ExitCode.OK
