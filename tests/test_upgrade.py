"""A rolling upgrade from today's release to this checkout, with real processes on both sides.

An earlier release (each of `OLD_COMMITS`: main before issue #12, schema version 2, main
before issue #13, schema version 3, and main before issue #14, schema version 4) is checked out
with `git worktree add` into a temporary directory (removed afterwards) and run with this
environment's Python but `PYTHONPATH` (and the working directory) pointing at that worktree,
so its processes import the old `core`. The jobs (tests/upgrade_jobs.py, copied into the
worktree) append one line per run to a file that both sides share, so every run is counted.

On Redis, an SQLite file and MariaDB:
- what the old release left (ready, delayed and bulk jobs, a failed record) is read by the new
  one and run by a new worker; `queue:retry` of the new release takes the old failed record;
- side by side on one queue: old worker + new dispatcher, new worker + old dispatcher, then
  both workers and both dispatchers at once; nothing lost, nothing run twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.processes import ROOT, WorkerProcess, wait_until
from tests.upgrade_jobs import read

pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(240)]

OLD_COMMITS = {
    "before-12": "2c381ca",  # main as released before issue #12 (job lifecycle)
    "before-13": "5320e4d",  # main as released before issue #13 (workflows; schema v4)
    "before-14": "b66898e",  # main as released before issue #14 (IoT-native; schema v5)
}

#: A dispatcher process: runs with either side's `core` (the working directory and PYTHONPATH
#: say which), pushes the jobs argv[1] describes and prints their ids and where `core` was.
DISPATCH = """
import asyncio, json, sys

import core
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.upgrade_jobs import CountJob, GateJob


def build(spec):
    if spec.get("gate"):
        return GateJob(spec["log"], spec["gate"], spec["n"])
    return CountJob(spec["log"], spec["n"])


async def main():
    manager = QueueManager(Settings.load(env_file=None))
    ids = []
    try:
        for op in json.loads(sys.argv[1]):
            queue, delay = op.get("queue"), op.get("delay")
            if op["kind"] == "bulk":
                jobs = [build(spec) for spec in op["jobs"]]
                ids += [str(i) for i in await manager.bulk(jobs, queue, delay=delay)]
            else:
                ids.append(str(await manager.push(build(op), queue, delay=delay)))
    finally:
        await manager.close()
    print(json.dumps({"core": core.__file__, "ids": ids}))


asyncio.run(main())
"""


@dataclass(frozen=True)
class Side:
    """One release: its source tree, run as separate processes."""

    name: str
    root: Path

    def env(self, backend: Backend) -> dict[str, str]:
        return {**backend.env(), "PYTHONPATH": str(self.root), "PYTHONUNBUFFERED": "1"}

    def dispatcher(self, backend: Backend, ops: list[dict[str, Any]]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", DISPATCH, json.dumps(ops)],
            cwd=self.root,
            env={**os.environ, **self.env(backend)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def collect(self, proc: subprocess.Popen[str]) -> list[str]:
        """The ids a dispatcher printed; fails naming its stderr if it did not succeed."""
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{self.name} dispatcher failed: {err[-3000:]}"
        answer = json.loads(out.strip().splitlines()[-1])
        # It really ran this side's code, not the other's.
        assert Path(answer["core"]).resolve().is_relative_to(self.root.resolve()), answer
        ids: list[str] = answer["ids"]
        return ids

    def dispatch(self, backend: Backend, ops: list[dict[str, Any]]) -> list[str]:
        return self.collect(self.dispatcher(backend, ops))

    def worker(self, backend: Backend, args: list[str], log: Path) -> WorkerProcess:
        return SideWorker(self, ["queue:work", *args], self.env(backend), log)

    def command(self, backend: Backend, args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(self.root / "main.py"), *args],
            cwd=self.root,
            env={**os.environ, **self.env(backend)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


class SideWorker(WorkerProcess):
    """`python main.py queue:work …` of one side (tests.processes runs this checkout's only)."""

    def __init__(self, side: Side, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(side.root / "main.py"), *args],
                cwd=side.root,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )


@pytest.fixture(scope="module", params=sorted(OLD_COMMITS))
def old_tree(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """An earlier release checked out beside this one (a git worktree, removed afterwards)."""
    commit = OLD_COMMITS[request.param]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    known = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if known.returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone (a shallow clone?)")
    where = tmp_path_factory.mktemp("old-release") / "topiq"
    added = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    try:
        # The jobs, in both trees (the old one has no such module).
        shutil.copy(ROOT / "tests" / "upgrade_jobs.py", where / "tests" / "upgrade_jobs.py")
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
            capture_output=True,
            check=False,
        )
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], check=False)


@pytest.fixture
def old(old_tree: Path, server_backend: Backend) -> Side:
    if server_backend.kind == "cluster":
        pytest.skip("releases before issue #17 have no Redis Cluster client")
    return Side("old", old_tree)


@pytest.fixture
def new() -> Side:
    return Side("new", ROOT)


def runs(log: Path) -> list[dict[str, Any]]:
    return [e for e in read(log) if e["event"] == "run"]


def wait_runs(
    log: Path, ns: set[int], workers: list[WorkerProcess], what: str, times: int = 1
) -> None:
    """Wait until the jobs numbered `ns` have run `times` each (a worker that died says why)."""

    def done() -> bool:
        for worker in workers:
            if worker.proc.poll() is not None:
                raise AssertionError(f"a worker exited early: {worker.output[-3000:]}")
        counted = Counter(e["n"] for e in runs(log))
        return all(counted[n] >= times for n in ns)

    try:
        wait_until(done, 60, what)
    except AssertionError:
        counted = Counter(e["n"] for e in runs(log))
        missing = sorted(n for n in ns if counted[n] < times)
        logs = "\n---\n".join(w.output[-2000:] for w in workers)
        raise AssertionError(f"{what}: jobs {missing} never ran; worker output:\n{logs}") from None


def ops(log: Path, first: int, delay: float) -> tuple[list[dict[str, Any]], set[int]]:
    """A dispatcher's mix: ready pushes, delayed pushes, one bulk; numbered from `first`."""
    spec = {"log": str(log)}
    out: list[dict[str, Any]] = [{"kind": "push", **spec, "n": first + i} for i in range(10)]
    out += [{"kind": "push", **spec, "n": first + 10 + i, "delay": delay} for i in range(5)]
    out.append({"kind": "bulk", "jobs": [{**spec, "n": first + 15 + i} for i in range(10)]})
    return out, set(range(first, first + 25))


def left_in(backend: Backend, *queues: str) -> int:
    """Jobs not finished (waiting, delayed or held) on `queues`, as the new release counts:
    an ack that did not take would leave its job held, to run again when its lease ends."""

    async def go() -> int:
        async with QueueManager(backend.settings()) as manager:
            return sum([await manager.size(queue) for queue in queues])

    return asyncio.run(go())


def status_of(backend: Backend, job_id: str) -> Any:
    """The new release's view of a job, through its handle (`queue.job(id).status()`)."""

    async def go() -> Any:
        async with QueueManager(backend.settings()) as manager:
            return await manager.job(job_id).status()

    return asyncio.run(go())


def test_new_release_reads_the_old_releases_waiting_jobs(
    server_backend: Backend, old: Side, tmp_path: Path
) -> None:
    log = tmp_path / "runs.jsonl"
    ready, delayed = old.dispatch(
        server_backend,
        [
            {"kind": "push", "log": str(log), "n": 1},
            {"kind": "push", "log": str(log), "n": 2, "delay": 600},
        ],
    )
    queued = status_of(server_backend, ready)
    assert (str(queued), queued.id, queued.attempts) == ("queued", ready, 0)
    # The old release wrote no record: the class path is known only if the payload is read.
    assert queued.job in ("", "tests.upgrade_jobs:CountJob"), queued
    scheduled = status_of(server_backend, delayed)
    assert (str(scheduled), scheduled.id, scheduled.attempts) == ("scheduled", delayed, 0)


def test_new_worker_runs_what_the_old_release_left(
    server_backend: Backend, old: Side, new: Side, tmp_path: Path
) -> None:
    """Ready, delayed and bulk jobs and a failed record, all left by the old release."""
    log, gate = tmp_path / "runs.jsonl", tmp_path / "gate"
    queue = server_backend.overrides["queue_default"]
    failing = f"{queue}-failing"
    left, expected = ops(log, 0, delay=1.5)
    left.append({"kind": "push", "log": str(log), "gate": str(gate), "n": 99, "queue": failing})
    ids = old.dispatch(server_backend, left)
    # An old worker leaves the failed record (the gate is closed: its one try fails).
    old_worker = old.worker(server_backend, ["--queue", failing, "--stop-when-empty"],
                            tmp_path / "old-worker.log")  # fmt: skip
    try:
        old_worker.wait(60)
    finally:
        old_worker.stop()  # only if it is still running (it should have exited by itself)
    assert [e["n"] for e in read(log) if e["event"] == "try"] == [99], old_worker.output
    assert runs(log) == []

    listed = new.command(server_backend, ["queue:failed", "--json", "--queue", failing])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert ids[-1] in listed.stdout, listed.stdout

    worker = new.worker(server_backend, ["--queue", f"{queue},{failing}", "--concurrency", "4"],
                        tmp_path / "new-worker.log")  # fmt: skip
    try:
        wait_runs(log, expected, [worker], "the old release's jobs run by the new worker")
        gate.touch()
        retried = new.command(server_backend, ["queue:retry", "--queue", failing, "--json"])
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert json.loads(retried.stdout)["retried"] == [ids[-1]], retried.stdout
        wait_runs(log, {99}, [worker], "the old failed job, retried with the new CLI")
    finally:
        worker.stop()
    assert "Traceback" not in worker.output, worker.output[-3000:]
    counted = Counter(e["n"] for e in runs(log))
    assert counted == Counter(expected | {99}), counted  # each exactly once
    assert sorted(e["id"] for e in runs(log) if e["n"] != 99) == sorted(ids[:-1])
    assert left_in(server_backend, queue, failing) == 0
    # The new worker's ack writes the record of a job the old release pushed.
    done = status_of(server_backend, ids[0])
    assert (str(done), done.attempts) == ("succeeded", 1)


def test_old_and_new_side_by_side_on_one_queue(
    server_backend: Backend, old: Side, new: Side, tmp_path: Path
) -> None:
    """A rolling deploy: each worker runs the other side's jobs; then all four at once."""
    log = tmp_path / "runs.jsonl"
    args = ["--concurrency", "4"]
    started: list[WorkerProcess] = []
    try:
        # 1. Old worker, new dispatcher.
        old_worker = old.worker(server_backend, args, tmp_path / "old-1.log")
        started.append(old_worker)
        batch, first = ops(log, 0, delay=0.5)
        new.dispatch(server_backend, batch)
        wait_runs(log, first, [old_worker], "the new release's jobs run by an old worker")
        assert {e["pid"] for e in runs(log)} == {old_worker.proc.pid}

        # 2. The new worker comes up, the old one goes; the old dispatcher still sends.
        new_worker = new.worker(server_backend, args, tmp_path / "new-1.log")
        started.append(new_worker)
        old_worker.stop()
        batch, second = ops(log, 100, delay=0.5)
        old.dispatch(server_backend, batch)
        wait_runs(log, second, [new_worker], "the old release's jobs run by a new worker")
        assert {e["pid"] for e in runs(log) if e["n"] in second} == {new_worker.proc.pid}

        # 3. Both workers and both dispatchers at once.
        again = old.worker(server_backend, args, tmp_path / "old-2.log")
        started.append(again)
        old_ops, third = ops(log, 200, delay=0.3)
        new_ops, fourth = ops(log, 300, delay=0.3)
        sending = [(old, old.dispatcher(server_backend, old_ops * 2)),
                   (new, new.dispatcher(server_backend, new_ops * 2))]  # fmt: skip
        for side, proc in sending:
            side.collect(proc)
        wait_runs(log, third | fourth, [new_worker, again], "both releases' jobs, both workers",
                  times=2)  # fmt: skip
    finally:
        for worker in started:
            worker.stop()
    for worker in started:
        assert "Traceback" not in worker.output, worker.output[-3000:]
    # Every job exactly once (phase 3 sent each number twice: two jobs, two runs).
    counted = Counter(e["n"] for e in runs(log))
    assert counted == Counter({**dict.fromkeys(first | second, 1),
                               **dict.fromkeys(third | fourth, 2)}), counted  # fmt: skip
    assert len({e["id"] for e in runs(log)}) == len(runs(log)), "a job ran twice"
    assert left_in(server_backend, server_backend.overrides["queue_default"]) == 0
