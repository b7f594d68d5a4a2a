"""`--metrics-port` on real processes, scraped over HTTP and read with prometheus_client's
parser (issue #15 §3).

* a `queue:work` process on Redis, SQLite and MariaDB: scraped while a job holds its slot
  (running gauge, reserved depth) and after every job ended, the counters match the jobs its
  log says it ran;
* the MQTT app (`serve`) on the session's Mosquitto: messages in are counted, a message held by
  its handler is counted as not acknowledged, the jobs it dispatched are counted; with Redis
  stopped the scrape still answers at once (`topiq_backend_up 0`) and counts the spool;
* `docs/examples/prometheus_alerts.yml` and the guide's `metrics` section name only series a
  real scrape has;
* a port already in use stops either command at start with a clear error.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.queue.queue_manager import QueueManager
from tests.conftest import ROOT, Backend, guide_section
from tests.jobs import FlakyJob, RecordJob, events
from tests.metrics_jobs import GateJob
from tests.mqtt.conftest import AppProcess, Broker, broker, mosquitto_pub
from tests.processes import WorkerProcess, wait_until
from tests.servers import free_port
from tests.test_worker_processes import PrivateRedis

__all__ = ["broker"]  # the fixture, from tests/mqtt/conftest.py

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

ALERTS = ROOT / "docs" / "examples" / "prometheus_alerts.yml"


# -- reading a scrape -------------------------------------------------------------------------


class Scrape:
    """One `/metrics` answer, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def names(self) -> set[str]:
        """Every name a query can use: the samples' and, for a labelled series with no sample
        yet, those its declared type gives (`x_total`; `x_bucket`, `x_count`, `x_sum`)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        declared = {
            f"{f.name}{suffix}" for f in self.families for suffix in suffixes.get(f.type, ("",))
        }
        return declared | {f.name for f in self.families} | {s.name for s in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def scrape(port: int) -> Scrape:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def health(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)


def answers(port: int) -> bool:
    try:
        return health(port).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def scrape_until(
    port: int, check: Callable[[Scrape], bool], what: str, timeout: float = 60
) -> Scrape:
    """Scrape until `check` holds (the counts come from another process)."""
    seen: list[Scrape] = []

    def ready() -> bool:
        seen.append(scrape(port))
        return check(seen[-1])

    try:
        wait_until(ready, timeout, what)
    except AssertionError:
        raise AssertionError(f"{what}; last scrape:\n{seen[-1].text if seen else '-'}") from None
    return seen[-1]


# -- a worker process ---------------------------------------------------------------------------


def _open_gate(gate: Path) -> None:
    """Let a gate job still waiting end (its reader gets end of file); no-op otherwise."""
    try:
        fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader waits
        return
    os.close(fd)


async def test_worker_process_counts_the_jobs_it_runs(
    server_backend: Backend, tmp_path: Path
) -> None:
    backend = server_backend
    settings = backend.settings()
    queue = settings.queue_default
    log = str(tmp_path / "jobs.log")
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    port = free_port()
    # Leases keep their default margin (10 s, not the tests' 2): on a busy machine SQLite's
    # writer lock is sometimes held past 2 s, and the gate job's lease would run out (its job
    # then counts as pending again) while the test looks at it.
    env = {**backend.env(), "QUEUE_LEASE_MARGIN": "10"}
    worker = WorkerProcess(
        ["--metrics-port", str(port), "--concurrency", "2"], env, tmp_path / "w.log"
    )
    try:
        await asyncio.to_thread(wait_until, lambda: answers(port), 60, "the metrics endpoint")
        assert health(port).status_code in (200, 503)  # 503 until its first heartbeat
        async with QueueManager(settings) as manager:
            await manager.push(GateJob(log, str(gate)))
            await asyncio.to_thread(
                wait_until, lambda: bool(events(log, "gate-start")), 60, "the gate job to start"
            )
            for n in range(10):
                await manager.push(RecordJob(log, n))
            for _ in range(3):
                await manager.push(FlakyJob(log))

            record, flaky = "tests.jobs:RecordJob", "tests.jobs:FlakyJob"
            gated = "tests.metrics_jobs:GateJob"
            # Mid-run: the gate job holds one slot; the others went through the other one.
            mid = await asyncio.to_thread(
                scrape_until,
                port,
                lambda s: (
                    s.value("topiq_jobs_succeeded_total", job=record) == 10
                    and s.value("topiq_jobs_failed_total", job=flaky) == 3
                    # acknowledgements are sent in batches: the ended jobs leave soon after
                    and s.value("topiq_queue_jobs", queue=queue, state="reserved") == 1
                ),
                "the record and flaky jobs to end and be acknowledged",
            )
            assert mid.value("topiq_worker_running_jobs") == 1
            assert mid.value("topiq_jobs_started_total", queue=queue, job=gated) == 1
            assert mid.value("topiq_jobs_processed_total", job=gated) == 0
            assert mid.value("topiq_queue_jobs", queue=queue, state="pending") == 0

            await asyncio.to_thread(gate.write_bytes, b"go")
            final = await asyncio.to_thread(
                scrape_until,
                port,
                lambda s: (
                    s.value("topiq_jobs_succeeded_total", job=gated) == 1
                    and s.value("topiq_worker_running_jobs") == 0
                    and s.value("topiq_queue_jobs", queue=queue, state="reserved") == 0
                ),
                "the gate job to end",
            )
    finally:
        _open_gate(gate)
        worker.signal(signal.SIGTERM)
        code = worker.wait(60)
    assert code == 0, worker.output[-3000:]

    # The counts match what the jobs themselves logged.
    runs, tries = len(events(log, "run")), len(events(log, "try"))
    assert (runs, tries) == (10, 9)
    v = final.value
    assert v("topiq_jobs_started_total", queue=queue, job=record) == runs
    assert v("topiq_jobs_started_total", queue=queue, job=flaky) == tries
    assert v("topiq_jobs_processed_total", queue=queue) == runs + tries + 1
    assert v("topiq_jobs_succeeded_total", queue=queue) == runs + 1
    assert v("topiq_jobs_retried_total", queue=queue, job=flaky) == tries - 3
    assert v("topiq_jobs_failed_total", queue=queue, job=flaky) == len(events(log, "failed"))
    assert v("topiq_jobs_cancelled_total") == v("topiq_jobs_expired_total") == 0
    assert v("topiq_jobs_dispatched_total") == 0  # the test process dispatched them
    assert v("topiq_job_run_seconds_count", queue=queue) == runs + tries + 1
    assert v("topiq_job_wait_seconds_count", queue=queue) == 10 + 3 + 1  # first tries only
    assert v("topiq_job_run_seconds_bucket", queue=queue, job=record, le="+Inf") == runs
    # The backend gauges, read at scrape time.
    assert v("topiq_backend_up", connection=backend.connection) == 1
    assert v("topiq_failed_jobs", connection=backend.connection, queue=queue) == 3
    assert v("topiq_queue_paused", queue=queue) == 0
    assert v("topiq_workers", connection=backend.connection) == 1
    for state in ("pending", "delayed", "reserved", "deferred"):
        assert v("topiq_queue_jobs", queue=queue, state=state) == 0
    # Only the two bounded labels on the job series.
    for sample in final.samples:
        if sample.name.startswith(("topiq_jobs_", "topiq_job_")):
            assert set(sample.labels) - {"le"} == {"queue", "job"}, sample


# -- the MQTT app -------------------------------------------------------------------------------


@pytest.fixture
def app_env(broker: Broker, redis_url: str, tmp_path: Path) -> dict[str, str]:
    queue = f"q-{uuid.uuid4().hex[:10]}"
    return broker.env(
        QUEUE_CONNECTION="redis",
        REDIS_URL=redis_url,
        QUEUE_DEFAULT=queue,
        METRICS_TEST_LOG=str(tmp_path / "jobs.log"),
        MQTT_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )


@pytest.mark.mqtt
@pytest.mark.redis
async def test_mqtt_app_counts_messages_and_unacknowledged(
    broker: Broker, app_env: dict[str, str]
) -> None:
    queue = app_env["QUEUE_DEFAULT"]
    run = uuid.uuid4().hex[:10]
    port = free_port()
    app = await AppProcess(
        ["serve", "--app", "tests.metrics_jobs:app", "--metrics-port", str(port)], app_env
    ).start()
    try:
        await app.wait_for_line("connected to the MQTT broker")
        await mosquitto_pub(
            broker, f"topiq-test/{run}/in", lines=[f'{{"n": {n}}}' for n in range(7)]
        )
        done = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_mqtt_messages_handled_total") == 7,
            "7 messages handled",
        )
        assert done.value("topiq_mqtt_messages_received_total") == 7
        assert done.value("topiq_mqtt_unacked_messages") == 0
        assert (
            done.value("topiq_jobs_dispatched_total", queue=queue, job="tests.jobs:RecordJob") == 7
        )
        # No worker: the 7 jobs wait in the queue, as the backend gauge reads it.
        waiting = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_queue_jobs", queue=queue, state="pending") == 7,
            "the 7 jobs waiting in the queue",
            10,
        )
        assert waiting.value("topiq_queue_jobs", queue=queue) == 7  # every state
        assert done.value("topiq_mqtt_connected") == 1
        assert health(port).status_code == 200, health(port).text

        await mosquitto_pub(
            broker, f"topiq-test/{run}/hold", lines=['{"h": 1}', '{"h": 2}', '{"h": 3}']
        )
        held = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_mqtt_messages_received_total") == 10,
            "the held messages received",
        )
        assert held.value("topiq_mqtt_unacked_messages") == 3
        assert held.value("topiq_mqtt_messages_handled_total") == 7

        await mosquitto_pub(broker, f"topiq-test/{run}/release", '{"go": 1}')
        released = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_mqtt_messages_handled_total") == 11,
            "the held messages handled",
        )
        assert released.value("topiq_mqtt_unacked_messages") == 0
        assert released.value("topiq_mqtt_messages_failed_total") == 0
        assert released.value("topiq_mqtt_messages_received_total") == 11
    finally:
        code = await app.stop()
    assert code == 0, app.log[-3000:]


@pytest.mark.mqtt
@pytest.mark.redis
@pytest.mark.slow
async def test_mqtt_app_scrape_through_a_backend_outage(broker: Broker, tmp_path: Path) -> None:
    """Redis stops: the scrape still answers at once with `topiq_backend_up 0`, the jobs of
    the messages go to the spool (counted, depth); Redis back: replayed, depth 0."""
    redis = PrivateRedis(tmp_path)
    await asyncio.to_thread(redis.start)
    queue = f"q-{uuid.uuid4().hex[:10]}"
    env = broker.env(
        QUEUE_CONNECTION="redis",
        REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        QUEUE_DEFAULT=queue,
        METRICS_TEST_LOG=str(tmp_path / "jobs.log"),
        MQTT_SPOOL_PATH=str(tmp_path / "spool.sqlite3"),
    )
    run = uuid.uuid4().hex[:10]
    port = free_port()
    app = await AppProcess(
        ["serve", "--app", "tests.metrics_jobs:app", "--metrics-port", str(port)], env
    ).start()
    try:
        await app.wait_for_line("connected to the MQTT broker")
        await mosquitto_pub(broker, f"topiq-test/{run}/in", lines=['{"n": 1}', '{"n": 2}'])
        await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_queue_jobs", queue=queue, state="pending") == 2,
            "2 jobs in Redis",
        )
        await asyncio.to_thread(redis.kill)
        await mosquitto_pub(
            broker, f"topiq-test/{run}/in", lines=[f'{{"n": {n}}}' for n in range(3, 7)]
        )
        down = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_mqtt_spooled_total") == 4,
            "4 jobs spooled",
        )
        begun = time.monotonic()
        down = await asyncio.to_thread(scrape, port)
        took = time.monotonic() - begun
        print(f"scrape with Redis stopped: {took:.2f}s")
        assert took < 5
        assert down.value("topiq_backend_up", connection="redis") == 0
        assert down.value("topiq_mqtt_spool_depth") == 4
        assert down.value("topiq_mqtt_messages_handled_total") == 6
        assert down.value("topiq_mqtt_replayed_total") == 0
        assert (await asyncio.to_thread(health, port)).status_code == 503

        await asyncio.to_thread(redis.start)
        back = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: (
                s.value("topiq_mqtt_replayed_total") == 4 and s.value("topiq_mqtt_spool_depth") == 0
            ),
            "the spool replayed",
        )
        back = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_queue_jobs", queue=queue, state="pending") == 6,
            "6 jobs in Redis",
        )
        assert back.value("topiq_backend_up", connection="redis") == 1
        assert (await asyncio.to_thread(health, port)).status_code == 200
    finally:
        code = await app.stop()
        await asyncio.to_thread(redis.kill)
    assert code == 0, app.log[-3000:]


# -- the documented names against a real scrape ---------------------------------------------------


def _promql_names(expr: str) -> set[str]:
    return set(re.findall(r"\btopiq_[a-z_]+\b", expr))


@pytest.mark.mqtt
@pytest.mark.redis
async def test_alert_rules_and_guide_name_real_series(
    broker: Broker, app_env: dict[str, str]
) -> None:
    """`serve --worker` has every series in one scrape (worker, backend and MQTT)."""
    port = free_port()
    app = await AppProcess(
        ["serve", "--app", "tests.metrics_jobs:app", "--worker", "--metrics-port", str(port)],
        app_env,
    ).start()
    try:
        await app.wait_for_line("connected to the MQTT broker")
        await mosquitto_pub(broker, f"topiq-test/{uuid.uuid4().hex[:8]}/in", '{"n": 1}')
        job = "tests.jobs:RecordJob"
        done = await asyncio.to_thread(
            scrape_until,
            port,
            lambda s: s.value("topiq_jobs_succeeded_total", job=job) == 1,
            "the message's job to run",
        )
        assert done.value("topiq_jobs_processed_total", job=job) == 1
        real = done.names()
    finally:
        assert await app.stop() == 0, app.log[-3000:]

    text = ALERTS.read_text()
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", text, re.MULTILINE))
    assert {"TopiqBacklogGrowing", "TopiqJobFailureRate", "TopiqNoLiveWorker"} <= alerts
    used = _promql_names(text)
    assert used, "the rules use no topiq series"
    assert used <= real, f"alert rules name series no scrape has: {sorted(used - real)}"

    guide = guide_section("observing.md", "metrics")
    named = _promql_names(guide)
    assert named <= real, f"the guide names series no scrape has: {sorted(named - real)}"
    families = {f.name for f in done.families if f.name.startswith("topiq_")}
    missing = {f for f in families if f not in named and f"{f}_total" not in named}
    assert not missing, f"series the guide does not list: {sorted(missing)}"


# -- a port already in use ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["queue:work", "serve"])
def test_port_in_use_fails_at_start(command: str, broker: Broker, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), command, "--metrics-port", str(port)],
            cwd=ROOT,
            env=broker.env(QUEUE_CONNECTION="memory", MQTT_SPOOL_PATH=str(tmp_path / "s.db")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--metrics-port {port}: the port is already in use" in done.stderr
    assert "Traceback" not in done.stderr
