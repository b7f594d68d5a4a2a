"""`queue:pause NAME` and `queue:resume NAME`: stop and restart the taking of a queue's jobs.

    python main.py queue:pause emails
    python main.py queue:resume emails --connection redis --json

A pause is kept by the backend (a marker every worker reads about twice a second): workers
stop taking the queue's jobs, hand back the ones they had reserved ahead of a free slot
(unspent), and let the running ones finish. Dispatches go on; the jobs wait, and run after
`queue:resume`. Nothing is lost, whichever worker stops or dies meanwhile.
"""

from __future__ import annotations

import argparse

from core.commands._common import (
    CommandFailed,
    Connection,
    add_connection_flag,
    add_json_flag,
    guarded,
    open_connection,
    queue_name,
    say,
)
from core.settings import Settings

HELP = {
    "queue:pause": "pause a queue: workers stop taking its jobs until queue:resume",
    "queue:resume": "resume a paused queue",
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""
    add_connection_flag(parser)
    add_json_flag(parser)
    what = "pause" if name == "queue:pause" else "resume"
    parser.add_argument("queue", type=queue_name, help=f"the queue to {what}")


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run `queue:pause` or `queue:resume`; returns the exit code."""
    return await guarded(_run(name, args, settings))


async def _run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        return await _switch(args, conn, pause=name == "queue:pause")


async def _switch(args: argparse.Namespace, conn: Connection, *, pause: bool) -> int:
    driver, queue = conn.driver, args.queue
    if conn.name == "sync":
        raise CommandFailed(
            "the sync connection runs jobs inside dispatch(): it has no worker to pause"
        )
    try:
        was = queue in await driver.paused([queue])
        if pause:
            await driver.pause(queue)
        else:
            await driver.resume(queue)
    except NotImplementedError:
        raise CommandFailed(
            f"the {conn.name} connection cannot pause queues (it keeps no markers)"
        ) from None
    stats = await driver.stats(queue)
    waiting = stats.pending + stats.delayed + stats.deferred
    data = {
        "connection": conn.name,
        "queue": queue,
        "paused": pause,
        "was_paused": was,
        "waiting": waiting,
        "running": stats.reserved,
    }
    if pause:
        already = " (it already was)" if was else ""
        message = (
            f"Paused queue {queue} on {conn.name}{already}: workers take none of its jobs "
            f"until queue:resume {queue}; {waiting} job(s) wait in it."
        )
    else:
        already = "" if was else " (it was not paused)"
        message = (
            f"Resumed queue {queue} on {conn.name}{already}: workers take its {waiting} "
            "waiting job(s) again."
        )
    say(args, message, data)
    return 0
