"""The layering that keeps the job, the queue, MQTT and the worker out of one import circle:
`core/job.py` and `core/queue/` (the `sync` driver included) import nothing of `core/mqtt/` or
`core/worker/`; the code that runs one try (`core/execution.py`) is shared by the worker and
the `sync` connection without either reaching into the other."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("core.mqtt", "core.worker")

#: Modules below the worker and the MQTT app: importing them must not pull either in.
LOWER = [
    "core.job",
    "core.execution",
    "core.runtime",
    "core.hooks",
    "core.events",
    "core.queue",
    "core.queue.payload",
    "core.queue.handle",
    "core.queue.queue_manager",
    "core.queue.drivers",
    "core.queue.drivers.base",
    "core.queue.drivers.memory",
    "core.queue.drivers.sync",
    "core.queue.drivers.redis",
    "core.queue.drivers.database",
]


def _forbidden(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in FORBIDDEN)


@pytest.mark.parametrize("module", LOWER)
def test_importing_it_in_a_fresh_interpreter_loads_no_mqtt_or_worker_module(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = [name for name in json.loads(done.stdout) if _forbidden(name)]
    assert loaded == [], f"importing {module} loads {loaded}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` statement in `path` names, at any depth (lazy ones too)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_no_import_statement_of_the_job_queue_or_runner_names_mqtt_or_the_worker() -> None:
    """Lazy imports inside functions count too: they tie the modules together all the same
    (`Job.publish` reaches the MQTT publisher through `core.runtime`, installed by its host)."""
    files = [ROOT / "core" / "job.py", ROOT / "core" / "execution.py"]
    files += sorted((ROOT / "core" / "queue").rglob("*.py"))
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path)
        if _forbidden(name)
    ]
    assert offending == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from core.worker.execution import call_handle\n")
    assert (2, "core.worker.execution") in _imports(sample)
    assert _forbidden("core.worker.execution") and not _forbidden("core.workers_of_mine")
