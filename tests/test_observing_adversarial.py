"""Hostile review of #15 (dashboard, metrics, logs): an unlucky operator and a hostile sender.

Passing probes stay as regression tests; confirmed bugs are `xfail(strict=True)` with the
reason (see /work/notes/review15-breakit.md). Requests whose path must reach the server
exactly as written (`//x`, `/static/../x`, `%2F`) go over a raw socket: httpx would
normalise them first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core.dashboard import create_app
from core.job import Job
from core.log import _JsonFormatter, job_fields
from core.queue.drivers.base import FailedJob, OutgoingJob
from core.queue.payload import encode
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.conftest import Backend, make_settings
from tests.dashboard.support import QuickJob, csrf_of, served
from tests.servers import free_port

pytestmark = pytest.mark.timeout(60)


async def raw_request(
    base: str, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with `target` sent byte for byte; (status, headers, body)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        found[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), found, body


@pytest.fixture
async def guarded() -> AsyncIterator[tuple[str, str, QueueManager]]:
    """A dashboard with a token, on the memory connection: (base URL, token, manager)."""
    token = "tok-" + uuid.uuid4().hex
    settings = make_settings(queue_connection="memory", dashboard_token=token)
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        yield base, token, qm


async def logged_in(base: str, token: str) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=base, timeout=20)
    csrf = csrf_of((await http.get("/login")).text)
    answer = await http.post("/login", data={"token": token, "csrf": csrf, "next": "/"})
    assert answer.status_code == 303
    return http


# -- (1) no page or action without the token -------------------------------------------------

_TARGETS = (
    "/",
    "/metrics",
    "//metrics",
    "/metrics/",
    "/%2Fmetrics",
    "/workers",
    "/failed",
    "/failed/",
    "/jobs/x",
    "/queues/default",
    "/schedules",
    "/static/../metrics",
    "/static/%2e%2e/metrics",
    "/static/..%2Fmetrics",
    "/static/%2e%2e%2fmetrics",
    "/static//../metrics",
    "/health/../metrics",
    "/login/../metrics",
    "/login/..%2Fmetrics",
    "/./metrics",
    "/Metrics",
    "/metrics?connection=memory",
    "/static/../../core/settings.py",
    "/static/%2e%2e/%2e%2e/settings.py",
)


async def test_no_page_and_no_action_without_the_token(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, qm = guarded
    queue = qm.settings.queue_default
    secret_marks = (b"topiq_", b'id="queues"', b'id="workers"', b'id="failed"', b"SecretStr")
    bad_auth: tuple[dict[str, str], ...] = (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {token}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Token {token}"},
        {"Cookie": "topiq_dashboard=eyJhdXRoIjogdHJ1ZX0="},  # {"auth": true}, unsigned
        {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"},
    )
    for target in _TARGETS:
        for method in ("GET", "HEAD", "OPTIONS", "POST"):
            for headers in bad_auth:
                status, got, body = await raw_request(
                    base, method, target, {"Accept": "text/html", **headers}
                )
                assert status in (303, 401, 403, 404, 405), (method, target, headers, status)
                if status == 303:
                    assert got["location"].startswith("/login"), (target, got)
                assert not any(mark in body for mark in secret_marks), (method, target, body)
    # nothing happened: no action went through
    driver = await qm.connection()
    assert await driver.paused([queue]) == set()
    for headers in bad_auth:
        status, _, _ = await raw_request(
            base, "POST", f"/queues/{queue}?action=pause", {"Accept": "*/*", **headers}
        )
        assert status in (401, 403)
    assert await driver.paused([queue]) == set()


async def test_static_files_cannot_reach_outside_their_folder(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, _, _ = guarded
    for target in (
        "/static/../templates/base.html",
        "/static/%2e%2e/templates/base.html",
        "/static/..%2Ftemplates%2Fbase.html",
        "/static/....//templates/base.html",
        "/static/%2e%2e/%2e%2e/settings.py",
        "/static//etc/passwd",
        "/static/%2Fetc%2Fpasswd",
    ):
        status, _, body = await raw_request(base, "GET", target)
        assert status in (400, 401, 404), (target, status)
        assert b"{% extends" not in body and b"root:" not in body and b"import" not in body
    status, _, _ = await raw_request(base, "GET", "/static/dashboard.css")
    assert status == 200


async def test_csrf_of_another_session_or_a_json_post_is_refused(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, qm = guarded
    queue = qm.settings.queue_default
    driver = await qm.connection()
    alice = await logged_in(base, token)
    mallory = await logged_in(base, token)
    try:
        alice_csrf = csrf_of((await alice.get("/failed")).text)
        # Mallory's session with Alice's CSRF token
        wrong = await mallory.post(f"/queues/{queue}", data={"action": "pause", "csrf": alice_csrf})
        assert wrong.status_code == 403
        # JSON body (the form parser sees nothing): no token read from it
        as_json = await alice.post(
            f"/queues/{queue}",
            content=json.dumps({"action": "pause", "csrf": alice_csrf}),
            headers={"content-type": "application/json"},
        )
        assert as_json.status_code in (400, 403)
        # text/plain form-looking body (what a cross-site <form enctype=text/plain> sends)
        plain = await alice.post(
            f"/queues/{queue}",
            content=f"action=pause&csrf={alice_csrf}",
            headers={"content-type": "text/plain", "origin": "null"},
        )
        assert plain.status_code in (400, 403)
        # Origin and Referer both absent, Sec-Fetch-Site cross-site
        cross = await alice.post(
            f"/queues/{queue}",
            data={"action": "pause", "csrf": alice_csrf},
            headers={"sec-fetch-site": "cross-site"},
        )
        assert cross.status_code == 403
        # an origin that only starts like ours
        lookalike = await alice.post(
            f"/queues/{queue}",
            data={"action": "pause", "csrf": alice_csrf},
            headers={"origin": base + ".evil.example"},
        )
        assert lookalike.status_code == 403
        assert await driver.paused([queue]) == set()
    finally:
        await alice.aclose()
        await mallory.aclose()


@pytest.mark.xfail(
    strict=True,
    reason="logout only drops the cookie in the browser: the signed session holds auth=True "
    "and stays valid for 12 h after logout (stateless Starlette session, no server-side "
    "revocation); a copied cookie outlives the logout",
)
async def test_a_session_cookie_is_dead_after_logout(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, _ = guarded
    http = await logged_in(base, token)
    try:
        stolen = http.cookies["topiq_dashboard"]
        csrf = csrf_of((await http.get("/failed")).text)
        assert (await http.post("/logout", data={"csrf": csrf})).status_code == 303
        replay = await raw_request(base, "GET", "/metrics", {"Cookie": f"topiq_dashboard={stolen}"})
        assert replay[0] == 401
    finally:
        await http.aclose()


async def test_a_flood_of_wrong_tokens_is_slowed_down(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, _, _ = guarded
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        csrf = csrf_of((await http.get("/login")).text)
        started = time.monotonic()
        codes = {
            (await http.post("/login", data={"token": f"guess{n}", "csrf": csrf})).status_code
            for n in range(100)
        }
        took = time.monotonic() - started
    assert 429 in codes or took > 10, (codes, took)


@pytest.mark.xfail(
    strict=True,
    reason="the session cookie never has the Secure flag (SessionMiddleware https_only left "
    "False), even when the proxy says the request came over HTTPS (X-Forwarded-Proto) - app.py",
)
async def test_the_session_cookie_is_secure_behind_an_https_proxy(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, _ = guarded
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        csrf = csrf_of((await http.get("/login")).text)
        answer = await http.post(
            "/login",
            data={"token": token, "csrf": csrf},
            headers={"x-forwarded-proto": "https"},
        )
    assert answer.status_code == 303
    assert "secure" in answer.headers["set-cookie"].lower()


async def test_login_next_never_leaves_the_site(guarded: tuple[str, str, QueueManager]) -> None:
    base, token, _ = guarded
    for target in (
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/%09/evil.example",
        "https:evil.example",
        "http://evil.example",
        "javascript:alert(1)",
        "/\r\nSet-Cookie: x=1",
        "\x00/evil",
        " //evil.example",
        "/\u3000/evil.example",
        "///evil.example",
    ):
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            csrf = csrf_of((await http.get("/login", params={"next": target})).text)
            answer = await http.post("/login", data={"token": token, "csrf": csrf, "next": target})
            assert answer.status_code == 303
            location = answer.headers["location"]
            parsed = httpx.URL(base).join(location)
            assert parsed.host == "127.0.0.1", (target, location)
            assert "set-cookie: x" not in str(answer.headers).lower()


async def test_a_404_page_has_no_form_pointing_off_site() -> None:
    settings = make_settings(queue_connection="memory")
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        status, _, body = await raw_request(base, "GET", "//evil.example/x")
        assert status == 404
        assert b'action="//evil.example' not in body


async def test_hostile_worker_reports_and_group_names_are_escaped(
    guarded: tuple[str, str, QueueManager],
) -> None:
    """A worker record (written by anything with backend access) and names in it are text."""
    from core.queue.drivers.base import WorkerInfo

    base, token, qm = guarded
    driver = await qm.connection()
    now = time.time()
    evil = "<img src=x onerror=alert(1)>"
    await driver.report_worker(
        WorkerInfo(
            f"w:{evil}",
            evil,
            -1,
            driver.name,
            (evil, "ok"),
            10**9,
            now * 10,
            -now,
            -5,
            (evil, "../../x"),
        ),
        30,
    )
    http = await logged_in(base, token)
    try:
        answer = await http.get("/workers")
        assert answer.status_code == 200, answer.text[:300]
        assert "<img src" not in answer.text and "&lt;img src=x" in answer.text
    finally:
        await http.aclose()


# -- (2) odd ids, lying records, huge payloads --------------------------------------------------


async def test_odd_job_ids_get_a_404_page(guarded: tuple[str, str, QueueManager]) -> None:
    base, token, _ = guarded
    http = await logged_in(base, token)
    try:
        for job_id in (
            "x" * 10_000,
            "%C3%A9t%C3%A9",
            "..%2F..%2Fetc%2Fpasswd",
            "%00",
            "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            "a%0d%0aSet-Cookie:%20x=1",
            "%F0%9F%92%A5",
            "%FF%FE",
        ):
            status, headers, body = await raw_request(
                base,
                "GET",
                f"/jobs/{job_id}",
                {"Cookie": f"topiq_dashboard={http.cookies['topiq_dashboard']}"},
            )
            assert status == 404, (job_id[:40], status)
            assert b"<script>alert" not in body and b"Traceback" not in body
            assert "x" not in headers.get("set-cookie", "").split("=")[0]
        # and the search form with such an id
        answer = await http.get("/jobs", params={"id": "<script>alert(1)</script>"})
        assert answer.status_code == 303
        landing = await http.get(answer.headers["location"])
        assert landing.status_code == 404 and "<script>alert" not in landing.text
    finally:
        await http.aclose()


async def test_a_failed_record_whose_payload_is_not_json(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, qm = guarded
    store = await qm.failed_store()
    queue = qm.settings.queue_default
    for job_id, payload in (
        ("bin-1", "\ufffd\x00<script>alert(1)</script>{not json"),
        ("list-1", "[1, 2, 3]"),
        ("num-1", "12"),
        ("deep-1", "[" * 5000 + "]" * 5000),
        ("nul-1", '{"job": "x\\u0000<img src=x onerror=alert(1)>"}'),
    ):
        await store.add(
            FailedJob(
                id=job_id,
                connection="memory",
                queue=queue,
                payload=payload,
                exception="ValueError: <b>bold</b>\n",
                failed_at=datetime.now(UTC),
            )
        )
    http = await logged_in(base, token)
    try:
        for job_id in ("bin-1", "list-1", "num-1", "deep-1", "nul-1"):
            answer = await http.get(f"/jobs/{job_id}")
            assert answer.status_code == 200, (job_id, answer.text[:300])
            assert "<script>alert" not in answer.text and "<img src" not in answer.text
            assert "<b>bold" not in answer.text
        listing = await http.get("/failed")
        assert listing.status_code == 200 and "<script>alert" not in listing.text
        assert (await http.get("/failed", params={"q": "bold"})).status_code == 200
    finally:
        await http.aclose()


async def test_a_one_megabyte_payload_gives_a_bounded_job_page(
    guarded: tuple[str, str, QueueManager],
) -> None:
    base, token, qm = guarded
    store = await qm.failed_store()
    payload = json.dumps({"job": "app.jobs:Big", "data": {"blob": "<a>" * 350_000}})
    assert len(payload) > 1_000_000
    await store.add(
        FailedJob(
            id="big-1",
            connection="memory",
            queue=qm.settings.queue_default,
            payload=payload,
            exception="RuntimeError: too big\n",
            failed_at=datetime.now(UTC),
        )
    )
    http = await logged_in(base, token)
    try:
        started = time.monotonic()
        answer = await http.get("/jobs/big-1")
        took = time.monotonic() - started
        assert answer.status_code == 200
        assert len(answer.content) < 600_000, len(answer.content)  # cut, escaped
        assert "<a><a>" not in answer.text
        assert took < 5, took
    finally:
        await http.aclose()


def _foreign_record(job_id: str, connection: str, marker: Path) -> FailedJob:
    from tests.dashboard.support import FailsOnceJob

    body = encode(FailsOnceJob(str(marker)), job_id=job_id, queue="default", max_bytes=1 << 20)
    return FailedJob(
        id=job_id,
        connection=connection,
        queue="default",
        payload=body.decode(),
        exception="RuntimeError: first run fails\n",
        failed_at=datetime.now(UTC),
    )


async def test_retrying_a_memory_connection_record_does_not_lose_it(tmp_path: Path) -> None:
    settings = make_settings(
        queue_connection="database",
        db_url=f"sqlite+aiosqlite:///{tmp_path}/q.db",
        queue_failed_connection="database",
    )
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        store = await qm.failed_store()
        await store.add(_foreign_record("j-memory", "memory", tmp_path / "m"))
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            csrf = csrf_of((await http.get("/failed")).text)
            await http.post("/jobs/j-memory", data={"action": "retry", "csrf": csrf})
        # either refused (still in the store) or somewhere a worker process can take it
        assert await store.get("j-memory") is not None


async def test_retrying_a_sync_connection_record_runs_no_job_code_in_the_dashboard(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        queue_connection="database",
        db_url=f"sqlite+aiosqlite:///{tmp_path}/q.db",
        queue_failed_connection="database",
    )
    marker = tmp_path / "ran-in-dashboard"
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        store = await qm.failed_store()
        await store.add(_foreign_record("j-sync", "sync", marker))
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            csrf = csrf_of((await http.get("/failed")).text)
            answer = await http.post("/jobs/j-sync", data={"action": "retry", "csrf": csrf})
        assert answer.status_code in (303, 400, 409), answer.status_code
    assert not marker.exists(), "the job ran inside the dashboard process"


# -- (2) backend down: a page saying so, in bounded time, and recovery -----------------------


async def test_a_dead_backend_is_a_503_page_in_bounded_time_without_secrets() -> None:
    port = free_port()  # nothing listens there
    password = "pw-" + uuid.uuid4().hex[:10]
    token = "tok-" + uuid.uuid4().hex
    settings = make_settings(
        queue_connection="redis",
        redis_url=f"redis://default:{password}@127.0.0.1:{port}/0",
        dashboard_token=token,
    )
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        bearer = {"authorization": f"Bearer {token}", "accept": "text/html"}
        async with httpx.AsyncClient(base_url=base, timeout=40) as http:
            timings: dict[str, float] = {}
            for path in (
                "/",
                "/failed",
                "/workers",
                "/jobs/j1",
                "/queues/q",
                "/health",
                "/metrics",
            ):
                started = time.monotonic()
                answer = await http.get(path, headers=bearer)
                timings[path] = time.monotonic() - started
                expected = 200 if path == "/metrics" else 503
                assert answer.status_code == expected, (path, answer.status_code)
                assert "Traceback" not in answer.text, path
                assert password not in answer.text + str(answer.headers), path
            assert max(timings.values()) < 15, timings


async def test_the_dashboards_metrics_say_backend_down() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    settings = make_settings(
        queue_connection="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    async with (
        QueueManager(settings) as qm,
        served(create_app(settings, qm)) as base,
        httpx.AsyncClient(base_url=base, timeout=40) as http,
    ):
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    up = {
        sample.labels.get("connection"): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == "topiq_backend_up"
    }
    assert up.get("redis") == 0, up


@pytest.mark.redis
async def test_redis_hung_then_killed_and_back_the_pages_recover(tmp_path: Any) -> None:
    """SIGSTOP then kill -9 the backend under a running dashboard: pages say so (503) in
    bounded time, no traceback; the same process serves again once Redis is back."""
    from tests.servers import PrivateServer, _binary

    binary = _binary("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start() -> PrivateServer:
        server = PrivateServer("redis-adv", [*argv, "--dir", str(tmp_path)], port, tmp_path)
        server.wait_listening()
        return server

    server = start()
    settings = make_settings(queue_connection="redis", redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        async with (
            QueueManager(settings) as qm,
            served(create_app(settings, qm)) as base,
            httpx.AsyncClient(base_url=base, timeout=40) as http,
        ):
            await qm.push(QuickJob(1), queue="adv")
            assert (await http.get("/")).status_code == 200
            # hung (SIGSTOP): a page in bounded time, then served again once it wakes
            server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                hung = await http.get("/")
                assert hung.status_code == 503, hung.status_code
                assert time.monotonic() - started < 12
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert (await http.get("/")).status_code == 200
            server.proc.kill()
            server.proc.wait(10)
            for path in ("/", "/queues/adv", "/failed", "/health"):
                started = time.monotonic()
                answer = await http.get(path)
                assert answer.status_code == 503, (path, answer.status_code)
                assert "Traceback" not in answer.text
                assert time.monotonic() - started < 15, path
            server = start()
            deadline = time.monotonic() + 20
            while True:  # no event says "the client reconnected": ask until it answers
                answer = await http.get("/queues/adv")
                if answer.status_code == 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert answer.status_code == 200, answer.text[:500]
    finally:
        server.stop()


# -- (4) metrics: made-up classes do not grow the label set ----------------------------------


async def test_made_up_job_classes_do_not_grow_metric_labels(tmp_path: Any) -> None:
    from prometheus_client import generate_latest

    from core import metrics
    from core.worker.options import WorkerOptions
    from core.worker.worker import Worker

    def job_labels() -> set[str]:
        text = generate_latest(metrics.REGISTRY).decode()
        return {
            line.split("{", 1)[1].split("}", 1)[0]
            for line in text.splitlines()
            if "{" in line and "job=" in line
        }

    settings = make_settings(queue_connection="memory")
    metrics.install()
    before = job_labels()  # the session's other tests counted jobs in this registry too
    async with QueueManager(settings) as qm:
        driver = await qm.connection()
        queue = settings.queue_default
        jobs = []
        for n in range(200):
            job_id = f"evil-{n}"
            body = orjson.loads(encode(QuickJob(n), job_id=job_id, queue=queue, max_bytes=1 << 20))
            # a class outside the allowed modules, or inside them but missing
            body["job"] = f"evil{n}.mod:Class{n}" if n % 2 else f"tests.nope{n}:Class{n}"
            jobs.append(
                OutgoingJob(id=job_id, queue=queue, payload=orjson.dumps(body), job=body["job"])
            )
        await driver.push(jobs)
        await Worker(qm, WorkerOptions(queues=(queue,), sleep=0.01, max_jobs=200)).run()
    text = generate_latest(metrics.REGISTRY).decode()
    assert "evil1" not in text and "nope" not in text
    assert 'job="unknown"' in text
    added = job_labels() - before
    # 200 made-up classes add the `unknown` label sets of a few series, not 200 of each
    assert len(added) < 60, sorted(added)[:10]


# -- (7) JSON logs: a job's extra cannot break the line, and its fields are the job's ---------


async def test_json_log_lines_keep_the_job_fields_against_odd_extras_and_in_sub_tasks() -> None:
    """A job's own line with odd `extra` still formats, cannot overwrite the line's own keys
    (ts, level, logger, msg), and lines from its sub-task and `asyncio.to_thread` carry its
    fields. (A plain `threading.Thread` or `run_in_executor` started by the job does not:
    Python copies no context there - see the report.)"""
    record_logger = logging.getLogger("tests.adversarial")
    formatter = _JsonFormatter()
    lines: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    handler = Keep()
    record_logger.addHandler(handler)
    record_logger.setLevel(logging.INFO)
    record_logger.propagate = False
    try:
        with job_fields(job_id="real-1", queue="q", job="m:C", attempt=1, worker="w1"):
            record_logger.info(
                "hi %s",
                "x",
                extra={"queue": object(), "ts": "forged", "level": "FORGED", "logger": "forged"},
            )

            async def sub() -> None:
                record_logger.info("from a sub-task")

            await asyncio.create_task(sub())
            await asyncio.to_thread(record_logger.info, "from a thread")
        record_logger.info("after the try")
    finally:
        record_logger.removeHandler(handler)
    first, task_line, thread_line, after = lines
    assert first["job_id"] == "real-1" and first["msg"] == "hi x"
    assert first["level"] == "INFO" and first["ts"] != "forged" and first["logger"] != "forged"
    assert isinstance(first["queue"], str)
    assert task_line["job_id"] == thread_line["job_id"] == "real-1"
    assert "job_id" not in after


# -- (2) retry many from two dashboards while a worker runs: each job runs once more ----------


class CountedJob(Job):
    """Appends its id to a file on every run; fails for good on its first run only."""

    max_tries = 1

    def __init__(self, log: str) -> None:
        self.log = log

    def handle(self) -> str:  # type: ignore[override]
        job_id = self.job_id
        path = Path(self.log)
        before = path.read_text().split() if path.exists() else []
        with path.open("a") as out:
            out.write(job_id + "\n")
        if job_id not in before:
            raise RuntimeError("first run fails")
        return "ok"


def _race_settings(kind: str, tmp_path: Path, redis_url: str) -> Settings:
    if kind == "redis":
        from tests.conftest import flush_redis

        flush_redis(redis_url)
        return make_settings(queue_connection="redis", redis_url=redis_url)
    return make_settings(queue_connection="database", db_url=f"sqlite+aiosqlite:///{tmp_path}/q.db")


@pytest.mark.parametrize("kind", ["redis", "sqlite"])
async def test_retry_many_from_two_dashboards_racing_a_worker_runs_each_job_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from core.worker.options import WorkerOptions
    from core.worker.worker import Worker

    redis_url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    settings = _race_settings(kind, tmp_path, redis_url)
    log = tmp_path / "runs.txt"
    queue = "adv-race"
    count = 40
    async with QueueManager(settings) as qm:
        ids = [str(await qm.push(CountedJob(str(log)), queue=queue)) for _ in range(count)]
        await Worker(qm, WorkerOptions(queues=(queue,), sleep=0.01, max_jobs=count)).run()
        store = await qm.failed_store()
        assert await store.count(queue) == count

    async with (
        QueueManager(settings) as qa,
        QueueManager(settings) as qb,
        QueueManager(settings) as qw,
        served(create_app(settings, qa)) as base_a,
        served(create_app(settings, qb)) as base_b,
        httpx.AsyncClient(base_url=base_a, timeout=30) as a,
        httpx.AsyncClient(base_url=base_b, timeout=30) as b,
    ):
        worker = asyncio.create_task(
            Worker(qw, WorkerOptions(queues=(queue,), sleep=0.01, max_jobs=count)).run()
        )
        csrf_a = csrf_of((await a.get("/failed")).text)
        csrf_b = csrf_of((await b.get("/failed")).text)
        answers = await asyncio.gather(
            a.post("/failed", data={"action": "retry-all", "queue": queue, "csrf": csrf_a}),
            b.post("/failed", data={"action": "retry-all", "queue": queue, "csrf": csrf_b}),
            a.post("/failed", data={"action": "retry", "ids": ids[::2], "csrf": csrf_a}),
            b.post("/failed", data={"action": "retry", "ids": ids[1::2], "csrf": csrf_b}),
            *(
                b.post(f"/jobs/{job_id}", data={"action": "retry", "csrf": csrf_b})
                for job_id in ids[:10]
            ),
        )
        assert all(answer.status_code == 303 for answer in answers), [
            answer.status_code for answer in answers
        ]
        await asyncio.wait_for(worker, 45)
        store = await qw.failed_store()
        driver = await qw.connection()
        assert await store.count(queue) == 0
        stats = await driver.stats(queue)
        runs = log.read_text().split()
        assert sorted(runs) == sorted(ids * 2), "a job ran more or less than twice"
        assert (stats.pending, stats.reserved) == (0, 0), stats


# -- (3) pause with two prefetching workers, one killed -9 while paused ------------------------


@pytest.mark.process
@pytest.mark.timeout(90)
def test_pause_two_prefetching_workers_kill_one_resume_nothing_lost(
    server_backend: Backend, tmp_path: Path
) -> None:
    from collections import Counter

    from tests.jobs import SleepJob, events
    from tests.processes import wait_until, workers

    log = str(tmp_path / "events.jsonl")
    queue = server_backend.settings().queue_default

    async def on_backend(op: Any) -> Any:
        async with QueueManager(server_backend.settings()) as manager:
            return await op(manager, await manager.connection())

    def run(op: Any) -> Any:
        return asyncio.run(on_backend(op))

    jobs = []
    for n in range(24):
        job = SleepJob(log, 0.3, n)
        job.max_tries = 3
        job.timeout = 2  # a killed try's lease lapses about 4 s later
        jobs.append(job)
    args = ["--concurrency", "2", "--prefetch", "4", "--sleep", "0.05"]
    with workers(2, args, server_backend.env(), tmp_path) as procs:
        wait_until(lambda: all("starting:" in p.output for p in procs), 60, "workers to start")
        run(lambda m, d: m.bulk(jobs, queue=queue))
        wait_until(lambda: len(events(log, "start")) >= 4, 30, "jobs to start")
        run(lambda m, d: d.pause(queue))
        paused_at = time.time()
        wait_until(
            lambda: all("is paused" in p.output for p in procs), 10, "both workers to see it"
        )
        killed_pid = procs[0].proc.pid
        procs[0].signal(9)
        procs[0].wait(10)
        killed_at = time.time()
        # nothing starts while paused beyond what had started when the workers saw it
        time.sleep(5)  # past the killed worker's leases: nothing to await for what must not happen
        late = [e for e in events(log, "start") if e["t"] > paused_at + 1.2]
        assert late == [], late
        stats = run(lambda m, d: d.stats(queue))
        ended = {e["n"] for e in events(log, "end")}
        assert stats.pending + stats.delayed + stats.reserved >= 24 - len(ended), (stats, ended)
        run(lambda m, d: d.resume(queue))
        wait_until(
            lambda: {e["n"] for e in events(log, "end")} == set(range(24)),
            45,
            "every job to end after resume",
        )
        assert time.time() > killed_at
    ends = Counter(e["n"] for e in events(log, "end"))
    starts = Counter(e["n"] for e in events(log, "start"))
    assert set(ends) == set(range(24))
    # A job runs again only if the killed worker had it: running, or finished with its
    # acknowledgement not yet sent (at-least-once; under load that window holds more than the
    # two running ones). The surviving worker never runs a job twice.
    again = [n for n, count in starts.items() if count > 1]
    first = {}
    for event in events(log, "start"):
        first.setdefault(event["n"], event["pid"])
    assert all(first[n] == killed_pid for n in again), (starts, first, killed_pid)


# -- (5) history: a flush whose answer is lost ------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="Heartbeat.send_history puts rows back on any error, also when add_history was "
    "applied by the backend and only its answer was lost (timeout): the next beat adds them "
    "again, so the charts count those tries twice (no idempotency key per flush)",
)
async def test_a_history_flush_whose_answer_is_lost_is_not_counted_twice() -> None:
    from core.worker.options import WorkerOptions
    from core.worker.worker import Worker

    settings = make_settings(queue_connection="memory")
    async with QueueManager(settings) as qm:
        driver = await qm.connection()
        queue = "adv-history"
        worker = Worker(qm, WorkerOptions(queues=(queue,), sleep=0.01))
        worker._driver = driver
        now = time.time()
        for _ in range(5):
            worker.history.started(queue, 0.01, at=now)
        real = driver.add_history
        calls = 0

        async def applied_then_lost(rows: Any) -> None:
            nonlocal calls
            calls += 1
            await real(rows)
            if calls == 1:
                raise TimeoutError("the answer never came back")  # a network fault, simulated

        driver.add_history = applied_then_lost  # type: ignore[method-assign]
        await worker._heartbeat.send_history()
        await worker._heartbeat.send_history()
        minutes = await driver.history(queue, minutes=3)
        assert sum(m.started for m in minutes) == 5, [m.started for m in minutes]


# -- (4) the dashboard's /metrics: failures kept on another backend --------------------------


@pytest.mark.redis
@pytest.mark.mysql
async def test_dashboard_metrics_count_failures_kept_on_another_backend(
    redis_url: str, mysql_url: str
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from core.worker.options import WorkerOptions
    from core.worker.worker import Worker
    from tests.conftest import flush_redis, reset_mysql
    from tests.dashboard.support import HostileJob

    flush_redis(redis_url)
    reset_mysql(mysql_url)
    settings = make_settings(
        queue_connection="redis", redis_url=redis_url, db_url=mysql_url, enable_mysql=True
    )
    queue = "adv-failed-elsewhere"
    async with QueueManager(settings) as qm:
        await qm.push(HostileJob(), queue=queue)
        await Worker(qm, WorkerOptions(queues=(queue,), sleep=0.01, max_jobs=1)).run()
        store = await qm.failed_store("redis")
        assert await store.count(queue) == 1  # the failure is there, in the database
        async with (
            served(create_app(settings, qm)) as base,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
        ):
            text = (await http.get("/metrics")).text
    failed = {
        (s.labels["connection"], s.labels["queue"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "topiq_failed_jobs"
    }
    assert failed.get(("redis", queue)) == 1, failed


# -- (4) made-up queue names: what one hostile sender costs the overview and /metrics -------


async def test_made_up_queues_do_not_flood_the_overview_and_metrics() -> None:
    from core.queue.drivers.base import OutgoingJob as Out

    settings = make_settings(queue_connection="memory")
    async with QueueManager(settings) as qm, served(create_app(settings, qm)) as base:
        driver = await qm.connection()
        body = encode(QuickJob(0), job_id="x", queue="q", max_bytes=1 << 20)
        await driver.push(
            [Out(id=f"spam-{n}", queue=f"spam.{n}", payload=body) for n in range(3000)]
        )
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            overview = await http.get("/")
            metrics_text = (await http.get("/metrics")).text
    rows = overview.text.count("<tr data-queue=")
    series = sum(1 for line in metrics_text.splitlines() if 'queue="spam.' in line)
    assert rows <= 500, rows
    assert series <= 2000, series


# -- (1) no secret in a log line: a dashboard and a worker on backends they cannot reach ------


@pytest.mark.process
@pytest.mark.timeout(90)
def test_no_secret_in_the_logs_of_a_dashboard_and_a_worker(tmp_path: Path) -> None:
    from tests.dashboard.support import DashboardProcess
    from tests.processes import WorkerProcess, wait_until

    token = "tok-" + uuid.uuid4().hex
    redis_pw = "redispw-" + uuid.uuid4().hex[:10]
    db_pw = "dbpw-" + uuid.uuid4().hex[:10]
    mqtt_pw = "mqttpw-" + uuid.uuid4().hex[:10]
    dead = free_port()
    env = {
        "DASHBOARD_TOKEN": token,
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": f"redis://default:{redis_pw}@127.0.0.1:{dead}/0",
        "DB_URL": f"mysql+aiomysql://topiq:{db_pw}@127.0.0.1:{dead}/topiq",
        "ENABLE_MYSQL": "true",
        "MQTT_PASSWORD": mqtt_pw,
        "LOG_LEVEL": "DEBUG",
    }
    port = free_port()
    dash = DashboardProcess(["--port", str(port)], env, tmp_path / "dashboard.log")
    metrics_port = free_port()
    worker = WorkerProcess(
        ["--metrics-port", str(metrics_port), "--sleep", "0.1"], env, tmp_path / "worker.log"
    )
    try:
        dash.wait_listening()
        bearer = {"authorization": f"Bearer {token}", "accept": "text/html"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=40) as http:
            for path in ("/", "/failed", "/jobs/j1", "/metrics", "/health", "/nope"):
                for connection in ("redis", "database"):
                    answer = http.get(path, params={"connection": connection}, headers=bearer)
                    shown = answer.text + str(answer.headers)
                    for secret in (token, redis_pw, db_pw, mqtt_pw):
                        assert secret not in shown, (path, connection)
        wait_until(lambda: "redis" in worker.output.lower(), 30, "the worker to log its outage")
    finally:
        dash.stop()
        worker.stop()
    for out in (dash.output, worker.output):
        for secret in (token, redis_pw, db_pw, mqtt_pw):
            assert secret not in out, (secret, out[-2000:])


# -- (2)/(4) a Redis connection with a few dozen queues: the overview and /metrics ------------


@pytest.mark.redis
async def test_the_overview_and_metrics_of_a_redis_connection_with_many_queues(
    redis_url: str,
) -> None:
    from tests.conftest import flush_redis

    flush_redis(redis_url)
    settings = make_settings(queue_connection="redis", redis_url=redis_url)
    try:
        async with (
            QueueManager(settings) as qm,
            served(create_app(settings, qm)) as base,
            httpx.AsyncClient(base_url=base, timeout=60) as http,
        ):
            driver = await qm.connection()
            body = encode(QuickJob(0), job_id="x", queue="q", max_bytes=1 << 20)
            await driver.push(
                [OutgoingJob(id=f"m-{n}", queue=f"many.{n}", payload=body) for n in range(200)]
            )
            overview = await http.get("/")
            metrics_text = (await http.get("/metrics")).text
    finally:
        flush_redis(redis_url)
    assert overview.status_code == 200, overview.text[-400:]
    assert 'topiq_backend_up{connection="redis"} 1.0' in metrics_text
