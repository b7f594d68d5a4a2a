"""The driver registry: a connection kind maps to the class that implements it, imported lazily
so that a backend's client library is only needed when that backend is used."""

from __future__ import annotations

import importlib

from core.errors import ConfigurationError
from core.queue.drivers.base import (
    Driver,
    FailedJob,
    FailedStore,
    Outcome,
    OutgoingJob,
    Pushed,
    QueueStats,
    RecentCounts,
    ReservedJob,
    WorkerInfo,
)
from core.settings import Settings

__all__ = [
    "DRIVERS",
    "Driver",
    "FailedJob",
    "FailedStore",
    "Outcome",
    "OutgoingJob",
    "Pushed",
    "QueueStats",
    "RecentCounts",
    "ReservedJob",
    "WorkerInfo",
    "create_driver",
]

#: kind -> ("module:Class", the package that provides its client library)
DRIVERS: dict[str, tuple[str, str]] = {
    "memory": ("core.queue.drivers.memory:MemoryDriver", ""),
    "sync": ("core.queue.drivers.sync:SyncDriver", ""),
    "redis": ("core.queue.drivers.redis:RedisDriver", "redis[hiredis]"),
    "database": (
        "core.queue.drivers.database:DatabaseDriver",
        "sqlalchemy[asyncio] aiosqlite aiomysql",
    ),
    "amqp": ("core.queue.drivers.amqp:AmqpDriver", "aio-pika"),
}


def create_driver(kind: str, settings: Settings, name: str | None = None) -> Driver:
    """A new, unopened driver of `kind`, or `ConfigurationError` naming the known kinds."""
    try:
        path, package = DRIVERS[kind]
    except KeyError:
        raise ConfigurationError(
            f"unknown queue connection {kind!r}: must be one of {', '.join(DRIVERS)}"
        ) from None
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if (exc.name or "").startswith("core."):
            raise
        raise ConfigurationError(
            f"the {kind!r} queue connection needs {package} (pip install {package}): {exc}"
        ) from exc
    cls: type[Driver] = getattr(module, class_name)
    return cls(name or kind, settings)
