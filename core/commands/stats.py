"""`queue:stats` (what each queue holds and which workers are alive) and `queue:clear`.

    python main.py queue:stats --connection redis
    python main.py queue:stats --watch 2
    python main.py queue:clear emails --force

Both work on any connection (`--connection`, default QUEUE_CONNECTION) and print JSON with
`--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.prompt import Confirm

from core.commands._common import (
    CommandFailed,
    Connection,
    add_connection_flag,
    add_json_flag,
    ago,
    console,
    emit,
    guarded,
    open_connection,
    queue_name,
    say,
    stamp,
    table,
)
from core.mqtt.spool import spooled_by_queue
from core.queue.queue_manager import RECENT_WINDOW
from core.settings import Settings

HELP = {
    "queue:stats": "show pending, delayed, deferred, reserved and failed jobs per queue, how "
    "jobs ended over the last hour, and live workers",
    "queue:clear": "delete the jobs waiting in a queue (not the ones running)",
}

_QUEUE_COLUMNS = ("queue", "pending", "delayed", "deferred", "reserved", "failed", "spooled")
#: How jobs ended over the recent window: JSON key -> table column.
_RECENT_COLUMNS = {
    "succeeded": "succeeded 1h",
    "failed_recent": "failed 1h",
    "cancelled": "cancelled 1h",
    "expired": "expired 1h",
    "coalesced": "coalesced 1h",  # pushes that replaced a waiting job's data
    "dropped": "dropped 1h",  # waiting jobs dropped by a full queue (drop_oldest)
    "rejected": "rejected 1h",  # pushes refused by a full queue
}
_WORKER_COLUMNS = (
    "host",
    "pid",
    "queues",
    "concurrency",
    "processed",
    "running",
    "started",
    "last seen",
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0.1:  # NaN too
        raise argparse.ArgumentTypeError(f"must be at least 0.1 seconds, got {text!r}")
    return value


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of command `name`."""
    add_connection_flag(parser)
    add_json_flag(parser)
    if name == "queue:stats":
        parser.add_argument("--queue", type=queue_name, help="only this queue")
        parser.add_argument(
            "--watch",
            type=_seconds,
            metavar="SECONDS",
            help="redraw every SECONDS until Ctrl-C (not with --json)",
        )
    else:
        parser.add_argument("queue", type=queue_name, help="the queue to empty")
        parser.add_argument(
            "--force", action="store_true", help="do not ask (required when not on a terminal)"
        )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run `queue:stats` or `queue:clear`; returns the exit code."""
    return await guarded(_run(name, args, settings))


async def _run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        if name == "queue:clear":
            return await _clear(args, conn)
        if args.watch is not None and args.json:
            raise CommandFailed("--watch draws tables for people; use --json without --watch")
        if args.watch is None:
            data = await _snapshot(conn, args.queue)
            emit(args, data, lambda: _render(data))
            return 0
        with Live(
            _render(await _snapshot(conn, args.queue)), console=console(), auto_refresh=False
        ) as live:
            while True:  # until Ctrl-C, which the CLI turns into exit code 0
                await asyncio.sleep(args.watch)
                live.update(_render(await _snapshot(conn, args.queue)), refresh=True)


async def _snapshot(conn: Connection, queue: str | None) -> dict[str, Any]:
    """Counts per queue and the workers alive, as plain data (the JSON output)."""
    stats = await conn.manager.stats(queue, conn.name)
    workers = await conn.driver.workers()
    # Jobs the MQTT app holds in its offline spool file(s) for this connection.
    spooled = await asyncio.to_thread(spooled_by_queue, conn.manager.settings, conn.name)
    return {
        "connection": conn.name,
        "recent_window": RECENT_WINDOW,
        "queues": [
            {
                "queue": s.queue,
                "pending": s.pending,
                "delayed": s.delayed,
                "deferred": s.deferred,
                "reserved": s.reserved,
                "failed": s.failed,
                "succeeded": s.succeeded,
                "failed_recent": s.failed_recent,
                "cancelled": s.cancelled,
                "expired": s.expired,
                "coalesced": s.coalesced,
                "dropped": s.dropped,
                "rejected": s.rejected,
                "spooled": spooled.get(s.queue, 0),
            }
            for s in stats
        ],
        "workers": [
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "queues": list(w.queues),
                "concurrency": w.concurrency,
                "processed": w.processed,
                "running": list(w.running),
                "started_at": w.started_at,
                "seen_at": w.seen_at,
            }
            for w in workers
        ],
    }


def _render(data: dict[str, Any]) -> RenderableType:
    queues = table(
        f"Queues ({data['connection']})",
        (*_QUEUE_COLUMNS, *_RECENT_COLUMNS.values()),
        [[q[column] for column in (*_QUEUE_COLUMNS, *_RECENT_COLUMNS)] for q in data["queues"]],
        caption="failed: in the failed-job store; spooled: in the MQTT app's offline spool; "
        "'1h': over the last hour, jobs that ended so, "
        "pushes that replaced a waiting job (coalesced) or met a full queue (dropped, rejected)"
        if data["queues"]
        else "no queue has been used yet",
    )
    now = time.time()
    workers = table(
        f"Workers alive ({len(data['workers'])})",
        _WORKER_COLUMNS,
        [
            [
                w["host"],
                w["pid"],
                w["queues"],
                w["concurrency"],
                w["processed"],
                len(w["running"]),
                stamp(w["started_at"]),
                ago(now - w["seen_at"]),
            ]
            for w in data["workers"]
        ],
        caption="" if data["workers"] else "no worker has reported in the last seconds",
        wrap=("queues",),
    )
    return Group(queues, workers)


async def _clear(args: argparse.Namespace, conn: Connection) -> int:
    stats = await conn.driver.stats(args.queue)
    waiting = stats.pending + stats.delayed + stats.deferred
    if not args.force:
        question = f"Delete the {waiting} waiting jobs of queue {args.queue} on {conn.name}?"
        # Confirm reads stdin, which blocks: off the event loop.
        if not sys.stdin.isatty() or not await asyncio.to_thread(Confirm.ask, question):
            raise CommandFailed(
                f"queue:clear would delete {waiting} waiting jobs of queue {args.queue} "
                f"on {conn.name}; run it again with --force"
            )
    deleted = await conn.driver.clear(args.queue)
    running = f"; {stats.reserved} running jobs were left alone" if stats.reserved else ""
    say(
        args,
        f"Deleted {deleted} waiting jobs of queue {args.queue} on {conn.name}{running}.",
        {"queue": args.queue, "deleted": deleted, "reserved": stats.reserved},
    )
    return 0
