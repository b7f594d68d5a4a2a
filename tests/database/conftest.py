"""Fixtures for the database driver's own tests: a SQLite file per test, and MariaDB/MySQL.

MariaDB comes from TOPIQ_TEST_MYSQL_URL. When the variable is missing or the server does not
answer, the MySQL tests are skipped with the reason; under CI=true they fail instead. The test
database may be shared with other test runs, so tests never empty it: each uses its own queue
names and job ids. Tests that need an empty schema (migrations) create a database of their own
next to it (`topiq_test_<random>`; the test account may create `topiq_test%` databases).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from core.queue.drivers.database import DatabaseDriver
from core.settings import Settings

MYSQL_ENV = "TOPIQ_TEST_MYSQL_URL"
ON_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it on CI, where every backend must be proved."""
    if ON_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def mysql_url() -> str:
    """The MariaDB/MySQL test URL, after checking that the server answers."""
    url = os.environ.get(MYSQL_ENV, "")
    if not url:
        unavailable(
            f"{MYSQL_ENV} is not set (e.g. mysql+aiomysql://topiq:topiq@127.0.0.1:3306/topiq_test)"
        )
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 3306), 2):
            pass
    except OSError as exc:
        unavailable(
            f"MariaDB is not answering at {parsed.render_as_string(hide_password=True)} ({exc}); "
            "start it with `scripts/services up`"
        )
    return url


def settings_for(url: str, **overrides: Any) -> Settings:
    """Settings on `url`, without any .env file, test jobs allowed."""
    values: dict[str, Any] = {
        "db_url": url,
        "queue_connection": "database",
        "queue_allowed_modules": ("app.", "tests."),
        "queue_lease_margin": 2.0,
    }
    values.update(overrides)
    return Settings.load(env_file=None, **values)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database in turn: a fresh SQLite file (in a directory that does not exist yet),
    then the MariaDB test database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/nested/queue.sqlite3"
    return mysql_url()


@pytest.fixture
async def driver(db_url: str) -> AsyncIterator[DatabaseDriver]:
    """An open driver on `db_url` (the tables are created on open)."""
    async with DatabaseDriver("database", settings_for(db_url)) as opened:
        yield opened


@pytest.fixture
def queue() -> str:
    """A queue name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def empty_mysql() -> Iterator[str]:
    """The URL of a new, empty MariaDB database, dropped after the test."""
    import pymysql

    url = make_url(mysql_url())
    name = f"{url.database}_{uuid.uuid4().hex[:8]}"
    admin = pymysql.connect(
        host=url.host, port=url.port or 3306, user=url.username, password=url.password or ""
    )
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")
    except pymysql.err.MySQLError as exc:
        admin.close()
        unavailable(f"cannot create a scratch database {name} for migration tests: {exc}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()
