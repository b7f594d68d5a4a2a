"""Hostile review of issue #16's worker side, as an unlucky operator meets it: real
`python main.py queue:work` processes on redis, sqlite and mysql, killed -9 or stopped
(SIGTERM) at the worst moments of a multi-step job (after a step, in its post-task hook, in
RQ's success callback), callbacks and hooks that hang, swallow their cancellation or raise
BaseException, a workspace that is not JSON, and the CLI's `queue:prune --older-than` and
`queue:job` given hostile input.

A test marked `xfail(strict=True)` shows a defect (see /work/notes/review16-breakit-worker.md);
it passes once the product is fixed, and strict makes CI say so. The jobs, steps, hooks and
callbacks live here; worker processes import them (`tests.` is an allowed module). Every one
of them records what happened as a JSON line in the file named by ADV16_LOG.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from core.errors import JobFailedError, JobNotFoundError
from core.job import Job
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conftest import ROOT, Backend
from tests.jobs import events, record
from tests.processes import WorkerProcess

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

HERE = "tests.test_seed_adversarial_worker"
WAIT = 40.0


def note(event: str, **fields: Any) -> None:
    record(os.environ["ADV16_LOG"], event=event, **fields)


def hung_before(job_id: str | None) -> bool:
    """Whether the job hung already (in any process): it hangs on its first run only."""
    return any(e.get("id") == job_id for e in events(os.environ["ADV16_LOG"], "hanging"))


# -- jobs -----------------------------------------------------------------------------------


class ThreeSteps(Job):
    """Three sync steps; each records the workspace it found, then appends its index to
    `workspace["done"]`. `hang` says where its first try hangs (so the test can strike there):
    "step1" (in step 1, async), "post1" (the post-task hook after step 1), or nothing."""

    max_tries = 3
    timeout = 20
    steps = ["one", "two", "three"]
    post_task_hook = "post"
    workspace: dict[str, Any]  # created by the worker for a step job

    def __init__(self, hang: str = "") -> None:
        self.hang = hang

    def _step(self, index: int) -> None:
        note(
            "step",
            id=self.job_id,
            i=index,
            attempts=self.attempts,
            done=list(self.workspace.get("done", [])),
        )
        self.workspace.setdefault("done", []).append(index)
        note("step_end", id=self.job_id, i=index, attempts=self.attempts)

    def one(self) -> None:
        self._step(0)

    async def two(self) -> None:
        if self.hang == "step1" and not hung_before(self.job_id):
            note("hanging", id=self.job_id, where="step1", attempts=self.attempts)
            await asyncio.sleep(60)
        self._step(1)

    def three(self) -> None:
        self._step(2)

    async def post(self) -> None:
        done = self.workspace.get("done", [])
        note("post", id=self.job_id, after=len(done) - 1, attempts=self.attempts)
        if self.hang == "post1" and done == [0, 1] and self.attempts == 1:
            note("hanging", id=self.job_id, where="post1", attempts=self.attempts)
            await asyncio.sleep(60)


async def slow_success(job: Any, connection: str, result: Any) -> None:
    """A success callback that hangs on the first try (where the test kills the worker)."""
    note("callback", id=job.job_id, attempts=job.attempts, result=result)
    if job.attempts == 1:
        await asyncio.sleep(60)


def blocking_success(job: Any, connection: str, result: Any) -> None:
    """A sync success callback that outlives its 1 s timeout by 4 s, in its thread."""
    note("cb_start", id=job.job_id, attempts=job.attempts, t=time.time())
    if job.attempts == 1:
        time.sleep(4)
    note("cb_end", id=job.job_id, attempts=job.attempts, t=time.time())


async def stubborn_success(job: Any, connection: str, result: Any) -> None:
    """An async success callback that swallows its cancellation and runs on 6 s more."""
    note("cb_start", id=job.job_id)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        note("cb_cancelled", id=job.job_id)
        await asyncio.sleep(6)
    note("cb_end", id=job.job_id)


def exiting_success(job: Any, connection: str, result: Any) -> None:
    note("cb_start", id=job.job_id, attempts=job.attempts)
    raise SystemExit(3)


async def briefly_stubborn_success(job: Any, connection: str, result: Any) -> None:
    """Swallows its cancellation and returns 0.3 s later (within the worker's `stop_within`)."""
    note("cb_start", id=job.job_id)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await asyncio.sleep(0.3)
    note("cb_end", id=job.job_id)


async def interrupting_success(job: Any, connection: str, result: Any) -> None:
    note("cb_start", id=job.job_id, attempts=job.attempts)
    raise KeyboardInterrupt


class Plain(Job):
    max_tries = 2
    timeout = 10

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def handle(self) -> str:
        note("handle", id=self.job_id, attempts=self.attempts)
        return self.tag


class FailsAlways(Job):
    max_tries = 1
    timeout = 5

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def handle(self) -> None:
        note("handle", id=self.job_id, attempts=self.attempts)
        raise RuntimeError("always")


class Nap(Job):
    max_tries = 1
    timeout = 10

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def handle(self) -> None:
        note("handle", id=self.job_id, attempts=self.attempts)
        await asyncio.sleep(self.seconds)


class SlowStep(ThreeSteps):
    """Step 1 of its first run takes 2.5 s (the worker is frozen there); timeout 4 s."""

    timeout = 4
    max_tries = 3

    async def two(self) -> None:
        if not hung_before(self.job_id):
            note("hanging", id=self.job_id, where="step1", attempts=self.attempts)
            await asyncio.sleep(2.5)
        self._step(1)


def with_success(job: Job, path: str, timeout: float) -> Job:
    job.__dict__["_topiq_callbacks"] = {"success": {"path": f"{HERE}:{path}", "timeout": timeout}}
    return job


def hang_forever_sync(job: Any) -> None:
    note("post_hang", id=job.job_id)
    time.sleep(3600)


class SyncPostHookHangs(Job):
    """ddq users write sync hooks; this one never returns."""

    max_tries = 1
    timeout = 5
    post_task_hook = f"{HERE}:hang_forever_sync"

    async def handle(self) -> str:
        return "ran"


def raising_failure_hook(job: Any, exc: BaseException) -> None:
    note("failure_hook", id=job.job_id, error=str(exc))
    raise RuntimeError("the failure hook broke")


def recording_post(job: Any) -> None:
    note("post", id=job.job_id)


class FailsEverywhere(Job):
    """Fails, and so do its Masonite `failed(payload, error)` and its ddq failure hook."""

    max_tries = 1
    timeout = 5
    failure_hook = f"{HERE}:raising_failure_hook"
    post_task_hook = f"{HERE}:recording_post"

    async def handle(self) -> None:
        raise ZeroDivisionError("division by zero")

    def failed(self, payload: dict[str, Any], error: BaseException) -> None:  # type: ignore[override]
        note("failed", id=self.job_id, error=str(error), keys=sorted(payload))
        raise RuntimeError("failed() broke")


class NotJsonWorkspace(Job):
    """Step 0 is fine; step 1 leaves a set in the workspace."""

    max_tries = 1
    timeout = 10
    steps = ["fine", "bad"]
    post_task_hook = f"{HERE}:recording_post"
    workspace: dict[str, Any]

    def fine(self) -> None:
        self.workspace["rows"] = [1, 2]

    def bad(self) -> None:
        self.workspace["seen"] = {1, 2}


# -- helpers --------------------------------------------------------------------------------


class Bench:
    """One backend, a queue of the test's own, the event log, and the workers started."""

    def __init__(self, backend: Backend, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.queue = f"adv-{uuid.uuid4().hex[:8]}"
        self.log = tmp / "events.jsonl"
        self.started: list[WorkerProcess] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.backend.env(), "ADV16_LOG": str(self.log), **extra}

    def worker(self, *args: str, **env: str) -> WorkerProcess:
        n = len(self.started)
        args_ = ["--queue", self.queue, "--grace", "1", *args]
        proc = WorkerProcess(args_, self.env(**env), self.tmp / f"worker-{n}.log")
        self.started.append(proc)
        return proc

    def where(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in events(self.log) if all(e.get(k) == v for k, v in match.items())]

    def tail(self) -> str:
        return "\n".join(
            f"--- worker {i} ---\n{w.output[-3000:]}" for i, w in enumerate(self.started)
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "main.py"), *args],
            cwd=ROOT,
            env={**os.environ, **self.env(), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    @asynccontextmanager
    async def manager(self) -> AsyncIterator[QueueManager]:
        async with QueueManager(self.backend.settings()) as qm:
            yield qm


@pytest.fixture
def bench(server_backend: Backend, tmp_path: Path) -> Any:
    b = Bench(server_backend, tmp_path)
    try:
        yield b
    finally:
        for proc in b.started:
            if proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait(10)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Another process appends to a file: no event to await, so check every 20 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def kill9(proc: WorkerProcess) -> None:
    proc.signal(signal.SIGKILL)
    proc.wait(10)


def check_steps(bench: Bench, job_id: str) -> list[tuple[int, int]]:
    """Every step found exactly the workspace the steps before it leave (never a half-written
    or lost one); returns (step, attempts) in order."""
    steps = bench.where(event="step", id=job_id)
    for e in steps:
        assert e["done"] == list(range(e["i"])), (e, steps)
    return [(e["i"], e["attempts"]) for e in steps]


# -- kill -9 at the worst moments of a step job ----------------------------------------------

# The killed worker's lease: timeout (20 s) + margin; a short margin so the job is free soon.
# The second worker starts once the first is dead; the job comes back when the lease lapses.


async def test_kill_9_right_after_a_step_ends_resumes_without_losing_or_skipping_a_step(
    bench: Bench,
) -> None:
    """Killed between step 1's end and (most likely) its checkpoint: step 1 runs again at most,
    on the workspace step 0 left; nothing is skipped, every later step runs once."""
    async with bench.manager() as qm:
        job = ThreeSteps()
        job.timeout = 3
        handle = await qm.push(job, queue=bench.queue)
        first = bench.worker(QUEUE_LEASE_MARGIN="1")
        await until(
            lambda: bool(bench.where(event="step_end", id=handle, i=1)),
            "step 1 to end\n" + bench.tail(),
        )
        kill9(first)
        bench.worker(QUEUE_LEASE_MARGIN="1")
        result = await qm.job(handle).result(timeout=WAIT)
        assert result == {"done": [0, 1, 2]}, bench.tail()
        ran = check_steps(bench, handle)
        # Step 0 was saved before step 1 began: never re-run. Step 1 (or step 2, had the kill
        # come later) may run again, at most once, since its checkpoint may not have been saved.
        assert ran.count((0, 1)) == 1 and all(i != 0 for i, a in ran if a > 1), ran
        assert all(ran.count((i, a)) == 1 for i, a in ran), ran


async def test_kill_9_in_the_post_hook_after_a_checkpoint_does_not_rerun_the_step(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        job = ThreeSteps(hang="post1")
        job.timeout = 3
        handle = await qm.push(job, queue=bench.queue)
        first = bench.worker(QUEUE_LEASE_MARGIN="1")
        await until(
            lambda: bool(bench.where(event="hanging", id=handle)), "the post hook\n" + bench.tail()
        )
        kill9(first)
        bench.worker(QUEUE_LEASE_MARGIN="1")
        assert await qm.job(handle).result(timeout=WAIT) == {"done": [0, 1, 2]}, bench.tail()
        assert check_steps(bench, handle) == [(0, 1), (1, 1), (2, 2)]


async def test_kill_9_in_the_success_callback_reruns_the_callback_not_the_steps(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        job = with_success(ThreeSteps(), "slow_success", 30)
        job.timeout = 3
        handle = await qm.push(job, queue=bench.queue)
        first = bench.worker(QUEUE_LEASE_MARGIN="1")
        await until(
            lambda: bool(bench.where(event="callback", id=handle)), "the callback\n" + bench.tail()
        )
        kill9(first)
        bench.worker(QUEUE_LEASE_MARGIN="1")
        assert await qm.job(handle).result(timeout=WAIT) == {"done": [0, 1, 2]}, bench.tail()
        assert check_steps(bench, handle) == [(0, 1), (1, 1), (2, 1)]
        calls = bench.where(event="callback", id=handle)
        assert [c["attempts"] for c in calls] == [1, 2]
        assert calls[1]["result"] == {"done": [0, 1, 2]}


# -- SIGTERM during a step -------------------------------------------------------------------


async def test_sigterm_in_a_step_returns_the_job_with_its_workspace_and_its_try(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        handle = await qm.push(ThreeSteps(hang="step1"), queue=bench.queue)
        first = bench.worker()
        await until(
            lambda: bool(bench.where(event="hanging", id=handle)), "step 1\n" + bench.tail()
        )
        first.signal(signal.SIGTERM)
        assert first.wait(20) == 0, first.output[-3000:]
        assert "returned to its queue" in first.output
        bench.worker()
        assert await qm.job(handle).result(timeout=WAIT) == {"done": [0, 1, 2]}, bench.tail()
        # The try the stop interrupted was not spent: the resumed try is try 1 again, and it
        # starts at step 1 with step 0's workspace.
        assert check_steps(bench, handle) == [(0, 1), (1, 1), (2, 1)]
        assert (await qm.job(handle).status()).attempts == 1


# -- hooks and callbacks that hang, swallow cancellation or raise ----------------------------


async def test_a_sync_post_hook_that_hangs_forever_does_not_keep_the_worker(
    bench: Bench,
) -> None:
    """A sync hook runs in a job thread as a sync `handle` does, never on the event loop:
    SIGTERM is heard at once, the try (still in its post-task hook) goes back to its queue
    within the grace period (1 s), and the process ends, leaving the thread behind."""
    async with bench.manager() as qm:
        handle = await qm.push(SyncPostHookHangs(), queue=bench.queue)
        worker = bench.worker()
        await until(lambda: bool(bench.where(event="post_hang", id=handle)), "the hook")
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        try:
            code = worker.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not end within 30 s of SIGTERM") from None
        took = time.monotonic() - signalled
        assert code == 0 and "returned to its queue" in worker.output, worker.output[-2000:]
        assert "blocked the event loop" not in worker.output
        assert took < 4.5, took  # the grace (1 s) and the process's end, not the timeout (5 s)
        assert (await qm.job(handle).status()).status is Status.QUEUED


async def test_a_sync_post_hook_past_its_timeout_is_given_up_and_the_worker_exits(
    bench: Bench,
) -> None:
    """Without a signal: the hook's thread still runs `stop_within` (1 s) past the job's
    timeout (5 s): given up as a stuck sync `handle` is, the worker takes no new job and
    exits (code 4); the hook's errors are logged only, so the job still succeeded."""
    async with bench.manager() as qm:
        handle = await qm.push(SyncPostHookHangs(), queue=bench.queue)
        worker = bench.worker()
        assert worker.wait(40) == 4, worker.output[-3000:]
        assert "would not stop" in worker.output and "post_task_hook" in worker.output
        assert "blocked the event loop" not in worker.output
        assert await qm.job(handle).result(timeout=WAIT) == "ran"


async def test_a_sync_success_callback_past_its_timeout_never_overlaps_the_retry(
    bench: Bench,
) -> None:
    """The callback runs as a sync `handle` does: in a job thread, given up when it still runs
    `stop_within` (1 s here) past its timeout: the worker stops and exits (code 4, its
    process ending the thread), and the retry is recorded before it exits; the next worker
    runs the retry, never beside the first callback."""
    async with bench.manager() as qm:
        handle = await qm.push(with_success(Plain("x"), "blocking_success", 1), queue=bench.queue)
        first = bench.worker()
        assert first.wait(30) == 4, first.output[-3000:]
        exited = time.time()
        assert "would not stop" in first.output and "retrying" in first.output, first.output
        assert not bench.where(event="cb_end", id=handle, attempts=1)  # it died with its process
        bench.worker()
        assert await qm.job(handle).result(timeout=WAIT) == "x", bench.tail()
        starts = {e["attempts"]: e["t"] for e in bench.where(event="cb_start", id=handle)}
        assert sorted(starts) == [1, 2] and starts[2] >= exited, starts


async def test_an_async_success_callback_that_swallows_cancellation_still_times_out(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        job = with_success(Plain("x"), "stubborn_success", 1)
        job.max_tries = 1
        handle = await qm.push(job, queue=bench.queue)
        worker = bench.worker()
        await until(lambda: bool(bench.where(event="cb_cancelled", id=handle)), "the cancel")
        status = await qm.job(handle).status()
        deadline = time.monotonic() + WAIT
        while (
            status.status not in (Status.SUCCEEDED, Status.FAILED) and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.05)
            status = await qm.job(handle).status()
        assert status.status is Status.FAILED, (status, bench.tail())
        assert "timed out" in (status.error or "")
        # It would not stop (still running 1 s past its cancel): given up as a stuck async
        # handle is, the worker exits (its process ends the callback), never recorded SUCCEEDED.
        assert worker.wait(30) == 4, worker.output[-3000:]
        assert not bench.where(event="cb_end", id=handle)


async def test_an_async_success_callback_that_swallows_cancellation_and_returns_fails_the_try(
    bench: Bench,
) -> None:
    """It returns (late) after swallowing the cancel: the try still timed out (not SUCCEEDED),
    and the worker goes on (the cancel request was taken back: its later awaits work)."""
    async with bench.manager() as qm:
        job = with_success(Plain("x"), "briefly_stubborn_success", 1)
        job.max_tries = 1
        handle = await qm.push(job, queue=bench.queue)
        after = await qm.push(Plain("after"), queue=bench.queue)
        worker = bench.worker()
        with pytest.raises(JobFailedError):
            await qm.job(handle).result(timeout=WAIT)
        status = await qm.job(handle).status()
        assert status.status is Status.FAILED and "timed out" in (status.error or ""), status
        assert bench.where(event="cb_end", id=handle)
        assert await qm.job(after).result(timeout=WAIT) == "after"
        assert worker.proc.poll() is None, bench.tail()


@pytest.mark.parametrize("callback", ["exiting_success", "interrupting_success"])
async def test_a_success_callback_raising_base_exception_fails_the_try_not_the_worker(
    bench: Bench, callback: str
) -> None:
    async with bench.manager() as qm:
        job = with_success(Plain("x"), callback, 5)
        job.max_tries = 1
        handle = await qm.push(job, queue=bench.queue)
        worker = bench.worker()
        await until(lambda: bool(bench.where(event="cb_start", id=handle)), "the callback")
        status = await qm.job(handle).status()
        deadline = time.monotonic() + 15
        while status.status is not Status.FAILED and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            status = await qm.job(handle).status()
        assert status.status is Status.FAILED, (status, bench.tail())
        assert "Exit" in (status.error or "") or "Interrupt" in (status.error or ""), status
        assert worker.proc.poll() is None, "the worker process died\n" + bench.tail()


async def test_failing_failed_and_failure_hook_are_logged_and_the_post_hook_still_runs(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        handle = await qm.push(FailsEverywhere(), queue=bench.queue)
        worker = bench.worker()
        with pytest.raises(JobFailedError):
            await qm.job(handle).result(timeout=WAIT)
        names = [e["event"] for e in bench.where(id=handle)]
        assert names == ["failed", "failure_hook", "post"]
        failed = bench.where(event="failed", id=handle)[0]
        assert failed["error"] == "division by zero"
        status = await qm.job(handle).status()
        assert status.status is Status.FAILED and "ZeroDivisionError" in (status.error or "")
        await until(lambda: "the failure hook broke" in worker.output, "the hook's error logged")
        assert "failed() broke" in worker.output
        assert worker.proc.poll() is None


# -- a workspace that is not JSON ------------------------------------------------------------


async def test_a_workspace_that_is_not_json_names_it_and_the_job_is_kept(bench: Bench) -> None:
    async with bench.manager() as qm:
        handle = await qm.push(NotJsonWorkspace(), queue=bench.queue)
        bench.worker()
        with pytest.raises(JobFailedError):
            await qm.job(handle).result(timeout=WAIT)
        status = await qm.job(handle).status()
        assert status.status is Status.FAILED, bench.tail()
        assert "workspace" in (status.error or "") and "JSON" in (status.error or ""), status
        # Kept in the failed store, with the last checkpoint (step 0's workspace, next step 1).
        out = bench.cli("queue:failed", "--json")
        assert handle in out.stdout, out.stdout + out.stderr


async def test_the_post_hook_runs_for_a_step_whose_checkpoint_failed(bench: Bench) -> None:
    async with bench.manager() as qm:
        handle = await qm.push(NotJsonWorkspace(), queue=bench.queue)
        bench.worker()
        with pytest.raises(JobFailedError):
            await qm.job(handle).result(timeout=WAIT)
        # The failure is recorded after the owed post-task hook ran (if it runs at all).
        assert len(bench.where(event="post", id=handle)) == 2


# -- the CLI given hostile input -------------------------------------------------------------


async def test_queue_job_does_not_write_terminal_escapes_from_a_description(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        job = Plain("x")
        job.__dict__["_topiq_description"] = "evil\x1b]0;pwned\x07\x1b[2J"
        job.__dict__["_topiq_meta"] = {"k\x1b[1m": "v" * 100_000}
        handle = await qm.push(job, queue=bench.queue)
    out = bench.cli("queue:job", handle)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x07" not in out.stdout, repr(out.stdout[:500])


async def test_queue_job_of_a_huge_meta_answers_and_json_keeps_it_whole(bench: Bench) -> None:
    async with bench.manager() as qm:
        job = Plain("x")
        job.__dict__["_topiq_meta"] = {"big": "v" * 100_000, "nested": [[[[1]]]] * 1000}
        handle = await qm.push(job, queue=bench.queue)
    out = bench.cli("queue:job", handle)
    assert out.returncode == 0, out.stderr
    raw = bench.cli("queue:job", handle, "--json")
    assert raw.returncode == 0, raw.stderr
    assert json.loads(raw.stdout)["meta"]["big"] == "v" * 100_000


async def test_queue_prune_older_than_refuses_a_negative_duration(bench: Bench) -> None:
    negative = bench.cli("queue:prune", "--older-than=-5d")
    assert negative.returncode == 2 and "--older-than" in negative.stderr, negative.stderr


async def test_queue_prune_older_than_a_huge_duration_is_no_traceback(bench: Bench) -> None:
    huge = bench.cli("queue:prune", "--older-than", "10000000d")
    assert huge.returncode in (0, 2), huge.stderr[-2000:]
    assert "Traceback" not in huge.stderr, huge.stderr[-2000:]


# -- leases, concurrency ---------------------------------------------------------------------


async def test_a_frozen_worker_whose_lease_lapsed_cannot_write_over_the_new_owner(
    bench: Bench,
) -> None:
    """SIGSTOP the worker in a step until its lease lapses: another worker takes the job and
    finishes it; when the first one wakes up, its checkpoint is refused and it goes no further
    (no later step runs there, the record keeps the second worker's result)."""
    async with bench.manager() as qm:
        handle = await qm.push(SlowStep(), queue=bench.queue)
        first = bench.worker(QUEUE_LEASE_MARGIN="1")
        await until(lambda: bool(bench.where(event="hanging", id=handle)), "step 1")
        first.signal(signal.SIGSTOP)
        try:
            second = bench.worker(QUEUE_LEASE_MARGIN="1")
            result = await qm.job(handle).result(timeout=WAIT)
            assert result == {"done": [0, 1, 2]}, bench.tail()
        finally:
            first.signal(signal.SIGCONT)
        # Woken up, it must stop that try: its checkpoint refused, its lease found lost, or
        # (the loop was frozen past the job's timeout) its watchdog ending the process.
        # Or its step's timeout fires first (then it "retries" by a release that finds the
        # job no longer held: a no-op).
        marks = (
            "reservation was gone",
            "could not be renewed",
            "blocked the event loop",
            "timed out",
        )
        await until(
            lambda: first.proc.poll() is not None or any(m in first.output for m in marks),
            "the first worker to give the try up",
            20,
        )
        # Nothing of its stale try leaked: no "retrying" for a try it no longer held, and no
        # post-task hook of that try after step 0's (the new owner ran the rest).
        assert "retrying" not in first.output, first.output[-3000:]
        check_steps(bench, handle)
        stale = [e for e in bench.where(id=handle) if e["pid"] == first.proc.pid]
        assert all(e.get("i", 0) <= 1 for e in stale), stale
        assert not [e for e in stale if e["event"] == "step" and e["i"] == 2], stale
        assert not [e for e in stale if e["event"] == "post" and e["after"] >= 1], stale
        status = await qm.job(handle).status()
        assert status.status is Status.SUCCEEDED and status.result is not None, status
        assert await qm.job(handle).result(timeout=1) == {"done": [0, 1, 2]}
        assert second.proc.poll() is None, bench.tail()


async def test_two_workers_with_concurrency_4_run_every_step_exactly_once(bench: Bench) -> None:
    async with bench.manager() as qm:
        handles = [await qm.push(ThreeSteps(), queue=bench.queue) for _ in range(16)]
        bench.worker("--concurrency", "4")
        bench.worker("--concurrency", "4")
        for handle in handles:
            assert await qm.job(handle).result(timeout=WAIT) == {"done": [0, 1, 2]}, bench.tail()
        for handle in handles:
            assert check_steps(bench, handle) == [(0, 1), (1, 1), (2, 1)]


# -- the CLI against a live backend ----------------------------------------------------------


async def test_queue_work_failed_twice_at_once_queues_each_job_once(bench: Bench) -> None:
    async with bench.manager() as qm:
        handles = [await qm.push(FailsAlways(str(i)), queue=bench.queue) for i in range(10)]
        worker = bench.worker("--stop-when-empty")
        for handle in handles:
            with pytest.raises(JobFailedError):
                await qm.job(handle).result(timeout=WAIT)
        worker.wait(30)
        env = {**os.environ, **bench.env()}
        args = [sys.executable, str(ROOT / "main.py"), "queue:work", "--failed", "--queue"]
        procs = [
            await asyncio.create_subprocess_exec(
                *args, bench.queue, cwd=ROOT, env=env, stdout=PIPE, stderr=PIPE
            )
            for _ in range(2)
        ]
        outs = [await p.communicate() for p in procs]
        assert all(p.returncode in (0, 1) for p in procs), outs
        driver = await qm.connection()
        stats = await driver.stats(bench.queue)
        assert stats.pending == 10, (stats, outs)
        # Run them: each runs once more, not twice.
        bench.worker("--stop-when-empty").wait(60)
        for handle in handles:
            runs = bench.where(event="handle", id=handle)
            assert len(runs) == 2, (handle, runs)


async def test_queue_prune_older_than_0_while_a_worker_runs_deletes_nothing_alive(
    bench: Bench,
) -> None:
    async with bench.manager() as qm:
        handles = [await qm.push(Nap(0.05), queue=bench.queue) for _ in range(40)]
        bench.worker("--concurrency", "2")
        pruned = 0
        while len(bench.where(event="handle")) < 40 and pruned < 20:
            out = bench.cli("queue:prune", "--older-than", "0", "--json")
            assert out.returncode == 0, out.stderr
            pruned += 1
        await until(lambda: len(bench.where(event="handle")) == 40, "every job", WAIT)
        driver = await qm.connection()
        deadline = time.monotonic() + WAIT
        while True:
            stats = await driver.stats(bench.queue)
            if (stats.pending == 0 and stats.reserved == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert stats.pending == 0 and stats.reserved == 0, stats
        ran = [e["id"] for e in bench.where(event="handle")]
        assert sorted(ran) == sorted(str(h) for h in handles)
        # What is left is consistent: each record is an ended job or was deleted whole. A
        # job's end is written with its acknowledgement, which may still be on its way when
        # its code has run (amqp: the queue's counts do not wait for it): read until it lands.
        for handle in handles:
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    status = await qm.job(handle).status()
                except JobNotFoundError:
                    break
                if status.status is not Status.RUNNING or time.monotonic() > deadline:
                    assert status.status is Status.SUCCEEDED, status
                    break
                await asyncio.sleep(0.05)
