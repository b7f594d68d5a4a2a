"""`MessageContext`: everything a handler or middleware may want to know about one message."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from core.mqtt.message import IncomingMessage, MessageProperties

if TYPE_CHECKING:
    from core.mqtt.publisher import Publisher
    from core.mqtt.routing import Route

__all__ = ["MessageContext", "parse_payload"]

_UNSET: Any = object()

# The names `context[...]` answers: the seed's handlers read `context["params"]` and
# `context["payload"]`; every other public attribute is reachable the same way.
_KEYS = frozenset(
    {"topic", "params", "payload", "raw", "qos", "retain", "properties", "route", "client", "state"}
)


def parse_payload(raw: bytes) -> Any:
    """The payload decoded from JSON when it is JSON, else the raw bytes unchanged."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


class MessageContext:
    """One message on its way through middleware to its handler.

    Handlers that declare a `context` parameter receive it. Middleware may replace `payload`
    (a validating middleware puts the model there) and keep notes in `state`. Each attribute
    below can also be read by name, dict-style: `context["params"]["user_id"]`,
    `context["payload"]["email"]`, `context.get("topic")`.

    Attributes:
        topic: The topic the message was published on.
        params: The path parameters the route's pattern captured, by name.
        raw: The payload bytes exactly as received.
        qos: The QoS the message was delivered with.
        retain: Whether the broker delivered it as a retained message.
        properties: MQTT 5 properties (response topic, correlation data, ...).
        route: The route that matched.
        client: Publishes with the app's connection (`await context.client.publish(...)`).
        state: Free space for middleware to pass values along.
    """

    __slots__ = (
        "_payload",
        "client",
        "params",
        "properties",
        "qos",
        "raw",
        "retain",
        "route",
        "state",
        "topic",
    )

    def __init__(
        self,
        message: IncomingMessage,
        params: Mapping[str, str],
        route: Route,
        client: Publisher,
    ) -> None:
        self.topic: str = message.topic
        self.params: dict[str, str] = dict(params)
        self.raw: bytes = message.payload
        self.qos: int = message.qos
        self.retain: bool = message.retain
        self.properties: MessageProperties = message.properties
        self.route: Route = route
        self.client: Publisher = client
        self.state: dict[str, Any] = {}
        self._payload: Any = _UNSET

    @property
    def payload(self) -> Any:
        """The payload: parsed from JSON when it is JSON (bytes otherwise), or what a
        middleware put here (a validated model). Parsed once, on first use."""
        if self._payload is _UNSET:
            self._payload = parse_payload(self.raw)
        return self._payload

    @payload.setter
    def payload(self, value: Any) -> None:
        self._payload = value

    def __getitem__(self, key: str) -> Any:
        """`context["payload"]` is `context.payload`, and so on for every attribute above.

        Raises:
            KeyError: `key` is not one of them (the message lists the names there are).
        """
        if key not in _KEYS:
            raise KeyError(
                f"MessageContext has no {key!r}; it has {', '.join(sorted(_KEYS))} "
                "(a path parameter is context['params'][name])"
            )
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in _KEYS

    def get(self, key: str, default: Any = None) -> Any:
        """`context[key]`, or `default` for a name the context does not have."""
        return getattr(self, key) if key in _KEYS else default

    def keys(self) -> frozenset[str]:
        """The names `context[...]` answers."""
        return _KEYS

    def __repr__(self) -> str:
        return f"<MessageContext topic={self.topic!r} params={self.params!r} qos={self.qos}>"
