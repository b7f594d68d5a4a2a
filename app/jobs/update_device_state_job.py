"""Apply a device's reported state; only the latest report of a device matters."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from core.job import Job

logger = logging.getLogger("topiq.app.UpdateDeviceStateJob")


class UpdateDeviceStateJob(Job):
    """Bring the device's record (its "twin") up to the state it reported.

    The route that dispatches it (app/routes.py) runs one job per device at a time, in the
    order the reports came (`group`), keeps only the latest report of a device waiting
    (`coalesce`) and publishes each job's outcome on `devices/<device_id>/status`
    (`status_topic`); its return value is the outcome's `result`.

    Attributes:
        device_id: The device that reported.
        state: The validated report (`seq`, numbered by the device, and `setpoint`).
    """

    seconds: ClassVar[float] = 0.3  # what the update takes: long enough for reports to pile up

    def __init__(self, device_id: str, state: dict[str, Any]) -> None:
        super().__init__()
        self.device_id = device_id
        self.state = state

    async def handle(self) -> dict[str, Any]:
        await asyncio.sleep(self.seconds)
        logger.info("device %s: state #%s applied", self.device_id, self.state.get("seq"))
        return {"device_id": self.device_id, **self.state}
