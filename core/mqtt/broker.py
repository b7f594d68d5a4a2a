"""The embedded broker (amqtt): `python main.py` on a machine with no MQTT server installed.

For development and demos only: it keeps sessions in memory and does not support shared
subscriptions (`$share/...`); production apps set `MQTT_HOST` to a real broker.
"""

from __future__ import annotations

import errno
import logging
import socket
from types import TracebackType
from typing import Any, Self

from core.mqtt.errors import BrokerStartError

__all__ = ["EmbeddedBroker"]

logger = logging.getLogger("topiq.mqtt.broker")


class EmbeddedBroker:
    """An amqtt broker listening on `host:port` while the `async with` block runs.

    Args:
        host: The address to listen on (loopback by default: nothing outside this machine
            can reach an unauthenticated development broker).
        port: The port to listen on.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    async def __aenter__(self) -> Self:
        """Start listening.

        Raises:
            BrokerStartError: the port is in use or amqtt failed to start.
        """
        self._check_port()
        # amqtt (and its state machine library) announce every connection at INFO; keep them
        # to warnings unless debugging.
        if not logger.isEnabledFor(logging.DEBUG):
            for name in ("amqtt", "transitions"):
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.WARNING)
        from amqtt.broker import Broker  # imported here: only the embedded setup needs amqtt

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerStartError(
                f"the embedded MQTT broker could not start on {self.host}:{self.port}: {exc}"
            ) from exc
        self._broker = broker
        logger.info(
            "embedded MQTT broker (amqtt) listening on %s:%d; set MQTT_HOST to use another broker",
            self.host,
            self.port,
        )
        return self

    def _check_port(self) -> None:
        # Asked before amqtt tries, which would log a traceback for this common case.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise BrokerStartError(
                        f"the embedded MQTT broker cannot listen on {self.host}:{self.port}: "
                        f"{exc.strerror}"
                    ) from exc
                raise BrokerStartError(
                    f"port {self.port} on {self.host} is already in use (another MQTT broker?): "
                    f"set MQTT_HOST={self.host} MQTT_PORT={self.port} to use that broker, or "
                    "MQTT_EMBEDDED_PORT to a free port for the embedded one"
                ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening and drop every session."""
        broker, self._broker = self._broker, None
        if broker is not None:
            try:
                await broker.shutdown()
            except Exception as error:
                logger.warning("the embedded MQTT broker did not shut down cleanly: %s", error)
