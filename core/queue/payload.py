"""Jobs to JSON payloads and back. JSON only: a payload never runs code when it is read.

A payload is one JSON object:

    {"id": "…", "job": "app.jobs.mail:SendMail", "queue": "default", "data": {…},
     "max_tries": 3, "timeout": 60, "retry_after": 0, "created_at": 1700000000000}

`attempts` is not in the payload: the driver counts tries at reservation, so a worker that dies
mid-job still spends one.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from core.errors import (
    PayloadError,
    PayloadTooLargeError,
    SerializationError,
    UnknownJobError,
)
from core.job import Job

__all__ = [
    "Decoded",
    "JobLoader",
    "decode_envelope",
    "encode",
    "new_job_id",
    "unloadable_reason",
    "validate_queue",
]

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


# -- what a job class allows its data to be --------------------------------------------

#: The settings a class (or an instance, before dispatch) chooses. They travel in the
#: payload's own fields, never in its data, and must be plain values on the class.
_SETTINGS = ("queue", "max_tries", "timeout", "retry_after", "connection")


@dataclass(frozen=True, slots=True)
class _ClassInfo:
    names: frozenset[str]  # public names the class defines: no data key may use one
    problem: str | None  # why the class's settings cannot work, if they cannot


_CLASS_INFO: dict[type[Job], _ClassInfo] = {}


def _class_info(cls: type[Job]) -> _ClassInfo:
    """What `cls` reserves, worked out once per class."""
    info = _CLASS_INFO.get(cls)
    if info is None:
        # Data may not reuse what the framework defines on `Job` (methods, settings, ids), nor
        # a method, property or other descriptor of the subclass. A plain class attribute of
        # the subclass (`items: list[str] = []`, `threshold = 5`) is a default for data: an
        # instance value of that name is data, as it would be if set in `__init__`.
        names = frozenset(
            name
            for name in dir(cls)
            if not name.startswith("_")
            and (hasattr(Job, name) or hasattr(type(inspect.getattr_static(cls, name)), "__get__"))
        )
        problem = None
        for name in _SETTINGS:
            raw = inspect.getattr_static(cls, name)
            if hasattr(type(raw), "__get__"):
                problem = (
                    f"{cls.__qualname__}.{name} is {_kind(raw)} of {_owner(cls, name)}; job "
                    f"settings must be plain class attributes (`{name} = ...`); to choose one "
                    "per job, set it on the instance before dispatch"
                )
                break
        info = _CLASS_INFO[cls] = _ClassInfo(names, problem)
    return info


def _kind(raw: object) -> str:
    if isinstance(raw, property):
        return "a property"
    if isinstance(raw, staticmethod | classmethod) or inspect.isroutine(raw):
        return "a method"
    if hasattr(type(raw), "__get__"):
        return "a descriptor"
    return "a class attribute"


def _owner(cls: type, name: str) -> str:
    return next((k.__qualname__ for k in cls.__mro__ if name in vars(k)), cls.__qualname__)


def _clashes(cls: type[Job], names: frozenset[str], data: dict[str, Any]) -> list[str]:
    """Each data key the class uses itself (or that is private), described; the first five."""
    out = []
    for key in data:
        if key.startswith("_"):
            out.append(f"{key!r} is a private name")
        elif key in names:
            raw = inspect.getattr_static(cls, key)
            out.append(f"{key!r} is {_kind(raw)} of {_owner(cls, key)}")
    if len(out) > 5:  # a hostile payload may hold thousands: the record names a few
        out[5:] = [f"and {len(out) - 5} more"]
    return out


_PLAIN = frozenset({int, float})


#: The longest `timeout` or `retry_after` a job may have (30 days): leases and due times are
#: kept as integer milliseconds, and a longer job belongs in a schedule, not one try.
MAX_SECONDS = 30 * 24 * 3600


def _limits(max_tries: Any, timeout: Any, retry_after: Any) -> tuple[int, float, Any]:
    """The three numeric settings, checked; `ValueError` names the one that is wrong."""
    if (  # the usual case, at a fraction of the cost of the checks below (NaN fails `<=`)
        type(max_tries) is int
        and max_tries >= 1
        and type(timeout) in _PLAIN
        and 0 <= timeout <= MAX_SECONDS
        and type(retry_after) in _PLAIN
        and 0 <= retry_after <= MAX_SECONDS
    ):
        return max_tries, timeout, retry_after
    if type(max_tries) is not int:
        if not (_is_number(max_tries) and float(max_tries).is_integer()):
            raise ValueError(f"max_tries must be a whole number, got {max_tries!r}")
        max_tries = int(max_tries)
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries!r}")
    if not (_is_number(timeout) and 0 <= timeout <= MAX_SECONDS):
        raise ValueError(
            f"timeout must be a number of seconds from 0 to {MAX_SECONDS} (30 days), "
            f"got {timeout!r}"
        )
    delays = retry_after if isinstance(retry_after, list | tuple) else (retry_after,)
    for delay in delays:
        if not (_is_number(delay) and 0 <= delay <= MAX_SECONDS):
            raise ValueError(
                f"retry_after must be seconds from 0 to {MAX_SECONDS} (30 days) or a list of "
                f"them, got {retry_after!r}"
            )
    return max_tries, timeout, retry_after


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def encode(job: Job, *, job_id: str, queue: str, max_bytes: int) -> bytes:
    """The payload for `job`, or `SerializationError` naming the attribute it cannot carry."""
    cls = type(job)
    info = _class_info(cls)
    if info.problem is not None:
        raise SerializationError(info.problem)
    data = cls.data(job)  # the class's method: an instance attribute named `data` cannot stand in
    if not info.names.isdisjoint(data):
        raise SerializationError(
            f"{cls.__qualname__} cannot be dispatched: "
            + "; ".join(_clashes(cls, info.names, data))
            + ". Instance attributes named like something the class defines (a method, a "
            "property, a class attribute) cannot carry job data: rename them"
        )
    try:
        max_tries, timeout, retry_after = _limits(job.max_tries, job.timeout, job.retry_after)
    except ValueError as exc:
        raise SerializationError(f"{cls.__qualname__}.{exc}") from None
    envelope = {
        "id": job_id,
        "job": f"{cls.__module__}:{cls.__qualname__}",
        "queue": queue,
        "data": data,
        "max_tries": max_tries,
        "timeout": timeout,
        "retry_after": retry_after,
        "created_at": int(time.time() * 1000),
    }
    try:
        raw = orjson.dumps(envelope, default=_refuse, option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise _explain(cls, data, exc) from None
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(
            f"{cls.__qualname__} payload is {len(raw)} bytes, over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); pass a reference (an id, a path) instead of the data"
        )
    return raw


def _explain(cls: type[Job], data: dict[str, Any], exc: TypeError) -> SerializationError:
    name = cls.__qualname__
    for attr, value in data.items():
        try:
            orjson.dumps(value, default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as inner:
            return SerializationError(
                f"{name}.{attr} cannot be stored as JSON ({inner}); "
                "use str, int, float, bool, None, and lists or dicts of them"
            )
    return SerializationError(f"{name} cannot be stored as JSON ({exc})")


def _allowed(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == prefix.rstrip(".") or module.startswith(prefix) for prefix in prefixes)


def unloadable_reason(cls: type, allowed_modules: Sequence[str]) -> str | None:
    """Why no worker could import `cls` by the name its payloads give, or `None` if one can.

    A worker imports `module:QualName` from a module under `allowed_modules`: a class defined
    in `__main__` (the script being run), inside a function, or in another module cannot be.
    """
    module, qualname = cls.__module__, cls.__qualname__
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
    move = f"move the class into a module under app/ (e.g. app/jobs/{snake}.py) and import it"
    if module == "__main__":
        return (
            f"{qualname} is defined in __main__ (the script being run), which no worker can "
            f"import: {move} from there (or dispatch it on the `sync` connection, which runs "
            "it inline)"
        )
    if "<locals>" in qualname:
        return (
            f"{module}:{qualname} is defined inside a function, where no worker can find it: "
            f"{move} at module level"
        )
    if not _allowed(module, allowed_modules):
        package = module.rpartition(".")[0]
        prefix = f"{package}." if package else module
        return (
            f"{module}:{qualname} is outside the allowed modules "
            f"({', '.join(allowed_modules) or 'none'}), so no worker would load it: {move}, "
            f"or add {prefix!r} to QUEUE_ALLOWED_MODULES"
        )
    target: Any = sys.modules.get(module)
    if target is not None:
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is not cls:
            return (
                f"{module}:{qualname} does not name this class (was it created or replaced at "
                "run time?): define the job class once, at module level"
            )
    return None


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
        return _allowed(module, self._allowed)

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
        """Rebuild the job without calling its constructor.

        Whatever goes wrong (the payload, the class, or the class's own code run while the job
        is rebuilt) is raised as `PayloadError` with the reason, never as another exception.
        """
        try:
            return self._load(raw, job_id, attempts)
        except PayloadError:
            raise
        except Exception as exc:
            raise PayloadError(f"job cannot be rebuilt from its payload: {exc!r}") from exc

    def _load(self, raw: bytes | str, job_id: str, attempts: int) -> Decoded:
        envelope = decode_envelope(raw)
        path: str = envelope["job"]
        cls = self.resolve(path)
        info = _class_info(cls)
        if info.problem is not None:
            raise PayloadError(f"{path}: {info.problem}")
        data: dict[str, Any] = envelope["data"]
        clash = not info.names.isdisjoint(data)
        if not clash:
            for key in data:
                if key.startswith("_"):
                    clash = True
                    break
        if clash:
            raise PayloadError(
                f"{path}: payload data may only set data attributes, but "
                + "; ".join(_clashes(cls, info.names, data))
            )
        try:
            max_tries, timeout, retry_after = _limits(
                envelope.get("max_tries", cls.max_tries),
                envelope.get("timeout", cls.timeout),
                envelope.get("retry_after", cls.retry_after),
            )
        except ValueError as exc:
            raise PayloadError(f"{path}: payload field {exc}") from None
        queue = envelope.get("queue")
        if queue is not None and not isinstance(queue, str):
            raise PayloadError(f"{path}: payload field 'queue' must be a string, got {queue!r}")
        job = cls.__new__(cls)
        # Written straight into the instance, as the data is: no `__setattr__` of the class
        # runs, and the class checks above keep data and settings off its methods.
        state = job.__dict__
        state.update(data)
        if max_tries != cls.max_tries:
            state["max_tries"] = max_tries
        if timeout != cls.timeout:
            state["timeout"] = timeout
        if retry_after != cls.retry_after:
            state["retry_after"] = retry_after
        if queue is not None and queue != cls.queue:
            state["queue"] = queue
        state["job_id"] = job_id
        state["attempts"] = attempts
        return Decoded(job=job, max_tries=max_tries, timeout=float(timeout))
