"""`queue:restart`: ask every worker to finish its current jobs and exit.

Workers read the signal with their heartbeat (every few seconds); supervisord then starts them
again, on the code that is deployed now. Nothing is lost: a worker finishing its jobs takes no
new ones, and the jobs it had not started go back to their queue.

    python main.py queue:restart --connection redis
"""

from __future__ import annotations

import argparse
import time

from core.commands._common import (
    add_connection_flag,
    add_json_flag,
    guarded,
    open_connection,
    say,
    stamp,
)
from core.settings import Settings

HELP = {
    "queue:restart": "make every worker finish its current jobs and exit (supervisord restarts it)"
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of `queue:restart`."""
    add_connection_flag(parser)
    add_json_flag(parser)


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Record the restart request on the connection; returns the exit code."""
    return await guarded(_restart(args, settings))


async def _restart(args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        # Every worker started before this moment stops; the ones supervisord starts next
        # were started after it, so they keep running.
        at = time.time()
        await conn.driver.request_restart(at)
        workers = len(await conn.driver.workers())
    say(
        args,
        f"Restart requested on {conn.name} at {stamp(at)}: {workers} worker(s) alive now will "
        "finish their current jobs and exit; supervisord starts them again.",
        {"connection": conn.name, "requested_at": at, "workers": workers},
    )
    return 0
