"""EVENT_LOOP: uvloop by default where installed, asyncio's own loop on request (core/loop.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.loop import loop_factory, loop_name, run
from core.settings import EventLoop, Settings

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)

#: A memory worker that stops by itself at once: its output holds the start line.
WORKER = [sys.executable, str(ROOT / "main.py"), "queue:work", "--connection", "memory"]
WORKER += ["--max-time", "0.2"]


def _worker_start_line(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a memory worker for a moment; its output holds the start line."""
    clean = {k: v for k, v in os.environ.items() if k not in ("EVENT_LOOP", "TOPIQ_HOME")}
    return subprocess.run(
        WORKER,
        cwd=tmp_path,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_default_is_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert Settings.load(env_file=None).event_loop is EventLoop.AUTO
    assert loop_name(EventLoop.AUTO) == "uvloop"
    assert loop_name(EventLoop.ASYNCIO) == "asyncio"


def test_run_gives_each_choice_its_loop() -> None:
    pytest.importorskip("uvloop")

    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert run(kind(), EventLoop.UVLOOP) == "uvloop"
    assert run(kind(), EventLoop.AUTO) == "uvloop"
    assert run(kind(), EventLoop.ASYNCIO) == "asyncio"


def test_a_worker_says_its_loop_and_event_loop_asyncio_opts_out(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    default = _worker_start_line(tmp_path)
    assert default.returncode == 0, default.stderr
    assert "loop=uvloop" in default.stderr
    plain = _worker_start_line(tmp_path, EVENT_LOOP="asyncio")
    assert plain.returncode == 0, plain.stderr
    assert "loop=asyncio" in plain.stderr


def test_a_wrong_value_is_refused_naming_the_setting(tmp_path: Path) -> None:
    done = _worker_start_line(tmp_path, EVENT_LOOP="tokio")
    assert done.returncode == 2
    assert "EVENT_LOOP" in done.stderr and "'asyncio'" in done.stderr


def test_uvloop_asked_for_but_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now fails
    assert loop_factory(EventLoop.AUTO) is None  # auto falls back to asyncio's own loop
    assert loop_name(EventLoop.AUTO) == "asyncio"

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ConfigurationError, match=r"EVENT_LOOP=uvloop.*not installed"):
        run(never(), EventLoop.UVLOOP)


def test_a_process_without_uvloop_stops_at_start_when_it_is_required(tmp_path: Path) -> None:
    # A process whose `import uvloop` fails, as on a machine without it.
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop is not here')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    env.pop("TOPIQ_HOME", None)
    done = subprocess.run(
        WORKER,
        cwd=tmp_path,
        env={**env, "EVENT_LOOP": "uvloop"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "uvloop is not installed" in done.stderr
    fallback = subprocess.run(
        WORKER,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert fallback.returncode == 0, fallback.stderr
    assert "loop=asyncio" in fallback.stderr
