"""Turning the ways people write a delay into seconds."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

__all__ = ["LATEST_DUE", "Delay", "Duration", "parse_delay", "parse_duration"]

#: The latest a delayed job may fall due: SQL stores times as DATETIME, which ends with the year
#: 9999, and a due time plus its ttl (30 days at most) must fit too. A later one failed in the SQL
#: driver with a bare OverflowError, and Redis stored one that `queue:job` could not show.
LATEST_DUE = datetime(9999, 1, 1, tzinfo=UTC).timestamp()

Delay = float | int | str | timedelta | datetime
Duration = float | int | str | timedelta

_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_ALIASES = {
    "millisecond": "ms", "milliseconds": "ms", "msec": "ms",
    "sec": "s", "secs": "s", "second": "s", "seconds": "s",
    "min": "m", "mins": "m", "minute": "m", "minutes": "m",
    "hr": "h", "hrs": "h", "hour": "h", "hours": "h",
    "day": "d", "days": "d",
    "week": "w", "weeks": "w",
}  # fmt: skip
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*,?", re.IGNORECASE)


def parse_delay(value: Delay) -> float:
    """Seconds from now until `value`, never negative.

    Accepts a number of seconds, a `timedelta`, a `datetime` (naive means local time), or a
    string such as "90", "30s", "10 minutes", "1h30m" or "2 days".

    Raises:
        ValueError: the value cannot be read as a delay.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid delay {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, datetime):
        seconds = value.timestamp() - time.time()
    elif isinstance(value, str):
        seconds = _parse_text(value)
    else:
        raise ValueError(
            f"invalid delay {value!r}: expected seconds, a string, timedelta or datetime"
        )
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"invalid delay {value!r}")
    return max(0.0, seconds)


def _parse_text(text: str) -> float:
    rest = text.strip()
    if not rest:
        raise ValueError("invalid delay '': expected e.g. '30s', '10 minutes' or '1h'")
    total = 0.0
    pos = 0
    while pos < len(rest):
        match = _PART.match(rest, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"invalid delay {text!r}: expected e.g. '30s', '10 minutes' or '1h'")
        number, unit = match.groups()
        unit = _ALIASES.get(unit.lower(), unit.lower()) or "s"
        if unit not in _UNITS:
            raise ValueError(f"invalid delay {text!r}: unknown unit {match.group(2)!r}")
        total += float(number) * _UNITS[unit]
        pos = match.end()
    return total


def parse_duration(value: Duration, name: str = "duration") -> float:
    """Seconds in a job setting such as `timeout`, `retry_after` or `ttl`.

    Accepts a number of seconds, a `timedelta`, or a string such as "90", "90s", "10 minutes"
    or "1h". Unlike a delay, a negative or non-finite value is an error, not zero.

    Raises:
        ValueError: naming the setting (`name`) and what is wrong with the value.
    """
    if type(value) is int or type(value) is float:
        seconds = float(value)
    elif isinstance(value, bool) or not isinstance(value, int | float | str | timedelta):
        raise ValueError(
            f"{name} must be seconds (a number) or a duration such as '90s', '10 minutes' "
            f"or '1h', got {value!r}"
        )
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        try:
            seconds = _parse_text(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    else:
        seconds = float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        raise ValueError(f"{name} must be a finite number of seconds ≥ 0, got {value!r}")
    return seconds
