"""Jobs and the app of tests/test_iot_outcomes.py and tests/test_iot_requests.py.

The app subprocess loads `serve --app tests.iot_outcome_jobs:router`; worker processes run
the jobs (QUEUE_ALLOWED_MODULES includes `tests.`). Topics start with `topiq-test/<run>/`.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from core.job import Job
from core.mqtt import Router
from core.queue.queue_manager import dispatch


class Answer(Job):
    """Succeeds with a result built from its data."""

    queue = "iot-outcomes"

    def __init__(self, value: Any) -> None:
        self.value = value

    async def handle(self) -> dict[str, Any]:
        return {"answer": self.value}


class Boom(Job):
    """Fails every try with a two-line message (the outcome carries the first line only)."""

    queue = "iot-outcomes"
    max_tries = 2
    retry_after = 0

    async def handle(self) -> None:
        raise ValueError("boom\nsecond line")


class Sleepy(Job):
    """Runs until cancelled; sets `started` (a test's event, in-process workers) first."""

    queue = "iot-outcomes"
    started: ClassVar[asyncio.Event | None] = None

    async def handle(self) -> None:
        if Sleepy.started is not None:
            Sleepy.started.set()
        await asyncio.sleep(60)


class Command(Job):
    """Sends a command to a device with `Job.request` and returns the reply."""

    queue = "iot-outcomes"
    max_tries = 2
    retry_after = 0

    def __init__(self, topic: str, payload: Any, wait: float) -> None:
        self.topic = topic
        self.payload = payload
        self.wait = wait

    async def handle(self) -> Any:
        return await self.request(self.topic, self.payload, timeout=self.wait)


#: `topiq-test/<run>/ask/<device_id>`: dispatches an `Answer`; its outcome goes to the
#: message's Response Topic (when MQTT_RESPONSE_TOPICS allows it) and to the device's status
#: topic.
router = Router()


@router.on(
    "topiq-test/{run}/ask/{device_id}", qos=1, status_topic="topiq-test/{run}/status/{device_id}"
)
async def ask(run: str, device_id: str, payload: Any) -> None:
    await dispatch(Answer({"device": device_id, "asked": payload}))
