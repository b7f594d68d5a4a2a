"""`await dispatch(job)` from a plain script: configured from .env, closed at exit, no warnings."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.queue.queue_manager import QueueManager
from tests.conftest import ROOT, Backend
from tests.test_settings import CLEAN

pytestmark = pytest.mark.timeout(60)

SCRIPT = textwrap.dedent(
    """
    import asyncio
    from core.queue.queue_manager import dispatch, queue
    from tests.jobs import RecordJob

    async def main():
        await dispatch(RecordJob("unused", 1))
        await queue.later("1 hour", RecordJob("unused", 2))
        print(await queue.size())

    asyncio.run(main())
    asyncio.run(main())  # a second event loop reconnects on its own
    """
)


def test_dispatch_from_a_plain_script(server_backend: Backend, tmp_path: Path) -> None:
    env_lines = [f"{k}={v}" for k, v in server_backend.env().items()]
    (tmp_path / ".env").write_text("\n".join(env_lines) + "\n")
    (tmp_path / "send.py").write_text(SCRIPT)
    done = subprocess.run(
        # -W error: an unclosed connection at exit would be a ResourceWarning, so an error.
        [sys.executable, "-W", "error", "-X", "dev", "send.py"],
        cwd=tmp_path,
        env={**CLEAN, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "4"]
    assert "Unclosed" not in done.stderr and "Warning" not in done.stderr, done.stderr

    async def size() -> int:
        async with QueueManager(server_backend.settings()) as manager:
            return await manager.size()

    assert asyncio.run(size()) == 4
