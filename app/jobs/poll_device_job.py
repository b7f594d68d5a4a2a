"""The job docs/queue.md shows for `Retry` (a try that is not a failure)."""

from core.errors import Retry
from core.job import Job


class PollDeviceJob(Job):
    """Ask for another try, without reporting a failure, while a device is still busy."""

    max_tries = 10

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id

    async def handle(self) -> str:
        if self.attempts < 3:  # pretend the device answers on the third poll
            raise Retry(delay=0.01)
        return "ready"
