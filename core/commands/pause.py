"""`queue:pause NAME` and `queue:resume NAME`: stop and restart the taking of a queue's jobs."""

from __future__ import annotations

import argparse

from core.settings import Settings

HELP = {
    "queue:pause": "pause a queue: workers stop taking its jobs until queue:resume",
    "queue:resume": "resume a paused queue",
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Not built yet."""
    raise NotImplementedError(name)
