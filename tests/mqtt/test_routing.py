"""Routes, groups, middleware and handler arguments, without a broker."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from core.errors import ConfigurationError
from core.mqtt import (
    CallNext,
    ConnectionOptions,
    IncomingMessage,
    InvalidPayloadError,
    LoggingMiddleware,
    MessageContext,
    MessageProperties,
    Publisher,
    RateLimit,
    RateLimitedError,
    Route,
    RouteError,
    Router,
    Subscription,
    ValidatePayload,
    encode_payload,
)
from core.mqtt.options import Protocol
from core.mqtt.routing import TopicPattern, filters_overlap
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(10)


async def noop() -> None:
    pass


def context_for(route: Route, topic: str, payload: bytes = b"{}", **kw: Any) -> MessageContext:
    params = route.matches(topic)
    assert params is not None
    return MessageContext(IncomingMessage(topic, payload, **kw), params, route, Publisher())


# -- patterns ---------------------------------------------------------------------------------


def test_params_are_captured_by_name_and_subscribe_as_plus() -> None:
    pattern = TopicPattern.compile("devices/{device_id}/sensors/{sensor}")
    assert pattern.filter == "devices/+/sensors/+"
    assert pattern.params == ("device_id", "sensor")
    assert pattern.match("devices/d-1/sensors/t") == {"device_id": "d-1", "sensor": "t"}
    assert pattern.match("devices/d-1/sensors") is None
    assert pattern.match("devices/d-1/sensors/t/x") is None
    assert pattern.match("devices//sensors/t") is None  # a named value is never empty


def test_plus_matches_exactly_one_level_even_an_empty_one() -> None:
    pattern = TopicPattern.compile("a/+/c")
    assert pattern.filter == "a/+/c"
    assert pattern.match("a/b/c") == {}
    assert pattern.match("a//c") == {}  # MQTT: `+` matches an empty level
    assert pattern.match("a/b/b/c") is None
    assert pattern.match("a/c") is None


def test_hash_matches_the_parent_and_any_depth() -> None:
    pattern = TopicPattern.compile("sport/{kind}/#")
    assert pattern.filter == "sport/+/#"
    assert pattern.match("sport/tennis") == {"kind": "tennis"}
    assert pattern.match("sport/tennis/player1") == {"kind": "tennis"}
    assert pattern.match("sport/tennis/player1/ranking/wimbledon") == {"kind": "tennis"}
    assert pattern.match("sports/tennis") is None


def test_leading_wildcards_do_not_match_dollar_topics() -> None:
    assert TopicPattern.compile("#").match("anything/at/all") == {}
    assert TopicPattern.compile("#").match("$SYS/broker/uptime") is None
    assert TopicPattern.compile("+/broker/uptime").match("$SYS/broker/uptime") is None
    assert TopicPattern.compile("$SYS/#").match("$SYS/broker/uptime") == {}


def test_literal_levels_are_not_regular_expressions() -> None:
    pattern = TopicPattern.compile("a.b/(c)")
    assert pattern.match("a.b/(c)") == {}
    assert pattern.match("axb/(c)") is None


@pytest.mark.parametrize(
    "pattern",
    ["", "a/#/b", "a/b#", "a/x+", "a/{x}{y}", "a/{x}/{x}", "a/{1x}", "$share/g/a/b", "a/\0"],
)
def test_bad_patterns_fail_at_start(pattern: str) -> None:
    with pytest.raises(RouteError):
        TopicPattern.compile(pattern)


def test_route_errors_are_configuration_errors() -> None:
    assert issubclass(RouteError, ConfigurationError)
    with pytest.raises(RouteError, match="qos"):
        Route("a", noop, qos=3)
    with pytest.raises(RouteError, match="shared"):
        Route("a", noop, shared="g/h")


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("a/+", "a/#", True),
        ("a/+", "a/b", True),
        ("a/+", "b/+", False),
        ("a/b", "a/b/c", False),
        ("a/#", "a", True),
        ("a/+/c", "a/b/d", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
    ],
)
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    assert filters_overlap(a, b) is overlap
    assert filters_overlap(b, a) is overlap


# -- routers ----------------------------------------------------------------------------------


def test_first_matching_route_wins_and_no_match_is_none() -> None:
    router = Router()
    router.on("devices/special/status", noop, name="special")
    router.on("devices/{device_id}/status", noop, name="any")
    router.on("devices/#", noop, name="rest")
    router.freeze()

    def resolve(topic: str) -> tuple[str, dict[str, str]] | None:
        found = router.resolve(topic)
        return None if found is None else (found[0].name, found[1])

    assert resolve("devices/special/status") == ("special", {})
    assert resolve("devices/d1/status") == ("any", {"device_id": "d1"})
    assert resolve("devices/d1/other") == ("rest", {})
    assert resolve("elsewhere/d1") is None


def test_shared_routes_subscribe_with_share_and_match_the_plain_topic() -> None:
    router = Router()
    route = router.on("jobs/{kind}", noop, shared="workers", qos=2)
    assert route is noop  # `on` hands the handler back
    [registered] = router.routes
    assert registered.filter == "$share/workers/jobs/+"
    assert registered.matches("jobs/resize") == {"kind": "resize"}
    assert registered.matches("$share/workers/jobs/resize") is None
    assert router.subscriptions() == [Subscription("$share/workers/jobs/+", 2, None)]


def test_groups_prefix_patterns_and_stack_middleware_and_options() -> None:
    calls: list[str] = []

    def tag(name: str) -> Any:
        async def middleware(context: MessageContext, call_next: CallNext) -> Any:
            calls.append(name)
            return await call_next(context)

        return middleware

    router = Router(middleware=[tag("router")])
    devices = router.group("devices/{device_id}", middleware=[tag("devices")], qos=2)
    sensors = devices.group("sensors", middleware=[tag("sensors")], shared="g")

    @sensors.on("{sensor}", middleware=[tag("route")])
    async def reading(device_id: str, sensor: str) -> str:
        calls.append("handler")
        return f"{device_id}:{sensor}"

    @devices.on("status", qos=0)
    async def status(device_id: str) -> None:
        pass

    reading_route, status_route = router.routes
    assert reading_route.pattern.pattern == "devices/{device_id}/sensors/{sensor}"
    assert reading_route.filter == "$share/g/devices/+/sensors/+"
    assert (reading_route.qos, status_route.qos) == (2, 0)
    assert status_route.filter == "devices/+/status"
    router.freeze()
    assert router.subscriptions()[0].qos == 2


async def test_middleware_runs_outermost_first_around_the_handler() -> None:
    calls: list[str] = []

    def tag(name: str) -> Any:
        async def middleware(context: MessageContext, call_next: CallNext) -> Any:
            calls.append(name)
            result = await call_next(context)
            calls.append(f"/{name}")
            return result

        return middleware

    router = Router(middleware=[tag("router")])
    group = router.group("d/{device_id}", middleware=[tag("group")])

    @group.on("x", middleware=[tag("route")])
    async def handler(device_id: str) -> str:
        calls.append("handler")
        return device_id

    router.add_middleware(tag("added"))
    router.freeze()
    [route] = router.routes
    assert await route(context_for(route, "d/7/x")) == "7"
    assert calls == [
        "router", "added", "group", "route", "handler", "/route", "/group", "/added", "/router",
    ]  # fmt: skip
    with pytest.raises(RouteError):
        router.on("late", noop)


def test_identical_filters_subscribe_once_with_the_highest_qos() -> None:
    router = Router()
    router.on("a/{x}", noop, qos=0)
    router.on("a/+", noop, qos=2)
    router.on("b/c", noop, qos=1)
    assert router.subscriptions() == [Subscription("a/+", 2, None), Subscription("b/c", 1, None)]


def test_overlapping_filters_get_subscription_ids_that_skip_duplicate_copies() -> None:
    router = Router()
    router.on("a/{x}", noop, name="one")
    router.on("a/#", noop, name="many")
    router.on("b/c", noop, name="alone")
    subs = {s.filter: s.id for s in router.subscriptions()}
    assert subs["a/+"] is not None and subs["a/#"] is not None and subs["b/c"] is None
    one, many = subs["a/+"], subs["a/#"]
    # Mosquitto sends `a/1` twice under MQTT 5, once per subscription: run it once.
    assert router.resolve("a/1", [one])[0].name == "one"  # type: ignore[index]
    assert router.resolve("a/1", [many]) is None
    # A broker that sends one copy lists both subscriptions.
    assert router.resolve("a/1", [many, one])[0].name == "one"  # type: ignore[index]
    assert router.resolve("a/1/2", [many])[0].name == "many"  # type: ignore[index]


def test_include_adds_another_routers_routes_under_a_prefix() -> None:
    devices = Router()
    devices.on("{device_id}/status", noop)
    router = Router()
    router.include(devices, prefix="site/{site}")
    assert router.routes[0].pattern.pattern == "site/{site}/{device_id}/status"


# -- handler arguments ------------------------------------------------------------------------


async def test_handlers_get_path_params_payload_client_and_context_by_name() -> None:
    seen: dict[str, Any] = {}

    async def handler(
        order_id: str, payload: Any, client: Publisher, context: MessageContext, topic: str
    ) -> str:
        seen.update(order_id=order_id, payload=payload, client=client, context=context, topic=topic)
        return "ok"

    route = Route("orders/{order_id}/new", handler)
    ctx = context_for(route, "orders/42/new", b'{"items": [1, 2]}', qos=1)
    assert await route(ctx) == "ok"
    assert seen["order_id"] == "42"
    assert seen["payload"] == {"items": [1, 2]}
    assert seen["client"] is ctx.client
    assert seen["context"] is ctx and ctx.raw == b'{"items": [1, 2]}' and ctx.qos == 1
    assert seen["topic"] == "orders/42/new"


async def test_payload_is_bytes_when_it_is_not_json() -> None:
    route = Route("raw/{n}", lambda payload: payload)  # a plain function runs in a thread
    assert await route(context_for(route, "raw/1", b"\x00\xffnot json")) == b"\x00\xffnot json"
    assert await route(context_for(route, "raw/1", b"21.5")) == 21.5


async def test_handlers_may_take_params_as_kwargs_and_skip_what_they_do_not_need() -> None:
    async def handler(a: str, unused: int = 3, **rest: str) -> dict[str, Any]:
        return {"a": a, "unused": unused, **rest}

    route = Route("{a}/{b}/{c}", handler)
    assert await route(context_for(route, "1/2/3")) == {"a": "1", "unused": 3, "b": "2", "c": "3"}


def test_a_handler_asking_for_something_unknown_fails_at_start() -> None:
    async def handler(device: str) -> None:
        pass

    with pytest.raises(RouteError, match=r"'device'.*device_id"):
        Route("devices/{device_id}", handler)


async def test_the_seed_controller_signature_works() -> None:
    from core.controller import Controller

    class OrderController(Controller):
        @staticmethod
        async def handle_new_order(order_id: str, payload: Any, client: Any) -> dict[str, str]:
            return {"status": "accepted", "order_id": order_id}

    route = Route("orders/{order_id}/new", OrderController.handle_new_order)
    result = await route(context_for(route, "orders/9/new", b'{"sku": "x"}'))
    assert result == {"status": "accepted", "order_id": "9"}
    assert OrderController.logger.name == "topiq.app.OrderController"


# -- shipped middleware -----------------------------------------------------------------------


class Reading(BaseModel):
    temperature: float
    humidity: float | None = None


async def test_validate_payload_puts_the_model_in_the_payload_or_refuses() -> None:
    async def handler(payload: Reading) -> Reading:
        return payload

    route = Route("r/{device_id}", handler, middleware=[ValidatePayload(Reading)])
    route.build()
    result = await route(context_for(route, "r/1", b'{"temperature": 21.5}'))
    assert result == Reading(temperature=21.5)
    with pytest.raises(InvalidPayloadError, match="Invalid JSON"):
        await route(context_for(route, "r/1", b'{"temperature": '))
    with pytest.raises(InvalidPayloadError, match="temperature"):
        await route(context_for(route, "r/1", b'{"temperature": "warm"}'))


async def test_rate_limit_is_per_device_with_bursts() -> None:
    now = [0.0]
    limit = RateLimit(2, per=1.0, burst=3, clock=lambda: now[0])
    route = Route("d/{device_id}/t", noop, middleware=[limit])
    route.build()
    for _ in range(3):  # the burst
        await route(context_for(route, "d/a/t"))
    with pytest.raises(RateLimitedError, match="'a'"):
        await route(context_for(route, "d/a/t"))
    await route(context_for(route, "d/b/t"))  # another device has its own bucket
    now[0] = 0.5  # refilled one token (2 per second)
    await route(context_for(route, "d/a/t"))
    with pytest.raises(RateLimitedError):
        await route(context_for(route, "d/a/t"))


def test_rate_limit_forgets_the_least_recent_senders_beyond_max_keys() -> None:
    limit = RateLimit(1, max_keys=2, clock=lambda: 0.0)
    for key in ("a", "b", "c"):
        assert limit.allow(key)
    assert not limit.allow("c")
    assert limit.allow("a")  # forgotten, so it starts with a full bucket


async def test_logging_middleware_logs_topic_and_route(caplog: pytest.LogCaptureFixture) -> None:
    route = Route("d/{device_id}", noop, middleware=[LoggingMiddleware()], name="status")
    route.build()
    with caplog.at_level("INFO", logger="topiq.mqtt.messages"):
        await route(context_for(route, "d/7"))
    assert "d/7 -> status" in caplog.text


# -- payloads out, connection options -----------------------------------------------------------


def test_encode_payload() -> None:
    assert encode_payload(b"\x00") == b"\x00"
    assert encode_payload("héllo") == "héllo".encode()
    assert encode_payload({"a": [1, 2.5, None]}) == b'{"a":[1,2.5,null]}'
    assert encode_payload(Reading(temperature=1)) == b'{"temperature":1.0,"humidity":null}'
    with pytest.raises(TypeError, match="object"):
        encode_payload(object())


def test_connection_options_from_settings() -> None:
    embedded = ConnectionOptions.from_settings(make_settings(mqtt_embedded_port=18830))
    assert (embedded.host, embedded.port, embedded.embedded) == ("127.0.0.1", 18830, True)
    assert embedded.protocol is Protocol.V311 and not embedded.clean_session
    assert embedded.client_id.startswith("topiq-")

    split = ConnectionOptions.from_settings(
        make_settings(mqtt_host="broker.local", mqtt_port=1884, mqtt_client_id="app-1")
    )
    assert (split.host, split.port, split.client_id, split.embedded) == (
        "broker.local",
        1884,
        "app-1",
        False,
    )
    assert "MQTT_HOST/MQTT_PORT" in split.hint and split.protocol is None

    url = ConnectionOptions.from_settings(
        make_settings(mqtt_url="mqtts://user:p%40ss@broker.example:8884", mqtt_host="ignored")
    )
    assert (url.host, url.port, url.tls, url.username, url.password) == (
        "broker.example",
        8884,
        True,
        "user",
        "p@ss",
    )
    assert "p@ss" not in repr(url)
    with pytest.raises(ConfigurationError, match="MQTT_URL"):
        ConnectionOptions.from_settings(make_settings(mqtt_url="http://broker"))
    with pytest.raises(ConfigurationError, match="MQTT_TLS_CA"):
        ConnectionOptions.from_settings(
            make_settings(mqtt_host="b", mqtt_tls=True, mqtt_tls_ca="/nonexistent/ca.pem")
        )


def test_message_properties_default_to_empty() -> None:
    message = IncomingMessage("t", b"")
    assert message.properties == MessageProperties()
    assert message.properties.subscription_ids == ()
