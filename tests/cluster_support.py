"""What the Redis Cluster test files share: the `cluster` backend and an open driver on it as
their `backend`/`driver` fixtures (import them into a test module), and queue names spread over
distinct primaries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.queue.drivers import create_driver
from core.queue.drivers.redis import RedisDriver
from tests.conftest import Backend, _backend

__all__ = ["backend", "driver", "spread_queues"]


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The session's private Redis Cluster, flushed."""
    yield from _backend("cluster", request, tmp_path)


@pytest.fixture
async def driver(backend: Backend) -> AsyncIterator[RedisDriver]:
    async with create_driver("redis", backend.settings()) as opened:
        assert isinstance(opened, RedisDriver) and opened.cluster
        yield opened


def spread_queues(driver: RedisDriver, count: int = 3, base: str = "") -> list[str]:
    """`count` queue names whose slots are served by `count` different primaries."""
    client: Any = driver.client
    chosen: list[str] = []
    nodes: set[str] = set()
    base = base or f"c{uuid.uuid4().hex[:6]}"
    for n in range(1000):
        name = f"{base}-{n}"
        node = client.get_node_from_key(driver.keys(name).tag).name
        if node not in nodes:
            nodes.add(node)
            chosen.append(name)
            if len(chosen) == count:
                return chosen
    raise AssertionError("no queues on distinct primaries")
