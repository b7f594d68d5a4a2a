"""Masonite's worker lines run with Topiq's names (issue #16): `queue:work --poll S --attempts N`
are `--sleep S --max-tries N`; `--driver` is refused with a pointer to `--connection`, since
the connection is the driver; `queue:retry --queue Q --connection C` works as Masonite's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import build_parser, main
from core.commands.work import options_from
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.conftest import ROOT, make_settings
from tests.jobs import FlakyJob, events
from tests.processes import WorkerProcess

pytestmark = pytest.mark.timeout(90)

HINT = (
    "unknown flag --driver; Topiq's connection is the driver: --connection redis, database "
    "or memory"
)


def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """A process's settings: the SQLite file of the test, the test jobs allowed, no .env."""
    return {
        "QUEUE_CONNECTION": "memory",  # the flags, not this, must choose the database
        "DB_URL": f"sqlite+aiosqlite:///{tmp_path}/queue.db",
        "QUEUE_ALLOWED_MODULES": "app.,tests.",
        "WORKER_SLEEP": "3",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }


def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(
        queue_connection="database", db_url=f"sqlite+aiosqlite:///{tmp_path}/queue.db"
    )


def run_main(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **sqlite_env(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- --poll and --attempts -------------------------------------------------------------------


def test_poll_and_attempts_set_the_worker_options() -> None:
    parser = build_parser("queue:work")
    settings = Settings.load(env_file=None)
    masonite = parser.parse_args(["queue:work", "--poll", "0.2", "--attempts", "2"])
    topiq = parser.parse_args(["queue:work", "--sleep", "0.2", "--max-tries", "2"])
    assert options_from(masonite, settings) == options_from(topiq, settings)
    assert options_from(masonite, settings).sleep == 0.2
    assert options_from(masonite, settings).max_tries == 2
    unset = options_from(parser.parse_args(["queue:work"]), settings)
    assert (unset.sleep, unset.max_tries) == (settings.worker_sleep, None)


@pytest.mark.process
async def test_masonite_worker_line_tries_a_failing_job_twice_and_polls_as_told(
    tmp_path: Path,
) -> None:
    log = str(tmp_path / "events.jsonl")
    async with QueueManager(sqlite_settings(tmp_path)) as manager:
        handle = await manager.push(FlakyJob(log))  # fails every try; its own max_tries is 3
        worker = WorkerProcess(
            [
                "--connection",
                "database",
                "--poll",
                "0.2",
                "--attempts",
                "2",
                "--stop-when-empty",
            ],
            sqlite_env(tmp_path),
            tmp_path / "worker.log",
            cwd=tmp_path,
        )
        try:
            assert worker.wait(60) == 0, worker.output
        finally:
            worker.stop()
        assert (await handle.status()).status == "failed"
    assert [e["attempts"] for e in events(log, "try")] == [1, 2], worker.output
    assert [e["attempts"] for e in events(log, "failed")] == [2]
    # The start line reports the options the worker runs with: the poll is its sleep.
    [start] = [line for line in worker.output.splitlines() if " starting: " in line]
    assert "connection=database" in start
    assert " max_tries=2 sleep=0.2s " in start, start


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--poll", "soon"], "argument --poll: expected a number of seconds, got 'soon'"),
        (["--poll", "-1"], "argument --poll: must not be negative"),
        (["--attempts", "0"], "argument --attempts: must be at least 1, got '0'"),
        (["--attempts", "two"], "argument --attempts: expected a whole number"),
    ],
)
def test_a_bad_value_is_named_by_the_flag_typed(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["queue:work", *flags])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_masonites_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["queue:work", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--poll SECONDS Masonite's --sleep" in out
    assert "--attempts N Masonite's --max-tries" in out


def test_failed_refuses_the_working_flags_by_both_names(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    assert main(["queue:work", "--failed", "--poll", "1", "--attempts", "2"]) == 2
    err = capsys.readouterr().err
    assert "--sleep/--poll, --max-tries/--attempts have no meaning with it" in err


# -- --driver ------------------------------------------------------------------------------


def test_the_seed_worker_line_with_driver_is_refused_naming_connection(tmp_path: Path) -> None:
    done = run_main(
        "queue:work --driver database --connection mysql --poll 5 --attempts 2".split(),  # noqa: SIM905
        tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("usage: python main.py queue:work")
    assert f"topiq queue:work: {HINT} (" in done.stderr
    assert "--poll" not in done.stderr.split("topiq queue:work:")[1]  # those two are known
    assert not (tmp_path / "queue.db").exists()  # refused before anything was opened


@pytest.mark.parametrize("command", ["queue:work", "queue:retry", "queue:failed"])
def test_driver_is_refused_by_every_command_with_a_connection(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main([command, "--driver", "database"]) == 2
    assert f"topiq {command}: {HINT}" in capsys.readouterr().err


def test_a_command_without_connection_gets_no_driver_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["make:job", "Invoice", "--driver", "database"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag --driver" in err
    assert "--connection" not in err


# -- queue:retry --queue --connection ------------------------------------------------------


@pytest.mark.process
async def test_masonite_retry_flags_move_a_queues_failed_jobs_back(tmp_path: Path) -> None:
    log = str(tmp_path / "events.jsonl")
    async with QueueManager(sqlite_settings(tmp_path)) as manager:
        invoice = await manager.push(FlakyJob(log), queue="invoices")
        email = await manager.push(FlakyJob(log), queue="emails")
        worker = "queue:work --connection database --queue invoices,emails --attempts 1"
        worked = run_main([*worker.split(), "--stop-when-empty"], tmp_path)
        assert worked.returncode == 0, worked.stderr
        assert (await invoice.status()).status == "failed"
        assert (await email.status()).status == "failed"
        retried = run_main(
            ["queue:retry", "--queue", "invoices", "--connection", "database"], tmp_path
        )
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert (await invoice.status()).status == "queued"
        assert (await email.status()).status == "failed"  # another queue's: left alone
        assert await manager.size("invoices") == 1
