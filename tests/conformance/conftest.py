"""Fixtures shared by the driver-level conformance tests: an open driver on the backend under
test, and that backend's own queue name."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.queue.drivers import Driver, create_driver
from tests.conftest import Backend


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[Driver]:
    async with create_driver(backend.connection, backend.settings()) as opened:
        yield opened


@pytest.fixture
def queue(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])
