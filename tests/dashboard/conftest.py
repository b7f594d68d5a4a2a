"""Fixtures of the dashboard's browser tests: Debian's Chromium driven by Playwright, and a real
`python main.py dashboard` process.

Playwright's own browser download is not used (it does not work on the machines here): the
browser is `/usr/bin/chromium`, which `scripts/services up` installs. Without it the browser
tests skip with that reason, except under CI=true, where they fail: CI must prove the dashboard
in a real browser.

The tests are plain (sync) functions using Playwright's sync API; what they do on a backend
(dispatching, reading a status) runs in a thread of its own with `run_async`, so it never
shares an event loop with Playwright's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tests.conftest import ON_CI, ROOT, Backend, _backend
from tests.servers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
#: Headless Chromium as root in a container, with nothing reaching out to the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: How long a page element may take to show what the test waits for (live refreshes are
#: about a second apart; a loaded machine stretches them).
UI_TIMEOUT_MS = 20_000

T = TypeVar("T")


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to its end in a thread of its own (fresh event loop) and return its
    result: the tests' backend work, kept away from Playwright's loop."""

    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _missing(message: str) -> None:
    if ON_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def playwright_session() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} is not installed; `scripts/services up` installs Debian's chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing(
            "playwright is not installed; it comes with the dev extra (`pip install -e .[dev]`)"
        )
    expect.set_options(timeout=UI_TIMEOUT_MS)
    manager = sync_playwright()
    playwright = manager.start()
    try:
        yield playwright
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser(playwright_session: Playwright) -> Iterator[Browser]:
    """One headless Chromium per module (each test gets a fresh context: no cookies). Not per
    session: Playwright's sync API holds an event loop on this thread while it runs, which
    every asyncio test after it would trip over."""
    chromium = playwright_session.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield chromium
    finally:
        chromium.close()


class Shots:
    """Screenshots of one test, numbered in the order taken, under its tmp_path/screenshots."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken: list[Path] = []

    def __call__(self, page: Page, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        self.taken.append(path)
        return path


@pytest.fixture
def shots(tmp_path: Path) -> Shots:
    return Shots(tmp_path / "screenshots")


class Tracked:
    """A page and every navigation of its main frame: the proof that a change was shown live
    (no navigation, and a marker set in the page's window survives) and not by a reload."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.navigations: list[str] = []
        page.on("framenavigated", self._navigated)

    def _navigated(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations.append(frame.url)

    @contextmanager
    def stays(self) -> Iterator[None]:
        """Asserts that nothing inside the block navigated or reloaded the page."""
        before = len(self.navigations)
        url = self.page.url
        self.page.evaluate("window.__topiqProbe = 'still here'")
        yield
        assert self.navigations[before:] == [], f"the page navigated: {self.navigations[before:]}"
        assert self.page.url == url
        assert self.page.evaluate("window.__topiqProbe") == "still here", "the page was reloaded"


@pytest.fixture
def page(browser: Browser, shots: Shots, request: pytest.FixtureRequest) -> Iterator[Tracked]:
    """A fresh browser context and page; on a failure its last state is saved as a screenshot."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    tracked = Tracked(context.new_page())
    try:
        yield tracked
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            # The page may be what broke; the test's own error says more than this one would.
            with contextlib.suppress(Exception):
                shots(tracked.page, "failure")
        context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def outward_address() -> str:
    """This machine's first non-loopback IPv4 address, or 0.0.0.0 when it has none (every
    address, which is off loopback too)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
            address: str = probe.getsockname()[0]
    except OSError:
        return "0.0.0.0"
    return "0.0.0.0" if address.startswith("127.") else address


class DashboardProcess:
    """`python main.py dashboard --host H --port P`, output captured in a file."""

    command = (sys.executable, str(ROOT / "main.py"), "dashboard")

    def __init__(self, env: dict[str, str], host: str, log: Path) -> None:
        self.host = host
        self.port = free_port()
        self.log = log
        reach = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{reach}:{self.port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.command, "--host", host, "--port", str(self.port)],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /health answers (200 or 503: it answers; 503 only says no worker is live)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the dashboard exited with {self.proc.returncode}:\n{self.output}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except urllib.error.HTTPError:
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/health did not answer within {timeout}s:\n{self.output}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start_dashboard(tmp_path: Path) -> Iterator[Callable[..., DashboardProcess]]:
    """`start_dashboard(backend, host="127.0.0.1", token="")`: a real dashboard process on a
    free port serving that backend's connection (its settings as environment variables),
    answering /health when returned; stopped at the end of the test."""
    started: list[DashboardProcess] = []

    def start(
        backend: Backend, *, host: str = "127.0.0.1", token: str = "", **env: str
    ) -> DashboardProcess:
        full_env = {**backend.env(), "DASHBOARD_TOKEN": token, **env}
        process = DashboardProcess(full_env, host, tmp_path / f"dashboard-{len(started)}.log")
        started.append(process)
        process.wait_ready()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture(params=["sqlite", "redis"])
def dash_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The backends the browser tests run on (MariaDB shares SQLite's driver and pages)."""
    yield from _backend(request.param, request, tmp_path)
