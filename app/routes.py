"""The app's routes: what `python main.py` subscribes to and who handles it."""

from __future__ import annotations

from pydantic import BaseModel

from app.controllers.order_controller import OrderController
from app.jobs.store_telemetry_job import StoreTelemetryJob
from app.jobs.update_device_state_job import UpdateDeviceStateJob
from core.mqtt import LoggingMiddleware, RateLimit, Router, ValidatePayload
from core.queue.queue_manager import dispatch


class Telemetry(BaseModel):
    """One reading from a device."""

    temperature: float
    humidity: float | None = None
    ts: float | None = None


class DeviceState(BaseModel):
    """A device's state report, numbered by the device."""

    seq: int
    setpoint: float | None = None


router = Router(middleware=[LoggingMiddleware()])

# Every device topic: at most 10 messages a second per device, bursts of 20; the jobs of one
# device run one at a time, in the order its messages came (`group`).
devices = router.group(
    "devices/{device_id}", middleware=[RateLimit(10, burst=20)], group="{device_id}"
)


@devices.on("telemetry", qos=1, middleware=[ValidatePayload(Telemetry)])
async def telemetry(device_id: str, payload: Telemetry) -> None:
    """Queue the reading for storage; answer in milliseconds."""
    await dispatch(StoreTelemetryJob(device_id, payload.model_dump(exclude_none=True)))


@devices.on(
    "state",
    qos=1,
    middleware=[ValidatePayload(DeviceState)],
    coalesce="{device_id}",  # a report still waiting is replaced by the newer one
    status_topic="devices/{device_id}/status",  # each job's outcome is published there
)
async def state(device_id: str, payload: DeviceState) -> None:
    """Queue the latest state of the device."""
    await dispatch(UpdateDeviceStateJob(device_id, payload.model_dump(exclude_none=True)))


router.on("orders/{order_id}/new", OrderController.handle_new_order, qos=1)
