"""`queue:retry` while workers run the retried jobs again: no failure record is lost, and two
retries at once queue each job once (issue 10, point 2).

Real worker processes and real `python main.py queue:retry` processes, on Redis, SQLite and
MariaDB, and on a Redis queue whose failures are kept in MariaDB (`ENABLE_MYSQL=true`), where
retrying cannot be one atomic step and goes claim, push, remove.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from core.queue.queue_manager import QueueManager
from tests.conftest import Backend, _backend, reset_mysql
from tests.jobs import events
from tests.ops.conftest import PYTHON
from tests.ops.jobs import MarkerJob
from tests.processes import ROOT, WorkerProcess, wait_until, workers

pytestmark = pytest.mark.timeout(180)

JOBS = 150


@pytest.fixture(params=["redis", "sqlite", "mysql", "redis-failed-in-mysql"])
def retry_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each server backend, plus a Redis queue keeping its failures in MariaDB."""
    if request.param != "redis-failed-in-mysql":
        yield from _backend(request.param, request, tmp_path)
        return
    mysql = request.getfixturevalue("mysql_url")
    reset_mysql(mysql)
    for backend in _backend("redis", request, tmp_path):
        backend.overrides.update(enable_mysql="true", db_url=mysql)
        yield backend


def call(backend: Backend, op: str) -> Any:
    """Ask the backend something from this process: its queue's size or failed records."""

    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            name = manager.settings.queue_default
            if op == "size":
                return await manager.size(name)
            if op == "stats":
                [stats] = await manager.stats(name)
                return stats
            if op == "failed":
                store = await manager.failed_store()
                return [r.id for r in await store.list(name, limit=10 * JOBS)]
            if op == "failures":
                store = await manager.failed_store()
                return await store.list(name, limit=10 * JOBS)
            raise AssertionError(op)

    return asyncio.run(go())


def settle(backend: Backend, op: str, expected: Any, timeout: float, what: str) -> None:
    """Wait until `call(backend, op)` answers `expected`, asking every quarter second.

    Each question opens a connection of its own: asked more often, the tests would mostly
    measure that.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = call(backend, op)
        if answer == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {answer!r}")
        time.sleep(0.25)


def finished_events(log: str, kind: str) -> list[dict[str, Any]]:
    """The log's events of `kind`, read while workers append to it.

    A worker writes each line in one `write`, but a reader may see the end of one being
    written: only lines already ended by their newline are read.
    """
    path = Path(log)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [event for event in map(json.loads, lines) if event["event"] == kind]


def wait_runs(backend: Backend, log: str, event: str, count: int, what: str) -> None:
    """Wait for `count` events in the log; on a timeout, say where the queue's jobs are."""
    try:
        wait_until(lambda: len(finished_events(log, event)) >= count, 120, what)
    except AssertionError as exc:
        where = call(backend, "stats")
        so_far = len(finished_events(log, event))
        raise AssertionError(f"{exc}; {so_far} so far; {where}{failures(backend, log)}") from None


def failures(backend: Backend, log: str) -> str:
    """The failed records, told apart by their exception's last line, with how many times each
    of their jobs ran: what a timeout's message needs to say why jobs did not end as expected."""
    records = call(backend, "failures")
    if not records:
        return ""
    tries = Counter(e["id"] for e in finished_events(log, "try"))
    lines = Counter(
        (r.exception.strip().splitlines() or ["(no exception text)"])[-1] for r in records
    )
    ran = Counter(tries[r.id] for r in records)
    said = "; ".join(f"{n}x {line}" for line, n in lines.most_common())
    runs = ", ".join(f"{n} ran {k} time(s)" for k, n in sorted(ran.items()))
    return f"; {len(records)} failed records: {said}; of their jobs {runs}"


def count_failed(backend: Backend) -> int:
    return len(call(backend, "failed"))


def dispatch(backend: Backend, jobs: list[MarkerJob]) -> list[str]:
    async def go() -> list[str]:
        async with QueueManager(backend.settings()) as manager:
            return [str(job_id) for job_id in await manager.bulk(jobs)]

    return asyncio.run(go())


def retry_all(backend: Backend) -> subprocess.Popen[str]:
    """`python main.py queue:retry all` as a process of its own."""
    return subprocess.Popen(
        [PYTHON, "main.py", "--env-file", "/dev/null", "queue:retry", "all"],
        cwd=ROOT,
        env={**backend_env(backend), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def backend_env(backend: Backend) -> dict[str, str]:
    return {**backend.env(), "LOG_LEVEL": "WARNING"}


#: The workers' QUEUE_LEASE_MARGIN. The tests' usual 2 s is shorter than SQLite's busy_timeout
#: (5 s): a lease renewal waiting behind the retry commands' writes, on a loaded machine,
#: arrives late, a job prefetched (or failing, or being acknowledged) under it is reserved again
#: with its try spent, and a MarkerJob (max_tries 1) then fails without running (a
#: WorkerLostError, no "try" event), which these tests would read as a lost or twice-queued
#: job. Nothing here stops a worker, so a long margin costs no time.
LEASE_MARGIN = "30"


def start_workers(backend: Backend, tmp_path: Path) -> Any:
    env = {**backend.env(), "QUEUE_LEASE_MARGIN": LEASE_MARGIN}
    return workers(2, ["--concurrency", "8"], env, tmp_path)


def wait_started(procs: list[WorkerProcess]) -> None:
    for proc in procs:
        wait_until(lambda p=proc: "starting:" in p.output, 60, "the workers to start")


def test_retry_all_while_workers_fail_the_jobs_again_loses_no_failure(
    retry_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    never = str(tmp_path / "never-created")  # every try fails: max_tries 1, straight to failed
    with start_workers(retry_backend, tmp_path) as procs:
        wait_started(procs)
        ids = dispatch(retry_backend, [MarkerJob(log, never) for _ in range(JOBS)])
        wait_runs(retry_backend, log, "try", JOBS, "every job to run once")
        settle(retry_backend, "size", 0, 60, "every job to be recorded as failed")
        # The retried jobs run and fail again while the command is still at work.
        retry = retry_all(retry_backend)
        out, err = retry.communicate(timeout=120)
        assert retry.returncode == 0, err
        assert f"Retried {JOBS} failed jobs" in out
        wait_runs(retry_backend, log, "try", 2 * JOBS, "the retried jobs to run again")
        settle(retry_backend, "size", 0, 60, "every retried job to be recorded again")
    failed = call(retry_backend, "failed")
    assert len(failed) == JOBS, f"{JOBS - len(failed)} failure records lost"
    assert sorted(failed) == sorted(ids)
    assert Counter(e["id"] for e in events(log, "try")) == {job_id: 2 for job_id in ids}


def test_two_retries_at_once_run_each_job_once(retry_backend: Backend, tmp_path: Path) -> None:
    log = str(tmp_path / "events.jsonl")
    marker = tmp_path / "fixed"
    # Enough that the two commands' work overlaps, whatever their start-up times.
    jobs = 5 * JOBS if retry_backend.kind == "redis" else 2 * JOBS
    with start_workers(retry_backend, tmp_path) as procs:
        wait_started(procs)
        ids = dispatch(retry_backend, [MarkerJob(log, str(marker)) for _ in range(jobs)])
        wait_runs(retry_backend, log, "try", jobs, "every job to run once")
        settle(retry_backend, "size", 0, 60, "every job to be recorded as failed")
        assert count_failed(retry_backend) == jobs
        marker.touch()  # the operator fixes the cause; two of them retry at the same time
        retries = [retry_all(retry_backend) for _ in range(2)]
        for retry in retries:
            _, err = retry.communicate(timeout=120)
            assert retry.returncode == 0, err
        wait_runs(retry_backend, log, "done", jobs, "every retried job to run")
        settle(retry_backend, "size", 0, 60, "the queue to empty")
    done = Counter(e["id"] for e in events(log, "done"))
    twice = [job_id for job_id, runs in done.items() if runs > 1]
    assert not twice, f"{len(twice)} of {jobs} jobs queued and run more than once"
    assert sorted(done) == sorted(ids)
    assert call(retry_backend, "failed") == []


def test_a_retry_opens_a_sqlite_queue_while_another_writes(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two retries at once on SQLite: the second opens the queue while the first holds the
    write lock for its whole move (seconds, for many records on a loaded machine). Tables
    already up to date are read, not migrated under the write lock: the second is not kept
    waiting until `queue:retry` gives up on the connection ("no answer within 10s")."""
    for backend in _backend("sqlite", request, tmp_path):
        first = retry_all(backend)  # makes the tables
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        database = make_url(str(backend.overrides["db_url"])).database
        assert database
        writing = sqlite3.connect(database, isolation_level=None)
        try:
            writing.execute("BEGIN IMMEDIATE")  # another retry moving its records
            second = retry_all(backend)
            out, err = second.communicate(timeout=120)
        finally:
            writing.close()
        assert second.returncode == 0, err
        assert "No failed jobs to retry" in out
