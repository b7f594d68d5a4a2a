"""The code in docs/queue.md runs: its examples live in docs/examples/queue_*.py."""

from __future__ import annotations

import importlib
import re

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, make_settings

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("docs_examples")]


def test_the_guide_includes_the_examples_verbatim() -> None:
    guide = (ROOT / "docs" / "queue.md").read_text()
    for name in ("queue_jobs", "queue_dispatch", "queue_testing"):
        source = (ROOT / "docs" / "examples" / f"{name}.py").read_text()
        body = source.split('"""', 2)[2].strip()
        assert body in guide, f"docs/queue.md does not show docs/examples/{name}.py as it is"


async def test_dispatch_examples() -> None:
    settings = make_settings(queue_connection="memory", queue_allowed_modules=("examples.",))
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            example = importlib.import_module("examples.queue_dispatch")
            ids = await example.main()
            assert len(ids) == 104
            assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
            assert await manager.size("notifications") == 103
            assert await manager.size("emails") == 1
        finally:
            set_default_manager(None)


async def test_testing_examples() -> None:
    example = importlib.import_module("examples.queue_testing")
    await example.run_inline()
    assert await example.run_with_a_worker() == 3  # two retries requested, then done
