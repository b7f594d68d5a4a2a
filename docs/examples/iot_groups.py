"""Per-device ordering with groups (docs/iot.md, "Per-device ordering: groups")."""

import asyncio
from collections import defaultdict

from app.jobs.update_display_job import UpdateDisplayJob
from core.events import EventKind, events
from core.mqtt import Router
from core.queue.queue_manager import QueueManager, dispatch
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker

router = Router()


# In an MQTT app the route says it: every job its handler dispatches runs in the device's group.
@router.on("devices/{device_id}/display", group="{device_id}")
async def display(device_id: str, payload: int) -> None:
    await dispatch(UpdateDisplayJob(device_id, payload))


def shown(device_id: str, value: int) -> UpdateDisplayJob:
    # Outside a route, the job says it (here on the instance; usually `group = "{device_id}"`
    # on the class): a template filled from the job's data.
    job = UpdateDisplayJob(device_id, value)
    job.group = "{device_id}"
    return job


async def main() -> list[str]:
    settings = Settings.load(env_file=None, queue_connection="memory")
    timeline: list[tuple[str, str]] = []  # (event, job id) in the order they happened
    unsubscribe = events.subscribe(lambda e: timeline.append((e.kind, e.job_id)))
    try:
        async with QueueManager(settings) as manager:
            names: dict[str, str] = {}
            for value in range(1, 4):  # three values for d-1, then one for d-2
                names[await manager.push(shown("d-1", value))] = f"d-1:{value}"
            names[await manager.push(shown("d-2", 1))] = "d-2:1"
            # Four jobs at a time, yet d-1's run one after another, in dispatch order.
            worker = Worker(manager, WorkerOptions(queues=("displays",), concurrency=4, max_jobs=4))
            await worker.run()
    finally:
        unsubscribe()
    starts = [names[job_id] for kind, job_id in timeline if kind == EventKind.STARTED]
    running: dict[str, int] = defaultdict(int)
    most: dict[str, int] = defaultdict(int)
    order: dict[str, list[str]] = defaultdict(list)
    for kind, job_id in timeline:
        if job_id not in names:
            continue
        device, value = names[job_id].split(":")
        if kind == EventKind.STARTED:
            running[device] += 1
            most[device] = max(most[device], running[device])
            order[device].append(value)
        elif kind == EventKind.SUCCEEDED:
            running[device] -= 1
    return [
        *(
            f"{device}: started {', '.join(order[device])}; at most {most[device]} at a time"
            for device in sorted(order)
        ),
        f"d-2 started before d-1's second: {starts.index('d-2:1') < starts.index('d-1:2')}",
    ]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/iot_groups.py`
    print("\n".join(asyncio.run(main())))
