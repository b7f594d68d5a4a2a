"""docs/workflows.md (all but "Schedules", which tests/test_schedule*.py cover) runs as written:
each section's example lives in docs/examples/workflows_<name>.py, the guide shows it verbatim,
and the output the guide prints under it is what the example returns."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, docs_example, make_settings

pytestmark = [pytest.mark.timeout(60)]

EXAMPLES = ("dependencies", "chains", "batches", "priorities", "limits")
GUIDE = ROOT / "docs" / "workflows.md"


@pytest.fixture
def default_manager() -> Iterator[QueueManager]:
    manager = QueueManager(make_settings(queue_allowed_modules=("app.",)))
    set_default_manager(manager)
    try:
        yield manager
    finally:
        set_default_manager(None)


@pytest.fixture
def importable() -> Iterator[list[ModuleType]]:
    """The `sync` examples' jobs are loaded back from their payloads by import, so the example
    module must be importable under its name, as a user's module is."""
    loaded: list[ModuleType] = []
    try:
        yield loaded
    finally:
        for module in loaded:
            sys.modules.pop(module.__name__, None)


def shown_output(name: str) -> list[str]:
    """The lines the guide prints under the example (the ```text block after it)."""
    guide = GUIDE.read_text()
    after = guide.split(f"# docs/examples/workflows_{name}.py", 1)[1]
    block = after.split("```text\n", 1)[1].split("\n```", 1)[0]
    return block.splitlines()


def test_the_guide_includes_each_example_verbatim_and_says_where_it_is() -> None:
    guide = GUIDE.read_text()
    for name in EXAMPLES:
        path = f"docs/examples/workflows_{name}.py"
        body = (ROOT / path).read_text().split('"""', 2)[2].strip()
        assert body in guide, f"docs/workflows.md does not show {path} as it is"
        assert f"`{path}`" in guide, f"docs/workflows.md does not say where {path} is"
    for section in ("Dependencies", "Chains", "Batches", "Priorities"):
        assert f"\n## {section}\n" in guide
    assert "\n## Rate and concurrency limits\n" in guide


@pytest.mark.parametrize("name", EXAMPLES)
async def test_the_example_prints_what_the_guide_shows(
    name: str, default_manager: QueueManager, importable: list[ModuleType]
) -> None:
    module = docs_example(f"workflows_{name}")
    sys.modules[module.__name__] = module
    importable.append(module)
    lines = await module.main()
    if name == "priorities":
        lines = [", ".join(lines)]
    assert lines == shown_output(name)


def test_the_queue_guide_and_readme_point_to_the_workflows_guide() -> None:
    assert "(workflows.md)" in (ROOT / "docs" / "queue.md").read_text()
    assert "docs/workflows.md" in (ROOT / "README.md").read_text()


@pytest.mark.process
def test_the_chains_example_runs_from_the_project_directory() -> None:
    """As a user would run it: the venv's Python in the project directory, no PYTHONPATH."""
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "docs/examples/workflows_chains.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == shown_output("chains"), run.stdout
