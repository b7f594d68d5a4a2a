"""Shared by the amqp driver tests: the broker they use and an open driver on it.

The broker is the session's own node (`AMQP_URL`, set by tests/amqp/conftest.py from the
`amqp_url` fixture: a private node, or the one TOPIQ_TEST_AMQP_URL names). The companion
store is SQLite in the test's own directory. Each test has queue names of its own; the ladder
belongs to this session's prefix.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import ReservedJob
from core.settings import Settings
from tests.conftest import answers, make_settings

AMQP_URL = ""  # the session's broker: set for each test by tests/amqp/conftest.py
PREFIX = f"topiqA{os.getpid()}"


def require_broker() -> None:
    if not answers(AMQP_URL, 5672):
        pytest.skip(f"RabbitMQ is not answering at {AMQP_URL}")


def amqp_settings(tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "queue_connection": "amqp",
        "amqp_url": AMQP_URL,
        "amqp_prefix": PREFIX,
        "amqp_store": "database",
        "db_url": f"sqlite+aiosqlite:///{tmp_path}/store.db",
    }
    values.update(extra)
    return make_settings(**values)


def new_queue() -> str:
    return f"q-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def opened(tmp_path: Path, **extra: Any) -> AsyncIterator[AmqpDriver]:
    require_broker()
    async with AmqpDriver("amqp", amqp_settings(tmp_path, **extra)) as driver:
        yield driver


async def reserve_within(driver: AmqpDriver, queue: str, seconds: float) -> ReservedJob:
    """The next job `driver` reserves from `queue`, waiting up to `seconds` for one."""
    deadline = time.monotonic() + seconds
    while True:
        jobs = await driver.reserve([queue], 1, 30.0)
        if jobs:
            return jobs[0]
        left = deadline - time.monotonic()
        assert left > 0, f"nothing was handed out of {queue} within {seconds}s"
        await driver.wait([queue], min(0.5, left))
