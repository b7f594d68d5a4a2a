"""The job docs/iot.md's outcome and command examples dispatch: set a thermostat's setpoint."""

from typing import Any

from core.job import Job


class SetSetpointJob(Job):
    """Send the new setpoint to the device and return its confirmation.

    No confirmation within 5 s fails the try (`RequestTimeoutError`): the command is sent
    again, up to 3 tries, each with its own correlation data. Every ending is published on
    the device's status topic.
    """

    queue = "devices"
    max_tries = 3
    retry_after = 1
    status_topic = "devices/{device_id}/status"

    def __init__(self, device_id: str, celsius: float) -> None:
        self.device_id = device_id
        self.celsius = celsius

    async def handle(self) -> Any:
        return await self.request(
            f"devices/{self.device_id}/commands", {"setpoint": self.celsius}, timeout=5
        )
