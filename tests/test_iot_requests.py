"""`Job.request` (issue #14, SPEC14 §6): a command to a device over MQTT 5 request/response,
against the session's real Mosquitto. The device is Mosquitto's own clients: `mosquitto_sub
-V 5` prints each command's Response Topic and Correlation Data, and `mosquitto_pub -V 5 -D
publish correlation-data ...` answers on that topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.mqtt import requests
from core.mqtt.broker import EmbeddedBroker
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from core.settings import Settings
from core.status import Status
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests import iot_outcome_jobs as jobs
from tests.conftest import ROOT, docs_example, make_settings
from tests.conftest import guide_section as guide_text
from tests.mqtt.conftest import (
    AppProcess,
    Broker,
    MosquittoProcess,
    MosquittoSub,
    broker,
    free_port,
    mosquitto_pub,
    prefix,
)

__all__ = ["broker", "prefix"]  # the fixtures, from tests/mqtt/conftest.py

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(60)]

QUEUE = "iot-outcomes"


@contextlib.asynccontextmanager
async def default_manager(settings: Settings) -> AsyncIterator[QueueManager]:
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


@contextlib.asynccontextmanager
async def worker(manager: QueueManager) -> AsyncIterator[Worker]:
    running = Worker(
        manager, WorkerOptions(queues=(QUEUE,), sleep=0.05, grace=5, handle_signals=False)
    )
    task = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        running.stop()
        await asyncio.wait_for(task, 30)


class Device(MosquittoSub):
    """A device listening for commands: each one as (response topic, correlation, payload)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        super().__init__(broker, topic, extra=["-V", "5", "-F", "MSG\t%t\t%R\t%D\t%p"])

    async def command(self, timeout: float = 20.0) -> tuple[str, str, str]:
        [(_, line)] = await self.receive(1, timeout)
        response_topic, correlation, payload = line.split("\t", 2)
        return response_topic, correlation, payload

    async def answer(self, response_topic: str, correlation: str, payload: str) -> None:
        extra = ["-V", "5", "-D", "publish", "correlation-data", correlation]
        await mosquitto_pub(self.broker, response_topic, payload, extra=extra)


async def test_the_reply_of_the_device_is_the_return_value_parsed_like_a_route_payload(
    broker: Broker, prefix: str
) -> None:
    settings = broker.settings(mqtt_reply_prefix=f"{prefix}/replies")
    async with (
        default_manager(settings) as manager,
        Device(broker, f"{prefix}/devices/d-1/commands") as device,
        worker(manager),
    ):
        handle = await dispatch(jobs.Command(f"{prefix}/devices/d-1/commands", {"cmd": "on"}, 10))
        response_topic, correlation, payload = await device.command()
        await device.answer(response_topic, correlation, '{"ok": true, "level": 3}')
        result = await handle.result(timeout=20)
        # A reply that is not JSON comes back as its bytes, as a route's payload would.
        text = asyncio.create_task(
            requests.request(f"{prefix}/devices/d-1/commands", "ping", timeout=10)
        )
        response_topic_2, correlation_2, payload_2 = await device.command()
        await device.answer(response_topic_2, correlation_2, "pong")
        assert await text == b"pong"
    assert result == {"ok": True, "level": 3}
    assert json.loads(payload) == {"cmd": "on"}
    assert payload_2 == "ping"
    # The reply topic is private to this process: the prefix, its client id, a random level.
    client_id = requests._requests.connection.client_id  # type: ignore[union-attr]
    assert response_topic.startswith(f"{prefix}/replies/{client_id}/")
    assert response_topic_2.startswith(f"{prefix}/replies/{client_id}/")
    assert response_topic != response_topic_2 and correlation != correlation_2


async def test_a_device_answering_only_the_second_try_makes_the_job_succeed_on_try_2(
    broker: Broker, prefix: str
) -> None:
    topic = f"{prefix}/devices/d-2/commands"
    settings = broker.settings(mqtt_reply_prefix=f"{prefix}/replies")
    async with (
        default_manager(settings) as manager,
        Device(broker, topic) as device,
        worker(manager),
    ):
        handle = await dispatch(jobs.Command(topic, {"cmd": "reboot"}, 3))
        first_topic, first_correlation, _ = await device.command()  # not answered: times out
        second_topic, second_correlation, _ = await device.command()
        # Late: the answer to try 1 arrives while try 2 waits; then one on try 2's topic
        # with try 1's correlation. Neither is taken for try 2.
        await device.answer(first_topic, first_correlation, '"late answer to try 1"')
        await device.answer(second_topic, first_correlation, '"stale correlation"')
        await device.answer(second_topic, second_correlation, '"rebooted"')
        result = await handle.result(timeout=20)
        record = await handle.status()
        assert requests._requests is not None
        ignored = requests._requests.ignored
    assert result == "rebooted"
    assert record.status is Status.SUCCEEDED and record.attempts == 2
    assert first_topic != second_topic and first_correlation != second_correlation
    assert ignored == 2


async def test_no_reply_in_time_fails_the_try_and_max_tries_ends_the_job(
    broker: Broker, prefix: str
) -> None:
    topic = f"{prefix}/devices/d-3/commands"
    settings = broker.settings(mqtt_reply_prefix=f"{prefix}/replies")
    async with (
        default_manager(settings) as manager,
        Device(broker, topic) as device,
        worker(manager),
    ):
        handle = await dispatch(jobs.Command(topic, {"cmd": "off"}, 0.3))
        commands = [await device.command(), await device.command()]  # both tries sent it
        with pytest.raises(Exception, match="RequestTimeoutError"):
            await handle.result(timeout=20)
        record = await handle.status()
    assert record.status is Status.FAILED and record.attempts == 2
    assert "no reply to the request on" in record.error
    assert commands[0][1] != commands[1][1]  # each try its own correlation


async def test_under_mqtt_3_1_1_request_says_it_needs_mqtt_5() -> None:
    async with EmbeddedBroker(port=free_port(), fallback=False) as embedded:  # MQTT 3.1.1 only
        settings = make_settings(
            mqtt_embedded_port=embedded.port, queue_connection="memory", mqtt_host=None
        )
        async with default_manager(settings):
            with pytest.raises(ConfigurationError, match=r"needs MQTT 5 .*only MQTT 3\.1\.1"):
                await requests.request("topiq-test/v311/cmd", {"cmd": "on"}, timeout=5)


async def test_after_the_broker_restarts_the_reply_subscription_is_back(tmp_path: Path) -> None:
    own = MosquittoProcess(free_port(), tmp_path / "mosquitto")
    await own.start()
    try:
        settings = own.broker.settings(mqtt_reply_prefix="topiq-test/restart/replies")
        topic = "topiq-test/restart/devices/d-5/commands"
        async with default_manager(settings):
            replies = []
            for round_ in (1, 2):
                async with Device(own.broker, topic) as device:
                    call = asyncio.create_task(requests.request(topic, round_, timeout=20))
                    response_topic, correlation, _ = await device.command()
                    await device.answer(response_topic, correlation, f'{{"round": {round_}}}')
                    replies.append(await call)
                if round_ == 1:
                    await own.stop()  # every connection drops; the next request reconnects
                    await own.start()
    finally:
        await own.stop()
    assert replies == [{"round": 1}, {"round": 2}]


@pytest.mark.process
async def test_a_worker_process_sends_the_command_and_returns_the_reply(
    broker: Broker, tmp_path: Path
) -> None:
    run = tmp_path.name[-12:].replace("_", "-")
    topic = f"topiq-test/{run}/devices/d-4/commands"
    db = f"sqlite+aiosqlite:///{tmp_path}/queue.sqlite3"
    env = broker.env(
        QUEUE_CONNECTION="database", DB_URL=db, MQTT_REPLY_PREFIX=f"topiq-test/{run}/replies"
    )
    settings = make_settings(
        queue_connection="database", db_url=db, queue_allowed_modules=("app.", "tests.")
    )
    async with default_manager(settings), Device(broker, topic) as device:
        handle = await dispatch(jobs.Command(topic, {"cmd": "blink"}, 10))
        work = await AppProcess(["queue:work", "--queue", QUEUE, "--sleep", "0.05"], env).start()
        try:
            response_topic, correlation, payload = await device.command(timeout=30)
            await device.answer(response_topic, correlation, '{"blinked": 3}')
            result = await handle.result(timeout=30)
        finally:
            code = await work.stop()
    assert result == {"blinked": 3}
    assert json.loads(payload) == {"cmd": "blink"}
    assert response_topic.startswith(f"topiq-test/{run}/replies/")
    assert code == 0, work.log


def guide_section() -> str:
    return guide_text("iot.md", "requests")


def test_the_guide_shows_its_example_verbatim() -> None:
    body = (ROOT / "docs" / "examples" / "iot_requests.py").read_text().split('"""', 2)[2].strip()
    text = guide_section()
    assert "\n## Device commands: `Job.request`\n" in text
    assert f"# docs/examples/iot_requests.py\n{body}\n```" in text


async def test_the_guides_example_prints_what_the_guide_shows(broker: Broker, prefix: str) -> None:
    device_id = prefix.rsplit("/", 1)[1]  # a device no other test uses
    lines = await docs_example("iot_requests").main(broker.host, broker.port, device_id)
    after = guide_section().split("# docs/examples/iot_requests.py", 1)[1]
    shown = after.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert lines == [line.replace("t-1", device_id) for line in shown]
