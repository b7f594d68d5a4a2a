"""Settings: `.env` and the environment reach every process; wrong values fail at start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.queue.queue_manager import QueueManager
from core.settings import QueueConnection, Settings, settings_warnings
from tests.conftest import ROOT
from tests.jobs import RecordJob, events
from tests.processes import WorkerProcess, wait_until

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
            "QUEUE_CONNECTION: must be one of 'redis', 'database', 'memory', 'sync' or "
            "'amqp' (got 'rabbit')",
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


# -- URLs: checked at start, never shown with their password ----------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("REDIS_URL", "redis://127.0.0.1:63x79/0", "REDIS_URL: Value error, the port must be"),
        ("REDIS_URL", "redis://127.0.0.1:70000/0", "REDIS_URL: Value error, the port must be"),
        (
            "REDIS_URL",
            "http://127.0.0.1:6379/0",
            "REDIS_URL: Value error, unknown scheme (http://)",
        ),
        (
            "REDIS_URL",
            "redis://:hunter2@127.0.0.1:6379/notanumber",
            "REDIS_URL: Value error, the database must be a number (0, 1, ...), not 'notanumber' "
            "(got 'redis://:***@127.0.0.1:6379/notanumber')",
        ),
        ("REDIS_URL", "redis://127.0.0.1/0?db=x", "the database must be a number"),
        ("REDIS_URL", "redis:///0", "REDIS_URL: Value error, no host"),
        ("MQTT_URL", "mqtt://u:hunter2@broker:18830000", "MQTT_URL: Value error, the port must be"),
        ("MQTT_URL", "amqp://broker", "MQTT_URL: Value error, unknown scheme (amqp://)"),
        ("DB_URL", "postgresql://u:hunter2@db/x", "DB_URL: Value error, unknown scheme"),
        ("DB_URL", "mysql+aiomysql://u:hunter2@db:port/x", "DB_URL: Value error, the port must"),
    ],
)
@pytest.mark.parametrize("command", [["queue:work", "--connection", "redis"], ["--duration", "30"]])
def test_a_malformed_url_stops_worker_and_app_at_start(
    tmp_path: Path, variable: str, value: str, expected: str, command: list[str]
) -> None:
    """One line naming the variable, exit code 2, at once: no retrying on a URL that can't work."""
    started = time.monotonic()
    done = run_main(command, cwd=tmp_path, env={variable: value})
    took = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("topiq: invalid configuration: ")
    assert expected in lines[0]
    assert "hunter2" not in done.stderr
    assert took < 15, f"took {took:.1f}s"


def test_repr_and_str_never_show_url_passwords() -> None:
    settings = Settings.load(
        env_file=None,
        redis_url="redis://user:r3d1s-pw@cache:6379/2",
        mqtt_url="mqtts://device:mq77-pw@broker:8883",
        db_url="mysql+aiomysql://app:db-pw@db:3306/iot",
    )
    for text in (repr(settings), str(settings)):
        for secret in ("r3d1s-pw", "mq77-pw", "db-pw"):
            assert secret not in text
        assert "redis_url='redis://user:***@cache:6379/2'" in text
        assert "mqtt_url='mqtts://device:***@broker:8883'" in text
    # The values themselves are intact for the drivers.
    assert settings.redis_dsn == "redis://user:r3d1s-pw@cache:6379/2"
    assert settings.mqtt_url == "mqtts://device:mq77-pw@broker:8883"


def test_an_empty_url_means_unset() -> None:
    settings = Settings.load(env_file=None, redis_url="", mqtt_url=" ")
    assert settings.redis_url is None and settings.mqtt_url is None
    assert settings.redis_dsn == "redis://localhost:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "rediss://:pw@cache.example:6380/3?ssl_cert_reqs=required",
        "unix:///run/redis/redis.sock?db=2",
        "redis://user@[::1]:6379/0",
    ],
)
def test_good_redis_urls_pass(url: str) -> None:
    assert Settings.load(env_file=None, redis_url=url).redis_dsn == url


# -- what is used, and what is ignored ---------------------------------------------------------


def _warnings(stderr: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if " WARNING " in line]


def test_a_misspelt_setting_in_env_file_is_named_with_the_close_one(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "QUEUE_CONECTION=redis\nDB_PASSWORD=x\nMY_OWN_SETTING=1\nQUEUE_DEFAULT=mine\n"
    )
    done = run_main(["queue:stats", "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    env_file = tmp_path / ".env"
    assert _warnings(done.stderr) == [
        f"QUEUE_CONECTION ({env_file}) is not a setting and is ignored; "
        "did you mean QUEUE_CONNECTION?",
        f"DB_PASSWORD ({env_file}) is not a setting and is ignored; did you mean DB_PASS?",
    ]
    # What it fell back to: the database queue, as the JSON says.
    assert '"connection": "database"' in done.stdout


def test_a_misspelt_setting_in_the_environment_is_named_too(tmp_path: Path) -> None:
    done = run_main(
        ["queue:stats", "--json"], cwd=tmp_path, env={"WORKER_CONCURENCY": "4", "DB_URL": ""}
    )
    assert done.returncode == 0, done.stderr
    assert _warnings(done.stderr) == [
        "WORKER_CONCURENCY (environment) is not a setting and is ignored; "
        "did you mean WORKER_CONCURRENCY?"
    ]


def test_db_settings_without_enable_mysql_say_sqlite_is_used(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "DB_HOST=db.example\nDB_USER=app\nDB_PASS=hunter2\nDB_NAME=topiq\n"
    )
    done = run_main(["queue:work", "--stop-when-empty"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sqlite = tmp_path / "storage" / "topiq.sqlite3"
    assert _warnings(done.stderr) == [
        f"DB_HOST, DB_USER, DB_PASS ignored: ENABLE_MYSQL is not true, so the database "
        f"connection uses SQLite file {sqlite}; set ENABLE_MYSQL=true to use MySQL/MariaDB"
    ]
    # The banner names the file the worker uses, and the .env it read.
    assert f"jobs at SQLite file {sqlite}; settings from {tmp_path / '.env'}" in done.stderr
    assert "hunter2" not in done.stderr


def test_overridden_split_settings_are_named(tmp_path: Path) -> None:
    settings = Settings.load(
        env_file=None,
        db_url="sqlite+aiosqlite:///x.db",
        db_host="db.example",
        redis_url="redis://cache:6379/0",
        redis_port=6380,
        mqtt_host="broker",
        mqtt_tls_ca="/etc/ca.pem",
        db_name="topiq",  # the default: nothing to say
    )
    assert settings_warnings(settings, None, environ={}) == [
        "DB_HOST ignored: DB_URL is set and replaces them",
        "REDIS_PORT ignored: REDIS_URL is set and replaces them",
        "MQTT_TLS_CA ignored: MQTT TLS is off (set MQTT_TLS=true or use mqtts://)",
    ]
    # .env.example copied as it is (every value the default) says nothing.
    example = Settings.load(env_file=ROOT / ".env.example")
    assert settings_warnings(example, ROOT / ".env.example", environ={}) == []
    assert example.mqtt_tls_ca is None  # `MQTT_TLS_CA=` is no file, not the current directory


def test_worker_banner_names_the_redis_server_without_its_password(
    tmp_path: Path, redis_url: str
) -> None:
    host_port = redis_url.split("//", 1)[1].split("/", 1)[0]
    url = f"redis://:hunter2@{host_port}/15"
    worker = WorkerProcess(
        ["--sleep", "0.05"],
        {**CLEAN, "QUEUE_CONNECTION": "redis", "REDIS_URL": url, "PYTHONPATH": str(ROOT)},
        tmp_path / "worker.log",
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: " starting: connection=redis" in worker.output, 30, "the banner")
    finally:
        worker.stop()
    assert f"jobs at redis://:***@{host_port}/15 (key prefix topiq)" in worker.output
    assert "hunter2" not in worker.output


def test_app_start_line_names_the_queue_and_broker(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    done = run_main(
        ["--duration", "0.5"],
        cwd=tmp_path,
        env={
            "DB_URL": f"sqlite+aiosqlite:///{db}",
            "MQTT_URL": "mqtt://app:hunter2@127.0.0.1:9",
            "QUEUE_CONNECTION": "database",
        },
    )
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "app starting" in line]
    assert line.endswith(
        f"app starting: jobs go to the database queue at SQLite file {db}; MQTT broker "
        f"mqtt://app:***@127.0.0.1:9; settings from the environment and defaults "
        f"(no .env in {tmp_path})"
    )
    assert "hunter2" not in done.stderr
