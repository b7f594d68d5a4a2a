"""Prometheus metrics in process (issue #15 §3): the job counters follow the event stream, the
backend gauges read every driver at scrape time, a backend that does not answer is reported
without hanging the scrape, and the endpoint's `/health`, port errors and signal handling.
The same over HTTP on real processes: tests/test_metrics_processes.py."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import metrics
from core.events import EventKind, JobEvent, events
from core.health import Health
from core.observe_http import EndpointError, serve_endpoint, worker_endpoint
from core.queue.queue_manager import QueueManager
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, make_settings
from tests.jobs import FlakyJob, RecordJob, SleepJob


def value(text: bytes | str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    raw = text.decode() if isinstance(text, bytes) else text
    return sum(
        s.value
        for family in text_string_to_metric_families(raw)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.log")


class Heard:
    """The job events of this process, recorded, with a way to await one."""

    def __init__(self) -> None:
        self.events: list[JobEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: JobEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, kind: EventKind, job_id: str) -> None:
        while not any(e.kind is kind and e.job_id == job_id for e in self.events):
            self._changed.clear()
            await self._changed.wait()


@pytest.fixture
def heard() -> Iterator[Heard]:
    listener = Heard()
    stop = events.subscribe(listener)
    yield listener
    stop()


async def work(manager: QueueManager, queue: str) -> Worker:
    worker = Worker(
        manager,
        WorkerOptions(queues=(queue,), sleep=0.05, handle_signals=False, stop_when_empty=True),
    )
    await asyncio.wait_for(worker.run(), 30)
    return worker


# -- job counters from the event stream -------------------------------------------------------


async def test_job_counters_follow_the_event_stream(tmp_path: Path, log: str, heard: Heard) -> None:
    metrics.install()
    metrics.install()  # idempotent: each event still counts once
    queue = f"q-{uuid.uuid4().hex[:8]}"
    settings = make_settings(queue_connection="memory", queue_default=queue)
    async with QueueManager(settings) as manager:
        for n in range(4):
            await manager.push(RecordJob(log, n))
        await manager.push(FlakyJob(log))  # 3 tries, then failed for good
        await work(manager, queue)

        slow = await manager.push(SleepJob(log, 60))
        worker = Worker(manager, WorkerOptions(queues=(queue,), sleep=0.05, handle_signals=False))
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(heard.until(EventKind.STARTED, str(slow)), 10)
        assert await slow.cancel() is True
        await asyncio.wait_for(heard.until(EventKind.CANCELLED, str(slow)), 10)
        worker.stop()
        await asyncio.wait_for(task, 30)

    text = metrics.job_metrics()
    record, flaky, sleep = "tests.jobs:RecordJob", "tests.jobs:FlakyJob", "tests.jobs:SleepJob"
    assert value(text, "topiq_jobs_dispatched_total", queue=queue) == 6
    assert value(text, "topiq_jobs_started_total", queue=queue, job=record) == 4
    assert value(text, "topiq_jobs_succeeded_total", queue=queue, job=record) == 4
    assert value(text, "topiq_jobs_started_total", queue=queue, job=flaky) == 3
    assert value(text, "topiq_jobs_retried_total", queue=queue, job=flaky) == 2
    assert value(text, "topiq_jobs_failed_total", queue=queue, job=flaky) == 1
    assert value(text, "topiq_jobs_expired_total", queue=queue) == 0
    assert value(text, "topiq_jobs_cancelled_total", queue=queue, job=sleep) == 1
    # Tries that ended: 4 + 3 + the cancelled run.
    assert value(text, "topiq_jobs_processed_total", queue=queue) == 8
    assert value(text, "topiq_job_run_seconds_count", queue=queue) == 8
    # The wait histogram has the first tries: 4 records, the flaky job, the slow one.
    assert value(text, "topiq_job_wait_seconds_count", queue=queue) == 6
    waits = [e.waited for e in heard.events if e.kind is EventKind.STARTED and e.queue == queue]
    assert value(text, "topiq_job_wait_seconds_sum", queue=queue) == pytest.approx(
        sum(w for w in waits if w is not None)
    )


async def test_ends_without_a_run_are_not_processed_tries() -> None:
    """An expired job, a job cancelled before it started and one handed back unstarted
    never ran: counted as what they are, not as tries (the worker emits these when its
    backend hands it an expired job, or on cancel or stop; emitted here directly)."""
    metrics.install()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    for kind in (EventKind.EXPIRED, EventKind.CANCELLED, EventKind.RETURNED):
        events.emit(JobEvent(kind, "j", queue, "memory", job="a:B"))
    events.emit(JobEvent(EventKind.RETURNED, "k", queue, "memory", job="a:B", duration=2.0))
    text = metrics.job_metrics()
    assert value(text, "topiq_jobs_expired_total", queue=queue) == 1
    assert value(text, "topiq_jobs_cancelled_total", queue=queue) == 1
    assert value(text, "topiq_jobs_processed_total", queue=queue) == 1  # the returned run
    assert value(text, "topiq_job_run_seconds_count", queue=queue) == 1


async def test_uninstall_stops_counting() -> None:
    metrics.install()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    event = JobEvent(EventKind.SUCCEEDED, "j", queue, "memory", job="a:B", duration=0.5)
    events.emit(event)
    metrics.uninstall()
    try:
        events.emit(event)
    finally:
        metrics.install()
    text = metrics.job_metrics()
    assert value(text, "topiq_jobs_succeeded_total", queue=queue) == 1
    assert value(text, "topiq_job_run_seconds_sum", queue=queue) == 0.5
    assert value(text, "topiq_job_run_seconds_bucket", queue=queue, le="0.25") == 0
    assert value(text, "topiq_job_run_seconds_bucket", queue=queue, le="0.5") == 1


# -- backend gauges on every driver -------------------------------------------------------------


async def test_backend_metrics_read_every_driver(backend: Backend, log: str) -> None:
    settings = backend.settings()
    queue = settings.queue_default
    other = f"{queue}-paused"
    async with QueueManager(settings) as manager:
        for n in range(3):
            await manager.push(RecordJob(log, n))
        await manager.push(RecordJob(log, 9), delay=3600)
        await manager.push(RecordJob(log, 7), queue=other)
        await manager.push(FlakyJob(log), queue=other)
        worker = Worker(
            manager,
            WorkerOptions(queues=(other,), sleep=0.05, handle_signals=False, stop_when_empty=True),
        )
        await asyncio.wait_for(worker.run(), 30)  # one succeeds, the flaky one fails
        driver = await manager.connection()
        await driver.pause(other)

        started_at = time.monotonic()
        first = await metrics.backend_metrics([driver], queues=[queue, other])
        second = await metrics.backend_metrics([driver], queues=[queue, other])
        took = time.monotonic() - started_at

    name = backend.connection
    assert first.decode().splitlines() == second.decode().splitlines()  # a fresh registry each
    assert value(first, "topiq_backend_up", connection=name) == 1
    assert value(first, "topiq_queue_jobs", connection=name, queue=queue, state="pending") == 3
    assert value(first, "topiq_queue_jobs", connection=name, queue=queue, state="delayed") == 1
    assert value(first, "topiq_queue_jobs", connection=name, queue=queue, state="reserved") == 0
    assert value(first, "topiq_queue_jobs", connection=name, queue=queue, state="deferred") == 0
    assert value(first, "topiq_queue_jobs", connection=name, queue=other) == 0
    assert value(first, "topiq_failed_jobs", connection=name, queue=queue) == 0
    assert value(first, "topiq_failed_jobs", connection=name, queue=other) == 1
    assert value(first, "topiq_queue_paused", connection=name, queue=queue) == 0
    assert value(first, "topiq_queue_paused", connection=name, queue=other) == 1
    assert value(first, "topiq_workers", connection=name) == 0  # the worker has stopped
    print(f"two backend scrapes on {backend.kind}: {took * 1000:.0f} ms")


async def test_backend_metrics_default_to_every_queue_seen(log: str) -> None:
    settings = make_settings(queue_connection="memory")
    async with QueueManager(settings) as manager:
        await manager.push(RecordJob(log), queue="alpha")
        await manager.push(RecordJob(log), queue="beta")
        text = await metrics.backend_metrics([await manager.connection()])
    assert value(text, "topiq_queue_jobs", queue="alpha", state="pending") == 1
    assert value(text, "topiq_queue_jobs", queue="beta", state="pending") == 1


# -- a backend that does not answer --------------------------------------------------------------


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers (a hung backend)."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_a_backend_that_does_not_answer_is_reported_in_time(silent_port: int) -> None:
    settings = make_settings(
        queue_connection="redis", redis_url=f"redis://127.0.0.1:{silent_port}/0"
    )
    metrics.install()
    manager = QueueManager(settings)
    worker = Worker(manager, WorkerOptions(queues=("default",), handle_signals=False))
    async with worker_endpoint(worker, "127.0.0.1", 0) as port, httpx.AsyncClient() as client:
        begun = time.monotonic()
        scraped = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        took = time.monotonic() - begun
        checked = await client.get(f"http://127.0.0.1:{port}/health", timeout=30)
    with_close = asyncio.wait_for(manager.close(), 10)
    await asyncio.gather(with_close, return_exceptions=True)
    print(f"scrape with a silent backend: {took:.2f}s")
    assert scraped.status_code == 200
    assert took < metrics.BACKEND_TIMEOUT + 2
    assert value(scraped.text, "topiq_backend_up", connection="redis") == 0
    assert "topiq_jobs_succeeded_total" in scraped.text  # the rest of the scrape is there
    assert value(scraped.text, "topiq_worker_running_jobs") == 0
    assert checked.status_code == 503
    assert checked.json()["backend"] is False and checked.json()["ok"] is False


# -- the endpoint --------------------------------------------------------------------------------


async def test_health_answers_200_when_ok_and_503_otherwise() -> None:
    state = {"now": Health(True, "memory", True, 2)}

    async def check() -> Health:
        return state["now"]

    async def render() -> bytes:
        return b"# nothing\n"

    async with (
        serve_endpoint("127.0.0.1", 0, metrics=render, health=check) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        ok = await client.get("/health")
        state["now"] = Health(False, "memory", True, 0, "no live worker on connection 'memory'")
        down = await client.get("/health")
        page = await client.get("/metrics")
        missing = await client.get("/nothing")
    assert (ok.status_code, ok.json()) == (200, Health(True, "memory", True, 2).to_dict())
    assert down.status_code == 503 and down.json()["error"].startswith("no live worker")
    assert page.headers["content-type"] == metrics.CONTENT_TYPE
    assert missing.status_code == 404


async def test_a_port_in_use_is_a_clear_error() -> None:
    async def render() -> bytes:
        return b""

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(EndpointError, match=f"--metrics-port {port}: the port is already"):
            async with serve_endpoint("127.0.0.1", port, metrics=render):
                pass


async def test_the_endpoint_leaves_signal_handlers_alone() -> None:
    """uvicorn's own `serve()` would take SIGTERM/SIGINT from the worker."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    async def render() -> bytes:
        return b""

    async with serve_endpoint("127.0.0.1", 0, metrics=render) as port:
        during = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 200
    assert during == before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
