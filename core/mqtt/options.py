"""Where and how to connect to the broker: `ConnectionOptions`, built from the settings."""

from __future__ import annotations

import dataclasses
import enum
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from core.errors import ConfigurationError
from core.settings import Settings

__all__ = [
    "EMBEDDED_HOST",
    "ConnectionOptions",
    "Protocol",
    "default_client_id",
    "uses_embedded_broker",
]

RECONNECT_MIN = 0.5  # seconds before the first reconnect attempt
RECONNECT_MAX = 30.0  # the backoff never waits longer than this
PUBLISH_TIMEOUT = 10.0  # how long a publish may wait for a connection and its PUBACK
SESSION_EXPIRY = 7 * 24 * 3600  # MQTT 5: how long the broker keeps the app's session offline
RECEIVE_MAXIMUM = 100  # unacknowledged messages the app takes at once
EMBEDDED_HOST = "127.0.0.1"


class Protocol(enum.IntEnum):
    """The MQTT protocol versions Topiq speaks."""

    V311 = 4
    V5 = 5


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Where and how to connect; built from the settings by `from_settings`.

    Attributes:
        host: The broker's host name or address.
        port: The broker's port.
        client_id: The MQTT client id; stable across restarts so the session persists.
        username: The user name, if the broker needs one.
        password: The password (never logged).
        keepalive: Seconds between pings when idle.
        clean_session: Start a fresh session on every connect (no offline queueing).
        tls: Connect with TLS.
        tls_ca: A CA bundle to verify the broker with (default: the system's).
        tls_cert: A client certificate, for brokers that ask for one.
        tls_key: The client certificate's key.
        tls_insecure: Skip verifying the broker's certificate and host name.
        protocol: The protocol to use; `None` tries MQTT 5 and falls back to 3.1.1.
        reconnect_min: The first reconnect delay in seconds.
        reconnect_max: The longest reconnect delay in seconds.
        publish_timeout: Seconds a publish may wait for a connection and its acknowledgement.
        session_expiry: MQTT 5: seconds the broker keeps the session while disconnected.
        receive_maximum: Unacknowledged messages the app takes at once (MQTT 5 Receive Maximum).
        embedded: The address is the app's embedded broker.
        hint: How to fix the address, shown when the broker cannot be reached.
    """

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 60
    clean_session: bool = False
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_insecure: bool = False
    protocol: Protocol | None = None
    reconnect_min: float = RECONNECT_MIN
    reconnect_max: float = RECONNECT_MAX
    publish_timeout: float = PUBLISH_TIMEOUT
    session_expiry: int = SESSION_EXPIRY
    receive_maximum: int = RECEIVE_MAXIMUM
    embedded: bool = False
    hint: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> ConnectionOptions:
        """The options the `MQTT_*` settings describe; `changes` override single fields.

        `MQTT_URL` (`mqtt://user:pass@host:port`, `mqtts://` for TLS) wins over `MQTT_HOST`
        and friends; with neither set, the address is the embedded broker's.

        Raises:
            ConfigurationError: `MQTT_URL` is malformed or a TLS file does not exist.
        """
        values: dict[str, Any] = {
            "client_id": (settings.mqtt_client_id or default_client_id(settings))
            + settings.mqtt_client_id_suffix,
            "username": settings.mqtt_username,
            "password": (
                settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            ),
            "keepalive": settings.mqtt_keepalive,
            "clean_session": settings.mqtt_clean_session,
            "tls": settings.mqtt_tls,
            "tls_ca": settings.mqtt_tls_ca,
            "tls_cert": settings.mqtt_tls_cert,
            "tls_key": settings.mqtt_tls_key,
            "tls_insecure": settings.mqtt_tls_insecure,
            "receive_maximum": settings.mqtt_receive_maximum,
        }
        if settings.mqtt_url:
            values.update(_parse_url(settings.mqtt_url))
            values["hint"] = (
                "check MQTT_URL in .env or the environment, or unset MQTT_URL and MQTT_HOST "
                "to use the embedded broker"
            )
        elif settings.mqtt_host:
            values.update(host=settings.mqtt_host, port=settings.mqtt_port)
            values["hint"] = (
                "set MQTT_HOST/MQTT_PORT in .env, or unset MQTT_HOST to use the embedded broker"
            )
        else:
            values.update(
                host=EMBEDDED_HOST,
                port=settings.mqtt_embedded_port,
                embedded=True,
                tls=False,
                # amqtt speaks MQTT 3.1.1 only: skip the refused MQTT 5 attempt.
                protocol=Protocol.V311,
                hint="the embedded broker runs inside `python main.py`; start the app, or set "
                "MQTT_HOST/MQTT_PORT to use another broker",
            )
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = values[name]
            if values["tls"] and path is not None and not Path(path).is_file():
                raise ConfigurationError(f"MQTT_{name.upper()}: no such file: {path}")
        if values["tls"]:  # TLS or nothing: a plaintext port resets the handshake, never falls back
            values["hint"] += (
                "; TLS is on (mqtts:// or MQTT_TLS): the broker must speak TLS on that port, "
                "with a certificate that MQTT_TLS_CA (or the system's CAs) verifies"
            )
        values.update(changes)
        return cls(**values)

    @property
    def address(self) -> str:
        """`host:port`, for messages (no credentials)."""
        return f"{self.host}:{self.port}"

    def replace(self, **changes: Any) -> ConnectionOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def uses_embedded_broker(settings: Settings) -> bool:
    """Whether no broker is configured (`MQTT_HOST` and `MQTT_URL` unset)."""
    return not settings.mqtt_url and not settings.mqtt_host


def default_client_id(settings: Settings) -> str:
    """`<app name>-<host name>`: stable across restarts on one machine, as a persistent
    session needs. Several app processes on one machine each add their own
    `MQTT_CLIENT_ID_SUFFIX` (supervisor/topiq-app.conf does)."""
    raw = f"{settings.app_name}-{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)[:64]


def _parse_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    schemes = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigurationError(
            "MQTT_URL: expected mqtt://[user[:password]@]host[:port] (or mqtts:// for TLS)"
        )
    tls = schemes[parts.scheme]
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigurationError("MQTT_URL: the port must be a number from 1 to 65535") from None
    values: dict[str, Any] = {"host": parts.hostname, "port": port, "tls": tls}
    if parts.username:
        values["username"] = unquote(parts.username)
    if parts.password:
        values["password"] = unquote(parts.password)
    return values
