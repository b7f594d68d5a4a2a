"""The live status table of `python main.py --demo` (rich)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table

from core.mqtt.stats import MqttStats

__all__ = ["Dashboard", "JobCounts"]


def _python() -> str:
    """The interpreter as the user can type it here: `.venv/bin/python` when it is the
    project's virtualenv (a plain `python` may lack the dependencies), else `python`."""
    try:
        return str(Path(sys.executable).relative_to(Path.cwd()))
    except ValueError:
        return "python"


@dataclass(slots=True)
class JobCounts:
    """What the in-process worker has done since the app started."""

    done: int = 0
    retried: int = 0  # tries that failed and will run again
    failed: int = 0  # failed for good: kept in the failed-job store


class Dashboard:
    """Redraws a table of the app's counters while `run()` runs, then prints a summary line.

    Args:
        stats: The app's counters.
        jobs: Returns the worker's job counts (may query the queue, hence async).
        sent: Returns how many messages the simulated devices have published.
        extra: Returns more rows, each `(label, summary key, count)`: shown in the table and
            as `key=count` in the summary line.
        console: Where to draw (default: standard output).
        interval: Seconds between redraws.
    """

    def __init__(
        self,
        stats: MqttStats,
        jobs: Callable[[], Awaitable[JobCounts]],
        sent: Callable[[], int] | None = None,
        *,
        extra: Callable[[], list[tuple[str, str, int]]] | None = None,
        console: Console | None = None,
        interval: float = 0.5,
    ) -> None:
        self.stats = stats
        self.jobs = jobs
        self.sent = sent
        self.extra = extra
        self.console = console or Console()
        self.interval = interval
        self.counts = JobCounts()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Make `run()` draw once more and return."""
        self._stop.set()

    def render(self) -> Table:
        """The table as it stands."""
        s = self.stats
        table = Table(title="Topiq demo", show_header=True, header_style="bold")
        table.add_column("what")
        table.add_column("count", justify="right")
        rows: list[tuple[str, object]] = []
        if self.sent is not None:
            rows.append(("published by devices", self.sent()))
        rows += [
            ("messages received", s.received),
            ("handled", s.handled),
            ("invalid payloads", s.invalid),
            ("handler errors", s.failed),
            ("jobs dispatched", s.jobs_dispatched),
            ("jobs done", self.counts.done),
            ("job tries retried", self.counts.retried),
            ("jobs failed (failed store)", self.counts.failed),
        ]
        if self.extra is not None:
            rows += [(label, value) for label, _, value in self.extra()]
        rows.append(("broker", "connected" if s.connected else "disconnected"))
        for name, value in rows:
            table.add_row(name, str(value))
        return table

    def summary(self) -> str:
        """One line with the final counts (what scripts and tests read)."""
        s = self.stats
        return (
            f"demo summary: received={s.received} handled={s.handled} invalid={s.invalid} "
            f"handler_errors={s.failed} dispatched={s.jobs_dispatched} "
            f"jobs_done={self.counts.done} jobs_retried={self.counts.retried} "
            f"jobs_failed={self.counts.failed}"
            + "".join(f" {key}={value}" for _, key, value in (self.extra() if self.extra else []))
        )

    def failed_hint(self) -> str | None:
        """Where to look at the jobs that failed for good, if any did."""
        failed = self.counts.failed
        if not failed:
            return None
        main = f"{_python()} main.py"
        return (
            f"{failed} job{'s' if failed != 1 else ''} failed for good and "
            f"{'are' if failed != 1 else 'is'} kept in the failed store: "
            f"`{main} queue:failed` lists failed jobs, "
            f"`{main} queue:failed:show ID` shows one's payload and traceback, "
            f"`{main} queue:retry ID` runs it again"
        )

    async def _refresh_counts(self) -> None:
        # A queue briefly out of reach is no reason to stop drawing: keep the last counts.
        with contextlib.suppress(Exception):
            self.counts = await self.jobs()

    async def run(self) -> None:
        """Draw until `stop()`, then print the summary line."""
        root = logging.getLogger()
        saved = list(root.handlers)
        with Live(self.render(), console=self.console, auto_refresh=False) as live:
            if self.console.is_terminal:
                # Log lines go above the table instead of through it.
                root.handlers = [RichHandler(console=self.console, show_path=False)]
            try:
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.interval)
                    await self._refresh_counts()
                    live.update(self.render(), refresh=True)
            finally:
                root.handlers = saved
        if not self.console.is_terminal:
            self.console.line()  # a non-terminal Live leaves its last line open
        self.console.print(self.summary(), highlight=False, soft_wrap=True)
        hint = self.failed_hint()
        if hint is not None:
            self.console.print(hint, highlight=False, soft_wrap=True, markup=False)
