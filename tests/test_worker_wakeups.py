"""An idle worker is woken for every job (issue #19): a wake-up that arrives while the worker's
own reservation is on its way is not slept through.

The race: the worker's wait (BLPOP on the queue's wake list) is pending while it sends a
reservation (with the acknowledgement of the job it just ran); a job pushed just after that
reservation looked gives its wake-up token to the pending wait. The worker must look again then:
waiting anew would leave the job queued until the next wait timed out (`--sleep`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConnectionLostError
from core.queue.drivers.base import ReservedJob
from core.queue.queue_manager import QueueManager
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, _backend
from tests.jobs import RecordJob, SleepJob, events
from tests.test_worker_leases import until

pytestmark = pytest.mark.timeout(60)

#: The worker's idle wait (its BLPOPs block at most 4 s each; see redis.py `_BLPOP_MAX`).
SLEEP = 60.0


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    yield from _backend("redis", request, tmp_path)


async def test_a_job_pushed_while_the_reservation_is_on_its_way_is_not_slept_through(
    redis_backend: Backend, tmp_path: Path
) -> None:
    log = str(tmp_path / "events.jsonl")
    settings = redis_backend.settings()
    queue = settings.queue_default
    async with QueueManager(settings) as manager, QueueManager(settings) as dispatcher:
        driver = await manager.connection()
        reserve, wait = driver.reserve, driver.wait
        woken = asyncio.Event()
        raced = asyncio.Event()
        after: list[str] = []  # the worker's calls after the raced reservation, in order

        async def wait_(queues: Sequence[str], timeout: float) -> None:
            if raced.is_set():
                after.append("wait")
            await wait(queues, timeout)
            woken.set()

        async def reserve_(
            queues: Sequence[str],
            limit: int,
            lease: float,
            ack: Sequence[ReservedJob] = (),
            **kwargs: Any,
        ) -> list[ReservedJob]:
            if raced.is_set():
                after.append("reserve")
            got: list[ReservedJob] = await reserve(queues, limit, lease, ack, **kwargs)
            if ack and not got and not raced.is_set():
                # The reservation carrying the first job's acknowledgement has looked and found
                # nothing; the second job is pushed now, and its wake-up reaches the wait that
                # is pending meanwhile, before this reservation's answer reaches the worker.
                raced.set()
                woken.clear()
                await dispatcher.push(RecordJob(log, 2), queue)
                await asyncio.wait_for(woken.wait(), 10)
                # Nothing else happens meanwhile to send the worker back to reserving (the
                # first job's bookkeeping can, by chance of timing): only the wake-up tells.
                await until(lambda: not worker._running, "the first job's task to end")
                worker._changed.clear()
            return got

        driver.reserve, driver.wait = reserve_, wait_
        options = WorkerOptions(queues=(queue,), concurrency=4, sleep=SLEEP, handle_signals=False)
        worker = Worker(manager, options)
        running = asyncio.create_task(worker.run())
        try:
            await dispatcher.push(RecordJob(log, 1), queue)
            await until(lambda: 1 in [e["n"] for e in events(log, "run")], "the first job")
            await until(raced.is_set, "the raced reservation")
            await until(lambda: len(events(log, "run")) == 2, "the second job to run")
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
    assert [e["n"] for e in events(log, "run")] == [1, 2]
    # The worker looked again at once: a reservation, not a wait (which would have slept
    # through the wake-up it had already been given, until the wait timed out).
    assert after[0] == "reserve", after


async def test_an_idle_wait_longer_than_the_clients_read_timeout_is_no_error(
    redis_backend: Backend, tmp_path: Path
) -> None:
    # redis-py gives up reading after 5 s by default: a `--sleep 8` must not be one BLPOP of 8 s
    # that ends as a lost connection (and the worker's backoff) every time the worker idles.
    log = str(tmp_path / "events.jsonl")
    settings = redis_backend.settings()
    queue = settings.queue_default
    async with QueueManager(settings) as manager:
        driver = await manager.connection()
        wait = driver.wait
        failed: list[BaseException] = []

        async def wait_(queues: Sequence[str], timeout: float) -> None:
            try:
                await wait(queues, timeout)
            except Exception as exc:
                failed.append(exc)
                raise

        driver.wait = wait_
        options = WorkerOptions(queues=(queue,), sleep=8.0, handle_signals=False)
        worker = Worker(manager, options)
        running = asyncio.create_task(worker.run())
        try:
            await asyncio.sleep(5.5)  # time itself is the input here: past the read timeout
            await manager.push(RecordJob(log, 1), queue)
            await until(lambda: len(events(log, "run")) == 1, "the job to run")
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
    assert failed == []


async def test_a_failed_reservation_waits_its_backoff_while_jobs_keep_ending(
    redis_backend: Backend, tmp_path: Path
) -> None:
    # Jobs ending while the server is away must not cut the pause short: each early retry
    # fails too and doubles the next pause (a Redis back in 0.1 s left workers idle 3.2 s).
    log = str(tmp_path / "events.jsonl")
    settings = redis_backend.settings()
    queue = settings.queue_default
    async with QueueManager(settings) as manager:
        driver = await manager.connection()
        reserve = driver.reserve
        failed_at: list[float] = []
        loop = asyncio.get_running_loop()

        async def reserve_(*args: Any, **kwargs: Any) -> list[ReservedJob]:
            if len(events(log, "start")) == 8 and len(failed_at) < 2:
                failed_at.append(loop.time())
                raise ConnectionLostError("Redis unreachable during reserve (the test's)")
            got: list[ReservedJob] = await reserve(*args, **kwargs)
            return got

        driver.reserve = reserve_
        await manager.bulk([SleepJob(log, 0.02 * (n + 1), n) for n in range(8)], queue)
        options = WorkerOptions(queues=(queue,), concurrency=8, prefetch=0, handle_signals=False)
        worker = Worker(manager, options)
        running = asyncio.create_task(worker.run())
        try:
            await until(lambda: len(events(log, "end")) == 8, "every job to end")
            await until(lambda: len(failed_at) == 2, "two failed reservations")
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
    # The jobs end 20 ms apart; the first failure's pause is 0.2 s and ends with none of them.
    assert failed_at[1] - failed_at[0] >= 0.15, failed_at
