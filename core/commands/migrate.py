"""`queue:migrate`: create or upgrade the database queue's tables, then print the version."""

from __future__ import annotations

import argparse
import sys

from core.errors import TopiqError
from core.queue.drivers.sql_migrations import create_engine, migrate, safe_url
from core.settings import Settings
from core.worker.options import ExitCode

HELP = {
    "queue:migrate": "create or upgrade the database queue tables (queue_jobs, queue_failed_jobs, "
    "…) on DB_URL / DB_* / the SQLite file; converts RouteMQ's tables, keeping their jobs"
}


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """No flags: the database comes from the settings."""


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run the migrations; one line of output either way, no traceback on failure."""
    dsn = settings.database_dsn
    try:
        engine = create_engine(dsn, pool_size=1)
        try:
            version = await migrate(engine, convert_seed=True)
        finally:
            await engine.dispose()
    except TopiqError as exc:
        print(f"topiq: {name} failed: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    print(f"queue tables at {safe_url(dsn)} are at schema version {version}")
    return ExitCode.OK
