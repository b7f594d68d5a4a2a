"""What a worker process has loaded by its first job, and the collector around start-up.

A Redis worker's start is mostly imports (issue #19 item 5): it must not load another
backend's client, the dashboard, the metrics endpoint or the tables of the operations
commands. These tests run a real `queue:work` process and ask its first job what is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from pathlib import Path

import pytest

from core.cli import build_parser, main
from core.commands import work
from core.errors import ConfigurationError
from core.job import Job
from core.queue.drivers import DRIVERS
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.processes import WorkerProcess, wait_until

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

#: Libraries a Redis worker has no use for (each is loaded where it is used: the database
#: driver and the MySQL TLS check, the dashboard, `--metrics-port`, RabbitMQ, the MQTT app,
#: the tables of the operations commands).
NOT_FOR_A_REDIS_WORKER = (
    "sqlalchemy",
    "aiomysql",
    "pymysql",
    "aiosqlite",
    "rich",
    "starlette",
    "uvicorn",
    "jinja2",
    "prometheus_client",
    "aio_pika",
    "aiomqtt",
    "paho",
    "amqtt",
)


class LoadedModules(Job):
    """Writes the top-level packages its process has loaded, and the collector's state."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def handle(self) -> None:
        report = {
            "packages": sorted({name.partition(".")[0] for name in sys.modules}),
            "collecting": gc.isenabled(),
            "frozen": gc.get_freeze_count(),
        }
        await asyncio.to_thread(Path(self.path).write_text, json.dumps(report))


@pytest.fixture(scope="module")
def first_job(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What the first job of a fresh Redis worker process reports (one worker per module)."""
    tmp = tmp_path_factory.mktemp("startup")
    queue = f"q-startup-{tmp.name}"
    report = tmp / "report.json"
    env = {
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": redis_url,
        "QUEUE_DEFAULT": queue,
        "QUEUE_ALLOWED_MODULES": "tests.",
        "LOG_LEVEL": "INFO",
    }

    async def push() -> None:
        settings = Settings.load(env_file=None, **{k.lower(): v for k, v in env.items()})
        async with QueueManager(settings) as manager:
            await manager.push(LoadedModules(str(report)))

    asyncio.run(push())
    worker = WorkerProcess(["--env-file", "/dev/null"], env, tmp / "worker.log", cwd=tmp)
    try:
        wait_until(report.exists, 60, "the first job to report")
        wait_until(lambda: report.read_text().endswith("}"), 10, "the whole report")
    finally:
        worker.stop()
    loaded: dict[str, object] = json.loads(report.read_text())
    return loaded


def test_a_redis_worker_loads_no_library_it_does_not_use(first_job: dict[str, object]) -> None:
    packages = first_job["packages"]
    assert isinstance(packages, list)
    assert "redis" in packages  # the report is the worker's own
    assert sorted(set(NOT_FOR_A_REDIS_WORKER) & set(packages)) == []


def test_the_collector_is_back_on_once_the_worker_has_started(
    first_job: dict[str, object],
) -> None:
    assert first_job["collecting"] is True
    frozen = first_job["frozen"]
    assert isinstance(frozen, int) and frozen > 0  # start-up's objects were set aside


def test_main_called_with_arguments_leaves_the_callers_collector_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gc.disable()
    try:
        with pytest.raises(SystemExit):
            main(["queue:work", "--help"])
        assert not gc.isenabled()
    finally:
        gc.enable()
    frozen = gc.get_freeze_count()
    with pytest.raises(SystemExit):
        main(["queue:work", "--help"])
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen  # nothing of the caller's frozen
    assert "queue:work" in capsys.readouterr().out


def test_main_of_the_process_turns_the_collector_back_on_when_it_exits_early(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["main.py", "queue:work", "--help"])
    try:
        with pytest.raises(SystemExit):
            main()
        assert gc.isenabled()
    finally:
        gc.unfreeze()  # the test process's objects go back to the collector
    assert "queue:work" in capsys.readouterr().out


def _work_args(*argv: str) -> argparse.Namespace:
    parser = build_parser("queue:work")
    return parser.parse_args(["queue:work", *argv])


def test_preload_leaves_a_driver_that_cannot_load_to_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing client library is reported where the worker makes its driver (with the
    install hint), not by `preload`, which only warms the import."""
    monkeypatch.setitem(DRIVERS, "redis", ("tests.no_such_module:Driver", "nothing"))
    settings = Settings.load(env_file=None, queue_connection="redis")
    work.preload("queue:work", _work_args(), settings)  # no error
    with pytest.raises(ConfigurationError, match="pip install nothing"):
        QueueManager(settings).driver("redis")


def test_preload_leaves_an_unknown_connection_to_the_worker() -> None:
    settings = Settings.load(env_file=None)
    work.preload("queue:work", _work_args("--connection", "nosuch"), settings)  # no error
    with pytest.raises(ConfigurationError, match="unknown queue connection 'nosuch'"):
        QueueManager(settings).connection_name("nosuch")
