"""The dashboard's pages (GET) and actions (POST, CSRF-checked, then a redirect back)."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, get_args
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response

from core.dashboard.context import Dashboard
from core.dashboard.present import payload_text, pretty_json
from core.dashboard.security import CsrfError, csrf_token, safe_next, token_matches, verify_post
from core.dashboard.source import BACKEND_ERRORS, retry_records
from core.queue.drivers.base import BrowseState, Driver, FailedJob, FailedStore
from core.queue.payload import validate_job_id, validate_queue
from core.status import ENDED, JobStatus

__all__ = [
    "failed_action",
    "failed_page",
    "health",
    "job_action",
    "job_page",
    "job_search",
    "login",
    "logout",
    "metrics",
    "overview",
    "queue_action",
    "queue_page",
    "schedules",
    "workers",
]

logger = logging.getLogger("topiq.dashboard")

STATES: Final[tuple[str, ...]] = get_args(BrowseState)
#: Rows per page by default, and the most a page may ask for.
PAGE_SIZE: Final = 50
MAX_PAGE: Final = 500

_View = Callable[[Dashboard, Request, str], Awaitable[Response]]


def page(view: _View) -> Callable[[Dashboard, Request], Awaitable[Response]]:
    """Resolve `?connection=`, and turn a backend that fails into a 503 page saying so."""

    @functools.wraps(view)
    async def wrapper(dash: Dashboard, request: Request) -> Response:
        name = dash.source.connection_name(request.query_params.get("connection"))
        if name is None:
            return _error(dash, request, 404, "Unknown connection", "No such connection here.")
        try:
            return await view(dash, request, name)
        except CsrfError as exc:
            return _error(dash, request, 403, "Refused", str(exc), name)
        except BACKEND_ERRORS as exc:
            logger.warning("dashboard: the %s connection failed: %s", name, dash.redact(exc))
            return _error(
                dash,
                request,
                503,
                "Backend unavailable",
                f"The {name} connection did not answer: {type(exc).__name__}: {exc}",
                name,
            )
        except Exception as exc:  # a driver's own error type: a page saying so, not a bare 500
            logger.warning(
                "dashboard: %s failed on the %s connection: %s",
                request.url.path,
                name,
                dash.redact(f"{type(exc).__name__}: {exc}"),
            )
            return _error(
                dash,
                request,
                500,
                "Backend error",
                f"The {name} connection failed: {type(exc).__name__}: {exc}",
                name,
            )

    return wrapper


def _error(
    dash: Dashboard,
    request: Request,
    status: int,
    title: str,
    message: str,
    connection: str | None = None,
) -> Response:
    return dash.render(
        request,
        "error.html",
        {"title": title, "message": dash.redact(message), "connection": connection},
        status,
    )


def _int(request: Request, key: str, default: int, least: int, most: int) -> int:
    try:
        value = int(request.query_params.get(key, default))
    except ValueError:
        return default
    return min(max(value, least), most)


def _redirect(path: str, **query: Any) -> RedirectResponse:
    params = {k: v for k, v in query.items() if v not in (None, "")}
    return RedirectResponse(f"{path}?{urlencode(params)}" if params else path, status_code=303)


# -- pages --------------------------------------------------------------------------------


@page
async def overview(dash: Dashboard, request: Request, conn: str) -> Response:
    offset = _int(request, "offset", 0, 0, 10**9)
    found = await dash.source.overview(conn, offset)
    return dash.render(
        request,
        "overview.html",
        {
            "title": "Queues",
            "connection": conn,
            "rows": found.rows,
            "offset": found.offset,
            "limit": found.limit,
            "total": found.total,
        },
    )


@page
async def queue_page(dash: Dashboard, request: Request, conn: str) -> Response:
    try:
        name = validate_queue(request.path_params["name"])
    except ValueError as exc:
        return _error(dash, request, 404, "No such queue", str(exc), conn)
    state = request.query_params.get("state", "pending")
    if state not in STATES:
        state = "pending"
    offset = _int(request, "offset", 0, 0, 10**9)
    limit = _int(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
    driver = await dash.source.driver(conn)
    store = await dash.source.store(conn)
    row, jobs, groups = await asyncio.gather(
        dash.source.queue_row(driver, store, name),
        driver.browse(name, state, offset, limit),  # type: ignore[arg-type]
        driver.groups(name, 0, 100),
    )
    total = getattr(row, state)
    return dash.render(
        request,
        "queue.html",
        {
            "title": f"Queue {name}",
            "connection": conn,
            "queue": row,
            "states": STATES,
            "state": state,
            "jobs": jobs,
            "groups": groups,
            "offset": offset,
            "limit": limit,
            "total": total,
        },
    )


@page
async def job_search(dash: Dashboard, request: Request, conn: str) -> Response:
    wanted = request.query_params.get("id", "").strip()
    if not wanted:
        return _redirect("/", connection=conn)
    from urllib.parse import quote

    return _redirect(f"/jobs/{quote(wanted, safe='')}", connection=conn)


async def _job_records(
    dash: Dashboard, conn: str, job_id: str
) -> tuple[Driver, JobStatus | None, FailedJob | None]:
    driver = await dash.source.driver(conn)
    store = await dash.source.store(conn)
    try:
        status = await driver.job_status(job_id)
    except NotImplementedError:  # a connection that keeps no records (sync)
        status = None
    return driver, status, await store.get(job_id)


@page
async def job_page(dash: Dashboard, request: Request, conn: str) -> Response:
    job_id = request.path_params["job_id"]
    try:
        validate_job_id(job_id)
    except ValueError:
        return _error(dash, request, 404, "No such job", f"{job_id!r} is not a job id.", conn)
    driver, status, record = await _job_records(dash, conn, job_id)
    if status is None and record is None:
        return _error(
            dash,
            request,
            404,
            "No such job",
            f"No job {job_id} on the {conn} connection (never dispatched there, or its "
            "record was no longer kept: see result_ttl and failure_ttl).",
            conn,
        )
    live = status is not None and status.status not in ENDED
    # The backend keeps a payload while the job waits or runs; after that, the failed store
    # keeps it for jobs that failed for good.
    raw = await driver.job_payload(job_id, status.queue) if live and status is not None else None
    if raw is None and record is not None:
        raw = record.payload.encode()
    payload, payload_note = payload_text(raw)
    return dash.render(
        request,
        "job.html",
        {
            "title": f"Job {job_id}",
            "connection": conn,
            "job_id": job_id,
            "status": status,
            "record": record,
            "state": status.status.value if status is not None else "failed",
            "live": live,
            "payload": payload,
            "payload_note": payload_note,
            "result": pretty_json(status.result) if status is not None else "",
            "error": (status.error if status is not None and status.error else "")
            or (record.exception.strip().splitlines()[-1] if record and record.exception else ""),
            "traceback": (status.traceback if status is not None else "")
            or (record.exception if record is not None else ""),
            "can_cancel": live,
        },
    )


@page
async def workers(dash: Dashboard, request: Request, conn: str) -> Response:
    driver = await dash.source.driver(conn)
    found = sorted(await driver.workers(), key=lambda w: w.id)
    return dash.render(
        request, "workers.html", {"title": "Workers", "connection": conn, "workers": found}
    )


@page
async def failed_page(dash: Dashboard, request: Request, conn: str) -> Response:
    driver = await dash.source.driver(conn)
    store = await dash.source.store(conn)
    queue = request.query_params.get("queue", "") or None
    if queue is not None:
        try:
            validate_queue(queue)
        except ValueError as exc:
            return _error(dash, request, 404, "No such queue", str(exc), conn)
    text = request.query_params.get("q", "").strip()
    offset = _int(request, "offset", 0, 0, 10**9)
    limit = _int(request, "limit", PAGE_SIZE, 1, MAX_PAGE)
    complete = True
    if text:
        records, total, complete = await dash.source.search_failed(
            store, queue, text, offset, limit
        )
    else:
        records, total = await asyncio.gather(
            store.list(queue, limit=limit, offset=offset), store.count(queue)
        )
    return dash.render(
        request,
        "failed.html",
        {
            "title": "Failed jobs",
            "connection": conn,
            "queues": sorted(await driver.queues()),
            "queue": queue or "",
            "q": text,
            "records": records,
            "total": total,
            "complete": complete,
            "offset": offset,
            "limit": limit,
        },
    )


@page
async def schedules(dash: Dashboard, request: Request, conn: str) -> Response:
    from core.commands.schedule import queue_of
    from core.errors import ConfigurationError
    from core.queue.payload import class_path
    from core.schedule import schedule, tick_time

    module = dash.settings.schedule_module
    problem = ""
    try:
        schedule.load(module)
    except ConfigurationError as exc:
        problem = str(exc)
    rows = []
    now = int(time.time() * 1000)
    for item in schedule:
        tick = item.next_after(now)
        last = ""
        try:
            driver = await dash.source.driver(
                dash.source.manager.connection_name(item.connection or item.job.connection)
            )
            raw = await driver.get_marker(item.marker)
            if raw is not None:
                last = f"{tick_time(int(raw), item.timezone):%Y-%m-%d %H:%M:%S%z}"
        except (NotImplementedError, ValueError):
            pass
        except BACKEND_ERRORS as exc:
            last = f"unknown ({type(exc).__name__})"
        rows.append(
            {
                "name": item.name,
                "schedule": f"{item.kind} {item.expression}",
                "timezone": item.timezone,
                "job": class_path(type(item.job)),
                "queue": queue_of(item, dash.settings),
                "next": f"{tick_time(tick, item.timezone):%Y-%m-%d %H:%M:%S%z}" if tick else "",
                "last": last,
            }
        )
    return dash.render(
        request,
        "schedules.html",
        {
            "title": "Schedules",
            "connection": conn,
            "rows": rows,
            "module": module,
            "problem": problem,
        },
    )


# -- actions ------------------------------------------------------------------------------


def _flash(request: Request, message: str) -> None:
    request.session["flash"] = message


@page
async def queue_action(dash: Dashboard, request: Request, conn: str) -> Response:
    form = await verify_post(request, dash.token)
    try:
        name = validate_queue(request.path_params["name"])
    except ValueError as exc:
        return _error(dash, request, 404, "No such queue", str(exc), conn)
    driver = await dash.source.driver(conn)
    action = form.get("action")
    if action == "pause":
        await driver.pause(name)
        _flash(request, f"Paused queue {name}: workers take none of its jobs until resumed.")
    elif action == "resume":
        await driver.resume(name)
        _flash(request, f"Resumed queue {name}.")
    else:
        return PlainTextResponse("unknown action: use pause or resume", status_code=400)
    logger.info("dashboard: %s queue %s on %s", action, name, conn)
    return _redirect(f"/queues/{_quoted(name)}", connection=conn)


@page
async def job_action(dash: Dashboard, request: Request, conn: str) -> Response:
    form = await verify_post(request, dash.token)
    job_id = request.path_params["job_id"]
    try:
        validate_job_id(job_id)
    except ValueError:
        return _error(dash, request, 404, "No such job", f"{job_id!r} is not a job id.", conn)
    action = form.get("action")
    store = await dash.source.store(conn)
    back = f"/jobs/{_quoted(job_id)}"
    if action == "retry":
        record = await store.get(job_id)
        if record is None:
            _flash(request, f"Job {job_id} is not in the failed store (already retried?).")
        else:
            retried, _ = await retry_records(dash.source, store, [record])
            _flash(
                request,
                f"Job {job_id} is back on queue {record.queue} with its tries reset."
                if retried
                else f"Job {job_id} was not retried: another retry is moving it, it changed, or "
                "its connection lives inside one process (memory, sync).",
            )
    elif action == "cancel":
        driver = await dash.source.driver(conn)
        done = await driver.cancel(job_id)
        _flash(
            request,
            f"Cancelled job {job_id}." if done else f"Job {job_id} had ended: nothing to cancel.",
        )
    elif action == "forget":
        gone = await store.forget(job_id)
        _flash(
            request,
            f"Deleted job {job_id} from the failed store."
            if gone
            else f"Job {job_id} was not in the failed store.",
        )
        back = "/failed"
    else:
        return PlainTextResponse("unknown action: use retry, cancel or forget", status_code=400)
    logger.info("dashboard: %s job %s on %s", action, job_id, conn)
    return _redirect(back, connection=conn)


@page
async def failed_action(dash: Dashboard, request: Request, conn: str) -> Response:
    form = await verify_post(request, dash.token)
    store = await dash.source.store(conn)
    queue = str(form.get("queue") or "") or None
    text = str(form.get("q") or "").strip()
    action = form.get("action")
    if action == "retry-all":
        records = await dash.source.every_failed(store, queue, text)
    elif action in ("retry", "forget"):
        ids = [str(v) for v in dict.fromkeys(form.getlist("ids"))][:MAX_PAGE]
        if action == "forget":
            gone = [job_id for job_id in ids if await store.forget(job_id)]
            _flash(request, f"Deleted {len(gone)} failed job(s).")
            return _redirect("/failed", connection=conn, queue=queue, q=text)
        found = await asyncio.gather(*(store.get(job_id) for job_id in ids))
        records = [r for r in found if r is not None]
    else:
        return PlainTextResponse("unknown action: use retry, forget or retry-all", status_code=400)
    retried, skipped = await retry_records(dash.source, store, records)
    message = f"Retried {len(retried)} failed job(s)."
    if skipped:
        message += (
            f" Skipped {len(skipped)} that another retry is moving, that changed, or whose "
            "connection lives inside one process (memory, sync)."
        )
    _flash(request, message)
    logger.info("dashboard: retried %d failed jobs on %s", len(retried), conn)
    return _redirect("/failed", connection=conn, queue=queue, q=text)


def _quoted(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


# -- login, metrics, health ---------------------------------------------------------------


async def login(dash: Dashboard, request: Request) -> Response:
    target = safe_next(request.query_params.get("next"))
    if not dash.token:
        return RedirectResponse(target, status_code=303)
    error = ""
    status = 200
    if request.method == "POST":
        address = request.client.host if request.client else ""
        wait = dash.throttle.retry_after(address)
        if wait:
            response = _error(
                dash,
                request,
                429,
                "Too many attempts",
                f"Too many wrong tokens from this address: try again in {math.ceil(wait)} s.",
            )
            response.headers["retry-after"] = str(math.ceil(wait))
            return response
        try:
            form = await verify_post(request, "")
        except CsrfError as exc:
            return _error(dash, request, 403, "Refused", str(exc))
        target = safe_next(str(form.get("next") or "/"))
        if token_matches(str(form.get("token") or ""), dash.token):
            dash.throttle.succeeded(address)
            request.session.clear()
            request.session["auth"] = True
            csrf_token(request)  # a new one for the new session
            return RedirectResponse(target, status_code=303)
        dash.throttle.failed(address)
        error = "That is not the dashboard's token."
        status = 401
    return dash.render(
        request, "login.html", {"title": "Log in", "next": target, "error": error}, status
    )


async def logout(dash: Dashboard, request: Request) -> Response:
    try:
        await verify_post(request, dash.token)
    except CsrfError as exc:
        return _error(dash, request, 403, "Refused", str(exc))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


async def _open_drivers(dash: Dashboard, names: list[str]) -> list[Driver | str]:
    async def one(name: str) -> Driver | str:
        try:
            return await dash.source.driver(name)
        except BACKEND_ERRORS:
            return name

    return list(await asyncio.gather(*(one(name) for name in names)))


async def metrics(dash: Dashboard, request: Request) -> Response:
    from core.metrics import CONTENT_TYPE, backend_metrics

    opened = await _open_drivers(dash, dash.source.connections)
    drivers = [d for d in opened if isinstance(d, Driver)]

    async def store(driver: Driver) -> FailedStore:
        # Where the connection's jobs fail to (QUEUE_FAILED_CONNECTION may name another).
        return await dash.source.store(driver.name)

    # A connection that could not be opened says so (`topiq_backend_up 0`), not nothing.
    down = [name for name in opened if isinstance(name, str)]
    body = await backend_metrics(drivers, stores=store, down=down)
    return Response(body, headers={"content-type": CONTENT_TYPE})


async def health(dash: Dashboard, request: Request) -> Response:
    from core.health import check_health

    given = request.query_params.get("connection")
    if given:
        name = dash.source.connection_name(given)
        if name is None:
            return JSONResponse({"error": "unknown connection"}, status_code=404)
        names = [name]
    else:
        names = dash.source.connections
    opened = await _open_drivers(dash, names)
    answers: list[dict[str, Any]] = []
    for driver in opened:
        if isinstance(driver, str):
            answers.append({"connection": driver, "ok": False, "backend": False, "workers": 0})
            continue
        found = await check_health(driver)
        # Only the flags and counts: an error text could name hosts.
        answers.append(
            {
                "connection": found.connection,
                "ok": found.ok,
                "backend": found.backend,
                "workers": found.workers,
            }
        )
    ok = all(a["ok"] for a in answers)
    return JSONResponse({"ok": ok, "connections": answers}, status_code=200 if ok else 503)
