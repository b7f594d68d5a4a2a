"""Testing support for users (core/testing.py): the fake queue, its fixture, the route test
client. The fake is pointed at a Redis that does not exist: anything reaching a backend fails."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from core.errors import DuplicateJobError, SerializationError, UnloadableJobError
from core.job import Job, job
from core.mqtt import (
    InvalidPayloadError,
    MessageContext,
    MessageProperties,
    MqttApp,
    RateLimit,
    Router,
    publish,
)
from core.mqtt.routing import CallNext
from core.queue.queue_manager import dispatch, get_default_manager, queue, set_default_manager
from core.settings import Settings
from core.status import Status
from core.testing import FakeQueue, RouteTestClient, fake_queue
from tests.conftest import ROOT, make_settings
from tests.jobs import NotAJob, RecordJob, SleepJob
from tests.ops.conftest import closed_port

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(30)


def unreachable() -> Settings:
    """Settings whose default connection cannot be reached: a fake must never try it."""
    return make_settings(queue_connection="redis", redis_url=f"redis://127.0.0.1:{closed_port()}/0")


@pytest.fixture
def fake() -> Iterator[FakeQueue]:
    with fake_queue(unreachable()) as recording:
        yield recording


class Bare(Job):
    """Not in tests.jobs, so that messages name it plainly."""

    queue = "bare"

    def __init__(self, n: int) -> None:
        self.n = n


# -- the fake queue -----------------------------------------------------------------------


async def test_the_fake_records_dispatch_push_later_and_bulk_without_a_backend(
    fake: FakeQueue,
) -> None:
    first = await dispatch(RecordJob("log", 1))
    await queue.push(RecordJob("log", 2), queue="emails")
    await queue.later("10 minutes", RecordJob("log", 3))
    await queue.bulk([Bare(1), Bare(2)])
    assert [type(d.job) for d in fake.dispatches] == [RecordJob] * 3 + [Bare] * 2
    assert fake.dispatches[0].id == str(first) and fake.dispatches[0].job.job_id == str(first)
    assert [d.queue for d in fake.dispatches] == ["default", "emails", "default", "bare", "bare"]
    assert [d.delay for d in fake.dispatches] == [0, 0, 600, 0, 0]
    assert {d.connection for d in fake.dispatches} == {"redis"}
    assert fake.dispatches[0].path == "tests.jobs:RecordJob"
    fake.assert_dispatched(RecordJob)
    fake.assert_dispatched(RecordJob, n=2, queue="emails")
    fake.assert_dispatched(RecordJob, count=1, delay=lambda seconds: seconds > 60)
    fake.assert_dispatched_times(RecordJob, 3)
    fake.assert_dispatched_times(Bare, 2)
    fake.assert_dispatched("tests.jobs:RecordJob", count=3)
    fake.assert_not_dispatched(RecordJob, n=4)
    fake.assert_not_dispatched(SleepJob)
    assert [job.n for job in fake.dispatched(Bare)] == [1, 2]
    assert [job.n for job in fake.dispatched(RecordJob, queue="default")] == [1, 3]


async def test_failed_assertions_say_what_was_dispatched(fake: FakeQueue) -> None:
    fake.assert_nothing_dispatched()
    with pytest.raises(AssertionError, match="nothing was dispatched"):
        fake.assert_dispatched(Bare)
    await dispatch(Bare(1))
    await dispatch(Bare(2))
    with pytest.raises(AssertionError) as missing:
        fake.assert_dispatched(Bare, n=3)
    assert "expected a Bare dispatched with n=3, found 0" in str(missing.value)
    assert "Bare(n=1)" in str(missing.value) and "Bare(n=2)" in str(missing.value)
    with pytest.raises(AssertionError, match="expected 3 Bare dispatched, found 2"):
        fake.assert_dispatched_times(Bare, 3)
    with pytest.raises(AssertionError, match=r"expected no Bare dispatched with n=2, found 1"):
        fake.assert_not_dispatched(Bare, n=2)
    with pytest.raises(AssertionError, match="expected nothing dispatched, found 2"):
        fake.assert_nothing_dispatched()
    with pytest.raises(AssertionError, match=r"dispatched were: tests\.test_testing_support:Bare"):
        fake.assert_dispatched(RecordJob)
    fake.clear()
    fake.assert_nothing_dispatched()


async def test_the_fake_keeps_the_checks_of_a_real_dispatch(fake: FakeQueue) -> None:
    with pytest.raises(SerializationError, match=r"RecordJob\.data_ cannot be stored as JSON"):
        await dispatch(RecordJob("log", when=object()))
    with pytest.raises(UnloadableJobError):
        await dispatch(NotAJobButAJob())
    with pytest.raises(SerializationError):
        await dispatch(NotAJob())  # type: ignore[arg-type]
    fake.assert_nothing_dispatched()


class NotAJobButAJob(Job):
    """A class a worker could import only from a module outside the allowed ones."""


NotAJobButAJob.__module__ = "elsewhere.jobs"


async def test_handles_from_the_fake_read_queued_and_scheduled(fake: FakeQueue) -> None:
    now = await dispatch(Bare(1))
    later = await queue.later(60, Bare(2))
    assert str(await now.status()) == Status.QUEUED  # type: ignore[attr-defined]
    assert (await later.status()).status is Status.SCHEDULED  # type: ignore[attr-defined]


class Coalesced(Job):
    queue = "telemetry"
    unique_key = "device-1"
    on_duplicate = "replace"

    def __init__(self, reading: float) -> None:
        self.reading = reading


async def test_uniqueness_applies_as_on_a_real_queue(fake: FakeQueue) -> None:
    first = await dispatch(Coalesced(1.0))
    second = await dispatch(Coalesced(2.0))
    assert str(second) == str(first)  # the waiting job kept its id and took the new data
    fake.assert_dispatched_times(Coalesced, 1)
    fake.assert_dispatched(Coalesced, reading=2.0)
    job = Bare(1)
    job.job_id = "order-1"
    await dispatch(job)
    again = Bare(2)
    again.job_id = "order-1"
    with pytest.raises(DuplicateJobError):
        await dispatch(again)
    fake.assert_dispatched_times(Bare, 1)


@job(queue="maths")
async def add(a: int, b: int) -> int:
    return a + b


async def test_queue_fake_records_job_functions_by_the_function() -> None:
    with queue.fake(unreachable()) as fake:
        handle = await add.dispatch(1, b=2)
        await add.later(30, 5, 6)
        fake.assert_dispatched(add, count=2)
        fake.assert_dispatched(add, args=[1], kwargs={"b": 2}, queue="maths")
        fake.assert_dispatched(add, count=1, delay=30)
        fake.assert_not_dispatched(add, args=[9, 9])
        assert fake.dispatches[0].path == "tests.test_testing_support:add"
        assert fake.dispatches[0].id == str(handle)
    assert await add(2, 3) == 5  # still an ordinary function outside the queue


def test_the_fake_is_the_default_manager_only_within_the_block() -> None:
    before = make_settings()
    set_default_manager(None)
    try:
        from core.queue.queue_manager import QueueManager

        mine = QueueManager(before)
        set_default_manager(mine)
        with fake_queue() as fake:
            assert get_default_manager() is fake.manager
            assert fake.manager.settings is before  # the settings of the manager it replaces
        assert get_default_manager() is mine
    finally:
        set_default_manager(None)


def test_the_fixture_is_a_plugin_users_enable(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('pytest_plugins = ["core.testing"]\n')
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            import asyncio

            from core.queue.queue_manager import dispatch
            from tests.jobs import RecordJob


            def test_records(fake_queue):
                asyncio.run(dispatch(RecordJob("log", 7)))
                fake_queue.assert_dispatched(RecordJob, n=7)


            def test_fresh_each_time(fake_queue):
                fake_queue.assert_nothing_dispatched()
            """
        )
    )
    pytester.syspathinsert(ROOT)
    env = {"QUEUE_ALLOWED_MODULES": "app.,tests.", "QUEUE_CONNECTION": "redis"}
    env["REDIS_URL"] = f"redis://127.0.0.1:{closed_port()}/0"  # a fake never connects
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.chdir(pytester.path)
        set_default_manager(None)
        try:
            outcome = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
        finally:
            set_default_manager(None)
    outcome.assert_outcomes(passed=2)


# -- the route test client ----------------------------------------------------------------


async def test_the_apps_own_route_dispatches_through_its_middleware() -> None:
    from app.jobs.store_telemetry_job import StoreTelemetryJob
    from app.routes import router

    client = RouteTestClient(router, settings=unreachable())
    sent = await client.send("devices/d7/telemetry", {"temperature": 21.5})
    assert sent.error is None and sent.params == {"device_id": "d7"}
    sent.assert_dispatched(StoreTelemetryJob, count=1, device_id="d7")
    [job] = sent.dispatched
    assert job.data() == {"device_id": "d7", "reading": {"temperature": 21.5}}
    bad = await client.send("devices/d7/telemetry", {"temperature": "warm"})
    assert isinstance(bad.error, InvalidPayloadError)  # ValidatePayload refused it
    bad.assert_nothing_dispatched()


async def test_middleware_runs_outermost_first_and_the_value_comes_back() -> None:
    seen: list[str] = []

    def named(name: str) -> Any:
        async def middleware(context: MessageContext, call_next: CallNext) -> Any:
            seen.append(f"{name} in")
            context.state[name] = True
            result = await call_next(context)
            seen.append(f"{name} out")
            return result

        return middleware

    router = Router(middleware=[named("router")])
    group = router.group("rooms/{room}", middleware=[named("group")])

    @group.on("set", middleware=[named("route")])
    async def set_point(room: str, payload: dict[str, Any], context: MessageContext) -> Any:
        seen.append("handler")
        return {"room": room, "want": payload["want"], "state": sorted(context.state)}

    sent = await RouteTestClient(router).send("rooms/r1/set", b'{"want": 20}', qos=0)
    assert sent.value == {"room": "r1", "want": 20, "state": ["group", "route", "router"]}
    assert seen == [
        "router in",
        "group in",
        "route in",
        "handler",
        "route out",
        "group out",
        "router out",
    ]
    assert sent.route.name.endswith("set_point")


async def test_what_a_handler_raises_is_reported_not_raised() -> None:
    router = Router()

    @router.on("boom")
    async def boom() -> None:
        raise RuntimeError("broken sensor")

    sent = await RouteTestClient(router).send("boom")
    assert isinstance(sent.error, RuntimeError) and sent.value is None
    with pytest.raises(RuntimeError, match="broken sensor"):
        sent.raise_error()


async def test_rate_limit_middleware_state_carries_across_sends() -> None:
    router = Router()
    router.on("d/{device_id}/x", lambda: None, middleware=[RateLimit(1, per=60)])
    client = RouteTestClient(router)
    assert (await client.send("d/a/x")).error is None
    assert type((await client.send("d/a/x")).error).__name__ == "RateLimitedError"
    assert (await client.send("d/b/x")).error is None


async def test_mqtt5_properties_and_publishes_are_seen() -> None:
    router = Router()

    @router.on("rpc/{name}")
    async def rpc(name: str, context: MessageContext) -> str:
        props = context.properties
        await context.client.publish("audit", {"name": name, "from": dict(props.user_properties)})
        await publish("metrics/rpc", b"1", qos=0)  # the module-level publish is caught too
        return f"{name}:{props.content_type}:{props.correlation_data!r}"

    client = RouteTestClient(router)
    sent = await client.send(
        "rpc/ping",
        "",
        response_topic="replies/1",
        correlation_data=b"c1",
        content_type="text/plain",
        user_properties=[("site", "north")],
    )
    assert sent.value == "ping:text/plain:b'c1'"
    assert [(p.topic, p.qos) for p in sent.published] == [("audit", 1), ("metrics/rpc", 0)]
    assert sent.published[0].json() == {"name": "ping", "from": {"site": "north"}}
    given = MessageProperties(content_type="a/b")
    assert (await client.send("rpc/x", properties=given)).value == "x:a/b:None"
    with pytest.raises(TypeError, match="not both"):
        await client.send("rpc/x", properties=given, content_type="c/d")


async def test_an_unrouted_topic_is_an_error_naming_the_routes() -> None:
    router = Router()
    router.on("a/{x}", lambda: None)
    client = RouteTestClient(router)
    assert client.resolve("b/1") is None
    with pytest.raises(LookupError, match=r"no route matches 'b/1' \(the routes: a/\{x\}\)"):
        await client.send("b/1")


async def test_an_app_or_a_module_with_a_router_is_accepted() -> None:
    router = Router()
    router.on("t", lambda payload: payload)
    app = MqttApp(router, make_settings())
    assert (await RouteTestClient(app).send("t", {"k": 1})).value == {"k": 1}
    with pytest.raises(TypeError, match="needs a Router"):
        RouteTestClient(object())


async def test_the_client_uses_the_active_fake(fake: FakeQueue) -> None:
    router = Router()

    @router.on("go/{n}")
    async def go(n: str) -> None:
        await dispatch(Bare(int(n)))

    client = RouteTestClient(router)
    first = await client.send("go/1")
    second = await client.send("go/2")
    assert [j.n for j in first.dispatched] == [1] and [j.n for j in second.dispatched] == [2]
    fake.assert_dispatched_times(Bare, 2)
