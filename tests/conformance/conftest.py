"""Fixtures shared by the driver-level conformance tests: every backend in turn (RabbitMQ's
amqp too, which only this suite and the worker-process tests run on), an open driver on the
backend under test, and that backend's own queue name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.queue.drivers import Driver, create_driver
from tests.conftest import Backend, _backend


@pytest.fixture(params=["memory", "redis", "cluster", "sqlite", "mysql", "amqp"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Every queue backend in turn; the amqp runs of behaviours RabbitMQ cannot give are
    skipped with the reason (tests/amqp_exemptions.py)."""
    yield from _backend(request.param, request, tmp_path)


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[Driver]:
    async with create_driver(backend.connection, backend.settings()) as opened:
        yield opened


@pytest.fixture
def queue(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])
