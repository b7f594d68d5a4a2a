"""The whole flow on a real Mosquitto: a device publishes (mosquitto_pub), the route handler
dispatches a job, a worker runs it, the job publishes its result, a device receives it
(mosquitto_sub)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from core.mqtt import MessageContext, MqttApp, Router
from core.mqtt.options import Protocol
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from tests.mqtt.conftest import (
    AppProcess,
    Broker,
    MosquittoSub,
    mosquitto_pub,
    running,
    running_worker,
)
from tests.mqtt.jobs import EchoJob

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(60)]


def reading_router(prefix: str) -> Router:
    router = Router()

    @router.on(f"{prefix}/devices/{{device_id}}/reading", qos=1)
    async def reading(device_id: str, payload: Any) -> None:
        await dispatch(EchoJob(f"{prefix}/results/{device_id}", device_id, payload))

    return router


async def test_a_job_dispatched_by_a_handler_publishes_its_result(
    broker: Broker, prefix: str
) -> None:
    settings = broker.settings(queue_default="mqtt-flow")
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            app = MqttApp(reading_router(prefix), settings)
            async with (
                running(app),
                running_worker(manager, "mqtt-flow"),
                MosquittoSub(broker, f"{prefix}/results/#") as device,
            ):
                await mosquitto_pub(broker, f"{prefix}/devices/d-7/reading", '{"celsius": 21.5}')
                [(topic, payload)] = await device.receive(1)
        finally:
            set_default_manager(None)
    assert topic == f"{prefix}/results/d-7"
    result = json.loads(payload)
    assert result["device_id"] == "d-7"
    assert result["reading"] == {"celsius": 21.5}
    assert app.stats.received == app.stats.handled == 1
    assert app.stats.failed == app.stats.invalid == 0


@pytest.mark.process
async def test_the_job_runs_in_a_worker_process_that_publishes_over_its_own_connection(
    broker: Broker, tmp_path: Path
) -> None:
    run = tmp_path.name[-12:].replace("_", "-")
    db = f"sqlite+aiosqlite:///{tmp_path}/queue.sqlite3"
    env = broker.env(QUEUE_CONNECTION="database", DB_URL=db)
    # The app in a process of its own too: `python main.py --app ...` with no --worker.
    app = await AppProcess(["serve", "--app", "tests.mqtt.apps:flow"], env).start()
    worker = await AppProcess(["queue:work"], env).start()
    try:
        await app.wait_for_line("connected to the MQTT broker")
        async with MosquittoSub(broker, f"topiq-test/{run}/results/+") as device:
            await mosquitto_pub(broker, f"topiq-test/{run}/devices/d-1/reading", '{"celsius": 19}')
            await mosquitto_pub(broker, f"topiq-test/{run}/devices/d-2/reading", '{"celsius": 23}')
            received = dict(await device.receive(2, timeout=30))
        assert json.loads(received[f"topiq-test/{run}/results/d-1"])["reading"] == {"celsius": 19}
        assert json.loads(received[f"topiq-test/{run}/results/d-2"])["reading"] == {"celsius": 23}
    finally:
        app_code = await app.stop()
        worker_code = await worker.stop()
    assert app_code == 0, app.log
    assert worker_code == 0, worker.log
    assert "2 received, 2 handled" in app.log


async def test_mqtt5_request_response_replies_with_the_handlers_return_value(
    broker: Broker, prefix: str
) -> None:
    router = Router()

    @router.on(f"{prefix}/rpc/{{name}}")
    async def hello(name: str, context: MessageContext) -> dict[str, Any]:
        return {"hello": name, "correlation": context.properties.correlation_data.decode()}  # type: ignore[union-attr]

    app = MqttApp(router, broker.settings())
    async with running(app), MosquittoSub(broker, f"{prefix}/reply", extra=["-V", "mqttv5"]) as sub:
        await mosquitto_pub(
            broker,
            f"{prefix}/rpc/ada",
            "{}",
            extra=[
                *("-V", "mqttv5"),
                *("-D", "publish", "response-topic", f"{prefix}/reply"),
                *("-D", "publish", "correlation-data", "req-1"),
            ],
        )
        [(topic, payload)] = await sub.receive(1)
    assert topic == f"{prefix}/reply"
    assert json.loads(payload) == {"hello": "ada", "correlation": "req-1"}


async def test_a_message_matching_overlapping_routes_is_handled_once(
    broker: Broker, prefix: str
) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()
    router = Router()

    @router.on(f"{prefix}/ovl/{{x}}")
    async def one(x: str) -> None:
        seen.put_nowait(f"one:{x}")

    @router.on(f"{prefix}/ovl/#")
    async def many(topic: str) -> None:
        seen.put_nowait(f"many:{topic.removeprefix(prefix)}")

    @router.on(f"{prefix}/end")
    async def end() -> None:
        seen.put_nowait("end")

    # Mosquitto sends MQTT 5 clients one copy per matching subscription: `ovl/a` twice.
    app = MqttApp(router, broker.settings(), concurrency=1)
    async with running(app):
        assert app.client.protocol is Protocol.V5
        await mosquitto_pub(broker, f"{prefix}/ovl/a", "{}")
        await mosquitto_pub(broker, f"{prefix}/ovl/a/b", "{}")
        await mosquitto_pub(broker, f"{prefix}/ovl/c", "{}")
        # Messages reach a client in order: once `end` is handled, every copy before it was.
        await mosquitto_pub(broker, f"{prefix}/end", "{}")
        got = [await asyncio.wait_for(seen.get(), 10) for _ in range(4)]
    assert got == ["one:a", "many:/ovl/a/b", "one:c", "end"]
    assert seen.empty()
    assert app.stats.handled == 4
    assert app.stats.unmatched == 2  # the second copies of ovl/a and ovl/c, skipped
