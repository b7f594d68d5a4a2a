"""The dashboard over HTTP: a real uvicorn serving `create_app`, driven with httpx, on every
driver; and a real `python main.py dashboard` process for the bind refusal and the token.

The browser tests (tests/dashboard/test_dashboard_browser.py) drive the same pages in Chromium.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.dashboard import create_app
from core.queue.drivers.base import WorkerInfo
from core.queue.queue_manager import QueueManager
from core.status import Status
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import Backend, make_settings
from tests.dashboard.support import (
    HOSTILE,
    DashboardProcess,
    FailsOnceJob,
    HostileJob,
    QuickJob,
    cell,
    csrf_of,
    element_text,
    has,
    row,
    served,
)
from tests.servers import free_port

pytestmark = pytest.mark.timeout(90)


async def work(manager: QueueManager, queue: str, max_jobs: int) -> None:
    """Run an in-process worker on `queue` until it has taken `max_jobs` jobs."""
    await Worker(manager, WorkerOptions(queues=(queue,), sleep=0.05, max_jobs=max_jobs)).run()


@pytest.fixture
async def client(manager: QueueManager) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on a real uvicorn serving the dashboard over the test's manager."""
    async with (
        served(create_app(manager.settings, manager)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as http,
    ):
        yield http


async def page(http: httpx.AsyncClient, path: str, status: int = 200, **params: Any) -> str:
    response = await http.get(path, params=params, headers={"accept": "text/html"})
    assert response.status_code == status, (path, response.status_code, response.text[:500])
    return response.text


async def overview_pages(http: httpx.AsyncClient, *queues: str) -> str:
    """The overview's pages, from the first until every one of `queues` has shown up (the
    overview lists 50 queues a page by name, and a session's database holds the queues of
    every test before this one): their markup, joined."""
    pages: list[str] = []
    offset = 0
    while True:
        text = await page(http, "/", offset=offset)
        pages.append(text)
        if all(f'<tr data-queue="{q}"' in "".join(pages) for q in queues):
            return "".join(pages)
        if 'id="next-page"' not in text or offset > 100_000:
            return "".join(pages)
        offset += 50


async def post(
    http: httpx.AsyncClient, path: str, data: dict[str, Any], *, csrf: bool = True
) -> httpx.Response:
    """POST an action as the dashboard's own form does (with the session's CSRF token)."""
    form = dict(data)
    if csrf:
        form["csrf"] = csrf_of(await page(http, "/failed"))
    return await http.post(path, data=form)


# -- pages -----------------------------------------------------------------------------------


async def test_pages_show_queues_jobs_workers_and_failures(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    queue = manager.settings.queue_default
    bad = f"{queue}-bad"
    waiting = [str(await manager.push(QuickJob(n), queue=queue)) for n in range(3)]
    later = str(await manager.later(600, QuickJob(9), queue=queue))
    failed = str(await manager.push(HostileJob(), queue=bad))
    await work(manager, bad, 1)
    driver = await manager.connection()
    now = time.time()
    await driver.report_worker(
        WorkerInfo(
            "host-a:4242:abc",
            "host-a",
            4242,
            driver.name,
            (queue,),
            4,
            now - 60,
            now,
            17,
            (waiting[0],),
        ),
        30,
    )

    overview = await overview_pages(client, queue, bad)
    assert has(overview, "queues") and has(overview, "nav-overview") and has(overview, "job-search")
    mine = row(overview, "data-queue", queue)
    assert cell(mine, "pending") == "3"
    assert cell(mine, "delayed") == "1"
    assert cell(mine, "failed") == "0"
    assert cell(row(overview, "data-queue", bad), "failed") == "1"
    assert '<svg class="chart throughput"' in mine and '<svg class="chart wait"' in mine
    assert "data-live" in overview

    detail = await page(client, f"/queues/{queue}")
    assert has(detail, "queue-counts") and has(detail, "pause-form") and has(detail, "jobs")
    for job_id in waiting:
        row(detail, "data-job", job_id)
    delayed = await page(client, f"/queues/{queue}", state="delayed")
    row(delayed, "data-job", later)
    assert 'data-job="' + waiting[0] not in delayed
    first_page = await page(client, f"/queues/{queue}", limit=2)
    assert first_page.count('<tr data-job="') == 2 and has(first_page, "next-page")

    job = await page(client, f"/jobs/{failed}")
    assert element_text(job, "job-status") == "failed"
    assert element_text(job, "job-queue") == bad
    assert element_text(job, "job-class").endswith("HostileJob")
    assert HOSTILE in element_text(job, "job-payload")
    assert "RuntimeError" in element_text(job, "job-traceback")
    assert has(job, "retry-form") and has(job, "forget-form") and not has(job, "cancel-form")
    assert "data-live" not in job.split('id="job-live"')[1].split(">")[0]

    queued = await page(client, f"/jobs/{waiting[1]}")
    assert element_text(queued, "job-status") == "queued"
    assert has(queued, "cancel-form") and not has(queued, "retry-form")
    assert 'id="job-live" data-live' in queued

    workers = await page(client, "/workers")
    worker = row(workers, "data-worker", "host-a:4242:abc")
    assert cell(worker, "processed") == "17" and waiting[0] in cell(worker, "running")

    failures = await page(client, "/failed")
    row(failures, "data-job", failed)
    assert has(failures, "retry-selected") and has(failures, "retry-all")
    assert 'name="ids" value="' + failed in failures
    row(await page(client, "/failed", q="runtimeerror"), "data-job", failed)
    row(await page(client, "/failed", queue=bad, q="HostileJob"), "data-job", failed)
    assert 'data-job="' not in await page(client, "/failed", q="no-such-text")
    assert 'data-job="' not in await page(client, "/failed", queue=queue)

    schedules = await page(client, "/schedules")
    assert has(schedules, "schedules")


async def test_the_queue_page_lists_its_groups(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    queue = manager.settings.queue_default
    first = QuickJob(1)
    first.group = "device-<7>"
    holder = str(await manager.push(first, queue=queue))
    for n in range(2):
        later = QuickJob(n)
        later.group = "device-<7>"
        await manager.push(later, queue=queue)
    detail = await page(client, f"/queues/{queue}")
    group = row(detail, "data-group", "device-<7>")
    assert "device-&lt;7&gt;" in group and holder in group
    assert re.search(r"<td>\s*2\s*</td>", group), group
    assert not has(await page(client, "/queues/other-queue"), "groups")


async def test_a_hostile_payload_and_error_are_shown_as_text(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    queue = manager.settings.queue_default
    failed = str(await manager.push(HostileJob(), queue=queue))
    await work(manager, queue, 1)
    for path in (f"/jobs/{failed}", "/failed", "/", f"/queues/{queue}"):
        text = await page(client, path)
        assert "<script>" not in text.replace('<script src="/static/dashboard.js" defer>', "")
    job = await page(client, f"/jobs/{failed}")
    assert "&lt;script&gt;alert(" in job
    assert HOSTILE in element_text(job, "job-error")
    # A waiting job's payload comes from the backend (no failed record): escaped, pretty JSON.
    waiting = str(await manager.push(HostileJob(), queue=queue))
    job = await page(client, f"/jobs/{waiting}")
    assert element_text(job, "job-status") == "queued"
    assert "<script>" not in job.replace('<script src="/static/dashboard.js" defer>', "")
    assert "&lt;script&gt;alert(" in job
    shown = element_text(job, "job-payload")
    assert HOSTILE in shown and "\n  " in shown and not has(job, "job-payload-note")
    # Past 64 KB it is cut, and the page says so.
    big = str(await manager.push(HostileJob("x" * 100_000), queue=queue))
    job = await page(client, f"/jobs/{big}")
    assert len(element_text(job, "job-payload")) <= 64 * 1024
    assert "Truncated" in element_text(job, "job-payload-note")


async def test_unknown_things_are_404_pages(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    missing = await page(client, "/jobs/no-such-job", 404)
    assert "No job no-such-job" in element_text(missing, "error-message")
    assert "not a job id" in await page(client, "/jobs/bad%20id", 404)
    assert "invalid queue name" in await page(client, "/queues/bad%20name", 404)
    await page(client, "/no/such/page", 404)
    await page(client, "/", 404, connection="nowhere")


async def test_metrics_and_health(manager: QueueManager, client: httpx.AsyncClient) -> None:
    queue = manager.settings.queue_default
    await manager.push(QuickJob(), queue=queue)
    scrape = await client.get("/metrics")
    assert scrape.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    depths = {
        (s.labels["queue"], s.labels["state"]): s.value
        for s in families["topiq_queue_jobs"].samples
    }
    omitted = sum(s.value for s in families["topiq_queues_omitted"].samples)
    if omitted == 0:
        assert depths[(queue, "pending")] == 1
    else:
        # A full run's database holds every earlier test's queues: past the cap of queues
        # exported per connection (the first by name), this one may be left out, and counted.
        assert depths.get((queue, "pending"), 1) == 1
    unhealthy = await client.get("/health")  # no live worker yet
    assert unhealthy.status_code == 503
    assert unhealthy.json()["connections"][0] == {
        "connection": manager.connection_name(),
        "ok": False,
        "backend": True,
        "workers": 0,
    }
    driver = await manager.connection()
    now = time.time()
    await driver.report_worker(
        WorkerInfo("h:1:x", "h", 1, driver.name, (queue,), 1, now, now, 0, ()), 30
    )
    healthy = await client.get("/health")
    assert healthy.status_code == 200 and healthy.json()["ok"] is True


@pytest.mark.redis
async def test_the_overview_pages_many_redis_queues_and_metrics_stay_up(redis_url: str) -> None:
    from core.queue.drivers.base import OutgoingJob
    from core.queue.payload import encode
    from tests.conftest import flush_redis

    flush_redis(redis_url)
    settings = make_settings(queue_connection="redis", redis_url=redis_url)
    names = sorted(f"many.{n:03}" for n in range(320))
    try:
        async with (
            QueueManager(settings) as qm,
            served(create_app(settings, qm)) as base,
            httpx.AsyncClient(base_url=base, timeout=60) as http,
        ):
            driver = await qm.connection()
            body = encode(QuickJob(), job_id="x", queue="q", max_bytes=1 << 20)
            await driver.push(
                [OutgoingJob(id=f"m-{n}", queue=name, payload=body) for n, name in enumerate(names)]
            )
            for name in (names[0], names[60], names[319]):
                await driver.pause(name)
            # Four pages at once (people with the page open): 50 queues each, at most 8 rows
            # of a connection read at a time over all of them, so Redis' pool of 100
            # connections is never exhausted.
            pages = await asyncio.gather(
                *(
                    http.get("/", params={"offset": o}, headers={"accept": "text/html"})
                    for o in (0, 50, 100, 300)
                )
            )
            scrape = await http.get("/metrics")
    finally:
        flush_redis(redis_url)
    assert [p.status_code for p in pages] == [200] * 4, pages[0].text[-400:]
    rows = [re.findall(r'<tr data-queue="([^"]+)"', p.text) for p in pages]
    assert rows[0] == names[:50] and rows[1] == names[50:100] and rows[3] == names[300:]
    assert re.search(rf'<tr data-queue="{names[0]}" class="paused"', pages[0].text)
    assert re.search(rf'<tr data-queue="{names[60]}" class="paused"', pages[1].text)
    assert not re.search(rf'<tr data-queue="{names[61]}" class="paused"', pages[1].text)
    assert "1\u201350 of 320 queues" in pages[0].text and 'id="next-page"' in pages[0].text
    assert 'id="prev-page"' not in pages[0].text
    assert "301\u2013320 of 320 queues" in pages[3].text and 'id="next-page"' not in pages[3].text
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    assert [s.value for s in families["topiq_backend_up"].samples] == [1.0]
    exported = {s.labels["queue"] for s in families["topiq_queue_paused"].samples}
    assert exported == set(names[:250])  # the cap, by name
    assert [s.value for s in families["topiq_queues_omitted"].samples] == [70.0]
    paused = {s.labels["queue"] for s in families["topiq_queue_paused"].samples if s.value}
    assert paused == {names[0], names[60]}


async def test_metrics_say_a_connection_that_cannot_be_opened_is_down() -> None:
    closed = free_port()
    settings = make_settings(queue_connection="memory", redis_url=f"redis://127.0.0.1:{closed}/0")
    async with (
        QueueManager(settings) as qm,
        served(create_app(settings, qm)) as base,
        httpx.AsyncClient(base_url=base, timeout=60) as http,
    ):
        scrape = await http.get("/metrics")
    assert scrape.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    up = {s.labels["connection"]: s.value for s in families["topiq_backend_up"].samples}
    assert up == {"memory": 1.0, "redis": 0.0}


async def test_no_form_posts_to_the_requested_path(client: httpx.AsyncClient) -> None:
    # The connection switcher submits to the page it is on (action=""), never to a path taken
    # from the request: `GET //evil.example/x` must not render a form pointing there.
    host, port = client.base_url.host, client.base_url.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET //evil.example/x HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/html\r\nConnection: close\r\n\r\n".encode()
    )
    answer = (await reader.read()).decode()
    writer.close()
    assert answer.startswith("HTTP/1.1 404")
    assert 'id="connection-form" method="get" action=""' in answer
    assert "evil.example" not in answer.split("<body>", 1)[1].split("<main>", 1)[0]


# -- actions ---------------------------------------------------------------------------------


async def test_retry_from_the_job_page_runs_the_job_again(
    manager: QueueManager, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    queue = manager.settings.queue_default
    job_id = str(await manager.push(FailsOnceJob(str(tmp_path / "ran")), queue=queue))
    await work(manager, queue, 1)
    store = await manager.failed_store()
    assert await store.get(job_id) is not None

    refused = await post(client, f"/jobs/{job_id}", {"action": "retry"}, csrf=False)
    assert refused.status_code == 403
    assert await store.get(job_id) is not None

    done = await post(client, f"/jobs/{job_id}", {"action": "retry"})
    assert done.status_code == 303 and done.headers["location"].startswith(f"/jobs/{job_id}")
    assert await store.get(job_id) is None
    shown = await page(client, f"/jobs/{job_id}")
    assert element_text(shown, "job-status") == "queued"
    assert "back on queue" in element_text(shown, "flash")
    await work(manager, queue, 1)
    assert element_text(await page(client, f"/jobs/{job_id}"), "job-status") == "succeeded"
    assert "second run succeeds" in element_text(
        await page(client, f"/jobs/{job_id}"), "job-result"
    )
    # The last hour's counts and chart show the failed first run and the successful retry.
    overview = row(await overview_pages(client, queue), "data-queue", queue)
    assert cell(overview, "succeeded") == "1"
    assert cell(overview, "throughput") == "0.03"  # 2 ended over 60 minutes
    chart = overview.split('<svg class="chart throughput"')[1].split("</svg>")[0]
    assert '<rect class="ok"' in chart and '<rect class="bad"' in chart


async def test_cancel_and_forget(manager: QueueManager, client: httpx.AsyncClient) -> None:
    queue = manager.settings.queue_default
    waiting = str(await manager.push(QuickJob(), queue=queue))
    assert (
        await post(client, f"/jobs/{waiting}", {"action": "cancel"}, csrf=False)
    ).status_code == 403
    assert (await manager.job(waiting).status()).status is Status.QUEUED
    assert (await post(client, f"/jobs/{waiting}", {"action": "cancel"})).status_code == 303
    assert (await manager.job(waiting).status()).status is Status.CANCELLED

    failed = str(await manager.push(HostileJob(), queue=queue))
    await work(manager, queue, 1)
    store = await manager.failed_store()
    assert (
        await post(client, f"/jobs/{failed}", {"action": "forget"}, csrf=False)
    ).status_code == 403
    assert await store.get(failed) is not None
    answer = await post(client, f"/jobs/{failed}", {"action": "forget"})
    assert answer.status_code == 303 and answer.headers["location"].startswith("/failed")
    assert await store.get(failed) is None


async def test_retry_many_forget_many_and_retry_all(
    manager: QueueManager, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    queue = manager.settings.queue_default
    ids = [
        str(await manager.push(FailsOnceJob(str(tmp_path / f"m{n}")), queue=queue))
        for n in range(5)
    ]
    await work(manager, queue, 5)
    store = await manager.failed_store()
    assert await store.count(queue) == 5

    refused = await post(client, "/failed", {"action": "retry", "ids": ids[:2]}, csrf=False)
    assert refused.status_code == 403 and await store.count(queue) == 5

    answer = await post(client, "/failed", {"action": "retry", "ids": ids[:2]})
    assert answer.status_code == 303
    assert [await store.get(i) is None for i in ids] == [True, True, False, False, False]
    assert "Retried 2" in element_text(await page(client, "/failed"), "flash")

    await post(client, "/failed", {"action": "forget", "ids": [ids[2]]})
    assert await store.get(ids[2]) is None

    # Everything the filter shows: only this queue's records matching the text.
    answer = await post(
        client, "/failed", {"action": "retry-all", "queue": queue, "q": "first run"}
    )
    assert answer.status_code == 303 and await store.count(queue) == 0
    await work(manager, queue, 4)
    for job_id in (ids[0], ids[1], ids[3], ids[4]):
        assert (await manager.job(job_id).status()).status is Status.SUCCEEDED


async def test_pause_and_resume(manager: QueueManager, client: httpx.AsyncClient) -> None:
    queue = manager.settings.queue_default
    driver = await manager.connection()
    await manager.push(QuickJob(), queue=queue)  # the overview lists the queues in use
    path = f"/queues/{queue}"
    assert (await post(client, path, {"action": "pause"}, csrf=False)).status_code == 403
    assert await driver.paused([queue]) == set()
    assert (await post(client, path, {"action": "pause"})).status_code == 303
    assert await driver.paused([queue]) == {queue}
    shown = await page(client, path)
    assert has(shown, "resume-form") and not has(shown, "pause-form")
    assert '<tr data-queue="' + queue + '" class="paused">' in await overview_pages(client, queue)
    assert (await post(client, path, {"action": "resume"})).status_code == 303
    assert await driver.paused([queue]) == set()


async def test_a_post_from_another_origin_is_refused(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    queue = manager.settings.queue_default
    driver = await manager.connection()
    token = csrf_of(await page(client, "/failed"))
    for headers in (
        {"origin": "http://evil.example"},
        {"referer": "http://evil.example/page"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
    ):
        answer = await client.post(
            f"/queues/{queue}", data={"action": "pause", "csrf": token}, headers=headers
        )
        assert answer.status_code == 403, headers
    assert await driver.paused([queue]) == set()
    wrong = await client.post(f"/queues/{queue}", data={"action": "pause", "csrf": "x" * 43})
    assert wrong.status_code == 403
    same = await client.post(
        f"/queues/{queue}",
        data={"action": "pause", "csrf": token},
        headers={"origin": str(client.base_url).rstrip("/")},
    )
    assert same.status_code == 303 and await driver.paused([queue]) == {queue}


# -- security without a browser --------------------------------------------------------------


async def test_a_dashboard_without_token_answers_only_loopback_host_names(
    manager: QueueManager, client: httpx.AsyncClient
) -> None:
    """A web page cannot read the tokenless dashboard through DNS rebinding."""
    rebound = await client.get("/", headers={"host": "attacker.example"})
    assert rebound.status_code == 403
    assert (await client.get("/", headers={"host": "localhost:1234"})).status_code == 200


async def test_login_sends_only_to_local_paths() -> None:
    token = "tok-" + uuid.uuid4().hex
    settings = make_settings(queue_connection="memory", dashboard_token=token)
    async with (
        QueueManager(settings) as qm,
        served(create_app(settings, qm)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as http,
    ):
        for target, landing in (
            ("//evil.example/x", "/"),
            ("https://evil.example/", "/"),
            ("/\\evil.example", "/"),
            ("/\t/evil.example", "/"),
            ("/failed?queue=a", "/failed?queue=a"),
        ):
            http.cookies.clear()
            form = {
                "token": token,
                "next": target,
                "csrf": csrf_of((await http.get("/login")).text),
            }
            answer = await http.post("/login", data=form)
            assert answer.status_code == 303 and answer.headers["location"] == landing, target


async def test_wrong_tokens_are_answered_429_after_ten_a_minute() -> None:
    token = "tok-" + uuid.uuid4().hex
    settings = make_settings(queue_connection="memory", dashboard_token=token)
    async with (
        QueueManager(settings) as qm,
        served(create_app(settings, qm)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as http,
    ):
        csrf = csrf_of((await http.get("/login")).text)
        codes = [
            (await http.post("/login", data={"token": f"guess{n}", "csrf": csrf})).status_code
            for n in range(10)
        ]
        assert codes == [401] * 10
        refused = await http.post("/login", data={"token": "guess", "csrf": csrf})
        assert refused.status_code == 429
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert "Too many wrong tokens" in refused.text
        # While refused the token is not even compared: the right one waits too.
        right = await http.post("/login", data={"token": token, "csrf": csrf})
        assert right.status_code == 429
        # Bearer requests are not logins: they still work.
        bearer = {"authorization": f"Bearer {token}"}
        assert (await http.get("/metrics", headers=bearer)).status_code == 200


async def test_the_login_throttle_forgets_old_failures_and_stays_bounded() -> None:
    from core.dashboard import security
    from core.dashboard.security import LoginThrottle

    throttle = LoginThrottle(failures=2, window=0.3)
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")
    assert 0 < throttle.retry_after("10.0.0.1") <= 0.3
    assert throttle.retry_after("10.0.0.2") == 0  # per address
    await asyncio.sleep(0.35)  # the window itself is what is tested
    assert throttle.retry_after("10.0.0.1") == 0
    throttle.failed("10.0.0.1")
    throttle.failed("10.0.0.1")
    throttle.succeeded("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 0
    # A flood of addresses does not grow it without bound.
    many = LoginThrottle()
    for n in range(security._THROTTLE_ADDRESSES + 500):
        many.failed(f"a{n}")
    assert len(many._seen) == security._THROTTLE_ADDRESSES
    assert many.retry_after("a0") == 0 and "a0" not in many._seen


@pytest.mark.redis
async def test_no_secret_is_shown_anywhere(redis_url: str, mysql_url: str) -> None:
    """Passwords in REDIS_URL and DB_URL (both wrong, so the pages show their errors) and the
    token never reach a page, a header, /metrics or /health."""
    token = "tok-" + uuid.uuid4().hex
    redis_password = "redispw-" + uuid.uuid4().hex[:12]
    db_password = "dbpw-" + uuid.uuid4().hex[:12]
    host = redis_url.split("//", 1)[1].split("/", 1)[0]
    parts = httpx.URL(mysql_url.replace("mysql+aiomysql", "http"))
    settings = make_settings(
        queue_connection="redis",
        redis_url=f"redis://default:{redis_password}@{host}/15",
        db_url=f"mysql+aiomysql://topiq:{db_password}@{parts.host}:{parts.port}{parts.path}",
        dashboard_token=token,
    )
    secrets = (token, redis_password, db_password)
    async with (
        QueueManager(settings) as qm,
        served(create_app(settings, qm)) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        seen: list[httpx.Response] = [await http.get("/login"), await http.get("/health")]
        bearer = {"authorization": f"Bearer {token}", "accept": "text/html"}
        for connection in ("redis", "database"):
            for path in ("/", "/workers", "/failed", "/schedules", "/queues/q", "/jobs/j1"):
                answer = await http.get(path, params={"connection": connection}, headers=bearer)
                assert answer.status_code in (200, 404, 503), (path, answer.status_code)
                seen.append(answer)
        seen.append(await http.get("/metrics", headers=bearer))
        assert any(a.status_code == 503 for a in seen)  # the wrong passwords were used
        for answer in seen:
            shown = answer.text + str(answer.headers)
            for secret in secrets:
                assert secret not in shown, (answer.url, secret)


# -- the real command ------------------------------------------------------------------------


def test_the_command_refuses_to_bind_off_loopback_without_a_token(tmp_path: Path) -> None:
    port = free_port()
    proc = DashboardProcess(
        ["--host", "0.0.0.0", "--port", str(port)],
        {"DASHBOARD_TOKEN": "", "QUEUE_CONNECTION": "memory"},
        tmp_path / "dashboard.log",
    )
    assert proc.proc.wait(30) == 1
    assert "refusing to serve the dashboard on 0.0.0.0 without a token" in proc.output
    assert "DASHBOARD_TOKEN" in proc.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_the_command_refuses_a_short_token_off_loopback(tmp_path: Path) -> None:
    port = free_port()
    proc = DashboardProcess(
        ["--host", "0.0.0.0", "--port", str(port)],
        {"DASHBOARD_TOKEN": "short-token", "QUEUE_CONNECTION": "memory"},
        tmp_path / "dashboard.log",
    )
    assert proc.proc.wait(30) == 1
    assert "DASHBOARD_TOKEN of 11 characters" in proc.output
    assert "at least 16" in proc.output
    assert "short-token" not in proc.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.process
def test_the_command_with_a_token_needs_login_or_bearer(tmp_path: Path) -> None:
    token = "tok-" + uuid.uuid4().hex
    port = free_port()
    proc = DashboardProcess(
        ["--host", "0.0.0.0", "--port", str(port)],
        {
            "DASHBOARD_TOKEN": token,
            "QUEUE_CONNECTION": "database",
            "DB_URL": f"sqlite+aiosqlite:///{tmp_path}/queue.db",
        },
        tmp_path / "dashboard.log",
    )
    try:
        proc.wait_listening()
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=20) as http:
            browser = http.get("/workers", headers={"accept": "text/html"})
            assert browser.status_code == 303
            assert browser.headers["location"] == "/login?next=%2Fworkers"
            assert http.get("/metrics").status_code == 401
            assert http.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/health").status_code in (200, 503)  # no token needed
            assert (
                http.get("/metrics", headers={"authorization": f"Bearer {token}"}).status_code
                == 200
            )

            login = http.get("/login").text
            assert 'id="login"' in login and 'name="token"' in login
            assert http.post("/login", data={"token": token}).status_code == 403  # no CSRF
            wrong = http.post("/login", data={"token": "nope", "csrf": csrf_of(login)})
            assert wrong.status_code == 401
            assert http.get("/", headers={"accept": "text/html"}).status_code == 303
            good = http.post(
                "/login", data={"token": token, "csrf": csrf_of(login), "next": "/workers"}
            )
            assert good.status_code == 303 and good.headers["location"] == "/workers"
            overview = http.get("/")
            assert overview.status_code == 200 and 'id="queues"' in overview.text
            assert token not in overview.text

            # Logged in, an action still needs the CSRF token.
            refused = http.post("/queues/q1", data={"action": "pause"})
            assert refused.status_code == 403
            paused = http.post(
                "/queues/q1", data={"action": "pause", "csrf": csrf_of(overview.text)}
            )
            assert paused.status_code == 303
            assert 'id="resume-form"' in http.get("/queues/q1").text

            # A request of another site's page, on the user's session, is refused.
            evil = http.post(
                "/queues/q1",
                data={"action": "resume", "csrf": csrf_of(overview.text)},
                headers={"origin": "http://evil.example"},
            )
            assert evil.status_code == 403
        with httpx.Client(base_url=base, timeout=20) as stranger:
            assert stranger.get("/queues/q1").status_code == 401
            assert stranger.post("/queues/q1", data={"action": "resume"}).status_code == 401
    finally:
        assert proc.stop() == 0, proc.output
    assert token not in proc.output


def test_the_command_on_loopback_serves_without_a_token_and_stops_on_sigterm(
    tmp_path: Path, server_backend: Backend
) -> None:
    port = free_port()
    proc = DashboardProcess(
        ["--port", str(port)], {"DASHBOARD_TOKEN": "", **server_backend.env()}, tmp_path / "d.log"
    )
    try:
        proc.wait_listening()
        assert f"dashboard on http://127.0.0.1:{port}/" in proc.output
        answer = httpx.get(f"http://127.0.0.1:{port}/", headers={"accept": "text/html"}, timeout=30)
        assert answer.status_code == 200, (answer.text[-800:], proc.output)
        assert 'id="queues"' in answer.text
    finally:
        started = time.monotonic()
        assert proc.stop() == 0, proc.output
    assert time.monotonic() - started < 5


def test_the_command_says_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = DashboardProcess(
            ["--port", str(port), "--connection", "memory"], {}, tmp_path / "d.log"
        )
        assert proc.proc.wait(30) == 1
    assert f"topiq: the dashboard cannot listen on 127.0.0.1:{port}" in proc.output
    assert "Traceback" not in proc.output
