"""`queue:import-routemq`: the jobs RouteMQ left in Redis, moved into Topiq's redis connection.

RouteMQ's keys are written here as its Redis driver wrote them (`routemq:queue:<q>` a list of
`{"id", "payload", "attempts"}` pushed at the tail, `:delayed` a sorted set scored by the due
epoch second, `:reserved` the list its worker RPOPLPUSHed into, `routemq:queue:failed:<q>` a list
of `{"connection", "queue", "payload", "exception", "failed_at"}`), on the suite's private Redis.
The import and the workers are real processes: each job's runs are counted in a log file.

- waiting jobs run once each, in dispatch order, beside a worker started before the import;
  delayed ones not before their due time; reserved ones with their tries kept (one taken on its
  last try fails for good); failed records are in `queue:failed` and `queue:retry` runs them;
  unreadable payloads end in the failed store, nothing is dropped;
- the import killed with SIGKILL after each of its steps and run again: every job runs exactly
  once, nothing is left in RouteMQ's keys, the working hash or the once keys;
- a RouteMQ worker reserving a job meanwhile stops the import (exit 1), nothing runs twice;
- `--dry-run` counts and moves nothing; a second import at once is refused; a cluster source is
  refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import flush_redis
from tests.jobs import events
from tests.processes import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

JOB_CLASS = "tests.jobs.RecordJob"  # RouteMQ's `module.ClassName`


def routemq_payload(log: str, n: int, queue: str, *, max_tries: int = 3) -> str:
    """What RouteMQ's `Job.serialize()` wrote."""
    return json.dumps(
        {
            "class": JOB_CLASS,
            "data": {"log": log, "n": n, "data_": {}},
            "max_tries": max_tries,
            "timeout": 30,
            "retry_after": 0,
            "queue": queue,
        }
    )


def routemq_job(payload: str, queue: str, attempts: int = 0) -> str:
    """A job as RouteMQ's Redis driver stored it (id `<queue>:<epoch microseconds>`)."""
    micros = int(time.time() * 1_000_000)
    return json.dumps({"id": f"{queue}:{micros}", "payload": payload, "attempts": attempts})


class Seed:
    """RouteMQ's keys for one queue, with the jobs' numbers by kind."""

    def __init__(self, client: redis.Redis, log: str, queue: str) -> None:
        self.client, self.log, self.queue = client, log, queue
        self.pending: list[int] = []
        self.delayed: dict[int, float] = {}
        self.reserved: dict[int, int] = {}  # n -> attempts RouteMQ had counted
        self.failed: list[int] = []

    def pend(self, n: int, attempts: int = 0) -> None:
        payload = routemq_payload(self.log, n, self.queue)
        self.client.rpush(f"routemq:queue:{self.queue}", routemq_job(payload, self.queue, attempts))
        self.pending.append(n)

    def delay(self, n: int, due: float) -> None:
        item = routemq_job(routemq_payload(self.log, n, self.queue), self.queue)
        self.client.zadd(f"routemq:queue:{self.queue}:delayed", {item: due})
        self.delayed[n] = due

    def reserve(self, n: int, attempts: int, max_tries: int = 3) -> None:
        payload = routemq_payload(self.log, n, self.queue, max_tries=max_tries)
        item = routemq_job(payload, self.queue, attempts)
        self.client.lpush(f"routemq:queue:{self.queue}:reserved", item)  # RPOPLPUSH's side
        self.reserved[n] = attempts

    def fail(self, n: int) -> None:
        record = {
            "connection": "redis",
            "queue": self.queue,
            "payload": routemq_payload(self.log, n, self.queue),
            "exception": f"ValueError: job {n} broke\nTraceback ...",
            "failed_at": "2024-05-01T10:00:00.123456",
        }
        self.client.rpush(f"routemq:queue:failed:{self.queue}", json.dumps(record))
        self.failed.append(n)

    @property
    def runnable(self) -> set[int]:
        return {*self.pending, *self.delayed, *self.reserved}


@pytest.fixture
def source(redis_url: str) -> Iterator[redis.Redis]:
    flush_redis(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def queue() -> str:
    return f"rq-{uuid.uuid4().hex[:8]}"


def env_for(redis_url: str, queue: str) -> dict[str, str]:
    return {
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": redis_url,
        "QUEUE_DEFAULT": queue,
        "QUEUE_ALLOWED_MODULES": "app.,tests.",
        "QUEUE_LEASE_MARGIN": "2",
        "WORKER_SLEEP": "0.05",
        "LOG_LEVEL": "INFO",
    }


def command(
    env: dict[str, str], *args: str, check: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python main.py --env-file /dev/null <args>` with `env`."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--env-file", "/dev/null", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done


def runs(log: str) -> Counter[int]:
    return Counter(e["n"] for e in events(log, "run"))


def routemq_left(client: redis.Redis) -> list[bytes]:
    """Every key the import should have emptied: RouteMQ's, its working hash, once keys."""
    keys = set(client.scan_iter(match="routemq:queue:*"))
    keys |= set(client.scan_iter(match="routemq:import:working"))
    keys |= set(client.scan_iter(match="topiq:*:once:*"))
    return sorted(keys)


def failed_rows(env: dict[str, str], queue: str) -> list[dict[str, Any]]:
    done = command(env, "queue:failed", "--queue", queue, "--json", check=True)
    rows: list[dict[str, Any]] = json.loads(done.stdout)["jobs"]
    return rows


def failed_count(client: redis.Redis, queue: str) -> int:
    """The failed store's count for `queue`, read without starting a process per poll."""
    return int(client.zcard(f"topiq:{{topiq:failed}}:queue:{queue}"))


def test_dry_run_counts_per_queue_and_kind_and_moves_nothing(
    source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    seed = Seed(source, str(tmp_path / "runs.log"), queue)
    for n in range(3):
        seed.pend(n)
    seed.delay(10, time.time() + 3600)
    seed.reserve(20, 1)
    seed.fail(30)
    seed.fail(31)
    source.set("routemq:queue:oddity", "a string")  # not one of RouteMQ's keys
    before = {k: source.dump(k) for k in source.scan_iter()}

    done = command(env_for(redis_url, queue), "queue:import-routemq", "--dry-run", "--json")

    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["dry_run"] is True
    assert data["queues"] == [
        {"queue": queue, "reserved": 1, "pending": 3, "delayed": 1, "failed": 2}
    ]
    assert data["left"] == [{"key": "routemq:queue:oddity", "reason": data["left"][0]["reason"]}]
    assert "not one of RouteMQ's" in data["left"][0]["reason"]
    assert {k: source.dump(k) for k in source.scan_iter()} == before  # nothing moved

    table = command(env_for(redis_url, queue), "queue:import-routemq", "--dry-run")
    assert table.returncode == 0 and queue in table.stdout and "dry run" in table.stdout


def test_imported_jobs_run_once_in_order_beside_a_running_worker(
    source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    seed = Seed(source, log, queue)
    for n in range(40):
        seed.pend(n)
    seed.pend(40, attempts=2)  # released by RouteMQ's worker after two tries: one try left
    soon = time.time() + 3
    seed.delay(100, time.time() - 60)  # due already
    seed.delay(101, soon)
    seed.reserve(200, attempts=1)  # RouteMQ's worker was running it: two tries left
    seed.reserve(201, attempts=3)  # taken on its last try: fails for good at its next start
    seed.fail(300)
    seed.fail(301)
    source.rpush(f"routemq:queue:{queue}", "not json at all")
    source.rpush(f"routemq:queue:failed:{queue}", "{broken")
    env = env_for(redis_url, queue)

    with_worker = WorkerProcess(["--queue", queue, "--concurrency", "1"], env, tmp_path / "w.log")
    try:
        done = command(env, "queue:import-routemq", "--json", "--batch", "7")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "Stop RouteMQ's workers" in done.stderr
        data = json.loads(done.stdout)
        assert data["queues"] == [
            {"queue": queue, "reserved": 2, "pending": 42, "delayed": 2, "failed": 3}
        ]
        assert data["unreadable"] == 2 and data["moved"] == 49
        expected = seed.runnable - {201}
        wait_until(lambda: set(runs(log)) >= expected, 60, f"runs of {sorted(expected)}")
        wait_until(lambda: failed_count(source, queue) == 5, 30, "five failed records")
    finally:
        with_worker.stop()

    counted = runs(log)
    assert set(counted) == expected and set(counted.values()) == {1}, counted
    order = [e["n"] for e in events(log, "run") if e["n"] < 100 or e["n"] >= 200]
    # Reserved first, then the waiting ones in dispatch order (RouteMQ took the newest first).
    assert order == [200, *range(41)], order
    by_n = {e["n"]: e for e in events(log, "run")}
    assert by_n[200]["attempts"] == 2 and by_n[40]["attempts"] == 3 and by_n[0]["attempts"] == 1
    started = {e["n"]: e["t"] for e in events(log, "run")}
    assert started[101] >= soon - 0.05  # clock of one host: due time kept

    records = failed_rows(env, queue)
    errors = [row["error"] for row in records]
    assert sum("was reserved 3 times" in e for e in errors) == 1, errors  # n 201
    assert sum("failed record could not be read" in e for e in errors) == 1, errors
    imported = [row for row in records if "broke" in row["error"]]
    assert sorted(row["error"] for row in imported) == [
        "ValueError: job 300 broke",
        "ValueError: job 301 broke",
    ]
    assert {row["class"] for row in imported} == {"tests.jobs:RecordJob"}
    assert all(row["failed_at"].startswith("2024-05-01T10:00:00") for row in imported)
    unreadable = [row for row in records if row["class"] == "?"]
    assert len(unreadable) == 2, records  # the pending "not json at all", the "{broken" record

    assert routemq_left(source) == []
    # queue:retry puts an imported failed record back: it runs once.
    retry_id = next(row["id"] for row in imported if "job 300" in row["error"])
    command(env, "queue:retry", retry_id, check=True)
    again = WorkerProcess(["--queue", queue, "--stop-when-empty"], env, tmp_path / "w2.log")
    assert again.wait(60) == 0, again.output
    assert runs(log)[300] == 1


@pytest.mark.parametrize("step", ["taken", "pushed", "cleared"])
def test_killed_after_each_step_and_run_again_runs_every_job_once(
    step: str, source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    seed = Seed(source, log, queue)
    for n in range(25):
        seed.pend(n, attempts=1 if n % 5 == 0 else 0)
    for n in range(100, 104):
        seed.delay(n, time.time() - 1 + n % 2)
    seed.reserve(200, attempts=1)
    for n in range(300, 303):
        seed.fail(n)
    env = env_for(redis_url, queue)

    with_worker = WorkerProcess(["--queue", queue], env, tmp_path / "w.log")
    try:
        killed = command(env, "queue:import-routemq", "--batch", "4", "--crash-at", f"{step}:9")
        assert killed.returncode == -9, (killed.stdout, killed.stderr)
        working = source.hlen("routemq:import:working")
        assert working == (0 if step == "cleared" else 4)  # one batch in hand at the kill
        # The lock names a process that is gone: the next run takes it over at once.
        again = command(env, "queue:import-routemq", "--json", "--batch", "4")
        assert again.returncode == 0, (again.stdout, again.stderr)
        data = json.loads(again.stdout)
        assert data["resumed"] == working
        wait_until(lambda: set(runs(log)) >= seed.runnable, 60, "every imported job's run")
        wait_until(lambda: failed_count(source, queue) == 3, 30, "three failed records")
    finally:
        with_worker.stop()
    # A job pushed twice would still wait: a worker that stops when the queue is empty runs it.
    drain = WorkerProcess(["--queue", queue, "--stop-when-empty"], env, tmp_path / "w2.log")
    assert drain.wait(60) == 0, drain.output

    counted = runs(log)
    assert set(counted) == seed.runnable and set(counted.values()) == {1}, counted
    assert {row["queue"] for row in failed_rows(env, queue)} == {queue}
    assert routemq_left(source) == []


def test_a_routemq_worker_reserving_meanwhile_stops_the_import(
    source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    log = str(tmp_path / "runs.log")
    seed = Seed(source, log, queue)
    total = 300
    for n in range(total):
        seed.pend(n)
    pending_key = f"routemq:queue:{queue}"
    reserved_key = f"{pending_key}:reserved"
    env = env_for(redis_url, queue)
    took: list[bytes] = []

    def routemq_worker() -> None:
        # RouteMQ's pop: RPOPLPUSH from the tail into the reserved list, once the import has
        # started on the waiting jobs.
        client = redis.Redis.from_url(redis_url)
        try:
            deadline = time.monotonic() + 30
            while client.llen(pending_key) == total and time.monotonic() < deadline:
                time.sleep(0.002)
            item = client.rpoplpush(pending_key, reserved_key)
            if item is not None:
                took.append(item)
        finally:
            client.close()

    thread = threading.Thread(target=routemq_worker)
    thread.start()
    try:
        done = command(env, "queue:import-routemq", "--batch", "1")
    finally:
        thread.join(30)

    assert len(took) == 1
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "a RouteMQ worker reserved a job" in done.stderr
    assert source.lrange(reserved_key, 0, -1) == took  # RouteMQ's job left with RouteMQ
    worker = WorkerProcess(["--queue", queue, "--stop-when-empty"], env, tmp_path / "w.log")
    assert worker.wait(60) == 0, worker.output
    counted = runs(log)
    left = source.llen(pending_key)
    assert set(counted.values()) == {1}
    assert len(counted) + left + 1 == total  # imported, still waiting, RouteMQ's: each once
    assert source.hlen("routemq:import:working") == 0


def test_a_second_import_at_once_is_refused(
    source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    Seed(source, str(tmp_path / "runs.log"), queue).pend(1)
    import socket

    # Held by a live process of this host (this test's own).
    source.set("routemq:import:lock", f"{socket.gethostname()} {os.getpid()} abc", px=30_000)

    done = command(env_for(redis_url, queue), "queue:import-routemq")

    assert done.returncode == 1
    assert "another import of routemq:* keys is running" in done.stderr
    assert source.llen(f"routemq:queue:{queue}") == 1


def test_a_cluster_source_is_refused_and_a_cluster_destination_is_fed(
    redis_cluster: Any, source: redis.Redis, redis_url: str, queue: str, tmp_path: Path
) -> None:
    redis_cluster.flush()
    log = str(tmp_path / "runs.log")
    seed = Seed(source, log, queue)
    for n in range(5):
        seed.pend(n)
    seed.fail(9)
    node = redis_cluster.nodes.split(",")[0]
    env = {
        **env_for("redis://127.0.0.1:6379/0", queue),
        "REDIS_CLUSTER_NODES": redis_cluster.nodes,
    }

    no_source = command(env, "queue:import-routemq")
    assert no_source.returncode == 1 and "give --from" in no_source.stderr
    refused = command(env, "queue:import-routemq", "--from", f"redis://{node}/0")
    assert refused.returncode == 1 and "is a Redis Cluster node" in refused.stderr

    done = command(env, "queue:import-routemq", "--from", redis_url, "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout)["moved"] == 6
    worker = WorkerProcess(["--queue", queue, "--stop-when-empty"], env, tmp_path / "w.log")
    assert worker.wait(60) == 0, worker.output
    assert runs(log) == Counter(range(5))
    assert [row["queue"] for row in failed_rows(env, queue)] == [queue]
    assert routemq_left(source) == []
