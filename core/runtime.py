"""What a running job may reach beyond its own data, handed in by whoever runs it.

`core/job.py` knows nothing of MQTT or of queues: `Job.publish` asks this module for the
publisher, and `Job.request` for the requester (`core.mqtt.requests`, imported on first use).
The worker and the MQTT app install a publisher (`set_publisher`); without one, the first
publish loads the MQTT publisher lazily, so a script that dispatches on `sync` can still
publish.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Publisher", "Requester", "get_publisher", "get_requester", "set_publisher"]


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


class Requester(Protocol):
    def __call__(
        self, topic: str, payload: Any, *, timeout: float = 10.0, qos: int = 1
    ) -> Awaitable[Any]: ...


def get_requester() -> Requester:
    """What `Job.request` calls: MQTT 5 request/response (`core.mqtt.requests.request`)."""
    from core.mqtt.requests import request

    requester: Callable[..., Awaitable[Any]] = request
    return requester
