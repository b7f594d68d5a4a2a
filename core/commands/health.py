"""`health`: whether the backend answers and live workers exist (exit code).

    python main.py health                    # exit 0: healthy, 1: not (the reason on stderr)
    python main.py health --connection redis --json
    python main.py health --no-workers       # the backend alone (a dispatch-only process)

For supervisors, container health checks and load balancers: the same check as `/health` on
the dashboard and on the metrics ports (`core.health.check_health`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from core.commands._common import (
    add_connection_flag,
    add_json_flag,
    error_summary,
    positive_seconds,
    write_json,
)
from core.errors import ConfigurationError, ServerMismatchError
from core.health import Health, check_health
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import ExitCode

HELP = {"health": "check that the backend answers and live workers exist (exit 0: healthy)"}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""
    add_connection_flag(parser)
    add_json_flag(parser)
    parser.add_argument(
        "--no-workers",
        action="store_true",
        help="healthy when the backend answers, even with no live worker",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long the backend may take to answer (default: 5)",
    )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Check, print the answer, and return 0 when healthy, 1 when not."""
    health = await _check(args, settings)
    if args.json:
        write_json(health.to_dict())
    elif health.ok:
        sys.stdout.write(
            f"healthy: the {health.connection} backend answers; {health.workers} live worker(s)\n"
        )
        sys.stdout.flush()
    if not health.ok:
        print(f"topiq: unhealthy: {health.error}", file=sys.stderr)
        return int(ExitCode.ERROR)
    return 0


async def _check(args: argparse.Namespace, settings: Settings) -> Health:
    async with QueueManager(settings) as manager:
        name = manager.connection_name(args.connection)  # an unknown name: usage error (2)
        timeout = args.timeout
        try:
            async with asyncio.timeout(timeout):
                driver = await manager.connection(name)
        except ServerMismatchError as exc:  # the server's answer shows a setting wrong
            return Health(False, name, False, 0, str(exc))
        except ConfigurationError:
            raise
        except TimeoutError:
            return Health(
                False,
                name,
                False,
                0,
                f"cannot reach the {name} backend: no answer within {timeout:g} s",
            )
        except Exception as exc:
            return Health(
                False, name, False, 0, f"cannot reach the {name} backend: {error_summary(exc)}"
            )
        return await check_health(driver, need_workers=not args.no_workers, timeout=args.timeout)
