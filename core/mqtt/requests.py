"""`Job.request`: MQTT 5 request/response for device commands.

    reply = await self.request(f"devices/{self.device_id}/commands", {"cmd": "reboot"}, timeout=5)

The command goes out over the process's own MQTT connection (`core.mqtt.publisher`), with a
Response Topic `<MQTT_REPLY_PREFIX>/<client id>/<random>` and Correlation Data that are new for
every call; the connection subscribes once to `<MQTT_REPLY_PREFIX>/<client id>/#` (before the
first command is sent, and again after every reconnect). The device answers by publishing to
the response topic, echoing the correlation data. A reply is taken only by the call it names
(its topic, and its correlation data when it carries some): a late reply to an earlier try,
or one with a correlation nobody waits for, is ignored (logged at debug).

No reply within `timeout` raises `RequestTimeoutError`: the try fails, so the job's
`max_tries` and `retry_after` decide whether the command is sent again. A broker that speaks
only MQTT 3.1.1 has no response topics: `request` raises `ConfigurationError` saying so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from core.errors import ConfigurationError, RequestTimeoutError
from core.mqtt.client import PublishConnection
from core.mqtt.context import parse_payload
from core.mqtt.message import IncomingMessage, MessageProperties
from core.mqtt.options import Protocol
from core.mqtt.publisher import encode_payload, own_connection

__all__ = ["Requests", "request"]

logger = logging.getLogger("topiq.mqtt.requests")


@dataclass(slots=True)
class _Call:
    correlation: bytes
    reply: asyncio.Future[IncomingMessage] = field(repr=False)


class Requests:
    """The calls waiting for a reply on one connection, by response topic.

    Args:
        connection: The process's own connection; its client id names the reply topics.
        prefix: `MQTT_REPLY_PREFIX`.
    """

    def __init__(self, connection: PublishConnection, prefix: str) -> None:
        self.connection = connection
        self.base = f"{prefix}/{connection.client_id}"
        self._waiting: dict[str, _Call] = {}
        self._listening = False
        self.ignored = 0  # replies that matched no waiting call

    async def request(
        self, topic: str, payload: Any, *, timeout: float = 10.0, qos: int = 1
    ) -> Any:
        """Publish `payload` to `topic` and return the reply parsed like a route's payload.

        Raises:
            RequestTimeoutError: no reply within `timeout` seconds (publishing included).
            ConfigurationError: the broker speaks only MQTT 3.1.1.
            PublishError: the broker could not be reached.
        """
        if not (timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        data = encode_payload(payload)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._listening:
            await self.connection.listen(f"{self.base}/#", self._on_reply, qos=1)
            self._listening = True
        if self.connection.protocol is not Protocol.V5:
            raise ConfigurationError(
                f"Job.request needs MQTT 5 (response topics), but the broker at "
                f"{self.connection.options.address} speaks only MQTT 3.1.1; publish the "
                "command with Job.publish and have the device answer on a topic a route handles"
            )
        token = os.urandom(12).hex()
        response_topic = f"{self.base}/{token}"
        # ASCII (hex): a device built from shell tools can echo it (`mosquitto_pub -D`).
        call = _Call(os.urandom(16).hex().encode(), loop.create_future())
        self._waiting[response_topic] = call
        try:
            properties = MessageProperties(
                response_topic=response_topic, correlation_data=call.correlation
            )
            try:
                await asyncio.wait_for(
                    self.connection.publish(
                        topic,
                        data,
                        qos=qos,
                        properties=properties,
                        timeout=max(0.1, deadline - loop.time()),
                    ),
                    max(0.1, deadline - loop.time()),
                )
                message = await asyncio.wait_for(call.reply, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise RequestTimeoutError(
                    f"no reply to the request on {topic} within {timeout:g}s"
                ) from None
        finally:
            del self._waiting[response_topic]
        return parse_payload(message.payload)

    def _on_reply(self, message: IncomingMessage) -> None:
        call = self._waiting.get(message.topic)
        correlation = message.properties.correlation_data
        if (
            call is None
            or call.reply.done()
            or (correlation is not None and correlation != call.correlation)
        ):
            self.ignored += 1
            logger.debug(
                "ignored a reply on %s: no request waits for it (late, or an unknown correlation)",
                message.topic,
            )
            return
        call.reply.set_result(message)


_requests: Requests | None = None


async def request(topic: str, payload: Any, *, timeout: float = 10.0, qos: int = 1) -> Any:
    """Send a command and wait for its reply; see the module docstring and `Job.request`."""
    global _requests
    connection = await own_connection()
    if _requests is None or _requests.connection is not connection:
        # Imported here: the queue manager imports `core.job`, which imports this module's
        # caller; the settings of the default manager name the reply prefix.
        from core.queue.queue_manager import get_default_manager

        prefix = get_default_manager().settings.mqtt_reply_prefix
        _requests = Requests(connection, prefix)
    return await _requests.request(topic, payload, timeout=timeout, qos=qos)
