"""The code in docs/mqtt.md runs from the project directory as written: its examples live in
docs/examples/mqtt_*.py, the job it shows ships in app/jobs/install_firmware_job.py."""

from __future__ import annotations

import json
import uuid
from types import ModuleType
from typing import Any

import pytest

from app.jobs.install_firmware_job import InstallFirmwareJob
from core.mqtt import (
    IncomingMessage,
    InvalidPayloadError,
    MessageContext,
    Publisher,
    RateLimitedError,
    Router,
)
from core.mqtt.publisher import close as close_publishing_connection
from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, docs_example, make_settings
from tests.mqtt.conftest import Broker, MosquittoSub

pytestmark = [pytest.mark.timeout(30)]

EXAMPLES = ("mqtt_routes", "mqtt_middleware", "mqtt_controllers", "mqtt_publishing")


def example(name: str) -> ModuleType:
    return docs_example(name)


class RecordingClient(Publisher):
    """A `client` that keeps what handlers publish instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, Any]] = []

    async def publish(self, topic: str, payload: Any, **options: Any) -> None:
        self.sent.append((topic, payload))


async def deliver(
    router: Router, topic: str, payload: bytes, client: Publisher | None = None, **kw: Any
) -> Any:
    """Run a message through the router as the app would (middleware included)."""
    router.freeze()
    found = router.resolve(topic)
    assert found is not None, f"no route for {topic}"
    route, params = found
    message = IncomingMessage(topic, payload, **kw)
    return await route(MessageContext(message, params, route, client or RecordingClient()))


def test_the_guide_includes_the_examples_verbatim() -> None:
    guide = (ROOT / "docs" / "mqtt.md").read_text()
    shown = [f"docs/examples/{name}.py" for name in EXAMPLES] + ["app/jobs/install_firmware_job.py"]
    for path in shown:
        body = (ROOT / path).read_text().split('"""', 2)[2].strip()
        assert body in guide, f"docs/mqtt.md does not show {path} as it is"
    assert "```python\n# app/jobs/install_firmware_job.py\n" in guide
    assert "examples." not in guide  # no module the default QUEUE_ALLOWED_MODULES refuses


async def test_routes_example(capsys: pytest.CaptureFixture[str]) -> None:
    router: Router = example("mqtt_routes").router
    client = RecordingClient()
    await deliver(router, "devices/d1/status", b'{"state": "online"}')
    await deliver(router, "sensors/s1/temperature", b"21.5")
    await deliver(router, "sensors/s1/temperature/celsius/raw", b"21.5")
    await deliver(router, "jobs/resize/requests", b'{"w": 10}', client)
    await deliver(router, "buildings/b1/floors/2/rooms/201/climate", b'{"co2": 600}', qos=1)
    await deliver(router, "cameras/c1/snapshot", b"\xff\xd8\xff\xe0")
    assert capsys.readouterr().out.splitlines() == [
        "d1 is online",
        "sensors/s1/temperature: 21.5",
        "sensors/s1/temperature/celsius/raw: 21.5",
        "b1/2/201: {'co2': 600} (qos 1)",
        "c1: 4 bytes",
    ]
    assert client.sent == [("jobs/resize/accepted", {"kind": "resize", "request": {"w": 10}})]
    filters = {s.filter for s in router.subscriptions()}
    assert "$share/workers/jobs/+/requests" in filters
    assert "buildings/+/floors/+/rooms/+/climate" in filters
    assert router.resolve("sensors/s1/humidity") is None


async def test_middleware_example(capsys: pytest.CaptureFixture[str]) -> None:
    router: Router = example("mqtt_middleware").router
    await deliver(router, "devices/d1/telemetry", b'{"temperature": 21.5}')
    assert capsys.readouterr().out == "d1: 21.5 °C\n"
    assert await deliver(router, "devices/d1/telemetry", b"{}", retain=True) is None
    assert capsys.readouterr().out == ""
    with pytest.raises(InvalidPayloadError):
        await deliver(router, "devices/d1/telemetry", b'{"temperature": "hot"}')
    for _ in range(20):  # the burst
        await deliver(router, "devices/d2/telemetry", b'{"temperature": 20}')
    with pytest.raises(RateLimitedError):
        await deliver(router, "devices/d2/telemetry", b'{"temperature": 20}')


async def test_controllers_example(capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(queue_connection="memory")
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            router: Router = example("mqtt_controllers").router
            answer = await deliver(router, "orders/42/new", b'{"items": []}')
            assert answer == {"status": "accepted", "order_id": "42"}
            assert await manager.size() == 1
        finally:
            set_default_manager(None)
    assert capsys.readouterr().out == "Received new order 42\n"


@pytest.mark.mqtt
async def test_publishing_example(broker: Broker) -> None:
    device = f"docs-{uuid.uuid4().hex[:10]}"
    module = example("mqtt_publishing")
    # The settings a worker or script would have: the default manager's.
    async with QueueManager(broker.settings()) as manager:
        set_default_manager(manager)
        try:
            async with MosquittoSub(broker, f"devices/{device}/#") as sub:
                await InstallFirmwareJob(device, "2.1.0").handle()
                await module.reboot(device)
                received = await sub.receive(2)
        finally:
            await close_publishing_connection()
            set_default_manager(None)
    assert [(t, json.loads(p)) for t, p in received] == [
        (f"devices/{device}/firmware", {"status": "installed", "version": "2.1.0"}),
        (f"devices/{device}/commands", {"command": "reboot"}),
    ]
