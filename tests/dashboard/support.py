"""What the dashboard's HTTP tests share: jobs, a real uvicorn in the test's loop, a real
`python main.py dashboard` process, and small readers of the rendered HTML."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from core.job import Job
from tests.processes import ROOT, wait_until
from tests.servers import free_port

#: A text that would run as script if a page put it in the markup unescaped.
HOSTILE = "<script>alert('pwned')</script>"


class QuickJob(Job):
    """Succeeds at once with a small result."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    async def handle(self) -> dict[str, int]:
        return {"n": self.n}


class HostileJob(Job):
    """Fails for good on its first try; its data and its error carry `HOSTILE`."""

    max_tries = 1

    def __init__(self, note: str = HOSTILE) -> None:
        self.note = note

    async def handle(self) -> None:
        raise RuntimeError(f"refused {self.note}")


class FailsOnceJob(Job):
    """Fails for good the first time it runs (one try), succeeds once retried: it leaves a
    file behind on its first run."""

    max_tries = 1

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def handle(self) -> str:  # type: ignore[override]
        path = Path(self.marker)
        if not path.exists():
            path.write_text("ran")
            raise RuntimeError("first run fails")
        return "second run succeeds"


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers (the test process keeps its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` with a real uvicorn on a free loopback port in this event loop (so the
    memory driver's queue is the test's own); yields the base URL."""
    port = free_port()
    server = _InLoopServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    await task
                    raise AssertionError("uvicorn stopped before it listened")
                await asyncio.sleep(0.01)  # uvicorn offers no event for "listening"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


class DashboardProcess:
    """`python main.py dashboard …` as a user starts it, its output in a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path) -> None:
        self.log = log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "main.py"), "dashboard", *args],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout: float = 30) -> None:
        wait_until(
            lambda: "dashboard on http" in self.output or self.proc.poll() is not None,
            timeout,
            "the dashboard to listen",
        )
        assert self.proc.poll() is None, self.output

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode


# -- reading the pages ----------------------------------------------------------------------


def csrf_of(page: str) -> str:
    """The CSRF token of the first form on the page."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF field on the page"
    return found.group(1)


def row(page: str, attribute: str, value: str) -> str:
    """The markup of `<tr {attribute}="{value}">…</tr>`."""
    found = re.search(
        rf'<tr {attribute}="{re.escape(html.escape(value))}"[^>]*>(.*?)</tr>', page, re.S
    )
    assert found, f"no row {attribute}={value!r}"
    return found.group(1)


def cell(markup: str, field: str) -> str:
    """The text of `<td|dd data-field="{field}">` in `markup`, tags stripped."""
    found = re.search(rf'<(td|dd) data-field="{field}"[^>]*>(.*?)</\1>', markup, re.S)
    assert found, f"no field {field}"
    return re.sub(r"<[^>]+>", "", found.group(2)).strip()


def element_text(page: str, element_id: str) -> str:
    """The text of the element with this id, tags stripped and entities decoded."""
    found = re.search(rf'<(\w+) id="{element_id}"[^>]*>(.*?)</\1>', page, re.S)
    assert found, f"no #{element_id}"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(2))).strip()


def has(page: str, selector_id: str) -> bool:
    """Whether an element with this id is on the page."""
    return f'id="{selector_id}"' in page


def form_fields(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}
