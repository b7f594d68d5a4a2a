"""The worker at the edges of delivery (issue 10): acknowledgements while every slot is busy,
jobs that will not stop, leases that cannot be renewed, jobs that cannot be loaded, prefetched
jobs of a worker that dies, and a failed-job store that is down. Real Redis, MariaDB and worker
processes wherever the behaviour lives in a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from core.job import Job
from core.queue.drivers.base import OutgoingJob
from core.queue.queue_manager import QueueManager
from core.worker.options import ExitCode, StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, _backend
from tests.edge_jobs import (
    BadBackoffJob,
    ReadOnlyTimeoutJob,
    StubbornJob,
    SyncSleepJob,
    ToThreadJob,
)
from tests.jobs import FlakyJob, RecordJob, SleepJob, events
from tests.processes import WorkerProcess, wait_until, workers
from tests.servers import free_port
from tests.test_worker_processes import PrivateRedis, inspect_queue, send, started

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def stacks_on_abort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker processes print every thread's stack on SIGABRT (see `exited`)."""
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend("redis", request, tmp_path)


def with_limits(job: Job, **limits: Any) -> Job:
    for name, value in limits.items():
        setattr(job, name, value)
    return job


def of(log: str, kind: str, n: int) -> list[dict[str, Any]]:
    return [e for e in events(log, kind) if e.get("n") == n]


def exited(proc: WorkerProcess, timeout: float = 30) -> int:
    """The worker's exit code; if it hangs, its threads' stacks (faulthandler) and its log."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        pytest.fail(f"the worker did not exit within {timeout}s:\n{proc.output[-12000:]}")


def failed_records(backend: Backend) -> list[Any]:
    async def go() -> list[Any]:
        async with QueueManager(backend.settings()) as manager:
            return await (await manager.failed_store()).list()

    return asyncio.run(go())


# -- 3: acknowledgements never wait for a free slot ------------------------------------------


@pytest.mark.process
def test_a_finished_job_is_acknowledged_while_every_slot_is_busy(
    redis_backend: Backend, log: str, tmp_path: Path
) -> None:
    # 16 slots and 4 prefetched: the short job finishes at once while 15 long ones run and the
    # buffer stays over half full, so no reservation is due to carry its acknowledgement.
    short = with_limits(RecordJob(log, 0), timeout=1)  # lease: 1 s + 2 s margin
    longs = [with_limits(SleepJob(log, 6, n), timeout=30) for n in range(1, 20)]
    send(redis_backend, [short, *longs])
    first = WorkerProcess(["--concurrency", "16"], redis_backend.env(), tmp_path / "a.log")
    try:
        wait_until(lambda: len(events(log, "start")) >= 15, 60, "15 long jobs to start")
        ran = events(log, "run")[0]["t"]
        # Acknowledged on its own, long before its 3 s lease could lapse.
        wait_until(lambda: inspect_queue(redis_backend, "size") == 19, 2.5, "the ack")
        acked = time.time() - ran
        # A second worker would pick the job up again had its lease lapsed unacknowledged.
        with workers(1, [], redis_backend.env(), tmp_path) as [second]:
            wait_until(lambda: len(events(log, "end")) == 19, 60, "the long jobs to end")
            second.signal(signal.SIGTERM)
            assert exited(second) == ExitCode.OK
        first.signal(signal.SIGTERM)
        assert exited(first) == ExitCode.OK
    finally:
        first.stop()
    print(f"acknowledged {acked:.2f}s after the job ran, with all 16 slots busy")
    assert len(events(log, "run")) == 1, events(log, "run")
    assert acked < 2.5
    assert inspect_queue(redis_backend, "size") == 0


# -- 4: a sync handle that outlives its timeout --------------------------------------------


@pytest.mark.process
def test_a_sync_job_past_its_timeout_is_given_up_and_the_worker_exits(
    redis_backend: Backend, log: str, tmp_path: Path
) -> None:
    stuck = with_limits(SyncSleepJob(log, 30, n=1, sleep_on=1), timeout=1, max_tries=2)
    other = with_limits(SleepJob(log, 4, n=2), timeout=60, max_tries=1)
    send(redis_backend, [stuck, other])
    args = ["--concurrency", "2", "--grace", "1"]
    first = WorkerProcess(args, redis_backend.env(), tmp_path / "a.log")
    try:
        wait_until(lambda: len(events(log, "start")) == 2, 60, "both jobs to start")
        began = time.monotonic()
        code = exited(first)
        took = time.monotonic() - began
    finally:
        first.stop()
    print(f"sync job given up: exit code {code} {took:.2f}s after both jobs started")
    assert code == ExitCode.STUCK, first.output
    # timeout 1 s + 1 s to stop (half the 2 s margin) + 1 s grace, the bookkeeping, and slack
    assert took < 12, took
    assert "would not stop" in first.output
    assert "returned to its queue" in first.output  # the other job went back unspent
    pid = first.proc.pid
    # It never ran beside its own retry in that worker: one start there, and no end.
    assert [e["attempts"] for e in of(log, "start", 1) if e["pid"] == pid] == [1]
    assert of(log, "end", 1) == []
    with workers(1, ["--concurrency", "2"], redis_backend.env(), tmp_path) as [second]:
        wait_until(lambda: len(events(log, "end")) == 2, 60, "both jobs to end elsewhere")
        second.signal(signal.SIGTERM)
        assert exited(second) == ExitCode.OK
    assert [e["attempts"] for e in of(log, "end", 1)] == [2]  # the timed-out try was spent
    assert [e["attempts"] for e in of(log, "end", 2)] == [1]  # the other one's was not
    assert inspect_queue(redis_backend, "size") == 0


async def test_sync_jobs_leave_the_loops_own_thread_pool_free(tmp_path: Path, log: str) -> None:
    # More sync jobs than the loop's default executor has threads (min(32, cpus + 4)).
    count = min(32, (os.cpu_count() or 1) + 4) + 1
    backend = Backend("memory", {"queue_default": "threads"})
    async with QueueManager(backend.settings()) as manager:
        await manager.bulk([SyncSleepJob(log, 3, n) for n in range(count)])
        worker = Worker(
            manager,
            WorkerOptions(
                queues=("threads",),
                concurrency=count + 1,
                sleep=0.05,
                stop_when_empty=True,
                handle_signals=False,
            ),
        )
        running = asyncio.create_task(worker.run())
        # As many sync jobs have a thread as the loop's own pool could give them.
        while len(events(log, "start")) < count - 1:
            assert not running.done()
            await asyncio.sleep(0.02)
        await manager.push(ToThreadJob(log))
        assert await asyncio.wait_for(running, 30) is StopReason.EMPTY
    [used] = events(log, "to_thread")
    assert used["took"] < 1.5, used  # not queued behind the 3 s sleepers
    assert not used["thread"].startswith("topiq-job")
    assert len(events(log, "end")) == count
    assert worker.counts.done == count + 1


# -- 5: an async job that swallows its cancellation; a lease that cannot be renewed ----------


@pytest.mark.process
def test_an_async_job_that_swallows_cancellation_is_given_up(
    redis_backend: Backend, log: str, tmp_path: Path
) -> None:
    stubborn = with_limits(StubbornJob(log, 30, n=1), timeout=1, max_tries=2)
    other = with_limits(SleepJob(log, 4, n=2), timeout=60, max_tries=1)
    send(redis_backend, [stubborn, other])
    args = ["--concurrency", "2", "--grace", "1"]
    first = WorkerProcess(args, redis_backend.env(), tmp_path / "a.log")
    try:
        wait_until(lambda: len(events(log, "start")) == 2, 60, "both jobs to start")
        began = time.monotonic()
        code = exited(first)
        took = time.monotonic() - began
        ended = time.time()
    finally:
        first.stop()
    print(f"async job given up: exit code {code} {took:.2f}s after both jobs started")
    assert code == ExitCode.STUCK, first.output
    assert took < 12, took
    assert "would not stop" in first.output
    assert of(log, "swallowed", 1)  # it did swallow the cancellation
    # Nothing of the abandoned try outlives its worker.
    assert all(e["t"] <= ended for e in of(log, "swallowed", 1))
    with workers(1, ["--concurrency", "2"], redis_backend.env(), tmp_path) as [second]:
        wait_until(lambda: len(events(log, "end")) == 2, 60, "both jobs to end elsewhere")
        second.signal(signal.SIGTERM)
        assert exited(second) == ExitCode.OK
    assert [e["attempts"] for e in of(log, "start", 1)] == [1, 2]
    assert [e["attempts"] for e in of(log, "end", 1)] == [2]
    assert [e["attempts"] for e in of(log, "end", 2)] == [1]
    assert inspect_queue(redis_backend, "size") == 0


@pytest.mark.process
def test_sigterm_ends_a_worker_whose_job_swallows_cancellation(
    redis_backend: Backend, log: str, tmp_path: Path
) -> None:
    send(redis_backend, [with_limits(StubbornJob(log, 60, n=1), timeout=120, max_tries=1)])
    first = WorkerProcess(["--grace", "1"], redis_backend.env(), tmp_path / "a.log")
    try:
        wait_until(lambda: bool(events(log, "start")), 60, "the job to start")
        began = time.monotonic()
        first.signal(signal.SIGTERM)
        code = exited(first)
        took = time.monotonic() - began
    finally:
        first.stop()
    print(f"SIGTERM with a job swallowing cancellation: exit code {code} after {took:.2f}s")
    assert code == ExitCode.OK, first.output
    assert took < 10, took  # grace 1 s + 1 s to stop, and a loaded machine's slack
    assert "did not stop within" in first.output
    [again] = inspect_queue(redis_backend, "reserve")
    assert again.attempts == 1  # handed back unspent


@pytest.mark.process
def test_a_job_whose_lease_cannot_be_renewed_is_cancelled(log: str, tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    backend = Backend(
        "redis", {"queue_default": "lapse", "redis_url": f"redis://127.0.0.1:{server.port}/0"}
    )
    try:
        first = with_limits(SleepJob(log, 1.5, n=1), max_tries=3)
        # Prefetched behind the first one: reserved under the short pre-start lease (2 s).
        second = with_limits(SleepJob(log, 8, n=2), timeout=30, max_tries=3)
        send(backend, [first, second])
        args = ["--concurrency", "1", "--prefetch", "1"]
        with workers(1, args, backend.env(), tmp_path) as [proc]:
            wait_until(lambda: bool(of(log, "start", 1)), 60, "the first job to start")
            server.kill()  # unreachable for longer than the 2 s margin
            wait_until(
                lambda: "could not be renewed" in proc.output or "lapsed" in proc.output,
                30,
                "the worker to give the second job up",
            )
            server.start()
            wait_until(lambda: bool(of(log, "end", 2)), 60, "the second job to run again")
            proc.signal(signal.SIGTERM)
            assert exited(proc) == ExitCode.OK
        # Its first try never ran on once its lease was gone: it ran to its end on a new try.
        assert [e["attempts"] for e in of(log, "end", 2)] == [2]
        assert inspect_queue(backend, "size") == 0
    finally:
        server.kill()


# -- 6: every load failure ends in the failed store ------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_every_load_failure_ends_in_the_failed_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, log: str
) -> None:
    backend = next(_backend(kind, request, tmp_path))
    queue = backend.overrides["queue_default"]

    def payload(cls: type[Job], **extra: Any) -> bytes:
        job = f"{cls.__module__}:{cls.__qualname__}"
        return orjson.dumps({"id": "x", "job": job, "queue": queue, "data": {}} | extra)

    raw = {
        "read-only": payload(ReadOnlyTimeoutJob, timeout=7),
        "garbage": b"\xff not json",
        "bad-backoff": payload(BadBackoffJob, data={"log": log}),
    }
    async with QueueManager(backend.settings()) as manager:
        driver = await manager.connection()
        # The garbage one has already been reserved, and lost, as many times as allowed.
        await driver.push([OutgoingJob("garbage", queue, raw["garbage"])])
        for _ in range(3):
            [taken] = await driver.reserve([queue], 1, lease=30)
            await driver.release(taken)
        await driver.push(
            [OutgoingJob(name, queue, raw[name]) for name in ("read-only", "bad-backoff")]
        )
        worker = Worker(
            manager,
            WorkerOptions(queues=(queue,), sleep=0.05, stop_when_empty=True, handle_signals=False),
        )
        await asyncio.wait_for(worker.run(), 30)
        records = {r.id: r for r in await (await manager.failed_store()).list()}
        assert await manager.size(queue) == 0
    assert set(records) == set(raw)
    assert "timeout" in records["read-only"].exception
    # A job whose own code fails while the worker handles it still spends its tries and ends
    # in the store: its backoff raising gives no delay, not a dead task.
    assert "boom on try 2" in records["bad-backoff"].exception
    assert [e["attempts"] for e in events(log, "try")] == [1, 2]
    assert "WorkerLostError" in records["garbage"].exception
    assert "not valid JSON" in records["garbage"].exception
    assert worker.counts.failed == 3


# -- 8: a prefetched job of a worker that dies comes back after a short lease ----------------


@pytest.mark.process
def test_a_prefetched_job_of_a_dead_worker_comes_back_quickly(
    server_backend: Backend, log: str, tmp_path: Path
) -> None:
    long = with_limits(SleepJob(log, 60, n=1), timeout=90, max_tries=3)
    waiting = with_limits(RecordJob(log, 2), timeout=40)  # its own lease: 42 s
    send(server_backend, [long, waiting])
    args = ["--concurrency", "1", "--prefetch", "1"]
    first = WorkerProcess(args, server_backend.env(), tmp_path / "a.log")
    try:
        wait_until(lambda: bool(of(log, "start", 1)), 60, "the long job to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    killed = time.time()
    with workers(1, [], server_backend.env(), tmp_path) as [second]:
        wait_until(lambda: started(second), 60, "the second worker to start")
        # Its pre-start lease is the 2 s margin, not its own 42 s nor the 62 s default.
        wait_until(lambda: bool(of(log, "run", 2)), 25, "the prefetched job to come back")
        back = of(log, "run", 2)[0]["t"] - killed
        second.signal(signal.SIGTERM)
        assert exited(second) == ExitCode.OK
    print(f"prefetched job ran again {back:.2f}s after its worker was killed")
    assert back < 20, back  # the second worker's start-up counts too
    assert [e["attempts"] for e in of(log, "run", 2)] == [2]


# -- 12: a failed-job store that is down -----------------------------------------------------


class Gate:
    """A TCP forwarder on a port of its own to a real server: closed, the server is down."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += (client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.process
def test_redis_workers_keep_working_while_the_mysql_failed_store_is_down(
    request: pytest.FixtureRequest, log: str, tmp_path: Path
) -> None:
    redis = next(_backend("redis", request, tmp_path))
    mysql = next(_backend("mysql", request, tmp_path))
    parts = urlsplit(mysql.overrides["db_url"])
    gate = Gate((parts.hostname or "127.0.0.1", parts.port or 3306))
    through_gate = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{gate.port}")
    env = {**redis.env(), "ENABLE_MYSQL": "true", "DB_URL": through_gate.geturl()}
    send(redis, [with_limits(FlakyJob(log), max_tries=1), *(RecordJob(log, n) for n in range(5))])
    try:
        with workers(1, [], env, tmp_path) as [proc]:  # one slot: a held failure must not block it
            wait_until(lambda: len(events(log, "run")) == 5, 30, "the other jobs to run")
            assert "cannot record the failure of job" in proc.output
            assert events(log, "failed") == []  # failed() waits until its record can follow
            assert inspect_queue(redis, "size") == 1  # held, reserved: not dropped
            gate.open()
            wait_until(lambda: len(failed_records(mysql)) == 1, 30, "the failure to be recorded")
            wait_until(lambda: inspect_queue(redis, "size") == 0, 10, "its acknowledgement")
            proc.signal(signal.SIGTERM)
            assert exited(proc) == ExitCode.OK
    finally:
        gate.close()
    assert len(events(log, "failed")) == 1
    [record] = failed_records(mysql)
    assert "flaky failure on try 1" in record.exception
