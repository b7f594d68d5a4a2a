"""Real worker processes on `QUEUE_CONNECTION=amqp` (issue #18): what only processes show.

The broker's own acknowledgement is the lease here, so a worker killed with -9 gives its jobs
back the moment its connection drops (no lease to wait out), and the broker counts the
redelivery (`x-delivery-count`): the try is spent, as a lost lease spends it elsewhere. A clean
stop must spend nothing, including for deliveries prefetched but never started.

Each test has a queue of its own on a broker of the module's (the session's `amqp_url` when
tests/conftest.py offers one, else a private `rabbitmq-server` started here); the companion
store is the session's Redis (one test also runs on SQLite, the default `AMQP_STORE=database`).
The consumer_timeout tests start a broker of their own whose `consumer_timeout` is 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
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
from core.queue.drivers.base import ReservedJob
from core.queue.queue_manager import QueueManager
from core.worker.options import ExitCode
from tests.conftest import ON_CI, Backend
from tests.jobs import RecordJob, SleepJob, events, record
from tests.processes import ROOT, WorkerProcess, wait_until, workers

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


# -- a private broker -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def amqp_answers(port: int) -> bool:
    """Whether a broker on `port` has finished booting: it answers the AMQP 0-9-1 header with
    a Connection.Start method frame (type 1, channel 0). RabbitMQ opens its listeners last."""
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
            sock.settimeout(2)
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(3) == b"\x01\x00\x00"
    except OSError:
        return False


class PrivateRabbit:
    """A `rabbitmq-server` of the test's own: its node name, ports, data and log folder.

    `stop()` then `start()` brings the same node back on the same data (its quorum queues and
    their messages); `kill()` is kill -9 of the whole node. `consumer_timeout_ms` and
    `tick_ms` (`channel_tick_interval`: how often a channel checks its oldest unacknowledged
    delivery against the timeout, 60 s by default in 3.10) make the timeout trap testable.
    """

    def __init__(
        self, workdir: Path, consumer_timeout_ms: int | None = None, tick_ms: int | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"topiq{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        conf = ["loopback_users = none", f"listeners.tcp.default = 127.0.0.1:{self.port}"]
        if consumer_timeout_ms is not None:
            conf.append(f"consumer_timeout = {consumer_timeout_ms}")
        (workdir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        advanced = (
            f"[{{rabbit, [{{channel_tick_interval, {tick_ms}}}]}}].\n" if tick_ms else "[].\n"
        )
        (workdir / "advanced.config").write_text(advanced)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        d = self.workdir
        return {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 90) -> None:
        with (self.workdir / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its group: the script, beam, erl_child_setup
            )
        deadline = time.monotonic() + timeout
        while not amqp_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the private rabbitmq-server did not start:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """A clean stop (SIGTERM: the node shuts down in order) and wait for it to be gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reap()

    def _reap(self) -> None:
        # The node may outlive the script for a moment; the port is free once it is gone.
        wait_until(lambda: not amqp_answers(self.port), 30, "the broker to be gone")

    def log_text(self) -> str:
        parts = [
            p.read_text(errors="replace") for p in sorted((self.workdir / "log").glob("*.log"))
        ]
        return "\n".join(parts)

    def tail(self) -> str:
        out = (self.workdir / "server.out").read_text(errors="replace")[-2000:]
        return out + "\n" + self.log_text()[-2000:]


def private_rabbit(workdir: Path, **options: Any) -> PrivateRabbit:
    """A started private broker, or a skip (a failure on CI) when RabbitMQ is not installed."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        message = "rabbitmq-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    broker = PrivateRabbit(workdir, **options)
    broker.start()
    return broker


@pytest.fixture(scope="module")
def broker_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session's broker (tests/conftest.py `amqp_url`) or one of this module's own."""
    try:
        yield request.getfixturevalue("amqp_url")
        return
    except pytest.FixtureLookupError:
        pass
    broker = private_rabbit(tmp_path_factory.mktemp("rabbit"))
    try:
        yield broker.url
    finally:
        broker.stop()


def amqp_backend(url: str, store: str, request: pytest.FixtureRequest, tmp: Path) -> Backend:
    """A backend on the broker at `url` with a queue and prefix of the test's own."""
    overrides: dict[str, Any] = {
        "queue_default": f"q-{uuid.uuid4().hex[:10]}",
        "amqp_url": url,
        "amqp_prefix": f"t{uuid.uuid4().hex[:8]}",
    }
    if store == "redis":
        overrides.update(amqp_store="redis", redis_url=request.getfixturevalue("redis_url"))
    else:
        overrides.update(amqp_store="database", db_url=f"sqlite+aiosqlite:///{tmp}/store.db")
    return Backend("amqp", overrides)


@pytest.fixture
def backend(broker_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return amqp_backend(broker_url, "redis", request, tmp_path)


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
        for proc in procs:
            wait_until(lambda: started(proc), 60, "the workers to start")  # noqa: B023
        send(backend, [RecordJob(log, n) for n in range(600)])
        wait_until(lambda: len(events(log, "run")) >= 600, 120, "600 jobs to run")
        for proc in procs:
            proc.signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, proc.output[-3000:]
    counts = Counter(e["n"] for e in events(log, "run"))
    assert sorted(counts) == list(range(600))
    assert set(counts.values()) == {1}
    assert {e["attempts"] for e in events(log, "run")} == {1}
    assert len({e["pid"] for e in events(log, "run")}) == 2  # both took work
    assert size(backend) == 0


def test_kill_9_mid_job_the_broker_redelivers_and_the_try_counts(
    backend: Backend, log: str, tmp_path: Path
) -> None:
    slow = SleepJob(log, seconds=1.5, n=0)
    slow.max_tries = 2
    slow.timeout = 10
    send(backend, [slow, *(RecordJob(log, n) for n in range(1, 6))])
    first = WorkerProcess([], backend.env(), tmp_path / "first.log")
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the slow job to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    with workers(1, ["--concurrency", "2"], backend.env(), tmp_path) as [second]:
        wait_until(lambda: bool(events(log, "end")), 60, "the slow job to complete")
        wait_until(lambda: len(events(log, "run")) >= 5, 30, "the other jobs")
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.output[-3000:]
    assert [e["attempts"] for e in events(log, "start")] == [1, 2]
    assert [e["attempts"] for e in events(log, "end")] == [2]
    runs = Counter(e["n"] for e in events(log, "run"))
    assert runs == {n: 1 for n in range(1, 6)}  # jobs not in flight ran once
    assert size(backend) == 0


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
    broker_url: str, store: str, request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    """Three tries 0.5 s and then 1 s apart (retry_after), failed() once, listed by
    queue:failed; queue:retry puts it back with its tries reset and it runs again."""
    backend = amqp_backend(broker_url, store, request, tmp_path)
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
def short_timeout_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    broker = private_rabbit(
        tmp_path_factory.mktemp("rabbit-timeout"), consumer_timeout_ms=TIMEOUT_MS, tick_ms=TICK_MS
    )
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
            count = 0 if returned is None else int(returned.headers.get("x-delivery-count", 0))
            return shut - delivered, count

    held, count = asyncio.run(go())
    assert held >= TIMEOUT_MS / 1000 - 0.1
    assert count == 1  # back in its queue, its redelivery counted
    wait_until(  # the broker writes its log file a moment later
        lambda: "timed out waiting for delivery" in short_timeout_broker.log_text(),
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
    backend = amqp_backend(short_timeout_broker.url, "redis", request, tmp_path)
    backend.overrides["amqp_consumer_timeout"] = TIMEOUT_MS / 1000
    before = short_timeout_broker.log_text().count("timed out waiting for delivery")
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
    after = short_timeout_broker.log_text().count("timed out waiting for delivery")
    assert after == before, short_timeout_broker.log_text()[-3000:]


def test_a_parked_job_whose_worker_died_runs_again_after_its_lease(
    short_timeout_broker: PrivateRabbit, request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    """The other half of parking: the worker running a parked job is killed; nothing is
    unacknowledged at the broker, so only the parked copy can bring the job back: it does,
    once its lease has ended (timeout 4 s + margin 2 s), as the job's second try."""
    backend = amqp_backend(short_timeout_broker.url, "redis", request, tmp_path)
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
