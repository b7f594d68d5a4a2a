"""Offline spool rates (issue #14): how fast dispatches go into the MQTT app's spool while the
queue is down, and how fast the replay empties it into Redis once it is back.

    .venv/bin/python -m bench.spool                  # the table below, about half a minute
    .venv/bin/python -m bench.spool --jobs 2000      # smaller

Rows:

Jobs are bench/jobs.py's `NoopGrouped` (a device id as data).

* write, 1 handler: one dispatch at a time (each waits for its own fsync).
* write, N handlers: N handlers dispatching at once (the app's MQTT_HANDLER_CONCURRENCY is
  100): dispatches that arrive during a write share the next transaction and its fsync.
* replay into Redis: a private redis-server (no persistence), the replay's batches (status
  read per job, one push and one delete per batch of whole entries) until the spool is empty.

Dispatches go through `QueueManager.push` with the spool already holding jobs of the
connection, as during an outage after the first failed push (no connection attempt per
dispatch). The spool file is in a temporary folder under storage/ (the project's disk, real
fsyncs), removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.jobs import NoopGrouped as Reading
from bench.services import Server, free_port
from core.mqtt.spool import Spool
from core.queue.queue_manager import QueueManager
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    what: str
    jobs: int
    seconds: float
    transactions: int

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


def settings(folder: Path, redis_url: str, spool_max: int) -> Settings:
    return Settings.load(
        env_file=None,
        queue_connection="redis",
        redis_url=redis_url,
        queue_allowed_modules=("bench.",),
        mqtt_spool_path=folder / "spool.sqlite3",
        mqtt_spool_max=spool_max,
    )


async def write(folder: Path, jobs: int, handlers: int) -> Row:
    """Dispatch `jobs` readings from `handlers` concurrent handlers into the spool."""
    down = settings(folder, f"redis://127.0.0.1:{free_port()}/0", jobs + 10)
    manager = QueueManager(down)
    spool = Spool(down)
    manager.spool = spool
    try:
        await manager.push(Reading("d0"))  # fails over to the spool: it holds jobs
        writes = spool.writes
        per = jobs // handlers

        async def handler(h: int) -> None:
            for _ in range(per):
                await manager.push(Reading(f"d{h}"))

        started = time.perf_counter()
        await asyncio.gather(*(handler(h) for h in range(handlers)))
        took = time.perf_counter() - started
        label = "1 handler" if handlers == 1 else f"{handlers} handlers"
        return Row(f"write, {label}", per * handlers, took, spool.writes - writes)
    finally:
        await spool.close()
        await manager.close()


async def replay(folder: Path, redis_url: str) -> Row:
    """Replay whatever the spool file in `folder` holds into the Redis at `redis_url`."""
    up = settings(folder, redis_url, 10**9)
    manager = QueueManager(up)
    spool = Spool(up)
    await spool.open()
    manager.spool = spool
    try:
        total = spool.depth
        await manager.connection()  # connected before the clock starts
        batches = 0
        started = time.perf_counter()
        while spool.depth:
            await spool.replay_batch(manager, "redis")
            batches += 1
        took = time.perf_counter() - started
        return Row("replay into Redis", total, took, batches)
    finally:
        await spool.close()
        await manager.close()


def table(rows: list[Row]) -> str:
    lines = [
        "| what | jobs | seconds | jobs/s | transactions (write) / batches (replay) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.what} | {r.jobs:,} | {r.seconds:.2f} | {r.rate:,.0f} | {r.transactions:,} |"
        )
    return "\n".join(lines)


async def main_async(jobs: int, handlers: int) -> list[Row]:
    storage = ROOT / "storage"
    storage.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=storage))
    try:
        rows = [await write(folder / "one", max(jobs // 10, 100), 1)]
        rows.append(await write(folder / "many", jobs, handlers))
        with Server.redis(folder) as redis:
            rows.append(await replay(folder / "many", redis.url))
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs of the N-handler rows")
    parser.add_argument("--handlers", type=int, default=100, help="concurrent handlers (N)")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args.jobs, args.handlers))
    print(table(rows))


if __name__ == "__main__":
    main()
