"""Store a device's telemetry reading and alert the device when it runs too hot."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import orjson

from core.job import Job

logger = logging.getLogger("topiq.app.StoreTelemetryJob")


class StoreTelemetryJob(Job):
    """Append one reading to `storage/telemetry/<day>.jsonl`; publish an alert on
    `devices/<device_id>/alerts` when the temperature reaches `alert_threshold`.

    Attributes:
        device_id: The device that sent the reading.
        reading: The validated reading (`temperature`, optional `humidity` and `ts`).
    """

    alert_threshold: ClassVar[float] = 30.0
    directory: ClassVar[Path] = Path("storage/telemetry")
    max_tries = 5
    retry_after = (1, 5, 30)

    def __init__(self, device_id: str, reading: dict[str, Any]) -> None:
        super().__init__()
        self.device_id = device_id
        self.reading = reading

    async def handle(self) -> None:
        """Store the reading, then alert if it is over the threshold."""
        record = {"device_id": self.device_id, "stored_at": round(time.time(), 3), **self.reading}
        # File I/O blocks: keep it off the event loop the worker shares with other jobs.
        await asyncio.to_thread(self._append, record)
        temperature = float(self.reading["temperature"])
        if temperature >= self.alert_threshold:
            logger.warning(
                "device %s at %.1f°C (threshold %.1f°C): alerting",
                self.device_id,
                temperature,
                self.alert_threshold,
            )
            await self.publish(
                f"devices/{self.device_id}/alerts",
                {
                    "device_id": self.device_id,
                    "alert": "temperature",
                    "temperature": temperature,
                    "threshold": self.alert_threshold,
                    "job_id": self.job_id,
                },
            )

    def _append(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{time.strftime('%Y-%m-%d', time.gmtime())}.jsonl"
        # One write of one line in append mode: lines from concurrent workers do not mix.
        with path.open("ab") as file:
            file.write(orjson.dumps(record) + b"\n")
