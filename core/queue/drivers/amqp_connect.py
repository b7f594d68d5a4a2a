"""Reaching RabbitMQ: the connection (TLS when the URL says amqps://), the names Topiq
declares on the broker, and the translation of aio-pika's errors into Topiq's.

Every broker object is a durable quorum queue whose name starts with `AMQP_PREFIX`:

* `<P>.q.<queue>`: the work queue of Topiq queue `<queue>`.
* `<P>.delay.<k>` (k = 0..31): the delay ladder, each with a message TTL of 2**k ms,
  dead-lettering (at least once, `reject-publish` overflow) into `<P>.delay.router`, which the
  workers consume to send each message on to its next bucket or to its work queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractRobustConnection

from core.errors import ConfigurationError, ConnectionLostError, DriverError
from core.settings import Settings, redact_url

__all__ = [
    "LADDER",
    "Names",
    "bucket_for",
    "connect",
    "ladder_arguments",
    "translated",
    "work_arguments",
]

#: The delay buckets: bucket k holds a message 2**k milliseconds (k = 0..31: up to ~24.8 days
#: per hop; a longer delay takes several hops of the last bucket).
LADDER = 32

#: Seconds to wait for the broker to answer a connection attempt.
CONNECT_TIMEOUT = 10.0

logger = logging.getLogger("topiq.amqp")


def _quiet_the_client() -> None:
    """aiormq and aio-pika log a traceback (or several) for every lost connection and every
    reconnection attempt: an outage Topiq reports in one line of its own (`_watch`). Their
    loggers are quieted unless the application set their level itself."""
    for name in ("aiormq", "aio_pika"):
        client = logging.getLogger(name)
        if client.level == logging.NOTSET:
            client.setLevel(logging.CRITICAL)


def _watch(conn: AbstractRobustConnection, shown: str) -> None:
    """One line when the connection is lost, one when it is back."""

    def lost(_sender: Any, exc: BaseException | None = None, *_: Any) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            logger.warning("RabbitMQ at %s lost (%s); reconnecting", shown, _describe(exc))

    def back(_sender: Any, *_: Any) -> None:
        logger.warning("RabbitMQ at %s reconnected", shown)

    conn.close_callbacks.add(lost)
    conn.reconnect_callbacks.add(back)


#: AMQP names are short strings: at most 255 bytes.
MAX_NAME_BYTES = 255
#: One character the AMQP client (pamqp) lets into a queue name.
_NAME_CHAR = re.compile(r"[A-Za-z0-9 #+,\-./:@_]")


class Names:
    """The broker names of one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.router = f"{prefix}.delay.router"

    def work(self, queue: str) -> str:
        return f"{self.prefix}.q.{queue}"

    def checked_work(self, queue: str) -> str:
        """The work queue's name, or a DriverError saying why the broker (or the AMQP client)
        would refuse it: checked before anything of a job is written."""
        name = self.work(queue)
        size = len(name.encode())
        if size > MAX_NAME_BYTES:
            raise DriverError(
                f"queue {queue!r} cannot be used on the amqp connection: its RabbitMQ queue "
                f"name {self.prefix}.q.<queue> is {size} bytes, past AMQP's {MAX_NAME_BYTES}-byte "
                f"limit (keep the queue name to {MAX_NAME_BYTES - size + len(queue.encode())} "
                "bytes at most)"
            )
        bad = sorted({c for c in name if not _NAME_CHAR.fullmatch(c)})
        if bad:
            raise DriverError(
                f"queue {queue!r} cannot be used on the amqp connection: the AMQP client "
                f"refuses the character(s) {', '.join(repr(c) for c in bad)} in a queue name "
                "(letters a-z A-Z, digits, space and - _ . : @ # , / + are allowed; no control "
                "characters)"
            )
        return name

    def delay(self, bucket: int) -> str:
        return f"{self.prefix}.delay.{bucket}"


def work_arguments() -> dict[str, Any]:
    """A work queue's (and the router's) arguments: quorum, replicated and durable."""
    return {"x-queue-type": "quorum"}


def ladder_arguments(names: Names, bucket: int) -> dict[str, Any]:
    """Bucket `bucket` of the ladder: every message expires after 2**bucket ms (one TTL per
    queue, so the head is always the oldest and expires first) and is dead-lettered, at least
    once, into the router."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": 2**bucket,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.router,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def bucket_for(remaining_ms: float) -> int:
    """The ladder bucket for a message due in `remaining_ms` (> 0): the largest 2**k not past
    its due time, so it never comes out late by more than the hops it takes."""
    if remaining_ms < 1:
        return 0
    return min(math.floor(math.log2(remaining_ms)), LADDER - 1)


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Verifying TLS for amqps://: the system's CAs or AMQP_TLS_CA, the client certificate of
    AMQP_TLS_CERT / AMQP_TLS_KEY when given. Never unverified, never plaintext."""
    ca = settings.amqp_tls_ca
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"AMQP_TLS_CA {ca}: cannot be read as CA certificates ({exc})"
        ) from exc
    cert, key = settings.amqp_tls_cert, settings.amqp_tls_key
    if key is not None and cert is None:
        raise ConfigurationError("AMQP_TLS_KEY is set without AMQP_TLS_CERT: set both")
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key) if key is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"AMQP_TLS_CERT {cert} / AMQP_TLS_KEY {key}: cannot be loaded ({exc})"
            ) from exc
    return context


async def connect(settings: Settings) -> AbstractRobustConnection:
    """A robust connection (aio-pika reconnects it and restores its channels and consumers).

    Raises:
        ConfigurationError: the broker refused the credentials or the virtual host, or the
            TLS files cannot be used.
        ConnectionLostError: nothing answers at the URL (or its TLS handshake failed).
    """
    url = settings.amqp_url.get_secret_value()
    shown = redact_url(url)
    tls = url.lower().startswith("amqps://")
    if not tls and (settings.amqp_tls_cert or settings.amqp_tls_ca or settings.amqp_tls_key):
        raise ConfigurationError(
            f"AMQP_TLS_* files are set but AMQP_URL {shown} is not amqps://: TLS is never "
            "switched on implicitly; use amqps://"
        )
    kwargs: dict[str, Any] = {"timeout": CONNECT_TIMEOUT}
    if tls:
        kwargs["ssl_context"] = _tls_context(settings)
    try:
        _quiet_the_client()
        conn: AbstractRobustConnection = await aio_pika.connect_robust(url, **kwargs)
        _watch(conn, shown)
        return conn
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise ConfigurationError(
            f"AMQP_URL {shown}: RabbitMQ refused the user name or password ({exc.args[0]})"
        ) from exc
    except aiormq.exceptions.ProtocolSyntaxError as exc:
        # A Connection.Close in place of OpenOk: the virtual host does not exist, or the user
        # may not use it.
        raise ConfigurationError(
            f"AMQP_URL {shown}: RabbitMQ refused to open the virtual host (does it exist, and "
            f"may this user use it?): {exc}"
        ) from exc
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise ConnectionLostError(f"RabbitMQ is unreachable at {shown}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


@contextlib.contextmanager
def translated(settings: Settings, what: str) -> Iterator[None]:
    """Broker errors while doing `what` as Topiq's: a lost connection or channel is a
    (retryable) `ConnectionLostError` naming the URL, a refusal by the broker a `DriverError`."""
    try:
        yield
    except (
        aiormq.exceptions.AMQPConnectionError,
        aiormq.exceptions.ChannelInvalidStateError,
        aiormq.exceptions.ConnectionClosed,
        ConnectionError,
        TimeoutError,
    ) as exc:
        shown = redact_url(settings.amqp_url.get_secret_value())
        raise ConnectionLostError(
            f"RabbitMQ at {shown} unreachable while {what}: {_describe(exc)}"
        ) from exc
    except aiormq.exceptions.AMQPError as exc:
        raise DriverError(f"RabbitMQ refused {what}: {_describe(exc)}") from exc
