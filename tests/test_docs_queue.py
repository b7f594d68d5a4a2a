"""The code in docs/queue.md runs from the project directory as written: its jobs ship in
app/jobs/, its other examples live in docs/examples/queue_*.py; default settings, no extra
allowed module, nothing added to sys.path."""

from __future__ import annotations

import re
import subprocess

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, docs_example, make_settings

pytestmark = [pytest.mark.timeout(30)]

SHOWN = (
    "app/jobs/send_notification_job.py",
    "app/jobs/poll_device_job.py",
    "docs/examples/queue_dispatch.py",
    "docs/examples/queue_testing.py",
)


def test_the_guide_includes_the_examples_verbatim() -> None:
    guide = (ROOT / "docs" / "queue.md").read_text()
    for path in SHOWN:
        body = (ROOT / path).read_text().split('"""', 2)[2].strip()
        assert body in guide, f"docs/queue.md does not show {path} as it is"
    for path in SHOWN[:2]:
        assert f"```python\n# {path}\n" in guide, f"docs/queue.md does not say where {path} is"
    assert "examples." not in guide  # no module the default QUEUE_ALLOWED_MODULES refuses


async def test_dispatch_examples() -> None:
    settings = make_settings(queue_connection="memory")  # the default allowed modules: app.
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            ids = await docs_example("queue_dispatch").main()
            assert len(ids) == 104
            assert all(re.fullmatch(r"[0-9a-f]{32}", str(i)) for i in ids)
            assert await manager.size("notifications") == 103
            assert await manager.size("emails") == 1
        finally:
            set_default_manager(None)


async def test_testing_examples() -> None:
    example = docs_example("queue_testing")
    await example.run_inline()
    assert await example.run_with_a_worker() == 3  # two retries requested, then done


@pytest.mark.process
def test_the_testing_example_runs_from_the_project_directory() -> None:
    """As a user would run it: the venv's Python in the project directory, no PYTHONPATH."""
    code = (
        "import asyncio, runpy\n"
        "example = runpy.run_path('docs/examples/queue_testing.py')\n"
        "asyncio.run(example['run_inline']())\n"
        "print('tries:', asyncio.run(example['run_with_a_worker']()))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "tries: 3", run.stdout + run.stderr
