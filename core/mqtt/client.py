"""The adapter over aiomqtt 2.5 and paho-mqtt 2.2 (both pinned to their minor version): the
only module that imports either.

Two connections live here:

- `MqttClient`, the app's connection: it keeps itself connected (exponential backoff with
  jitter, capped), re-sends its subscriptions after every reconnect, and hands every received
  message to `deliveries()` as a `Delivery` to acknowledge once it is handled. It uses a stable
  client id and a persistent session (MQTT 3.1.1 `clean_session=False`, or MQTT 5
  `clean_start=False` with a session expiry), so the broker keeps the subscriptions and queues
  QoS 1/2 messages while the app is away.

  aiomqtt 2.x acknowledges a QoS 1 message on receipt and has no public way not to, so this
  adapter turns on the manual acknowledgement of the paho client aiomqtt wraps
  (`manual_ack_set`, `ack(mid, qos)`) and takes over paho's `on_message` and its
  acknowledgement: a message is acknowledged (PUBACK) only when `Delivery.ack()` is called,
  on the connection that received it. `receive_maximum` bounds the unacknowledged messages
  of a connection (MQTT 5 Receive Maximum in CONNECT; see `_Connection`).
- `PublishConnection`, a lazily opened clean-session connection used only to publish (one per
  worker process), reconnecting when it finds itself dropped.

MQTT 5 is tried first (for response topics and correlation data); a broker that refuses it
gets MQTT 3.1.1 for the rest of the process's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from core.mqtt.errors import PublishError
from core.mqtt.message import IncomingMessage, MessageProperties
from core.mqtt.options import ConnectionOptions, Protocol
from core.mqtt.routing import Subscription
from core.mqtt.stats import MqttStats

__all__ = ["Delivery", "MqttClient", "PublishConnection"]

logger = logging.getLogger("topiq.mqtt")

# CONNACK/DISCONNECT reason codes (paho reports MQTT 3.1.1 return codes as their MQTT 5
# equivalents, so one table serves both).
_UNSUPPORTED_PROTOCOL = 132
_BAD_CREDENTIALS = {134, 135}
_SESSION_TAKEN_OVER = 142
_FLAPPING = 3  # connections in a row lost within SHORT_LIVED seconds of being made
_SHORT_LIVED = 5.0


# -- building aiomqtt clients -----------------------------------------------------------------


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho is untyped here


def _new_client(
    options: ConnectionOptions,
    protocol: Protocol,
    *,
    client_id: str,
    clean: bool,
) -> aiomqtt.Client:
    kwargs: dict[str, Any] = {
        "username": options.username,
        "password": options.password,
        "identifier": client_id,
        "keepalive": options.keepalive,
        "timeout": options.publish_timeout,
        "protocol": aiomqtt.ProtocolVersion(protocol.value),
    }
    if protocol is Protocol.V5:
        properties = _properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if clean else options.session_expiry
        properties.ReceiveMaximum = options.receive_maximum
        kwargs.update(clean_start=clean, properties=properties)
    else:
        kwargs["clean_session"] = clean
    if options.tls:
        kwargs["tls_params"] = aiomqtt.TLSParameters(
            ca_certs=str(options.tls_ca) if options.tls_ca else None,
            certfile=str(options.tls_cert) if options.tls_cert else None,
            keyfile=str(options.tls_key) if options.tls_key else None,
            cert_reqs=ssl.CERT_NONE if options.tls_insecure else ssl.CERT_REQUIRED,
        )
        kwargs["tls_insecure"] = options.tls_insecure
    client = aiomqtt.Client(options.host, options.port, **kwargs)
    _quiet_disconnects(client)
    return client


def _read_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _quiet_disconnects(client: aiomqtt.Client) -> None:
    """Mark the exception of a dropped connection as read, as soon as it is set.

    aiomqtt 2.x leaves it unread when the drop races its own `__aenter__` (which replaces the
    future) or `__aexit__`, and asyncio then logs "Future exception was never retrieved"
    whenever the garbage collector gets to it, in the middle of anything. We learn of drops
    from the message iterator or from a failing call, so nothing is lost by reading it here.
    """
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future):
        future.add_done_callback(_read_exception)


def _abandon(client: aiomqtt.Client) -> None:
    """A connect cancelled half-way: hang up quietly.

    aiomqtt 2.x cancels its `_connected` future then, and its disconnect callback, which runs
    when the socket closes later, fails on that future ("Exception in callback" logged by
    asyncio); a fresh future lets the callback return early.
    """
    client._connected = asyncio.get_running_loop().create_future()
    with contextlib.suppress(Exception):
        client._client.disconnect()


def _reason(exc: BaseException) -> int | None:
    """The MQTT reason code behind an aiomqtt error (CONNACK or DISCONNECT), if any."""
    while exc is not None:
        rc = getattr(exc, "rc", None)
        if isinstance(rc, ReasonCode):
            return int(rc.value)
        if isinstance(rc, int) and isinstance(exc, MqttConnectError):
            return rc
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def _backoff(options: ConnectionOptions, failures: int) -> float:
    delay = min(options.reconnect_max, options.reconnect_min * 2.0 ** max(0, failures - 1))
    # Jitter spreads the reconnects of many app processes after a broker restart.
    return delay * random.uniform(0.5, 1.0)


def _incoming(message: paho.MQTTMessage) -> IncomingMessage:
    return IncomingMessage(
        topic=message.topic,
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        properties=_read_properties(getattr(message, "properties", None)),
    )


def _read_properties(properties: Properties | None) -> MessageProperties:
    if properties is None:
        return MessageProperties()
    ids = getattr(properties, "SubscriptionIdentifier", ())
    correlation = getattr(properties, "CorrelationData", None)
    return MessageProperties(
        response_topic=getattr(properties, "ResponseTopic", None),
        correlation_data=bytes(correlation) if correlation is not None else None,
        content_type=getattr(properties, "ContentType", None),
        user_properties=tuple(tuple(p) for p in getattr(properties, "UserProperty", ())),
        message_expiry=getattr(properties, "MessageExpiryInterval", None),
        subscription_ids=tuple(ids) if isinstance(ids, list | tuple) else (int(ids),),
    )


def _write_properties(props: MessageProperties | None, protocol: Protocol) -> Properties | None:
    if props is None or protocol is not Protocol.V5:
        return None  # MQTT 3.1.1 has no properties: they are dropped, not an error
    out = _properties(PacketTypes.PUBLISH)
    if props.response_topic:
        out.ResponseTopic = props.response_topic
    if props.correlation_data is not None:
        out.CorrelationData = props.correlation_data
    if props.content_type:
        out.ContentType = props.content_type
    if props.message_expiry is not None:
        out.MessageExpiryInterval = props.message_expiry
    for name, value in props.user_properties:
        out.UserProperty = (name, value)  # paho appends on each assignment
    return out


# -- receiving and acknowledging --------------------------------------------------------------


class Delivery:
    """A received message the app owes an acknowledgement for.

    Call `ack()` once the message is handled (what its handler dispatched is stored, or it
    dispatched nothing). Until then the message counts against the connection's window and
    the broker keeps it: if the connection drops first, the broker sends it again.

    Attributes:
        message: The message.
    """

    __slots__ = ("_connection", "_mid", "_settled", "message")

    def __init__(self, message: IncomingMessage, connection: _Connection, mid: int) -> None:
        self.message = message
        self._connection = connection
        self._mid = mid
        self._settled = False

    def ack(self) -> None:
        """Acknowledge (QoS 1 and 2) and free the message's place in the window.

        On a connection that dropped since the message arrived nothing is sent: a PUBACK
        names a packet id of that connection, and the broker sends the message again on the
        next one. A second call does nothing.
        """
        if not self._settled:
            self._settled = True
            self._connection.settle(self.message, self._mid)


class _Connection:
    """One aiomqtt client's receiving side: paho's manual acknowledgement and the window.

    Takes over the paho client's `on_message` (aiomqtt's own queue stays empty), called on
    the event loop thread while aiomqtt's reader reads the socket. The socket is always read
    (pings, SUBACKs and the PUBACKs of the app's own publishes come that way): the window is
    kept by the broker (MQTT 5 Receive Maximum, or its own in-flight limit under 3.1.1) for
    QoS 1 and 2, and here for QoS 0, which no broker limits: a QoS 0 message arriving while
    the window is full is dropped (at most once is all QoS 0 promises), counted and logged.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        window: int,
        deliver: Callable[[Delivery], None],
        stats: MqttStats,
        *,
        reading: bool = True,
    ) -> None:
        self.window = window
        self.unacked = 0  # deliveries of this connection not settled yet
        self.open = True  # acknowledgements can still be sent
        self._deliver = deliver
        self._stats = stats
        self._reading = reading  # False once the app stopped taking messages
        # Until the subscriptions are sent, what arrives (the session's queued messages come
        # right after CONNACK) waits here: handlers run only on a connection that is up.
        self._held: list[Delivery] | None = []
        self._paho: paho.Client = client._client
        self._paho.manual_ack_set(True)
        self._paho.on_message = self._on_message

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        if not self._reading:
            return  # never acknowledged: the broker sends it again
        if message.qos == 0 and self.unacked >= self.window:
            self._stats.dropped += 1
            if self._stats.dropped == 1 or self._stats.dropped % 1000 == 0:
                logger.warning(
                    "dropped a QoS 0 message on %s: %d messages in hand fill MQTT_RECEIVE_MAXIMUM "
                    "(%d QoS 0 message(s) dropped so far); handlers are not keeping up",
                    message.topic,
                    self.unacked,
                    self._stats.dropped,
                )
            return
        self.unacked += 1
        self._stats.unacked += 1
        delivery = Delivery(_incoming(message), self, message.mid)
        if self._held is not None:
            self._held.append(delivery)
        else:
            self._deliver(delivery)

    def up(self) -> None:
        """The connection is up and subscribed: hand over what arrived meanwhile, and the rest."""
        held, self._held = self._held or [], None
        for delivery in held:
            self._deliver(delivery)

    def stop_reading(self) -> None:
        """Take no more messages; those not taken stay the broker's."""
        self._reading = False

    def settle(self, message: IncomingMessage, mid: int) -> None:
        self.unacked -= 1
        self._stats.unacked -= 1
        if not message.qos:
            return
        if not self.open:
            logger.debug(
                "not acknowledging message %d on %s: its connection dropped, and the broker "
                "sends it again",
                mid,
                message.topic,
            )
            return
        rc = self._paho.ack(mid, message.qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            logger.debug("could not acknowledge message %d on %s (%s)", mid, message.topic, rc)

    def close(self) -> None:
        """The connection is gone: its acknowledgements can no longer be sent, and what it
        held back is left to the broker, which sends it again."""
        self.open = False
        self._stats.unacked -= len(self._held or ())  # never handed over, never settled
        self._held = None


def _at_most_qos1(sub: Subscription) -> Subscription:
    if sub.qos < 2:
        return sub
    logger.warning(
        "subscribing to %r at QoS 1, not the QoS 2 its route asks for: the app acknowledges a "
        "message only once its handler finished, which QoS 2 (answered on receipt) cannot "
        "wait for; delivery is at-least-once, so a message may be handled twice",
        sub.filter,
    )
    return dataclasses.replace(sub, qos=1)


# -- the app's connection ---------------------------------------------------------------------


class MqttClient:
    """The app's connection: stays connected, resubscribes, and hands over what it receives.

    Use as `async with MqttClient(options, subscriptions) as client:`, read
    `client.deliveries()` and call `ack()` on each once it is handled. At most
    `options.receive_maximum` messages of one connection are unacknowledged at a time: the
    broker keeps the rest. `stop_reading()` ends `deliveries()` at once (what was received
    but not read stays unacknowledged, so the broker sends it again); leaving the block
    disconnects (the persistent session stays on the broker).

    A subscription asking for QoS 2 is sent at QoS 1, with a warning: paho answers a QoS 2
    PUBLISH with PUBREC on receipt, after which the broker never sends it again, so a crash
    before the handler finished would lose it.

    Args:
        options: Where and how to connect.
        subscriptions: What to subscribe to after every (re)connect.
        stats: Counters to keep the connection state in.
    """

    def __init__(
        self,
        options: ConnectionOptions,
        subscriptions: Sequence[Subscription] = (),
        *,
        stats: MqttStats | None = None,
    ) -> None:
        self.options = options
        self.subscriptions = tuple(_at_most_qos1(sub) for sub in subscriptions)
        self.stats = stats if stats is not None else MqttStats()
        self._inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._reading = True
        self._connection: _Connection | None = None
        self._ready = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._client: aiomqtt.Client | None = None
        self._protocol = options.protocol or Protocol.V5
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0  # publish() calls under way
        self._settled = asyncio.Event()  # set while none is
        self._settled.set()
        self._up_since = 0.0
        self._short_lived = 0  # connections in a row that dropped soon after they were made

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._maintain(), name="topiq-mqtt-connection")

    def stop_reading(self) -> None:
        """Take no more messages: `deliveries()` ends now; acknowledging still works.

        Messages received but not read from `deliveries()` are never acknowledged, so the
        broker sends them again (on the next connection of the persistent session).
        """
        if not self._reading:
            return
        self._reading = False
        if self._connection is not None:
            self._connection.stop_reading()
        self._inbox.put_nowait(None)

    async def close(self) -> None:
        """Stop reading and disconnect for good (publishes under way finish first)."""
        if self._closed:
            return
        self.stop_reading()
        self._closed = True
        # Publishes already under way get their acknowledgement before the disconnect (new
        # ones are refused from now on, and `Publisher` sends them another way).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), self.options.publish_timeout)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def connected(self) -> bool:
        """Whether the connection is up and subscribed right now."""
        return self._ready.is_set()

    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
        return self._closed

    @property
    def protocol(self) -> Protocol:
        """The protocol in use (or to be tried next)."""
        return self._protocol

    async def wait_connected(self) -> None:
        """Return once the connection is up and the subscriptions are sent."""
        await self._ready.wait()

    async def wait_disconnected(self) -> None:
        """Return once the connection is down (at once if it is down now)."""
        await self._down.wait()

    # -- messages ------------------------------------------------------------------------

    async def deliveries(self) -> AsyncIterator[Delivery]:
        """Every message received, across reconnects, until `stop_reading()` or `close()`.

        Each must be acknowledged (`Delivery.ack()`), or the window fills and reading stops.
        """
        while self._reading:
            delivery = await self._inbox.get()
            if delivery is None or not self._reading:
                return
            yield delivery

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish, waiting (up to `timeout`, default `publish_timeout`) for a connection.

        Raises:
            PublishError: no connection came up, or the broker did not acknowledge in time.
        """
        if self._closed:
            raise PublishError(f"cannot publish to {topic}: the connection is closed")
        self._in_flight += 1
        self._settled.clear()
        try:
            await self._publish(topic, payload, qos, retain, properties, timeout)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._settled.set()

    async def _publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: MessageProperties | None,
        timeout: float | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.publish_timeout if timeout is None else timeout)
        while True:
            try:
                await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise PublishError(
                    f"cannot publish to {topic}: not connected to {self.options.address}"
                ) from None
            client = self._client
            if client is None or self._task is None or self._task.done():
                raise PublishError(f"cannot publish to {topic}: the connection is closed")
            try:
                await client.publish(
                    topic,
                    payload,
                    qos=qos,
                    retain=retain,
                    properties=_write_properties(properties, self._protocol),
                    timeout=max(0.1, deadline - loop.time()),
                )
                return
            except aiomqtt.MqttError as exc:
                # Dropped mid-publish: wait for the reconnect and send again (at-least-once).
                # Anything else (or no time left) is the caller's error.
                if (client is self._client and self._ready.is_set()) or loop.time() >= deadline:
                    raise PublishError(f"could not publish to {topic}: {_describe(exc)}") from exc
                await self._down.wait()
                if self._closed:
                    raise PublishError(
                        f"could not publish to {topic}: the connection closed"
                    ) from exc

    # -- the connection loop -------------------------------------------------------------

    async def _maintain(self) -> None:
        failures = 0
        while self._reading:
            client = _new_client(
                self.options,
                self._protocol,
                client_id=self.options.client_id,
                clean=self.options.clean_session,
            )
            connection = _Connection(
                client,
                self.options.receive_maximum,
                self._inbox.put_nowait,
                self.stats,
                reading=self._reading,
            )
            was_up = False
            try:
                async with client:
                    _quiet_disconnects(client)  # `__aenter__` made a new future
                    was_up = True
                    self._client = client
                    self._connection = connection
                    await self._subscribe(client)
                    self._up(failures)
                    connection.up()
                    failures = 0
                    # Messages come through `connection`, never through aiomqtt's queue: this
                    # only waits for the connection to drop (it raises then).
                    async for _ in client.messages:
                        pass
            except aiomqtt.MqttError as exc:
                if not was_up and self._fall_back(exc):
                    continue
                failures += 1
                self._report(exc, was_up, failures)
            except Exception:
                failures += 1
                logger.exception("MQTT connection to %s failed unexpectedly", self.options.address)
            finally:
                # Messages of this connection still being handled are not acknowledged
                # any more: the broker sends them again on the next connection.
                connection.close()
                self._connection = None
                self._client = None
                self._ready.clear()
                self._down.set()
                self.stats.connected = False
            if self._reading:
                await asyncio.sleep(_backoff(self.options, failures))

    def _fall_back(self, exc: aiomqtt.MqttError) -> bool:
        auto = self.options.protocol is None and self._protocol is Protocol.V5
        if auto and _reason(exc) == _UNSUPPORTED_PROTOCOL:
            logger.info(
                "the broker at %s does not speak MQTT 5; using MQTT 3.1.1", self.options.address
            )
            self._protocol = Protocol.V311
            return True
        return False

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # Besides (re)subscribing, this notices a connection dropped while aiomqtt 2.x was
        # still inside `__aenter__`: it forgets such a disconnect, and the message iterator
        # would wait forever, but a SUBSCRIBE on a dead connection fails and we reconnect.
        await asyncio.gather(*(self._subscribe_one(client, sub) for sub in self.subscriptions))

    async def _subscribe_one(self, client: aiomqtt.Client, sub: Subscription) -> None:
        properties = None
        if sub.id is not None and self._protocol is Protocol.V5:
            properties = _properties(PacketTypes.SUBSCRIBE)
            properties.SubscriptionIdentifier = sub.id
        granted = await client.subscribe(sub.filter, qos=sub.qos, properties=properties)
        code = granted[0] if granted else None
        value = int(code.value) if isinstance(code, ReasonCode) else code
        if value is not None and value >= 128:
            logger.error(
                "the broker at %s refused the subscription to %r (%s); its route gets no messages",
                self.options.address,
                sub.filter,
                code,
            )

    def _up(self, failures: int) -> None:
        self._up_since = asyncio.get_running_loop().time()
        self.stats.connects += 1
        self.stats.connected = True
        self._down.clear()
        self._ready.set()
        logger.info(
            "%s to the MQTT broker at %s as %r (MQTT %s, %s session); subscribed to %d filter(s)",
            "reconnected" if self.stats.connects > 1 else "connected",
            self.options.address,
            self.options.client_id,
            "5" if self._protocol is Protocol.V5 else "3.1.1",
            "clean" if self.options.clean_session else "persistent",
            len(self.subscriptions),
        )

    def _report(self, exc: aiomqtt.MqttError, was_up: bool, failures: int) -> None:
        address = self.options.address
        reason = _reason(exc)
        if was_up:
            lived = asyncio.get_running_loop().time() - self._up_since
            self._short_lived = self._short_lived + 1 if lived < _SHORT_LIVED else 0
            # Two processes sharing a client id take the session from each other in turn;
            # MQTT 5 brokers may say so (reason 142), others just drop the connection.
            if reason == _SESSION_TAKEN_OVER or self._short_lived == _FLAPPING:
                logger.error(
                    "the broker at %s keeps dropping the connection (another client with client "
                    "id %r taking over the session?); give each app process its own "
                    "MQTT_CLIENT_ID",
                    address,
                    self.options.client_id,
                )
            else:
                logger.warning(
                    "lost the connection to the MQTT broker at %s (%s); reconnecting",
                    address,
                    _describe(exc),
                )
        elif reason in _BAD_CREDENTIALS:
            logger.error(
                "the MQTT broker at %s refused the credentials (%s): check MQTT_USERNAME and "
                "MQTT_PASSWORD; retrying",
                address,
                _describe(exc),
            )
        elif failures == 1:
            logger.error(
                "cannot reach the MQTT broker at %s (%s): %s; retrying",
                address,
                _describe(exc),
                self.options.hint,
            )
        elif failures % 10 == 0:
            logger.warning(
                "still cannot reach the MQTT broker at %s after %d attempts (%s); retrying",
                address,
                failures,
                _describe(exc),
            )
        else:
            logger.debug("connecting to %s failed (%s)", address, _describe(exc))


# -- the publishing connection ----------------------------------------------------------------


class PublishConnection:
    """A clean-session connection used only to publish, opened on first use.

    Its client id is the app's with a `-pub-<pid>-<random>` suffix, so it never takes over
    the app's session or another worker's connection.

    Args:
        options: Where and how to connect.
    """

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        suffix = f"-pub-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.client_id = options.client_id[: 64 - len(suffix)] + suffix
        self._protocol = options.protocol or Protocol.V5
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()
        # `listen()`: filter -> (handler, qos), subscribed again on every (re)connect.
        self._listeners: dict[str, tuple[Callable[[IncomingMessage], None], int]] = {}
        self._subscribed: set[str] = set()

    @property
    def protocol(self) -> Protocol:
        """The protocol in use (or to be tried next): known for sure once connected."""
        return self._protocol

    async def connect(self, timeout: float | None = None) -> Protocol:
        """Connect now unless connected; returns the protocol the broker speaks.

        Raises:
            PublishError: the broker could not be reached in time.
        """
        wait = self.options.publish_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(self._connected(), wait)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            await self._drop()
            raise PublishError(
                f"cannot connect to the MQTT broker at {self.options.address}: {_describe(exc)}"
            ) from exc
        return self._protocol

    async def listen(
        self, topic_filter: str, handler: Callable[[IncomingMessage], None], *, qos: int = 1
    ) -> None:
        """Subscribe to `topic_filter` (now, and again after every reconnect) and call
        `handler` with each message received on it, on the event loop.

        Raises:
            PublishError: the broker could not be reached, or refused the subscription.
        """
        self._listeners[topic_filter] = (handler, qos)
        await self.connect()
        async with self._lock:
            client = self._client
            if client is None or topic_filter in self._subscribed:
                return  # dropped meanwhile: the next connect subscribes it
            client._client.on_message = self._on_message
            try:
                await self._subscribe(client, topic_filter, qos)
            except aiomqtt.MqttError as exc:
                raise PublishError(
                    f"cannot subscribe to {topic_filter!r} via {self.options.address}: "
                    f"{_describe(exc)}"
                ) from exc

    async def _subscribe(self, client: aiomqtt.Client, topic_filter: str, qos: int) -> None:
        granted = await client.subscribe(topic_filter, qos=qos)
        code = granted[0] if granted else None
        value = int(code.value) if isinstance(code, ReasonCode) else code
        if value is not None and value >= 128:
            raise PublishError(
                f"the broker at {self.options.address} refused the subscription to "
                f"{topic_filter!r} ({code})"
            )
        self._subscribed.add(topic_filter)

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        for topic_filter, (handler, _qos) in self._listeners.items():
            if paho.topic_matches_sub(topic_filter, message.topic):
                try:
                    handler(_incoming(message))
                except Exception:
                    logger.exception("handling a message on %s failed", message.topic)
                return

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish, connecting or reconnecting as needed, within `timeout` seconds.

        Raises:
            PublishError: the broker could not be reached or did not acknowledge in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.publish_timeout if timeout is None else timeout)
        failures = 0
        while True:
            try:
                client = await self._connected()
                await client.publish(
                    topic,
                    payload,
                    qos=qos,
                    retain=retain,
                    properties=_write_properties(properties, self._protocol),
                    timeout=max(0.1, deadline - loop.time()),
                )
                return
            except aiomqtt.MqttError as exc:
                await self._drop()
                failures += 1
                delay = _backoff(self.options, failures)
                if loop.time() + delay >= deadline:
                    raise PublishError(
                        f"could not publish to {topic} via {self.options.address}: {_describe(exc)}"
                    ) from exc
                logger.warning(
                    "publishing to %s via %s failed (%s); retrying in %.1fs",
                    topic,
                    self.options.address,
                    _describe(exc),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            while True:
                client = _new_client(
                    self.options, self._protocol, client_id=self.client_id, clean=True
                )
                try:
                    await client.__aenter__()
                    _quiet_disconnects(client)  # `__aenter__` made a new future
                except asyncio.CancelledError:
                    _abandon(client)
                    raise
                except aiomqtt.MqttError as exc:
                    refused = _reason(exc) == _UNSUPPORTED_PROTOCOL
                    if refused and self.options.protocol is None and self._protocol is Protocol.V5:
                        self._protocol = Protocol.V311
                        continue
                    raise
                self._subscribed = set()
                if self._listeners:
                    # Messages come to `listen()`'s handlers (aiomqtt's queue stays empty),
                    # and the subscriptions are in place before anything is published.
                    client._client.on_message = self._on_message
                    try:
                        for topic_filter, (_handler, qos) in list(self._listeners.items()):
                            await self._subscribe(client, topic_filter, qos)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await client.__aexit__(None, None, None)
                        raise
                self._client = client
                return client

    async def _drop(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def close(self) -> None:
        """Disconnect (a later publish connects again)."""
        await self._drop()
