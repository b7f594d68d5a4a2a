"""Two app processes in one `$share` group split a topic's messages: each is handled once."""

from __future__ import annotations

import json
import uuid
from collections import Counter

import pytest

from tests.mqtt.conftest import AppProcess, Broker, MosquittoSub, mosquitto_pub

pytestmark = [pytest.mark.mqtt, pytest.mark.process, pytest.mark.timeout(60)]

MESSAGES = 40


async def test_two_processes_on_one_shared_group_split_the_messages(broker: Broker) -> None:
    run = uuid.uuid4().hex[:12]
    apps = [
        AppProcess(
            ["serve", "--app", "tests.mqtt.apps:shared"],
            broker.env(MQTT_CLIENT_ID=f"topiq-test-share-{run}-{n}", QUEUE_CONNECTION="memory"),
        )
        for n in (1, 2)
    ]
    for app in apps:
        await app.start()
    try:
        for app in apps:
            await app.wait_for_line("connected to the MQTT broker")
        async with MosquittoSub(broker, f"topiq-test/{run}/share/handled") as device:
            await mosquitto_pub(
                broker,
                f"topiq-test/{run}/share/in",
                lines=[json.dumps({"n": n}) for n in range(MESSAGES)],
            )
            handled = [json.loads(p) for _, p in await device.receive(MESSAGES, timeout=30)]
    finally:
        codes = [await app.stop() for app in apps]
    assert codes == [0, 0], "\n\n".join(app.log for app in apps)
    assert sorted(h["n"] for h in handled) == list(range(MESSAGES))  # each exactly once
    by_process = Counter(h["pid"] for h in handled)
    assert set(by_process) == {app.pid for app in apps}, by_process  # both took a share
    for app in apps:
        assert f"{by_process[app.pid]} received, {by_process[app.pid]} handled" in app.log
