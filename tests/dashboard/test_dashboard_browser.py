"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), against a real
`python main.py dashboard` process and real worker processes, on SQLite and Redis.

Each test saves screenshots under its tmp_path (`screenshots/NN-name.png`; a failing test's
last state as `failure.png`). What the page shows live is awaited with Playwright's `expect`
(it retries until the page shows it), inside `page.stays()`: no navigation, no reload.
"""

from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ON_CI

if not ON_CI:  # on CI a missing Playwright fails the run (the import below) instead
    pytest.importorskip("playwright", reason="playwright comes with the dev extra")
from playwright.sync_api import expect

from core.errors import JobFailedError
from core.queue.queue_manager import QueueManager
from tests.conftest import Backend
from tests.dashboard.browser_jobs import BrokenJob, GatedJob
from tests.dashboard.conftest import (
    DashboardProcess,
    Shots,
    Tracked,
    outward_address,
    run_async,
)
from tests.processes import workers

pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(120)]

Start = Callable[..., DashboardProcess]


def dispatch(backend: Backend, *jobs: object, queue: str | None = None) -> list[str]:
    """Push the jobs on the backend (its default queue unless `queue`); their ids."""

    async def push() -> list[str]:
        async with QueueManager(backend.settings()) as manager:
            return [str(await manager.push(job, queue)) for job in jobs]  # type: ignore[arg-type]

    return run_async(push)


def status(backend: Backend, job_id: str) -> str:
    async def read() -> str:
        async with QueueManager(backend.settings()) as manager:
            found = await (await manager.connection()).job_status(job_id)
            return str(found.status) if found else "unknown"

    return run_async(read)


def wait_ended(backend: Backend, *job_ids: str, timeout: float = 30) -> dict[str, str]:
    """Wait (on the backend, not by polling here) until each job has ended; how each ended."""

    async def wait() -> dict[str, str]:
        async with QueueManager(backend.settings()) as manager:
            ended = {}
            for job_id in job_ids:
                handle = manager.job(job_id)
                with contextlib.suppress(JobFailedError):
                    await handle.result(timeout=timeout)
                found = await handle.status()
                ended[job_id] = str(found.status)
            return ended

    return run_async(wait)


def in_failed_store(backend: Backend, job_id: str) -> bool:
    async def read() -> bool:
        async with QueueManager(backend.settings()) as manager:
            return await (await manager.failed_store()).get(job_id) is not None

    return run_async(read)


def paused(backend: Backend, queue_name: str) -> bool:
    async def read() -> bool:
        async with QueueManager(backend.settings()) as manager:
            return queue_name in await (await manager.connection()).paused([queue_name])

    return run_async(read)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def flags(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "flags"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).touch()
    return folder


def queue_of(backend: Backend) -> str:
    return str(backend.overrides["queue_default"])


def submit(page: Tracked, form: str) -> None:
    """Press the submit button of `form` and wait for the page the POST leads to."""
    with page.page.expect_navigation():
        page.page.locator(f"{form} [type=submit]").first.click()


def test_overview_shows_a_dispatched_job_arrive_and_finish_live(
    dash_backend: Backend, start_dashboard: Start, page: Tracked, shots: Shots, tmp_path: Path
) -> None:
    backend = dash_backend
    name = queue_of(backend)
    folder = flags(tmp_path, "ok")  # jobs run until `go` exists
    dashboard = start_dashboard(backend)
    (first,) = dispatch(backend, GatedJob(str(folder), "first"))

    page.page.goto(f"{dashboard.url}/")
    row = page.page.locator(f'table#queues tr[data-queue="{name}"]')
    expect(row.locator("td[data-field=pending]")).to_have_text(re.compile(r"^\s*1\s*$"))
    for field in ("delayed", "reserved", "deferred", "failed", "succeeded", "throughput", "wait"):
        expect(row.locator(f"td[data-field={field}]")).to_have_count(1)
    shots(page.page, "overview-one-waiting")

    with page.stays():  # a job dispatched now shows up without a reload
        (second,) = dispatch(backend, GatedJob(str(folder), "second"))
        expect(row.locator("td[data-field=pending]")).to_have_text(re.compile(r"^\s*2\s*$"))
        shots(page.page, "overview-two-waiting")

    with workers(1, ["--concurrency", "1"], backend.env(), tmp_path):
        with page.stays():  # a worker takes one, then both end
            expect(row.locator("td[data-field=reserved]")).to_have_text(re.compile(r"^\s*1\s*$"))
            expect(row.locator("td[data-field=pending]")).to_have_text(re.compile(r"^\s*1\s*$"))
            shots(page.page, "overview-one-running")
            (folder / "go").touch()
            expect(row.locator("td[data-field=succeeded]")).to_have_text(re.compile(r"^\s*2\s*$"))
            expect(row.locator("td[data-field=pending]")).to_have_text(re.compile(r"^\s*0\s*$"))
            expect(row.locator("td[data-field=reserved]")).to_have_text(re.compile(r"^\s*0\s*$"))
            shots(page.page, "overview-both-done")

        # A job's own page follows it live too: running, then succeeded with its result.
        (folder / "go").unlink()
        (third,) = dispatch(backend, GatedJob(str(folder), "third"))
        page.page.goto(f"{dashboard.url}/jobs/{third}")
        expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*running\s*$"))
        expect(page.page.locator("#job-class")).to_contain_text("GatedJob")
        shots(page.page, "job-running")
        with page.stays():
            (folder / "go").touch()
            expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*succeeded\s*$"))
        expect(page.page.locator("#job-result")).to_contain_text("done third")
        shots(page.page, "job-succeeded")
    assert {status(backend, job) for job in (first, second, third)} == {"succeeded"}


def test_a_failed_job_retried_from_its_page_succeeds_live(
    dash_backend: Backend, start_dashboard: Start, page: Tracked, shots: Shots, tmp_path: Path
) -> None:
    backend = dash_backend
    folder = flags(tmp_path)  # no `ok` yet: the first run fails
    dashboard = start_dashboard(backend)
    with workers(1, [], backend.env(), tmp_path):
        (job,) = dispatch(backend, GatedJob(str(folder), "flaky"))
        page.page.goto(f"{dashboard.url}/jobs/{job}")
        with page.stays():
            expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*failed\s*$"))
        page.page.goto(f"{dashboard.url}/jobs/{job}")  # open the failed job: its actions now
        expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*failed\s*$"))
        expect(page.page.locator("#job-error")).to_contain_text("no ok flag")
        expect(page.page.locator("#job-traceback")).to_contain_text("RuntimeError")
        expect(page.page.locator("#job-attempts")).to_contain_text("1")
        expect(page.page.locator("form#retry-form")).to_have_count(1)
        assert in_failed_store(backend, job)
        shots(page.page, "job-failed")

        (folder / "ok").touch()  # the retried run succeeds once `go` exists
        submit(page, "form#retry-form")
        if f"/jobs/{job}" not in page.page.url:
            page.page.goto(f"{dashboard.url}/jobs/{job}")
        expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*running\s*$"))
        shots(page.page, "job-retried-running")
        with page.stays():
            (folder / "go").touch()
            expect(page.page.locator("#job-status")).to_have_text(re.compile(r"^\s*succeeded\s*$"))
        expect(page.page.locator("#job-result")).to_contain_text("done flaky")
        expect(page.page.locator("form#retry-form")).to_have_count(0)
        shots(page.page, "job-retried-succeeded")
    assert not in_failed_store(backend, job)
    assert status(backend, job) == "succeeded"


def test_pause_and_resume_a_queue_from_its_page(
    dash_backend: Backend, start_dashboard: Start, page: Tracked, shots: Shots, tmp_path: Path
) -> None:
    backend = dash_backend
    name = queue_of(backend)
    other = f"{name}-other"
    folder = flags(tmp_path, "ok", "go")
    dashboard = start_dashboard(backend)
    (waiting,) = dispatch(backend, GatedJob(str(folder), "waiting"))

    page.page.goto(f"{dashboard.url}/queues/{name}")
    expect(page.page.locator("form#resume-form")).to_have_count(0)
    submit(page, "form#pause-form")
    if f"/queues/{name}" not in page.page.url:
        page.page.goto(f"{dashboard.url}/queues/{name}")
    expect(page.page.locator("form#resume-form")).to_have_count(1)
    expect(page.page.locator("form#pause-form")).to_have_count(0)
    assert paused(backend, name)
    shots(page.page, "queue-paused")

    # The worker takes its queues in the order given: were the queue not paused, its job
    # would run before the other queue's, which it reaches only after.
    with workers(1, ["--queue", f"{name},{other}"], backend.env(), tmp_path):
        (later,) = dispatch(backend, GatedJob(str(folder), "other"), queue=other)
        assert wait_ended(backend, later) == {later: "succeeded"}
        assert status(backend, waiting) == "queued"

        submit(page, "form#resume-form")
        if f"/queues/{name}" not in page.page.url:
            page.page.goto(f"{dashboard.url}/queues/{name}")
        expect(page.page.locator("form#pause-form")).to_have_count(1)
        assert not paused(backend, name)
        assert wait_ended(backend, waiting) == {waiting: "succeeded"}
        shots(page.page, "queue-resumed")


def test_failed_page_filters_and_retries_the_selected_jobs(
    dash_backend: Backend, start_dashboard: Start, page: Tracked, shots: Shots, tmp_path: Path
) -> None:
    backend = dash_backend
    folder = flags(tmp_path)  # GatedJob fails until `ok` exists
    dashboard = start_dashboard(backend)
    with workers(1, ["--concurrency", "4"], backend.env(), tmp_path):
        gated = dispatch(backend, *(GatedJob(str(folder), f"g{i}") for i in range(3)))
        broken = dispatch(backend, *(BrokenJob(f"b{i}") for i in range(2)))
        assert set(wait_ended(backend, *gated, *broken).values()) == {"failed"}

        page.page.goto(f"{dashboard.url}/failed")
        rows = page.page.locator("table#failed tr[data-job]")
        expect(rows).to_have_count(5)
        shots(page.page, "failed-all")

        page.page.locator("form#failed-filter input[name=q]").fill("GatedJob")
        submit(page, "form#failed-filter")
        expect(rows).to_have_count(3)
        for job in broken:
            expect(page.page.locator(f'table#failed tr[data-job="{job}"]')).to_have_count(0)
        for job in gated[:2]:
            page.page.locator(f'table#failed tr[data-job="{job}"] input[name=ids]').check()
        shots(page.page, "failed-filtered-two-selected")

        (folder / "ok").touch()
        (folder / "go").touch()
        with page.page.expect_navigation():
            page.page.locator("button#retry-selected").click()
        assert wait_ended(backend, *gated[:2]) == {job: "succeeded" for job in gated[:2]}
        page.page.goto(f"{dashboard.url}/failed")
        expect(rows).to_have_count(3)
        for job in gated[:2]:
            expect(page.page.locator(f'table#failed tr[data-job="{job}"]')).to_have_count(0)
        shots(page.page, "failed-after-retry")
    for job in (gated[2], *broken):
        assert in_failed_store(backend, job)


def test_off_loopback_the_dashboard_wants_its_token(
    dash_backend: Backend, start_dashboard: Start, page: Tracked, shots: Shots
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    host = outward_address()
    dashboard = start_dashboard(dash_backend, host=host, token=token)
    assert not dashboard.url.startswith("http://127.")

    # Without the token: a browser lands on the login page, an API request gets 401.
    page.page.goto(f"{dashboard.url}/")
    assert re.search(r"/login(\?|$)", page.page.url), page.page.url
    expect(page.page.locator("form#login input[name=token]")).to_have_count(1)
    expect(page.page.locator("table#queues")).to_have_count(0)
    shots(page.page, "login-required")
    assert http_status(f"{dashboard.url}/metrics") == 401
    assert http_status(f"{dashboard.url}/metrics", {"Authorization": "Bearer wrong"}) == 401
    assert http_status(f"{dashboard.url}/metrics", {"Authorization": f"Bearer {token}"}) == 200

    # A wrong token is refused; the right one opens the overview.
    page.page.locator("form#login input[name=token]").fill("not-the-token")
    submit(page, "form#login")
    expect(page.page.locator("table#queues")).to_have_count(0)
    expect(page.page.locator("form#login")).to_have_count(1)
    page.page.locator("form#login input[name=token]").fill(token)
    submit(page, "form#login")
    expect(page.page.locator("table#queues")).to_have_count(1)
    expect(page.page.locator("a#nav-failed")).to_have_count(1)
    assert token not in page.page.content()
    shots(page.page, "logged-in-overview")
