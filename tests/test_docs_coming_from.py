"""docs/coming-from.md runs as written: every Topiq block of the page is a file of
docs/examples/coming_from_*.py shown verbatim, and each file runs here. Examples whose jobs run on
a worker are run against SQLite (the default backend) with a real `queue:work` process; the
others run inline on the `sync` connection, where they say so."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from tests.conftest import ROOT, Backend, make_settings
from tests.processes import WorkerProcess, wait_until

pytestmark = [pytest.mark.timeout(90)]

EXAMPLES = ROOT / "docs" / "examples"
GUIDE = ROOT / "docs" / "coming-from.md"

#: The worker's environment: the examples' modules are imported by their file names (in a
#: project they live under app/, which is allowed already). An entry names a package and its
#: submodules, not a text prefix, so each example module is listed.
ALLOWED = ",".join(["app.", *sorted(p.stem for p in EXAMPLES.glob("coming_from_*.py"))])


def examples() -> list[Path]:
    return sorted(EXAMPLES.glob("coming_from_*.py"))


def body(path: Path) -> str:
    return path.read_text().split('"""', 2)[2].strip()


def test_the_guide_shows_every_example_verbatim() -> None:
    guide = GUIDE.read_text()
    assert examples(), "no docs/examples/coming_from_*.py"
    for path in examples():
        name = f"docs/examples/{path.name}"
        block = f"```python\n# {name}\n{body(path)}\n```"
        assert block in guide, f"docs/coming-from.md does not show {name} as it is"
    shown = set(re.findall(r"# (docs/examples/coming_from_\w+\.py)", guide))
    assert shown == {f"docs/examples/{p.name}" for p in examples()}, "a shown file is missing"


def test_the_readme_links_the_page() -> None:
    assert "(docs/coming-from.md)" in (ROOT / "README.md").read_text()


@pytest.fixture
def load() -> Iterator[Callable[[str], ModuleType]]:
    """Import docs/examples/<name>.py under its own name, as the worker will."""
    loaded: list[str] = []
    sys.path.insert(0, str(EXAMPLES))

    def importer(name: str) -> ModuleType:
        loaded.append(name)
        return importlib.import_module(name)

    try:
        yield importer
    finally:
        sys.path.remove(str(EXAMPLES))
        for name in loaded:
            sys.modules.pop(name, None)


@asynccontextmanager
async def sqlite_default(tmp_path: Path) -> AsyncIterator[QueueManager]:
    """The default manager on SQLite, as a project's first run has it."""
    settings = make_settings(
        queue_connection="database",
        db_url=f"sqlite+aiosqlite:///{tmp_path}/queue.db",
        queue_allowed_modules=tuple(ALLOWED.split(",")),
    )
    async with QueueManager(settings) as manager:
        await manager.connection()  # the tables exist before a worker opens the file
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


def worker_env(tmp_path: Path) -> dict[str, str]:
    """A worker's settings: the same SQLite file, the examples' modules importable."""
    return {
        "QUEUE_CONNECTION": "database",
        "DB_URL": f"sqlite+aiosqlite:///{tmp_path}/queue.db",
        "QUEUE_ALLOWED_MODULES": ALLOWED,
        "WORKER_SLEEP": "0.05",
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)]),
    }


@asynccontextmanager
async def with_worker(
    tmp_path: Path, queues: str, backend: Backend | None = None
) -> AsyncIterator[QueueManager]:
    """SQLite as the default (or `backend`), and a real `queue:work` process on it."""
    async with contextlib.AsyncExitStack() as stack:
        if backend is None:
            manager = await stack.enter_async_context(sqlite_default(tmp_path))
            env = worker_env(tmp_path)
        else:
            settings = backend.settings(queue_allowed_modules=tuple(ALLOWED.split(",")))
            manager = await stack.enter_async_context(QueueManager(settings))
            set_default_manager(manager)
            stack.callback(set_default_manager, None)
            env = {**backend.env(), **worker_env(tmp_path)}
            env["QUEUE_CONNECTION"] = backend.connection
            env.pop("DB_URL")
            env.update({k.upper(): str(v) for k, v in backend.overrides.items()})
            await manager.connection()  # SQL tables exist before the worker starts
        worker = WorkerProcess(["--queue", queues], env, tmp_path / "worker.log")
        try:
            yield manager
        finally:
            worker.stop()
            assert worker.proc.returncode == 0, worker.output


#: Examples whose behaviour is stored by the backend (a step's checkpoint, a callback's
#: outcome, description and meta) run on every server backend.
BACKENDS = pytest.mark.parametrize("server_backend", ["sqlite", "redis", "mysql"], indirect=True)


# -- RouteMQ --------------------------------------------------------------------------------


async def test_routemq(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_routemq")
    async with with_worker(tmp_path, "reports"):
        lines = await example.main()
    waiting = int(lines[0].split()[0])
    assert 1 <= waiting <= 6  # a worker may have started on them already
    assert lines[1:] == [
        "monthly report for user 456",
        "monthly report for user 456",
        "monthly report for user 456",
        "daily report for user 1",
        "daily report for user 2",
        "daily report for user 3",
    ]


# -- Laravel --------------------------------------------------------------------------------


async def test_laravel_jobs(tmp_path: Path, load: Callable[[str], ModuleType], capfd: Any) -> None:
    example = load("coming_from_laravel_jobs")
    async with with_worker(tmp_path, "podcasts,processing"):
        lines = await example.main()
    assert lines == [
        "same job: True",
        "podcast 1 processed",
        "scheduled on processing",
        "failed after 3 tries: ValueError: no such podcast",
    ]
    assert "podcast 0 failed: no such podcast" in (tmp_path / "worker.log").read_text()


async def test_laravel_workflows(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_laravel_workflows")
    async with with_worker(tmp_path, "podcasts"):
        lines = await example.main()
    assert lines == ["download, transcode, publish", "batch: 3 of 3 succeeded"]


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- Masonite -------------------------------------------------------------------------------


async def test_masonite_push_forms(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_masonite_push")
    async with with_worker(tmp_path, "emails,invoices,default"):
        lines = await example.main()
    assert lines == [
        "welcome mail to everyone@example.com",
        "welcome mail to user@email.com",
        "tutorial with val1 and val2",
        5,
        "welcome mail to everyone@example.com",
        "tutorial with a and b",
        "scheduled",
    ]


async def test_masonite_failed_and_blocking(load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_masonite_failed")
    assert await example.main() == [
        "result: 25.0",
        "CreateInvoice.handle ran 3 times: division by zero",
        "push raised: division by zero",
    ]


@pytest.mark.process
def test_masonite_failed_example_runs_as_a_script() -> None:
    """As a user would run it: the venv's Python in the project directory."""
    run = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "docs/examples/coming_from_masonite_failed.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "push raised: division by zero", run.stdout


# -- RQ -------------------------------------------------------------------------------------


@BACKENDS
async def test_rq_enqueue(
    tmp_path: Path, load: Callable[[str], ModuleType], server_backend: Backend
) -> None:
    example = load("coming_from_rq_enqueue")
    async with with_worker(tmp_path, "low", server_backend):
        lines = await example.main()
    assert lines == [
        3,
        3,
        2,
        3,
        7,
        "sent",
        3,
        1,
        "scheduled",
        "scheduled",
        "counting words",
        {"requested_by": "docs"},
    ]


@BACKENDS
async def test_rq_callbacks(
    tmp_path: Path, load: Callable[[str], ModuleType], server_backend: Backend
) -> None:
    example = load("coming_from_rq_callbacks")
    default = server_backend.overrides["queue_default"]  # Queue(): the QUEUE_DEFAULT queue
    async with with_worker(tmp_path, default, server_backend):
        lines = await example.main()
    assert lines == [
        "Hello, Ada!",
        "failed after 3 tries: ValueError: nobody to greet",
        "failed after 1 tries: RuntimeError: the success callback refused it",
    ]
    log = (tmp_path / "worker.log").read_text()
    on = server_backend.connection
    assert f"coming_from_rq_callbacks.say_hello succeeded on {on}: Hello, Ada!" in log, log
    assert "failed for good: nobody to greet" in log, log


async def test_rq_queue_inspection(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_rq_queues")
    async with sqlite_default(tmp_path):  # no worker: the jobs stay waiting
        assert await example.main() == [3, True, True, "queued", None, 3, 0]


async def test_rq_is_async_false(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_rq_sync")
    async with sqlite_default(tmp_path):
        assert await example.main() == 21


# -- django-db-queue ------------------------------------------------------------------------


@BACKENDS
async def test_ddq_steps_and_hooks(
    tmp_path: Path, load: Callable[[str], ModuleType], server_backend: Backend
) -> None:
    example = load("coming_from_ddq_steps")
    async with with_worker(tmp_path, "cats", server_backend):
        lines = await example.main()
    assert lines == [
        2,
        {
            "cats_import_id": 7,
            "fetched": 1,
            "message": "Hello, task 2!",
            "stored": "task 1 said: Hello, task 2!",
        },
        "failed: ValueError: no such import",
    ]
    log = (tmp_path / "worker.log").read_text().splitlines()
    broken = next(line for line in log if line.endswith(": failed for good: no such import"))
    job_id = broken.split(":")[0]
    # The pre-task hook raised (no task started), the post-task hook ran anyway, and after the
    # failure hook on the last try.
    assert [line for line in log if line.startswith(f"{job_id}: ")] == [
        f"{job_id}: a task ended, try 1",
        f"{job_id}: failed for good: no such import",
        f"{job_id}: a task ended, try 2",
    ], "\n".join(log)


async def test_ddq_priorities_and_depths(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    example = load("coming_from_ddq_queues")
    async with sqlite_default(tmp_path):
        handles, depths = await example.create()
        assert depths == {"emails": 3, "other_queue": 1}
        env = worker_env(tmp_path)
        worker = WorkerProcess(
            ["--queue", "emails", "--stop-when-empty"], env, tmp_path / "worker.log"
        )
        assert worker.wait(60) == 0, worker.output
        assert await example.ran_in_order(handles) == ["critical", "important", "normal"]


# -- the command lines the page shows --------------------------------------------------------


def shown(command: str) -> list[str]:
    """A `python main.py ...` line of the page, as arguments; it must be on the page."""
    assert f"\npython main.py {command}\n" in GUIDE.read_text(), f"not on the page: {command}"
    return command.split()


async def a_failed_job(tmp_path: Path, load: Callable[[str], ModuleType]) -> str:
    """One job in the failed store of the SQLite file, put there by a real worker."""
    example = load("coming_from_laravel_jobs")
    broken = example.ProcessPodcast(0)
    broken.max_tries = 1
    handle = await example.dispatch(broken)
    worker = WorkerProcess(
        ["--queue", "podcasts", "--stop-when-empty"], worker_env(tmp_path), tmp_path / "w.log"
    )
    assert worker.wait(60) == 0, worker.output
    assert (await handle.status()).status == "failed"
    return str(handle)


@pytest.mark.process
def test_laravel_worker_line(tmp_path: Path, redis_url: str) -> None:
    command = shown(
        "queue:work --connection redis --queue high,default --max-tries 3 --timeout 60 "
        "--sleep 3 --max-jobs 1000 --max-time 3600 --stop-when-empty"
    )
    run = run_cli(*command, env={"REDIS_URL": redis_url, "QUEUE_ALLOWED_MODULES": ALLOWED})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "empty" in run.stdout + run.stderr  # it stopped because nothing was waiting


@pytest.mark.process
async def test_laravel_failed_job_lines(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    async with sqlite_default(tmp_path) as manager:
        job_id = await a_failed_job(tmp_path, load)
        kept = run_cli(*shown("queue:prune-failed --older-than 48h"), env=worker_env(tmp_path))
        assert kept.returncode == 0, kept.stdout + kept.stderr
        retried = run_cli(*shown("queue:retry all"), env=worker_env(tmp_path))
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert (await manager.job(job_id).status()).status == "queued"


@pytest.mark.process
async def test_masonite_command_lines(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    async with sqlite_default(tmp_path) as manager:
        job_id = await a_failed_job(tmp_path, load)
        moved = run_cli(*shown("queue:work --failed"), env=worker_env(tmp_path))
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert (await manager.job(job_id).status()).status == "queued"
        assert await manager.size("podcasts") == 1  # moved back, not run: no worker started
        line = shown("queue:retry --queue invoices --connection database")
        none = run_cli(*line, env=worker_env(tmp_path))
        assert none.returncode == 0, none.stdout + none.stderr  # nothing failed on invoices
    worker = WorkerProcess(
        shown("queue:work --connection database --poll 5 --attempts 2")[1:],
        worker_env(tmp_path),
        tmp_path / "masonite.log",
    )
    try:
        wait_until(lambda: " starting: " in worker.output, 30, "the worker to start")
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.output
    assert " max_tries=2 sleep=5s " in worker.output  # Masonite's names, Topiq's settings


@pytest.mark.process
async def test_ddq_command_lines(tmp_path: Path, load: Callable[[str], ModuleType]) -> None:
    async with sqlite_default(tmp_path) as manager:
        example = load("coming_from_ddq_queues")
        handles, _ = await example.create()
        worker = WorkerProcess(
            [*shown("queue:work --queue emails")[1:], "--stop-when-empty"],
            worker_env(tmp_path),
            tmp_path / "ddq.log",
        )
        assert worker.wait(60) == 0, worker.output
        stats = run_cli(*shown("queue:stats --queue emails"), env=worker_env(tmp_path))
        assert stats.returncode == 0 and "emails" in stats.stdout, stats.stdout + stats.stderr
        pruned = run_cli(*shown("queue:prune --older-than 24h"), env=worker_env(tmp_path))
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        # Nothing ended a day ago: the records of the jobs that just ran are kept.
        assert all([(await h.status()).status == "succeeded" for h in handles])
        assert manager is not None
