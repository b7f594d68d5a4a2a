"""What a received message carries, independent of the MQTT client library."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["IncomingMessage", "MessageProperties"]


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """The MQTT 5 properties a handler may care about; all empty under MQTT 3.1.1.

    Attributes:
        response_topic: Where the sender wants a reply (request/response).
        correlation_data: Opaque bytes to send back with the reply.
        content_type: The sender's description of the payload (e.g. `application/json`).
        user_properties: Name/value pairs in the order they were sent.
        message_expiry: Seconds the message stays valid, if the sender set it.
        subscription_ids: The identifiers of the subscriptions this copy was sent for.
    """

    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    message_expiry: int | None = None
    subscription_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message as the broker delivered it."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: MessageProperties = field(default_factory=MessageProperties)
