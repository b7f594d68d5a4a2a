"""The operations commands on every server backend: failed jobs, stats, clear, restart, make:job.

Most run `core.cli.main([...])` in-process (sync tests: main() runs its own event loop); a few
run `python main.py ...` as real processes, as an operator would.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.queue.drivers.base import FailedJob, WorkerInfo
from core.queue.queue_manager import QueueManager
from core.worker.options import StopReason, WorkerOptions
from core.worker.worker import Worker
from tests.conftest import ROOT
from tests.jobs import RecordJob, events
from tests.ops.conftest import PYTHON, Ops, closed_port
from tests.ops.jobs import MarkerJob

pytestmark = pytest.mark.timeout(60)


def fail_jobs(ops: Ops, log: str, marker: Path, queues: list[str]) -> list[str]:
    """Dispatch one MarkerJob per queue name and let a worker fail each of them."""

    async def dispatch(manager: QueueManager) -> list[str]:
        return [await manager.push(MarkerJob(log, str(marker)), queue) for queue in queues]

    ids = ops.call(dispatch)
    ops.work(queues=tuple(dict.fromkeys(queues)))
    return ids


def add_records(ops: Ops, *records: FailedJob) -> None:
    async def add(manager: QueueManager) -> None:
        store = await manager.failed_store()
        for record in records:
            await store.add(record)

    ops.call(add)


def failed_count(ops: Ops, queue: str | None = None) -> int:
    async def count(manager: QueueManager) -> int:
        return await (await manager.failed_store()).count(queue)

    return ops.call(count)


def record(ops: Ops, job_id: str, queue: str, age: timedelta = timedelta(0)) -> FailedJob:
    return FailedJob(
        job_id,
        ops.connection,
        queue,
        '{"job": "app.jobs.x:X", "data": {}}',
        "Traceback (most recent call last):\n  File 'x'\nRuntimeError: boom\n",
        datetime.now(UTC) - age,
    )


# -- failed jobs --------------------------------------------------------------------------


def test_failed_list_show_and_retry_then_the_job_succeeds(
    ops: Ops, log: str, tmp_path: Path
) -> None:
    marker = tmp_path / "fixed"
    [job_id] = fail_jobs(ops, log, marker, [ops.queue])
    assert [e["attempts"] for e in events(log, "try")] == [1]

    listed = ops.cli("queue:failed", "--json")
    assert listed.code == 0, listed.err
    data = json.loads(listed.out)
    assert data["total"] == 1
    [row] = data["jobs"]
    assert row["id"] == job_id
    assert row["connection"] == ops.connection
    assert row["queue"] == ops.queue
    assert row["class"] == "tests.ops.jobs:MarkerJob"
    assert row["error"] == f"RuntimeError: marker {marker} is missing"
    assert abs(datetime.fromisoformat(row["failed_at"]).timestamp() - time.time()) < 60

    table = ops.cli("queue:failed")
    assert table.code == 0
    assert job_id in table.out and "MarkerJob" in table.out and "showing 1-1 of 1" in table.out

    shown = ops.cli("queue:failed:show", job_id)
    assert shown.code == 0
    assert '"marker":' in shown.out  # the payload, pretty-printed
    assert "Traceback (most recent call last)" in shown.out
    assert "RuntimeError: marker" in shown.out
    shown_json = json.loads(ops.cli("queue:failed:show", job_id, "--json").out)
    assert shown_json["payload"]["data"]["marker"] == str(marker)
    assert "Traceback" in shown_json["exception"]

    marker.touch()  # the operator fixes the cause, then retries
    retried = ops.cli("queue:retry", job_id)
    assert retried.code == 0, retried.err
    assert "Retried 1 failed job" in retried.out
    assert failed_count(ops) == 0

    ops.work()
    assert [e["attempts"] for e in events(log, "try")] == [1, 1]  # tries counted afresh
    [done] = events(log, "done")
    assert done["id"] == job_id
    assert failed_count(ops) == 0


def test_retry_by_queue_and_all(ops: Ops, log: str, tmp_path: Path) -> None:
    other = f"{ops.queue}-other"
    ids = fail_jobs(ops, log, tmp_path / "fixed", [ops.queue, ops.queue, other])
    assert failed_count(ops) == 3

    mine = (ops.queue, other)
    by_queue = ops.cli("queue:retry", "--queue", other, "--json")
    assert by_queue.code == 0
    assert json.loads(by_queue.out) == {"retried": [ids[2]], "missing": []}
    everything = ops.cli("queue:retry", "all", "--json")
    # Oldest failure first, so the jobs go back in the order they first failed.
    assert json.loads(everything.out)["retried"] == ids[:2]
    assert failed_count(ops) == 0

    stats = json.loads(ops.cli("queue:stats", "--json").out)
    # Only this test's queues: a shared database may list queues other tests used.
    pending = {q["queue"]: q["pending"] for q in stats["queues"] if q["queue"] in mine}
    assert pending == {ops.queue: 2, other: 1}

    assert ops.cli("queue:retry").code == 1  # nothing named: an error, not "retry all"
    assert ops.cli("queue:retry", "all", "--json").out.strip().startswith("{")


def test_forget_flush_and_prune(ops: Ops) -> None:
    other = f"{ops.queue}-other"
    add_records(
        ops,
        record(ops, "fresh-1", ops.queue),
        record(ops, "fresh-2", other),
        record(ops, "old-1", ops.queue, timedelta(days=3)),
        record(ops, "old-2", other, timedelta(days=10)),
        record(ops, "gone", ops.queue),
    )
    forgotten = ops.cli("queue:forget", "gone")
    assert forgotten.code == 0 and "Deleted 1 failed job " in forgotten.out
    assert failed_count(ops) == 4

    pruned = ops.cli("queue:prune-failed", "--older-than", "2d", "--json")
    assert pruned.code == 0
    assert json.loads(pruned.out)["deleted"] == 2
    assert failed_count(ops) == 2

    flushed = ops.cli("queue:flush", "--queue", other)
    assert flushed.code == 0 and f"Deleted 1 failed job of queue {other}" in flushed.out
    assert failed_count(ops, ops.queue) == 1
    assert ops.cli("queue:flush").code == 0
    assert failed_count(ops) == 0


def test_prune_defaults_to_seven_days(ops: Ops) -> None:
    add_records(
        ops,
        record(ops, "six-days", ops.queue, timedelta(days=6)),
        record(ops, "eight-days", ops.queue, timedelta(days=8)),
    )
    assert json.loads(ops.cli("queue:prune-failed", "--json").out)["deleted"] == 1
    with pytest.raises(SystemExit) as usage:
        ops.cli("queue:prune-failed", "--older-than", "soon")
    assert usage.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["queue:failed:show", "no-such-id"],
        ["queue:retry", "no-such-id"],
        ["queue:forget", "no-such-id"],
    ],
)
def test_an_unknown_id_is_one_clear_line(ops: Ops, argv: list[str]) -> None:
    result = ops.cli(*argv)
    assert result.code == 1
    assert result.error_lines == [
        f"topiq: no failed job with id no-such-id on the {ops.connection} connection"
    ]


def test_retry_goes_on_with_the_ids_it_knows(ops: Ops, log: str, tmp_path: Path) -> None:
    [job_id] = fail_jobs(ops, log, tmp_path / "fixed", [ops.queue])
    result = ops.cli("queue:retry", job_id, "no-such-id")
    assert result.code == 1
    assert "Retried 1 failed job" in result.out
    assert result.error_lines == [
        f"topiq: no failed job with id no-such-id on the {ops.connection} connection"
    ]
    assert failed_count(ops) == 0


# -- stats, clear, restart ----------------------------------------------------------------


def test_stats_match_what_was_put_in(ops: Ops, log: str) -> None:
    other = f"{ops.queue}-other"
    info = WorkerInfo(
        id="host-a:4242:abcdef",
        host="host-a",
        pid=4242,
        connection=ops.connection,
        queues=(ops.queue, other),
        concurrency=4,
        started_at=time.time() - 30,
        seen_at=time.time(),
        processed=17,
        running=("job-1", "job-2"),
    )

    async def fill(manager: QueueManager) -> None:
        await manager.bulk([RecordJob(log, n) for n in range(5)])
        await manager.later(60, RecordJob(log, 5))
        await manager.later(60, RecordJob(log, 6))
        first = await manager.push(RecordJob(log, 7), other)
        # Two jobs waiting for `first`: deferred, not pending.
        await manager.push(RecordJob(log, 8), other, depends_on=first)
        await manager.push(RecordJob(log, 9), other, depends_on=[first])
        driver = await manager.connection()
        assert len(await driver.reserve([ops.queue], 2, 30)) == 2
        await driver.report_worker(info, ttl=60)

    ops.call(fill)
    add_records(ops, record(ops, "f1", ops.queue), record(ops, "f2", other))

    data = json.loads(ops.cli("queue:stats", "--json").out)
    assert data["connection"] == ops.connection
    # Only this test's queues: a shared database may list queues other tests used.
    counts = {
        q["queue"]: (q["pending"], q["delayed"], q["deferred"], q["reserved"], q["failed"])
        for q in data["queues"]
        if q["queue"] in (ops.queue, other)
    }
    assert counts == {ops.queue: (3, 2, 0, 2, 1), other: (1, 0, 2, 0, 1)}
    [worker] = [w for w in data["workers"] if w["id"] == info.id]
    assert worker["host"] == "host-a" and worker["pid"] == 4242
    assert worker["queues"] == [ops.queue, other]
    assert worker["concurrency"] == 4 and worker["processed"] == 17
    assert worker["running"] == ["job-1", "job-2"]

    only = json.loads(ops.cli("queue:stats", "--queue", other, "--json").out)
    assert [q["queue"] for q in only["queues"]] == [other]

    drawn = ops.cli("queue:stats")
    assert drawn.code == 0
    assert ops.queue in drawn.out and "host-a" in drawn.out and "4242" in drawn.out
    assert ops.cli("queue:stats", "--watch", "1", "--json").code == 1


def test_clear_needs_force_and_leaves_running_jobs(ops: Ops, log: str) -> None:
    async def fill(manager: QueueManager) -> None:
        await manager.bulk([RecordJob(log, n) for n in range(4)])
        await manager.later(60, RecordJob(log, 4))
        assert len(await (await manager.connection()).reserve([ops.queue], 1, 30)) == 1

    ops.call(fill)
    refused = ops.cli("queue:clear", ops.queue)
    assert refused.code == 1
    assert refused.error_lines == [
        f"topiq: queue:clear would delete 4 waiting jobs of queue {ops.queue} on "
        f"{ops.connection}; run it again with --force"
    ]
    cleared = ops.cli("queue:clear", ops.queue, "--force", "--json")
    assert cleared.code == 0
    assert json.loads(cleared.out) == {"queue": ops.queue, "deleted": 4, "reserved": 1}

    async def stats(manager: QueueManager) -> tuple[int, int, int]:
        s = await (await manager.connection()).stats(ops.queue)
        return s.pending, s.delayed, s.reserved

    assert ops.call(stats) == (0, 0, 1)


def test_restart_stops_a_running_worker(ops: Ops) -> None:
    """`queue:restart`, as a real process, makes a worker started before it stop."""

    async def scenario(manager: QueueManager) -> StopReason:
        worker = Worker(manager, WorkerOptions(queues=(ops.queue,), sleep=0.05))
        running = asyncio.create_task(worker.run())
        driver = await manager.connection()
        async with asyncio.timeout(20):
            # The worker registers with its first heartbeat; there is no event to await.
            while not any(w.id == worker.id for w in await driver.workers()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "main.py",
            "--env-file",
            str(ops.env_file),
            "queue:restart",
            "--json",
            cwd=ROOT,
            env={**os.environ, **ops.env()},
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        data = json.loads(out)
        assert data["connection"] == ops.connection and data["workers"] >= 1
        requested = await driver.restart_requested_at()
        assert requested is not None and abs(requested - data["requested_at"]) < 0.01
        async with asyncio.timeout(20):
            return await running

    assert ops.call(scenario) is StopReason.RESTART


# -- real processes and a dead connection -------------------------------------------------


def test_commands_as_real_processes(ops: Ops, log: str, tmp_path: Path) -> None:
    [job_id] = fail_jobs(ops, log, tmp_path / "fixed", [ops.queue])
    listed = ops.spawn("queue:failed", "--json")
    assert listed.code == 0, listed.err
    assert [j["id"] for j in json.loads(listed.out)["jobs"]] == [job_id]
    retried = ops.spawn("queue:retry", "all")
    assert retried.code == 0 and "Retried 1 failed job" in retried.out
    stats = ops.spawn("queue:stats")
    assert stats.code == 0 and ops.queue in stats.out


def _down_env(ops: Ops) -> dict[str, str]:
    port = closed_port()
    if ops.backend.kind == "cluster":
        return {"REDIS_CLUSTER_NODES": f"127.0.0.1:{port}"}
    if ops.connection == "redis":
        return {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    if ops.connection == "amqp":
        return {"AMQP_URL": f"amqp://guest:guest@127.0.0.1:{port}/"}
    return {"DB_URL": f"mysql+aiomysql://topiq:topiq@127.0.0.1:{port}/topiq"}


@pytest.mark.parametrize(
    "argv",
    [
        ["queue:failed"],
        ["queue:failed:show", "x"],
        ["queue:retry", "all"],
        ["queue:forget", "x"],
        ["queue:flush"],
        ["queue:prune-failed"],
        ["queue:stats"],
        ["queue:clear", "default", "--force"],
        ["queue:restart"],
    ],
)
def test_a_connection_that_is_down_is_one_clear_line(ops: Ops, argv: list[str]) -> None:
    result = ops.cli(*argv, **_down_env(ops))
    assert result.code == 1
    [line] = result.error_lines
    assert line.startswith(f"topiq: cannot reach the {ops.connection} queue connection: "), line
    assert result.out == ""


def test_a_connection_that_is_down_as_a_process(ops: Ops) -> None:
    result = ops.spawn("queue:failed", **_down_env(ops))
    assert result.code == 1
    [line] = result.error_lines
    assert line.startswith(f"topiq: cannot reach the {ops.connection} queue connection: ")
    assert "Traceback" not in result.err


# -- make:job and --help ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "class_name", "module"),
    [
        ("SendWelcomeEmail", "SendWelcomeEmailJob", "send_welcome_email_job"),
        ("ReportJob", "ReportJob", "report_job"),
        ("send_welcome_email", "SendWelcomeEmailJob", "send_welcome_email_job"),
        ("HTTPRequest", "HTTPRequestJob", "http_request_job"),
        ("Sensor2Reading", "Sensor2ReadingJob", "sensor2_reading_job"),
    ],
)
def test_make_job_writes_a_job_class(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    class_name: str,
    module: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main_quiet(["make:job", name]) == 0
    path = tmp_path / "app" / "jobs" / f"{module}.py"
    assert f"Created app/jobs/{module}.py (class {class_name})" in capsys.readouterr().out
    source = path.read_text()
    tree = ast.parse(source)
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    assert cls.name == class_name
    assert [ast.unparse(base) for base in cls.bases] == ["Job"]

    namespace: dict[str, Any] = {}
    exec(compile(source, str(path), "exec"), namespace)
    from core.job import Job

    assert issubclass(namespace[class_name], Job)
    job = namespace[class_name]("dev-1")
    asyncio.run(job.handle())

    ruff = ROOT / ".venv" / "bin" / "ruff"
    if ruff.exists():  # what make:job writes passes the project's own lint and format
        for check in (["check"], ["format", "--check"]):
            lint = subprocess.run(
                [str(ruff), *check, "--config", str(ROOT / "pyproject.toml"), str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr

    path.write_text("# mine\n")
    capsys.readouterr()  # drop what the job's handle() logged
    assert main_quiet(["make:job", name]) == 1
    assert capsys.readouterr().err.strip() == (
        f"topiq: app/jobs/{module}.py already exists; not overwriting it"
    )
    assert path.read_text() == "# mine\n"


def test_make_job_refuses_a_bad_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main_quiet(["make:job", "send-email"]) == 1
    assert not (tmp_path / "app").exists()


def main_quiet(argv: list[str]) -> int:
    """`core.cli.main` reading no env file, restoring the root logger afterwards."""
    import logging

    from core.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return main(["--env-file", os.devnull, *argv])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_help_lists_every_operations_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_quiet(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in (
        "queue:failed",
        "queue:failed:show",
        "queue:retry",
        "queue:forget",
        "queue:flush",
        "queue:prune-failed",
        "queue:stats",
        "queue:clear",
        "queue:restart",
        "make:job",
    ):
        assert command in out
