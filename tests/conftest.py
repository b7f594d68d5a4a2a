"""Shared fixtures: real services (Redis, MariaDB, RabbitMQ) found through TOPIQ_TEST_* variables.

A service that does not answer skips its tests with the reason, except under CI=true, where it
fails them: CI must prove every driver.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import Settings
from tests.amqp_exemptions import AMQP_DEFECTS, AMQP_EXEMPTIONS, AMQP_INTERMITTENT
from tests.servers import (
    PrivateCluster,
    PrivateRabbit,
    private_rabbitmq,
    private_redis,
    private_redis_cluster,
)

ROOT = Path(__file__).resolve().parent.parent
# Set: that server's database is used (and flushed between tests). Unset: a private one.
REDIS_URL_GIVEN = os.environ.get("TOPIQ_TEST_REDIS_URL")
MYSQL_URL = os.environ.get(
    "TOPIQ_TEST_MYSQL_URL", "mysql+aiomysql://topiq:topiq@127.0.0.1:3306/topiq_test"
)
AMQP_URL_GIVEN = os.environ.get("TOPIQ_TEST_AMQP_URL")
ON_CI = os.environ.get("CI", "").lower() == "true"


def answers(url: str, default_port: int) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(name: str, url: str, default_port: int) -> None:
    """Skip (or fail, on CI) when the service is not there."""
    if answers(url, default_port):
        return
    message = f"{name} is not answering at {url}; start it with `scripts/services up`"
    if ON_CI:
        pytest.fail(message)
    pytest.skip(message)


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test: no .env file, test jobs allowed, short leases."""
    values: dict[str, Any] = {
        "queue_allowed_modules": ("app.", "tests."),
        "queue_lease_margin": 2.0,
        "worker_sleep": 0.05,
    }
    values.update(overrides)
    return Settings.load(env_file=None, **values)


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _mysql_admin(url: str, database: str | None) -> Any:
    import pymysql

    parts = urlsplit(url)
    return pymysql.connect(
        host=parts.hostname,
        port=parts.port or 3306,
        user=parts.username,
        password=parts.password or "",
        database=database,
        autocommit=True,
    )


def reset_mysql(url: str) -> None:
    """Empty the queue tables of this session's database (the driver creates them on use)."""
    conn = _mysql_admin(url, urlsplit(url).path.lstrip("/"))
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW TABLES")
            for (table,) in cur.fetchall():
                if table in ("queue_jobs", "queue_failed_jobs", "queue_workers"):
                    cur.execute(f"DELETE FROM `{table}`")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the tests use: the session's own redis-server unless TOPIQ_TEST_REDIS_URL says."""
    if REDIS_URL_GIVEN:
        require("Redis", REDIS_URL_GIVEN, 6379)
        return REDIS_URL_GIVEN
    server = private_redis()
    if server is None:
        message = "redis-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    return f"redis://127.0.0.1:{server.port}/15"


@pytest.fixture(scope="session")
def redis_cluster() -> PrivateCluster:
    """The session's own Redis Cluster (3 primaries, 3 replicas: tests/servers.py)."""
    cluster = private_redis_cluster()
    if cluster is None:
        message = "redis-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    return cluster


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[PrivateRabbit | None]:
    """The session's own RabbitMQ node (tests/servers.py), stopped when the session ends; None
    when TOPIQ_TEST_AMQP_URL names a broker instead."""
    if AMQP_URL_GIVEN:
        yield None
        return
    rabbit = private_rabbitmq()
    if rabbit is None:
        message = "rabbitmq-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield rabbit
    finally:
        rabbit.stop()


@pytest.fixture(scope="session")
def amqp_url(rabbitmq: PrivateRabbit | None) -> str:
    """The broker the amqp tests use: the session's own node unless TOPIQ_TEST_AMQP_URL says.

    Each test's broker objects carry a prefix of its own (AMQP_PREFIX, see `_backend`): on a
    broker named by TOPIQ_TEST_AMQP_URL they are left behind, on the session's own node they
    are deleted when the test ends."""
    if AMQP_URL_GIVEN:
        require("RabbitMQ", AMQP_URL_GIVEN, 5672)
        return AMQP_URL_GIVEN
    assert rabbitmq is not None
    return rabbitmq.url


@pytest.fixture(scope="session")
def mysql_url() -> Iterator[str]:
    """A MariaDB database of this test session's own (`<TOPIQ_TEST_MYSQL_URL's>_<pid>`).

    Test runs sharing the server (two developers, CI and a benchmark) cannot disturb each
    other's rows; the test account may create databases named `topiq_test%`.
    """
    require("MariaDB", MYSQL_URL.replace("mysql+aiomysql", "mysql"), 3306)
    parts = urlsplit(MYSQL_URL)
    name = f"{parts.path.lstrip('/')}_{os.getpid()}"
    conn = _mysql_admin(MYSQL_URL, None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        yield parts._replace(path=f"/{name}").geturl()
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


@dataclass
class Backend:
    """One queue backend as a test sees it: its kind and the settings that reach it."""

    kind: str  # memory, redis, cluster (Redis Cluster), sqlite, mysql, amqp (RabbitMQ)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def connection(self) -> str:
        kinds = {"sqlite": "database", "mysql": "database", "cluster": "redis", "amqp": "amqp"}
        return kinds.get(self.kind, self.kind)

    def settings(self, **extra: Any) -> Settings:
        return make_settings(queue_connection=self.connection, **{**self.overrides, **extra})

    def env(self) -> dict[str, str]:
        """The same settings as environment variables, for worker subprocesses."""
        env = {
            "QUEUE_CONNECTION": self.connection,
            "QUEUE_ALLOWED_MODULES": "app.,tests.",
            "QUEUE_LEASE_MARGIN": "2",
            "WORKER_SLEEP": "0.05",
            "LOG_LEVEL": "INFO",
        }
        for key, value in self.overrides.items():
            env[key.upper()] = str(value)
        return env


def _backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    queue = f"q-{uuid.uuid4().hex[:10]}"
    if kind == "memory":
        yield Backend(kind, {"queue_default": queue})
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        flush_redis(url)
        yield Backend(kind, {"queue_default": queue, "redis_url": url})
    elif kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flush()
        # REDIS_URL gives only credentials and options on a cluster: database 0, host unused.
        yield Backend(
            kind,
            {
                "queue_default": queue,
                "redis_url": "redis://127.0.0.1:6379/0",
                "redis_cluster_nodes": cluster.nodes,
            },
        )
    elif kind == "sqlite":
        yield Backend(
            kind, {"queue_default": queue, "db_url": f"sqlite+aiosqlite:///{tmp_path}/queue.db"}
        )
    elif kind == "mysql":
        url = request.getfixturevalue("mysql_url")
        reset_mysql(url)
        yield Backend(kind, {"queue_default": queue, "db_url": url})
    elif kind == "amqp":
        url = request.getfixturevalue("amqp_url")
        rabbit: PrivateRabbit | None = request.getfixturevalue("rabbitmq")
        # What RabbitMQ cannot keep (records, results, counters, the failed store) goes to
        # the session's private Redis, emptied per test like the redis backend's.
        store = request.getfixturevalue("redis_url")
        flush_redis(store)
        prefix = f"t{uuid.uuid4().hex[:12]}"
        yield Backend(
            kind,
            {
                "queue_default": queue,
                "amqp_url": url,
                "amqp_store": "redis",
                "redis_url": store,
                "amqp_prefix": prefix,
            },
        )
        if rabbit is not None:
            rabbit.delete_queues(f"{prefix}.")
    else:
        raise AssertionError(kind)


@pytest.fixture(params=["memory", "redis", "cluster", "sqlite", "mysql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Every queue backend in turn: the conformance suite runs over each."""
    yield from _backend(request.param, request, tmp_path)


@pytest.fixture(params=["redis", "cluster", "sqlite", "mysql", "amqp"])
def server_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The backends that outlive a process: for tests with real worker processes."""
    yield from _backend(request.param, request, tmp_path)


BACKEND_PARAMS = ("backend", "server_backend")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The amqp runs of tests of a behaviour RabbitMQ cannot give are skipped with the reason
    (tests/amqp_exemptions.py), and those of known driver defects are strict xfails: they
    fail the run once the defect is fixed, so the entry is removed then (a defect seen only
    in some runs: a non-strict xfail). TOPIQ_TEST_AMQP_AUDIT=1 applies none of them."""
    if os.environ.get("TOPIQ_TEST_AMQP_AUDIT"):
        # Every exempt amqp run runs, to check that each reason still holds (a fixed driver
        # may give a behaviour an entry says it cannot).
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        if not any(callspec.params.get(name) == "amqp" for name in BACKEND_PARAMS):
            continue
        name = getattr(item, "originalname", item.name)
        keys = (f"{item.path.name}::{name}", name)
        exempt = next((AMQP_EXEMPTIONS[k] for k in keys if k in AMQP_EXEMPTIONS), None)
        defect = next((AMQP_DEFECTS[k] for k in keys if k in AMQP_DEFECTS), None)
        sometimes = next((AMQP_INTERMITTENT[k] for k in keys if k in AMQP_INTERMITTENT), None)
        if exempt is not None:
            item.add_marker(pytest.mark.skip(reason=f"amqp: {exempt}"))
        elif defect is not None:
            item.add_marker(pytest.mark.xfail(strict=True, reason=f"amqp defect: {defect}"))
        elif sometimes is not None:
            item.add_marker(pytest.mark.xfail(strict=False, reason=f"amqp defect: {sometimes}"))


@pytest.fixture(autouse=True)
def _own_spool(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each test's apps (in-process or child processes) spool into a file of its own, never
    the project's `storage/spool.sqlite3`: an outage in one test must not leave jobs that an
    app of a later test replays into its backend. A test naming MQTT_SPOOL_PATH wins."""
    directory = tmp_path_factory.mktemp("spool", numbered=True)
    monkeypatch.setenv("MQTT_SPOOL_PATH", str(directory / "spool.sqlite3"))


@pytest.fixture
async def manager(backend: Backend) -> AsyncIterator[QueueManager]:
    """An open manager on the backend under test, installed as the default."""
    async with QueueManager(backend.settings()) as qm:
        set_default_manager(qm)
        try:
            yield qm
        finally:
            set_default_manager(None)


def guide_section(guide: str, name: str) -> str:
    """The text of docs/<guide> between `<!-- section: <name> -->` and `<!-- end: <name> -->`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / guide).read_text()
    start = text.index(f"<!-- section: {name} -->")
    return text[start : text.index(f"<!-- end: {name} -->", start)]


def docs_example(name: str) -> ModuleType:
    """docs/examples/<name>.py, loaded from its file as a user's module would run it from the
    project directory: it imports only `core` and `app`, nothing is added to sys.path."""
    spec = importlib.util.spec_from_file_location(
        f"docs_example_{name}", ROOT / "docs" / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
