"""The command line: help lists everything, flags are checked, the seed's form works."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import COMMANDS, _normalise, main
from core.queue.payload import validate_queue
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.conftest import ROOT
from tests.jobs import RecordJob, events

pytestmark = pytest.mark.timeout(60)


def test_help_lists_every_command_and_worker_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for flag in (
        "--queue",
        "--connection",
        "--max-jobs",
        "--max-time",
        "--sleep",
        "--max-tries",
        "--timeout",
        "--concurrency",
        "--grace",
        "--stop-when-empty",
    ):
        assert flag in out


def test_seed_flag_form_is_queue_work() -> None:
    assert _normalise(["--queue-work", "--queue", "emails"]) == ["queue:work", "--queue", "emails"]
    assert _normalise(["--env-file", "x", "--queue-work"]) == ["--env-file", "x", "queue:work"]


def test_no_command_means_serve() -> None:
    assert _normalise([]) == ["serve"]
    assert _normalise(["--demo"]) == ["serve", "--demo"]
    assert _normalise(["--env-file", "x", "--demo"]) == ["--env-file", "x", "serve", "--demo"]
    assert _normalise(["queue:stats"]) == ["queue:stats"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-jobs", "0"], "--max-jobs: must be at least 1"),
        (["--sleep", "soon"], "--sleep: expected a number of seconds"),
        (["--concurrency", "-2"], "--concurrency: must be at least 1"),
    ],
)
def test_bad_worker_flags_are_named(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--queue-work", *flags])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_connection_flag_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    assert main(["queue:work", "--connection", "kafka"]) == 2
    assert "unknown queue connection 'kafka'" in capsys.readouterr().err


# -- as a user runs it: real processes ---------------------------------------------------------

#: Variables a developer's shell might have set that would change what these tests read.
CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("QUEUE_", "DB_", "REDIS_", "MQTT_", "WORKER_", "ENABLE_", "TOPIQ_HOME"))
}
TOPIQ = ROOT / ".venv" / "bin" / "topiq"


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, program: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python main.py ARGS` (or `program ARGS`) in `cwd`, as a separate process."""
    return subprocess.run(
        [*(program or [sys.executable, str(ROOT / "main.py")]), *args],
        cwd=cwd,
        env={**CLEAN, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        (
            ["queue:wrok"],
            "usage: python main.py queue:work",
            "topiq: unknown command 'queue:wrok'; did you mean queue:work?",
        ),
        (
            ["--env-file", os.devnull, "queue:stat", "--json"],
            "usage: python main.py queue:stats",
            "topiq: unknown command 'queue:stat'; did you mean queue:stats?",
        ),
        (
            ["queue:work", "--concurency", "4"],
            "usage: python main.py queue:work",
            "topiq queue:work: unknown flag --concurency; did you mean --concurrency?",
        ),
        (
            ["--queue-work", "--max-job=3"],
            "usage: python main.py queue:work",
            "unknown flag --max-job; did you mean --max-jobs?",
        ),
        (
            ["--queue-wrok"],
            "usage: python main.py serve",
            "topiq serve: unknown flag --queue-wrok; did you mean --queue-work?",
        ),
        (
            ["queue:failed", "--limt", "5"],
            "usage: python main.py queue:failed",
            "unknown flag --limt; did you mean --limit?",
        ),
    ],
)
def test_a_misspelt_command_or_flag_gets_the_usage_and_the_close_name(
    tmp_path: Path, argv: list[str], usage: str, message: str
) -> None:
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(usage), done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_an_unknown_command_without_a_close_one_lists_the_commands(tmp_path: Path) -> None:
    done = run(["frobnicate"], cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        "topiq: unknown command 'frobnicate'; the commands are serve, queue:work"
    )


@pytest.mark.parametrize("queues", ["a b", "emails,bad name", " , "])
def test_worker_refuses_a_queue_name_dispatch_refuses(tmp_path: Path, queues: str) -> None:
    done = run(["queue:work", "--queue", queues, "--max-jobs", "1"], cwd=tmp_path)
    assert done.returncode == 2
    bad = [name.strip() for name in queues.split(",") if name.strip()]
    if bad:
        wrong = next(name for name in bad if " " in name)
        with pytest.raises(ValueError, match="invalid queue name") as refused:
            validate_queue(wrong)  # what dispatch says for the same name
        assert f"argument --queue: {refused.value}" in done.stderr
    else:
        assert "argument --queue: name at least one queue" in done.stderr
    assert not (tmp_path / "storage").exists()  # refused before touching any backend


def test_worker_refuses_a_bad_queue_default(tmp_path: Path) -> None:
    done = run(["queue:work", "--max-jobs", "1"], cwd=tmp_path, env={"QUEUE_DEFAULT": "a b"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "topiq: QUEUE_DEFAULT: invalid queue name 'a b': use 1 to 190 letters, digits and "
        "_ . : @ / -"
    ]


def test_env_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    done = run(["--env-file", "prod.env", "queue:stats"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["topiq: --env-file prod.env: no such file"]
    assert done.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["queue:stats", "--env-file", "prod.env"],
        ["queue:stats", "--env-file=prod.env"],
        ["queue:work", "--env-file", "prod.env", "--max-jobs", "1"],
    ],
)
def test_env_file_after_the_command_means_the_same(tmp_path: Path, argv: list[str]) -> None:
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["topiq: --env-file prod.env: no such file"]
    (tmp_path / "prod.env").write_text("QUEUE_CONNECTION=memory\n")
    shown = run(["queue:stats", "--json", "--env-file", "prod.env"], cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr


def _project(tmp_path: Path) -> tuple[Path, str]:
    """A project directory whose .env names a relative SQLite file, and one queued job."""
    project = tmp_path / "project"
    project.mkdir()
    log = str(tmp_path / "events.jsonl")
    (project / ".env").write_text(
        "QUEUE_CONNECTION=database\n"
        "DB_SQLITE_PATH=storage/queue.sqlite3\n"
        "QUEUE_DEFAULT=from-dotenv\n"
        "QUEUE_ALLOWED_MODULES=tests.\n"
    )
    settings = Settings.load(
        env_file=project / ".env", db_sqlite_path=project / "storage" / "queue.sqlite3"
    )

    async def send() -> None:
        async with QueueManager(settings) as manager:
            await manager.push(RecordJob(log, 7))

    asyncio.run(send())
    return project, log


@pytest.mark.skipif(not TOPIQ.exists(), reason="the topiq command is not installed in .venv")
def test_installed_topiq_command_reads_the_project_env_like_main_py(tmp_path: Path) -> None:
    project, log = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # In the project directory, as `python main.py` is run: its .env and relative paths.
    stats = run(["queue:stats", "--json"], cwd=project, program=[str(TOPIQ)])
    assert stats.returncode == 0, stats.stderr
    [queue] = [q for q in json.loads(stats.stdout)["queues"] if q["queue"] == "from-dotenv"]
    assert queue["pending"] == 1

    # From another directory, TOPIQ_HOME names the project: the same .env, the same database.
    done = run(
        ["queue:work", "--max-jobs", "1"],
        cwd=elsewhere,
        env={"TOPIQ_HOME": str(project)},
        program=[str(TOPIQ)],
    )
    assert done.returncode == 0, done.stderr
    assert f"settings from {project / '.env'}" in done.stderr
    assert f"jobs at SQLite file {project / 'storage' / 'queue.sqlite3'}" in done.stderr
    assert [e["n"] for e in events(log, "run")] == [7]
    assert not (elsewhere / "storage").exists()

    # Without it, the current directory is the project, and the start line says so.
    bare = run(["queue:work", "--stop-when-empty"], cwd=elsewhere, program=[str(TOPIQ)])
    assert bare.returncode == 0, bare.stderr
    assert f"settings from the environment and defaults (no .env in {elsewhere})" in bare.stderr


def test_topiq_home_that_is_not_a_directory_is_an_error(tmp_path: Path) -> None:
    done = run(["queue:stats"], cwd=tmp_path, env={"TOPIQ_HOME": str(tmp_path / "nowhere")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"topiq: TOPIQ_HOME={tmp_path / 'nowhere'}: no such directory"
    ]


@pytest.mark.skipif(not TOPIQ.exists(), reason="the topiq command is not installed in .venv")
def test_topiq_help_names_itself(tmp_path: Path) -> None:
    done = run(["--help"], cwd=tmp_path, program=[str(TOPIQ)])
    assert done.returncode == 0
    assert done.stdout.startswith("usage: topiq ")
    assert "queue:work" in done.stdout


def test_main_py_under_a_python_without_the_dependencies_says_what_to_run(tmp_path: Path) -> None:
    """`python main.py` with a Python that is not the project's virtualenv (here: the same one
    with its site-packages off) names what is missing and the command to use instead."""
    done = run(["--help"], cwd=tmp_path, program=[sys.executable, "-S", str(ROOT / "main.py")])
    assert done.returncode == 1
    assert "lacks Topiq's dependencies" in done.stderr
    assert "scripts/setup" in done.stderr and ".venv/bin/python main.py" in done.stderr
    assert "Traceback" not in done.stderr
