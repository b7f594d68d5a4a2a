"""Real worker processes on `QUEUE_CONNECTION=amqp` (issue #18): what only processes show.

The broker's own acknowledgement is the lease here, so a worker killed with -9 gives its jobs
back the moment its connection drops (no lease to wait out), and the broker counts the
redelivery (`x-delivery-count`): the try is spent, as a lost lease spends it elsewhere. A clean
stop must spend nothing, including for deliveries prefetched but never started.

Each test has a queue and a prefix of its own on the session's private RabbitMQ node
(tests/servers.py), whose queues of that prefix it deletes when it ends; the companion
store is the session's Redis (one test also runs on SQLite, the default `AMQP_STORE=database`).
The consumer_timeout tests start a broker of their own whose `consumer_timeout` is 3 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.delays import Delay
from core.job import Job
from core.queue.drivers.amqp_connect import Names
from core.queue.drivers.base import ReservedJob
from core.queue.queue_manager import QueueManager
from core.worker.options import ExitCode
from tests.conftest import ON_CI, Backend
from tests.jobs import RecordJob, SleepJob, events, record
from tests.processes import ROOT, WorkerProcess, wait_until, workers
from tests.servers import PrivateRabbit, start_rabbitmq

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]


# -- brokers ----------------------------------------------------------------------------------


def need(rabbit: PrivateRabbit | None) -> PrivateRabbit:
    """The broker, or a skip (a failure on CI) when RabbitMQ is not installed."""
    if rabbit is None:
        message = "rabbitmq-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    return rabbit


def broker_log(rabbit: PrivateRabbit) -> str:
    """What the node wrote to its log files so far."""
    logs = sorted((rabbit.workdir / "log").glob("*.log"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


@pytest.fixture(scope="module")
def broker(rabbitmq: PrivateRabbit | None) -> PrivateRabbit:
    """The session's private RabbitMQ node (tests/conftest.py `rabbitmq`)."""
    if rabbitmq is None:
        pytest.skip("these tests run on the session's own node, not on TOPIQ_TEST_AMQP_URL")
    return rabbitmq


def amqp_backend(
    rabbit: PrivateRabbit, store: str, request: pytest.FixtureRequest, tmp: Path
) -> Backend:
    """A backend on `rabbit` with a queue and prefix of the test's own; the test's queues are
    deleted when it ends (a quorum queue is a consensus group of processes and files)."""
    overrides: dict[str, Any] = {
        "queue_default": f"q-{uuid.uuid4().hex[:10]}",
        "amqp_url": rabbit.url,
        "amqp_prefix": f"t{uuid.uuid4().hex[:8]}",
    }
    if store == "redis":
        overrides.update(amqp_store="redis", redis_url=request.getfixturevalue("redis_url"))
    else:
        overrides.update(amqp_store="database", db_url=f"sqlite+aiosqlite:///{tmp}/store.db")
    request.addfinalizer(lambda: rabbit.delete_queues(overrides["amqp_prefix"]))
    return Backend("amqp", overrides)


@pytest.fixture
def backend(broker: PrivateRabbit, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return amqp_backend(broker, "redis", request, tmp_path)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


# -- helpers ----------------------------------------------------------------------------------


def send(backend: Backend, jobs: list[Job], delay: Delay | None = None) -> list[str]:
    async def go() -> list[str]:
        async with QueueManager(backend.settings()) as manager:
            return [str(h) for h in await manager.bulk(jobs, delay=delay)]

    return asyncio.run(go())


def size(backend: Backend) -> int:
    async def go() -> int:
        async with QueueManager(backend.settings()) as manager:
            return await manager.size(manager.settings.queue_default)

    return asyncio.run(go())


def take_one(backend: Backend, timeout: float = 30) -> ReservedJob:
    """Reserve the next job of the backend's queue in this process (waiting for the broker's
    delivery), and give it back unspent before closing."""

    async def go() -> ReservedJob:
        async with QueueManager(backend.settings()) as manager:
            driver = await manager.connection()
            name = manager.settings.queue_default
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                got = await driver.reserve([name], 1, lease=30)
                if got:
                    await driver.release(got[0], 0, refund=True)
                    return got[0]
                await driver.wait([name], 1)
            raise AssertionError(f"nothing to reserve in {name} within {timeout}s")

    return asyncio.run(go())


def started(worker: WorkerProcess) -> bool:
    return "starting:" in worker.output


def consumers(backend: Backend) -> int:
    """How many consumers the broker counts on the backend's work queue now (0 before a worker
    declared it). A worker logs "starting:" before its first `reserve`, which is what starts
    its consumer: until then the broker hands every job to the workers already consuming."""
    import aio_pika
    from aio_pika.exceptions import ChannelClosed

    name = Names(backend.overrides["amqp_prefix"]).work(backend.overrides["queue_default"])

    async def go() -> int:
        connection = await aio_pika.connect(backend.overrides["amqp_url"])
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except ChannelClosed:  # not declared yet: no worker reserved from it
                return 0
            return queue.declaration_result.consumer_count or 0

    return asyncio.run(go())


def cli(env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    return done.returncode, out


class SwitchJob(Job):
    """Fails while the file `switch` exists; records every try and its final failure."""

    max_tries = 3
    retry_after = (0.5, 1.0)

    def __init__(self, log: str, switch: str) -> None:
        self.log = log
        self.switch = switch

    def handle(self) -> None:  # type: ignore[override]  # a thread: it reads a file
        record(self.log, event="try", attempts=self.attempts, id=self.job_id)
        if Path(self.switch).exists():
            raise ValueError(f"switched off on try {self.attempts}")
        record(self.log, event="done", attempts=self.attempts)

    async def failed(self, exception: BaseException) -> None:
        record(self.log, event="failed", attempts=self.attempts, error=str(exception))


# -- the tests --------------------------------------------------------------------------------


def test_two_workers_run_600_jobs_exactly_once(backend: Backend, log: str, tmp_path: Path) -> None:
    with workers(2, ["--concurrency", "8"], backend.env(), tmp_path) as procs:
        # Both consuming before the jobs come: on a loaded machine one worker could otherwise
        # run all 600 before the other's first `reserve`.
        wait_until(lambda: consumers(backend) >= 2, 60, "both workers to consume")
        send(backend, [RecordJob(log, n) for n in range(600)])
        wait_until(lambda: len(events(log, "run")) >= 600, 120, "600 jobs to run")
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, proc.output[-3000:]
    runs = events(log, "run")
    counts = Counter(e["n"] for e in runs)
    # What to look at when it fails: tries above 1 mean a lease lapsed (or a delivery came
    # back) in a worker; the worker logs say which.
    seen = (Counter(e["attempts"] for e in runs), [p.output[-2000:] for p in procs])
    assert sorted(counts) == list(range(600)), seen
    assert set(counts.values()) == {1}, ({n: c for n, c in counts.items() if c > 1}, seen)
    assert len({e["pid"] for e in runs}) == 2, seen  # both took work
    assert size(backend) == 0


def test_kill_9_mid_job_the_job_is_back_at_once_and_the_broker_counts_the_try(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    """The amqp side of tests/test_worker_processes.py's kill -9 test (which runs on amqp
    too, with a short lease): here the job's timeout, and so any lease, is far longer than the
    test may wait, so it can only be back because the broker took the delivery back when the
    worker's connection dropped. No retry copy was published (no `x-topiq-tries`): its try
    number 2 comes from the broker's `x-delivery-count`."""
    slow = SleepJob(log, seconds=60, n=0)
    slow.max_tries = 3
    slow.timeout = 600
    send(backend, [slow])
    first = WorkerProcess([], backend.env(), tmp_path / "first.log")
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the job to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    again = take_one(backend, timeout=60)  # a lease would hold it for 600 s
    assert again.attempts == 2
    assert [e["attempts"] for e in events(log, "start")] == [1]


def test_kill_9_on_the_last_try_sends_the_job_to_the_failed_store(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    """max_tries = 1 and its worker killed mid-run: the redelivery is a second try, over the
    limit: the job is failed (failed() called, listed by queue:failed), not run again."""
    slow = SleepJob(log, seconds=30, n=7)
    slow.max_tries = 1
    slow.timeout = 60
    [job_id] = send(backend, [slow])
    first = WorkerProcess([], backend.env(), tmp_path / "first.log")
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the job to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    with workers(1, [], backend.env(), tmp_path) as [second]:
        wait_until(lambda: bool(events(log, "failed")), 60, "the job to be failed")
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.output[-3000:]
    assert len(events(log, "start")) == 1
    rc, out = cli(
        backend.env(), "queue:failed", "--json", "--queue", backend.overrides["queue_default"]
    )
    assert rc == 0 and job_id in out, out


def test_sigterm_lets_short_jobs_finish_and_returns_long_ones_unspent(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    short, long = SleepJob(log, 0.5, n=1), SleepJob(log, 60, n=2)
    long.timeout = short.timeout = 120
    send(backend, [short, long])
    args = ["--concurrency", "2", "--grace", "1.5"]
    with workers(1, args, backend.env(), tmp_path) as [proc]:
        wait_until(lambda: len(events(log, "start")) == 2, 60, "both jobs to start")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == ExitCode.OK, proc.output[-3000:]
        assert "returned to its queue" in proc.output
    assert [e["n"] for e in events(log, "end")] == [1]
    again = take_one(backend)
    assert again.attempts == 1  # the interrupted try was not spent
    assert size(backend) == 1  # and it is still there, once


def test_max_jobs_stops_after_n_and_a_clean_stop_spends_no_try(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    """--max-jobs 5 with --concurrency 4: the worker exits 0 after 5 runs (maybe a few more
    started beside the fifth); what it had prefetched but not started goes back unspent: the
    next worker runs every other job once, on its first try (max_tries = 1 would fail any
    job whose try was burnt by the stop)."""
    jobs = [RecordJob(log, n) for n in range(40)]
    for job in jobs:
        job.max_tries = 1
    send(backend, jobs)  # type: ignore[arg-type]
    with workers(1, ["--max-jobs", "5", "--concurrency", "4"], backend.env(), tmp_path) as [w]:
        assert w.wait(60) == 0, w.output[-3000:]
    first = len(events(log, "run"))
    assert 5 <= first <= 8
    with workers(1, ["--concurrency", "4"], backend.env(), tmp_path) as [again]:
        wait_until(lambda: len(events(log, "run")) >= 40, 60, "the other jobs to run")
        again.signal(signal.SIGTERM)
        assert again.wait(30) == 0, again.output[-3000:]
    counts = Counter(e["n"] for e in events(log, "run"))
    assert counts == {n: 1 for n in range(40)}
    assert {e["attempts"] for e in events(log, "run")} == {1}
    assert size(backend) == 0


def test_delayed_jobs_run_not_before_their_delay(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    """Delays of 0.3 s to 5 s (one router hop per set bit of the remaining milliseconds)."""
    delays = [0.3, 1.0, 2.5, 5.0]
    with workers(1, ["--concurrency", "4"], backend.env(), tmp_path) as [proc]:
        wait_until(lambda: started(proc), 60, "the worker to start")
        sent: dict[int, float] = {}
        for n, delay in enumerate(delays):
            sent[n] = time.time()
            send(backend, [RecordJob(log, n)], delay=delay)
        wait_until(lambda: len(events(log, "run")) >= len(delays), 60, "the delayed jobs")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output[-3000:]
    runs = {e["n"]: e for e in events(log, "run")}
    assert sorted(runs) == list(range(len(delays)))
    for n, delay in enumerate(delays):
        assert runs[n]["t"] >= sent[n] + delay, (n, runs[n]["t"] - sent[n])
        assert runs[n]["attempts"] == 1


@pytest.mark.parametrize("store", ["redis", "sqlite"])
def test_retries_back_off_then_the_failed_store_then_queue_retry(
    broker: PrivateRabbit, store: str, request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    """Three tries 0.5 s and then 1 s apart (retry_after), failed() once, listed by
    queue:failed; queue:retry puts it back with its tries reset and it runs again."""
    backend = amqp_backend(broker, store, request, tmp_path)
    queue = backend.overrides["queue_default"]
    switch = tmp_path / "failing"
    switch.touch()
    [job_id] = send(backend, [SwitchJob(log, str(switch))])
    with workers(1, ["--concurrency", "2"], backend.env(), tmp_path) as [proc]:
        wait_until(lambda: bool(events(log, "failed")), 60, "the job to fail for good")
        tries = events(log, "try")
        assert [e["attempts"] for e in tries] == [1, 2, 3]
        assert tries[1]["t"] - tries[0]["t"] >= 0.5
        assert tries[2]["t"] - tries[1]["t"] >= 1.0
        assert [e["attempts"] for e in events(log, "failed")] == [3]
        rc, out = cli(backend.env(), "queue:failed", "--json", "--queue", queue)
        assert rc == 0 and job_id in out, out
        switch.unlink()
        rc, out = cli(backend.env(), "queue:retry", job_id)
        assert rc == 0, out
        wait_until(lambda: bool(events(log, "done")), 60, "the retried job to run")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output[-3000:]
    assert [e["attempts"] for e in events(log, "done")] == [1]  # tries reset by the retry
    assert len(events(log, "failed")) == 1
    rc, out = cli(backend.env(), "queue:failed", "--json", "--queue", queue)
    assert rc == 0 and job_id not in out, out
    assert size(backend) == 0


# -- consumer_timeout ---------------------------------------------------------------------------

#: The private broker's consumer_timeout, and how often its channels check it (3.10 checks
#: each channel's oldest unacknowledged delivery every `channel_tick_interval`, 60 s by
#: default: a timeout is enforced between `timeout` and `timeout + tick` after the delivery).
#: With a 250 ms tick, a delivery held 3 s is refused by 3.25 s: an 8 s job is past it twice.
TIMEOUT_MS = 3000
TICK_MS = 250


@pytest.fixture(scope="module")
def short_timeout_broker() -> Iterator[PrivateRabbit]:
    broker = need(start_rabbitmq(consumer_timeout=TIMEOUT_MS, tick_ms=TICK_MS))
    try:
        yield broker
    finally:
        broker.stop()


def test_the_private_broker_really_enforces_its_short_consumer_timeout(
    short_timeout_broker: PrivateRabbit,
) -> None:
    """The control for the next test: a plain consumer holding a delivery past 3 s has its
    channel closed by the broker (PRECONDITION_FAILED) within the tick, and the message is
    delivered again. Without this, the next test could pass on a broker that never checks."""
    import aio_pika

    async def go() -> tuple[float, int]:
        connection = await aio_pika.connect(short_timeout_broker.url)
        async with connection:
            channel = await connection.channel()
            name = f"control-{uuid.uuid4().hex[:8]}"
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
            closed: asyncio.Future[float] = asyncio.get_running_loop().create_future()

            def on_close(*_: object) -> None:
                if not closed.done():
                    closed.set_result(time.monotonic())

            channel.close_callbacks.add(on_close)
            await channel.set_qos(prefetch_count=1)
            got = asyncio.get_running_loop().create_future()

            async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if not got.done():
                    got.set_result(time.monotonic())

            await queue.consume(hold)
            delivered = await asyncio.wait_for(got, 10)
            shut = await asyncio.wait_for(closed, TIMEOUT_MS / 1000 + 10)
            other = await connection.channel()
            again = await other.declare_queue(name, passive=True)
            returned = None
            deadline = time.monotonic() + 10
            while returned is None and time.monotonic() < deadline:
                returned = await again.get(no_ack=True, fail=False)
                if returned is None:
                    await asyncio.sleep(0.05)  # the return is asynchronous; nothing to await
            await other.queue_delete(name)
            count = 0 if returned is None else int(str(returned.headers.get("x-delivery-count", 0)))
            return shut - delivered, count

    held, count = asyncio.run(go())
    assert held >= TIMEOUT_MS / 1000 - 0.1
    assert count == 1  # back in its queue, its redelivery counted
    wait_until(  # the broker writes its log file a moment later
        lambda: "timed out waiting for delivery" in broker_log(short_timeout_broker),
        15,
        "the broker to log the timeout",
    )


def test_a_job_longer_than_the_consumer_timeout_is_not_run_twice(
    short_timeout_broker: PrivateRabbit, request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    """AMQP_CONSUMER_TIMEOUT matches the broker (3 s): every reservation is parked (its lease
    ends later than the timeout minus 60 s), the delivery acknowledged at once, so the broker
    never closes the channel on the 8 s job nor on the short jobs sharing it; each runs once,
    on its first try, and the parked copies come back from the ladder only to be dropped."""
    backend = amqp_backend(short_timeout_broker, "redis", request, tmp_path)
    backend.overrides["amqp_consumer_timeout"] = TIMEOUT_MS / 1000
    before = broker_log(short_timeout_broker).count("timed out waiting for delivery")
    long = SleepJob(log, seconds=8, n=0)
    long.timeout = 9
    long.max_tries = 3
    shorts = [SleepJob(log, seconds=0.2, n=n) for n in range(1, 9)]
    send(backend, [long, *shorts])
    with workers(1, ["--concurrency", "4"], backend.env(), tmp_path) as [proc]:
        wait_until(lambda: len(events(log, "end")) >= 9, 60, "every job to end")
        # The parked copy of the long job is due at its lease end (timeout + margin 2 s after
        # it started): a second run could only come after that. Nothing signals a copy that
        # was dropped, so wait out the lease (plus router hops) and look again.
        lease_end = events(log, "start")[0]["t"] + long.timeout + 2
        wait_until(lambda: time.time() > lease_end + 2, 30, "the parked copy's due time")
        assert len(events(log, "start")) == 9
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output[-3000:]
    starts = Counter(e["n"] for e in events(log, "start"))
    assert starts == {n: 1 for n in range(9)}, starts
    assert {e["attempts"] for e in events(log, "start")} == {1}
    after = broker_log(short_timeout_broker).count("timed out waiting for delivery")
    assert after == before, broker_log(short_timeout_broker)[-3000:]


def test_a_parked_job_whose_worker_died_runs_again_after_its_lease(
    short_timeout_broker: PrivateRabbit, request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    """The other half of parking: the worker running a parked job is killed; nothing is
    unacknowledged at the broker, so only the parked copy can bring the job back: it does,
    once its lease has ended (timeout 4 s + margin 2 s), as the job's second try."""
    backend = amqp_backend(short_timeout_broker, "redis", request, tmp_path)
    backend.overrides["amqp_consumer_timeout"] = TIMEOUT_MS / 1000
    job = SleepJob(log, seconds=3, n=0)
    job.timeout = 4
    job.max_tries = 2
    send(backend, [job])
    first = WorkerProcess([], backend.env(), tmp_path / "first.log")
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the job to start")
        # Hold the job past its run: SIGSTOP would keep the connection; kill -9 drops it.
        first.signal(signal.SIGKILL)
        killed = time.time()
        first.wait(10)
    finally:
        first.stop()
    if events(log, "end"):
        pytest.fail("the job ended before the kill; make it longer")
    with workers(1, [], backend.env(), tmp_path) as [second]:
        wait_until(lambda: bool(events(log, "end")), 60, "the job to run again")
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.output[-3000:]
    starts = events(log, "start")
    assert [e["attempts"] for e in starts] == [1, 2]
    assert starts[1]["t"] >= starts[0]["t"] + job.timeout  # not before its lease ended
    assert starts[1]["t"] > killed
