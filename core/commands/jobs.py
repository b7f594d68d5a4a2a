"""One job by id: `queue:job` (its status, result or error), `queue:cancel`; and `queue:prune`.

    python main.py queue:job 3f2c9a...                 # status, timings, result or error
    python main.py queue:job 3f2c9a... --wait 30       # wait up to 30 s for it to end
    python main.py queue:job 3f2c9a... --json          # the record as JSON, for scripts
    python main.py queue:cancel 3f2c9a...              # remove it, or stop it in its worker
    python main.py queue:prune                         # delete job records past their keep time
    python main.py queue:prune --older-than 14d        # and every record/failed job older than that

For a chain's or batch's id, `queue:job` shows its kind and progress ("3/10 done: 2 succeeded, 1
failed, 0 cancelled, 7 pending"); for a deferred job, the ids it waits for. `--json` carries
`kind`, `progress`, `waiting_for`, `priority` and `group` for scripts, and `description` and
`meta` (RQ's), read from the payload while the job has not ended.

`queue:job` exits 0 when the job is found (with `--wait`: when it succeeded), 1 when no job has
that id (or, with `--wait`, it ended any other way), 124 when `--wait` ran out first (as
`timeout(1)` does), so that a deploy script can wait for a job it dispatched.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.text import Text

from core.commands._common import (
    CommandFailed,
    Connection,
    add_connection_flag,
    add_json_flag,
    emit,
    guarded,
    open_connection,
    printable,
    say,
    table,
    when,
)
from core.delays import parse_duration
from core.queue.payload import validate_job_id
from core.settings import Settings
from core.status import ENDED, WAITING, JobStatus, Progress, Status

HELP = {
    "queue:job": "show one job: its status, timings, and result or error (--wait for it to end)",
    "queue:cancel": "cancel a job: a waiting one is removed, a running one stopped in its worker",
    "queue:prune": "delete job status records whose keep time (result_ttl/failure_ttl) is over",
}

#: `queue:job --wait` ran out before the job ended (the exit code of `timeout(1)`).
EXIT_WAIT_TIMED_OUT = 124


def job_id(text: str) -> str:
    """An argparse type: a job id as dispatch accepts it, or a usage error saying why."""
    try:
        return validate_job_id(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text[:60]!r} is not a job id: up to 190 letters, digits and _ . : @ / + = -"
        ) from None


def _wait_seconds(text: str) -> float:
    try:
        return parse_duration(text, "--wait")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _older_than(text: str) -> float:
    try:
        return parse_duration(text, "--older-than")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 14d, 36h, 90m or 3600 (seconds), not negative, "
            f"got {text!r}"
        ) from None


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of command `name`."""
    add_connection_flag(parser)
    add_json_flag(parser)
    if name == "queue:job":
        parser.add_argument("id", type=job_id, help="the job id (what dispatch returned)")
        parser.add_argument(
            "--wait",
            type=_wait_seconds,
            metavar="SECONDS",
            help="wait up to SECONDS (or a duration such as 2m) for the job to end; exit 0 "
            "only if it succeeded, 124 if it had not ended by then",
        )
    elif name == "queue:cancel":
        parser.add_argument("id", type=job_id, help="the job id")
    elif name == "queue:prune":
        parser.add_argument(
            "--older-than",
            type=_older_than,
            default=None,
            metavar="DURATION",
            help="also delete every ended job record (succeeded, failed, cancelled, expired) "
            "that ended longer ago than this, whatever its keep time, and the failed jobs "
            "that failed longer ago: 14d, 36h, 90m or seconds (django-db-queue's "
            "delete_old_jobs); a negative one (--older-than=-5d) is refused, and one reaching "
            "back before 1970 deletes every ended record",
        )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run `queue:job`, `queue:cancel` or `queue:prune`; returns the exit code."""
    return await guarded(_run(name, args, settings))


async def _run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        if name == "queue:job":
            return await show_job(args, conn)
        if name == "queue:cancel":
            return await cancel_job(args, conn)
        return await prune_records(args, conn)


def _unknown(job: str, conn: Connection) -> CommandFailed:
    return CommandFailed(
        f"no job {job} on the {conn.name} connection (never dispatched there, or its record "
        "was no longer kept: see result_ttl and failure_ttl)"
    )


# -- queue:job ----------------------------------------------------------------------------


async def show_job(args: argparse.Namespace, conn: Connection) -> int:
    """`queue:job ID [--wait S]`: print the record; the exit code says how the job stands."""
    record = await conn.driver.job_status(args.id)
    if record is None:
        raise _unknown(args.id, conn)
    if args.wait is None:
        _print_record(args, conn, await with_payload_info(conn, record))
        return 0
    deadline = time.monotonic() + args.wait
    while record.status not in ENDED:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        latest = await conn.driver.wait_ended(args.id, record.queue or None, left)
        if latest is None:
            # Ended and its record not kept (result_ttl or failure_ttl of 0), or pruned.
            raise CommandFailed(
                f"job {args.id} ended while waiting, but its record was not kept "
                "(result_ttl/failure_ttl 0), so how it ended is unknown"
            )
        record = latest
    _print_record(args, conn, await with_payload_info(conn, record))
    if record.status is Status.SUCCEEDED:
        return 0
    if record.status in ENDED:
        reason = f": {record.error}" if record.error else ""
        print(f"topiq: job {args.id} {record.status}{reason}", file=sys.stderr)
        return 1
    print(
        f"topiq: job {args.id} is still {record.status} after waiting {args.wait:g}s",
        file=sys.stderr,
    )
    return EXIT_WAIT_TIMED_OUT


async def with_payload_info(conn: Connection, record: JobStatus) -> JobStatus:
    """`record` with the `description` and `meta` its payload carries, for a job that has not
    ended: its record gets them only when it ends (RQ's `enqueue(description=, meta=)`).

    A payload that is gone (the job ended meanwhile), not JSON, or whose fields are not a
    string and an object leaves the record as it is: showing a job never fails on them."""
    if record.kind != "job" or record.status in ENDED or (record.description and record.meta):
        return record
    payload = await conn.driver.job_payload(record.id, record.queue or None)
    if payload is None:
        return record
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return record
    if not isinstance(envelope, dict):
        return record
    description, meta = envelope.get("description"), envelope.get("meta")
    changes: dict[str, Any] = {}
    if not record.description and isinstance(description, str) and description:
        changes["description"] = description
    if record.meta is None and isinstance(meta, dict):
        changes["meta"] = meta
    return dataclasses.replace(record, **changes) if changes else record


def timings(record: JobStatus) -> dict[str, float | None]:
    """Seconds it waited before its last try started, and how long that try ran (or runs)."""
    start = record.due_at if record.due_at is not None else record.enqueued_at
    waited = None
    if record.started_at is not None and start is not None:
        waited = max(0.0, record.started_at - start)
    ran = None
    if record.started_at is not None:
        if record.ended_at is not None:
            ran = max(0.0, record.ended_at - record.started_at)
        elif record.status is Status.RUNNING:
            ran = max(0.0, time.time() - record.started_at)
    return {"waited": waited, "ran": ran}


def _print_record(args: argparse.Namespace, conn: Connection, record: JobStatus) -> None:
    emit(args, record.to_dict(), lambda: _render(conn, record))


def _seconds_text(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def progress_text(progress: Progress) -> str:
    """A workflow's progress in one line: "3/10 done: 2 succeeded, 1 failed, 0 cancelled, 7
    pending"."""
    return (
        f"{progress.done}/{progress.total} done: {progress.succeeded} succeeded, "
        f"{progress.failed} failed, {progress.cancelled} cancelled, {progress.pending} pending"
    )


def _render(conn: Connection, record: JobStatus) -> RenderableType:
    if record.kind != "job":
        return _render_workflow(conn, record)
    took = timings(record)
    tries = str(record.attempts)
    if record.max_tries is not None:
        tries += f" of {record.max_tries}"
    rows: list[tuple[str, Any]] = [
        ("status", record.status.value),
        ("connection", record.connection or conn.name),
        ("queue", record.queue or None),
        ("class", record.job or None),
        ("tries", tries),
    ]
    if record.priority:
        rows.append(("priority", str(record.priority)))
    if record.group:
        rows.append(("group", record.group))
    if record.waiting_for:
        rows.append(("waiting for", ", ".join(record.waiting_for)))
    if record.description:
        rows.append(("description", record.description))
    rows += [
        ("enqueued", _when(record.enqueued_at)),
        ("due", _when(record.due_at)),
        ("started", _when(record.started_at)),
        ("ended", _when(record.ended_at)),
        ("waited", _seconds_text(took["waited"])),
        ("ran", _seconds_text(took["ran"])),
        ("worker", record.worker or None),
    ]
    if record.error:
        rows.append(("error", record.error))
    parts: list[RenderableType] = [
        table(f"Job {record.id}", ("field", "value"), rows, wrap=("value",))
    ]
    if record.meta is not None:
        meta = JSON(orjson.dumps(record.meta).decode())
        parts.append(Panel(meta, title="meta", title_align="left", expand=False))
    if record.status is Status.SUCCEEDED:
        body: RenderableType = (
            Text("nothing kept (None, or not JSON)")
            if record.result is None
            else JSON(orjson.dumps(record.value()).decode())
        )
        parts.append(Panel(body, title="result", title_align="left", expand=False))
    if record.traceback:
        parts.append(
            Panel(
                Text(printable(record.traceback.rstrip())),
                title="traceback",
                title_align="left",
                expand=False,
            )
        )
    return Group(*parts)


def _render_workflow(conn: Connection, record: JobStatus) -> RenderableType:
    """A chain's or batch's record: its members counted, not a run of its own."""
    rows: list[tuple[str, Any]] = [
        ("kind", record.kind),
        ("status", record.status.value),
        ("progress", None if record.progress is None else progress_text(record.progress)),
        ("name", record.job or None),
        ("connection", record.connection or conn.name),
        ("queue", record.queue or None),
        ("enqueued", _when(record.enqueued_at)),
        ("ended", _when(record.ended_at)),
    ]
    if record.error:
        rows.append(("error", record.error))
    title = f"{record.kind.capitalize()} {record.id}"
    return table(title, ("field", "value"), rows, wrap=("value",))


def _when(moment: float | None) -> str | None:
    return None if moment is None else when(moment)


# -- queue:cancel -------------------------------------------------------------------------


async def cancel_job(args: argparse.Namespace, conn: Connection) -> int:
    """`queue:cancel ID`: exit 0 when something was cancelled, 1 when there was nothing to."""
    record = await conn.driver.job_status(args.id)
    if record is None:
        raise _unknown(args.id, conn)
    if record.status in ENDED:
        raise CommandFailed(f"nothing to cancel: job {args.id} has ended ({record.status})")
    cancelled = await conn.driver.cancel(args.id, record.queue or None)
    if not cancelled:  # it ended between the two calls
        latest = await conn.driver.job_status(args.id, record.queue or None)
        how = f" ({latest.status})" if latest is not None else ""
        raise CommandFailed(f"nothing to cancel: job {args.id} has ended{how}")
    if record.kind != "job":
        message = (
            f"Cancelled {record.kind} {args.id}: its members that had not ended are cancelled "
            "(a running one within about a second); see queue:job for its progress."
        )
        what = "members"
    elif record.status in WAITING:
        message = f"Cancelled job {args.id}: it was {record.status} and will not run."
        what = "removed"
    else:
        message = (
            f"Asked the worker running job {args.id} to cancel it; it stops within about a "
            "second (see queue:job)."
        )
        what = "requested"
    say(
        args,
        message,
        {"id": args.id, "connection": conn.name, "was": record.status.value, "cancel": what},
    )
    return 0


# -- queue:prune --------------------------------------------------------------------------


async def prune_records(args: argparse.Namespace, conn: Connection) -> int:
    """`queue:prune`: delete ended records past their keep time (SQL; Redis expires keys);
    with `--older-than`, also every ended record and failed job older than that."""
    if getattr(args, "older_than", None) is not None:
        return await _prune_older(args, conn, args.older_than)
    deleted = await conn.driver.prune_records()
    if conn.driver.kind == "redis":
        message = (
            f"Nothing to prune on {conn.name}: Redis deletes job records by itself when their "
            "keep time ends."
        )
    else:
        message = f"Deleted {deleted} job records past their keep time on {conn.name}."
    say(args, message, {"connection": conn.name, "deleted": deleted})
    return 0


async def _prune_older(args: argparse.Namespace, conn: Connection, older_than: float) -> int:
    """`queue:prune --older-than D`: the records that ended, and the failed jobs that failed,
    more than `D` seconds ago (with those past their keep time)."""
    # Nothing ended before 1970: a duration reaching past it (10000000d) deletes every ended
    # record, instead of a datetime out of range.
    cutoff = max(time.time() - older_than, 0.0)
    store = await conn.failed_store()  # reached before anything is deleted
    deleted = await conn.driver.prune_records(ended_before=cutoff)
    failed = await store.prune(datetime.fromtimestamp(cutoff, UTC))
    before = when(cutoff)
    records = f"job record{'' if deleted == 1 else 's'}"
    jobs = f"failed job{'' if failed == 1 else 's'}"
    say(
        args,
        f"Deleted {deleted} {records} that ended before {before} (or were past their keep "
        f"time) on {conn.name}, and {failed} {jobs} that failed before {before} from its "
        "failed store.",
        {
            "connection": conn.name,
            "deleted": deleted,
            "failed_deleted": failed,
            "older_than": older_than,
            "ended_before": cutoff,
        },
    )
    return 0
