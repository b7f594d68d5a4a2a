"""`schedule:list` (the declared schedules and their next runs) and `schedule:run` (the
scheduler alone, until SIGTERM or SIGINT).

    python main.py schedule:list --next 3
    python main.py schedule:run

Both read the schedules from the module the `SCHEDULE_MODULE` setting names (`app.schedule`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from datetime import datetime
from typing import Any

from core.commands._common import (
    add_json_flag,
    emit,
    error_summary,
    guarded,
    positive_int,
    table,
)
from core.job import Job
from core.queue.queue_manager import QueueManager, set_default_manager
from core.schedule import Schedule, Scheduler, schedule, tick_time
from core.settings import Settings
from core.worker.options import ExitCode

HELP = {
    "schedule:list": "show the declared schedules, their next runs and the last tick enqueued",
    "schedule:run": "run the scheduler alone: enqueue each schedule's ticks until SIGTERM/SIGINT",
}

logger = logging.getLogger("topiq.schedule")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of command `name`."""
    if name == "schedule:list":
        add_json_flag(parser)
        parser.add_argument(
            "--next",
            type=positive_int,
            default=1,
            metavar="N",
            help="how many upcoming runs to show per schedule (default: 1)",
        )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    schedule.load(settings.schedule_module)
    if name == "schedule:list":
        return await guarded(_list(args, settings))
    return await run_scheduler(settings)


def queue_of(item: Schedule, settings: Settings) -> str:
    """The queue a schedule's jobs go to."""
    if item.queue is not None:
        return item.queue
    return item.job.queue if item.job.queue != Job.queue else settings.queue_default


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from core.queue.payload import class_path

    rows: list[dict[str, Any]] = []
    async with QueueManager(settings) as manager:
        now = int(time.time() * 1000)
        for item in schedule:
            upcoming: list[int] = []
            cursor = now
            for _ in range(args.next):
                tick = item.next_after(cursor)
                if tick is None:
                    break
                upcoming.append(tick)
                cursor = tick
            last: datetime | None = None
            last_error = ""
            try:
                driver = await manager.connection(item.connection or item.job.connection)
                raw = await driver.get_marker(item.marker)
                if raw is not None:
                    last = tick_time(int(raw), item.timezone)
            except (NotImplementedError, ValueError):
                pass  # a connection that keeps no markers (sync)
            except Exception as exc:
                last_error = error_summary(exc)
            rows.append(
                {
                    "name": item.name,
                    "kind": item.kind,
                    "expression": item.expression,
                    "timezone": item.timezone,
                    "job": class_path(type(item.job)),
                    "queue": queue_of(item, settings),
                    "connection": manager.connection_name(item.connection or item.job.connection),
                    "missed": item.missed,
                    "next": [tick_time(tick, item.timezone) for tick in upcoming],
                    "last": last,
                    **({"last_error": last_error} if last_error else {}),
                }
            )

    def render() -> Any:
        if not rows:
            return f"no schedules are declared (in {settings.schedule_module})"
        return table(
            f"schedules ({settings.schedule_module})",
            ["name", "schedule", "timezone", "job", "queue", "missed", "next", "last enqueued"],
            [
                [
                    row["name"],
                    f"{row['kind']} {row['expression']}",
                    row["timezone"],
                    row["job"],
                    row["queue"],
                    row["missed"],
                    "\n".join(f"{moment:%Y-%m-%d %H:%M:%S%z}" for moment in row["next"]) or "never",
                    f"{row['last']:%Y-%m-%d %H:%M:%S%z}"
                    if row["last"] is not None
                    else row.get("last_error", "-"),
                ]
                for row in rows
            ],
            wrap=["job"],
        )

    emit(args, rows, render)
    return ExitCode.OK


async def run_scheduler(settings: Settings) -> int:
    """Run the scheduler until SIGTERM or SIGINT; exit code 0."""
    loop = asyncio.get_running_loop()
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        scheduler = Scheduler(manager)
        if not scheduler.schedules:
            logger.warning(
                "no schedules are declared in %s: the scheduler has nothing to do",
                settings.schedule_module,
            )
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, scheduler.stop)
        try:
            await scheduler.run()
        finally:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            set_default_manager(None)
    return ExitCode.OK
