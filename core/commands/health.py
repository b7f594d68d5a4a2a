"""`health`: whether the backend answers and live workers exist (exit code)."""

from __future__ import annotations

import argparse

from core.settings import Settings

HELP = {
    "health": "check that the backend answers and live workers exist (exit 0: healthy)"
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Not built yet."""
    raise NotImplementedError(name)
