"""`queue:work --processes N`: a real parent process supervising N real worker processes.

The children of a pool are found through /proc: each carries `TOPIQ_POOL_PARENT=<parent pid>` in
its environment, which still names them after their parent died (an orphan would show up).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import pytest

from core.cli import _subparser, build_parser, main
from core.commands import work
from core.job import Job
from core.queue.drivers.base import WorkerInfo
from core.queue.queue_manager import QueueManager
from core.worker.pool import MAX_PROCESSES, PARENT_ENV
from tests.conftest import ROOT, Backend
from tests.jobs import RecordJob, events, record
from tests.processes import WorkerProcess, wait_until

T = TypeVar("T")

pytestmark = [pytest.mark.process, pytest.mark.timeout(180)]

REDIS_AND_DATABASE = pytest.mark.parametrize("server_backend", ["redis", "mysql"], indirect=True)
REDIS = pytest.mark.parametrize("server_backend", ["redis"], indirect=True)


class MeetJob(Job):
    """Records `start`, then waits until `count` jobs have started, then records `done`.

    With `--concurrency 1`, `count` of them can all be inside at once only if `count` distinct
    processes run them: a test that ends proves that many workers took part.
    """

    timeout = 60

    def __init__(self, log: str, n: int, count: int) -> None:
        self.log = log
        self.n = n
        self.count = count

    async def handle(self) -> None:
        record(self.log, event="start", n=self.n, id=self.job_id)
        # Other processes tell us through a file, which offers no event to await.
        while len(events(self.log, "start")) < self.count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        record(self.log, event="done", n=self.n, id=self.job_id, attempts=self.attempts)


class HoldJob(Job):
    """Records `start` (with its pid) and `done`; on its first try holds `hold` seconds between
    them, long enough to be caught running by a SIGKILL."""

    timeout = 6  # a job lost with its worker comes back within timeout + lease margin

    def __init__(self, log: str, n: int, hold: float = 0.0) -> None:
        self.log = log
        self.n = n
        self.hold = hold

    async def handle(self) -> None:
        record(self.log, event="start", n=self.n, id=self.job_id, attempts=self.attempts)
        if self.hold and self.attempts == 1:
            await asyncio.sleep(self.hold)
        record(self.log, event="done", n=self.n, id=self.job_id, attempts=self.attempts)


# -- helpers --------------------------------------------------------------------------------


def children(parent: int) -> set[int]:
    """Live processes started by the pool `parent` (zombies have no environment left)."""
    marker = f"{PARENT_ENV}={parent}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (an exited child its adopter has not reaped yet is a
    zombie: state Z)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@contextmanager
def pool(
    processes: int, args: list[str], env: dict[str, str], tmp_path: Path
) -> Iterator[WorkerProcess]:
    """`queue:work --processes N ARGS`; whatever happens, neither it nor a child outlives the
    test (a child left behind is killed here, by the pid this pool gave it)."""
    parent = WorkerProcess(["--processes", str(processes), *args], env, tmp_path / "pool.log")
    try:
        yield parent
    finally:
        parent.stop()
        for pid in children(parent.proc.pid):
            with suppress(ProcessLookupError):  # it may end on its own meanwhile
                os.kill(pid, signal.SIGKILL)


def on_backend(backend: Backend, action: Callable[[QueueManager], Awaitable[T]]) -> T:
    """`action(manager)` on a fresh manager in its own event loop."""

    async def go() -> T:
        async with QueueManager(backend.settings()) as manager:
            return await action(manager)

    return asyncio.run(go())


def send(backend: Backend, jobs: Sequence[Job]) -> list[str]:
    async def go(manager: QueueManager) -> list[str]:
        return [handle.id for handle in await manager.bulk(jobs)]

    return on_backend(backend, go)


def registered_workers(
    backend: Backend, ready: Callable[[list[WorkerInfo]], bool], timeout: float = 60
) -> list[WorkerInfo]:
    """The workers registered on the backend, once `ready(them)` (heartbeats are writes to the
    backend with nothing to subscribe to: read every 0.1 s, bounded)."""

    async def go(manager: QueueManager) -> list[WorkerInfo]:
        driver = await manager.connection()
        async with asyncio.timeout(timeout):
            while True:
                found = await driver.workers()
                if ready(found):
                    return found
                await asyncio.sleep(0.1)

    return on_backend(backend, go)


def pool_up(backend: Backend, parent: WorkerProcess, processes: int) -> dict[int, str]:
    """Wait until the pool runs `processes` children, each registered as a worker; their pids
    and worker ids then."""
    pid = parent.proc.pid
    wait_until(lambda: len(children(pid)) == processes, 60, f"{processes} children")
    seen: dict[int, str] = {}

    def all_registered(found: list[WorkerInfo]) -> bool:
        mine = children(pid)
        seen.clear()
        seen.update({w.pid: w.id for w in found if w.pid in mine})
        return len(mine) == processes == len(seen)

    registered_workers(backend, all_registered)
    return seen


def exit_code(parent: WorkerProcess, timeout: float) -> int:
    """The parent's exit code; on a timeout, a failure that shows its log's end."""
    try:
        return parent.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the pool did not exit within {timeout:g}s; its log ends:\n{parent.output[-6000:]}"
        ) from None


def queue_size(backend: Backend) -> int:
    async def go(manager: QueueManager) -> int:
        return await manager.size(manager.settings.queue_default)

    return on_backend(backend, go)


# -- N children, all working ----------------------------------------------------------------


@REDIS_AND_DATABASE
def test_n_children_start_and_each_runs_jobs(server_backend: Backend, tmp_path: Path) -> None:
    log = str(tmp_path / "events.jsonl")
    with pool(3, ["--concurrency", "1"], server_backend.env(), tmp_path) as parent:
        workers = pool_up(server_backend, parent, 3)
        ids = send(server_backend, [MeetJob(log, n, 3) for n in range(3)])
        wait_until(lambda: len(events(log, "done")) == 3, 60, "the 3 jobs to meet")
        parent.signal(signal.SIGTERM)
        assert exit_code(parent, 60) == 0, parent.output[-4000:]
    done = events(log, "done")
    assert {e["id"] for e in done} == set(ids)
    assert {e["pid"] for e in done} == set(workers)  # three processes, each ran one
    assert len(set(workers.values())) == 3  # queue:stats / the dashboard list three workers
    assert "worker pool starting: 3 worker processes" in parent.output
    assert parent.output.count("stopped (signal)") == 3


# -- a child killed -------------------------------------------------------------------------


@REDIS_AND_DATABASE
def test_a_child_killed_with_sigkill_is_replaced_and_loses_nothing(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    victim_n = 50
    jobs = [HoldJob(log, n, hold=4.0 if n == victim_n else 0.0) for n in range(200)]
    with pool(2, ["--concurrency", "2"], server_backend.env(), tmp_path) as parent:
        before = set(pool_up(server_backend, parent, 2))
        ids = send(server_backend, jobs)

        def victim_started() -> list[int]:
            return [e["pid"] for e in events(log, "start") if e["n"] == victim_n]

        wait_until(lambda: bool(victim_started()), 60, "the victim job to start")
        [victim] = victim_started()  # in the middle of its 4 s hold
        assert victim in before
        # Listed as running by a heartbeat: that beat renewed its lease to its own timeout (the
        # reservation's lease is the default timeout's), so it comes back within seconds.
        registered_workers(
            server_backend, lambda found: any(ids[victim_n] in w.running for w in found)
        )
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: {e["id"] for e in events(log, "done")} >= set(ids), 90, "every job to be done"
        )
        after = set(pool_up(server_backend, parent, 2))
        assert victim not in after and len(after & before) == 1  # only the victim was replaced
        assert re.search(
            rf"worker process \d \(pid {victim}\) was killed by SIGKILL", parent.output
        )
    done = events(log, "done")
    # None lost. (A job the victim had finished but not yet acknowledged runs again: at least
    # once, as with any worker killed with -9.)
    assert {e["id"] for e in done} == set(ids)
    [again] = [e for e in done if e["n"] == victim_n]
    assert again["attempts"] == 2 and again["pid"] != victim  # it came back after its lease


# -- stopping the parent --------------------------------------------------------------------


@REDIS
def test_sigterm_to_the_parent_stops_every_child_gracefully(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    with pool(3, ["--grace", "20"], server_backend.env(), tmp_path) as parent:
        pids = pool_up(server_backend, parent, 3)
        send(server_backend, [MeetJob(log, n, 3) for n in range(3)])
        # Each child is inside a job (they cannot finish before all three started).
        wait_until(lambda: len(events(log, "start")) == 3, 60, "a job to start in each child")
        parent.signal(signal.SIGTERM)
        assert exit_code(parent, 60) == 0, parent.output[-4000:]
        assert not children(parent.proc.pid) and not any(alive(p) for p in pids)
    done = events(log, "done")
    assert len(done) == 3 and all(e["attempts"] == 1 for e in done)  # finished, not cut off
    assert parent.output.count("stopped (signal)") == 3
    assert "worker pool stopped (exit code 0)" in parent.output
    assert queue_size(server_backend) == 0


@REDIS
def test_a_second_sigterm_makes_the_children_hand_their_jobs_back(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    with pool(2, ["--grace", "60"], server_backend.env(), tmp_path) as parent:
        pool_up(server_backend, parent, 2)
        # They never meet (99 would have to start): each runs until it is cancelled.
        ids = send(server_backend, [MeetJob(log, n, 99) for n in range(2)])
        wait_until(lambda: len(events(log, "start")) == 2, 60, "both jobs to start")
        parent.signal(signal.SIGTERM)
        # Each child has handled the first (two signals still pending in a process are one).
        wait_until(
            lambda: parent.output.count("stopping (signal)") == 2, 30, "the children to stop"
        )
        parent.signal(signal.SIGTERM)
        assert exit_code(parent, 30) == 0, parent.output[-4000:]  # long before the 60 s grace
        assert not children(parent.proc.pid)
    assert "second stop signal (SIGTERM) sent to 2 worker process(es)" in parent.output
    assert events(log, "done") == []
    assert queue_size(server_backend) == len(ids)  # handed back, waiting for the next worker


@REDIS
def test_sigkill_to_the_parent_leaves_no_orphan(server_backend: Backend, tmp_path: Path) -> None:
    log = str(tmp_path / "events.jsonl")
    with pool(2, ["--grace", "20"], server_backend.env(), tmp_path) as parent:
        pids = pool_up(server_backend, parent, 2)
        ids = send(server_backend, [MeetJob(log, n, 2) for n in range(2)])
        wait_until(lambda: len(events(log, "start")) == 2, 60, "a job to start in each child")
        parent.proc.kill()
        parent.wait(10)
        # The children notice by themselves (the kernel's parent-death signal) and stop as on
        # SIGTERM: their running jobs finish within the grace.
        wait_until(
            lambda: not children(parent.proc.pid) and not any(alive(p) for p in pids),
            30,
            "the orphaned children to exit",
        )
    done = events(log, "done")
    assert {e["id"] for e in done} == set(ids) and all(e["attempts"] == 1 for e in done)
    assert parent.output.count("this worker stops as on SIGTERM") == 2
    assert parent.output.count("stopped (signal)") == 2


# -- limits per process, queue:restart ------------------------------------------------------


@REDIS_AND_DATABASE
def test_max_jobs_applies_per_process_and_children_are_replaced(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    args = ["--max-jobs", "5", "--concurrency", "1", "--prefetch", "0"]
    with pool(2, args, server_backend.env(), tmp_path) as parent:
        pool_up(server_backend, parent, 2)
        ids = send(server_backend, [RecordJob(log, n) for n in range(30)])
        wait_until(lambda: len(events(log, "run")) >= 30, 120, "30 jobs to run")
        # At most 5 each, and the two children alive at the end have run at most 4 each: at
        # least five children reach 5 and exit, and the parent replaces each.
        wait_until(
            lambda: parent.output.count(") stopped after") >= 5, 60, "five children replaced"
        )
        parent.signal(signal.SIGTERM)
        assert exit_code(parent, 60) == 0, parent.output[-4000:]
    runs = events(log, "run")
    assert Counter(e["id"] for e in runs) == Counter(ids)  # all 30, once each
    per_process = Counter(e["pid"] for e in runs)
    assert max(per_process.values()) <= 5 and len(per_process) >= 6
    assert parent.output.count("stopped (max-jobs) after 5 jobs") >= 5


@REDIS
def test_queue_restart_replaces_every_child(server_backend: Backend, tmp_path: Path) -> None:
    env = server_backend.env()
    with pool(3, [], env, tmp_path) as parent:
        before = set(pool_up(server_backend, parent, 3))
        restart = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "python"), "main.py", "queue:restart"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert restart.returncode == 0, restart.stderr

        def replaced() -> bool:
            now = children(parent.proc.pid)
            return len(now) == 3 and not now & before

        wait_until(replaced, 60, "every child to exit and come back with a new pid")
        pool_up(server_backend, parent, 3)  # the fresh ones work (registered)
        assert parent.proc.poll() is None
    assert parent.output.count("stopped (restart)") == 3


@REDIS
def test_stop_when_empty_drains_the_pool_and_exits_0(
    server_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    ids = send(server_backend, [RecordJob(log, n) for n in range(40)])
    with pool(2, ["--stop-when-empty"], server_backend.env(), tmp_path) as parent:
        assert exit_code(parent, 60) == 0, parent.output[-4000:]
        assert not children(parent.proc.pid)
    assert Counter(e["id"] for e in events(log, "run")) == Counter(ids)
    assert parent.output.count("found its queues empty (--stop-when-empty); not replaced") == 2


# -- a child that fails at start ------------------------------------------------------------


def _two_ports() -> tuple[socket.socket, int]:
    """A listening socket on port P (so P is taken) where P+1 is free."""
    while True:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        port: int = taken.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                taken.close()
                continue
        taken.listen()
        return taken, port


@REDIS
def test_a_child_failing_at_start_is_restarted_with_backoff(
    server_backend: Backend, tmp_path: Path
) -> None:
    taken, port = _two_ports()
    with taken, pool(2, ["--metrics-port", str(port)], server_backend.env(), tmp_path) as parent:
        # Process 0 cannot bind P (taken): it exits with code 2 at once, again and again.
        wait_until(lambda: "again in 2s" in parent.output, 60, "the third failure")
        # Process 1 serves on P+1 meanwhile.
        with socket.create_connection(("127.0.0.1", port + 1), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b"".join(iter(lambda: conn.recv(65536), b""))
        assert reply.startswith(b"HTTP/1.1 200") or reply.startswith(b"HTTP/1.0 200")
        parent.signal(signal.SIGTERM)
        parent.wait(60)
    delays = re.findall(
        r"worker process 0 \(pid \d+\) exited with code 2 [\d.]+s after start "
        r"\((\d+) time\(s\) in a row soon after starting\); starting it again in ([\d.]+)s",
        parent.output,
    )
    assert delays[:3] == [("1", "0.5"), ("2", "1"), ("3", "2")], parent.output[-4000:]
    assert "worker process 1" not in "".join(
        line for line in parent.output.splitlines() if "soon after starting" in line
    )


# -- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", str(MAX_PROCESSES + 1)])
def test_bad_processes_values_are_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--env-file", os.devnull, "queue:work", "--processes", value])
    assert exit_.value.code == 2
    assert "argument --processes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--connection", "memory"], "the memory connection is inside one process"),
        (["--connection", "sync"], "the sync connection is inside one process"),
        (["--metrics-port", "65535"], "65536 is past 65535"),
        (["--failed"], "--processes has no meaning with it"),
    ],
)
def test_processes_refuses_what_cannot_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--env-file", os.devnull, "queue:work", "--processes", "2", *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_each_child_gets_every_flag_the_scheduler_once_and_its_own_port() -> None:
    parser = build_parser("queue:work")
    args = parser.parse_args(
        [
            "queue:work",
            "--queue",
            "a,b",
            "--max-jobs",
            "5",
            "--max-time",
            "60",
            "--poll",
            "0.5",
            "--attempts",
            "3",
            "--concurrency",
            "4",
            "--prefetch",
            "1",
            "--grace",
            "10",
            "--timeout",
            "9",
            "--connection",
            "redis",
            "--stop-when-empty",
            "--with-scheduler",
            "--metrics-port",
            "9100",
            "--processes",
            "3",
        ]
    )
    args.settings_file = Path("/etc/topiq.env")
    first, second = work._child_argv(args, 0), work._child_argv(args, 1)
    assert first[first.index("--env-file") + 1] == "/etc/topiq.env"
    tail = " ".join(first[first.index("queue:work") :])
    for flag in (
        "--queue a,b",
        "--max-jobs 5",
        "--max-time 60.0",
        "--sleep 0.5",
        "--max-tries 3",
        "--concurrency 4",
        "--prefetch 1",
        "--grace 10.0",
        "--timeout 9.0",
        "--connection redis",
        "--stop-when-empty",
        "--metrics-port 9100",
    ):
        assert flag in tail
    assert "--processes" not in first
    assert "--with-scheduler" in first and "--with-scheduler" not in second
    assert second[second.index("--metrics-port") + 1] == "9101"
    # A flag added to queue:work must be passed on or named as not passed.
    dests = {action.dest for action in _subparser(parser, "queue:work")._actions}
    known = {*work._PASSED, *work._PASSED_SWITCHES, *work._NOT_PASSED, "help"}
    assert dests <= known, dests - known


def test_an_orphan_that_cannot_stop_ends_itself_after_its_grace() -> None:
    """A child whose parent is gone and whose worker does not stop (here `stop` does nothing)
    exits by itself once its grace and the margin are over: never an orphan forever."""
    code = (
        "import asyncio, sys, core.worker.pool as pool\n"
        "pool.ORPHAN_MARGIN = 0.5\n"
        "async def main():\n"
        "    link = pool.ParentLink(parent=-1)  # not this process's parent: it counts as gone\n"
        "    link.attach(lambda: None, grace=0.5)\n"
        "    await asyncio.sleep(30)\n"
        "    print('still alive')\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "still alive" not in proc.stdout
    assert "has not stopped within 1s; exiting" in proc.stderr
    assert time.monotonic() - started < 25
