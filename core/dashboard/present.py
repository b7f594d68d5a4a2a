"""How values read on a page: times, durations, JSON, and text with every secret taken out."""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

import orjson

from core.settings import Settings

__all__ = [
    "PAYLOAD_SHOWN",
    "Redactor",
    "ago",
    "duration",
    "payload_text",
    "per_minute",
    "pretty_json",
    "when",
]

#: How much of a payload the job page shows (characters of the text, after pretty-printing).
PAYLOAD_SHOWN = 64 * 1024
#: Payloads larger than this are shown as they are, not parsed to be pretty-printed.
_PARSED_AT_MOST = 1024 * 1024

_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/\s:@]*):[^@\s/]*@")


def when(moment: float | None) -> str:
    """Epoch seconds as `2024-05-01 12:00:03Z`, or `-`."""
    if moment is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment))
    except (OverflowError, OSError, ValueError):
        return f"{moment!r} (not a valid time)"


def ago(moment: float | None) -> str:
    """How long ago an epoch time was: `4s ago`, `12m ago`."""
    if moment is None:
        return "-"
    seconds = time.time() - moment
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def duration(seconds: float | None) -> str:
    """`12 ms`, `1.40 s`, or `-`."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def per_minute(rate: float) -> str:
    """A rate per minute with the precision it needs: `0.03`, `4.5`, `120`."""
    if rate == 0:
        return "0"
    return f"{rate:.2f}" if rate < 1 else f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def pretty_json(raw: bytes | str | None) -> str:
    """JSON indented for reading; text that is not JSON as it is (it is why some jobs fail)."""
    if raw is None:
        return ""
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def payload_text(raw: bytes | str | None, shown: int = PAYLOAD_SHOWN) -> tuple[str, str]:
    """A payload as the job page shows it, and a note when it is cut: JSON pretty-printed
    (text that is not JSON as it is), at most `shown` characters. The page escapes it."""
    if raw is None:
        return "", ""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size <= _PARSED_AT_MOST:
        text = pretty_json(raw)
    else:
        # Only the head is decoded: `shown` characters take at most 4 bytes each.
        text = raw[: shown * 4].decode(errors="replace") if isinstance(raw, bytes) else raw
    if len(text) <= shown:
        return text, ""
    return text[:shown], (
        f"Truncated: the first {shown // 1024} KB shown of a {size:,}-byte payload."
    )


class Redactor:
    """Takes every secret of the settings (passwords, URLs with passwords, the dashboard
    token) out of a text before a page shows it (an error message may quote a URL)."""

    def __init__(self, settings: Settings) -> None:
        found: set[str] = set()
        for secret in (
            settings.dashboard_token,
            settings.redis_password,
            settings.db_pass,
            settings.db_url,
            settings.mqtt_password,
        ):
            if secret is not None and secret.get_secret_value():
                found.add(secret.get_secret_value())
        for url in (settings.redis_dsn, settings.database_dsn, settings.mqtt_url or ""):
            password = urlsplit(url).password if "://" in url else None
            if password:
                found.add(password)
        # Longest first, so a URL goes whole before the password inside it.
        self._secrets = sorted((s for s in found if len(s) >= 3), key=len, reverse=True)

    def __call__(self, text: Any) -> str:
        out = _URL_PASSWORD.sub(r"\1:***@", str(text))
        for secret in self._secrets:
            out = out.replace(secret, "***")
        return out
