"""Routes (docs/mqtt.md, "Routes")."""

from typing import Any

from core.mqtt import MessageContext, Publisher, Router

router = Router()


# `{name}` captures one topic level and passes it to the handler by name.
@router.on("devices/{device_id}/status", qos=1)
async def status(device_id: str, payload: Any) -> None:
    print(f"{device_id} is {payload['state']}")


# `+` matches exactly one level, `#` any number of levels (even none); neither is captured.
@router.on("sensors/+/temperature/#", qos=0)
async def temperature(topic: str, payload: Any) -> None:
    print(f"{topic}: {payload}")


# App processes subscribing with the same `shared` group split the messages between them.
@router.on("jobs/{kind}/requests", shared="workers")
async def job_request(kind: str, payload: Any, client: Publisher) -> None:
    await client.publish(f"jobs/{kind}/accepted", {"kind": kind, "request": payload})


# A group shares a prefix (parameters included), middleware and options.
floor = router.group("buildings/{building}/floors/{floor}", qos=1)


@floor.on("rooms/{room}/climate")
async def climate(building: str, floor: str, room: str, context: MessageContext) -> None:
    print(f"{building}/{floor}/{room}: {context.payload} (qos {context.qos})")


# Raw bytes stay bytes: the payload is parsed only when it is JSON.
@router.on("cameras/{camera}/snapshot")
async def snapshot(camera: str, payload: bytes | Any) -> None:
    print(f"{camera}: {len(payload)} bytes")
