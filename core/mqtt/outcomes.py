"""Outcomes over MQTT: what became of a job, published when it ends in a worker.

A job dispatched by a route handler for a message that asked for it carries a `reply` key in
its payload envelope (`{"topic", "correlation" (base64), "status_topic"}`, each key present only
when set; see `core.queue.payload.encode`). When such a job ends in a worker (succeeded, failed
for good, cancelled while running, or expired before it started), the worker hands it here, and
one JSON object is published

    {"id": ..., "job": "app.jobs:Resize", "queue": "default", "status": "succeeded",
     "attempts": 1, "result": {...}, "error": null}

to the reply `topic` (MQTT 5: with the stored correlation data and content type
`application/json`) and to the `status_topic` (both when both), QoS 1, not retained. `result`
is the return value (JSON) of a job that succeeded (`null` otherwise); `error` is one line for
the other endings (`null` on success). A retry publishes nothing.

Publishing never holds up the worker: `OutcomePublisher.ended` only queues the message (at most
`PENDING_MAX`; past that new outcomes are dropped, counted and logged), and one background
task sends them in order over the process's MQTT connection (`core.mqtt.publisher`). A failed
publish is logged, never retried and never fails the job. Under MQTT 3.1.1 only status topics
are published to (a reply topic needs MQTT 5's correlation data).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from core.mqtt.errors import PublishError
from core.mqtt.message import MessageProperties
from core.mqtt.options import Protocol
from core.mqtt.publisher import protocol, publish
from core.queue.drivers.base import ReservedJob
from core.status import Status

__all__ = ["EXPIRED_ERROR", "PENDING_MAX", "OutcomeMessage", "OutcomePublisher", "outcome_message"]

logger = logging.getLogger("topiq.mqtt.outcomes")

#: Outcomes waiting to be published at most; past that new ones are dropped (and logged).
PENDING_MAX = 10_000

#: How many publishes may wait for their acknowledgement at once (sent in order); aiomqtt
#: warns past 10 pending publishes on one connection.
IN_FLIGHT = 8

#: The `error` of a job that expired before it started.
EXPIRED_ERROR = "expired before it started (ttl)"

_JSON = "application/json"
_NO_RESULT: Any = object()


@dataclass(frozen=True, slots=True)
class OutcomeMessage:
    """Where one job's outcome goes, and the JSON to send."""

    body: bytes
    reply_topic: str = ""
    correlation: bytes | None = None
    status_topic: str = ""


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _reply_info(payload: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The envelope and its `reply` object, or None when the payload asks for no outcome."""
    if b'"reply"' not in payload:
        return None  # the common case, answered without parsing the payload
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(envelope, dict):
        return None
    reply = envelope.get("reply")
    if not isinstance(reply, dict):
        return None
    return envelope, reply


def _encode_result(result: Any) -> tuple[Any, str | None]:
    """The result as JSON (an `orjson.Fragment`), or None and why it cannot be sent."""
    try:
        return orjson.Fragment(orjson.dumps(result)), None
    except TypeError as exc:
        return None, f"result of type {type(result).__name__} is not JSON ({exc}); not sent"


def outcome_message(
    reserved: ReservedJob, result: Any = _NO_RESULT, *, expired: bool = False
) -> OutcomeMessage | None:
    """The message for a job that ended, or None when its dispatch asked for no outcome.

    `reserved.outcome` says how it ended (None: succeeded); `result` is the return value of a
    job that succeeded (used when the outcome does not carry it as JSON); `expired`: a job
    that `reserve` handed back as expired.
    """
    found = _reply_info(reserved.payload)
    if found is None:
        return None
    envelope, reply = found
    raw_topic, raw_status = reply.get("topic"), reply.get("status_topic")
    reply_topic = raw_topic if isinstance(raw_topic, str) else ""
    status_topic = raw_status if isinstance(raw_status, str) else ""
    correlation: bytes | None = None
    raw_correlation = reply.get("correlation")
    if isinstance(raw_correlation, str) and raw_correlation:
        try:
            correlation = base64.b64decode(raw_correlation, validate=True)
        except (binascii.Error, ValueError):
            logger.warning(
                "job %s: its reply correlation is not base64; the reply is sent without it",
                reserved.id,
            )
    if not reply_topic and not status_topic:
        return None
    outcome = reserved.outcome
    value: Any = None
    error: str | None = None
    if expired:
        status = Status.EXPIRED.value
        error = EXPIRED_ERROR
    elif outcome is None or outcome.status is Status.SUCCEEDED:
        status = Status.SUCCEEDED.value
        if outcome is not None and outcome.result is not None:
            value = orjson.Fragment(outcome.result)
        elif result is not _NO_RESULT and result is not None:
            value, error = _encode_result(result)
        if outcome is not None and outcome.error and error is None and value is None:
            error = _one_line(outcome.error)  # why the result was not kept
    else:
        status = str(outcome.status)
        error = _one_line(outcome.error) or status
    job = envelope.get("job")
    body = orjson.dumps(
        {
            "id": reserved.id,
            "job": job if isinstance(job, str) else "",
            "queue": reserved.queue,
            "status": status,
            "attempts": reserved.attempts,
            "result": value,
            "error": error,
        }
    )
    return OutcomeMessage(body, reply_topic, correlation, status_topic)


class OutcomePublisher:
    """Publishes the outcomes of a worker's jobs in the background, in the order they ended.

    `ended()` and `expired()` never block and never raise; `close()` sends what is pending
    within a time bound.

    Attributes:
        published: messages the broker acknowledged.
        failed: messages that could not be published (logged).
        dropped: outcomes not published because `PENDING_MAX` were already waiting.
    """

    def __init__(self, pending_max: int = PENDING_MAX, in_flight: int = IN_FLIGHT) -> None:
        self._queue: asyncio.Queue[OutcomeMessage] = asyncio.Queue(pending_max)
        self._slots = asyncio.Semaphore(in_flight)
        self._sending: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._protocol: Protocol | None = None
        self._dropping = False
        self._failing = False
        self.published = 0
        self.failed = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Outcomes queued or being published."""
        return self._queue.qsize() + len(self._sending)

    def ended(self, reserved: ReservedJob, result: Any = _NO_RESULT) -> None:
        """A job ended in the worker (its `outcome` set): publish it if it asked for that."""
        self._add(reserved, result, expired=False)

    def expired(self, reserved: ReservedJob) -> None:
        """A job `reserve` handed back as expired: publish it if it asked for that."""
        self._add(reserved, _NO_RESULT, expired=True)

    def _add(self, reserved: ReservedJob, result: Any, *, expired: bool) -> None:
        try:
            message = outcome_message(reserved, result, expired=expired)
        except Exception:
            logger.exception("job %s: could not build its outcome message", reserved.id)
            return
        if message is None:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                logger.warning(
                    "dropping job outcomes: %d are waiting to be published (the MQTT broker is "
                    "slow or unreachable); job %s's outcome is not published",
                    self._queue.qsize(),
                    reserved.id,
                )
            return
        if self._dropping and self._queue.qsize() < self._queue.maxsize // 2:
            self._dropping = False
            logger.warning("job outcomes are published again (%d dropped so far)", self.dropped)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="topiq-outcomes")

    async def _run(self) -> None:
        while True:
            message = await self._queue.get()
            if message.reply_topic and self._protocol is None:
                # Learnt here, before the publishes start, so that they start in order.
                with contextlib.suppress(Exception):
                    self._protocol = await protocol()
            await self._slots.acquire()
            # Tasks start in the order they are made, so the broker gets them in order.
            task = asyncio.create_task(self._send(message))
            self._sending.add(task)
            task.add_done_callback(self._sent)
            self._queue.task_done()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slots.release()

    async def _send(self, message: OutcomeMessage) -> None:
        targets: list[tuple[str, MessageProperties]] = []
        if message.reply_topic:
            if self._protocol is None:
                self._failed(message.reply_topic, PublishError("the broker cannot be reached"))
            elif self._protocol is Protocol.V5:
                properties = MessageProperties(
                    correlation_data=message.correlation, content_type=_JSON
                )
                targets.append((message.reply_topic, properties))
            else:
                logger.debug(
                    "not replying on %s: the broker speaks MQTT 3.1.1", message.reply_topic
                )
        if message.status_topic:
            targets.append((message.status_topic, MessageProperties(content_type=_JSON)))
        for topic, properties in targets:
            try:
                await publish(topic, message.body, qos=1, retain=False, properties=properties)
            except Exception as exc:
                self._failed(topic, exc)
            else:
                self.published += 1
                if self._failing:
                    self._failing = False
                    logger.warning("job outcomes are published again")

    def _failed(self, topic: str, exc: BaseException) -> None:
        self.failed += 1
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        logger.log(level, "could not publish a job outcome to %s: %s", topic, exc)

    async def close(self, timeout: float) -> None:
        """Publish what is pending, for at most `timeout` seconds; the rest is dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending and loop.time() < deadline:
            waiting: set[asyncio.Future[Any]] = set(self._sending)
            if not waiting:
                if self._task is None or self._task.done():
                    break
                await asyncio.sleep(0)  # the sender takes the next one from the queue
                continue
            await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()))
        left = self.pending
        if left:
            self.dropped += left
            logger.warning("%d job outcome(s) not published: the worker is stopping", left)
        tasks = [*self._sending, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
