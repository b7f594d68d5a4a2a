"""Where a dispatch comes from: the MQTT message a route handler is answering, if any.

The MQTT app sets the origin around each handler run; `QueueManager.push` (and `bulk`) read it
and give every job the handler dispatches what the route asked for, unless the job or the
call says otherwise:

* `group`: the job runs in turn with the other jobs of this group (a route's
  `group="{device_id}"`), when the job has no `group` of its own;
* `coalesce`: the job replaces a waiting job of its class with the same key
  (`unique_key` = "<class path>:<coalesce>", `on_duplicate` "replace"), when the job has no
  `unique_key` of its own;
* `response_topic` + `correlation_data`: the job's outcome is published there when it ends
  (only set when the message's MQTT 5 Response Topic matches `MQTT_RESPONSE_TOPICS`);
* `status_topic`: the job's outcome is published there too (a route's template, rendered).

The value lives in a context variable, so tasks a handler starts inherit it, and nothing
outside a handler sees it. This module imports nothing of the MQTT side: the queue layer
reads it without depending on MQTT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Origin", "current_origin", "origin"]


@dataclass(frozen=True, slots=True)
class Origin:
    """What a route asks of the jobs its handler dispatches (every field may be empty)."""

    topic: str = ""  # the message's topic (for logs)
    group: str = ""
    coalesce: str = ""
    response_topic: str = ""
    correlation_data: bytes | None = None
    status_topic: str = ""


#: The origin of the dispatches made in this context (`None`: not inside a route handler).
current_origin: ContextVar[Origin | None] = ContextVar("topiq_origin", default=None)


@contextlib.contextmanager
def origin(value: Origin | None) -> Iterator[None]:
    """Make `value` the origin of the dispatches made inside the block."""
    token = current_origin.set(value)
    try:
        yield
    finally:
        current_origin.reset(token)
