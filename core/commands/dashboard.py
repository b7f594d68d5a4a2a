"""`dashboard`: the web dashboard (Starlette + uvicorn)."""

from __future__ import annotations

import argparse

from core.settings import Settings

HELP = {"dashboard": "serve the web dashboard: queues, jobs, workers, failed jobs, metrics"}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Not built yet."""
    raise NotImplementedError(name)
