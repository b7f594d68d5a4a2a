"""The IoT API (SPEC14 section 5): the job settings `group`, `max_queue_length`, `overflow` and
`status_topic`; what a route's `group=`, `coalesce=` and `status_topic=` and a message's
Response Topic give the jobs its handler dispatches (the origin); `QueueFullError`; the
coalesced/dropped/rejected counts of `stats` and `queue:stats`.

Pushes run on the memory connection (the reference driver); the MQTT tests on the session's
Mosquitto, with mosquitto_pub as the device.
"""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from rich.console import Console

from core.commands import stats as stats_command
from core.commands._common import Connection
from core.errors import QueueFullError, SerializationError
from core.job import Job
from core.mqtt import MqttApp, Router
from core.mqtt.errors import RouteError
from core.mqtt.routing import topic_matches
from core.origin import Origin, current_origin, origin
from core.queue.drivers.base import OutgoingJob, ReservedJob
from core.queue.payload import JobLoader, class_path, job_settings, topic_problem
from core.queue.queue_manager import (
    QueueManager,
    chain,
    dispatch,
    queue,
    set_default_manager,
)
from core.settings import Settings
from tests.conftest import make_settings
from tests.mqtt.conftest import Broker, mosquitto_pub, running
from tests.servers import private_mosquitto

pytestmark = pytest.mark.timeout(60)

PATH = "tests.test_iot_api"


class Reading(Job):
    """A device reading, grouped per device."""

    queue = "telemetry"
    group = "{device_id}"

    def __init__(self, device_id: str, value: Any = None) -> None:
        super().__init__()
        self.device_id = device_id
        self.value = value

    async def handle(self) -> Any:
        return self.value


class Plain(Job):
    """No IoT setting of its own."""

    queue = "telemetry"

    def __init__(self, device_id: str = "", value: Any = None) -> None:
        super().__init__()
        self.device_id = device_id
        self.value = value

    async def handle(self) -> Any:
        return self.value


class Reported(Job):
    """Publishes its outcome on a status topic of its own."""

    queue = "telemetry"
    status_topic = "devices/{device_id}/jobs"

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id

    async def handle(self) -> None:
        return None


class Bounded(Job):
    queue = "bounded"
    max_queue_length = 2

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    async def handle(self) -> int:
        return self.n


class Dropping(Bounded):
    overflow = "drop_oldest"


@pytest.fixture
def broker() -> Broker:
    """The session's own Mosquitto (tests/servers.py), as tests/mqtt use it."""
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub is not installed; `scripts/services up` installs it")
    server = private_mosquitto()
    if server is None:
        pytest.skip("mosquitto is not installed; `scripts/services up` installs it")
    return Broker("127.0.0.1", server.port)


@pytest.fixture
def prefix() -> str:
    return f"topiq-test/{uuid.uuid4().hex[:12]}"


def settings(**overrides: Any) -> Settings:
    return make_settings(queue_connection="memory", mqtt_spool_max=0, **overrides)


@pytest.fixture
async def manager() -> AsyncIterator[QueueManager]:
    async with QueueManager(settings(queue_max_lengths=("capped=3",))) as qm:
        yield qm


def envelope(outgoing: OutgoingJob) -> dict[str, Any]:
    value: dict[str, Any] = orjson.loads(outgoing.payload)
    return value


async def take(qm: QueueManager, queue_name: str, limit: int = 100) -> list[ReservedJob]:
    driver = await qm.connection()
    return [job for job in await driver.reserve([queue_name], limit, 30.0) if not job.expired]


# -- the settings -----------------------------------------------------------------------------


def _error(job: Job) -> str:
    with pytest.raises(SerializationError) as caught:
        QueueManager(settings())._outgoing(job, "telemetry", 0.0)
    return str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("group", 7, "group must be a string template"),
        ("group", "{device id}", "each {...} must name a data attribute"),
        ("group", "{device_id", "is not a template"),
        ("group", "x" * 191, "at most 190 characters"),
        ("max_queue_length", -1, "max_queue_length must be a whole number, 0 or more"),
        ("max_queue_length", True, "max_queue_length must be a whole number"),
        ("max_queue_length", "10", "max_queue_length must be a whole number"),
        ("overflow", "drop_newest", "overflow must be 'reject', 'drop_oldest' or None"),
        ("status_topic", "devices/+/status", "not an MQTT topic"),
        ("status_topic", "devices/{device_id}/#", "'+' or '#'"),
        ("status_topic", "$SYS/{device_id}", "starting with '$'"),
        ("status_topic", 3, "status_topic must be a string template"),
    ],
)
def test_a_bad_setting_is_refused_at_dispatch_naming_it(name: str, value: Any, says: str) -> None:
    job = Plain("d-1")
    setattr(job, name, value)
    error = _error(job)
    assert error.startswith(f"Plain.{name}")
    assert says in error


def test_a_template_naming_missing_data_names_the_setting_and_the_attributes() -> None:
    job = Plain("d-1")
    job.group = "{serial}"
    assert _error(job) == (
        "Plain.group '{serial}' names 'serial', which this job has no data attribute of "
        "(its attributes: device_id, group, value)"
    )
    job = Plain("d-1")
    job.status_topic = "devices/{serial}/status"
    assert _error(job).startswith("Plain.status_topic 'devices/{serial}/status' names 'serial'")


def test_rendered_values_are_checked_too() -> None:
    assert "Plain.group" in _error(_with(Plain("x" * 200), group="{device_id}"))
    error = _error(_with(Plain("a+b"), status_topic="devices/{device_id}/status"))
    assert error.startswith("Plain.status_topic 'devices/a+b/status' (from ")
    assert "'+' or '#'" in error
    assert "is empty" in _error(_with(Plain(""), status_topic="{device_id}"))


def _with(job: Job, **values: Any) -> Job:
    for name, value in values.items():
        setattr(job, name, value)
    return job


def test_class_settings_are_checked_once_and_cached() -> None:
    first = job_settings(Reading("a"))
    assert first is job_settings(Reading("b"))
    assert (first.group, first.group_fixed) == ("{device_id}", False)
    assert (first.max_queue_length, first.overflow) == (0, None)
    overridden = _with(Reading("c"), max_queue_length=5)
    assert job_settings(overridden) is not first
    assert job_settings(overridden).max_queue_length == 5


def test_the_settings_are_not_job_data_but_an_old_payload_carrying_them_as_data_loads() -> None:
    assert "group" not in Reading("d-1").data()
    loader = JobLoader(["tests."])
    raw = orjson.dumps(
        {"job": f"{PATH}:Plain", "data": {"device_id": "d", "group": "admins", "overflow": 1}}
    )
    loaded = loader.load(raw, job_id="j1", attempts=1).job
    assert loaded.group == "admins"  # type: ignore[attr-defined]


def test_a_topic_to_publish_to_has_no_wildcards() -> None:
    assert topic_problem("devices/7/status") == ""
    for bad in ("", "a/+/b", "a/#", "$SYS/x", "a\0b"):
        assert topic_problem(bad)


# -- what `_outgoing` makes of them -----------------------------------------------------------


def test_group_is_rendered_from_the_jobs_data() -> None:
    qm = QueueManager(settings())
    assert qm._outgoing(Reading("dev-7"), "telemetry", 0.0).group == "dev-7"
    assert qm._outgoing(Plain("dev-7"), "telemetry", 0.0).group == ""
    assert qm._outgoing(_with(Plain("x"), group="fixed"), "telemetry", 0.0).group == "fixed"


def test_the_bound_is_the_jobs_own_else_the_queue_setting() -> None:
    qm = QueueManager(settings(queue_max_lengths=("telemetry=100:drop_oldest", "bounded=9")))
    out = qm._outgoing(Plain(), "telemetry", 0.0)
    assert (out.max_length, out.overflow) == (100, "drop_oldest")
    out = qm._outgoing(Bounded(1), "bounded", 0.0)  # the job's 2 wins over the setting's 9
    assert (out.max_length, out.overflow) == (2, "reject")
    out = qm._outgoing(_with(Plain(), overflow="reject"), "telemetry", 0.0)
    assert (out.max_length, out.overflow) == (100, "reject")  # the job's policy, the queue's bound
    out = qm._outgoing(Plain(), "elsewhere", 0.0)
    assert (out.max_length, out.overflow) == (0, "reject")


def test_no_origin_no_status_topic_no_reply_key() -> None:
    qm = QueueManager(settings())
    assert "reply" not in envelope(qm._outgoing(Plain("d"), "telemetry", 0.0))
    reply = envelope(qm._outgoing(Reported("d-3"), "telemetry", 0.0))["reply"]
    assert reply == {"status_topic": "devices/d-3/jobs"}


def test_a_routes_origin_gives_group_coalescing_and_reply() -> None:
    qm = QueueManager(settings())
    where = Origin(
        topic="devices/d-1/telemetry",
        group="d-1",
        coalesce="d-1",
        response_topic="replies/d-1",
        correlation_data=b"\x00req-1",
        status_topic="devices/d-1/status",
    )
    with origin(where):
        out = qm._outgoing(Plain("d-1"), "telemetry", 0.0)
        own_group = qm._outgoing(Reading("d-9"), "telemetry", 0.0)
        own_status = qm._outgoing(Reported("d-1"), "telemetry", 0.0)
        with_id = qm._outgoing(Plain("d-1"), "telemetry", 0.0, job_id="mine")
        keep = qm._outgoing(Plain("d-1"), "telemetry", 0.0, on_duplicate="keep")
        keyed = qm._outgoing(_with(Plain("d-1"), unique_key="k"), "telemetry", 0.0)
    assert out.group == "d-1"
    assert (out.unique_key, out.on_duplicate) == (f"{PATH}:Plain:d-1", "replace")
    assert envelope(out)["reply"] == {
        "topic": "replies/d-1",
        "correlation": base64.b64encode(b"\x00req-1").decode(),
        "status_topic": "devices/d-1/status",
    }
    assert own_group.group == "d-9"  # the job's own group wins
    assert envelope(own_status)["reply"]["status_topic"] == "devices/d-1/jobs"  # the job's wins
    assert (with_id.unique_key, with_id.on_duplicate) == ("", "reject")  # an id of its own
    assert (keep.unique_key, keep.on_duplicate) == (f"{PATH}:Plain:d-1", "keep")
    assert keyed.unique_key == "k"
    # Outside the block nothing of the origin is left.
    assert current_origin.get() is None
    assert qm._outgoing(Plain("d-1"), "telemetry", 0.0).group == ""


def test_a_reply_without_correlation_or_status_topic_leaves_those_keys_out() -> None:
    qm = QueueManager(settings())
    with origin(Origin(response_topic="replies/x")):
        assert envelope(qm._outgoing(Plain(), "telemetry", 0.0))["reply"] == {"topic": "replies/x"}
    with origin(Origin(group="g")):
        assert "reply" not in envelope(qm._outgoing(Plain(), "telemetry", 0.0))


def test_a_routes_coalescing_key_too_long_for_a_driver_is_refused() -> None:
    qm = QueueManager(settings())
    with origin(Origin(topic="t", coalesce="x" * 190)), pytest.raises(SerializationError) as caught:
        qm._outgoing(Plain(), "telemetry", 0.0)
    assert "the route's coalesce=" in str(caught.value)


def test_workflow_members_take_the_group_but_never_coalesce_nor_meet_a_bound() -> None:
    qm = QueueManager(settings(queue_max_lengths=("telemetry=1",)))
    with origin(Origin(group="d-1", coalesce="d-1")):
        plan = qm._plan(chain(Plain("d-1", 1), Plain("d-1", 2)))
    members = [step.outgoing for step in plan.steps if step.job is not None]
    assert [m.group for m in members] == ["d-1", "d-1"]
    assert [m.unique_key for m in members] == ["", ""]
    assert [m.max_length for m in members] == [0, 0]


# -- pushes into a full queue -----------------------------------------------------------------


async def test_a_full_queue_raises_queue_full_error_and_stores_nothing(
    manager: QueueManager,
) -> None:
    await manager.push(Bounded(1))
    await manager.later(60, Bounded(2))
    with pytest.raises(QueueFullError) as caught:
        await manager.push(Bounded(3))
    assert str(caught.value) == "queue bounded is full (2 waiting); nothing was queued"
    assert (caught.value.queue, caught.value.max_length) == ("bounded", 2)
    with pytest.raises(QueueFullError):
        await manager.later(5, Bounded(4))
    assert await manager.size("bounded") == 2
    [stats] = await manager.stats("bounded")
    assert stats.rejected == 2


async def test_dispatch_raises_it_too_from_the_queue_setting() -> None:
    async with QueueManager(settings(queue_max_lengths=("telemetry=1",))) as qm:
        set_default_manager(qm)
        try:
            await dispatch(Plain("d", 1))
            with pytest.raises(QueueFullError, match="queue telemetry is full \\(1 waiting\\)"):
                await dispatch(Plain("d", 2))
            with pytest.raises(QueueFullError):
                await queue.push(Plain("d", 3))
        finally:
            set_default_manager(None)


async def test_drop_oldest_stores_the_new_job_and_counts_the_drop(manager: QueueManager) -> None:
    first = await manager.push(Dropping(1))
    await manager.push(Dropping(2))
    third = await manager.push(Dropping(3))
    assert await manager.size("bounded") == 2
    status = await first.status()
    assert status is not None and status.status == "cancelled"
    assert status.error == "dropped: queue bounded is full (2 waiting)"
    assert (await third.status()) is not None
    [stats] = await manager.stats("bounded")
    assert (stats.dropped, stats.cancelled, stats.rejected) == (1, 0, 0)


async def test_bulk_stores_the_others_then_names_how_many_were_refused(
    manager: QueueManager,
) -> None:
    with pytest.raises(QueueFullError) as caught:
        await manager.bulk([Plain("d", n) for n in range(5)], queue="capped")
    assert str(caught.value).startswith(
        "2 of 5 jobs not queued: their queue is full (capped (3 waiting)); the others were queued"
    )
    assert caught.value.queue == "capped"
    assert [job.payload for job in await take(manager, "capped")] != []
    assert manager.dispatched == 3


# -- counts -----------------------------------------------------------------------------------


async def test_stats_and_queue_stats_show_coalesced_dropped_and_rejected(
    manager: QueueManager,
) -> None:
    with origin(Origin(coalesce="d-1")):
        for n in range(4):
            await manager.push(Plain("d-1", n), queue="capped")  # 1 stored, 3 coalesced
    await manager.push(Dropping(1))
    await manager.push(Dropping(2))
    await manager.push(Dropping(3))  # drops Dropping(1)
    for n in range(2):
        await manager.push(Plain("x", n), queue="capped")  # capped=3: now full
    for n in range(2):
        with pytest.raises(QueueFullError):
            await manager.push(Plain("x", 9 + n), queue="capped")
    by_queue = {s.queue: s for s in await manager.stats()}
    assert (by_queue["capped"].coalesced, by_queue["capped"].rejected) == (3, 2)
    assert by_queue["bounded"].dropped == 1

    driver = await manager.connection()
    data = await stats_command._snapshot(Connection(manager, "memory", driver), None)
    rows = {row["queue"]: row for row in data["queues"]}
    assert {k: rows["capped"][k] for k in ("coalesced", "dropped", "rejected")} == {
        "coalesced": 3,
        "dropped": 0,
        "rejected": 2,
    }
    assert rows["bounded"]["dropped"] == 1
    out = io.StringIO()
    Console(file=out, width=250).print(stats_command._render(data))
    header = next(line for line in out.getvalue().splitlines() if "pending" in line)
    for column in ("coalesced 1h", "dropped 1h", "rejected 1h"):
        assert column in header


async def test_queue_job_shows_the_group(manager: QueueManager) -> None:
    from core.commands import jobs as jobs_command

    handle = await manager.push(Reading("dev-42"))
    record = await handle.status()
    assert record is not None and record.group == "dev-42"
    out = io.StringIO()
    driver = await manager.connection()
    Console(file=out, width=200).print(
        jobs_command._render(Connection(manager, "memory", driver), record)
    )
    assert any("group" in line and "dev-42" in line for line in out.getvalue().splitlines())


# -- routes -----------------------------------------------------------------------------------


async def _noop(topic: str) -> None:
    return None


def test_route_options_may_use_only_the_routes_parameters() -> None:
    router = Router()
    router.on("devices/{device_id}/telemetry", _noop)
    [route] = router.routes
    assert route.job_options({"device_id": "d"}) == ("", "", "")
    for option in ("group", "coalesce", "status_topic"):
        with pytest.raises(RouteError) as caught:
            router.on("devices/{device_id}/x", _noop, **{option: "{serial}"})
        assert f"{option}='{{serial}}'" in str(caught.value)
        assert "this route's: {device_id}" in str(caught.value)
    with pytest.raises(RouteError, match="no '\\+', '#'"):
        router.on("devices/{device_id}/y", _noop, status_topic="devices/+/{device_id}")
    with pytest.raises(RouteError, match="as they are"):
        router.on("devices/{device_id}/z", _noop, group="{device_id!r}")


def test_groups_and_include_give_defaults_a_route_may_override_or_clear() -> None:
    router = Router()
    devices = router.group("devices/{device_id}", group="{device_id}", coalesce="{device_id}")
    devices.on("telemetry", _noop)
    devices.on("alarm", _noop, coalesce="")
    devices.on("config", _noop, group="cfg-{device_id}", status_topic="s/{device_id}")
    routes = {r.pattern.pattern: r for r in router.routes}
    params = {"device_id": "d7"}
    assert routes["devices/{device_id}/telemetry"].job_options(params) == ("d7", "d7", "")
    assert routes["devices/{device_id}/alarm"].job_options(params) == ("d7", "", "")
    assert routes["devices/{device_id}/config"].job_options(params) == ("cfg-d7", "d7", "s/d7")

    inner = Router()
    inner.on("reading", _noop)
    inner.on("boot", _noop, group="")
    outer = Router()
    outer.include(inner, "sites/{site}", group="{site}", status_topic="sites/{site}/status")
    got = {r.pattern.pattern: r.job_options({"site": "s1"}) for r in outer.routes}
    assert got == {
        "sites/{site}/reading": ("s1", "", "sites/s1/status"),
        "sites/{site}/boot": ("", "", "sites/s1/status"),
    }
    with pytest.raises(RouteError):
        Router().include(inner, "plain", group="{site}")  # no {site} without the prefix


def test_topic_matches_follows_mqtt_filter_rules() -> None:
    assert topic_matches("replies/#", "replies/a/b")
    assert topic_matches("replies/#", "replies")
    assert topic_matches("replies/+/x", "replies/a/x")
    assert not topic_matches("replies/+/x", "replies/a/y")
    assert not topic_matches("replies/+", "replies/a/b")
    assert not topic_matches("#", "$SYS/x")
    assert not topic_matches("+/x", "$q/x")
    assert topic_matches("$q/x", "$q/x")


# -- the MQTT app sets the origin -------------------------------------------------------------


@pytest.mark.mqtt
async def test_a_handler_dispatches_under_its_routes_group_coalesce_and_status_topic(
    broker: Broker, prefix: str
) -> None:
    seen: asyncio.Queue[Origin | None] = asyncio.Queue()
    router = Router()

    @router.on(
        f"{prefix}/devices/{{device_id}}/telemetry",
        group="{device_id}",
        coalesce="{device_id}",
        status_topic=f"{prefix}/devices/{{device_id}}/status",
    )
    async def telemetry(device_id: str, payload: Any) -> None:
        where = current_origin.get()
        await dispatch(Plain(device_id, payload))
        seen.put_nowait(where)  # after the dispatch: the test sends the next message then

    app_settings = broker.settings(mqtt_spool_max=0)
    async with QueueManager(app_settings) as qm:
        set_default_manager(qm)
        try:
            async with running(MqttApp(router, app_settings)):
                for n in range(3):  # no worker: the waiting job takes the newest value
                    await mosquitto_pub(broker, f"{prefix}/devices/d-1/telemetry", str(n))
                    await asyncio.wait_for(seen.get(), 20)
                await mosquitto_pub(broker, f"{prefix}/devices/d-2/telemetry", "9")
                where = await asyncio.wait_for(seen.get(), 20)
            [one, two] = sorted(
                await take(qm, "telemetry"),
                key=lambda j: orjson.loads(j.payload)["data"]["device_id"],
            )
        finally:
            set_default_manager(None)
    assert where is not None
    assert (where.group, where.coalesce) == ("d-2", "d-2")
    assert where.status_topic == f"{prefix}/devices/d-2/status"
    assert (where.response_topic, where.correlation_data) == ("", None)
    first = orjson.loads(one.payload)
    assert first["data"] == {"device_id": "d-1", "value": 2}  # coalesced: the latest value
    assert first["reply"] == {"status_topic": f"{prefix}/devices/d-1/status"}
    assert orjson.loads(two.payload)["data"]["device_id"] == "d-2"


@pytest.mark.mqtt
@pytest.mark.parametrize("allowed", [True, False])
async def test_a_response_topic_is_kept_only_when_mqtt_response_topics_allows_it(
    broker: Broker, prefix: str, allowed: bool
) -> None:
    router = Router()
    done: asyncio.Queue[str] = asyncio.Queue()

    @router.on(f"{prefix}/cmd/{{device_id}}")
    async def command(device_id: str) -> None:
        handle = await dispatch(Plain(device_id))
        done.put_nowait(handle)

    filters = (f"{prefix}/replies/#",) if allowed else (f"{prefix}/other/#",)
    app_settings = broker.settings(mqtt_spool_max=0, mqtt_response_topics=filters)
    async with QueueManager(app_settings) as qm:
        set_default_manager(qm)
        try:
            async with running(MqttApp(router, app_settings)):
                await mosquitto_pub(
                    broker,
                    f"{prefix}/cmd/d-5",
                    "{}",
                    extra=[
                        *("-V", "mqttv5"),
                        *("-D", "publish", "response-topic", f"{prefix}/replies/d-5"),
                        *("-D", "publish", "correlation-data", "req-42"),
                    ],
                )
                await asyncio.wait_for(done.get(), 20)
            [job] = await take(qm, "telemetry")
        finally:
            set_default_manager(None)
    payload = orjson.loads(job.payload)
    if allowed:
        assert payload["reply"] == {
            "topic": f"{prefix}/replies/d-5",
            "correlation": base64.b64encode(b"req-42").decode(),
        }
    else:
        assert "reply" not in payload


def test_class_path_is_what_coalescing_keys_start_with() -> None:
    assert class_path(Plain) == f"{PATH}:Plain"


@pytest.mark.mqtt
async def test_a_groups_messages_are_handled_one_at_a_time_in_arrival_order_others_in_parallel(
    broker: Broker, prefix: str
) -> None:
    """Handlers run concurrently, yet a device's jobs are dispatched in the order its messages
    arrived: a slow handler of d-1's first message holds d-1's second, not d-2's."""
    order: list[str] = []
    second_of_d2 = asyncio.Event()
    all_handled = asyncio.Event()
    router = Router()

    @router.on(f"{prefix}/devices/{{device_id}}/r", group="{device_id}")
    async def reading(device_id: str, payload: Any) -> None:
        if (device_id, payload) == ("d-1", 0):
            # Without a turn per group, d-1's later messages would be dispatched meanwhile.
            await asyncio.wait_for(second_of_d2.wait(), 20)
        await dispatch(Plain(device_id, payload))
        order.append(f"{device_id}:{payload}")
        if (device_id, payload) == ("d-2", 1):
            second_of_d2.set()
        if len(order) == 7:
            all_handled.set()

    app_settings = broker.settings(mqtt_spool_max=0)
    async with QueueManager(app_settings) as qm:
        set_default_manager(qm)
        try:
            app = MqttApp(router, app_settings)
            async with running(app):
                for n in range(5):
                    await mosquitto_pub(broker, f"{prefix}/devices/d-1/r", str(n))
                for n in range(2):
                    await mosquitto_pub(broker, f"{prefix}/devices/d-2/r", str(n))
                await asyncio.wait_for(all_handled.wait(), 20)
            queued = [
                (job.queue, orjson.loads(job.payload)["data"])
                for job in await take(qm, "telemetry")
            ]
        finally:
            set_default_manager(None)
    assert order[:2] == ["d-2:0", "d-2:1"]  # d-2 was not held up by d-1's slow handler
    assert [o for o in order if o.startswith("d-1")] == [f"d-1:{n}" for n in range(5)]
    d1 = [data["value"] for _, data in queued if data["device_id"] == "d-1"]
    assert d1[:1] == [0]  # the group's first job holds the turn; the rest are in its line
    assert app._turns == {}  # nothing left behind
