"""One kind of work spread over three queues, so that the three primaries of a Redis Cluster
share it (docs/scaling.md, "One queue lives on one primary")."""

import zlib

from redis.crc import key_slot

from app.jobs.store_telemetry_job import StoreTelemetryJob
from core.queue.queue_manager import JobHandle, queue

# Every key of a queue carries the hash tag {<REDIS_PREFIX>:<queue>}: one slot per queue.
# These three names hash into the three slot ranges `redis-cli --cluster create` gives three
# primaries (0-5460, 5461-10922, 10923-16383) with the default REDIS_PREFIX, topiq.
TELEMETRY_QUEUES = ("telemetry-a", "telemetry-b", "telemetry-c")


def slot(queue_name: str, prefix: str = "topiq") -> int:
    """The cluster slot (0-16383) of every key of `queue_name`."""
    return key_slot(f"{{{prefix}:{queue_name}}}".encode())


def telemetry_queue(device_id: str) -> str:
    """The queue of a device's readings: always the same one for the same device."""
    return TELEMETRY_QUEUES[zlib.crc32(device_id.encode()) % len(TELEMETRY_QUEUES)]


async def store(device_id: str, temperature: float) -> JobHandle:
    job = StoreTelemetryJob(device_id, {"temperature": temperature})
    return await queue.push(job, queue=telemetry_queue(device_id))
