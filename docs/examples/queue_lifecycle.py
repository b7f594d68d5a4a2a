"""Handles, results, your own ids, cancel (docs/queue.md, "Job lifecycle")."""

import asyncio

from app.jobs.poll_device_job import PollDeviceJob
from app.jobs.send_notification_job import SendNotificationJob
from app.jobs.store_telemetry_job import StoreTelemetryJob
from core.errors import DuplicateJobError
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker


async def main() -> list[str]:
    lines = []
    settings = Settings.load(env_file=None, queue_connection="memory")
    async with QueueManager(settings) as manager:
        # dispatch/push/later/bulk return handles; a handle is a str equal to the job id.
        poll = await manager.push(PollDeviceJob("sensor-1"), queue="devices")
        lines.append(f"{(await poll.status()).status} after dispatch")

        # A worker (here in this process) runs it while we wait for its result.
        worker = Worker(manager, WorkerOptions(queues=("devices",), max_jobs=3))
        _, value = await asyncio.gather(worker.run(), poll.result(timeout=10))
        record = await poll.status()
        lines.append(f"{record.status} after {record.attempts} tries: {value!r}")

        # Your own id: a second dispatch while the first waits is refused...
        welcome = SendNotificationJob(7, "Welcome!")
        await manager.push(welcome, job_id="welcome-7")
        try:
            await manager.push(SendNotificationJob(7, "Welcome again"), job_id="welcome-7")
        except DuplicateJobError as exc:
            lines.append(f"refused: {exc.existing} is waiting")
        # ...or answered with the waiting job's handle.
        same = await manager.push(
            SendNotificationJob(7, "Welcome again"), job_id="welcome-7", on_duplicate="keep"
        )
        lines.append(f"kept {same}")

        # At most one waiting job per unique_key; with "replace" it carries the newest data.
        ids = set()
        for temperature in (20.5, 21.0, 21.5):
            reading = StoreTelemetryJob("d1", {"temperature": temperature})
            reading.unique_key = "telemetry:d1"
            reading.on_duplicate = "replace"
            ids.add(await manager.push(reading, queue="telemetry"))
        lines.append(f"{len(ids)} telemetry job waiting, size {await manager.size('telemetry')}")

        # A handle can be rebuilt from an id anywhere; a waiting job is removed by cancel().
        handle = manager.job("welcome-7")
        lines.append(f"cancelled: {await handle.cancel()}, now {await handle.status()}")
    return lines


if __name__ == "__main__":  # `.venv/bin/python docs/examples/queue_lifecycle.py`
    print("\n".join(asyncio.run(main())))
