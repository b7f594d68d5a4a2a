"""What workers add for observing (#15): their per-minute history counts (started, first-try
waits, run times) written with the heartbeat through `add_history`, `JobEvent.waited` on the
start of a first try, and a pause honoured by an in-process worker (its prefetched jobs of a
paused queue handed back unspent). Every driver, through the `backend` fixture."""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.events import EventKind, JobEvent, events
from core.execution import first_wait
from core.log import configure_logging
from core.queue.drivers.base import Driver, MinuteCounts
from core.queue.payload import wait_since
from core.queue.queue_manager import QueueManager
from core.settings import LogFormat
from core.worker import history as history_module
from core.worker.history import MAX_ROWS, HistoryCounts
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import ROOT, Backend, docs_example, guide_section, make_settings
from tests.jobs import FlakyJob, RecordJob, SleepJob
from tests.jobs import events as logged

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


@asynccontextmanager
async def running(manager: QueueManager, **options: Any) -> AsyncIterator[Worker]:
    """An in-process worker, stopped (and waited for) on exit."""
    options.setdefault("queues", (manager.settings.queue_default,))
    options.setdefault("sleep", 0.05)
    options.setdefault("handle_signals", False)
    options.setdefault("grace", 5.0)
    worker = Worker(manager, WorkerOptions(**options))
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def until(condition: Any, timeout: float, what: str) -> None:
    """Poll a condition (plain or async) every 20 ms: the backend and the job log offer no
    event to await."""
    deadline = time.monotonic() + timeout
    while not await _holds(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _holds(condition: Any) -> bool:
    answer = condition()
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


def total(rows: list[MinuteCounts], name: str) -> int:
    return sum(getattr(row, name) for row in rows)


@asynccontextmanager
async def listening() -> AsyncIterator[list[JobEvent]]:
    seen: list[JobEvent] = []
    stop = events.subscribe(seen.append)
    try:
        yield seen
    finally:
        stop()


async def test_workers_add_starts_waits_and_run_times_to_the_history(
    backend: Backend, log: str
) -> None:
    async with QueueManager(backend.settings()) as manager:
        queue = manager.settings.queue_default
        driver = await manager.connection()
        await manager.bulk([SleepJob(log, 0.05, n) for n in range(4)])
        flaky = FlakyJob(log, succeed_on=2)
        flaky.retry_after = 0
        await manager.push(flaky)
        async with running(manager, concurrency=2) as worker:
            await until(
                lambda: len(logged(log, "end")) == 4 and logged(log, "done"),
                20,
                "every job to end",
            )

            async def reported() -> bool:  # sent with a heartbeat, while the worker runs
                return total(await driver.history(queue, 3), "ran") == 6

            await until(reported, 10, "the history to be sent with a heartbeat")
            assert worker.processed == 6
        rows = await driver.history(queue, 3)
    assert total(rows, "started") == 6  # 4 + the flaky job's two tries
    assert total(rows, "waited") == 5  # first tries only
    assert total(rows, "ran") == 6
    assert total(rows, "run_ms") >= 4 * 50  # the sleeps, at least
    assert 0 <= total(rows, "wait_ms") < 5 * 10_000
    assert total(rows, "succeeded") == 5  # the driver's own count of ends, beside the workers'


async def test_a_first_start_carries_its_wait_from_dispatch_or_due_time(
    backend: Backend, log: str
) -> None:
    async with listening() as seen, QueueManager(backend.settings()) as manager:
        now = await manager.push(RecordJob(log, 1))
        later = await manager.push(RecordJob(log, 2), delay=2.5)
        flaky = FlakyJob(log, succeed_on=2)
        flaky.retry_after = 0
        retried = await manager.push(flaky)
        after = await manager.push(RecordJob(log, 3), depends_on=now)
        await asyncio.sleep(0.3)  # the ready jobs wait this long before a worker starts
        async with running(manager, concurrency=4):
            await until(
                lambda: len(logged(log, "run")) == 3 and logged(log, "done"),
                20,
                "every job to run",
            )
    starts: dict[tuple[str, int], JobEvent] = {
        (e.job_id, e.attempts): e for e in seen if e.kind is EventKind.STARTED
    }
    waited_now = starts[(now.id, 1)].waited
    assert waited_now is not None and 0.3 <= waited_now < 10
    # The delayed job counts from when it fell due (2.5 s after dispatch), not from dispatch:
    # dispatch-to-start is at least 2.5 s, due-to-start far less (even a loaded machine
    # starts a due job within 2 s).
    waited_later = starts[(later.id, 1)].waited
    assert waited_later is not None and waited_later < 2.0
    assert starts[(retried.id, 1)].waited is not None
    assert starts[(retried.id, 2)].waited is None  # a later try: no wait
    assert starts[(after.id, 1)].waited is None  # when it became ready is not known


def test_the_wait_counts_from_due_at_then_created_at_and_ignores_garbage() -> None:
    now = 1_700_000_100.0
    assert wait_since({"created_at": 1700000000000}) == 1_700_000_000.0
    assert wait_since({"created_at": 1, "due_at": 1700000090000}) == 1_700_000_090.0
    assert wait_since({"created_at": 1, "due_at": None}) is None  # with dependencies
    for garbage in ({}, {"created_at": "x"}, {"created_at": True}, {"created_at": float("nan")}):
        assert wait_since(garbage) is None
    assert first_wait(1, 1_700_000_000.0, now) == 100.0
    assert first_wait(1, 1_700_000_200.0, now) == 0.0  # another host's clock ahead
    assert first_wait(2, 1_700_000_000.0, now) is None  # a later try
    assert first_wait(1, None, now) is None


def test_history_counts_stay_bounded_while_the_backend_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = HistoryCounts()
    minute = int(time.time() // 60)
    for n in range(MAX_ROWS + 50):  # as many queues, each in the current minute
        counts.started(f"q{n}", 0.25)
    assert len(counts) == MAX_ROWS and counts.dropped == 50
    rows = counts.take()
    assert len(counts) == 0 and len(rows) == MAX_ROWS
    assert rows[0] == ("q0", minute, {"started": 1, "waited": 1, "wait_ms": 250})
    counts.started("q0", None)
    counts.put_back(rows)  # the send failed: added to what was counted since
    assert len(counts) == MAX_ROWS
    assert dict(counts.take()[0][2]) == {"started": 2, "waited": 1, "wait_ms": 250}
    # Counts older than the history keeps are dropped rather than sent.
    counts.ran("old", 1.5, at=time.time() - 60 * (history_module.MAX_AGE_MINUTES + 2))
    counts.ran("new", 1.5)
    assert [(q, c) for q, _, c in counts.take()] == [("new", {"ran": 1, "run_ms": 1500})]


async def paused_jobs_state(driver: Driver, queue: str) -> tuple[int, int]:
    stats = await driver.stats(queue)
    return stats.pending, stats.reserved


async def test_a_pause_hands_prefetched_jobs_back_unspent_and_resume_runs_them(
    backend: Backend, log: str
) -> None:
    async with QueueManager(backend.settings()) as manager:
        queue = manager.settings.queue_default
        driver = await manager.connection()
        await manager.push(SleepJob(log, 1.5, 0))
        await manager.bulk([RecordJob(log, n) for n in range(1, 4)])
        async with running(manager, concurrency=1, prefetch=3):

            async def prefetched() -> bool:
                return await paused_jobs_state(driver, queue) == (0, 4)

            await until(prefetched, 10, "the worker to hold every job")
            await driver.pause(queue)
            paused_at = time.monotonic()

            async def handed_back() -> bool:
                return await paused_jobs_state(driver, queue) == (3, 1)

            await until(handed_back, 5, "the prefetched jobs to go back")
            assert time.monotonic() - paused_at < 1.5  # honoured within about a second
            await until(lambda: logged(log, "end"), 10, "the running job to end")
            await asyncio.sleep(0.8)  # paused: the worker, now idle, must take none of them
            assert logged(log, "run") == []
            assert await paused_jobs_state(driver, queue) == (3, 0)
            await driver.resume(queue)
            await until(lambda: len(logged(log, "run")) == 3, 10, "the jobs to run")
    runs = logged(log, "run")
    assert sorted(e["n"] for e in runs) == [1, 2, 3]
    assert {e["attempts"] for e in runs} == {1}  # handed back unspent


# -- the guide's sections (docs/observing.md: pause, health, logs) and their examples -------


@pytest.mark.parametrize(
    ("section", "example"),
    [("pause", "observing_pause"), ("health", "observing_health"), ("logs", "observing_logs")],
)
def test_the_guide_shows_each_example_as_it_is(section: str, example: str) -> None:
    text = guide_section("observing.md", section)
    path = f"docs/examples/{example}.py"
    body = (ROOT / path).read_text()
    assert f"```python\n# {path}\n{body}```" in text


async def test_the_pause_example_pauses_inside_its_block_only(backend: Backend) -> None:
    example = docs_example("observing_pause")
    async with QueueManager(backend.settings()) as manager:
        driver = await manager.connection()
        assert await example.migrate_mail_server(manager) == {"emails"}
        assert await driver.paused(["emails", "default"]) == set()


async def test_the_health_example_answers_503_without_a_worker_and_200_with_one(
    backend: Backend, log: str
) -> None:
    ready = docs_example("observing_health").ready
    async with QueueManager(backend.settings()) as manager:
        status, body = await ready(manager)
        assert (status, body["workers"], body["ok"]) == (503, 0, False)
        assert (await ready(manager, need_workers=False))[0] == 200
        async with running(manager):

            async def one_live() -> bool:
                return (await ready(manager))[0] == 200

            await until(one_live, 10, "the worker's heartbeat")
        status, body = await ready(manager)
        assert (status, body["workers"]) == (503, 0)  # a stopped worker removes itself


async def test_the_logs_example_job_logs_its_fields_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = docs_example("observing_logs")
    # Importable by name, as app.jobs.resize would be in a project.
    monkeypatch.setitem(sys.modules, example.__name__, example)
    settings = make_settings(
        queue_connection="sync",
        log_format=LogFormat.JSON,
        log_level="INFO",
        queue_allowed_modules=(example.__name__,),
    )
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(settings)
    try:
        async with QueueManager(settings) as manager:
            handle = await manager.push(example.ResizeImage("/srv/in/42.png"))
            assert await handle.result(5) == "/srv/in/42.small.png"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    [line] = [line for line in lines if line["logger"] == "app.jobs.resize"]
    assert line["msg"] == "resizing /srv/in/42.png"
    assert {k: line[k] for k in ("job_id", "queue", "job", "attempt", "worker")} == {
        "job_id": handle.id,
        "queue": settings.queue_default,
        "job": f"{example.__name__}:ResizeImage",
        "attempt": 1,
        "worker": "sync",
    }
