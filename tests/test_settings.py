"""Settings: `.env` and the environment reach every process; wrong values fail at start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.queue.queue_manager import QueueManager
from core.settings import QueueConnection, Settings
from tests.conftest import ROOT
from tests.jobs import RecordJob, events

pytestmark = pytest.mark.timeout(60)

#: Variables a developer's shell might have set that would change what these tests read.
CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("QUEUE_", "DB_", "REDIS_", "MQTT_", "WORKER_", "ENABLE_"))
}


def run_main(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        env={**CLEAN, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_env_file_values_reach_a_worker_subprocess(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    (tmp_path / ".env").write_text(
        "# a project's settings\n"
        "QUEUE_CONNECTION=database\n"
        f"DB_URL=sqlite+aiosqlite:///{db}\n"
        "QUEUE_DEFAULT=from-dotenv\n"
        "QUEUE_ALLOWED_MODULES=tests.\n"
    )
    log = str(tmp_path / "events.jsonl")
    settings = Settings.load(env_file=tmp_path / ".env")
    assert settings.queue_connection is QueueConnection.DATABASE
    assert settings.queue_default == "from-dotenv"

    async def send() -> None:
        async with QueueManager(settings) as manager:
            await manager.push(RecordJob(log, 1))

    asyncio.run(send())
    # The worker runs in the directory holding .env and learns everything from it.
    done = run_main(["queue:work", "--max-jobs", "1"], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "connection=database queues=from-dotenv" in done.stderr
    assert [e["n"] for e in events(log, "run")] == [1]


def test_environment_wins_over_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("QUEUE_DEFAULT=from-file\nREDIS_PORT=7000\n")
    monkeypatch.setenv("QUEUE_DEFAULT", "from-env")
    settings = Settings.load(env_file=tmp_path / ".env")
    assert settings.queue_default == "from-env"
    assert settings.redis_port == 7000


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "QUEUE_CONNECTION",
            "rabbit",
            "QUEUE_CONNECTION: must be one of 'redis', 'database', 'memory' or 'sync' "
            "(got 'rabbit')",
        ),
        ("REDIS_PORT", "six", "REDIS_PORT: Input should be a valid integer"),
        ("DB_PORT", "70000", "DB_PORT: Input should be less than or equal to 65535"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: Value error, must be one of DEBUG, INFO"),
        ("ENABLE_REDIS", "perhaps", "ENABLE_REDIS: Input should be a valid boolean"),
    ],
)
def test_a_wrong_value_stops_the_program_naming_the_variable(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    (tmp_path / ".env").write_text(f"{variable}={value}\n")
    done = run_main(["queue:work"], cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]


def test_passwords_stay_out_of_errors_repr_and_urls_in_logs(tmp_path: Path) -> None:
    done = run_main(
        ["queue:work"],
        cwd=tmp_path,
        env={"DB_PASS": "hunter2", "DB_PORT": "x", "REDIS_PASSWORD": "s3cret"},
    )
    assert done.returncode == 2
    assert "hunter2" not in done.stderr and "s3cret" not in done.stderr
    settings = Settings.load(
        env_file=None, db_pass="hunter2", redis_password="s3cret", mqtt_password="pw!"
    )
    assert "hunter2" not in repr(settings) and "s3cret" not in repr(settings)
    assert "pw!" not in str(settings)
    with pytest.raises(ConfigurationError) as caught:
        Settings.load(env_file=None, db_url="mysql://u:hunter2@h/x", db_port="bad")
    assert "hunter2" not in str(caught.value)


def test_urls_and_split_variables() -> None:
    split = Settings.load(
        env_file=None, redis_host="cache", redis_port=6380, redis_db=2, redis_password="p@ss"
    )
    assert split.redis_dsn == "redis://:p%40ss@cache:6380/2"
    assert (
        Settings.load(env_file=None, redis_url="redis://other:1/3").redis_dsn == "redis://other:1/3"
    )
    mysql = Settings.load(
        env_file=None, enable_mysql=True, db_host="db", db_user="app", db_pass="a/b", db_name="iot"
    )
    assert mysql.database_dsn == "mysql+aiomysql://app:a%2Fb@db:3306/iot?charset=utf8mb4"
    embedded = Settings.load(env_file=None)
    assert embedded.database_dsn == "sqlite+aiosqlite:///storage/topiq.sqlite3"
    assert embedded.queue_connection is QueueConnection.DATABASE


def test_failed_jobs_of_redis_go_to_the_database_when_mysql_is_enabled() -> None:
    plain = Settings.load(env_file=None)
    assert plain.failed_connection_for[QueueConnection.REDIS] is QueueConnection.REDIS
    with_mysql = Settings.load(env_file=None, enable_mysql=True)
    assert with_mysql.failed_connection_for[QueueConnection.REDIS] is QueueConnection.DATABASE
    forced = Settings.load(env_file=None, queue_failed_connection="redis")
    assert forced.failed_connection_for[QueueConnection.DATABASE] is QueueConnection.REDIS


def test_allowed_modules_from_a_comma_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_ALLOWED_MODULES", "app., plugins.jobs.")
    assert Settings.load(env_file=None).queue_allowed_modules == ("app.", "plugins.jobs.")


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = {
        line.split("=", 1)[0].lstrip("# ").strip() for line in text.splitlines() if "=" in line
    }
    missing = {name.upper() for name in Settings.model_fields} - documented
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_configuration_guide_names_every_setting() -> None:
    guide = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in guide]
    assert not missing, f"docs/configuration.md lacks {missing}"
