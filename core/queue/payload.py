"""Jobs to JSON payloads and back. JSON only: a payload never runs code when it is read.

A payload is one JSON object:

    {"id": "…", "job": "app.jobs.mail:SendMail", "queue": "default", "data": {…},
     "max_tries": 3, "timeout": 60, "retry_after": 0, "created_at": 1700000000000}

`attempts` is not in the payload: the driver counts tries at reservation, so a worker that dies
mid-job still spends one.
"""

from __future__ import annotations

import importlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import PayloadError, PayloadTooLargeError, SerializationError, UnknownJobError
from core.job import Job

__all__ = ["Decoded", "JobLoader", "decode_envelope", "encode", "new_job_id", "validate_queue"]

_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]{1,190}$")
_GOOD_NAMES: set[str] = set()


def new_job_id() -> str:
    """A random, unique job id (32 hex characters, 128 random bits)."""
    return os.urandom(16).hex()  # as unique as uuid4, at a third of its cost per dispatch


def validate_queue(name: str) -> str:
    """Return `name` if it is a usable queue name, else raise `ValueError` saying why."""
    if name in _GOOD_NAMES:
        return name
    if not isinstance(name, str) or _QUEUE_NAME.match(name) is None:
        raise ValueError(
            f"invalid queue name {name!r}: use 1 to 190 letters, digits and _ . : @ / -"
        )
    if len(_GOOD_NAMES) < 10_000:  # bounded: names may come from devices
        _GOOD_NAMES.add(name)
    return name


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def encode(job: Job, *, job_id: str, queue: str, max_bytes: int) -> bytes:
    """The payload for `job`, or `SerializationError` naming the attribute JSON cannot carry."""
    cls = type(job)
    envelope = {
        "id": job_id,
        "job": f"{cls.__module__}:{cls.__qualname__}",
        "queue": queue,
        "data": job.data(),
        "max_tries": job.max_tries,
        "timeout": job.timeout,
        "retry_after": job.retry_after,
        "created_at": int(time.time() * 1000),
    }
    try:
        raw = orjson.dumps(envelope, default=_refuse, option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise _explain(job, exc) from None
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(
            f"{cls.__qualname__} payload is {len(raw)} bytes, over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); pass a reference (an id, a path) instead of the data"
        )
    return raw


def _explain(job: Job, exc: TypeError) -> SerializationError:
    name = type(job).__qualname__
    for attr, value in job.data().items():
        try:
            orjson.dumps(value, default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as inner:
            return SerializationError(
                f"{name}.{attr} cannot be stored as JSON ({inner}); "
                "use str, int, float, bool, None, and lists or dicts of them"
            )
    for attr in ("max_tries", "timeout", "retry_after"):
        try:
            orjson.dumps(getattr(job, attr), default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as inner:
            return SerializationError(f"{name}.{attr} cannot be stored as JSON ({inner})")
    return SerializationError(f"{name} cannot be stored as JSON ({exc})")


def decode_envelope(raw: bytes | str) -> dict[str, Any]:
    """The payload's JSON object, or `PayloadError` saying what is wrong with it."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(envelope).__name__}")
    for key, kind in (("job", str), ("data", dict)):
        if not isinstance(envelope.get(key), kind):
            raise PayloadError(f"payload field {key!r} is missing or not a {kind.__name__}")
    return envelope


@dataclass(slots=True)
class Decoded:
    """A job rebuilt from its payload, with the limits it was dispatched with."""

    job: Job
    max_tries: int
    timeout: float


class JobLoader:
    """Turns payloads back into jobs, importing only `Job` subclasses under allowed modules."""

    def __init__(self, allowed_modules: Sequence[str]) -> None:
        self._allowed = tuple(allowed_modules)
        self._classes: dict[str, type[Job]] = {}

    def allowed(self, module: str) -> bool:
        return any(
            module == prefix.rstrip(".") or module.startswith(prefix) for prefix in self._allowed
        )

    def resolve(self, path: str) -> type[Job]:
        """The class named `module:QualName`, or `UnknownJobError`."""
        cls = self._classes.get(path)
        if cls is not None:
            return cls
        module_name, _, qualname = path.partition(":")
        if not module_name or not qualname:
            raise UnknownJobError(f"job class {path!r} is not of the form 'module:ClassName'")
        if not self.allowed(module_name):
            raise UnknownJobError(
                f"job class {path!r} is outside the allowed modules "
                f"{', '.join(self._allowed)} (QUEUE_ALLOWED_MODULES)"
            )
        try:
            target: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                target = getattr(target, part)
        except Exception as exc:
            raise UnknownJobError(f"job class {path!r} cannot be imported: {exc!r}") from exc
        if not (isinstance(target, type) and issubclass(target, Job)):
            raise UnknownJobError(f"{path!r} is not a subclass of core.job.Job")
        self._classes[path] = target
        return target

    def load(self, raw: bytes | str, *, job_id: str, attempts: int) -> Decoded:
        """Rebuild the job without calling its constructor."""
        envelope = decode_envelope(raw)
        cls = self.resolve(envelope["job"])
        job = cls.__new__(cls)
        job.__dict__.update(envelope["data"])
        for name in ("max_tries", "timeout", "retry_after"):
            if name in envelope and envelope[name] != getattr(cls, name):
                setattr(job, name, envelope[name])
        if envelope.get("queue") not in (None, cls.queue):
            job.queue = envelope["queue"]
        job.job_id = job_id
        job.attempts = attempts
        try:
            max_tries = int(job.max_tries)
            timeout = float(job.timeout)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"payload has an invalid max_tries or timeout: {exc}") from None
        return Decoded(job=job, max_tries=max_tries, timeout=timeout)
