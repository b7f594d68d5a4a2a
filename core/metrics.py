"""Prometheus metrics: job counters from the event stream, and queue gauges read at scrape time.

Three sources, each with its own exposition:

- the job counters and histograms (`topiq_jobs_*_total`, `topiq_job_run_seconds`,
  `topiq_job_wait_seconds`), counted in this process from `core.events` once `install()` has
  run: labels `queue` and `job` (the class path) only, so their number stays bounded;
- the backend gauges (`topiq_queue_jobs`, `topiq_failed_jobs`, `topiq_queue_paused`,
  `topiq_workers`, `topiq_backend_up`), read from the backend when scraped (`backend_metrics`),
  with a timeout: a backend that does not answer gives `topiq_backend_up 0` and the rest of the
  scrape, never a hung request;
- the MQTT app's counters (`topiq_mqtt_*`), read from its `MqttStats` (`mqtt_metrics`).

`core.observe_http` joins what a process has into the text of its `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from core.events import EventKind, JobEvent, events

if TYPE_CHECKING:
    from core.mqtt.outcomes import OutcomePublisher
    from core.mqtt.stats import MqttStats
    from core.queue.drivers.base import Driver, FailedStore

__all__ = [
    "BACKEND_TIMEOUT",
    "CONTENT_TYPE",
    "JOB_LABELS",
    "MAX_QUEUES",
    "REGISTRY",
    "backend_down",
    "backend_metrics",
    "install",
    "job_metrics",
    "mqtt_metrics",
    "outcome_metrics",
    "uninstall",
    "worker_metrics",
]

logger = logging.getLogger("topiq.metrics")

#: The Content-Type of the exposition text (Prometheus text format, as prometheus_client writes it).
CONTENT_TYPE: Final[str] = CONTENT_TYPE_LATEST

#: Seconds a scrape waits for the backend before it exports what it knows.
BACKEND_TIMEOUT: Final[float] = 2.0
#: Queues exported per connection by `backend_metrics` (6 series each): queue names can come
#: from devices, and a sender making up names must not grow the scrape without bound.
MAX_QUEUES: Final[int] = 250

#: The labels of the job counters and histograms (bounded: queues and job classes).
JOB_LABELS: Final[tuple[str, str]] = ("queue", "job")

#: Buckets of the run-time and wait histograms, seconds (5 ms to 10 minutes).
BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    math.inf,
)

#: The registry of this process's job counters (`install` fills it; nothing else is in it).
REGISTRY: Final = CollectorRegistry(auto_describe=True)

#: The states of `topiq_queue_jobs`.
STATES: Final[tuple[str, ...]] = ("pending", "delayed", "reserved", "deferred")


class _JobCounters:
    """The counters and histograms fed by the event stream."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, JOB_LABELS, registry=registry)

        self.dispatched = counter("topiq_jobs_dispatched", "Jobs dispatched by this process.")
        self.started = counter("topiq_jobs_started", "Tries started by this process.")
        self.processed = counter(
            "topiq_jobs_processed", "Tries that ended in this process, whichever way."
        )
        self.succeeded = counter("topiq_jobs_succeeded", "Jobs that succeeded.")
        self.failed = counter("topiq_jobs_failed", "Jobs that failed for good.")
        self.retried = counter("topiq_jobs_retried", "Tries that failed and will be retried.")
        self.cancelled = counter("topiq_jobs_cancelled", "Jobs cancelled on request.")
        self.expired = counter("topiq_jobs_expired", "Jobs found past their ttl, never run.")
        self.run_seconds = Histogram(
            "topiq_job_run_seconds",
            "Seconds each try ran.",
            JOB_LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.wait_seconds = Histogram(
            "topiq_job_wait_seconds",
            "Seconds from dispatch (or from becoming due) to the first try's start.",
            JOB_LABELS,
            buckets=BUCKETS,
            registry=registry,
        )

    def on_event(self, event: JobEvent) -> None:
        labels = (event.queue, event.job or "unknown")
        kind = event.kind
        if kind is EventKind.DISPATCHED:
            self.dispatched.labels(*labels).inc()
            return
        if kind is EventKind.STARTED:
            self.started.labels(*labels).inc()
            if event.waited is not None and event.waited >= 0:
                self.wait_seconds.labels(*labels).observe(event.waited)
            return
        if kind is EventKind.EXPIRED:
            self.expired.labels(*labels).inc()
            return
        ran = event.duration is not None
        if kind is EventKind.SUCCEEDED:
            self.succeeded.labels(*labels).inc()
        elif kind is EventKind.RETRYING:
            self.retried.labels(*labels).inc()
        elif kind is EventKind.FAILED:
            self.failed.labels(*labels).inc()
        elif kind is EventKind.CANCELLED:
            self.cancelled.labels(*labels).inc()
        if kind in _TRY_ENDS or ran:  # a cancelled or returned job counts when it had run
            self.processed.labels(*labels).inc()
        if event.duration is not None and event.duration >= 0:
            self.run_seconds.labels(*labels).observe(event.duration)


_TRY_ENDS: Final = frozenset({EventKind.SUCCEEDED, EventKind.RETRYING, EventKind.FAILED})

_counters: _JobCounters | None = None
_unsubscribe: Callable[[], None] | None = None


def install() -> None:
    """Count this process's job events from now on (idempotent)."""
    global _counters, _unsubscribe
    if _counters is None:
        # No `*_created` series: they double the output for nothing.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        _counters = _JobCounters(REGISTRY)
    if _unsubscribe is None:
        _unsubscribe = events.subscribe(_counters.on_event)


def uninstall() -> None:
    """Stop counting (the counts so far stay in `REGISTRY`)."""
    global _unsubscribe
    if _unsubscribe is not None:
        _unsubscribe()
        _unsubscribe = None


def job_metrics() -> bytes:
    """The exposition text of this process's job counters (empty before `install`)."""
    return generate_latest(REGISTRY)


# -- backend gauges -------------------------------------------------------------------------


class _BackendGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "topiq_backend_up",
            "1 when the connection's backend answered this scrape in time, else 0.",
            ("connection",),
            registry=registry,
        )
        self.jobs = Gauge(
            "topiq_queue_jobs",
            "Jobs in a queue, by state.",
            ("connection", "queue", "state"),
            registry=registry,
        )
        self.failed = Gauge(
            "topiq_failed_jobs",
            "Jobs of a queue in the failed-job store.",
            ("connection", "queue"),
            registry=registry,
        )
        self.paused = Gauge(
            "topiq_queue_paused",
            "1 when the queue is paused.",
            ("connection", "queue"),
            registry=registry,
        )
        self.omitted = Gauge(
            "topiq_queues_omitted",
            "Queues of the connection left out of this scrape (over the cap of queues exported).",
            ("connection",),
            registry=registry,
        )
        self.workers = Gauge(
            "topiq_workers",
            "Live workers on the connection (heartbeat not expired).",
            ("connection",),
            registry=registry,
        )


async def _read_connection(
    driver: Driver,
    queues: Sequence[str] | None,
    gauges: _BackendGauges,
    stores: Callable[[Driver], Awaitable[FailedStore]] | None,
    max_queues: int = MAX_QUEUES,
) -> None:
    """Fill `gauges` for one connection, value by value (what is read before a timeout
    stays). At most `max_queues` queues (by name); `topiq_queues_omitted` counts the rest."""
    connection = driver.name
    names = list(queues) if queues is not None else sorted(await driver.queues())
    gauges.omitted.labels(connection).set(max(0, len(names) - max_queues))
    names = names[:max_queues]
    store = await stores(driver) if stores is not None else driver.failed_store()
    for name in names:
        stats = await driver.stats(name)
        for state in STATES:
            gauges.jobs.labels(connection, name, state).set(getattr(stats, state))
        gauges.failed.labels(connection, name).set(await store.count(name))
    paused = await driver.paused(names) if names else set()
    for name in names:
        gauges.paused.labels(connection, name).set(1 if name in paused else 0)
    gauges.workers.labels(connection).set(len(await driver.workers()))


async def _fill_backend(
    registry: CollectorRegistry,
    drivers: Sequence[Driver],
    queues: Sequence[str] | None,
    timeout: float,
    stores: Callable[[Driver], Awaitable[FailedStore]] | None,
    max_queues: int = MAX_QUEUES,
) -> _BackendGauges:
    gauges = _BackendGauges(registry)

    async def one(driver: Driver) -> None:
        try:
            await asyncio.wait_for(
                _read_connection(driver, queues, gauges, stores, max_queues), timeout
            )
        except Exception as exc:  # a timeout or a backend error: export what is known
            logger.warning(
                "metrics: the %s backend did not answer in time: %s",
                driver.name,
                f"{type(exc).__name__}: {exc}".rstrip(": "),
            )
            gauges.up.labels(driver.name).set(0)
        else:
            gauges.up.labels(driver.name).set(1)

    await asyncio.gather(*(one(driver) for driver in drivers))
    return gauges


async def backend_metrics(
    drivers: Sequence[Driver],
    *,
    queues: Sequence[str] | None = None,
    timeout: float = BACKEND_TIMEOUT,
    stores: Callable[[Driver], Awaitable[FailedStore]] | None = None,
    max_queues: int = MAX_QUEUES,
    down: Sequence[str] = (),
) -> bytes:
    """The exposition text of the backend gauges of `drivers` (each already open), read now.

    Per connection: `topiq_queue_jobs{state}`, `topiq_failed_jobs` and `topiq_queue_paused`
    for `queues` (default: every queue the backend has seen), `topiq_workers` and
    `topiq_backend_up`. A backend that does not answer within `timeout` seconds gets
    `topiq_backend_up 0` and keeps the values read before. `stores` gives a connection's
    failed-job store when it is not the driver's own (`QueueManager.failed_store`). Queue names
    can come from devices, so at most `max_queues` queues per connection are exported (6
    series each), by name; `topiq_queues_omitted{connection}` says how many were left out. A
    fresh registry per call. `down` names connections that could not even be opened: each gets
    `topiq_backend_up 0` in the same text.
    """
    registry = CollectorRegistry(auto_describe=True)
    gauges = await _fill_backend(registry, drivers, queues, timeout, stores, max_queues)
    for connection in down:
        gauges.up.labels(connection).set(0)
    return generate_latest(registry)


def backend_down(connection: str) -> bytes:
    """`topiq_backend_up{connection} 0` alone: for a connection that could not even be
    opened in time."""
    registry = CollectorRegistry(auto_describe=True)
    _BackendGauges(registry).up.labels(connection).set(0)
    return generate_latest(registry)


def worker_metrics(connection: str, running: int) -> bytes:
    """`topiq_worker_running_jobs{connection}`: the jobs this worker process runs now."""
    registry = CollectorRegistry(auto_describe=True)
    Gauge(
        "topiq_worker_running_jobs",
        "Jobs this worker process is running now.",
        ("connection",),
        registry=registry,
    ).labels(connection).set(running)
    return generate_latest(registry)


# -- the MQTT app ---------------------------------------------------------------------------


class _Reader:
    """A collector that reads plain numbers when scraped."""

    def __init__(self, families: Callable[[], Iterable[object]]) -> None:
        self._families = families

    def collect(self) -> Iterable[object]:
        return self._families()


def mqtt_metrics(
    stats: MqttStats,
    outcomes: Callable[[], OutcomePublisher | None] | None = None,
) -> bytes:
    """The exposition text of the MQTT app's counters, read from `stats` (and from the job
    outcome publisher of a worker in the same process, when it has one)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    publisher = outcomes() if outcomes is not None else None

    def families() -> Iterable[object]:
        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield counter(
            "topiq_mqtt_messages_received", "MQTT messages that reached the app.", stats.received
        )
        yield counter(
            "topiq_mqtt_messages_handled",
            "MQTT messages whose handler returned normally.",
            stats.handled,
        )
        yield counter(
            "topiq_mqtt_messages_failed",
            "MQTT messages whose handler (or a middleware) raised.",
            stats.failed,
        )
        yield from _outcome_families(publisher)
        yield gauge(
            "topiq_mqtt_unacked_messages",
            "MQTT messages received and not yet acknowledged.",
            stats.unacked,
        )
        yield gauge(
            "topiq_mqtt_connected", "1 while connected to the broker.", 1 if stats.connected else 0
        )
        yield gauge(
            "topiq_mqtt_spool_depth", "Jobs in the offline spool right now.", stats.spool_depth
        )
        yield counter("topiq_mqtt_spooled", "Jobs written to the offline spool.", stats.spooled)
        yield counter(
            "topiq_mqtt_replayed",
            "Spooled jobs pushed to their queue once it answered again.",
            stats.replayed,
        )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reader(families))  # type: ignore[arg-type]
    return generate_latest(registry)


def _outcome_families(publisher: OutcomePublisher | None) -> Iterable[object]:
    from prometheus_client.core import CounterMetricFamily

    published = publisher.published if publisher is not None else 0
    not_published = publisher.failed + publisher.dropped if publisher is not None else 0
    yield CounterMetricFamily(
        "topiq_mqtt_messages_published",
        "Job outcomes published over MQTT by this process.",
        value=published,
    )
    yield CounterMetricFamily(
        "topiq_mqtt_publish_failed",
        "Job outcomes this process could not publish over MQTT (failed or dropped).",
        value=not_published,
    )


def outcome_metrics(publisher: OutcomePublisher | None) -> bytes:
    """The outcome publisher's counters alone (a worker process without the MQTT app)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reader(lambda: _outcome_families(publisher)))  # type: ignore[arg-type]
    return generate_latest(registry)
