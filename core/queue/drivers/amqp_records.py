"""What the amqp connection keeps in its companion store (a `database` or `redis` driver):
RabbitMQ holds the messages; the store holds everything a message cannot tell.

All of it rides on the store's markers (named values with a time to live), under names that
start with `AMQP_PREFIX` so that the store's own connection never sees them:

* `<P>:job:<id>`: the job's status record, as JSON (`Record`).
* `<P>:cancel:<id>`: a running job's cancellation was asked for.
* `<P>:payload:<id>`: a job's payload (`encode_payload`), kept beside its record.
* `<P>:lease:<id>`: the token of a parked job's lease ("done" once it ended; amqp.py).
* `<P>:id:<queue>:<id>`, `<P>:key:<queue>:<key>`, `<P>:once:<queue>:<key>`: ids, unique keys
  and once keys taken (`claim_marker`: set if absent, atomic on the store).
* `<P>:queues`: the names of the queues pushed to (JSON list, merged).
* `<P>:m:<name>`: the connection's own markers (pauses, schedule ticks, the restart signal).

A marker name longer than a store allows (190 characters) is replaced by its SHA-256.

Counts of ends (`recent`, `history`) go into the store's per-minute history under a shadow
queue name (`ends_queue`), one field per way of ending (`END_FIELDS`): the store adds them up
atomically whatever the number of workers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from core.queue.drivers.base import MinuteCounts
from core.queue.drivers.memory import read_info
from core.status import JobStatus, Status

__all__ = [
    "END_FIELDS",
    "LIVE_TTL",
    "MARKER_LIMIT",
    "Record",
    "decode_payload",
    "encode_payload",
    "ends_queue",
    "history_queue",
    "marker_name",
    "merge_minutes",
]

#: The longest marker name every store accepts.
MARKER_LIMIT = 190
#: Seconds a waiting or running job's record is kept past its due time: RabbitMQ has no
#: expiry of its own for a message, so the record must outlive any plausible wait.
LIVE_TTL = 30 * 86400.0

#: The history field each way of ending is counted in, in the shadow queue (`ends_queue`).
END_FIELDS: dict[Status, str] = {
    Status.SUCCEEDED: "started",
    Status.FAILED: "waited",
    Status.CANCELLED: "wait_ms",
    Status.EXPIRED: "ran",
}


def marker_name(*parts: str) -> str:
    """The store marker of `parts` joined by ':' (hashed when too long for a store)."""
    name = ":".join(parts)
    if len(name) <= MARKER_LIMIT:
        return name
    return f"{parts[0]}:#" + hashlib.sha256(name.encode()).hexdigest()


def encode_payload(payload: bytes) -> str:
    """A payload as a marker value (markers hold text; a payload is any bytes)."""
    return base64.b64encode(payload).decode("ascii")


def decode_payload(text: str | None) -> bytes | None:
    """The payload a marker value holds (`None` for none, or one that cannot be read)."""
    if not text:
        return None
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        return None


def history_queue(prefix: str, queue: str) -> str:
    """The store history name of a queue's worker counts (kept apart from the store's own
    queues of the same name)."""
    return f"{prefix}.{queue}"


def ends_queue(prefix: str, queue: str) -> str:
    """The store history name where a queue's ends are counted (`END_FIELDS`)."""
    return f"{prefix}!{queue}"


def merge_minutes(work: list[MinuteCounts], ends: list[MinuteCounts]) -> list[MinuteCounts]:
    """One history from the workers' counts and the shadow queue's ends, minute by minute."""
    out = []
    for mine, ended in zip(work, ends, strict=True):
        out.append(
            MinuteCounts(
                mine.minute,
                succeeded=getattr(ended, END_FIELDS[Status.SUCCEEDED]),
                failed=getattr(ended, END_FIELDS[Status.FAILED]),
                cancelled=getattr(ended, END_FIELDS[Status.CANCELLED]),
                expired=getattr(ended, END_FIELDS[Status.EXPIRED]),
                started=mine.started,
                waited=mine.waited,
                wait_ms=mine.wait_ms,
                ran=mine.ran,
                run_ms=mine.run_ms,
            )
        )
    return out


@dataclass(slots=True)
class Record:
    """One job's status record as the store keeps it (JSON)."""

    id: str
    queue: str
    status: Status
    job: str = ""
    max_tries: int | None = None
    attempts: int = 0
    enqueued_at: float | None = None
    due_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker: str = ""
    error: str = ""
    traceback: str = ""
    result: str | None = None  # JSON text
    info: str | None = None  # JSON text
    priority: int = 0
    # The rules applied later, never shown:
    ttl: float = 0.0
    failure_ttl: float = 604800.0
    unique_key: str = ""
    unique_for: float = 0.0
    check_id: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def dumps(self) -> str:
        # Not `dataclasses.asdict`: its deep copy cost more than the rest of a push.
        data = {name: getattr(self, name) for name in _FIELDS}
        data["status"] = self.status.value
        return orjson.dumps(data).decode()

    @classmethod
    def loads(cls, raw: str | None) -> Record | None:
        """The record in `raw`, or `None` for none (or one that cannot be read)."""
        if not raw:
            return None
        try:
            data = orjson.loads(raw)
            data["status"] = Status(data["status"])
            return cls(**data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def view(self, connection: str) -> JobStatus:
        """What callers see of the record."""
        description, meta = read_info(self.info)
        return JobStatus(
            id=self.id,
            status=self.status,
            connection=connection,
            queue=self.queue,
            job=self.job,
            attempts=self.attempts,
            max_tries=self.max_tries,
            enqueued_at=self.enqueued_at,
            due_at=self.due_at,
            started_at=self.started_at,
            ended_at=self.ended_at,
            worker=self.worker,
            error=self.error,
            traceback=self.traceback,
            result=None if self.result is None else self.result.encode(),
            priority=self.priority,
            description=description,
            meta=meta,
        )


_FIELDS = tuple(f.name for f in fields(Record))
