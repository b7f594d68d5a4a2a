"""Bounded queues (docs/iot.md, "Bounded queues")."""

import asyncio

from app.jobs.update_display_job import UpdateDisplayJob
from core.errors import QueueFullError
from core.queue.queue_manager import QueueManager
from core.settings import Settings


async def main() -> list[str]:
    # QUEUE_MAX_LENGTHS in .env: "displays" refuses a 4th waiting job, "alarms" drops the oldest.
    settings = Settings.load(
        env_file=None,
        queue_connection="memory",
        queue_max_lengths="displays=3,alarms=3:drop_oldest",
    )
    lines = []
    async with QueueManager(settings) as manager:
        for value in range(1, 6):
            try:
                await manager.push(UpdateDisplayJob("d-1", value))
            except QueueFullError as exc:
                lines.append(f"value {value}: {exc}")
        alarms = [
            await manager.push(UpdateDisplayJob("d-1", value), queue="alarms")
            for value in range(1, 6)
        ]
        for value, handle in enumerate(alarms, start=1):
            status = await handle.status()
            if status is not None and status.status == "cancelled":
                lines.append(f"alarm {value}: {status.error}")
        for stats in sorted(await manager.stats(), key=lambda s: s.queue):
            lines.append(
                f"{stats.queue}: {stats.pending} waiting, {stats.rejected} rejected, "
                f"{stats.dropped} dropped"
            )
    return lines


if __name__ == "__main__":  # `.venv/bin/python docs/examples/iot_bounded.py`
    print("\n".join(asyncio.run(main())))
