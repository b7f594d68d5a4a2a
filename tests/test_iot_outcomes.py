"""Outcomes over MQTT (issue #14, SPEC14 §6): when a job whose dispatch asked for it ends in a
worker, its outcome is published to the message's Response Topic (MQTT 5, with its
correlation data) and to its status topic. Against the session's real Mosquitto, with
Mosquitto's own clients as the devices (`mosquitto_sub -V 5`, `mosquitto_rr`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.mqtt.broker import EmbeddedBroker
from core.mqtt.outcomes import OutcomePublisher, outcome_message
from core.origin import Origin, origin
from core.queue.drivers.base import ReservedJob
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
    MosquittoSub,
    broker,
    free_port,
    prefix,
)

__all__ = ["broker", "prefix"]  # the fixtures, from tests/mqtt/conftest.py

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(60)]

QUEUE = "iot-outcomes"
#: mosquitto_sub's line: topic, correlation data, content type, payload.
FORMAT = ["-V", "5", "-F", "MSG\t%t\t%D\t%C\t%p"]


def split(payload: str) -> tuple[str, str, dict[str, Any]]:
    """(correlation, content type, outcome JSON) of a line printed with FORMAT."""
    correlation, content_type, body = payload.split("\t", 2)
    return correlation, content_type, json.loads(body)


@contextlib.asynccontextmanager
async def app_manager(settings: Settings) -> AsyncIterator[QueueManager]:
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


@contextlib.asynccontextmanager
async def worker(manager: QueueManager) -> AsyncIterator[Worker]:
    """One in-process worker on the test queue, one job at a time (outcomes in job order)."""
    running = Worker(
        manager, WorkerOptions(queues=(QUEUE,), sleep=0.05, grace=5, handle_signals=False)
    )
    task = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        running.stop()
        await asyncio.wait_for(task, 30)


async def wait_status(manager: QueueManager, job_id: str, status: Status, within: float) -> None:
    """Wait until the job's record says `status` (the backend offers no event to await)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await manager.job(job_id, queue=QUEUE).status()
        if found is not None and found.status is status:
            return
        assert loop.time() < deadline, f"job {job_id} is {found and found.status}, not {status}"
        await asyncio.sleep(0.02)


# -- each ending, in a worker in this process ---------------------------------------------------


async def test_a_job_that_succeeds_publishes_its_result_to_the_reply_topic_and_the_status_topic(
    broker: Broker, prefix: str
) -> None:
    reply, status = f"{prefix}/replies/r1", f"{prefix}/status/d-1"
    async with (
        app_manager(broker.settings()) as manager,
        MosquittoSub(broker, f"{prefix}/#", extra=FORMAT) as device,
        worker(manager),
    ):
        with origin(Origin(response_topic=reply, correlation_data=b"req-1", status_topic=status)):
            handle = await dispatch(jobs.Answer({"t": 21.5}))
        received = await device.receive(2)
    by_topic = {topic: split(payload) for topic, payload in received}
    correlation, content_type, body = by_topic[reply]
    assert correlation == "req-1"
    assert content_type == "application/json"
    assert body == {
        "id": handle.id,
        "job": "tests.iot_outcome_jobs:Answer",
        "queue": QUEUE,
        "status": "succeeded",
        "attempts": 1,
        "result": {"answer": {"t": 21.5}},
        "error": None,
    }
    # The status topic gets the same object, without correlation data.
    assert by_topic[status] == ("", "application/json", body)


async def test_a_job_that_fails_for_good_publishes_once_after_its_last_try_with_one_line(
    broker: Broker, prefix: str
) -> None:
    status = f"{prefix}/status/d-2"
    async with (
        app_manager(broker.settings()) as manager,
        MosquittoSub(broker, status, extra=FORMAT) as device,
        worker(manager),
    ):
        with origin(Origin(status_topic=status)):
            failing = await dispatch(jobs.Boom())
        await wait_status(manager, failing.id, Status.FAILED, within=10)
        # Outcomes go out in the order the jobs ended: an outcome published for its first
        # try (a retry) would come first.
        with origin(Origin(status_topic=status)):
            after = await dispatch(jobs.Answer("after"))
        received = [split(payload)[2] for _, payload in await device.receive(2)]
    assert [(body["id"], body["status"], body["attempts"]) for body in received] == [
        (failing.id, "failed", 2),
        (after.id, "succeeded", 1),
    ]
    assert received[0]["error"] == "ValueError: boom"
    assert received[0]["result"] is None


async def test_a_job_cancelled_while_running_publishes_cancelled(
    broker: Broker, prefix: str
) -> None:
    status = f"{prefix}/status/d-3"
    jobs.Sleepy.started = asyncio.Event()
    async with (
        app_manager(broker.settings()) as manager,
        MosquittoSub(broker, status, extra=FORMAT) as device,
        worker(manager),
    ):
        with origin(Origin(status_topic=status)):
            handle = await dispatch(jobs.Sleepy())
        await asyncio.wait_for(jobs.Sleepy.started.wait(), 10)
        assert await manager.cancel(handle.id, queue=QUEUE)
        [(_, payload)] = await device.receive(1)
    body = split(payload)[2]
    assert (body["id"], body["status"], body["attempts"]) == (handle.id, "cancelled", 1)
    assert body["error"] == "cancelled while running"


async def test_a_job_that_expired_before_it_started_publishes_expired(
    broker: Broker, prefix: str
) -> None:
    reply = f"{prefix}/replies/r4"
    async with (
        app_manager(broker.settings()) as manager,
        MosquittoSub(broker, reply, extra=FORMAT) as device,
    ):
        late = jobs.Answer("too late")
        late.ttl = 0.2
        with origin(Origin(response_topic=reply, correlation_data=b"req-4")):
            handle = await dispatch(late)
        await asyncio.sleep(0.4)  # its ttl passes with no worker running: what is tested
        async with worker(manager):
            [(_, payload)] = await device.receive(1)
    correlation, _, body = split(payload)
    assert correlation == "req-4"
    assert (body["id"], body["status"], body["attempts"]) == (handle.id, "expired", 0)
    assert body["error"] == "expired before it started (ttl)"


# -- never holding the worker up ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[int]:
    """A port that accepts TCP connections and never answers a CONNECT: every publish to it
    waits out its whole timeout."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_a_broker_that_never_answers_delays_neither_the_outcome_nor_the_acknowledgement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with silent_broker() as port:
        settings = make_settings(mqtt_host="127.0.0.1", mqtt_port=port, queue_connection="memory")
        async with app_manager(settings) as manager, worker(manager) as running:
            loop = asyncio.get_running_loop()
            started = loop.time()
            handles = []
            for n in range(5):
                with origin(Origin(status_topic=f"topiq-test/silent/{n}")):
                    handles.append(await dispatch(jobs.Answer(n)))
            for handle in handles:
                await wait_status(manager, handle.id, Status.SUCCEEDED, within=5)
            took = loop.time() - started
            assert running._outcomes is not None
            assert running._outcomes.pending >= 1  # still trying to publish
    # The publish timeout is 10 s: the jobs were acknowledged long before any publish ended.
    assert took < 3, took
    assert running.counts.done == 5


async def test_past_its_bound_the_pending_outcomes_are_dropped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    envelope = {
        "id": "j",
        "job": "tests.iot_outcome_jobs:Answer",
        "queue": QUEUE,
        "data": {"value": 1},
        "reply": {"status_topic": "topiq-test/drop/d"},
    }
    async with silent_broker() as port:
        settings = make_settings(mqtt_host="127.0.0.1", mqtt_port=port)
        async with app_manager(settings):
            publisher = OutcomePublisher(pending_max=2)
            with caplog.at_level(logging.WARNING, "topiq.mqtt.outcomes"):
                for n in range(5):
                    publisher.ended(ReservedJob(f"j{n}", QUEUE, orjson.dumps(envelope), 1))
                assert publisher.dropped == 3
                await publisher.close(0.1)
    dropping = [r for r in caplog.records if "dropping job outcomes" in r.getMessage()]
    assert len(dropping) == 1
    assert publisher.dropped == 5  # the two queued ones were not published either


def test_a_payload_without_a_reply_key_gives_no_message() -> None:
    plain = {"id": "j", "job": "x:Y", "queue": QUEUE, "data": {"reply": {"topic": "a/b"}}}
    assert outcome_message(ReservedJob("j", QUEUE, orjson.dumps(plain), 1)) is None


# -- MQTT 3.1.1 ---------------------------------------------------------------------------------


async def test_under_mqtt_3_1_1_only_status_topics_are_published(tmp_path: Path) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed")
    async with EmbeddedBroker(port=free_port(), fallback=False) as embedded:  # MQTT 3.1.1 only
        settings = make_settings(
            mqtt_embedded_port=embedded.port, queue_connection="memory", mqtt_host=None
        )
        v311 = Broker("127.0.0.1", embedded.port)
        async with (
            app_manager(settings) as manager,
            MosquittoSub(
                v311, "topiq-test/v311/#", extra=["-V", "311", "-F", "MSG\t%t\t%p"]
            ) as device,
            worker(manager),
        ):
            asked = Origin(
                response_topic="topiq-test/v311/reply",
                correlation_data=b"c",
                status_topic="topiq-test/v311/status/a",
            )
            with origin(asked):
                first = await dispatch(jobs.Answer("a"))
            with origin(Origin(status_topic="topiq-test/v311/status/b")):
                second = await dispatch(jobs.Answer("b"))
            received = await device.receive(2)
    # One job at a time: a reply of the first job would come before the second's status.
    assert [topic for topic, _ in received] == [
        "topiq-test/v311/status/a",
        "topiq-test/v311/status/b",
    ]
    assert [json.loads(payload)["id"] for _, payload in received] == [first.id, second.id]


# -- end to end: mosquitto_rr -> app process -> worker process -> mosquitto_rr ------------------


async def mosquitto_rr(
    broker: Broker, topic: str, response_topic: str, message: str, correlation: str, wait: float
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "mosquitto_rr",
        *("-h", broker.host, "-p", str(broker.port), "-V", "5", "-q", "1"),
        *("-t", topic, "-e", response_topic, "-m", message, "-W", str(int(wait))),
        *("-D", "publish", "correlation-data", correlation),
        *("-F", "%t\t%D\t%C\t%p"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.process
async def test_mosquitto_rr_gets_the_outcome_of_the_job_its_request_started_in_a_worker_process(
    broker: Broker, tmp_path: Path
) -> None:
    if shutil.which("mosquitto_rr") is None:
        pytest.skip("mosquitto_rr is not installed")
    run = tmp_path.name[-12:].replace("_", "-")
    base = f"topiq-test/{run}"
    db = f"sqlite+aiosqlite:///{tmp_path}/queue.sqlite3"
    env = broker.env(
        QUEUE_CONNECTION="database",
        DB_URL=db,
        MQTT_RESPONSE_TOPICS=f"{base}/replies/#",
    )
    app = await AppProcess(["serve", "--app", "tests.iot_outcome_jobs:router"], env).start()
    work = await AppProcess(["queue:work", "--queue", QUEUE, "--sleep", "0.05"], env).start()
    refused: asyncio.subprocess.Process | None = None
    try:
        await app.wait_for_line("connected to the MQTT broker")
        async with MosquittoSub(broker, f"{base}/status/+", extra=FORMAT) as dashboard:
            # Asks for its outcome on a topic MQTT_RESPONSE_TOPICS does not allow: nothing
            # may be published there (its job still runs, and still reports on its status).
            refused = await mosquitto_rr(
                broker, f"{base}/ask/d-9", f"{base}/elsewhere/d-9", '{"n": 9}', "no", 30
            )
            [(topic, payload)] = await dashboard.receive(1, timeout=30)
            assert topic == f"{base}/status/d-9"
            refused_job = split(payload)[2]
            assert refused_job["status"] == "succeeded"
            device = await mosquitto_rr(
                broker, f"{base}/ask/d-1", f"{base}/replies/d-1", '{"n": 1}', "corr-1", 30
            )
            out, err = await asyncio.wait_for(device.communicate(), 40)
            assert device.returncode == 0, err.decode()
            [(topic, payload)] = await dashboard.receive(1, timeout=30)
    finally:
        app_code = await app.stop()
        work_code = await work.stop()
        refused_out = b""
        if refused is not None:
            if refused.returncode is None:
                refused.terminate()
            refused_out, _ = await refused.communicate()
    response_topic, correlation, content_type, body = out.decode().rstrip("\n").split("\t", 3)
    outcome = json.loads(body)
    assert (response_topic, correlation, content_type) == (
        f"{base}/replies/d-1",
        "corr-1",
        "application/json",
    )
    assert outcome["status"] == "succeeded"
    assert outcome["job"] == "tests.iot_outcome_jobs:Answer"
    assert outcome["result"] == {"answer": {"device": "d-1", "asked": {"n": 1}}}
    # The dashboard saw the same outcome on the device's status topic.
    assert topic == f"{base}/status/d-1"
    assert split(payload)[2] == outcome
    assert refused_out == b"", refused_out
    assert app_code == 0, app.log
    assert work_code == 0, work.log


def guide_section() -> str:
    return guide_text("iot.md", "outcomes")


def test_the_guide_shows_its_example_verbatim() -> None:
    body = (ROOT / "docs" / "examples" / "iot_outcomes.py").read_text().split('"""', 2)[2].strip()
    text = guide_section()
    assert "\n## Outcomes over MQTT\n" in text
    assert f"# docs/examples/iot_outcomes.py\n{body}\n```" in text


async def test_the_guides_example_prints_what_the_guide_shows(broker: Broker, prefix: str) -> None:
    device_id = prefix.rsplit("/", 1)[1]  # a device no other test uses
    lines = await docs_example("iot_outcomes").main(broker.host, broker.port, device_id)
    after = guide_section().split("# docs/examples/iot_outcomes.py", 1)[1]
    shown = after.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert lines == [line.replace("t-1", device_id) for line in shown]
