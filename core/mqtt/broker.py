"""The embedded broker (amqtt): `python main.py` on a machine with no MQTT server installed.

For development and demos only: it keeps sessions in memory and does not support shared
subscriptions (`$share/...`); production apps set `MQTT_HOST` to a real broker. When its port
is taken (a Mosquitto already running on 1883 is common on an IoT developer's machine) it
listens on a free port instead and says which: `port` holds the one it listens on.
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
        port: The port to listen on; when it is taken, a free one (`port` then holds it).
        fallback: Whether a taken `port` may be replaced by a free one; `False` when the
            port was chosen on purpose (`MQTT_EMBEDDED_PORT` set): devices expect it there.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, *, fallback: bool = True) -> None:
        self.host = host
        self.port = port
        self.requested_port = port
        self.fallback = fallback
        self._broker: Any = None

    async def __aenter__(self) -> Self:
        """Start listening.

        Raises:
            BrokerStartError: the address cannot be listened on, or amqtt failed to start.
        """
        taken = not self._port_is_free(self.port)
        if taken and not self.fallback:
            raise BrokerStartError(
                f"port {self.port} on {self.host} is taken (another MQTT broker?), and "
                f"MQTT_EMBEDDED_PORT={self.port} asks the embedded broker for exactly that port: "
                "free it, set another MQTT_EMBEDDED_PORT, unset it (a free port is then chosen), "
                f"or set MQTT_HOST={self.host} MQTT_PORT={self.port} to use the broker there"
            )
        if taken:
            self.port = self._free_port()
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
        if taken:
            # One line that says both what happened and how to choose otherwise.
            logger.warning(
                "port %d on %s is taken (another MQTT broker?): the embedded MQTT broker (amqtt) "
                "listens on %s:%d instead; set MQTT_EMBEDDED_PORT to another port to fix it, or "
                "MQTT_HOST=%s MQTT_PORT=%d to use the broker on %d",
                self.requested_port,
                self.host,
                self.host,
                self.port,
                self.host,
                self.requested_port,
                self.requested_port,
            )
        else:
            logger.info(
                "embedded MQTT broker (amqtt) listening on %s:%d; set MQTT_HOST to use another "
                "broker",
                self.host,
                self.port,
            )
        return self

    def _port_is_free(self, port: int) -> bool:
        # Asked before amqtt tries, which would log a traceback for this common case.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise BrokerStartError(
                        f"the embedded MQTT broker cannot listen on {self.host}:{port}: "
                        f"{exc.strerror}"
                    ) from exc
                return False
        return True

    def _free_port(self) -> int:
        # The kernel picks a port nobody listens on; amqtt binds it right after (a port taken
        # in between makes amqtt fail with a clear BrokerStartError, not a hang).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((self.host, 0))
            port: int = probe.getsockname()[1]
        return port

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
