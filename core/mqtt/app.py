"""`MqttApp`: runs a router's handlers for the messages its connection receives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from core import tracing
from core.errors import ConnectionLostError
from core.mqtt import commit
from core.mqtt.client import Delivery, MqttClient
from core.mqtt.context import MessageContext
from core.mqtt.errors import InvalidPayloadError, MessageRejected
from core.mqtt.message import IncomingMessage, MessageProperties
from core.mqtt.options import ConnectionOptions
from core.mqtt.publisher import Publisher, use_connection
from core.mqtt.routing import Route, Router, topic_matches
from core.mqtt.spool import Spool
from core.mqtt.stats import MqttStats
from core.origin import Origin, origin
from core.queue.drivers.base import OutgoingJob, Pushed
from core.queue.payload import topic_problem
from core.queue.queue_manager import QueueManager, get_default_manager
from core.settings import Settings

__all__ = ["MqttApp"]

logger = logging.getLogger("topiq.mqtt")

RETRY_BACKOFF = 0.2  # seconds before a failed handler's first retry; doubles after each
QUEUE_DOWN_BACKOFF_MAX = 5.0  # at most this long between runs while the queue is unreachable


class MqttApp:
    """Connects, subscribes to the router's routes and runs their handlers.

    Handlers run concurrently, up to `concurrency` at once, in tasks of their own so a slow
    one never holds up the receive loop. A message is acknowledged to the broker once its
    handler finished (so what it dispatched is stored): a crash before that and the broker
    sends it again. A handler that raises is run again up to `retries` times (with a short
    backoff), then the message is acknowledged, logged and counted as failed; a payload that
    fails validation, or a message middleware rejects, is acknowledged at once and logged.

    When stopped it takes no more messages (the broker keeps them for the persistent
    session), lets the running handlers finish within `grace` seconds, acknowledges what
    they finished and disconnects. Messages received but not started are not acknowledged:
    the broker sends them again when the app comes back.

    Args:
        router: The routes.
        settings: The settings (`MQTT_*` describe the connection).
        options: Connection options, instead of those the settings describe.
        stats: Counters to update (a fresh `MqttStats` by default).
        concurrency: Handlers run at once (default `MQTT_HANDLER_CONCURRENCY`).
        grace: Seconds running handlers get to finish after `stop()` (default `MQTT_GRACE`).
        retries: Runs after a handler raised (default `MQTT_HANDLER_RETRIES`).
        manager: The queue manager the handlers dispatch through, on which `run()` installs
            the offline spool (default: `stats.manager`, else the default manager).
        group_commit: Whether the pushes the handlers make to the manager's default
            connection, while one of them is on its way, go together in the next one
            (`core/mqtt/commit.py`); each message is still acknowledged only once its jobs
            are stored (default `MQTT_GROUP_COMMIT`).
    """

    def __init__(
        self,
        router: Router,
        settings: Settings,
        *,
        options: ConnectionOptions | None = None,
        stats: MqttStats | None = None,
        concurrency: int | None = None,
        grace: float | None = None,
        retries: int | None = None,
        manager: QueueManager | None = None,
        group_commit: bool | None = None,
    ) -> None:
        self.router = router
        self.settings = settings
        self.manager = manager
        self.group_commit = settings.mqtt_group_commit if group_commit is None else group_commit
        self._spool_manager: QueueManager | None = None  # where `run()` installed its spool
        self.options = options or ConnectionOptions.from_settings(settings)
        self.stats = stats if stats is not None else MqttStats()
        self.concurrency = concurrency or settings.mqtt_handler_concurrency
        self.grace = settings.mqtt_grace if grace is None else grace
        self.retries = settings.mqtt_handler_retries if retries is None else retries
        self._response_topics = settings.mqtt_response_topics  # where outcomes may be sent
        self._refused_logged = False
        self._reply_refused_logged = False
        #: Per group (or coalescing key): the future the next message of that group waits for.
        self._turns: dict[str, asyncio.Future[bool]] = {}
        router.freeze()
        self.client = MqttClient(self.options, router.subscriptions(), stats=self.stats)
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def wait_ready(self) -> None:
        """Return once connected and subscribed."""
        await self.client.wait_connected()

    def stop(self) -> None:
        """Ask `run()` to return: stop taking messages, finish those in hand, disconnect."""
        self._stopping.set()

    async def run(self) -> None:
        """Receive and handle messages until `stop()`."""
        # Messages in hand (waiting for their group's turn or a slot, or running): bounded so
        # that QoS 0 floods, which no window limits, wait in the client. Handler slots are
        # taken only once a message's group lets it run (`_dispatch_to_route`): a device's
        # messages waiting for each other never hold the slots other devices need.
        intake = asyncio.Semaphore(self.concurrency + self.options.receive_maximum)
        slots = asyncio.Semaphore(self.concurrency)
        publisher = Publisher(self.client)
        spool, replay = await self._start_spool()
        grouped = self._start_group_commit()
        self.client.start()
        stopper = asyncio.create_task(self._stop_reading_on_stop(), name="topiq-mqtt-stop")
        try:
            with use_connection(self.client):
                async for delivery in self.client.deliveries():
                    self.stats.received += 1
                    # The window (MQTT_RECEIVE_MAXIMUM) bounds what waits here for a place.
                    if not await self._slot(intake):
                        break  # stopping: this one stays unacknowledged, the broker resends it
                    task = asyncio.create_task(self._handle(delivery, publisher, intake, slots))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                await self._drain()  # their acknowledgements go out before the disconnect
        finally:
            stopper.cancel()
            await self._drain()
            await self._stop_spool(spool, replay)
            self._stop_group_commit(grouped)
            await self.client.close()
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
            if spool is not None and (s.spooled or s.spool_depth or s.spool_full):
                logger.info(
                    "offline spool: %d jobs spooled, %d replayed, %d dropped at replay, %d "
                    "pushes refused as full, %d jobs left in %s for the next start",
                    s.spooled,
                    s.replayed,
                    s.spool_dropped,
                    s.spool_full,
                    s.spool_depth,
                    spool.path,
                )

    async def _start_spool(self) -> tuple[Spool | None, asyncio.Task[None] | None]:
        """Install the offline spool on the handlers' manager and start replaying it (entries
        an earlier run left first); none when `MQTT_SPOOL_MAX` is 0."""
        if self.settings.mqtt_spool_max <= 0:
            return None, None
        manager = self.manager or self.stats.manager or get_default_manager()
        if manager.spool is not None:  # another app in this process installed one
            return None, None
        spool = Spool(self.settings, self.stats)
        await spool.open()
        manager.spool = spool
        replay = asyncio.create_task(spool.replay(manager), name="topiq-spool-replay")
        self._spool_manager = manager
        return spool, replay

    def _start_group_commit(self) -> tuple[QueueManager, str, commit.GroupCommit] | None:
        """Batch the pushes the handlers make to the default connection (`core/mqtt/commit.py`):
        every message costs a durable write before its acknowledgement, and those made while
        one is on its way go together in the next. Nothing is opened here: the connection
        still opens on the first dispatch."""
        if not self.group_commit:
            return None
        manager = self.manager or self.stats.manager or get_default_manager()
        try:
            name = manager.connection_name()
        except Exception:  # a connection misconfigured: the first dispatch says how
            logger.debug("no group commit: the default connection is unknown", exc_info=True)
            return None
        if name == "sync" or name in manager.batchers:  # sync runs jobs inline: nothing to batch
            return None

        async def push(jobs: Sequence[OutgoingJob]) -> list[Pushed]:
            return await (await manager.connection(name)).push(jobs)

        batcher = manager.batchers[name] = commit.GroupCommit(push)
        return manager, name, batcher

    def _stop_group_commit(
        self, grouped: tuple[QueueManager, str, commit.GroupCommit] | None
    ) -> None:
        if grouped is not None:
            manager, name, batcher = grouped
            if manager.batchers.get(name) is batcher:
                del manager.batchers[name]
            if batcher.pushes:
                logger.debug("group commit: %d jobs in %d pushes", batcher.jobs, batcher.pushes)

    async def _stop_spool(self, spool: Spool | None, replay: asyncio.Task[None] | None) -> None:
        """Stop replaying and close the spool file: what it holds waits for the next start."""
        if spool is None or replay is None:
            return
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        if not replay.cancelled() and replay.exception() is not None:
            logger.error(
                "the offline spool's replay stopped on an error", exc_info=replay.exception()
            )
        if self._spool_manager is not None and self._spool_manager.spool is spool:
            self._spool_manager.spool = None
        await spool.close()

    async def _stop_reading_on_stop(self) -> None:
        await self._stopping.wait()
        self.client.stop_reading()

    async def _slot(self, slots: asyncio.Semaphore) -> bool:
        """Take a place (`slots`); `False` if the app was stopped while waiting for one."""
        if not slots.locked():
            await slots.acquire()
            return True
        acquire = asyncio.ensure_future(slots.acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not acquire.done():
                acquire.cancel()
        if acquire.done() and not acquire.cancelled():
            if self._stopping.is_set():
                slots.release()
                return False
            return True
        return False

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning(
                "cancelled %d handler(s) still running after %gs; their messages are not "
                "acknowledged, so the broker sends them again",
                len(pending),
                self.grace,
            )
            await asyncio.gather(*pending, return_exceptions=True)

    async def _handle(
        self,
        delivery: Delivery,
        publisher: Publisher,
        intake: asyncio.Semaphore,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            finished = await self._dispatch_to_route(delivery.message, publisher, slots)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the app cancelled it (stopping): not finished, not acknowledged
            # The handler raised CancelledError of its own (e.g. it awaited a task cancelled
            # elsewhere): a failure like any other, or its message would hold the window.
            self.stats.failed += 1
            logger.exception(
                "handler on %s raised CancelledError; the message is acknowledged and dropped",
                delivery.message.topic,
            )
            finished = True
        except Exception:  # a bug of ours, not the handler's: the message must not block
            logger.exception("handling the message on %s failed", delivery.message.topic)
            finished = True
        finally:
            intake.release()
        if finished:
            delivery.ack()

    async def _dispatch_to_route(
        self, message: IncomingMessage, publisher: Publisher, slots: asyncio.Semaphore
    ) -> bool:
        """Run the message's route in a handler slot, taken once its group's previous message
        is finished; whether it is finished (to acknowledge) or left to the broker (the app
        stopped while it waited, or while the queue could not be reached)."""
        stats = self.stats
        found = self.router.resolve(message.topic, message.properties.subscription_ids)
        if found is None:
            stats.unmatched += 1
            logger.debug("no route for %s; message ignored", message.topic)
            return True
        route, params = found
        # What the jobs the handler dispatches get (QueueManager reads it): the route's
        # templates, and the message's Response Topic if the settings allow it.
        group = coalesce = status_topic = response_topic = ""
        correlation = None
        if route.has_job_options:
            group, coalesce, status_topic = route.job_options(params)
        asked = message.properties.response_topic
        if asked:
            if not topic_problem(asked) and any(
                topic_matches(allowed, asked) for allowed in self._response_topics
            ):
                response_topic, correlation = asked, message.properties.correlation_data
            elif not self._refused_logged:
                self._refused_logged = True
                logger.debug(
                    "message on %s asks for job outcomes on %r, which no MQTT_RESPONSE_TOPICS "
                    "filter allows; its jobs publish none there (logged once)",
                    message.topic,
                    asked,
                )
        job_origin = Origin(
            message.topic, group, coalesce, response_topic, correlation, status_topic
        )
        # One message at a time per group (or coalescing key), in arrival order, so that the
        # jobs are dispatched in the order the device sent them: a message waits until the
        # previous one of its group is finished. Once the app is stopping, the ones waiting
        # are left to the broker (unacknowledged: sent again, in order, to the next app).
        turn_key = group or (f"\0{coalesce}" if coalesce else "")
        previous: asyncio.Future[bool] | None = None
        mine: asyncio.Future[bool] | None = None
        if turn_key:
            previous = self._turns.get(turn_key)
            mine = self._turns[turn_key] = asyncio.get_running_loop().create_future()
        try:
            if previous is not None and not await asyncio.shield(previous):
                return False
            if not await self._slot(slots):
                return False  # stopping: the broker sends it again, in order, to the next app
            try:
                return await tracing.receiving(
                    self._run_route(message, route, params, job_origin, publisher),
                    route.filter,
                    message.topic,
                    len(message.payload),
                    message.qos,
                    message.properties.user_properties,
                )
            finally:
                slots.release()
        finally:
            if mine is not None:
                if not mine.done():
                    mine.set_result(not self._stopping.is_set())
                if self._turns.get(turn_key) is mine:
                    del self._turns[turn_key]

    async def _run_route(
        self,
        message: IncomingMessage,
        route: Route,
        params: dict[str, str],
        job_origin: Origin,
        publisher: Publisher,
    ) -> bool:
        """Run the handler (again on a failure, up to `retries`; until the queue answers if it
        cannot be reached); whether the message is finished."""
        stats = self.stats
        attempt = 0
        outage = 0  # runs in a row that found the queue unreachable
        while True:
            context = MessageContext(message, params, route, publisher)
            started = time.perf_counter()
            try:
                with origin(job_origin):
                    result = await route(context)
            except InvalidPayloadError as exc:
                stats.invalid += 1
                logger.warning(
                    "invalid message on %s (route %s): %s", message.topic, route.name, exc
                )
                return True
            except MessageRejected as exc:
                stats.rejected += 1
                logger.info("message on %s rejected (route %s): %s", message.topic, route.name, exc)
                return True
            except Exception as exc:
                if _queue_unreachable(exc):
                    # Not the message's fault: hold it unacknowledged (the window fills and
                    # the broker keeps the rest) and run it again once the queue answers.
                    if self._stopping.is_set():
                        return False  # the broker sends it again to the next app
                    outage += 1
                    stats.retried += 1
                    delay = min(QUEUE_DOWN_BACKOFF_MAX, RETRY_BACKOFF * 2 ** min(outage, 8))
                    log = logger.warning if outage == 1 else logger.debug
                    log(
                        "handler %s on %s could not reach the queue (%s); the message is held "
                        "unacknowledged and runs again in %.1fs",
                        route.name,
                        message.topic,
                        exc,
                        delay,
                    )
                    await self._wait_or_stop(delay)
                    continue
                if attempt < self.retries:
                    delay = RETRY_BACKOFF * 2**attempt
                    stats.retried += 1
                    logger.warning(
                        "handler %s failed on %s (run %d of %d): %s; running it again in %.1fs",
                        route.name,
                        message.topic,
                        attempt + 1,
                        self.retries + 1,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    attempt += 1
                    continue
                stats.failed += 1
                tracing.handler_failed(exc)
                self._log_failure(route, message, attempt + 1, started)
                return True
            stats.handled += 1
            if outage:
                logger.info("handler %s on %s reached the queue again", route.name, message.topic)
            if result is not None:
                await self._reply(context, result)
            return True

    async def _wait_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _log_failure(
        self, route: Route, message: IncomingMessage, runs: int, started: float
    ) -> None:
        logger.exception(
            "handler %s failed on %s (%d bytes, %d run(s), the last after %.1fms); the message "
            "is acknowledged and dropped",
            route.name,
            message.topic,
            len(message.payload),
            runs,
            (time.perf_counter() - started) * 1000,
        )

    async def _reply(self, context: MessageContext, result: Any) -> None:
        """MQTT 5 request/response: a handler's return value goes to the response topic, if it
        is a topic to publish to (no wildcards, not `$...`) and, when `MQTT_RESPONSE_TOPICS` is
        set, one of its filters matches it (as for job outcomes: a device must not choose where
        the app publishes)."""
        response_topic = context.properties.response_topic
        if not response_topic:
            return
        problem = topic_problem(response_topic)
        if problem or (
            self._response_topics
            and not any(topic_matches(allowed, response_topic) for allowed in self._response_topics)
        ):
            if not self._reply_refused_logged:
                self._reply_refused_logged = True
                logger.debug(
                    "the reply of %s is not sent to the Response Topic %r: %s (logged once)",
                    context.route.name,
                    response_topic,
                    problem or "no MQTT_RESPONSE_TOPICS filter allows it",
                )
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


def _queue_unreachable(exc: BaseException) -> bool:
    """Whether the error (or one it was raised from) says the queue backend is unreachable."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ConnectionLostError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
