"""Jobs the MQTT tests dispatch (under `tests.`, an allowed module prefix in the tests)."""

from __future__ import annotations

from typing import Any

from core.job import Job


class EchoJob(Job):
    """Publishes what it was given to `reply_to`, as a job reporting its result would."""

    def __init__(self, reply_to: str, device_id: str, reading: Any) -> None:
        super().__init__()
        self.reply_to = reply_to
        self.device_id = device_id
        self.reading = reading

    async def handle(self) -> None:
        await self.publish(
            self.reply_to,
            {"device_id": self.device_id, "reading": self.reading, "job_id": self.job_id},
        )
