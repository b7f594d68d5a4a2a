"""Logging set up once at the edge, from the settings."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from core.settings import LogFormat, Settings

__all__ = ["configure_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


class _Stderr(logging.StreamHandler[Any]):
    """Writes to whatever `sys.stderr` is at the time of each record.

    A handler holding on to the stream it was built with breaks when that stream is replaced and
    closed (pytest's capture, a daemon redirecting its output).
    """

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(settings: Settings) -> None:
    """Send Topiq's logs to stderr at `LOG_LEVEL`, as text or JSON (`LOG_FORMAT`)."""
    handler = _Stderr()
    if settings.log_format is LogFormat.JSON:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s[%(process)d] %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
