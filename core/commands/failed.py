"""The failed-job commands: list, show, retry, forget, flush and prune the failed-job store.

    python main.py queue:failed --queue emails
    python main.py queue:failed:show 3f2c9a...
    python main.py queue:retry all
    python main.py queue:prune-failed --older-than 7d

A retried job goes back to its queue with its stored payload and its tries counted afresh.
Retrying never loses a job nor a newer failure, and two retries at once queue a job once:

* where the failed store is the queue's own backend, the driver moves each record back in one
  atomic step (`Driver.retry_failed`);
* where it is not (ENABLE_MYSQL=true keeps a Redis queue's failures in MySQL), each record is
  first claimed (given a claim record id, atomically: a second retry finds it changed, or
  sees the claim, and skips it), then its job is pushed, then exactly that record is deleted
  by its record id. A job that fails again in between has a new record, which stays; a
  command that dies in between leaves the job listed (and perhaps queued too), never in
  neither place, and its claim lapses after `CLAIM_LIFETIME` (core/queue/failed_retry.py) so
  that a later retry takes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from rich.console import Console, Group, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.progress import Progress
from rich.text import Text

from core.commands._common import (
    CommandFailed,
    Connection,
    add_connection_flag,
    add_json_flag,
    emit,
    failed_summary,
    guarded,
    non_negative_int,
    open_connection,
    positive_int,
    queue_name,
    say,
    table,
    when,
)
from core.delays import parse_delay
from core.queue.drivers.base import FailedJob, FailedStore
from core.queue.failed_retry import every_record, retry_records
from core.settings import Settings

HELP = {
    "queue:failed": "list failed jobs (newest first)",
    "queue:failed:show": "show one failed job: its payload and full traceback",
    "queue:retry": "push failed jobs back to their queues with their tries reset",
    "queue:forget": "delete failed jobs by id",
    "queue:flush": "delete every failed job (of one queue with --queue)",
    "queue:prune-failed": "delete failed jobs older than a duration",
}

_COLUMNS = ("id", "connection", "queue", "class", "failed at", "error")
_PAGE = 500  # records read per round trip when a command works on a whole store

_Handler = Callable[[argparse.Namespace, Connection, FailedStore], Awaitable[int]]


def _duration(text: str) -> float:
    try:
        return parse_delay(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of command `name`."""
    add_connection_flag(parser)
    add_json_flag(parser)
    if name == "queue:failed":
        parser.add_argument("--queue", type=queue_name, help="only the jobs of this queue")
        parser.add_argument(
            "--limit", type=positive_int, default=50, help="show at most this many (default 50)"
        )
        parser.add_argument(
            "--offset", type=non_negative_int, default=0, help="skip this many newest first"
        )
    elif name == "queue:failed:show":
        parser.add_argument("id", help="the failed job's id (see queue:failed)")
    elif name == "queue:retry":
        parser.add_argument(
            "ids", nargs="*", metavar="ID", help="job ids to retry, or `all` for every one"
        )
        parser.add_argument("--queue", type=queue_name, help="retry every failed job of a queue")
    elif name == "queue:forget":
        parser.add_argument("ids", nargs="+", metavar="ID", help="job ids to delete")
    elif name == "queue:flush":
        parser.add_argument("--queue", type=queue_name, help="only the jobs of this queue")
    elif name == "queue:prune-failed":
        parser.add_argument(
            "--older-than",
            type=_duration,
            default=_duration("7d"),
            metavar="DURATION",
            help="delete records that failed longer ago than this, e.g. 36h, 7d, "
            "'2 weeks' (default 7d)",
        )


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run failed-job command `name`; returns the exit code."""
    return await guarded(_run(_HANDLERS[name], args, settings))


async def _run(handler: _Handler, args: argparse.Namespace, settings: Settings) -> int:
    async with open_connection(settings, args.connection) as conn:
        return await handler(args, conn, await conn.failed_store())


# -- the commands -------------------------------------------------------------------------


async def _list(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    records = await store.list(args.queue, limit=args.limit, offset=args.offset)
    total = await store.count(args.queue)
    rows = [failed_summary(record) for record in records]
    shown = f"{args.offset + 1}-{args.offset + len(rows)}" if rows else "none"
    caption = f"showing {shown} of {total}"
    if args.offset + len(rows) < total:
        caption += f"; --offset {args.offset + len(rows)} for more"
    where = f" of queue {args.queue}" if args.queue else ""
    emit(
        args,
        {"total": total, "offset": args.offset, "jobs": rows},
        lambda: table(
            f"Failed jobs{where} ({conn.name})",
            _COLUMNS,
            [
                # The class without its module, the time without "ago", the error last: the
                # table must fit a terminal; --json and queue:failed:show give everything.
                [
                    r["id"],
                    r["connection"],
                    r["queue"],
                    _short(r["class"]),
                    when(r["failed_at"]),
                    r["error"],
                ]
                for r in rows
            ],
            caption=caption,
            wrap=("error",),
        ),
    )
    return 0


async def _show(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    record = await _get(store, args.id, conn)
    summary = failed_summary(record)
    try:
        payload: Any = orjson.loads(record.payload)
    except orjson.JSONDecodeError:
        payload = record.payload  # shown as stored: it is why some jobs failed

    def render() -> RenderableType:
        fields = table(
            f"Failed job {record.id}",
            ("field", "value"),
            list(summary.items())[1:],
            wrap=("value",),
        )
        body: RenderableType = (
            Text(record.payload) if isinstance(payload, str) else JSON.from_data(payload)
        )
        return Group(
            fields,
            Panel(body, title="payload", title_align="left", expand=False),
            Panel(
                Text(record.exception.rstrip()), title="exception", title_align="left", expand=False
            ),
        )

    emit(args, {**summary, "payload": payload, "exception": record.exception}, render)
    return 0


async def _retry(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    if args.queue is not None or args.ids == ["all"]:
        if args.ids not in ([], ["all"]):
            raise CommandFailed("give job ids, `all`, or --queue NAME; not ids with --queue")
        records = await all_failed(store, [args.queue])
        missing: list[str] = []
    elif args.ids:
        records, missing = await _some(store, args.ids)
    else:
        raise CommandFailed("nothing to retry: give job ids, `all`, or --queue NAME")
    retried, skipped = await retry_batches(conn, store, records, quiet=args.json)
    message = retry_message(records, retried, skipped)
    if args.json or retried or skipped or not missing:  # a missing id is said once, below
        result: dict[str, list[str]] = {"retried": retried, "missing": missing}
        if skipped:  # only then: the shape scripts already read stays as it was
            result["skipped"] = skipped
        say(args, message, result)
    return _not_found(missing, conn)


async def all_failed(store: FailedStore, queues: Sequence[str | None] = (None,)) -> list[FailedJob]:
    """Every failed record of `queues` (`None`: of every queue), oldest failure first, read
    before anything is retried (what `queue:retry all` and `--queue` move back)."""
    records: dict[str, FailedJob] = {}
    for queue in dict.fromkeys(queues):
        for record in reversed(await every_record(store, queue, _PAGE)):
            records.setdefault(record.id, record)
    # Oldest first, so the jobs go back in the order they first failed (a stable sort: one
    # queue's records keep the store's order).
    return sorted(records.values(), key=lambda record: record.failed_at)


async def retry_batches(
    conn: Connection, store: FailedStore, records: Sequence[FailedJob], *, quiet: bool = False
) -> tuple[list[str], list[str]]:
    """Move `records` back to their queues a page at a time; the ids (retried, skipped).

    Shared by `queue:retry` and `queue:work --failed`. A bar on the terminal for long
    retries; none when `quiet` (`--json`) or when stderr is a pipe."""
    retried: list[str] = []
    skipped: list[str] = []
    quiet = quiet or not sys.stderr.isatty() or len(records) <= _PAGE
    with Progress(console=Console(stderr=True), transient=True, disable=quiet) as progress:
        bar = progress.add_task("retrying failed jobs", total=len(records))
        for start in range(0, len(records), _PAGE):
            batch = records[start : start + _PAGE]
            moved, passed = await retry_records(store, batch, conn.driver_for)
            retried += moved
            skipped += passed
            progress.advance(bar, len(batch))
    return retried, skipped


def retry_message(records: Sequence[FailedJob], retried: list[str], skipped: list[str]) -> str:
    """What a retry did, in a sentence or two."""
    moved = set(retried)
    message = (
        f"Retried {_jobs(len(retried))}: back on "
        f"{_queues([r for r in records if r.id in moved])} with their tries reset."
        if retried
        else "No failed jobs to retry."
    )
    if skipped:
        message += (
            f" Skipped {_jobs(len(skipped))} that another retry is moving, that changed "
            "since they were read (retried meanwhile, or failed again), or whose connection "
            "lives inside one process (memory, sync: dispatch those again from that process)."
        )
    return message


async def _forget(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    forgotten: list[str] = []
    missing: list[str] = []
    for job_id in dict.fromkeys(args.ids):
        (forgotten if await store.forget(job_id) else missing).append(job_id)
    if args.json or forgotten or not missing:
        say(
            args,
            f"Deleted {_jobs(len(forgotten))} from the failed store.",
            {"forgotten": forgotten, "missing": missing},
        )
    return _not_found(missing, conn)


async def _flush(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    deleted = await store.flush(args.queue)
    where = f" of queue {args.queue}" if args.queue else ""
    say(
        args,
        f"Deleted {_jobs(deleted)}{where} from the failed store.",
        {"deleted": deleted, "queue": args.queue},
    )
    return 0


async def _prune(args: argparse.Namespace, conn: Connection, store: FailedStore) -> int:
    before = datetime.now(UTC) - timedelta(seconds=args.older_than)
    deleted = await store.prune(before)
    say(
        args,
        f"Deleted {_jobs(deleted)} that failed before {before:%Y-%m-%d %H:%M:%S}Z.",
        {"deleted": deleted, "before": before},
    )
    return 0


_HANDLERS: dict[str, _Handler] = {
    "queue:failed": _list,
    "queue:failed:show": _show,
    "queue:retry": _retry,
    "queue:forget": _forget,
    "queue:flush": _flush,
    "queue:prune-failed": _prune,
}


# -- helpers ------------------------------------------------------------------------------


async def _get(store: FailedStore, job_id: str, conn: Connection) -> FailedJob:
    record = await store.get(job_id)
    if record is None:
        raise CommandFailed(f"no failed job with id {job_id} on the {conn.name} connection")
    return record


async def _some(store: FailedStore, ids: list[str]) -> tuple[list[FailedJob], list[str]]:
    """The records of `ids` that exist, and the ids that do not."""
    found, missing = [], []
    for job_id in dict.fromkeys(ids):
        record = await store.get(job_id)
        if record is None:
            missing.append(job_id)
        else:
            found.append(record)
    return found, missing


def _not_found(missing: list[str], conn: Connection) -> int:
    if missing:
        raise CommandFailed(
            f"no failed job with id {', '.join(missing)} on the {conn.name} connection"
        )
    return 0


def _short(class_path: str) -> str:
    return class_path.rpartition(":")[2]


def _jobs(count: int) -> str:
    return f"{count} failed job{'' if count == 1 else 's'}"


def _queues(records: list[FailedJob]) -> str:
    names = sorted({record.queue for record in records})
    return ("queue " if len(names) == 1 else "queues ") + ", ".join(names)
