"""What a running job may reach beyond its own data, handed in by whoever runs it.

`core/job.py` knows nothing of MQTT or of queues: `Job.publish` asks this module for the
publisher. The worker and the MQTT app install theirs (`set_publisher`); without one, the
first publish loads the MQTT publisher lazily, so a script that dispatches on `sync` can still
publish.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Publisher", "get_publisher", "set_publisher"]


class Publisher(Protocol):
    def __call__(
        self, topic: str, payload: Any, *, qos: int = 1, retain: bool = False
    ) -> Awaitable[None]: ...


_publisher: Publisher | None = None


def set_publisher(publisher: Publisher | None) -> None:
    """Make `publisher` the one `Job.publish` uses (`None`: back to the default)."""
    global _publisher
    _publisher = publisher


def get_publisher() -> Publisher:
    """The installed publisher, or the MQTT publisher (imported on first use)."""
    if _publisher is not None:
        return _publisher
    from core.mqtt.publisher import publish

    default: Callable[..., Awaitable[None]] = publish
    return default
