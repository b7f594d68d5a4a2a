"""What the operations commands share: their flags, opening a connection, output and errors.

Every command reports a failure as one line on stderr (`topiq: ...`) and exit code 1, never a
traceback: an operator running `queue:retry` at 3 a.m. needs the reason, not the stack. Output
is a rich table for people, or JSON (`--json`) for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from core.errors import ConfigurationError, ConnectionLostError, TopiqError
from core.queue.drivers.base import Driver, FailedJob, FailedStore
from core.queue.payload import validate_queue
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.worker.options import ExitCode

if TYPE_CHECKING:
    # rich draws the operations commands' output; a worker never prints a table, so it is
    # imported where the output is made, not when a command module loads (worker start time).
    from rich.console import Console, RenderableType
    from rich.table import Table

__all__ = [
    "CONNECT_TIMEOUT",
    "CommandFailed",
    "Connection",
    "add_connection_flag",
    "add_json_flag",
    "ago",
    "console",
    "emit",
    "error_summary",
    "failed_summary",
    "guarded",
    "non_negative_int",
    "open_connection",
    "positive_int",
    "positive_seconds",
    "printable",
    "queue_list",
    "queue_name",
    "say",
    "seconds",
    "stamp",
    "table",
    "when",
    "write_json",
]

T = TypeVar("T")

#: Seconds a command waits for a backend to answer before it gives up. Redis and MySQL refuse
#: at once when they are down, but an unreachable host would otherwise hang the command for the
#: operating system's TCP timeout (minutes).
CONNECT_TIMEOUT = 10.0


class CommandFailed(Exception):
    """A command cannot do what it was asked (an unknown id, a missing `--force`).

    Not part of the `TopiqError` tree: it is the command line's control flow, turned into one
    line on stderr and exit code 1 by `guarded`.
    """


# -- flags ------------------------------------------------------------------------------


def add_connection_flag(parser: argparse.ArgumentParser) -> None:
    """`--connection NAME`, defaulting to QUEUE_CONNECTION."""
    parser.add_argument(
        "--connection",
        default=None,
        help="queue connection: redis or database (default: QUEUE_CONNECTION)",
    )


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json`: machine-readable output instead of tables."""
    parser.add_argument(
        "--json", action="store_true", help="print JSON (for scripts) instead of a table"
    )


def queue_name(text: str) -> str:
    """An argparse type: a valid queue name, or a usage error saying why."""
    try:
        return validate_queue(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def queue_list(text: str) -> str:
    """An argparse type: comma-separated queue names, each valid as `dispatch` wants it.

    Returns the text unchanged (the worker splits it); spaces around the commas are allowed.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one queue")
    for name in names:
        queue_name(name)
    return text


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _integer(text, 0)


def _seconds(text: str, positive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0 or (positive and value == 0) or value != value:
        rule = "must be positive" if positive else "must not be negative"
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, zero or more."""
    return _seconds(text, positive=False)


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    return _seconds(text, positive=True)


# -- connections and errors ---------------------------------------------------------------


@dataclass(slots=True)
class Connection:
    """An open queue connection, as a command uses it."""

    manager: QueueManager
    name: str
    driver: Driver

    async def failed_store(self) -> FailedStore:
        """The failed-job store of this connection (it may live on another backend)."""
        return await _reach(
            self.manager.failed_store(self.name),
            f"the failed-job store of the {self.name} queue connection",
        )

    async def driver_for(self, name: str) -> Driver:
        """The open driver of connection `name` (a failed record names the one it came from)."""
        return await _reach(self.manager.connection(name), f"the {name} queue connection")


async def _reach(opening: Awaitable[T], label: str) -> T:
    """Await a connection being opened, bounded by `CONNECT_TIMEOUT`, naming it on failure."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await opening
    except TimeoutError:
        raise ConnectionLostError(
            f"cannot reach {label}: no answer within {CONNECT_TIMEOUT:g}s"
        ) from None
    except ConfigurationError:
        raise
    except TopiqError as exc:
        raise ConnectionLostError(f"cannot reach {label}: {error_summary(exc)}") from exc


@contextlib.asynccontextmanager
async def open_connection(settings: Settings, connection: str | None) -> AsyncIterator[Connection]:
    """Open the connection `--connection` names (QUEUE_CONNECTION when `None`), then close it."""
    async with QueueManager(settings) as manager:
        name = manager.connection_name(connection)
        driver = await _reach(manager.connection(name), f"the {name} queue connection")
        yield Connection(manager, name, driver)


async def guarded(work: Awaitable[int]) -> int:
    """Run a command; a known failure becomes one line on stderr and exit code 1.

    `ConfigurationError` passes through: the CLI reports it with the usage exit code (2).
    """
    try:
        return await work
    except ConfigurationError:
        raise
    except CommandFailed as exc:
        message = str(exc)
    except (TopiqError, OSError) as exc:
        message = error_summary(exc)
    print(f"topiq: {message}", file=sys.stderr)
    return ExitCode.ERROR


def error_summary(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- output -------------------------------------------------------------------------------


def console() -> Console:
    """A console on the current stdout (read at call time, so tests can capture it).

    Piped output gets a wide console rather than rich's 80 columns, so ids and class names in
    a table stay whole for `grep`.
    """
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


def write_json(data: Any) -> None:
    """Print `data` as indented JSON (datetimes as RFC 3339)."""
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def emit(args: argparse.Namespace, data: Any, render: Callable[[], RenderableType]) -> None:
    """Print `data` as JSON with `--json`, else what `render()` draws."""
    if args.json:
        write_json(data)
    else:
        console().print(render())


def say(args: argparse.Namespace, message: str, data: Any) -> None:
    """Report what a command did: a sentence for people, `data` as JSON with `--json`."""
    emit(args, data, lambda: message)


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    caption: str = "",
    wrap: Sequence[str] = (),
) -> Table:
    """A table with right-aligned numbers.

    Only the columns named in `wrap` (free text such as an error message) wrap or shrink on a
    narrow terminal; the others (ids, names, counts, times) are always shown whole.
    """
    from rich.table import Table

    grid = Table(title=printable(title), caption=caption or None, title_justify="left")
    cells = [[_cell(value) for value in row] for row in rows]
    for index, name in enumerate(columns):
        values = [row[index] for row in cells]
        numeric = bool(values) and all(_is_number(value) for value in values)
        whole = name not in wrap
        grid.add_column(
            name,
            justify="right" if numeric else "left",
            no_wrap=whole,
            min_width=max(len(v) for v in [name, *values]) if whole else _first_words(values),
            overflow="fold",
        )
    for row in cells:
        grid.add_row(*row)
    return grid


def _first_words(values: Sequence[str]) -> int:
    """The width a wrapping column keeps: its longest first two words, up to 24 characters."""
    return min(24, max((len(" ".join(v.split()[:2])) for v in values), default=8))


#: C0 controls but tab and newline, DEL, and C1 controls: written as `\x1b`-style escapes.
_CONTROLS = {
    code: f"\\x{code:02x}"
    for code in (*range(0x20), *range(0x7F, 0xA0))
    if code not in (0x09, 0x0A)
}


def printable(text: str) -> str:
    """`text` with its control characters shown as escapes (`\x1b`, `\x07`), so what a job's
    dispatcher wrote (an RQ description, an error message) cannot send the operator's
    terminal escape sequences (retitle it, clear it, move the cursor). Tabs and newlines
    stay."""
    return text.translate(_CONTROLS)


def _cell(value: Any) -> str:
    """A cell's text, rich markup escaped: a job's description or error may hold `[/x]`,
    which rich would otherwise read as a tag (and refuse to draw the table); control
    characters escaped (`printable`)."""
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, datetime):
        return stamp(value)
    if isinstance(value, tuple | list):
        return escape(printable(",".join(str(v) for v in value))) or "-"
    return escape(printable(str(value)))


def _is_number(text: str) -> bool:
    return text.lstrip("-").replace(".", "", 1).isdigit()


def when(moment: datetime | float) -> str:
    """A time (a datetime or epoch seconds) in UTC, to the second: `2024-05-01 12:00:03Z`."""
    if not isinstance(moment, datetime):
        try:
            moment = datetime.fromtimestamp(moment, UTC)
        except (OverflowError, OSError, ValueError):
            # A stored time no calendar holds (a record written by hand): shown, not fatal.
            return f"{moment!r} (not a valid time)"
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"


def stamp(moment: datetime | float) -> str:
    """`when` with how long ago it was: `2024-05-01 12:00:03Z (5m ago)`."""
    seconds = moment.timestamp() if isinstance(moment, datetime) else moment
    if not math.isfinite(seconds):
        return when(moment)
    return f"{when(moment)} ({ago(time.time() - seconds)})"


def ago(seconds: float) -> str:
    """A duration the way people say it: `4s ago`, `12m ago`, `3h ago`, `2d ago`."""
    if seconds < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def failed_summary(record: FailedJob) -> dict[str, Any]:
    """One failed record as a row: id, connection, queue, class, error line, failed at."""
    return {
        "id": record.id,
        "connection": record.connection,
        "queue": record.queue,
        "class": record.job_class,
        "error": _exception_line(record.exception),
        "failed_at": record.failed_at,
    }


def _exception_line(text: str) -> str:
    """The first line of the exception's own message, skipping the traceback before it."""
    lines = text.rstrip().splitlines()
    start = 0
    for index, line in enumerate(lines):
        # Frames are indented; with chained exceptions the last traceback is the one raised.
        if line.startswith((" ", "\t", "Traceback (most recent call last)")):
            start = index + 1
    rest = [line for line in lines[start:] if line.strip()]
    return rest[0] if rest else (lines[0] if lines else "")
