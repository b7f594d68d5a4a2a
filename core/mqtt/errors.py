"""The errors of the MQTT side, under Topiq's root `TopiqError`.

TopiqError
├── ConfigurationError
│   └── RouteError            a route pattern or handler signature is wrong (raised at start)
└── MqttError                 the MQTT side failed
    ├── BrokerStartError      the embedded broker could not start (its port is taken)
    ├── PublishError          a message could not be published in time
    └── MessageRejected       a message was refused before its handler ran (counted, logged)
        ├── InvalidPayloadError   the payload failed validation
        └── RateLimitedError      the sender is over its rate limit
"""

from __future__ import annotations

from core.errors import ConfigurationError, TopiqError

__all__ = [
    "BrokerStartError",
    "InvalidPayloadError",
    "MessageRejected",
    "MqttError",
    "PublishError",
    "RateLimitedError",
    "RouteError",
]


class RouteError(ConfigurationError):
    """A route pattern, option or handler signature cannot be used."""


class MqttError(TopiqError):
    """The root of the MQTT side's runtime errors."""


class BrokerStartError(MqttError):
    """The embedded broker could not start (usually: its port is in use)."""


class PublishError(MqttError):
    """A message could not be published before the publish timeout."""


class MessageRejected(MqttError):
    """A middleware refused a message; the app logs and counts it, and moves on."""


class InvalidPayloadError(MessageRejected):
    """The payload is not what the route expects (bad JSON, or it failed validation)."""


class RateLimitedError(MessageRejected):
    """The client or device that sent the message is over its rate limit."""
