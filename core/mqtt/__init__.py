"""The MQTT side of Topiq: routes, middleware, the app, publishing.

    from core.mqtt import Router, ValidatePayload

    router = Router()

    @router.on("devices/{device_id}/telemetry", middleware=[ValidatePayload(Telemetry)])
    async def telemetry(device_id: str, payload: Telemetry) -> None:
        await dispatch(StoreTelemetry(device_id, payload.model_dump()))

The aiomqtt client stays behind `core.mqtt.client`; nothing else imports it.
"""

from core.mqtt.app import MqttApp
from core.mqtt.client import MqttClient
from core.mqtt.context import MessageContext
from core.mqtt.errors import (
    BrokerStartError,
    InvalidPayloadError,
    MessageRejected,
    MqttError,
    PublishError,
    RateLimitedError,
    RouteError,
)
from core.mqtt.message import IncomingMessage, MessageProperties
from core.mqtt.middleware import LoggingMiddleware, RateLimit, ValidatePayload
from core.mqtt.options import ConnectionOptions, Protocol, uses_embedded_broker
from core.mqtt.publisher import Publisher, encode_payload, publish
from core.mqtt.routing import (
    CallNext,
    Middleware,
    Route,
    RouteGroup,
    Router,
    Subscription,
    TopicPattern,
)
from core.mqtt.stats import MqttStats

__all__ = [
    "BrokerStartError",
    "CallNext",
    "ConnectionOptions",
    "IncomingMessage",
    "InvalidPayloadError",
    "LoggingMiddleware",
    "MessageContext",
    "MessageProperties",
    "MessageRejected",
    "Middleware",
    "MqttApp",
    "MqttClient",
    "MqttError",
    "MqttStats",
    "Protocol",
    "PublishError",
    "Publisher",
    "RateLimit",
    "RateLimitedError",
    "Route",
    "RouteError",
    "RouteGroup",
    "Router",
    "Subscription",
    "TopicPattern",
    "ValidatePayload",
    "encode_payload",
    "publish",
    "uses_embedded_broker",
]
