"""`queue:job`, `queue:cancel`, `queue:prune` and the recent-window counts of `queue:stats`.

The first part runs the commands' code on the memory driver (the reference) in this event
loop, with the job moved along by the driver calls a worker makes; the second part runs
`python main.py ...` against every server backend, with `queue:job --wait` as a real process
while this test ends the job it waits for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.cli import COMMANDS, build_parser, main
from core.commands import jobs as job_commands
from core.commands._common import Connection
from core.queue.drivers.base import Driver, Outcome, OutgoingJob, ReservedJob
from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.conftest import ROOT, Backend, make_settings
from tests.ops.conftest import PYTHON, Ops

pytestmark = pytest.mark.timeout(60)

Q = "lifecycle"


def payload(job_id: str, queue: str) -> bytes:
    return json.dumps(
        {"job": "tests.jobs:RecordJob", "id": job_id, "queue": queue, "data": {"log": "x"}}
    ).encode()


async def push(
    driver: Driver, job_id: str, delay: float = 0.0, queue: str = Q, **extra: Any
) -> None:
    outgoing = OutgoingJob(
        job_id,
        queue,
        payload(job_id, queue),
        delay,
        job="tests.jobs:RecordJob",
        max_tries=3,
        **extra,
    )
    await driver.push([outgoing])


async def take(driver: Driver, queue: str = Q) -> ReservedJob:
    [held] = await driver.reserve([queue], 1, 30, worker="test-worker")
    return held


async def finish(driver: Driver, held: ReservedJob, outcome: Outcome) -> None:
    held.outcome = outcome
    await driver.ack([held])


SUCCESS = Outcome(Status.SUCCEEDED, keep=60, result=b'{"rows": 3}')
FAILURE = Outcome(
    Status.FAILED,
    keep=60,
    error="RuntimeError: sensor offline",
    traceback='Traceback (most recent call last):\n  File "x"\nRuntimeError: sensor offline\n',
)


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        yield Connection(manager, "memory", await manager.connection("memory"))


def args(command: str, *argv: str) -> argparse.Namespace:
    parsed = build_parser(command).parse_args([command, *argv])
    return parsed


async def run(
    capsys: pytest.CaptureFixture[str], conn: Connection, command: str, *argv: str
) -> tuple[int, str, str]:
    """Run one command's code on `conn`; its exit code, stdout and stderr."""
    handler = {
        "queue:job": job_commands.show_job,
        "queue:cancel": job_commands.cancel_job,
        "queue:prune": job_commands.prune_records,
    }[command]
    capsys.readouterr()
    from core.commands._common import guarded

    code = await guarded(handler(args(command, *argv), conn))
    out, err = capsys.readouterr()
    return code, out, err


# -- on the memory driver -----------------------------------------------------------------


def test_the_commands_are_registered() -> None:
    assert {"queue:job", "queue:cancel", "queue:prune"} <= set(COMMANDS)
    assert "queue:prune-failed" in COMMANDS  # it stays


async def test_job_shows_a_waiting_job_and_exits_0(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "order-42")
    code, out, _ = await run(capsys, conn, "queue:job", "order-42", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["id"] == "order-42" and data["status"] == "queued" and data["queue"] == Q
    assert data["job"] == "tests.jobs:RecordJob" and data["max_tries"] == 3
    code, out, _ = await run(capsys, conn, "queue:job", "order-42")
    assert code == 0
    assert "Job order-42" in out and "queued" in out and "tests.jobs:RecordJob" in out
    assert "0 of 3" in out  # tries


async def test_job_shows_the_result_and_timings_of_a_succeeded_job(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j1")
    await finish(conn.driver, await take(conn.driver), SUCCESS)
    code, out, _ = await run(capsys, conn, "queue:job", "j1", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["status"] == "succeeded" and data["result"] == {"rows": 3}
    assert data["attempts"] == 1 and data["worker"] == "test-worker"
    assert data["started_at"] <= data["ended_at"]
    code, out, _ = await run(capsys, conn, "queue:job", "j1")
    assert code == 0
    assert "succeeded" in out and '"rows": 3' in out and "ran" in out and "test-worker" in out


async def test_job_shows_the_error_and_traceback_of_a_failed_job(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j2")
    await finish(conn.driver, await take(conn.driver), FAILURE)
    code, out, _ = await run(capsys, conn, "queue:job", "j2")
    assert code == 0  # found; without --wait the exit code does not judge the outcome
    assert "RuntimeError: sensor offline" in out and "Traceback" in out
    code, out, err = await run(capsys, conn, "queue:job", "j2", "--wait", "5", "--json")
    assert code == 1
    assert json.loads(out)["error"] == "RuntimeError: sensor offline"
    assert err.strip() == "topiq: job j2 failed: RuntimeError: sensor offline"


async def test_an_unknown_id_exits_1_naming_it(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    for argv in (["nope"], ["nope", "--wait", "1"]):
        code, out, err = await run(capsys, conn, "queue:job", *argv)
        assert code == 1 and out == ""
        assert err.startswith("topiq: no job nope on the memory connection"), err


async def test_wait_exits_0_once_the_job_succeeds(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j3")
    held = await take(conn.driver)
    waiting = asyncio.create_task(run(capsys, conn, "queue:job", "j3", "--wait", "30", "--json"))
    await asyncio.sleep(0)  # let it start waiting on the running job
    started = time.monotonic()
    await finish(conn.driver, held, SUCCESS)
    code, out, _ = await waiting
    assert code == 0 and json.loads(out)["result"] == {"rows": 3}
    assert time.monotonic() - started < 1.0  # woken by the end, not by a poll


async def test_wait_exits_124_when_the_job_has_not_ended(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j4", delay=3600)
    started = time.monotonic()
    code, out, err = await run(capsys, conn, "queue:job", "j4", "--wait", "0.3")
    took = time.monotonic() - started
    assert code == job_commands.EXIT_WAIT_TIMED_OUT == 124
    assert "scheduled" in out
    assert err.strip() == "topiq: job j4 is still scheduled after waiting 0.3s"
    assert 0.25 < took < 2.0


async def test_wait_exits_1_for_cancelled_and_expired_jobs(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j5")
    assert await conn.driver.cancel("j5")
    code, _, err = await run(capsys, conn, "queue:job", "j5", "--wait", "1")
    assert code == 1 and "topiq: job j5 cancelled" in err
    await push(conn.driver, "j6", ttl=0.05)
    await asyncio.sleep(0.1)  # its ttl passes without a worker starting it
    code, out, err = await run(capsys, conn, "queue:job", "j6", "--wait", "1", "--json")
    assert code == 1 and json.loads(out)["status"] == "expired"
    assert "topiq: job j6 expired" in err


async def test_wait_on_a_job_whose_record_is_not_kept_says_so(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "j7")
    held = await take(conn.driver)
    waiting = asyncio.create_task(run(capsys, conn, "queue:job", "j7", "--wait", "30"))
    await asyncio.sleep(0)
    await finish(conn.driver, held, Outcome(Status.SUCCEEDED, keep=0))
    code, _, err = await waiting
    assert code == 1
    assert "ended while waiting, but its record was not kept" in err


async def test_cancel_a_waiting_job_then_nothing_is_left_to_cancel(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "c1")
    code, out, _ = await run(capsys, conn, "queue:cancel", "c1")
    assert code == 0 and "Cancelled job c1: it was queued and will not run." in out
    assert (await conn.driver.job_status("c1")).status is Status.CANCELLED  # type: ignore[union-attr]
    assert await conn.driver.reserve([Q], 1, 30) == []
    code, out, err = await run(capsys, conn, "queue:cancel", "c1")
    assert code == 1 and err.strip() == "topiq: nothing to cancel: job c1 has ended (cancelled)"
    code, _, err = await run(capsys, conn, "queue:cancel", "c2")
    assert code == 1 and "no job c2" in err


async def test_cancel_a_running_job_asks_its_worker(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    await push(conn.driver, "c3")
    held = await take(conn.driver)
    code, out, _ = await run(capsys, conn, "queue:cancel", "c3", "--json")
    assert code == 0
    assert json.loads(out) == {
        "id": "c3",
        "connection": "memory",
        "was": "running",
        "cancel": "requested",
    }
    assert await conn.driver.cancel_requested([held]) == ["c3"]


async def test_prune_reports_what_it_deleted(
    capsys: pytest.CaptureFixture[str], conn: Connection
) -> None:
    code, out, _ = await run(capsys, conn, "queue:prune", "--json")
    assert code == 0 and json.loads(out) == {"connection": "memory", "deleted": 0}


def test_bad_ids_and_waits_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["queue:job", "has space"], ["queue:job", "x" * 191], ["queue:cancel", "a\nb"]):
        with pytest.raises(SystemExit) as done:
            main(["--env-file", "/dev/null", *argv])
        assert done.value.code == 2
        assert "is not a job id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--env-file", "/dev/null", "queue:job", "x", "--wait", "soon"])
    assert "--wait" in capsys.readouterr().err


# -- on every server backend, as an operator runs them ----------------------------------------


@pytest.fixture
def ops(
    server_backend: Backend, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Ops:
    import os

    return Ops(server_backend, Path(os.devnull), capsys, monkeypatch)


def on_backend(ops: Ops, action: Any) -> Any:
    async def go(manager: QueueManager) -> Any:
        return await action(await manager.connection())

    return ops.call(go)


def test_job_cancel_and_prune_on_a_server_backend(ops: Ops) -> None:
    async def setup(driver: Driver) -> None:
        for name in (f"{ops.queue}-s-ok", f"{ops.queue}-s-failed", f"{ops.queue}-s-waiting"):
            await push(driver, name, queue=ops.queue)
        await finish(driver, await take(driver, ops.queue), SUCCESS)
        await finish(driver, await take(driver, ops.queue), FAILURE)

    on_backend(ops, setup)
    shown = ops.cli("queue:job", f"{ops.queue}-s-ok", "--json")
    assert shown.code == 0, shown.err
    data = json.loads(shown.out)
    assert data["status"] == "succeeded" and data["result"] == {"rows": 3}
    assert data["attempts"] == 1 and data["worker"] == "test-worker"
    failed = ops.cli("queue:job", f"{ops.queue}-s-failed", "--wait", "5")
    assert failed.code == 1 and "RuntimeError: sensor offline" in failed.out
    assert ops.cli("queue:job", f"{ops.queue}-s-unknown").code == 1
    assert ops.cli("queue:job", f"{ops.queue}-s-waiting", "--wait", "0.2").code == 124
    cancelled = ops.cli("queue:cancel", f"{ops.queue}-s-waiting")
    assert cancelled.code == 0, cancelled.err
    assert (
        json.loads(ops.cli("queue:job", f"{ops.queue}-s-waiting", "--json").out)["status"]
        == "cancelled"
    )
    assert ops.cli("queue:cancel", f"{ops.queue}-s-waiting").code == 1
    pruned = ops.cli("queue:prune", "--json")
    assert pruned.code == 0, pruned.err
    assert isinstance(json.loads(pruned.out)["deleted"], int)
    # Every record of this test is still within its keep time: the prune leaves them all (other
    # tests sharing the database may have records past theirs, so the count is not checked).
    for name, status in (("ok", "succeeded"), ("failed", "failed"), ("waiting", "cancelled")):
        shown = ops.cli("queue:job", f"{ops.queue}-s-{name}", "--json")
        assert shown.code == 0, shown.err
        assert json.loads(shown.out)["status"] == status


def test_prune_deletes_records_past_their_keep_time(ops: Ops) -> None:
    async def setup(driver: Driver) -> None:
        await push(driver, f"{ops.queue}-p-1", queue=ops.queue)
        await finish(driver, await take(driver, ops.queue), Outcome(Status.SUCCEEDED, keep=0.2))

    on_backend(ops, setup)
    time.sleep(1.1)  # the keep time passing is what is tested (SQL stores whole seconds)
    pruned = json.loads(ops.cli("queue:prune", "--json").out)
    gone = ops.cli("queue:job", f"{ops.queue}-p-1")
    assert gone.code == 1
    if ops.connection == "redis":
        assert pruned["deleted"] == 0  # Redis expired the key by itself
    else:
        assert pruned["deleted"] >= 1


def test_stats_shows_how_jobs_ended_over_the_last_hour(ops: Ops) -> None:
    async def setup(driver: Driver) -> None:
        for name in (
            f"{ops.queue}-r-1",
            f"{ops.queue}-r-2",
            f"{ops.queue}-r-3",
            f"{ops.queue}-r-4",
        ):
            await push(driver, name, queue=ops.queue)
        await finish(driver, await take(driver, ops.queue), SUCCESS)
        await finish(driver, await take(driver, ops.queue), SUCCESS)
        await finish(driver, await take(driver, ops.queue), FAILURE)
        assert await driver.cancel(f"{ops.queue}-r-4")

    on_backend(ops, setup)
    data = json.loads(ops.cli("queue:stats", "--queue", ops.queue, "--json").out)
    [row] = data["queues"]
    assert data["recent_window"] == 3600
    assert (row["succeeded"], row["failed_recent"], row["cancelled"], row["expired"]) == (
        2,
        1,
        1,
        0,
    )
    drawn = ops.cli("queue:stats", "--queue", ops.queue)
    assert "succeeded 1h" in drawn.out and "expired 1h" in drawn.out


def test_wait_as_a_process_returns_when_the_job_succeeds(ops: Ops) -> None:
    """`queue:job --wait` in its own process; this test ends the job it waits for."""

    async def setup(driver: Driver) -> ReservedJob:
        await push(driver, f"{ops.queue}-w-1", queue=ops.queue)
        return await take(driver, ops.queue)

    async def scenario(manager: QueueManager) -> tuple[int, str, float]:
        driver = await manager.connection()
        held = await setup(driver)
        proc = await asyncio.create_subprocess_exec(
            PYTHON,
            "main.py",
            "--env-file",
            "/dev/null",
            "queue:job",
            f"{ops.queue}-w-1",
            "--wait",
            "30",
            "--json",
            cwd=ROOT,
            env={**_environ(), **ops.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # The command is waiting once it has read the record: give it time to start (a
        # Python process start), then end the job and time how long it takes to notice.
        await asyncio.sleep(2.0)
        assert proc.returncode is None
        ended = time.monotonic()
        await finish(driver, held, SUCCESS)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode() + err.decode(), time.monotonic() - ended

    code, output, noticed = ops.call(scenario)
    assert code == 0, output
    assert '"rows": 3' in output
    print(f"queue:job --wait noticed the end after {noticed:.3f}s on {ops.connection}")
    assert noticed < 3.0


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "DB_", "REDIS_"))}


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("queue:job", "queue:cancel", "queue:prune"):
        assert name in out
