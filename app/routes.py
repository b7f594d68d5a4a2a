"""The app's routes: what `python main.py` subscribes to and who handles it."""

from __future__ import annotations

from pydantic import BaseModel

from app.controllers.order_controller import OrderController
from app.jobs.store_telemetry_job import StoreTelemetryJob
from core.mqtt import LoggingMiddleware, RateLimit, Router, ValidatePayload
from core.queue.queue_manager import dispatch


class Telemetry(BaseModel):
    """One reading from a device."""

    temperature: float
    humidity: float | None = None
    ts: float | None = None


router = Router(middleware=[LoggingMiddleware()])

# Every device topic: at most 10 messages a second per device, bursts of 20.
devices = router.group("devices/{device_id}", middleware=[RateLimit(10, burst=20)])


@devices.on("telemetry", qos=1, middleware=[ValidatePayload(Telemetry)])
async def telemetry(device_id: str, payload: Telemetry) -> None:
    """Queue the reading for storage; answer in milliseconds."""
    await dispatch(StoreTelemetryJob(device_id, payload.model_dump(exclude_none=True)))


router.on("orders/{order_id}/new", OrderController.handle_new_order, qos=1)
