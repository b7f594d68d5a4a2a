"""What a worker adds to its queues' per-minute history (`Driver.add_history`): tries started,
first-try waits, tries that ended and their run times (`HISTORY_FIELDS`).

Counted in memory per queue and minute, and sent with each heartbeat in one round trip, so a
worker that dies loses at most one beat of them. When the backend cannot take them, they are
kept for the next beat, but never more than `MAX_ROWS` queue-minutes nor older than
`MAX_AGE_MINUTES` (the history itself keeps two hours): a long outage costs the oldest
counts, never the worker's memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

__all__ = ["MAX_AGE_MINUTES", "MAX_ROWS", "HistoryCounts"]

#: The most queue-minutes held while the backend does not take them.
MAX_ROWS = 2000
#: Counts older than this many minutes are dropped rather than sent.
MAX_AGE_MINUTES = 120

Row = tuple[str, int, Mapping[str, int]]


class HistoryCounts:
    """A worker's unsent history counts, per `(queue, minute)`."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, int], dict[str, int]] = {}
        self.dropped = 0  # queue-minutes dropped by the bounds

    def __len__(self) -> int:
        return len(self._rows)

    def _new_row(self, key: tuple[str, int]) -> dict[str, int] | None:
        if len(self._rows) >= MAX_ROWS:
            self._trim()
            if len(self._rows) >= MAX_ROWS:
                self.dropped += 1
                return None
        row: dict[str, int] = {}
        self._rows[key] = row
        return row

    def started(self, queue: str, waited: float | None, at: float | None = None) -> None:
        """A try started; `waited` is the first try's wait (`first_wait`), if measured."""
        key = (queue, int((time.time() if at is None else at) // 60))
        row = self._rows.get(key) or self._new_row(key)  # once per try: kept lean
        if row is None:
            return
        row["started"] = row.get("started", 0) + 1
        if waited is not None:
            row["waited"] = row.get("waited", 0) + 1
            row["wait_ms"] = row.get("wait_ms", 0) + round(waited * 1000)

    def ran(self, queue: str, seconds: float, at: float | None = None) -> None:
        """A try ended after running `seconds`."""
        key = (queue, int((time.time() if at is None else at) // 60))
        row = self._rows.get(key) or self._new_row(key)
        if row is None:
            return
        row["ran"] = row.get("ran", 0) + 1
        row["run_ms"] = row.get("run_ms", 0) + round(seconds * 1000)

    def take(self) -> list[Row]:
        """Every unsent row (removed from here: `put_back` if sending them fails)."""
        self._trim()
        rows: list[Row] = [(q, minute, counts) for (q, minute), counts in self._rows.items()]
        self._rows = {}
        return rows

    def put_back(self, rows: Sequence[Row]) -> None:
        """Rows `take` gave that could not be sent: added to what was counted since."""
        for queue, minute, counts in rows:
            if len(self._rows) >= MAX_ROWS and (queue, minute) not in self._rows:
                self.dropped += 1
                continue
            row = self._rows.setdefault((queue, minute), {})
            for name, n in counts.items():
                row[name] = row.get(name, 0) + n
        self._trim()

    def _trim(self) -> None:
        """Drop rows past `MAX_AGE_MINUTES`."""
        oldest = int(time.time() // 60) - MAX_AGE_MINUTES
        stale = [key for key in self._rows if key[1] < oldest]
        for key in stale:
            del self._rows[key]
        self.dropped += len(stale)
