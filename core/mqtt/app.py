"""`MqttApp`: runs a router's handlers for the messages its connection receives."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from core.mqtt.client import MqttClient
from core.mqtt.context import MessageContext
from core.mqtt.errors import InvalidPayloadError, MessageRejected
from core.mqtt.message import IncomingMessage, MessageProperties
from core.mqtt.options import ConnectionOptions
from core.mqtt.publisher import Publisher, use_connection
from core.mqtt.routing import Router
from core.mqtt.stats import MqttStats
from core.settings import Settings

__all__ = ["MqttApp"]

logger = logging.getLogger("topiq.mqtt")

HANDLER_GRACE = 10.0  # seconds running handlers get to finish once the app stops


class MqttApp:
    """Connects, subscribes to the router's routes and runs their handlers.

    Handlers run concurrently, up to `concurrency` at once, in tasks of their own so a slow
    one never holds up the receive loop. A handler that raises is logged with the topic and
    counted; a payload that fails validation is logged and counted as invalid; the app goes
    on with the next message either way.

    When stopped it disconnects first (the persistent session keeps queueing new messages on
    the broker), then finishes the messages already received.

    Args:
        router: The routes.
        settings: The settings (`MQTT_*` describe the connection).
        options: Connection options, instead of those the settings describe.
        stats: Counters to update (a fresh `MqttStats` by default).
        concurrency: Handlers run at once (default `MQTT_HANDLER_CONCURRENCY`).
        grace: Seconds running handlers get to finish after `stop()`.
    """

    def __init__(
        self,
        router: Router,
        settings: Settings,
        *,
        options: ConnectionOptions | None = None,
        stats: MqttStats | None = None,
        concurrency: int | None = None,
        grace: float = HANDLER_GRACE,
    ) -> None:
        self.router = router
        self.options = options or ConnectionOptions.from_settings(settings)
        self.stats = stats if stats is not None else MqttStats()
        self.concurrency = concurrency or settings.mqtt_handler_concurrency
        self.grace = grace
        router.freeze()
        self.client = MqttClient(self.options, router.subscriptions(), stats=self.stats)
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait_ready(self) -> None:
        """Return once connected and subscribed."""
        await self.client.wait_connected()

    def stop(self) -> None:
        """Ask `run()` to return: disconnect, finish the received messages, return."""
        self._stopping.set()

    async def run(self) -> None:
        """Receive and handle messages until `stop()`."""
        slots = asyncio.Semaphore(self.concurrency)
        publisher = Publisher(self.client)
        self.client.start()
        closer = asyncio.create_task(self._close_on_stop(), name="topiq-mqtt-stop")
        try:
            with use_connection(self.client):
                async for message in self.client.messages():
                    self.stats.received += 1
                    # Waiting for a slot pauses only this loop: the connection keeps reading
                    # (and answering pings) in the background, queueing what arrives.
                    await slots.acquire()
                    task = asyncio.create_task(self._handle(message, publisher, slots))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            closer.cancel()
            await self.client.close()
            await self._drain()
            s = self.stats
            logger.info(
                "MQTT app stopped: %d received, %d handled, %d failed, %d invalid, "
                "%d rejected, %d unmatched, %d jobs dispatched",
                s.received,
                s.handled,
                s.failed,
                s.invalid,
                s.rejected,
                s.unmatched,
                s.jobs_dispatched,
            )

    async def _close_on_stop(self) -> None:
        await self._stopping.wait()
        await self.client.close()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning(
                "cancelled %d handler(s) still running after %gs", len(pending), self.grace
            )
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(
        self, message: IncomingMessage, publisher: Publisher, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self._dispatch_to_route(message, publisher)
        finally:
            slots.release()

    async def _dispatch_to_route(self, message: IncomingMessage, publisher: Publisher) -> None:
        stats = self.stats
        found = self.router.resolve(message.topic, message.properties.subscription_ids)
        if found is None:
            stats.unmatched += 1
            logger.debug("no route for %s; message ignored", message.topic)
            return
        route, params = found
        context = MessageContext(message, params, route, publisher)
        started = time.perf_counter()
        try:
            result = await route(context)
        except InvalidPayloadError as exc:
            stats.invalid += 1
            logger.warning("invalid message on %s (route %s): %s", message.topic, route.name, exc)
            return
        except MessageRejected as exc:
            stats.rejected += 1
            logger.info("message on %s rejected (route %s): %s", message.topic, route.name, exc)
            return
        except Exception:
            stats.failed += 1
            logger.exception(
                "handler %s failed on %s (%d bytes, after %.1fms)",
                route.name,
                message.topic,
                len(message.payload),
                (time.perf_counter() - started) * 1000,
            )
            return
        stats.handled += 1
        if result is not None:
            await self._reply(context, result)

    async def _reply(self, context: MessageContext, result: Any) -> None:
        """MQTT 5 request/response: a handler's return value goes to the response topic."""
        response_topic = context.properties.response_topic
        if not response_topic:
            return
        try:
            await context.client.publish(
                response_topic,
                result,
                qos=context.qos,
                properties=MessageProperties(correlation_data=context.properties.correlation_data),
            )
        except Exception as exc:
            logger.error(
                "could not send the reply of %s to %s: %s", context.route.name, response_topic, exc
            )
