"""The "Job lifecycle" and "Testing support" sections of docs/queue.md run as written: their
examples live in docs/examples/queue_{lifecycle,hooks,functions,fakes}.py and the guide shows
each one verbatim; the order of hooks, middleware, succeeded() and failed() the guide states is
the order the example records."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from core.hooks import hooks
from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, docs_example, make_settings

pytestmark = [pytest.mark.timeout(30)]

SHOWN = (
    "docs/examples/queue_lifecycle.py",
    "docs/examples/queue_hooks.py",
    "docs/examples/queue_functions.py",
    "docs/examples/queue_fakes.py",
)


@pytest.fixture
def default_manager() -> Iterator[QueueManager]:
    """The default manager on default settings (the examples' jobs come from app.)."""
    manager = QueueManager(make_settings(queue_allowed_modules=("app.",)))
    set_default_manager(manager)
    try:
        yield manager
    finally:
        set_default_manager(None)


@pytest.fixture
def importable() -> Iterator[list[ModuleType]]:
    """Examples whose jobs run on `sync`: the job is loaded back from its payload by import, so
    the example's module must be importable under its name, as a user's module is."""
    loaded: list[ModuleType] = []
    try:
        yield loaded
    finally:
        for module in loaded:
            sys.modules.pop(module.__name__, None)


def example(name: str, loaded: list[ModuleType]) -> ModuleType:
    module = docs_example(name)
    sys.modules[module.__name__] = module
    loaded.append(module)
    return module


def test_the_guide_includes_the_examples_verbatim() -> None:
    guide = (ROOT / "docs" / "queue.md").read_text()
    for path in SHOWN:
        body = (ROOT / path).read_text().split('"""', 2)[2].strip()
        assert body in guide, f"docs/queue.md does not show {path} as it is"
        assert f"`{path}`" in guide, f"docs/queue.md does not say where {path} is"


async def test_lifecycle_example() -> None:
    lines = await docs_example("queue_lifecycle").main()
    assert lines == [
        "queued after dispatch",
        "succeeded after 3 tries: 'ready'",
        "refused: welcome-7 is waiting",
        "kept welcome-7",
        "1 telemetry job waiting, size 1",
        "cancelled: True, now cancelled",
    ]


HOOKS_ORDER = [
    "event: started",
    "before_run",
    "outer in",
    "inner in",
    "handle (try 1)",
    "inner out",
    "outer out",
    "succeeded('resized')",
    "after_run succeeded",
    "event: succeeded",
    "on_dispatch",
    "event: dispatched",
    "--",
    "event: started",
    "before_run",
    "outer in",
    "inner in",
    "handle (try 1)",
    "inner out",
    "outer out",
    "after_run retrying",
    "event: retrying",
    "event: started",
    "before_run",
    "outer in",
    "inner in",
    "handle (try 2)",
    "inner out",
    "outer out",
    "failed(not an image)",
    "on_failure",
    "after_run failed",
    "event: failed",
    "dispatch raised ValueError('not an image')",
]


async def test_hooks_example_runs_in_the_order_the_guide_states(
    default_manager: QueueManager, importable: list[ModuleType]
) -> None:
    try:
        seen = await example("queue_hooks", importable).main()
    finally:
        hooks.clear()  # the example registered process-wide hooks
    assert seen == HOOKS_ORDER
    guide = (ROOT / "docs" / "queue.md").read_text()
    order = guide.split("<!-- hooks order -->", 2)[1]
    assert "\n".join(HOOKS_ORDER) in order, "the guide's printed order is not what runs"


async def test_functions_example(
    default_manager: QueueManager, importable: list[ModuleType]
) -> None:
    assert await example("queue_functions", importable).main() == [5, 9, 2]


async def test_testing_support_examples() -> None:
    example = docs_example("queue_fakes")
    set_default_manager(None)
    await example.test_a_welcome_is_queued()
    await example.test_telemetry_goes_through_the_route_and_its_middleware()


@pytest.mark.process
def test_the_lifecycle_example_runs_from_the_project_directory() -> None:
    """As a user would run it: the venv's Python in the project directory, no PYTHONPATH."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "docs/examples/queue_lifecycle.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "cancelled: True, now cancelled", run.stdout
