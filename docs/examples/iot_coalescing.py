"""Latest-value coalescing (docs/iot.md, "Latest-value coalescing")."""

import asyncio

from app.jobs.update_display_job import UpdateDisplayJob
from core.mqtt import Router
from core.queue.queue_manager import QueueManager, dispatch
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker

router = Router()


# In an MQTT app the route says it: a job its handler dispatches replaces the device's
# waiting one (the key is the job's class and the rendered template).
@router.on("devices/{device_id}/display", coalesce="{device_id}")
async def display(device_id: str, payload: int) -> None:
    await dispatch(UpdateDisplayJob(device_id, payload))


def latest(device_id: str, value: int) -> UpdateDisplayJob:
    # Outside a route, the same with a key of the job's own (and a group: one run at a time).
    job = UpdateDisplayJob(device_id, value)
    job.unique_key = f"display:{device_id}"
    job.on_duplicate = "replace"
    job.group = f"display:{device_id}"
    return job


async def main() -> list[str]:
    settings = Settings.load(env_file=None, queue_connection="memory")
    async with QueueManager(settings) as manager:
        handles = [await manager.push(latest("d-1", value)) for value in range(1, 1001)]
        waiting = await manager.size("displays")
        worker = Worker(manager, WorkerOptions(queues=("displays",), stop_when_empty=True))
        await worker.run()
        [stats] = await manager.stats("displays")
        result = await handles[0].result()
    return [
        f"1000 readings pushed, jobs waiting: {waiting}, all the same job: {len(set(handles))}",
        f"the job ran with value {result}",
        f"coalesced: {stats.coalesced}, succeeded: {stats.succeeded}",
    ]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/iot_coalescing.py`
    print("\n".join(asyncio.run(main())))
