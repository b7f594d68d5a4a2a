"""Bad messages and failing handlers are logged and counted; the app handles the next one."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from pydantic import BaseModel

from core.mqtt import (
    ConnectionOptions,
    MqttApp,
    MqttClient,
    RateLimit,
    Router,
    Subscription,
    ValidatePayload,
)
from tests.mqtt.conftest import Broker, mosquitto_pub, running

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(30)]


class Reading(BaseModel):
    temperature: float


async def test_malformed_payloads_and_raising_handlers_are_logged_counted_and_survived(
    broker: Broker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    handled: asyncio.Queue[str] = asyncio.Queue()
    router = Router()

    @router.on(f"{prefix}/validated/{{device_id}}", middleware=[ValidatePayload(Reading)])
    async def validated(device_id: str, payload: Reading) -> None:
        handled.put_nowait(f"{device_id}:{payload.temperature}")

    @router.on(f"{prefix}/raises/{{what}}")
    async def raises(what: str, payload: Any) -> None:
        if what == "boom":
            raise RuntimeError("the handler broke")
        handled.put_nowait(f"raises:{what}")

    @router.on(f"{prefix}/limited/{{device_id}}", middleware=[RateLimit(1, per=3600)])
    async def limited(device_id: str) -> None:
        handled.put_nowait(f"limited:{device_id}")

    # One handler at a time: messages are then handled in the order they arrive, so once the
    # last one is handled, every earlier one has been dealt with.
    app = MqttApp(router, broker.settings(), concurrency=1)
    with caplog.at_level(logging.DEBUG, logger="topiq.mqtt"):
        async with running(app):
            await mosquitto_pub(broker, f"{prefix}/validated/d1", '{"temperature": ')
            await mosquitto_pub(broker, f"{prefix}/validated/d1", '{"temperature": "warm"}')
            await mosquitto_pub(broker, f"{prefix}/validated/d1", b"\xff\xfe")
            await mosquitto_pub(broker, f"{prefix}/raises/boom", "{}")
            await mosquitto_pub(broker, f"{prefix}/limited/d2", "1")
            await mosquitto_pub(broker, f"{prefix}/limited/d2", "2")  # over the limit
            await mosquitto_pub(broker, f"{prefix}/validated/", '{"temperature": 1}')  # no id
            await mosquitto_pub(broker, f"{prefix}/raises/fine", "{}")
            await mosquitto_pub(broker, f"{prefix}/validated/d1", '{"temperature": 20.5}')
            got = [await asyncio.wait_for(handled.get(), 10) for _ in range(3)]
    assert got == ["limited:d2", "raises:fine", "d1:20.5"]
    stats = app.stats
    assert (stats.received, stats.handled, stats.invalid, stats.failed) == (9, 3, 3, 1)
    assert (stats.rejected, stats.unmatched) == (1, 1)
    log = caplog.text
    assert f"invalid message on {prefix}/validated/d1" in log
    assert "Invalid JSON" in log and "temperature" in log
    assert f"raises failed on {prefix}/raises/boom" in log
    assert "RuntimeError: the handler broke" in log  # with the traceback
    assert f"no route for {prefix}/validated/; message ignored" in log
    assert "over its limit" in log


async def test_two_processes_sharing_a_client_id_are_told_to_fix_it(
    broker: Broker, prefix: str
) -> None:
    settings = broker.settings()  # the same client id for both connections
    options = ConnectionOptions.from_settings(settings, reconnect_min=0.2, reconnect_max=0.4)
    told = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "MQTT_CLIENT_ID" in record.getMessage():
                told.set()

    watch = Watch(logging.ERROR)
    logging.getLogger("topiq.mqtt").addHandler(watch)
    try:
        subscriptions = [Subscription(f"{prefix}/#", 1)]
        async with MqttClient(options, subscriptions), MqttClient(options, subscriptions):
            await asyncio.wait_for(told.wait(), 20)
    finally:
        logging.getLogger("topiq.mqtt").removeHandler(watch)
