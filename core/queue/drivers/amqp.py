"""RabbitMQ as a queue backend (`QUEUE_CONNECTION=amqp`, docs/rabbitmq.md), through aio-pika.

RabbitMQ holds the jobs; a companion store (`AMQP_STORE`: the database or Redis driver) holds
what a message cannot tell (amqp_records.py): status records and results, ids and unique keys
taken, the failed store, workers, pauses, history.

* Push: a message per job on the durable quorum queue `<P>.q.<queue>` (persistent, mandatory),
  published with confirms: `push` returns once the broker has every message. Body = payload;
  `message_id` = job id; headers `x-topiq-tries` (tries used before this message), `x-topiq-due`
  (epoch ms when ready) and `x-topiq-queue`.
* Delays without plugins (amqp_connect.py): a message due later goes to the ladder bucket
  `floor(log2(remaining ms))`; when it expires there it is dead-lettered into the router queue,
  which every reserving driver consumes: due now, to its work queue; else to its next bucket
  (publish first, then ack: a crash repeats a hop, never loses one). A message is late by a
  few milliseconds per hop (one hop per set bit of its delay, 32 at most).
* Lease = the delivery left unacknowledged. The consumer's prefetch is the largest `limit` a
  `reserve` asked for (per queue: quorum queues have no channel-wide prefetch); deliveries wait
  in a local inbox that `reserve` takes from and `wait` awaits. A lease that runs out here goes
  back to its queue as a lost lease (a copy whose try counted, then the ack); a worker that dies
  drops its connection and the broker redelivers.
* Tries: `x-topiq-tries` + the broker's `x-delivery-count` + 1, so a redelivery counts a try.
  A retry or a refund publishes a copy with the tries it used, then acks the delivery.
* The broker's `consumer_timeout` closes a channel whose delivery is held too long: a lease
  (or an `extend`) that would end past `AMQP_CONSUMER_TIMEOUT - 60 s` after the delivery is
  parked instead: a copy goes to the ladder, due at the lease's end, carrying a token that
  the store keeps as `<P>:lease:<id>`, and the delivery is acked. The job's end writes
  "done"; a copy coming back whose token still matches (the worker died) is the next try, one
  whose token does not is dropped.
* Tries are also counted by the record (the tries that started): a delivery only prefetched
  when its connection went costs none, whatever the broker counted.
* Each push has a generation (`x-topiq-gen`, kept in the record): a message whose record
  ended in the same generation (cancelled while waiting, expired, or a late redelivery) is
  dropped when delivered; a newer push of the same id is not, and a message of an earlier push
  than its live record's (the id cancelled, then dispatched again) is dropped as stale.
* `clear` purges the work queue and records the time: a delayed job of the queue put in line
  before it (`x-topiq-sent`) is dropped when it comes due, and a waiting job's record sent
  before it ends when looked at (status, id and key checks), its id and unique key let go.
* `push` checks each queue's broker name first (255 bytes, the client's characters); when a
  publish fails, the records, ids and keys of the jobs the broker refused (or that were never
  sent) are taken back. A job whose publish or confirm a lost connection cut off keeps them,
  its record marked unconfirmed: it may be queued, and a repeat with its id is let in.
* A job's payload is kept in the store beside its record (`<P>:payload:<id>`, written in the
  same round trip), so `job_payload` can show a waiting job; `save_payload` writes a
  checkpoint over it and marks the record, and a later try reads it instead of the message
  body. An end takes the payload out of the store in the same write as the record.
* Prefetched deliveries never handed out go back as copies (tries unchanged) when their queue
  is no longer asked for, when a reserve made for no worker returns with no wait under way
  (its consumers stop: only a worker prefetches), on close, and when unattended past half the
  consumer_timeout.
* A router message that cannot be routed (no Topiq queue or id, or refused for its own sake
  `UNROUTABLE_AFTER` times) is set aside in `<P>.unroutable` with the reason
  (`x-topiq-unroutable`).
* `depends_on` and workflow records (chain, batch): amqp_deps.py keeps deferred jobs in the
  store and publishes each when its dependencies allow.
* Ends are counted in the store's history under a shadow queue, sent at most every 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiormq.exceptions
from aio_pika import DeliveryMode, Message
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from core.errors import ConnectionLostError, DriverError
from core.queue.drivers.amqp_connect import (
    Names,
    bucket_for,
    connect,
    ladder_arguments,
    translated,
    work_arguments,
)
from core.queue.drivers.amqp_deps import Dependencies
from core.queue.drivers.amqp_records import (
    END_FIELDS,
    LIVE_TTL,
    Record,
    decode_payload,
    encode_payload,
    ends_queue,
    history_queue,
    marker_name,
    merge_minutes,
)
from core.queue.drivers.base import (
    HISTORY_FIELDS,
    BrowseState,
    Driver,
    FailedJob,
    FailedStore,
    GroupInfo,
    MinuteCounts,
    Outcome,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
)
from core.settings import Settings
from core.status import ENDED, WAITING, JobStatus, Status

__all__ = ["AmqpDriver"]

logger = logging.getLogger("topiq.amqp")

TRIES = "x-topiq-tries"
DUE = "x-topiq-due"
QUEUE = "x-topiq-queue"
LEASE = "x-topiq-lease"
#: One push of a job (a random token): its record names it, so that the end of an earlier
#: push of the same id (a late ack, a cancel) never drops a newer push's message.
GEN = "x-topiq-gen"
#: When the job was last put in line (epoch ms): a `clear` drops what was waiting before it,
#: the delayed jobs in the ladder included, when they are delivered.
SENT = "x-topiq-sent"
#: Headers a copy of a message carries on (besides its tries, due time and queue).
CARRIED = (LEASE, GEN, SENT)
#: Why a router message was set aside in `<prefix>.unroutable` (`_set_aside`).
UNROUTABLE = "x-topiq-unroutable"
#: Deliveries of a router message that failed for its own sake before it is set aside.
UNROUTABLE_AFTER = 5
#: How many router messages one driver handles at once.
ROUTER_PREFETCH = 256
#: Milliseconds the router holds a message due this soon (unacknowledged: a crash loses
#: nothing) instead of sending it round the ladder again: a hop costs tens of milliseconds.
HOLD_MS = 250
#: How long `reserve` waits for a delivery the broker says is ready (a consumer just started,
#: or a message published a moment ago): it never blocks for work that is not there.
DELIVERY_GRACE = 0.5
#: Seconds a parked lease's token is kept past the lease.
PARK_KEEP = 86400.0
#: Seconds ends counted here may wait before they are added to the store's history.
COUNT_EVERY = 2.0
#: Pauses between the sends of a message the broker nacked (a queue's leader starting).
NACK_PAUSES: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)
#: Seconds a cancellation asked of a running job is kept in its record.
DAY = 86400.0


@dataclass(slots=True)
class _Held:
    """A job handed out by `reserve` and not yet acknowledged or released here."""

    job: ReservedJob
    record: Record
    message: AbstractIncomingMessage | None  # None once parked (the delivery was acked)
    delivered: float  # monotonic
    lease_until: float  # monotonic
    gen: str = ""  # the push the delivery came from (`GEN`)
    token: str = ""  # the parked copy's token
    parking: bool = False  # a `_park` is under way
    requeued: bool = False  # `release` has sent its copy
    parked_until: float = 0.0  # monotonic due time of the parked copy


@dataclass(slots=True)
class _Acks:
    """The jobs a `reserve` acknowledges, and whether their outcomes are stored yet."""

    items: list[tuple[_Held, float]]
    stored: bool = False

    @property
    def waiting(self) -> bool:
        return bool(self.items) and not self.stored


def _int(text: str | None) -> int:
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


def _now_ms() -> int:
    return int(time.time() * 1000)


def _header_int(headers: Mapping[str, Any], name: str) -> int:
    value = headers.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            return int(value) if value is not None else 0
        except (TypeError, ValueError):
            return 0
    return value


# More tries than any real job makes: a header past it was not written by Topiq.
MAX_TRIES_HEADER = 10**6


def _count_header(headers: Mapping[str, Any], name: str) -> int:
    """A count another publisher may have set: negative or absurd values would let a job run
    past its max_tries (or forever), so they count as 0."""
    value = _header_int(headers, name)
    if 0 <= value <= MAX_TRIES_HEADER:
        return value
    logger.warning("ignoring the header %s=%r of a delivery (not a count of tries)", name, value)
    return 0


class AmqpDriver(Driver):
    """RabbitMQ (quorum queues) with a companion store; see the module docstring."""

    kind = "amqp"
    blocks = True

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        from core.queue.drivers import create_driver

        self._names = Names(settings.amqp_prefix)
        self._prefix = settings.amqp_prefix
        #: The companion store: created here (no I/O) so that `failed_store` needs no open.
        self._store = create_driver(settings.amqp_store.value, settings)
        timeout = settings.amqp_consumer_timeout
        #: Seconds after a delivery past which a lease is parked rather than held.
        self._park_after = max(timeout - 60.0, timeout / 2)
        self._conn: AbstractRobustConnection | None = None
        self._pub: AbstractChannel | None = None  # publisher confirms
        self._sub: AbstractChannel | None = None  # work queue consumers
        self._routing: AbstractChannel | None = None  # the router's consumer
        self._open_lock = asyncio.Lock()
        self._declared: dict[str, AbstractQueue] = {}
        self._consumers: dict[str, tuple[AbstractQueue, str]] = {}
        self._prefetch = 0
        #: Deliveries not handed out yet, per queue: (monotonic arrival, message).
        self._inbox: dict[str, deque[tuple[float, AbstractIncomingMessage]]] = {}
        self._held: dict[tuple[str, str], _Held] = {}
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._acking: set[asyncio.Task[None]] = set()  # ack frames being written
        self._router_on = False
        self._known: set[str] = set()
        self._buckets: set[int] = set()  # ladder buckets declared on this connection
        self._router_backlog = 0  # messages waiting in the router when its consumer started
        #: Ends counted here and not sent to the store yet: (queue, minute, field) -> n.
        self._unsent: dict[tuple[str, int, str], int] = {}
        self._sent_at = time.monotonic()
        self._routed = 0  # router messages handled since
        #: Reserves and waits under way: while none is, nobody asks for deliveries.
        self._asking = 0
        #: depends_on and workflow records (amqp_deps.py).
        self._deps = Dependencies(self)

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._conn is not None:
                return
            await self._store.open()
            try:
                conn = await connect(self.settings)
            except BaseException:
                await self._store.close()
                raise
            try:
                with translated(self.settings, "opening channels"):
                    self._pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
            except BaseException:
                await conn.close()
                await self._store.close()
                raise
            self._conn = conn

    async def _bucket(self, bucket: int) -> str:
        """The name of ladder bucket `bucket`, declared (with the router it dead-letters
        into, first) once per connection: a connection that never delays declares none."""
        if bucket not in self._buckets:
            channel = self._channel(self._pub)
            names = self._names
            with translated(self.settings, "declaring the delay queues"):
                if not self._buckets:
                    await channel.declare_queue(
                        names.router, durable=True, arguments=work_arguments()
                    )
                await channel.declare_queue(
                    names.delay(bucket), durable=True, arguments=ladder_arguments(names, bucket)
                )
            self._buckets.add(bucket)
        return self._names.delay(bucket)

    async def close(self) -> None:
        async with self._open_lock:
            conn = self._conn
            if conn is None:
                return
            await asyncio.gather(*self._acking, return_exceptions=True)
            try:
                await self._return_inbox()
            except Exception as exc:  # the broker is gone: it redelivers them itself
                logger.debug("could not return prefetched jobs: %s", exc)
            try:
                await self._send_counts()
            except Exception as exc:
                logger.warning(
                    "could not add %d end counts to the history: %s", len(self._unsent), exc
                )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
            self._conn = self._pub = self._sub = self._routing = None
            self._declared.clear()
            self._consumers.clear()
            self._inbox.clear()
            self._held.clear()
            self._prefetch = 0
            self._router_on = False
            self._buckets.clear()
            with contextlib.suppress(Exception):
                await conn.close()
            await self._store.close()

    async def _return_inbox(self) -> None:
        """Every consumer stops; deliveries never handed out go back (`_give_back`), those
        still on their way when the broker took the cancels included."""
        await self._stop_consumers(list(self._consumers))
        await self._given_back()

    async def _given_back(self) -> None:
        """Let the deliveries read before the broker's cancel-ok reach their (stopped)
        deliverers, then wait for their copies to be out."""
        for _ in range(3):
            await asyncio.sleep(0)
        await asyncio.gather(*self._acking, return_exceptions=True)

    async def _stop_consumers(self, names: Sequence[str]) -> None:
        """Stop consuming `names` (queues no longer asked for: paused, or left, or nobody
        asking at all), giving back what their consumers prefetched. The inbox is taken away
        before the cancel: a delivery the broker sent before it took the cancel finds its
        inbox gone and goes back by itself (`_deliverer`), whenever it arrives."""
        for name in names:
            consumer = self._consumers.pop(name, None)
            inbox = self._inbox.pop(name, None)
            try:
                if consumer is not None:
                    with translated(self.settings, f"stopping the consumer of {name!r}"):
                        await consumer[0].cancel(consumer[1])
            finally:
                while inbox:
                    arrived = inbox.popleft()
                    try:
                        await self._give_back(arrived[1])
                    except BaseException:
                        # Kept for the sweep (or close) to give back; still unacknowledged.
                        inbox.appendleft(arrived)
                        self._inbox.setdefault(name, inbox)
                        raise

    async def _give_back(self, message: AbstractIncomingMessage) -> None:
        """A delivery never handed out goes back to its queue without costing a try: a copy
        with the tries it had (the broker's redelivery would count one), then the ack. At
        the back of the queue."""
        if not self._live(message):
            return  # its channel is gone: the broker has given it out again
        headers = self._clean(message.headers)
        headers[TRIES] = self._tries(message)
        await self._publish(message.routing_key or "", message.body, message, headers)
        await self._ack_message(message)

    def _channel(self, which: AbstractChannel | None) -> AbstractChannel:
        if which is None:
            raise DriverError(f"the {self.name} connection is not open (use `async with`)")
        return which

    # -- publishing --------------------------------------------------------------------

    async def _work_queue(self, queue: str) -> AbstractQueue:
        """The declared work queue of `queue` (declared once per connection)."""
        declared = self._declared.get(queue)
        if declared is None:
            channel = self._channel(self._pub)
            name = self._names.checked_work(queue)
            with translated(self.settings, f"declaring the queue of {queue!r}"):
                declared = await channel.declare_queue(
                    name, durable=True, arguments=work_arguments()
                )
            self._declared[queue] = declared
        return declared

    async def _publish(
        self,
        routing_key: str,
        body: bytes,
        like: AbstractIncomingMessage | None,
        headers: dict[str, Any],
        message_id: str | None = None,
    ) -> None:
        """Publish one persistent message and wait for the broker's confirm."""
        channel = self._channel(self._pub)
        message = Message(
            body,
            headers=headers,
            message_id=message_id if message_id is not None or like is None else like.message_id,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        # A quorum queue declared a moment ago by several processes at once may nack the first
        # messages while its leader starts: a nack means the broker did not take the message,
        # so it is sent again, a few times with a growing pause, before the dispatch fails.
        pauses: tuple[float, ...] = NACK_PAUSES
        # Whether a publish went out on an open channel and its confirm is still awaited: a
        # connection lost then may have cost only the confirm (`UnconfirmedPublish`).
        written = False
        try:
            with translated(self.settings, f"publishing to {routing_key}"):
                while True:
                    if channel.is_closed:  # down already: this message was never sent
                        raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
                    written = True
                    try:
                        await channel.default_exchange.publish(message, routing_key, mandatory=True)
                        return
                    except aiormq.exceptions.PublishError as exc:
                        raise DriverError(
                            f"RabbitMQ returned a job published to {routing_key}: no such queue"
                        ) from exc
                    except aiormq.exceptions.DeliveryError as exc:
                        written = False
                        if not pauses:
                            raise DriverError(
                                f"RabbitMQ refused a job published to {routing_key} "
                                f"{len(NACK_PAUSES) + 1} times (nack: is the queue at a limit, "
                                "or the disk alarm on?)"
                            ) from exc
                        await asyncio.sleep(pauses[0])
                        pauses = pauses[1:]
                        channel = self._channel(self._pub)
        except ConnectionLostError as exc:
            if written and not isinstance(exc, UnconfirmedPublish):
                raise UnconfirmedPublish(str(exc)) from exc.__cause__
            raise

    async def _send(
        self,
        queue: str,
        job_id: str,
        body: bytes,
        tries: int,
        due_ms: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Send a job to its work queue (due now) or into the ladder (due later)."""
        headers: dict[str, Any] = {TRIES: tries, DUE: due_ms, QUEUE: queue}
        if extra:
            headers.update(extra)
        headers.setdefault(SENT, _now_ms())
        await self._work_queue(queue)  # the router publishes to it: it must exist
        remaining = due_ms - _now_ms()
        if remaining > 0 or LEASE in headers:
            key = await self._bucket(bucket_for(max(remaining, 1)))
        else:
            key = self._names.work(queue)
        await self._publish(key, body, None, headers, message_id=job_id)

    @staticmethod
    def _clean(headers: Mapping[str, Any]) -> dict[str, Any]:
        """Only Topiq's headers: the broker's own (x-death, x-delivery-count) would grow or
        lie on a copy."""
        return {k: v for k, v in headers.items() if k.startswith("x-topiq-")}

    # -- store helpers -----------------------------------------------------------------

    def _m(self, *parts: str) -> str:
        return marker_name(self._prefix, *parts)

    async def _read(self, job_id: str) -> Record | None:
        return Record.loads(await self._store.get_marker(self._m("job", job_id)))

    async def _read_many(self, ids: Sequence[str]) -> list[Record | None]:
        """Records of `ids`, in one round trip of the store."""
        raw = await self._store.get_markers([self._m("job", job_id) for job_id in ids])
        return [Record.loads(value) for value in raw]

    def _item(self, record: Record, keep: float) -> tuple[str, str, float]:
        name = self._m("job", record.id)
        return (name, "", 0.001) if keep <= 0 else (name, record.dumps(), keep)

    async def _write(self, record: Record, keep: float) -> None:
        if record.status in ENDED:
            await self._write_many([(record, keep)])
        else:
            await self._store.set_marker(*self._item(record, keep))

    async def _write_many(self, writes: Sequence[tuple[Record, float]]) -> None:
        """Records with their keep times, in one round trip of the store. An ended job's
        payload goes in the same trip: it was kept for `job_payload` and checkpoints only,
        and would otherwise stay for the live keep time (days) after a short-lived job."""
        items: list[tuple[str, str, float]] = []
        for record, keep in writes:
            items.append(self._item(record, keep))
            if record.status in ENDED:
                items.append((self._m("payload", record.id), "", 0.001))
        if items:
            await self._store.set_markers(items)

    def _live_keep(self, record: Record) -> float:
        due = record.due_at or time.time()
        return max(due - time.time(), 0.0) + LIVE_TTL

    async def _free(self, name: str, holder: str) -> None:
        """Let go of a taken id or key if `holder` still holds it."""
        if await self._store.get_marker(name) == holder:
            await self._store.set_marker(name, "", 0.001)

    async def _swept(self, record: Record) -> bool:
        """Whether `record` is of a waiting job whose message was sent before its queue's last
        `clear` (purged, or dropped when it comes out of the ladder): then its record ends
        here, as `_start` ends it on delivery, and its id and key are let go. `clear` cannot
        name the jobs it purges (a purge only counts them), so they are found when looked at."""
        if record.status not in WAITING:
            return False
        cleared = _int(await self._store.get_marker(self._m("cleared", record.queue)))
        sent = _header_int(record.extra, "sent") or int((record.enqueued_at or 0) * 1000)
        if not cleared or sent >= cleared:
            return False
        record.status = Status.CANCELLED
        await self._write(record, 0.0)
        await self._release_claims(record)
        await self._deps.ended([(record, 0.0)])
        return True

    async def _release_claims(self, record: Record, *, started: bool = False) -> None:
        """An ended job frees its id; a job that started or ended frees a unique key held only
        while it waits (`unique_for` 0)."""
        if record.check_id and not started:
            await self._free(self._m("id", record.queue, record.id), record.id)
        if record.unique_key and record.unique_for <= 0:
            await self._free(self._m("key", record.queue, record.unique_key), record.id)

    async def _count(self, ends: Sequence[tuple[str, Status]], *, now: bool = False) -> None:
        """Count ends in the store's history (`recent`). Added up here and sent at most every
        `COUNT_EVERY` seconds (a round trip per acknowledgement would halve a worker's
        throughput): by the next ack, the heartbeat's sweep, a read of the counts, or close."""
        minute = int(time.time() // 60)
        for queue, status in ends:
            field = END_FIELDS.get(status)
            if field is not None:
                key = (queue, minute, field)
                self._unsent[key] = self._unsent.get(key, 0) + 1
        if now or time.monotonic() - self._sent_at >= COUNT_EVERY:
            await self._send_counts()

    async def _send_counts(self) -> None:
        self._sent_at = time.monotonic()
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, {}
        try:
            await self._store.add_history(
                [(ends_queue(self._prefix, q), m, {f: n}) for (q, m, f), n in unsent.items()]
            )
        except BaseException:
            for key, n in unsent.items():  # kept for the next try
                self._unsent[key] = self._unsent.get(key, 0) + n
            raise

    async def _remember(self, queues: set[str]) -> None:
        new = queues - self._known
        if not new:
            return
        name = self._m("queues")
        raw = await self._store.get_marker(name)
        try:
            import orjson

            stored = set(orjson.loads(raw)) if raw else set()
        except ValueError:
            stored = set()
        if not new <= stored:
            merged = sorted(stored | new)
            await self._store.set_marker(name, orjson.dumps(merged).decode(), 10 * 365 * DAY)
        self._known |= new

    # -- push --------------------------------------------------------------------------

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        if not jobs:
            return []
        self._channel(self._pub)
        for job in jobs:
            _refuse_unsupported(job)
            self._names.checked_work(job.queue)
        if self._deps.wanted(jobs):  # deferred jobs and workflow records: amqp_deps.py
            return await self._deps.push(jobs)
        out: list[Pushed] = []
        stored: list[tuple[OutgoingJob, Record]] = []
        wall = time.time()
        # Claims in order (two jobs of one call with one key: the first wins); records and
        # messages then together.
        # What this call stored so far: ("id"|"key", queue, id or key) -> the job holding it.
        earlier: dict[tuple[str, str, str], str] = {}
        for job in jobs:
            answer = await self._claim(job, earlier)
            if answer is not None:
                out.append(answer)
                continue
            if job.check_id:
                earlier[("id", job.queue, job.id)] = job.id
            if job.unique_key:
                earlier[("key", job.queue, job.unique_key)] = job.id
            delay = max(job.delay, 0.0)
            record = Record(
                job.id,
                job.queue,
                Status.SCHEDULED if delay > 0 else Status.QUEUED,
                job=job.job,
                max_tries=job.max_tries,
                enqueued_at=wall,
                due_at=wall + delay,
                priority=job.priority,
                ttl=job.ttl,
                failure_ttl=job.failure_ttl,
                unique_key=job.unique_key,
                unique_for=job.unique_for,
                check_id=job.check_id,
            )
            record.extra["gen"] = os.urandom(6).hex()
            record.extra["sent"] = int(wall * 1000)  # the SENT header (see `_swept`)
            stored.append((job, record))
            out.append(Pushed(job.id))
        if not stored:
            return out
        try:
            await self._remember({job.queue for job, _ in stored})
            # Each payload beside its record, in the same round trip: `job_payload` reads it,
            # and a checkpoint (`save_payload`) later writes over it.
            items: list[tuple[str, str, float]] = []
            for job, r in stored:
                keep = self._live_keep(r)
                items.append(self._item(r, keep))
                items.append((self._m("payload", r.id), encode_payload(job.payload), keep))
            await self._store.set_markers(items)
        except BaseException:
            await self._undo(stored)
            raise
        failed: list[BaseException] = []
        unsure: set[str] = set()  # the jobs whose publish was cut off: maybe queued

        async def send(job: OutgoingJob, record: Record) -> bool:
            if failed:
                return False  # one failed (the broker is down, most likely): the rest wait
            try:
                await self._send(
                    job.queue,
                    job.id,
                    job.payload,
                    0,
                    int((record.due_at or wall) * 1000),
                    {GEN: record.extra["gen"], SENT: record.extra["sent"]},
                )
            except BaseException as exc:
                failed.append(exc)
                if isinstance(exc, UnconfirmedPublish):
                    unsure.add(job.id)
                return False
            return True

        sent = await _bounded(send(job, record) for job, record in stored)
        if failed:
            # A job the broker refused (a nack, returned as unroutable), or never sent (the
            # connection was down already), is not dispatched: nothing of it may stay behind
            # (a QUEUED record of a job that is nowhere, an id or unique key taken for ever).
            # One whose publish went out and whose confirm a lost connection cut off may be
            # queued all the same (the broker took it, the confirm was lost): undone, its
            # message would run without its record, its id and key free for a second copy.
            # Its record stays, marked unconfirmed (`_unsure`).
            missed = [pair for pair, ok in zip(stored, sent, strict=True) if not ok]
            await self._undo([pair for pair in missed if pair[0].id not in unsure])
            await self._unsure([pair for pair in missed if pair[0].id in unsure])
            raise failed[0]
        return out

    async def _unsure(self, stored: Sequence[tuple[OutgoingJob, Record]]) -> None:
        """Jobs whose confirm never came (the connection dropped between their publish and
        its confirm): the push raises, and the caller may dispatch them again (at least
        once). Their records, ids and unique keys stay, so that a message the broker did
        take runs as pushed (its tries, ttl and keys); each record is marked `unconfirmed`,
        so that a repeat of the dispatch is let in rather than answered as a duplicate
        (`_check_id`, `_check_key`: a message of the first push that did arrive is then
        stale, and dropped). The once-key is let go: the caller was told the dispatch
        failed. Best effort: the push's own error is the one raised."""
        if not stored:
            return
        try:
            records = await self._read_many([record.id for _, record in stored])
            writes: list[tuple[Record, float]] = []
            for (_, pushed), now in zip(stored, records, strict=True):
                # Only while nobody has taken it yet: a worker may have started it already.
                if (
                    now is not None
                    and now.extra.get("gen") == pushed.extra["gen"]
                    and now.status in (Status.QUEUED, Status.SCHEDULED)
                    and now.attempts == 0
                ):
                    now.extra["unconfirmed"] = 1
                    writes.append((now, self._live_keep(now)))
            await self._write_many(writes)
            for job, _ in stored:
                if job.once_key:
                    await self._free(self._m("once", job.queue, job.once_key), job.id)
        except Exception as exc:
            logger.warning("could not mark the records of an unconfirmed push: %s", exc)

    async def _undo(self, stored: Sequence[tuple[OutgoingJob, Record]]) -> None:
        """Take back what `push` wrote for jobs it could not dispatch: their records, ids,
        unique keys and once-keys. Best effort: the push's own error is the one raised."""
        try:
            await self._store.set_markers(
                [self._item(record, 0.0) for _, record in stored]
                + [(self._m("payload", record.id), "", 0.001) for _, record in stored]
            )
            for job, _ in stored:
                if job.check_id:
                    await self._free(self._m("id", job.queue, job.id), job.id)
                if job.unique_key:
                    await self._free(self._m("key", job.queue, job.unique_key), job.id)
                if job.once_key:
                    await self._free(self._m("once", job.queue, job.once_key), job.id)
        except Exception as exc:
            logger.warning("could not take back the records of an undispatched push: %s", exc)

    async def _claim(
        self, job: OutgoingJob, earlier: dict[tuple[str, str, str], str]
    ) -> Pushed | None:
        """The once-key, id and unique-key rules: the answer when a holder takes the push,
        `None` when the job is to be stored (its id and key then taken). `earlier`: the ids
        and keys taken by the jobs stored before it in the same call (not written yet)."""
        store = self._store
        once = self._m("once", job.queue, job.once_key) if job.once_key else ""
        if once and not await store.claim_marker(once, job.id, max(job.once_for, 0.001)):
            holder = await store.get_marker(once)
            return Pushed(holder or job.id, "duplicate")
        answer: Pushed | None = None
        if job.check_id and ("id", job.queue, job.id) in earlier:
            answer = self._duplicate(job, job.id)
        elif job.unique_key and (held := earlier.get(("key", job.queue, job.unique_key))):
            answer = self._duplicate(job, held)
        else:
            if job.check_id:
                answer = await self._check_id(job)
            if answer is None and job.unique_key:
                answer = await self._check_key(job)
        if answer is not None and once:
            await store.set_marker(once, answer.id, max(job.once_for, 0.001))
        return answer

    def _duplicate(self, job: OutgoingJob, holder: str) -> Pushed:
        # A message cannot be changed in place: "replace" keeps the holder as it is.
        return Pushed(holder, "duplicate" if job.on_duplicate == "reject" else "kept")

    async def _check_id(self, job: OutgoingJob) -> Pushed | None:
        name = self._m("id", job.queue, job.id)
        claimed = await self._store.claim_marker(name, job.id, LIVE_TTL)
        record = await self._read(job.id)
        if record is not None and await self._swept(record):
            record = None
        if record is not None and self._past_ttl(record, time.time()):
            await self._expire(record)
        live = (
            record is not None
            and not _unconfirmed(record)
            and record.queue == job.queue
            and (record.status in WAITING or record.status is Status.RUNNING)
        )
        if live:
            return self._duplicate(job, job.id)
        if not claimed:  # a stale claim: its job ended without letting go
            await self._store.set_marker(name, job.id, LIVE_TTL)
        return None

    async def _check_key(self, job: OutgoingJob) -> Pushed | None:
        name = self._m("key", job.queue, job.unique_key)
        ttl = job.unique_for if job.unique_for > 0 else LIVE_TTL
        if await self._store.claim_marker(name, job.id, ttl):
            return None
        holder = await self._store.get_marker(name)
        record = await self._read(holder) if holder else None
        if record is not None and await self._swept(record):
            record = None
        if record is not None and self._past_ttl(record, time.time()):
            await self._expire(record)
        if holder and record is not None and not (holder == job.id and _unconfirmed(record)):
            if record.status in WAITING:
                return self._duplicate(job, holder)
            if record.unique_for > 0:  # held for `unique_for`: running or ended
                return self._duplicate(job, holder)
        # Held only until its job started or ended, and it has: the successor goes in.
        await self._store.set_marker(name, job.id, ttl)
        return None

    # -- consuming ---------------------------------------------------------------------

    def _wake(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def _consume(self, queues: Sequence[str], limit: int) -> dict[str, int]:
        """Consumers on `queues` (and the router), with a prefetch of at least `limit`;
        returns, for each consumer started here, how many deliveries it is about to get (the
        ready jobs at its start, up to the prefetch)."""
        expect: dict[str, int] = {}
        conn = self._conn
        if conn is None:
            raise DriverError(f"the {self.name} connection is not open (use `async with`)")
        with translated(self.settings, "starting consumers"):
            if self._sub is None:
                self._sub = await conn.channel(publisher_confirms=False)
            if not self._router_on:
                await self._start_router(conn)
            # Deliveries held (unacknowledged) count against the prefetch: room for `limit`
            # more beside them. A worker asks for what it has room for, so its prefetch stays
            # its concurrency plus its buffer.
            if not self._consumers:
                # Every consumer stopped (nobody was asking): deliveries held now are on
                # cancelled consumers, which a new consumer's prefetch does not count.
                self._prefetch = 0
                held = {}
            else:
                held = self._held_counts()
            raise_to = max(limit, 1) + max((held.get(q, 0) for q in queues), default=0)
            if raise_to > self._prefetch:
                # A prefetch applies to the consumers started after it: restart them.
                self._prefetch = raise_to
                await self._sub.set_qos(prefetch_count=raise_to)
                for queue, tag in list(self._consumers.values()):
                    await queue.cancel(tag)
                restart = list(self._consumers)
                self._consumers.clear()
            else:
                restart = []
            for name in [*restart, *queues]:
                if name in self._consumers:
                    continue
                declared = await self._sub.declare_queue(
                    self._names.work(name), durable=True, arguments=work_arguments()
                )
                self._inbox.setdefault(name, deque())
                ready = declared.declaration_result.message_count or 0
                tag = await declared.consume(self._deliverer(name))
                self._consumers[name] = (declared, tag)
                if ready:
                    expect[name] = len(self._inbox[name]) + min(ready, self._prefetch)
        return expect

    def _deliverer(self, queue: str) -> Any:
        inbox = self._inbox[queue]

        async def deliver(message: AbstractIncomingMessage) -> None:
            if self._inbox.get(queue) is not inbox:
                # Its consumer was stopped (`_stop_consumers`) while this delivery was on its
                # way: nobody will take it here, so it goes back at once.
                task = asyncio.create_task(self._late_give_back(message), name="topiq-amqp-back")
                self._acking.add(task)
                task.add_done_callback(self._acking.discard)
                return
            inbox.append((time.monotonic(), message))
            self._wake()

        return deliver

    async def _late_give_back(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._give_back(message)
        except Exception as exc:
            # Never left unacknowledged on a live channel (the consumer_timeout would close it,
            # running jobs and all): returned to the broker, which counts a delivery (the
            # job's record, if it has one, keeps that from costing a try).
            logger.debug("could not give back a late delivery of %s: %s", message.message_id, exc)
            if self._live(message):
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)

    async def _start_router(self, conn: AbstractRobustConnection) -> None:
        self._routing = await conn.channel(publisher_confirms=False)
        await self._routing.set_qos(prefetch_count=ROUTER_PREFETCH)
        router = await self._routing.declare_queue(
            self._names.router, durable=True, arguments=work_arguments()
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.create_task(self._route(message), name="topiq-amqp-route")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        result = router.declaration_result
        self._router_backlog = min(result.message_count or 0, ROUTER_PREFETCH) if result else 0
        self._routed = 0
        await router.consume(on_message)
        self._router_on = True

    async def _route(self, message: AbstractIncomingMessage) -> None:
        """One message out of the ladder: on to its next bucket, or to its work queue."""
        try:
            headers = self._clean(message.headers)
            queue = str(headers.get(QUEUE, ""))
            job_id = message.message_id or ""
            due = _header_int(headers, DUE)
            token = headers.get(LEASE)
            if not queue or not job_id:
                await self._set_aside(
                    message, f"it has no {QUEUE} header or no message_id: not a Topiq job"
                )
                return
            remaining = due - _now_ms()
            if 0 < remaining <= HOLD_MS:
                await asyncio.sleep(remaining / 1000)
            elif remaining > 0:
                carried = {k: headers[k] for k in CARRIED if k in headers}
                await self._send(
                    queue, job_id, message.body, _header_int(headers, TRIES), due, carried
                )
                await message.ack()
                return
            if token:
                # A parked lease ran out: its job's next try, unless the job ended or its
                # lease was renewed (another token) meanwhile.
                marker = await self._store.get_marker(self._m("lease", job_id))
                if marker is not None and marker != str(token):
                    await message.ack()
                    return
                headers.pop(LEASE, None)
                headers[SENT] = _now_ms()  # back in line now (it was running, not waiting)
            headers[TRIES] = _header_int(headers, TRIES)
            await self._work_queue(queue)
            await self._publish(self._names.work(queue), message.body, message, headers)
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            tried = _count_header(message.headers, "x-delivery-count") + 1
            if not isinstance(exc, ConnectionLostError) and tried >= UNROUTABLE_AFTER:
                # Refused this many times for the message's own sake (its queue's name, a
                # broker refusal), not for a lost connection: it would go round for ever.
                with contextlib.suppress(Exception):
                    await self._set_aside(message, f"routing it failed {tried} times: {exc}")
                    return
            # Not acknowledged: the broker hands it out again (here or to another worker).
            logger.warning(
                "routing a delayed job failed (%s, try %d); it will be routed again", exc, tried
            )
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        finally:
            self._routed += 1
            self._wake()

    async def _set_aside(self, message: AbstractIncomingMessage, why: str) -> None:
        """A router message that can never be routed goes to the quorum queue
        `<prefix>.unroutable` (body, id and headers kept, the reason in
        `x-topiq-unroutable`), where an operator finds it (`rabbitmqctl list_queues`, the
        management UI) and can move it on by hand; then it is acknowledged. Logged once."""
        name = f"{self._prefix}.unroutable"
        # The broker's own dead-lettering headers would only mislead on the copy.
        broker = ("x-death", "x-delivery-count", "x-first-death-", "x-last-death-")
        headers = {k: v for k, v in message.headers.items() if not k.startswith(broker)}
        headers[UNROUTABLE] = why[:1000]
        # A channel of its own: the refusal that brought it here may have closed the other.
        conn = self._conn
        if conn is None:
            raise DriverError(f"the {self.name} connection is not open (use `async with`)")
        with translated(self.settings, f"opening a channel to set a message aside in {name}"):
            channel = await conn.channel(publisher_confirms=True)
        try:
            with translated(self.settings, f"setting a message aside in {name}"):
                await channel.declare_queue(name, durable=True, arguments=work_arguments())
                await channel.default_exchange.publish(
                    Message(
                        message.body,
                        headers=headers,
                        message_id=message.message_id,
                        delivery_mode=DeliveryMode.PERSISTENT,
                    ),
                    name,
                    mandatory=True,
                )
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        await message.ack()
        logger.error(
            "a message of the delay router (id %r) cannot be routed: %s; set aside in the queue %s",
            message.message_id,
            why,
            name,
        )

    @staticmethod
    def _live(message: AbstractIncomingMessage) -> bool:
        """Whether the delivery's channel is still the one it came on (after a reconnect the
        broker has redelivered it: this copy can no longer be acknowledged)."""
        try:
            message.channel  # noqa: B018 - raises once the channel is closed
        except Exception:
            return False
        return True

    @staticmethod
    def _stale(record: Record) -> bool:
        """Whether a delivery whose push generation is not its record's is stale: the record
        is live (waiting or running) under another push of the id (cancelled, then dispatched
        again), and that push's own message is the one to run. Against an ended record it is
        not: a late ack of an earlier try may have ended the record over a newer push."""
        return record.status in WAITING or record.status is Status.RUNNING

    @staticmethod
    def _tries(message: AbstractIncomingMessage) -> int:
        """Tries this delivery's job used before it: its own count plus the broker's
        redeliveries (each one a try that was lost)."""
        headers = message.headers
        return _count_header(headers, TRIES) + _count_header(headers, "x-delivery-count")

    # -- reserve -------------------------------------------------------------------------

    async def reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        ack: Sequence[ReservedJob] = (),
        *,
        worker: str = "",
    ) -> list[ReservedJob]:
        # Acknowledged with the reservation's own record writes: one store round trip.
        acks = _Acks(self._outcomes(ack) if ack else [])
        try:
            return await self._reserve(queues, limit, lease, worker, acks)
        except BaseException:
            if not acks.stored:
                self._unended(acks.items)  # the caller sends them again
            raise

    async def _reserve(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        worker: str,
        acks: _Acks,
    ) -> list[ReservedJob]:
        """`_take_jobs`, then, for a reserve made for no worker (a script, the console, a
        test) with no other reserve or wait under way, the consumers stop and what they
        prefetched goes back: a driver left idle after its reserve must not keep taking
        the jobs pushed later into its inbox, where no other driver can reserve them. A
        worker's reserves keep theirs running (the worker comes back for more, or waits, or
        closes), so its next reservation finds the jobs already delivered."""
        self._asking += 1
        try:
            out = await self._take_jobs(queues, limit, lease, worker, acks)
        finally:
            self._asking -= 1
        if not worker and not self._asking and self._consumers:
            try:
                await self._stop_consumers(list(self._consumers))
                await self._given_back()
            except Exception as exc:  # the jobs are reserved all the same
                logger.debug("could not stop the consumers after a reserve: %s", exc)
        return out

    async def _take_jobs(
        self,
        queues: Sequence[str],
        limit: int,
        lease: float,
        worker: str,
        acks: _Acks,
    ) -> list[ReservedJob]:
        await self._lapse_leases()
        unasked = [name for name in self._consumers if name not in queues]
        if unasked:
            await self._stop_consumers(unasked)
        expect = await self._consume(queues, limit)
        await self._await_router()
        if expect:
            # Consumers just started: let their first deliveries in, so that an earlier
            # queue's jobs are not passed over for a later one's that came in first.
            await self._await_inbox(
                lambda: all(len(self._inbox[q]) >= n for q, n in expect.items())
            )
        out: list[ReservedJob] = []
        gone: list[ReservedJob] = []
        # Jobs dropped (cancelled, expired) leave room: take again, up to `limit` runnable.
        for _ in range(limit + 1):
            want = limit - len(out)
            if want <= 0:
                break
            # Jobs still to acknowledge hold prefetch room: nothing more comes until they
            # are, so no waiting for deliveries before that.
            if acks.waiting and self._starved(queues):
                # An earlier queue may have jobs the broker sends only once these are
                # acknowledged: acknowledge first, then look.
                await self._flush_acks(acks)
            coming = False if acks.waiting else await self._settle(queues)
            messages = self._take(queues, want)
            if not messages:
                if acks.waiting:
                    await self._flush_acks(acks)
                    continue
                break
            started, expired, dropped = await self._start(messages, lease, worker, acks)
            out += started
            gone += expired
            if not dropped and (len(messages) >= want or not coming):
                break
        if acks.waiting:
            await self._flush_acks(acks)
        return out + gone

    async def _flush_acks(self, acks: _Acks) -> None:
        await self._write_many([(h.record, keep) for h, keep in acks.items])
        acks.stored = True
        await self._acked(acks.items)

    async def _await_inbox(self, done: Callable[[], bool]) -> None:
        """Wait (at most `DELIVERY_GRACE`) until `done()` says the deliveries on their way
        are in."""
        deadline = time.monotonic() + DELIVERY_GRACE
        while not done() and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def _await_router(self) -> None:
        """After the router's consumer started: let it route what was due already (a job due
        before the first reserve is handed out by that reserve)."""
        pending = self._router_backlog
        if pending <= 0:
            return
        self._router_backlog = 0
        deadline = time.monotonic() + DELIVERY_GRACE
        while self._routed < pending and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def _settle(self, queues: Sequence[str]) -> bool:
        """Before taking: if the inbox of an earlier queue is empty while the broker holds
        ready jobs for it, wait for their delivery (the order of `queues` is kept). Whether
        jobs were found on their way."""
        starved = self._starved(queues)
        if not starved:
            return False
        # A round trip on the same connection: deliveries the broker sent before its answer
        # have been read by then (frames keep their order); a few turns of the loop let them
        # reach the inbox. Jobs still ready are on their way: wait for them.
        ready = await self._ready_elsewhere(starved)
        for _ in range(3):
            await asyncio.sleep(0)
        if ready:
            await self._await_inbox(lambda: any(self._inbox[q] for q in ready))
        return bool(ready)

    def _take(self, queues: Sequence[str], limit: int) -> list[tuple[str, AbstractIncomingMessage]]:
        out: list[tuple[str, AbstractIncomingMessage]] = []
        for name in queues:
            inbox = self._inbox.get(name)
            while inbox and len(out) < limit:
                message = inbox.popleft()[1]
                if self._live(message):
                    out.append((name, message))
        return out

    def _held_counts(self) -> dict[str, int]:
        """Deliveries held unacknowledged here (not parked, channel alive), per queue."""
        held: dict[str, int] = {}
        for held_job in self._held.values():
            if held_job.message is not None and self._live(held_job.message):
                held[held_job.job.queue] = held.get(held_job.job.queue, 0) + 1
        return held

    def _starved(self, queues: Sequence[str]) -> list[str]:
        """The queues ahead of the first one holding deliveries (all of them when none does)
        whose inbox is empty and whose consumer has room for more."""
        held = self._held_counts()
        out = []
        for name in queues:
            if self._inbox.get(name):
                break
            if held.get(name, 0) < self._prefetch:
                out.append(name)
        return out

    async def _ready_elsewhere(self, queues: Sequence[str]) -> list[str]:
        """Those of `queues` the broker holds ready jobs of (our consumers have room for
        them: they will be delivered in a moment)."""
        channel = self._channel(self._pub)
        ready = []
        with translated(self.settings, "counting ready jobs"):
            for name in queues:
                declared = await channel.declare_queue(
                    self._names.work(name), durable=True, arguments=work_arguments()
                )
                result = declared.declaration_result
                if result is not None and result.message_count:
                    ready.append(name)
        return ready

    async def _start(
        self,
        messages: list[tuple[str, AbstractIncomingMessage]],
        lease: float,
        worker: str,
        acks: _Acks,
    ) -> tuple[list[ReservedJob], list[ReservedJob], int]:
        """Hand out `messages`: (runnable jobs, jobs expired here, how many were dropped).
        The outcomes of `acks` not stored yet are written with their records, then the
        deliveries acknowledged."""
        done = acks.items if acks.waiting else []
        # The records and the queues' last clears, in one round trip.
        names = sorted({queue for queue, _ in messages})
        raw = await self._store.get_markers(
            [self._m("job", m.message_id or "") for _, m in messages]
            + [self._m("cleared", name) for name in names]
        )
        records = [Record.loads(value) for value in raw[: len(messages)]]
        cleared = {n: _int(v) for n, v in zip(names, raw[len(messages) :], strict=True) if v}
        saved = await self._checkpoints(messages, records)
        now, wall = time.monotonic(), time.time()
        out: list[ReservedJob] = []
        gone: list[ReservedJob] = []
        writes: list[tuple[Record, float]] = [(h.record, keep) for h, keep in done]
        drops: list[AbstractIncomingMessage] = []
        ends: list[tuple[str, Status]] = []
        started: list[Record] = []
        for (queue, message), record in zip(messages, records, strict=True):
            job_id = message.message_id or ""
            attempts = self._tries(message) + 1
            if record is not None and record.extra.get("gen", "") == message.headers.get(GEN, ""):
                # The broker counts every delivery it took back, also one that was only
                # prefetched and never started (a lost connection, a broker restart may even
                # count one twice); the record counts the tries that started.
                attempts = min(attempts, record.attempts + 1)
            tries = attempts - 1
            same = record is not None and record.extra.get("gen", "") == message.headers.get(
                GEN, ""
            )
            if record is not None and same and record.status in ENDED:
                drops.append(message)  # cancelled while waiting, or a late redelivery
                continue
            if record is not None and not same and self._stale(record):
                drops.append(message)  # an earlier push of a re-dispatched id
                continue
            held_now = self._held.get((queue, job_id))
            if (
                job_id
                and held_now is not None
                and held_now.message is not None
                and held_now.gen == str(message.headers.get(GEN, ""))
                and self._live(held_now.message)
            ):
                drops.append(message)  # a second copy of a delivery this driver runs
                continue
            sent = _header_int(message.headers, SENT)
            if sent and sent < cleared.get(queue, 0):
                drops.append(message)  # waiting when its queue was cleared
                if record is not None and same:
                    record.status = Status.CANCELLED  # its id and key are freed below
                    writes.append((record, 0.0))  # a cleared job's record goes with it
                continue
            if (
                record is not None
                and record.status is Status.RUNNING
                and record.extra.get("cancel")
            ):
                # Cancelled while running, then its lease was lost: it ends cancelled.
                self._ended(
                    record, Outcome(Status.CANCELLED, record.failure_ttl, error="cancelled"), wall
                )
                writes.append((record, record.failure_ttl))
                ends.append((queue, Status.CANCELLED))
                drops.append(message)
                continue
            if record is None:
                record = Record(job_id, queue, Status.QUEUED, enqueued_at=wall, due_at=wall)
            due = _header_int(message.headers, DUE) / 1000
            if record.ttl > 0 and tries == 0 and due + record.ttl < wall:
                self._ended(record, self._expiry(record), wall)
                writes.append((record, record.failure_ttl))
                ends.append((queue, Status.EXPIRED))
                drops.append(message)
                gone.append(ReservedJob(job_id, queue, message.body, 0, expired=True))
                continue
            record.status = Status.RUNNING
            record.attempts = attempts
            record.started_at = wall
            record.worker = worker
            record.extra.pop("cancel", None)
            writes.append((record, self._live_keep(record)))
            reserved = ReservedJob(job_id, queue, saved.get(job_id, message.body), attempts)
            gen = str(message.headers.get(GEN, ""))
            record.extra["gen"] = gen
            self._held[(queue, job_id)] = _Held(
                reserved, record, message, now, now + lease, gen=gen
            )
            started.append(record)
            out.append(reserved)
        await self._write_many(writes)
        if done:
            acks.stored = True
            await self._acked(done)
        await _bounded(self._release_claims(r, started=True) for r in started)
        for record in (r for r, _ in writes[len(done) :] if r.status in ENDED):
            await self._release_claims(record)
        if ends:
            await self._count(ends)
        await self._deps.ended([(r, k) for r, k in writes[len(done) :] if r.status in ENDED])
        await _bounded(self._ack_message(message) for message in drops)
        for reserved in out:
            held = self._held.get((reserved.queue, reserved.id))
            if held is not None and self._needs_park(held, lease, now):
                await self._park(held, lease)
        return out, gone, len(drops)

    async def _checkpoints(
        self, messages: list[tuple[str, AbstractIncomingMessage]], records: list[Record | None]
    ) -> dict[str, bytes]:
        """The payloads saved by earlier tries (`save_payload`) of the jobs among `messages`
        whose records say they have one, by id, in one round trip (none when no record does).
        A message's body is what was pushed or published last; a checkpoint written after
        that (then the worker died, or its connection dropped) is only in the store."""
        ids = [
            message.message_id or ""
            for (_, message), record in zip(messages, records, strict=True)
            if record is not None
            and record.extra.get("ckpt")
            and record.status not in ENDED
            and record.extra.get("gen", "") == message.headers.get(GEN, "")
        ]
        if not ids:
            return {}
        raw = await self._store.get_markers([self._m("payload", job_id) for job_id in ids])
        saved: dict[str, bytes] = {}
        for job_id, text in zip(ids, raw, strict=True):
            payload = _payload(text)
            if payload is not None:
                saved[job_id] = payload
        return saved

    @staticmethod
    def _past_ttl(record: Record, wall: float) -> bool:
        """A waiting job whose first try was not started within its ttl."""
        return (
            record.ttl > 0
            and record.attempts == 0
            and record.status in (Status.QUEUED, Status.SCHEDULED)
            and (record.due_at or 0) + record.ttl < wall
        )

    async def _expire(self, record: Record) -> None:
        """End a waiting job as expired (read past its ttl): its message is dropped when it
        is delivered."""
        self._ended(record, self._expiry(record), time.time())
        await self._write(record, record.failure_ttl)
        await self._count([(record.queue, Status.EXPIRED)])
        await self._release_claims(record)
        await self._deps.ended([(record, record.failure_ttl)])

    @staticmethod
    def _expiry(record: Record) -> Outcome:
        return Outcome(
            Status.EXPIRED,
            record.failure_ttl,
            error=f"not started within its ttl of {record.ttl:g}s",
        )

    @staticmethod
    def _ended(record: Record, outcome: Outcome, wall: float) -> None:
        record.status = outcome.status
        record.ended_at = wall
        record.error = outcome.error
        record.traceback = outcome.traceback
        record.result = outcome.result.decode() if outcome.result is not None else None
        record.info = outcome.info.decode() if outcome.info is not None else None
        record.extra.pop("cancel", None)

    async def _ack_message(self, message: AbstractIncomingMessage) -> bool:
        """Acknowledge a delivery; False when its channel is gone (the broker has given it
        out again)."""
        if not self._live(message):
            return False
        try:
            await message.ack()
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            logger.debug("ack of %s not delivered: %s", message.message_id, exc)
            return False
        return True

    async def _lapse_leases(self) -> None:
        """Leases that ran out here go back as lost ones: the try counts (a copy with it, then
        the ack, as the broker's redelivery would)."""
        now = time.monotonic()
        lapsed = [key for key, held in self._held.items() if held.lease_until <= now]
        for key in lapsed:
            held = self._held.pop(key, None)  # acknowledged meanwhile: nothing to do
            if held is None or held.message is None:
                continue  # parked: its copy comes back by itself when the lease ends
            if not self._live(held.message):
                continue
            await self._send(
                held.job.queue,
                held.job.id,
                held.job.payload,
                held.job.attempts,
                _now_ms(),
                {GEN: held.gen},
            )
            await self._ack_message(held.message)

    # -- parking (consumer_timeout) ----------------------------------------------------

    def _needs_park(self, held: _Held, seconds: float, now: float) -> bool:
        if held.message is None:
            # Parked already: renew once half of the lease asked for is gone, or at once
            # when the lease asked for ends earlier than the parked copy is due (a job's
            # own timeout, shorter than the lease it was reserved with).
            ends = now + seconds
            return held.parked_until - now < seconds / 2 or ends < held.parked_until - 1.0
        return now + seconds > held.delivered + self._park_after

    async def _park(self, held: _Held, seconds: float) -> None:
        """Hold the job by a copy in the ladder due at the lease's end, not by the delivery."""
        if held.parking:
            return  # a park of this job is under way (an extend beside the heartbeat's)
        held.parking = True
        try:
            token = os.urandom(8).hex()
            job = held.job
            lease = self._m("lease", job.id)
            await self._store.set_marker(lease, token, seconds + PARK_KEEP)
            await self._send(
                job.queue,
                job.id,
                job.payload,
                job.attempts,
                _now_ms() + int(seconds * 1000),
                {LEASE: token, GEN: held.gen},
            )
            if self._held.get((job.queue, job.id)) is not held:
                # It ended (acked or released) meanwhile, and that acknowledged its
                # delivery: this copy must never run.
                await self._store.set_marker(lease, "done", PARK_KEEP)
                return
            # Taken before the ack is awaited: an ack of the job meanwhile finds no delivery
            # to acknowledge a second time (which would close the channel).
            message, held.message = held.message, None
            held.token = token
            held.parked_until = time.monotonic() + seconds
            if message is not None:
                await self._ack_message(message)
        finally:
            held.parking = False

    async def _unpark(self, held: _Held) -> None:
        if held.message is None and held.token:
            await self._store.set_marker(self._m("lease", held.job.id), "done", PARK_KEEP)

    # -- wait, ack, release, extend ----------------------------------------------------

    async def wait(self, queues: Sequence[str], timeout: float) -> None:
        if any(self._inbox.get(name) for name in queues):
            return
        arrived = self._arrived
        leases = [h.lease_until for h in self._held.values() if h.message is not None]
        if leases:
            timeout = min(timeout, min(leases) - time.monotonic())
        if timeout <= 0:
            return
        self._asking += 1  # a reserve that returns meanwhile leaves the consumers running
        try:
            if self._conn is not None and (
                not self._router_on or any(name not in self._consumers for name in queues)
            ):
                # Stopped by a reserve for no worker, or never started: a push must wake us.
                await self._consume(queues, 1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), timeout)
        finally:
            self._asking -= 1

    def _holding(self, job: ReservedJob) -> _Held | None:
        held = self._held.get((job.queue, job.id))
        if held is None or held.job.attempts != job.attempts:
            return None  # a lapsed reservation: the job is someone else's now
        return held

    async def ack(self, jobs: Sequence[ReservedJob]) -> None:
        done = self._outcomes(jobs)
        if not done:
            return
        try:
            # The store has the outcome before the broker forgets the job.
            await self._write_many([(h.record, keep) for h, keep in done])
        except BaseException:
            self._unended(done)
            raise
        await self._acked(done)

    def _outcomes(self, jobs: Sequence[ReservedJob]) -> list[tuple[_Held, float]]:
        """The held jobs among `jobs`, taken out of `_held` with their records ended (not
        written yet), and how long each record is kept."""
        wall = time.time()
        done: list[tuple[_Held, float]] = []
        for job in jobs:
            held = self._holding(job)
            if held is None:
                continue
            del self._held[(job.queue, job.id)]
            outcome = job.outcome or Outcome(Status.SUCCEEDED, self.settings.queue_result_ttl)
            self._ended(held.record, outcome, wall)
            done.append((held, outcome.keep))
        return done

    def _unended(self, done: list[tuple[_Held, float]]) -> None:
        """Their outcomes could not be stored: held again, for the caller's next try."""
        for held, _ in done:
            self._held[(held.job.queue, held.job.id)] = held

    async def _acked(self, done: list[tuple[_Held, float]]) -> None:
        """After their outcomes are stored: counted, ids and keys freed, parked leases
        ended, deliveries acknowledged (the ack frames are written in the background: the
        broker answers none, and one lost only means a redelivery, which the job's ended
        record drops)."""
        await self._count([(h.job.queue, h.record.status) for h, _ in done])
        await self._deps.ended([(h.record, keep) for h, keep in done])
        await _bounded(
            self._finish(held)
            for held, _ in done
            if held.token or held.record.check_id or held.record.unique_key
        )
        messages = [held.message for held, _ in done if held.message is not None]
        if messages:
            task = asyncio.create_task(self._ack_all(messages), name="topiq-amqp-ack")
            self._acking.add(task)
            task.add_done_callback(self._acking.discard)

    async def _finish(self, held: _Held) -> None:
        await self._release_claims(held.record)
        await self._unpark(held)

    async def _ack_all(self, messages: list[AbstractIncomingMessage]) -> None:
        for message in messages:
            await self._ack_message(message)

    async def release(
        self, job: ReservedJob, delay: float = 0.0, *, refund: bool = False, error: str = ""
    ) -> None:
        held = self._holding(job)
        if held is None:
            return
        key = (job.queue, job.id)
        del self._held[key]  # no park, extend or lapse of it from here on
        if held.message is not None and not self._live(held.message):
            return  # the broker gave it out again already
        try:
            await self._requeue(held, job, delay, refund, error)
        except BaseException:
            if not held.requeued:  # no copy went out: still held, the caller may try again
                self._held.setdefault(key, held)
            raise

    async def _requeue(
        self, held: _Held, job: ReservedJob, delay: float, refund: bool, error: str
    ) -> None:
        """The copy of a released job, then the ack of its delivery (`held.requeued` once
        the copy is out: an error after that must not lead to a second one)."""
        delay = max(delay, 0.0)
        wall = time.time()
        record = held.record
        tries = job.attempts - 1 if refund else job.attempts
        record.attempts = tries
        record.due_at = wall + delay
        if refund:
            record.status = Status.QUEUED
        else:
            record.status = Status.RETRYING
            record.error = error
        sent = int(wall * 1000)
        record.extra["sent"] = sent  # the copy's SENT header (see `_swept`)
        await self._write(record, self._live_keep(record))
        await self._send(
            job.queue,
            job.id,
            job.payload,
            tries,
            int((wall + delay) * 1000),
            {GEN: held.gen, SENT: sent},
        )
        held.requeued = True
        try:
            await self._unpark(held)
        finally:
            if held.message is not None:
                await self._ack_message(held.message)

    async def extend(self, leases: Sequence[tuple[ReservedJob, float]]) -> None:
        now = time.monotonic()
        for job, seconds in leases:
            held = self._holding(job)
            if held is None:
                continue
            held.lease_until = now + seconds
            if self._needs_park(held, seconds, now):
                await self._park(held, seconds)

    async def save_payload(self, job: ReservedJob, payload: bytes) -> bool:
        """A published message cannot be rewritten: the checkpoint goes to the job's payload
        marker in the store, and its record says so (`ckpt`: the first try that saved), so that a
        later try reads the marker at `_start` in place of its message's body (a retry's or
        a refund's copy carries the checkpoint anyway; the broker's redelivery after a worker
        died does not). Two round trips: the record read (still this try's?), then the
        marker with, on the job's first save, the record."""
        held = self._holding(job)
        if held is None or not self._still_held(held):
            return False
        record = await self._read(job.id)
        if (
            record is None
            or record.status is not Status.RUNNING
            or record.queue != job.queue
            or record.attempts != job.attempts
            or record.extra.get("gen", "") != held.gen
            or record.worker != held.record.worker
        ):
            # Another try started meanwhile (this one's lease lapsed, its connection dropped
            # and the broker gave the job to another worker), or the job ended.
            return False
        if self._held.get((job.queue, job.id)) is not held or not self._still_held(held):
            return False  # released, acknowledged or lapsed during the read
        keep = self._live_keep(record)
        items = [(self._m("payload", job.id), encode_payload(payload), keep)]
        held.record.extra.setdefault("ckpt", job.attempts)  # on the record's next writes too
        if not record.extra.get("ckpt"):
            # The job's first checkpoint: the record as stored (a cancel asked meanwhile is
            # kept), marked. Later saves write the payload alone.
            record.extra["ckpt"] = job.attempts
            items.append(self._item(record, keep))
        await self._store.set_markers(items)
        return True

    def _still_held(self, held: _Held) -> bool:
        """Whether this driver still holds `held`'s try: not released, its lease not run out
        (then its copy is on its way to another worker), its delivery's channel alive (else
        the broker gave it out again)."""
        if held.requeued or held.lease_until <= time.monotonic():
            return False
        return held.message is None or self._live(held.message)

    # -- observing ---------------------------------------------------------------------

    async def stats(self, queue: str) -> QueueStats:
        conn = self._conn
        if conn is None:
            raise DriverError(f"the {self.name} connection is not open (use `async with`)")
        pending = 0
        with translated(self.settings, f"counting the jobs of {queue!r}"):
            channel = await conn.channel(publisher_confirms=False)
            try:
                declared = await channel.declare_queue(self._names.work(queue), passive=True)
                result = declared.declaration_result
                pending = result.message_count or 0 if result is not None else 0
            except aiormq.exceptions.ChannelNotFoundEntity:
                pending = 0
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        pending += len(self._inbox.get(queue, ()))
        reserved = sum(1 for key in self._held if key[0] == queue)
        deferred = await self._deps.deferred(queue)
        return QueueStats(self.name, queue, pending, 0, reserved, 0, deferred=deferred)

    async def queues(self) -> list[str]:
        import orjson

        raw = await self._store.get_marker(self._m("queues"))
        try:
            stored = set(orjson.loads(raw)) if raw else set()
        except ValueError:
            stored = set()
        return sorted(stored | self._known)

    async def clear(self, queue: str) -> int:
        declared = await self._work_queue(queue)
        with translated(self.settings, f"purging the queue of {queue!r}"):
            result = await declared.purge()
        count = int(getattr(result, "message_count", 0) or 0)
        # Delayed jobs are in the ladder, among every queue's: dropped when delivered.
        await self._store.set_marker(self._m("cleared", queue), str(_now_ms()), LIVE_TTL)
        count += await self._deps.clear(queue)  # its deferred jobs (amqp_deps.py)
        inbox = self._inbox.get(queue)
        while inbox:
            if await self._ack_message(inbox.popleft()[1]):
                count += 1
        return count

    # -- single jobs -------------------------------------------------------------------

    async def job_status(self, job_id: str, queue: str | None = None) -> JobStatus | None:
        record = await self._read(job_id)
        if record is None or (queue is not None and record.queue != queue):
            return None
        if await self._swept(record):
            return None
        if self._past_ttl(record, time.time()):
            await self._expire(record)
        if self._deps.looks(record):  # deferred jobs, workflow records: amqp_deps.py
            return await self._deps.status(record)
        view = record.view(self.name)
        if view.status is Status.SCHEDULED and (record.due_at or 0) <= time.time():
            from dataclasses import replace

            view = replace(view, status=Status.QUEUED)
        return view

    async def job_payload(self, job_id: str, queue: str | None = None) -> bytes | None:
        # The record and the payload marker in one round trip; the record decides (as in
        # `job_status`) whether the job is the one asked for and still kept.
        raw = await self._store.get_markers([self._m("job", job_id), self._m("payload", job_id)])
        record = Record.loads(raw[0])
        if record is None or (queue is not None and record.queue != queue):
            return None
        if await self._swept(record):
            return None
        if self._past_ttl(record, time.time()):
            await self._expire(record)
        if record.status in ENDED:
            return None
        payload = _payload(raw[1])
        if payload is None:  # pushed by a version that kept no payloads: held here, maybe
            held = self._held.get((record.queue, job_id))
            return held.job.payload if held is not None else None
        return payload

    async def cancel(self, job_id: str, queue: str | None = None) -> bool:
        record = await self._read(job_id)
        if record is None or (queue is not None and record.queue != queue):
            return False
        if self._deps.handles(record):  # deferred jobs, workflow records: amqp_deps.py
            return await self._deps.cancel(record)
        if record.status in WAITING:
            # Its message stays in the broker; whoever takes it drops it.
            self._ended(
                record,
                Outcome(Status.CANCELLED, record.failure_ttl, error="cancelled"),
                time.time(),
            )
            await self._write(record, record.failure_ttl)
            await self._count([(record.queue, Status.CANCELLED)])
            await self._release_claims(record)
            await self._deps.ended([(record, record.failure_ttl)])
            return True
        if record.status is Status.RUNNING:
            record.extra["cancel"] = True
            await self._write(record, self._live_keep(record))
            return True
        return False

    async def cancel_requested(self, jobs: Sequence[ReservedJob]) -> list[str]:
        records = await self._read_many([job.id for job in jobs])
        return [
            job.id
            for job, record in zip(jobs, records, strict=True)
            if record is not None and record.extra.get("cancel")
        ]

    async def recent(self, queue: str, window: float = 3600.0) -> RecentCounts:
        await self._send_counts()
        minutes = max(1, math.ceil(window / 60) + 1)
        rows = await self._store.history(ends_queue(self._prefix, queue), minutes)
        first = math.floor((time.time() - window) / 60)
        totals = {status: 0 for status in END_FIELDS}
        for row in rows:
            if row.minute >= first:
                for status, name in END_FIELDS.items():
                    totals[status] += getattr(row, name)
        return RecentCounts(
            window,
            succeeded=totals[Status.SUCCEEDED],
            failed=totals[Status.FAILED],
            cancelled=totals[Status.CANCELLED],
            expired=totals[Status.EXPIRED],
        )

    async def browse(
        self, queue: str, state: BrowseState, offset: int = 0, limit: int = 50
    ) -> list[JobStatus]:
        # A queue cannot be read without taking its messages: nothing to list (the records
        # are found by id only).
        if state not in ("pending", "delayed", "reserved", "deferred"):
            raise ValueError(
                f"state must be one of pending, delayed, reserved, deferred, got {state!r}"
            )
        _check_page(offset, limit)
        return []

    async def groups(self, queue: str, offset: int = 0, limit: int = 100) -> list[GroupInfo]:
        _check_page(offset, limit)
        return []

    async def pause(self, queue: str) -> None:
        await self._store.pause(history_queue(self._prefix, queue))

    async def resume(self, queue: str) -> None:
        await self._store.resume(history_queue(self._prefix, queue))

    async def paused(self, queues: Sequence[str]) -> set[str]:
        # The store reads every pause in one round trip; under names of this prefix.
        shadow = {history_queue(self._prefix, q): q for q in queues}
        return {shadow[name] for name in await self._store.paused(list(shadow))}

    async def history(self, queue: str, minutes: int = 60) -> list[MinuteCounts]:
        if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
            raise ValueError(f"minutes must be a whole number of at least 1, got {minutes!r}")
        await self._send_counts()
        work, ends = await asyncio.gather(
            self._store.history(history_queue(self._prefix, queue), minutes),
            self._store.history(ends_queue(self._prefix, queue), minutes),
        )
        return merge_minutes(work, ends)

    async def add_history(self, rows: Sequence[tuple[str, int, Mapping[str, int]]]) -> None:
        mapped = [
            (history_queue(self._prefix, queue), minute, fields)
            for queue, minute, fields in rows
            if isinstance(fields, Mapping) and any(f in HISTORY_FIELDS for f in fields)
        ]
        if mapped:
            await self._store.add_history(mapped)

    async def prune_records(self, ended_before: float | None = None) -> int:
        # Records are store markers that expire by themselves; none can be listed by age.
        return 0

    # -- markers, failed store, workers ------------------------------------------------

    async def get_marker(self, name: str) -> str | None:
        return await self._store.get_marker(self._m("m", name))

    async def set_marker(self, name: str, value: str, ttl: float) -> None:
        await self._store.set_marker(self._m("m", name), value, ttl)

    async def claim_marker(self, name: str, value: str, ttl: float) -> bool:
        return await self._store.claim_marker(self._m("m", name), value, ttl)

    async def set_markers(self, items: Sequence[tuple[str, str, float]]) -> None:
        await self._store.set_markers([(self._m("m", n), v, ttl) for n, v, ttl in items])

    async def get_markers(self, names: Sequence[str]) -> list[str | None]:
        return await self._store.get_markers([self._m("m", name) for name in names])

    def failed_store(self) -> FailedStore:
        return self._store.failed_store()

    async def retry_failed(self, records: Sequence[FailedJob]) -> list[str]:
        # Two stores (the records here, the jobs in RabbitMQ): claim, push, then remove, so
        # a job is never in neither place and a second retry at once skips it.
        store = self.failed_store()
        moved: list[str] = []
        for record in records:
            if record.connection != self.name:
                continue
            claimed = await store.claim(record)
            if claimed is None:
                continue
            await self.push(
                [
                    OutgoingJob(
                        claimed.id,
                        claimed.queue,
                        claimed.payload.encode(),
                        job=_class_of(claimed),
                        check_id=True,
                        on_duplicate="keep",
                    )
                ]
            )
            await store.remove(claimed)
            moved.append(claimed.id)
        return moved

    async def report_worker(self, info: WorkerInfo, ttl: float) -> None:
        await self._store.report_worker(info, ttl)

    async def remove_worker(self, worker_id: str) -> None:
        await self._store.remove_worker(worker_id)

    async def sweep(self) -> None:
        """Leases that ran out here go back; deliveries prefetched but not taken for longer
        than the broker's consumer_timeout allows are given back (the broker would close the
        channel, redelivering everything on it, running jobs included)."""
        await self._lapse_leases()
        await self._send_counts()
        await self._deps.sweep()  # deferred jobs left unresolved (amqp_deps.py)
        old = time.monotonic() - self._park_after
        for inbox in self._inbox.values():
            while inbox and inbox[0][0] < old:
                await self._give_back(inbox.popleft()[1])

    async def workers(self) -> list[WorkerInfo]:
        return [w for w in await self._store.workers() if w.connection == self.name]

    async def request_restart(self, at: float) -> None:
        await self.set_marker("restart", repr(float(at)), 10 * 365 * DAY)

    async def restart_requested_at(self) -> float | None:
        raw = await self.get_marker("restart")
        try:
            return float(raw) if raw else None
        except ValueError:
            return None


#: Store and broker calls one driver runs at once (a pool of connections is bounded: a bulk
#: push of ten thousand jobs must not open ten thousand).
CONCURRENCY = 64

_T = TypeVar("_T")


async def _bounded(calls: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await `calls` (in order of their results), `CONCURRENCY` at a time."""
    out: list[_T] = []
    batch: list[Awaitable[_T]] = []
    for call in calls:
        batch.append(call)
        if len(batch) >= CONCURRENCY:
            out += await asyncio.gather(*batch)
            batch = []
    if batch:
        out += await asyncio.gather(*batch)
    return out


def _payload(text: str | None) -> bytes | None:
    """The payload a payload marker holds: an empty one is an empty payload (`decode_payload`
    reads "" as none), a marker that is not there or cannot be read is `None`."""
    return b"" if text == "" else decode_payload(text)


class UnconfirmedPublish(ConnectionLostError):
    """The connection was lost after a publish went out on an open channel and before its
    confirm came: the broker may have taken the message (only the confirm lost), or not."""


def _check_page(offset: int, limit: int) -> None:
    """Refuse a page that cannot be read (`browse`, `groups`)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a whole number of at least 0, got {offset!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number of at least 0, got {limit!r}")


def _class_of(record: FailedJob) -> str:
    path = record.job_class
    return "" if path == "?" else path


def _unconfirmed(record: Record) -> bool:
    """A record of a push whose confirm was lost (`_unsure`) and that no worker started: it
    may have no message, so it holds neither its id nor its key against a repeat."""
    return (
        bool(record.extra.get("unconfirmed"))
        and record.attempts == 0
        and record.status in (Status.QUEUED, Status.SCHEDULED)
    )


def _refuse_unsupported(job: OutgoingJob) -> None:
    """What quorum queues cannot give is refused with its reason (docs/rabbitmq.md), never
    quietly dropped."""
    missing = []
    if job.group:
        missing.append("group")
    if job.limit is not None:
        missing.append("rate and concurrency limits")
    if job.max_length:
        missing.append("max_length")
    if missing:
        raise DriverError(
            f"job {job.id} on queue {job.queue!r}: the amqp connection does not support "
            f"{', '.join(missing)} (RabbitMQ quorum queues; see docs/rabbitmq.md)"
        )
