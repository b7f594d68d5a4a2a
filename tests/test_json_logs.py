"""JSON logs (#15 §5): every line a worker writes while a job runs, the job's own lines from
its task, its sub-tasks and its thread included, carries `job_id`, `queue`, `job`, `attempt`
and `worker` as fields; the worker's end-of-try lines add `duration`. Lines outside a job
carry none. The text format is unchanged. A real worker process; each line parsed."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.job import Job
from core.log import LOG_FIELDS, configure_logging, job_fields, outside_job
from core.queue.queue_manager import QueueManager
from core.settings import LogFormat
from tests.conftest import Backend, _backend, make_settings
from tests.jobs import events, record
from tests.processes import wait_until, workers

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

app_log = logging.getLogger("app.observed")


class ChattyJob(Job):
    """Logs from its task, from a task it starts, and (on its first try) fails."""

    max_tries = 2
    retry_after = 0

    def __init__(self, log: str) -> None:
        self.log = log

    async def handle(self) -> None:
        app_log.info("chatty try %d", self.attempts)

        async def helper() -> None:
            app_log.info("chatty helper")

        await asyncio.create_task(helper())
        if self.attempts == 1:
            raise ValueError("first try fails")
        record(self.log, event="done", id=self.job_id)


class ThreadJob(Job):
    """A plain `def handle`: logs from its thread."""

    def __init__(self, log: str) -> None:
        self.log = log

    def handle(self) -> None:
        app_log.warning("from the thread")
        record(self.log, event="done", id=self.job_id)


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    yield from _backend("redis", request, tmp_path)


def dispatch(backend: Backend, jobs: list[Job]) -> list[str]:
    async def go() -> list[str]:
        async with QueueManager(backend.settings()) as manager:
            return await manager.bulk(jobs)

    return asyncio.run(go())


def run_jobs(backend: Backend, tmp_path: Path, log_format: str) -> tuple[str, list[str]]:
    log = str(tmp_path / "events.jsonl")
    env = {**backend.env(), "LOG_FORMAT": log_format, "LOG_LEVEL": "DEBUG"}
    with workers(1, ["--concurrency", "2"], env, tmp_path) as [proc]:
        wait_until(lambda: "starting" in proc.output, 60, "the worker to start")
        ids = dispatch(backend, [ChattyJob(log), ThreadJob(log)])
        wait_until(lambda: len(events(log, "done")) == 2, 30, "both jobs to end")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
    return proc.output, ids


def test_json_lines_carry_the_job_fields(redis_backend: Backend, tmp_path: Path) -> None:
    output, [chatty, threaded] = run_jobs(redis_backend, tmp_path, "json")
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]  # each parses
    [starting] = [line for line in lines if " starting: " in line["msg"]]
    worker = re.match(r"worker (\S+) starting", starting["msg"])
    assert worker is not None
    worker_id = worker[1]
    queue = redis_backend.settings().queue_default

    def fields(line: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(line.get(name) for name in ("job_id", "queue", "job", "attempt", "worker"))

    def of(job_id: str) -> list[dict[str, Any]]:
        return [line for line in lines if line.get("job_id") == job_id]

    path = f"{__name__}:ChattyJob"
    chatty_lines = of(chatty)
    by_msg = {line["msg"]: line for line in chatty_lines}
    # The job's own lines, from its task and from a task it started, both tries.
    assert fields(by_msg["chatty try 1"]) == (chatty, queue, path, 1, worker_id)
    assert fields(by_msg["chatty try 2"]) == (chatty, queue, path, 2, worker_id)
    assert [line["attempt"] for line in chatty_lines if line["msg"] == "chatty helper"] == [1, 2]
    # The worker's own lines about the tries: start (DEBUG), retry, end with a duration.
    started = [line for line in chatty_lines if line["msg"].endswith(" started")]
    assert [(line["attempt"], line["level"]) for line in started] == [(1, "DEBUG"), (2, "DEBUG")]
    [retrying] = [line for line in chatty_lines if "retrying in" in line["msg"]]
    assert fields(retrying) == (chatty, queue, path, 1, worker_id)
    assert isinstance(retrying["duration"], float) and retrying["duration"] >= 0
    [done] = [line for line in chatty_lines if " done in " in line["msg"]]
    assert fields(done) == (chatty, queue, path, 2, worker_id)
    assert isinstance(done["duration"], float) and 0 <= done["duration"] < 10
    # A sync handle's thread inherits them.
    [threaded_line] = [line for line in of(threaded) if line["msg"] == "from the thread"]
    assert fields(threaded_line) == (threaded, queue, f"{__name__}:ThreadJob", 1, worker_id)
    assert threaded_line["level"] == "WARNING"
    # Lines outside a job carry none of them.
    for line in lines:
        if line.get("job_id") is None:
            assert not set(LOG_FIELDS) & set(line), line
    assert not set(LOG_FIELDS) & set(starting)


def test_the_text_format_is_unchanged(redis_backend: Backend, tmp_path: Path) -> None:
    output, [chatty, _] = run_jobs(redis_backend, tmp_path, "text")
    line_format = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
        r"[\w.]+\[\d+\] .+$"
    )
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(line_format.match(line) for line in lines), output
    done = [line for line in lines if f"job {chatty} ChattyJob try 2/2 done in " in line]
    assert len(done) == 1 and done[0].endswith("ms")
    assert not any(line.lstrip().startswith("{") for line in lines)


async def test_a_task_a_try_starts_for_everyone_carries_no_job_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A task serving every job (an acknowledgement batch, the outcome publisher), though
    started during one try, does not name that job: `outside_job`."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(make_settings(log_format=LogFormat.JSON, log_level="INFO"))
    try:
        with job_fields(job_id="j1", queue="q", job="m:C", attempt=1, worker="w"):
            await asyncio.create_task(asyncio.to_thread(app_log.info, "inherited"))
            await asyncio.create_task(
                asyncio.to_thread(app_log.info, "shared"), context=outside_job()
            )
        app_log.info("after")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    lines = {
        line["msg"]: line
        for line in map(orjson.loads, capsys.readouterr().err.splitlines())
        if line["logger"] == app_log.name
    }
    assert lines["inherited"]["job_id"] == "j1" and lines["inherited"]["attempt"] == 1
    assert not set(LOG_FIELDS) & set(lines["shared"])
    assert not set(LOG_FIELDS) & set(lines["after"])
