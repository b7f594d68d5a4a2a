"""Publishing to MQTT from anywhere: jobs (`await self.publish(...)`), handlers, scripts.

    from core.mqtt import publish

    await publish("devices/42/alerts", {"level": "high"})

Inside the app process, messages go out over the app's own connection. Elsewhere (a worker
process, a script) one publish-only connection per process opens on first use, from the
settings of the default queue manager, reconnects when dropped, and closes when the event loop
that opened it shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

from core.errors import SerializationError
from core.mqtt.client import MqttClient, PublishConnection
from core.mqtt.message import MessageProperties
from core.mqtt.options import ConnectionOptions, Protocol

__all__ = [
    "Publisher",
    "close",
    "encode_payload",
    "own_connection",
    "protocol",
    "publish",
    "use_connection",
]


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError


def encode_payload(payload: Any) -> bytes:
    """Bytes as they are, strings as UTF-8, anything else as JSON (pydantic models too).

    Raises:
        SerializationError: the value cannot be written as JSON.
    """
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, BaseModel):
        return payload.model_dump_json().encode()
    try:
        return orjson.dumps(payload, default=_default)
    except TypeError as exc:
        raise SerializationError(
            f"cannot publish a {type(payload).__name__} payload: {exc}; pass bytes, a string, "
            "or a value JSON can carry"
        ) from None


# -- the app's connection, when this process runs the app -------------------------------------

_app_connection: MqttClient | None = None


@contextlib.contextmanager
def use_connection(connection: MqttClient) -> Iterator[None]:
    """Within the block, `publish()` in this process goes over `connection` (the app's)."""
    global _app_connection
    previous, _app_connection = _app_connection, connection
    try:
        yield
    finally:
        if _app_connection is connection:
            _app_connection = previous


# -- the process's own publish connection -----------------------------------------------------


@dataclass(slots=True)
class _Own:
    loop: asyncio.AbstractEventLoop
    connection: PublishConnection
    closer: AsyncGenerator[None, None]


_own: _Own | None = None


async def _close_with_loop(connection: PublishConnection) -> AsyncGenerator[None, None]:
    # asyncio.run() finalises async generators before it closes the loop, which runs this
    # `finally` on that loop: the connection closes with the loop that opened it.
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def _own_connection() -> PublishConnection:
    global _own
    loop = asyncio.get_running_loop()
    if _own is None or _own.loop is not loop:
        # Imported here: the queue manager imports `core.job`, which imports this module.
        from core.queue.queue_manager import get_default_manager

        settings = get_default_manager().settings
        connection = PublishConnection(ConnectionOptions.from_settings(settings))
        closer = _close_with_loop(connection)
        await anext(closer)
        _own = _Own(loop, connection, closer)
    return _own.connection


async def own_connection() -> PublishConnection:
    """This process's own connection (opened on first use), which `Job.request` also
    listens on for replies; it closes with the event loop that opened it."""
    return await _own_connection()


async def protocol() -> Protocol:
    """The MQTT version `publish()` speaks in this process (connecting first if needed).

    Raises:
        PublishError: the broker could not be reached in time.
    """
    app = _app_connection
    if app is not None and not app.closed:
        return app.protocol
    return await (await _own_connection()).connect()


async def close() -> None:
    """Close this process's publish connection now (the app does so before its broker stops)."""
    global _own
    own, _own = _own, None
    if own is not None and own.loop is asyncio.get_running_loop():
        await own.connection.close()
        with contextlib.suppress(Exception):
            await own.closer.aclose()


async def publish(
    topic: str,
    payload: Any,
    *,
    qos: int = 1,
    retain: bool = False,
    properties: MessageProperties | None = None,
) -> None:
    """Publish `payload` to `topic` (JSON unless bytes or str); returns once the broker has it
    (for QoS 1 and 2).

    Args:
        topic: The topic to publish to (no wildcards).
        payload: Bytes, a string, or a value JSON can carry.
        qos: 0, 1 or 2.
        retain: Ask the broker to keep it for future subscribers.
        properties: MQTT 5 properties (correlation data, ...); dropped under MQTT 3.1.1.

    Raises:
        PublishError: the broker could not be reached within the publish timeout.
        SerializationError: the payload cannot be written as JSON.
    """
    data = encode_payload(payload)
    app = _app_connection
    if app is not None and not app.closed:
        await app.publish(topic, data, qos=qos, retain=retain, properties=properties)
        return
    connection = await _own_connection()
    await connection.publish(topic, data, qos=qos, retain=retain, properties=properties)


class Publisher:
    """What handlers receive as `client`: `await client.publish(topic, payload)`.

    Args:
        connection: The app's connection; when it is closed (the app is stopping), messages
            go out the way `publish()` sends them.
    """

    def __init__(self, connection: MqttClient | None = None) -> None:
        self._connection = connection

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
    ) -> None:
        """Publish `payload` to `topic`; see `core.mqtt.publisher.publish`."""
        connection = self._connection
        if connection is not None and not connection.closed:
            data = encode_payload(payload)
            await connection.publish(topic, data, qos=qos, retain=retain, properties=properties)
            return
        await publish(topic, payload, qos=qos, retain=retain, properties=properties)
