"""The job docs/iot.md's examples dispatch: show a device's latest reading on its display."""

from typing import Any

from core.job import Job


class UpdateDisplayJob(Job):
    """Show `value` on the display of `device_id` (only the newest value matters)."""

    queue = "displays"

    def __init__(self, device_id: str, value: Any) -> None:
        self.device_id = device_id
        self.value = value

    async def handle(self) -> Any:
        # A real job would send it: `await self.publish(f"devices/{self.device_id}/display", ...)`.
        return self.value
