"""Dashboard page load times (issue #15): `/`, `/queues/<q>`, `/failed` and `/jobs/<id>` with
100,000 waiting and 10,000 failed jobs, on SQLite, MariaDB and Redis.

    .venv/bin/python -m bench.dashboard                        # the table below, a few minutes
    .venv/bin/python -m bench.dashboard --only sqlite,redis    # some connections
    .venv/bin/python -m bench.dashboard --waiting 1000 --failed 100 --repeats 3   # smaller

For each connection: a fresh backend (SQLite: a file in a temporary folder under storage/;
MariaDB: a database of its own on the server `scripts/services up` starts, dropped at the end;
Redis: a private redis-server without persistence) is seeded with `--waiting` no-op jobs in one
queue (`QueueManager.bulk`, 5,000 a call) and `--failed` records in the failed store
(`FailedStore.add`, a real envelope and traceback each). Then a real `python main.py dashboard`
process serves it, and each page is loaded `--repeats` times after one warm-up load:

* server: a GET with httpx until the whole body is read (the page's server-side time plus
  loopback HTTP).
* browser: headless Chromium (Debian's `/usr/bin/chromium` through Playwright), a fresh
  navigation each time, `loadEventEnd` of the Navigation Timing entry: request, HTML, the
  page's CSS/JS and the first layout, i.e. when the page is there for the user. One tab
  per page, navigated afresh each time (from about:blank), so its static files come from
  the browser's cache after the warm-up, as for a user.

The medians are printed (milliseconds), with the size of the HTML. No worker runs, so the
dashboard's live refreshes (about one a second per open page) are part of the load it is under,
as they would be for a user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.jobs import Noop
from bench.services import MYSQL, MYSQL_DB, Server, free_port, mysql_status, mysql_url
from core.queue.drivers.base import FailedJob
from core.queue.payload import encode, new_job_id
from core.queue.queue_manager import QueueManager
from core.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "dash-bench"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CONNECTIONS = ("sqlite", "mysql", "redis")
LABELS = {"sqlite": "SQLite", "mysql": "MariaDB", "redis": "Redis"}
CHUNK = 5_000
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/srv/app/core/worker/worker.py", line 636, in _run\n'
    "    result = await run_try(\n"
    '  File "/srv/app/app/jobs/readings.py", line 41, in handle\n'
    "    raise ValueError(f'sensor {self.device} sent {value!r}')\n"
    "ValueError: sensor d-{n} sent 'NaN'\n"
)


@dataclass
class Row:
    connection: str
    page: str
    server_ms: float
    browser_ms: float
    html_kb: float


@dataclass
class Seeded:
    waiting: int
    failed: int
    seconds: float
    waiting_id: str
    failed_id: str


def base_settings(connection: str, url: str) -> dict[str, str]:
    """The environment of the dashboard process, and of the seeding's Settings."""
    env = {
        "QUEUE_CONNECTION": "redis" if connection == "redis" else "database",
        "QUEUE_DEFAULT": QUEUE,
        "QUEUE_ALLOWED_MODULES": "bench.",
        "DASHBOARD_TOKEN": "",
        "LOG_LEVEL": "WARNING",
    }
    env["REDIS_URL" if connection == "redis" else "DB_URL"] = url
    return env


def load_settings(env: dict[str, str]) -> Settings:
    values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k != "DASHBOARD_TOKEN"}
    values["queue_allowed_modules"] = ("bench.",)
    return Settings.load(env_file=None, **values)


async def seed(settings: Settings, waiting: int, failed: int) -> Seeded:
    started = time.perf_counter()
    async with QueueManager(settings) as manager:
        ids: list[str] = []
        for start in range(0, waiting, CHUNK):
            handles = await manager.bulk(
                [Noop() for _ in range(min(CHUNK, waiting - start))], queue=QUEUE
            )
            ids.extend(str(h) for h in handles[:1])
        store = await manager.failed_store()
        failed_ids: list[str] = []

        async def add(n: int) -> None:
            job_id = new_job_id()
            payload = encode(Noop(), job_id=job_id, queue=QUEUE, max_bytes=1 << 20)
            await store.add(
                FailedJob(
                    id=job_id,
                    connection=manager.connection_name(),
                    queue=QUEUE,
                    payload=payload.decode(),
                    exception=TRACEBACK.replace("{n}", str(n)),
                    failed_at=datetime.now(UTC),
                )
            )
            if n == failed // 2:
                failed_ids.append(job_id)

        for start in range(0, failed, 20):
            await asyncio.gather(*(add(n) for n in range(start, min(start + 20, failed))))
        assert await store.count() == failed, "the failed store did not take every record"
        size = await manager.size(QUEUE)
        assert size == waiting, f"{size} jobs waiting, {waiting} pushed"
    return Seeded(waiting, failed, time.perf_counter() - started, ids[len(ids) // 2], failed_ids[0])


@contextmanager
def dashboard(env: dict[str, str], log: Path) -> Iterator[str]:
    """A real `python main.py dashboard` on a free port; its base URL once /health answers."""
    import httpx

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "dashboard", "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the dashboard exited: {log.read_text()[-800:]}")
            try:
                httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the dashboard did not answer /health in 60 s") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(url: str, pages: dict[str, str], repeats: int, connection: str) -> list[Row]:
    import httpx
    from playwright.sync_api import sync_playwright

    rows = []
    with httpx.Client(timeout=120) as client, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            for label, path in pages.items():
                server: list[float] = []
                size = 0
                for i in range(repeats + 1):
                    started = time.perf_counter()
                    response = client.get(url + path)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise RuntimeError(f"{path}: HTTP {response.status_code}")
                    size = len(response.content)
                    if i:
                        server.append(elapsed * 1000)
                loads: list[float] = []
                page = browser.new_page()
                try:
                    for i in range(repeats + 1):
                        page.goto("about:blank")
                        page.goto(url + path, wait_until="load", timeout=120_000)
                        timing = page.evaluate(
                            "() => performance.getEntriesByType('navigation')[0].loadEventEnd"
                        )
                        if i:
                            loads.append(float(timing))
                finally:
                    page.close()
                rows.append(
                    Row(
                        LABELS[connection],
                        label,
                        statistics.median(server),
                        statistics.median(loads),
                        size / 1024,
                    )
                )
        finally:
            browser.close()
    return rows


def backend(connection: str, folder: Path) -> AbstractContextManager[Any]:
    if connection == "redis":
        return Server.redis(folder)
    return nullcontext()


@contextmanager
def mysql_database(name: str) -> Iterator[str]:
    import pymysql

    conn = pymysql.connect(**MYSQL, database=MYSQL_DB)  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{MYSQL_DB}_{name}`")
            cur.execute(f"CREATE DATABASE `{MYSQL_DB}_{name}`")
        yield mysql_url(name)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{MYSQL_DB}_{name}`")
        conn.close()


def run_one(
    connection: str, folder: Path, args: argparse.Namespace, say: Callable[[str], None]
) -> list[Row]:
    with backend(connection, folder) as server, backend_url(connection, folder, server) as url:
        env = base_settings(connection, url)
        seeded = asyncio.run(seed(load_settings(env), args.waiting, args.failed))
        say(
            f"{LABELS[connection]}: seeded {seeded.waiting:,} waiting and {seeded.failed:,} "
            f"failed jobs in {seeded.seconds:.1f} s"
        )
        pages = {
            "/": "/",
            "/queues/<q>": f"/queues/{QUEUE}",
            "/failed": "/failed",
            "/jobs/<id> (waiting)": f"/jobs/{seeded.waiting_id}",
            "/jobs/<id> (failed)": f"/jobs/{seeded.failed_id}",
        }
        with dashboard(env, folder / f"dashboard-{connection}.log") as base:
            return measure(base, pages, args.repeats, connection)


@contextmanager
def backend_url(connection: str, folder: Path, server: Any) -> Iterator[str]:
    if connection == "redis":
        yield server.url
    elif connection == "mysql":
        with mysql_database(f"dashbench_{os.getpid()}") as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{folder}/queue.db"


def table(rows: list[Row]) -> str:
    head = "| Connection | Page | Server (ms) | Browser load (ms) | HTML (KiB) |"
    lines = [head, "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.connection} | `{r.page}` | {r.server_ms:.0f} | {r.browser_ms:.0f} "
            f"| {r.html_kb:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__)
    parser.add_argument("--waiting", type=int, default=100_000, help="jobs waiting in the queue")
    parser.add_argument("--failed", type=int, default=10_000, help="records in the failed store")
    parser.add_argument("--repeats", type=int, default=5, help="loads per page (median shown)")
    parser.add_argument(
        "--only", default=",".join(CONNECTIONS), help="comma-separated: sqlite,mysql,redis"
    )
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONNECTIONS]
    if unknown:
        parser.error(f"unknown connection(s) {unknown}; choose from {', '.join(CONNECTIONS)}")
    if args.waiting < 1 or args.failed < 1 or args.repeats < 1:
        parser.error("--waiting, --failed and --repeats must be at least 1")
    if not Path(CHROMIUM).exists():
        parser.error(f"{CHROMIUM} is not installed: `scripts/services up` installs it")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows: list[Row] = []
    (ROOT / "storage").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-dashboard-", dir=ROOT / "storage"))
    try:
        for connection in wanted:
            if connection == "mysql":
                version, why = mysql_status()
                if version is None:
                    say(f"MariaDB skipped: {why}")
                    continue
            rows.extend(run_one(connection, folder, args, say))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"\n{args.waiting:,} waiting and {args.failed:,} failed jobs; median of "
        f"{args.repeats} loads per page after one warm-up\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
