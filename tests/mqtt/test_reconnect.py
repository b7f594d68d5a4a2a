"""The broker goes away and comes back: the app reconnects and resubscribes by itself, and the
QoS 1 messages published while it was away reach it (persistent session)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from core.mqtt import ConnectionOptions, MqttApp, Router
from tests.mqtt.conftest import MosquittoProcess, free_port, mosquitto_pub, running

pytestmark = [pytest.mark.mqtt, pytest.mark.process, pytest.mark.timeout(90)]


async def take(inbox: asyncio.Queue[str], count: int, timeout: float = 30) -> list[str]:
    return [await asyncio.wait_for(inbox.get(), timeout) for _ in range(count)]


async def test_the_app_reconnects_resubscribes_and_gets_what_was_sent_while_away(
    tmp_path: Path,
) -> None:
    port = free_port()
    mosquitto = MosquittoProcess(port, tmp_path / "persistent")
    await mosquitto.start()
    broker = mosquitto.broker
    inbox: asyncio.Queue[str] = asyncio.Queue()
    router = Router()

    @router.on("plant/{machine}/events", qos=1)
    async def event(machine: str, payload: Any) -> None:
        inbox.put_nowait(f"{machine}:{payload['n']}")

    settings = broker.settings(mqtt_clean_session=False)  # the persistent session under test
    # The first reconnect attempt comes 2-4 s after the loss: time enough to publish while the
    # app is away, on purpose (it would otherwise be back within a second).
    options = ConnectionOptions.from_settings(settings, reconnect_min=4.0, reconnect_max=8.0)
    app = MqttApp(router, settings, options=options)
    try:
        async with running(app):
            await mosquitto_pub(broker, "plant/m1/events", '{"n": 0}')
            assert await take(inbox, 1) == ["m1:0"]

            # 1. Restart with persistence: the session and its subscription survive.
            await mosquitto.stop()
            await asyncio.wait_for(app.client.wait_disconnected(), 10)
            await mosquitto.start()
            for n in (1, 2, 3):
                await mosquitto_pub(broker, f"plant/m{n}/events", f'{{"n": {n}}}', qos=1)
            assert not app.client.connected, "the app came back before the test published"
            got = await take(inbox, 3)
            if "m1:0" in got:
                # m1:0 is acknowledged after its handler returned: when the broker stopped
                # before the acknowledgement reached it, it sends m1:0 again (at-least-once).
                got.remove("m1:0")
                got += await take(inbox, 1)
            assert sorted(got) == ["m1:1", "m2:2", "m3:3"]
            assert app.stats.connects == 2

            # 2. A broker with no memory of the app: only resubscribing gets messages through.
            await mosquitto.stop()
            await asyncio.wait_for(app.client.wait_disconnected(), 10)
            mosquitto = MosquittoProcess(port, tmp_path / "fresh")
            await mosquitto.start()
            await asyncio.wait_for(app.wait_ready(), 30)
            await mosquitto_pub(broker, "plant/m9/events", '{"n": 9}')
            assert await take(inbox, 1) == ["m9:9"]
            assert app.stats.connects == 3
    finally:
        await mosquitto.stop()
    assert app.stats.handled in (5, 6) and app.stats.failed == 0  # 6: m1:0 twice (above)
