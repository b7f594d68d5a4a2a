"""Middleware and payload validation (docs/mqtt.md, "Middleware")."""

from typing import Any

from pydantic import BaseModel

from core.mqtt import (
    CallNext,
    LoggingMiddleware,
    MessageContext,
    RateLimit,
    Router,
    ValidatePayload,
)


class Telemetry(BaseModel):
    temperature: float
    humidity: float | None = None
    ts: float | None = None


async def skip_retained(context: MessageContext, call_next: CallNext) -> Any:
    """Retained messages are old news replayed on every subscribe: ignore them."""
    if context.retain:
        return None
    return await call_next(context)


# Around every route: one log line per message, with the time the handler took.
router = Router(middleware=[LoggingMiddleware(), skip_retained])

# Each device may send 10 messages a second on average, in bursts of up to 20.
devices = router.group("devices/{device_id}", middleware=[RateLimit(10, per=1.0, burst=20)])


@devices.on("telemetry", middleware=[ValidatePayload(Telemetry)])
async def telemetry(device_id: str, payload: Telemetry) -> None:
    print(f"{device_id}: {payload.temperature} °C")
