"""Servers that are down, the sync connection's errors: clear messages, nothing lost."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from core.errors import ConnectionLostError
from core.queue.queue_manager import QueueManager
from tests.conftest import Backend, make_settings
from tests.jobs import FlakyJob, RecordJob, events
from tests.processes import WorkerProcess, wait_until
from tests.test_worker_processes import free_port

pytestmark = pytest.mark.timeout(60)


async def test_dispatch_to_a_redis_that_is_down_says_so(tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(queue_connection="redis", redis_url=f"redis://127.0.0.1:{port}/0")
    async with QueueManager(settings) as manager:
        with pytest.raises(ConnectionLostError, match=f"Redis unreachable.*{port}"):
            await manager.push(RecordJob(str(tmp_path / "log"), 1))


@pytest.mark.process
def test_worker_waits_for_a_server_that_is_down_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    backend = Backend("redis", {"redis_url": f"redis://127.0.0.1:{port}/0"})
    worker = WorkerProcess([], backend.env(), tmp_path / "worker.log")
    try:
        wait_until(lambda: "cannot reach the redis queue" in worker.output, 30, "the error line")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.stop()
    assert f"127.0.0.1:{port}" in worker.output
    assert "Traceback" not in worker.output


async def test_sync_connection_runs_inline_and_raises_the_last_failure(tmp_path: Path) -> None:
    log = str(tmp_path / "events.jsonl")
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        await manager.push(RecordJob(log, 1))
        assert [e["n"] for e in events(log, "run")] == [1]
        with pytest.raises(ValueError, match="on try 3"):
            await manager.push(FlakyJob(log))
        assert [e["attempts"] for e in events(log, "try")] == [1, 2, 3]
        assert len(events(log, "failed")) == 1
        assert await (await manager.failed_store()).count() == 1
