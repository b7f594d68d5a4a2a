"""The README's example job: store one sensor reading (`storage/readings.jsonl`)."""

import asyncio
from pathlib import Path

import orjson

from core.job import Job


class StoreReadingJob(Job):
    max_tries = 5
    retry_after = [1, 10, 60]  # seconds before the 2nd, 3rd, ... try (the last one repeats)

    def __init__(self, device_id: str, value: float) -> None:
        self.device_id = device_id  # public attributes are the payload (JSON)
        self.value = value

    async def handle(self) -> None:
        line = orjson.dumps({"device_id": self.device_id, "value": self.value}) + b"\n"
        await asyncio.to_thread(self._append, line)  # file I/O off the event loop

    def _append(self, line: bytes) -> None:
        Path("storage").mkdir(exist_ok=True)
        with Path("storage/readings.jsonl").open("ab") as file:
            file.write(line)
