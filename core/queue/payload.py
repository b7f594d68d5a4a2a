"""Jobs to JSON payloads and back. JSON only: a payload never runs code when it is read.

A payload is one JSON object:

    {"id": "…", "job": "app.jobs.mail:SendMail", "queue": "default", "data": {…},
     "max_tries": 3, "timeout": 60, "retry_after": 0, "created_at": 1700000000000,
     "result_ttl": 500, "failure_ttl": 604800, "ttl": 30}

Durations are stored as numbers of seconds, whatever form the job gave them in ("10 minutes");
`result_ttl` and `failure_ttl` are resolved from the settings at dispatch (payloads written
before they existed lack them: the worker then uses its own settings); `ttl` is there only when
the job has one; `reply` (`{"topic", "correlation", "status_topic"}`, see `reply_info`) only
when the job's outcome is to be published over MQTT; `due_at` (epoch milliseconds) only for a
delayed job, `null` for one with dependencies (the worker measures the wait to a first start
from it, else from `created_at`); `trace` (`{"traceparent", "tracestate"}`, W3C) only when
the dispatch was traced (core/tracing.py). `attempts` is not in the payload: the
driver counts tries at reservation, so a worker that dies mid-job still spends one.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import logging
import math
import os
import pkgutil
import re
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, get_args

import orjson

from core.delays import parse_duration
from core.errors import (
    PayloadError,
    PayloadTooLargeError,
    SerializationError,
    UnknownJobError,
)
from core.functions import (
    JobFunction,
    allowed_module,
    non_finite,
    plain_job_class,
    split_path,
)
from core.job import JOB_SETTINGS, Job
from core.queue.drivers.base import MAX_PRIORITY, Limit, OnDuplicate, Overflow

__all__ = [
    "ASSIGNED_ID",
    "MAX_KEEP_SECONDS",
    "MAX_SECONDS",
    "Decoded",
    "JobLoader",
    "JobSettings",
    "LimitSettings",
    "class_path",
    "decode_envelope",
    "encode",
    "job_group",
    "job_settings",
    "job_status_topic",
    "limit_of",
    "new_job_id",
    "parse_rate",
    "reply_info",
    "topic_problem",
    "unloadable_reason",
    "validate_job_id",
    "validate_queue",
]

_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]{1,190}\Z")
_JOB_ID = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,190}\Z")
_GOOD_NAMES: set[str] = set()

logger = logging.getLogger("topiq.queue")

#: The instance attribute (private: never payload data) holding the id Topiq gave a job (at
#: dispatch, or when a worker rebuilt it), so that dispatching that object again makes a new
#: job rather than a duplicate of its own id.
ASSIGNED_ID = "_topiq_assigned_id"


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


def validate_job_id(value: Any, where: str = "job_id") -> str:
    """Return `value` if it can be a job id, else `ValueError` naming `where` and the rule."""
    if isinstance(value, str) and _JOB_ID.match(value) is not None:
        return value
    raise ValueError(f"{where} must be 1 to 190 letters, digits and _ . : @ / + = -, got {value!r}")


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


# -- what a job class allows its data to be --------------------------------------------


@dataclass(frozen=True, slots=True)
class _ClassInfo:
    names: frozenset[str]  # public names the class defines: no data key may use one
    problem: str | None  # why the class's settings cannot work, if they cannot
    loaded: frozenset[str]  # of `names`, those a stored payload's data may not use
    #: A setting named as another queue names it (Masonite's `run_times`): refused at dispatch
    #: only, so that a payload stored before this check still runs.
    renamed: str | None = None


#: Settings that were free data names before they became settings: a payload stored by an
#: earlier release may carry one as data (`priority: "high"`, an alarm level). A worker loads
#: it as data; settings are read at dispatch only, where such a value is refused by name.
_ONCE_DATA = frozenset(
    {
        "priority",
        "rate_limit",
        "burst",
        "concurrency_limit",
        "limit_key",
        "group",
        "max_queue_length",
        "overflow",
        "status_topic",
    }
)


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
        for name in JOB_SETTINGS:  # settings must be plain values on the class
            raw = inspect.getattr_static(cls, name)
            if hasattr(type(raw), "__get__"):
                problem = (
                    f"{cls.__qualname__}.{name} is {_kind(raw)} of {_owner(cls, name)}; job "
                    f"settings must be plain class attributes (`{name} = ...`); to choose one "
                    "per job, set it on the instance before dispatch"
                )
                break
        if problem is None:
            problem = _aliases_problem(cls)
        info = _CLASS_INFO[cls] = _ClassInfo(
            names, problem, names - _ONCE_DATA, _renamed_problem(cls)
        )
    return info


#: Class attributes other queues read that Topiq names differently: what each becomes.
_RENAMED = {
    "run_times": "max_tries = {value!r}",  # Masonite
    "run_again_on_fail": "max_tries = 1",  # Masonite (`run_again_on_fail = False`)
}


def _renamed_problem(cls: type[Job]) -> str | None:
    """Why dispatch refuses `cls`: it sets, on the class, a setting under another queue's
    name, which Topiq would otherwise ignore without a word (a job tried 3 times, not 5)."""
    for name, becomes in _RENAMED.items():
        if name in cls.__dict__ or any(name in base.__dict__ for base in cls.__mro__[1:-1]):
            value = inspect.getattr_static(cls, name)
            if callable(value) or hasattr(type(value), "__get__"):
                continue  # a method or property of the job's own, not a setting
            instead = f"write `{becomes.format(value=value)}` instead"
            if name == "run_again_on_fail" and value:
                instead = "remove it (`max_tries` says how often a job runs)"
            return (
                f"{cls.__qualname__}.{name} is Masonite's setting, which Topiq does not "
                f"read; {instead}"
            )
    return None


def _aliases_problem(cls: type[Job]) -> str | None:
    aliases = inspect.getattr_static(cls, "aliases", ())
    if isinstance(aliases, str) or not isinstance(aliases, list | tuple):
        return (
            f"{cls.__qualname__}.aliases must be a tuple of class paths such as "
            f"('app.jobs.old_module:OldName',), got {aliases!r}"
        )
    for alias in aliases:
        module, _, qualname = alias.partition(":") if isinstance(alias, str) else ("", "", "")
        if not module or not qualname or not all(p.isidentifier() for p in module.split(".")):
            return (
                f"{cls.__qualname__}.aliases: {alias!r} is not a class path of the form "
                "'package.module:ClassName'"
            )
    return None


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


#: The longest `result_ttl` or `failure_ttl` (10 years): longer is no longer a keep time.
MAX_KEEP_SECONDS = 3650 * 24 * 3600

_ON_DUPLICATE = get_args(OnDuplicate)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """A job's `rate_limit`, `burst`, `concurrency_limit` and `limit_key`, checked.

    `key` is the `limit_key` template; `fixed` is the `Limit` itself when the template names no
    data (built once per class), `None` when each job formats its own key.
    """

    rate: int
    period: float
    burst: int
    concurrency: int
    key: str
    fixed: Limit | None


@dataclass(frozen=True, slots=True)
class JobSettings:
    """A job's settings, checked, with durations in seconds (as numbers, the payload's form)."""

    max_tries: int
    timeout: float
    retry_after: float | list[float]
    ttl: float
    unique_key: str
    unique_for: float
    on_duplicate: OnDuplicate
    at_front: bool
    result_ttl: float | None  # None: the QUEUE_RESULT_TTL setting
    failure_ttl: float | None  # None: the QUEUE_FAILURE_TTL setting
    priority: int = 0
    limit: LimitSettings | None = None  # None: neither a rate nor a concurrency limit
    group: str = ""  # the template ("" none); `group_fixed`: it names no data
    group_fixed: bool = True
    max_queue_length: int = 0  # 0: the QUEUE_MAX_LENGTHS entry of the queue
    overflow: Overflow | None = None  # None: the QUEUE_MAX_LENGTHS entry's policy
    status_topic: str = ""  # the template ("" none); `status_fixed`: it names no data
    status_fixed: bool = True


#: The settings an instance may override; an instance setting none of them uses its class's
#: settings, checked once per class.
_OVERRIDABLE = frozenset(JOB_SETTINGS) - {"queue", "connection"}
_CLASS_SETTINGS: dict[type[Job], JobSettings] = {}


def job_settings(job: Job) -> JobSettings:
    """The settings of `job` (its class's, with what the instance overrides), checked.

    Raises:
        SerializationError: naming the setting (`Class.name`) and what is wrong with it.
    """
    cls = type(job)
    if _OVERRIDABLE.isdisjoint(job.__dict__):
        settings = _CLASS_SETTINGS.get(cls)
        if settings is None:
            settings = _CLASS_SETTINGS[cls] = _checked_settings(cls, cls)
        return settings
    return _checked_settings(cls, job)


def _checked_settings(cls: type[Job], source: Any) -> JobSettings:
    try:
        return _settings_of(source)
    except ValueError as exc:
        raise SerializationError(f"{cls.__qualname__}.{exc}") from None


def _seconds(value: Any, name: str, limit: float) -> float:
    """A duration setting in seconds (a plain number is kept as it is: int stays int)."""
    if type(value) in _PLAIN and 0 <= value <= limit:
        return value  # type: ignore[no-any-return]
    seconds = -1.0  # not a duration: refused below
    if isinstance(value, str):
        seconds = parse_duration(value, name)  # its error names the setting and the text
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif _is_number(value):
        seconds = float(value)
    if not 0 <= seconds <= limit:
        raise ValueError(
            f"{name} must be a number of seconds from 0 to {limit:.0f}{_days(limit)} or a duration "
            f"such as '90s', '10 minutes' or '1h', got {value!r}"
        )
    return seconds


def _days(limit: float) -> str:
    return f" ({limit / 86400:g} days)" if limit >= 86400 else ""


def _settings_of(source: Any) -> JobSettings:
    """The settings read from `source` (a class or an instance); `ValueError` names the bad one."""
    max_tries = source.max_tries
    if type(max_tries) is not int:
        if not (_is_number(max_tries) and float(max_tries).is_integer()):
            raise ValueError(f"max_tries must be a whole number, got {max_tries!r}")
        max_tries = int(max_tries)
    if max_tries < 1:
        raise ValueError(f"max_tries must be at least 1, got {max_tries!r}")
    timeout = _seconds(source.timeout, "timeout", MAX_SECONDS)
    raw = source.retry_after
    retry_after: float | list[float]
    if isinstance(raw, list | tuple):
        try:
            retry_after = [_seconds(delay, "retry_after", MAX_SECONDS) for delay in raw]
        except ValueError as exc:
            raise ValueError(f"{exc}; in the list {raw!r}") from None
    else:
        retry_after = _seconds(raw, "retry_after", MAX_SECONDS)
    ttl = _seconds(source.ttl, "ttl", MAX_SECONDS)
    unique_for = _seconds(source.unique_for, "unique_for", MAX_SECONDS)
    result_ttl = source.result_ttl
    if result_ttl is not None:
        result_ttl = _seconds(result_ttl, "result_ttl", MAX_KEEP_SECONDS)
    failure_ttl = source.failure_ttl
    if failure_ttl is not None:
        failure_ttl = _seconds(failure_ttl, "failure_ttl", MAX_KEEP_SECONDS)
    unique_key = source.unique_key
    if not isinstance(unique_key, str):
        raise ValueError(f"unique_key must be a string, got {unique_key!r}")
    if len(unique_key) > 190 or _CONTROL.search(unique_key):
        raise ValueError(
            f"unique_key must be at most 190 characters without control characters, got "
            f"{unique_key[:200]!r}"
        )
    on_duplicate = source.on_duplicate
    if on_duplicate not in _ON_DUPLICATE or not isinstance(on_duplicate, str):
        raise ValueError(
            f"on_duplicate must be 'reject', 'keep' or 'replace', got {on_duplicate!r}"
        )
    at_front = source.at_front
    if type(at_front) is not bool:
        raise ValueError(f"at_front must be True or False, got {at_front!r}")
    priority = check_priority(source.priority)
    limit = _limit_settings(source)
    group = source.group
    if not isinstance(group, str):
        raise ValueError(f"group must be a string template such as '{{device_id}}', got {group!r}")
    group_fixed = not _template_fields(group, "group")
    if group_fixed:
        _check_key(group, group, "group")
    max_length = source.max_queue_length
    if type(max_length) is not int or max_length < 0:
        raise ValueError(
            f"max_queue_length must be a whole number, 0 or more (0: the QUEUE_MAX_LENGTHS "
            f"setting), got {max_length!r}"
        )
    overflow = source.overflow
    if overflow is not None and (not isinstance(overflow, str) or overflow not in _OVERFLOW):
        raise ValueError(f"overflow must be 'reject', 'drop_oldest' or None, got {overflow!r}")
    status_topic = source.status_topic
    if not isinstance(status_topic, str):
        raise ValueError(
            "status_topic must be a string template such as 'devices/{device_id}/status', "
            f"got {status_topic!r}"
        )
    status_fields = _template_fields(status_topic, "status_topic")
    if status_topic and not status_fields:
        _check_topic(status_topic, status_topic)
    elif status_topic:  # the template's own text here; what the data fills in at dispatch
        literal = "".join(text for text, *_ in string.Formatter().parse(status_topic))
        if any(c in literal for c in "+#\0") or status_topic.startswith("$"):
            _check_topic(status_topic, status_topic)
    return JobSettings(
        max_tries=max_tries,
        timeout=timeout,
        retry_after=retry_after,
        ttl=ttl,
        unique_key=unique_key,
        unique_for=unique_for,
        on_duplicate=on_duplicate,  # type: ignore[arg-type]
        at_front=at_front,
        result_ttl=result_ttl,
        failure_ttl=failure_ttl,
        priority=priority,
        limit=limit,
        group=group,
        group_fixed=group_fixed,
        max_queue_length=max_length,
        overflow=overflow,  # type: ignore[arg-type]
        status_topic=status_topic,
        status_fixed=not status_fields,
    )


def check_priority(value: Any, name: str = "priority") -> int:
    """`value` if it is a usable priority, else `ValueError` naming `name`."""
    if type(value) is int and -MAX_PRIORITY <= value <= MAX_PRIORITY:
        return value
    raise ValueError(
        f"{name} must be a whole number from {-MAX_PRIORITY} to {MAX_PRIORITY} (higher runs "
        f"first), got {value!r}"
    )


#: What a rate's period may be called after "N/" (and what `parse_duration` reads after a 1).
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S.*?)\s*\Z")


def parse_rate(value: Any, name: str = "rate_limit") -> tuple[int, float]:
    """`(starts, period in seconds)` of a rate such as "100/minute", "5/s", "10/30s" or
    "3/2 minutes"; `ValueError` naming `name` if it is not one."""
    match = _RATE.match(value) if isinstance(value, str) else None
    period = 0.0
    if match is not None:
        text = match.group(2)
        try:
            period = parse_duration(text if text[0].isdigit() else f"1 {text}", name)
        except ValueError:
            period = 0.0
    if match is None or int(match.group(1)) < 1 or not 0 < period <= MAX_SECONDS:
        raise ValueError(
            f"{name} must be starts per period such as '100/minute', '5/second', '1000/hour', "
            f"'10/30s' or '3/2 minutes' (a whole number of at least 1, a period up to 30 "
            f"days), got {value!r}"
        )
    return int(match.group(1)), period


def _limit_settings(source: Any) -> LimitSettings | None:
    """The limit settings of `source`, checked (`None` when it has no limit)."""
    rate_limit, burst = source.rate_limit, source.burst
    concurrency, key = source.concurrency_limit, source.limit_key
    if type(burst) is not int or burst < 1:
        raise ValueError(f"burst must be a whole number of at least 1, got {burst!r}")
    if concurrency is not None and (type(concurrency) is not int or concurrency < 0):
        raise ValueError(
            f"concurrency_limit must be None or a whole number (0: no cap), got {concurrency!r}"
        )
    if not isinstance(key, str):
        raise ValueError(f"limit_key must be a string template, got {key!r}")
    fields = _template_fields(key)
    if rate_limit is None and not concurrency:
        return None
    rate, period = (0, 0.0) if rate_limit is None else parse_rate(rate_limit)
    fixed = None
    if not fields:
        _check_key(key, key)
        fixed = Limit(key, rate, period, burst, concurrency or 0)
    return LimitSettings(rate, period, burst, concurrency or 0, key, fixed)


_OVERFLOW = get_args(Overflow)
#: An example field for each template setting's error messages.
_EXAMPLE_FIELD = {"limit_key": "customer_id", "group": "device_id", "status_topic": "device_id"}


def _template_fields(template: str, setting: str = "limit_key") -> list[str]:
    """The names a template setting (`limit_key`, `group`, `status_topic`) takes from the
    job's data; `ValueError` naming `setting` if it is not a template."""
    example = _EXAMPLE_FIELD.get(setting, "name")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"{setting} {template!r} is not a template ({exc}); write names of the job's data "
            f"in braces, e.g. '{{{example}}}', and double a literal brace ('{{{{')"
        ) from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not name.isidentifier():
            raise ValueError(
                f"{setting} {template!r}: each {{...}} must name a data attribute of the job, "
                f"e.g. '{{{example}}}', got {{{field}}}"
            )
        names.append(name)
    return names


def _check_key(key: str, template: str, setting: str = "limit_key") -> str:
    if len(key) > 190 or _CONTROL.search(key):
        shown = "" if key == template else f" (from {template!r})"
        raise ValueError(
            f"{setting} must be at most 190 characters without control characters, got "
            f"{key[:200]!r}{shown}"
        )
    return key


def topic_problem(topic: str) -> str:
    """Why `topic` cannot be published to ("" when it can): empty, a wildcard, a NUL, a
    leading `$` (the broker's own topics) or over 65535 bytes."""
    if not topic:
        return "it is empty"
    if "+" in topic or "#" in topic:
        return "a topic to publish to cannot hold the wildcards '+' or '#'"
    if "\0" in topic:
        return "it holds a NUL character"
    if topic.startswith("$"):
        return "topics starting with '$' are the broker's own"
    if len(topic) > 16383 and len(topic.encode()) > 65535:
        return "it is longer than 65535 bytes"
    return ""


def _check_topic(topic: str, template: str) -> str:
    problem = topic_problem(topic)
    if problem:
        shown = f"{template[:200]!r}"
        if topic != template:
            shown = f"{topic[:200]!r} (from {template[:200]!r})"
        raise ValueError(f"status_topic {shown} is not an MQTT topic: {problem}")
    return topic


def _render(job: Job, template: str, setting: str) -> str:
    """`template` formatted with `job`'s data; `SerializationError` naming `Class.setting`."""
    cls = type(job)
    data = {k: v for k, v in job.__dict__.items() if k[0] != "_"}
    try:
        return template.format_map(data)
    except KeyError as exc:
        known = ", ".join(sorted(data)) or "none"
        raise SerializationError(
            f"{cls.__qualname__}.{setting} {template!r} names {exc.args[0]!r}, which this job "
            f"has no data attribute of (its attributes: {known})"
        ) from None
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise SerializationError(
            f"{cls.__qualname__}.{setting} {template!r} cannot be filled from the job's data: {exc}"
        ) from None


def job_group(job: Job, settings: JobSettings) -> str:
    """The group a dispatch of `job` runs in ("" for none), its template formatted with the
    job's data; `SerializationError` naming `Class.group` if it cannot be."""
    template = settings.group
    if settings.group_fixed:
        return template
    group = _render(job, template, "group")
    if not group:  # "no group" only by leaving the attribute empty, never from the data
        raise SerializationError(
            f"{type(job).__qualname__}.group {template!r} rendered an empty group from the "
            "job's data: give the job the value it names"
        )
    try:
        return _check_key(group, template, "group")
    except ValueError as exc:
        raise SerializationError(f"{type(job).__qualname__}.{exc}") from None


def job_status_topic(job: Job, settings: JobSettings) -> str:
    """The topic `job`'s outcome is published to ("" for none), formatted with its data;
    `SerializationError` naming `Class.status_topic` if it cannot be or is not a topic."""
    template = settings.status_topic
    if settings.status_fixed:
        return template
    topic = _render(job, template, "status_topic")
    try:
        return _check_topic(topic, template)
    except ValueError as exc:
        raise SerializationError(f"{type(job).__qualname__}.{exc}") from None


def reply_info(
    topic: str = "", correlation: bytes | None = None, status_topic: str = ""
) -> dict[str, str] | None:
    """The payload's `"reply"` value: where the job's outcome is published when it ends.

    `{"topic": <response topic>, "correlation": <base64 of the correlation data>,
    "status_topic": <status topic>}`, each key only when non-empty; `None` when all are.
    """
    if not (topic or status_topic):
        return None
    reply: dict[str, str] = {}
    if topic:
        reply["topic"] = topic
        if correlation:
            reply["correlation"] = base64.b64encode(correlation).decode("ascii")
    if status_topic:
        reply["status_topic"] = status_topic
    return reply


def limit_of(job: Job, settings: JobSettings) -> Limit | None:
    """The `Limit` a dispatch of `job` counts against (its key formatted from its data), or
    `None`; `SerializationError` naming `limit_key` if the template cannot be filled."""
    spec = settings.limit
    if spec is None:
        return None
    if spec.fixed is not None:
        return spec.fixed
    cls = type(job)
    key = _render(job, spec.key, "limit_key")
    try:
        _check_key(key, spec.key)
    except ValueError as exc:
        raise SerializationError(f"{cls.__qualname__}.{exc}") from None
    return Limit(key, spec.rate, spec.period, spec.burst, spec.concurrency)


_CLASS_PATHS: dict[type, str] = {}


def class_path(cls: type) -> str:
    """`module:QualName` of a class: what its payloads name."""
    path = _CLASS_PATHS.get(cls)
    if path is None:
        path = _CLASS_PATHS[cls] = f"{cls.__module__}:{cls.__qualname__}"
    return path


def encode(
    job: Job,
    *,
    job_id: str,
    queue: str,
    max_bytes: int,
    settings: JobSettings | None = None,
    result_ttl: float = 500.0,
    failure_ttl: float = 604800.0,
    reply: dict[str, str] | None = None,
    delay: float = 0.0,
    deferred: bool = False,
    trace: dict[str, str] | None = None,
) -> bytes:
    """The payload for `job`, or `SerializationError` naming the attribute it cannot carry.

    `settings` are the job's checked settings (`job_settings(job)` if not given); `result_ttl`
    and `failure_ttl` are the connection's defaults, written when the job sets none. `reply`
    (`reply_info(...)`) is written as the payload's `"reply"` key: where the worker publishes
    the job's outcome when it ends. `delay` (seconds) and `deferred` (it has dependencies)
    write `due_at`: when the job falls due, or `null` when that is not known at dispatch.
    `trace` (`tracing.carrier(...)`) is written as `"trace"`.
    """
    cls = type(job)
    info = _class_info(cls)
    if info.problem is not None:
        raise SerializationError(info.problem)
    if info.renamed is not None:
        raise SerializationError(info.renamed)
    data = cls.data(job)  # the class's method: an instance attribute named `data` cannot stand in
    if not info.names.isdisjoint(data):
        raise SerializationError(
            f"{cls.__qualname__} cannot be dispatched: "
            + "; ".join(_clashes(cls, info.names, data))
            + ". Instance attributes named like something the class defines (a method, a "
            "property, a class attribute) cannot carry job data: rename them"
        )
    if settings is None:
        settings = job_settings(job)
    envelope: dict[str, Any] = {
        "id": job_id,
        "job": class_path(cls),
        "queue": queue,
        "data": data,
        "max_tries": settings.max_tries,
        "timeout": settings.timeout,
        "retry_after": settings.retry_after,
        "created_at": int(time.time() * 1000),
        "result_ttl": result_ttl if settings.result_ttl is None else settings.result_ttl,
        "failure_ttl": failure_ttl if settings.failure_ttl is None else settings.failure_ttl,
    }
    if settings.ttl:
        envelope["ttl"] = settings.ttl
    if deferred:
        envelope["due_at"] = None
    elif delay > 0:
        envelope["due_at"] = envelope["created_at"] + int(delay * 1000)
    if reply:
        envelope["reply"] = reply
    if trace:  # the dispatch span's W3C context (core/tracing.py)
        envelope["trace"] = trace
    state = job.__dict__
    if not _EXTRA_KEYS.isdisjoint(state):  # set by the dispatch layers (or a step)
        for key, field in _EXTRAS:
            if key in state:
                envelope[field] = state[key]
        if "step" in envelope:
            problem = step_problem(envelope["step"], cls)
            if problem is not None:
                raise SerializationError(f"{cls.__qualname__} cannot be dispatched: {problem}")
    try:
        raw = orjson.dumps(envelope, default=_refuse, option=_DUMP_OPTIONS)
    except TypeError as exc:
        raise _explain(cls, data, exc) from None
    if b"null" in raw:  # JSON writes NaN and Infinity as null: find any (rare, so only then)
        _refuse_non_finite(cls, data, envelope)
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(
            f"{cls.__qualname__} payload is {len(raw)} bytes, over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); pass a reference (an id, a path) instead of the data"
        )
    return raw


def _refuse_non_finite(cls: type[Job], data: dict[str, Any], envelope: dict[str, Any]) -> None:
    name = cls.__qualname__
    found = None
    for attr, value in data.items():
        found = non_finite(value, f"{name}.{attr}")
        if found is not None:
            break
    for field in ("handle_args", "meta"):
        if found is None and field in envelope:
            found = non_finite(envelope[field], f"{name} {field}")
    if found is not None:
        raise SerializationError(
            f"{found} is NaN or infinite, which JSON cannot hold (it would arrive as None): "
            "send a finite number, None or a string"
        )


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


_allowed = allowed_module


def unloadable_reason(cls: type, allowed_modules: Sequence[str]) -> str | None:
    """Why no worker could import `cls` by the name its payloads give, or `None` if one can.

    A worker imports `module:QualName` from a module under `allowed_modules`: a class defined
    in `__main__` (the script being run), inside a function, or in another module cannot be.
    """
    module, qualname = cls.__module__, cls.__qualname__
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
    what = "class"
    if getattr(cls, "_job_function", None) is not None:  # a @job function's generated class
        what = "function"
    move = f"move the {what} into a module under app/ (e.g. app/jobs/{snake}.py) and import it"
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
        if _job_class(target) is not cls:
            return (
                f"{module}:{qualname} does not name this {what} (was it created or replaced at "
                f"run time?): define the job {what} once, at module level"
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
    """A job rebuilt from its payload, with the limits it was dispatched with.

    `result_ttl` and `failure_ttl` are `None` when the payload predates them (the worker then
    uses its own settings). `since` is when the job's wait began (`wait_since`).
    """

    job: Job
    max_tries: int
    timeout: float
    result_ttl: float | None = None
    failure_ttl: float | None = None
    since: float | None = None


def wait_since(envelope: dict[str, Any]) -> float | None:
    """When a job began to wait for its first try (epoch seconds): its `due_at` for a delayed
    job, else its `created_at`; `None` when not known (a job with dependencies, a payload that
    does not say)."""
    since = envelope["due_at"] if "due_at" in envelope else envelope.get("created_at")
    if isinstance(since, bool) or not isinstance(since, int | float) or since != since:
        return None
    return since / 1000


def _job_class(target: Any) -> type[Job] | None:
    """The `Job` class an imported name stands for: a class, or a `@job` function's class."""
    if isinstance(target, type) and issubclass(target, Job):
        return target
    if isinstance(target, JobFunction):
        return target.job_class
    if inspect.isfunction(target):  # a plain function: by the loader's strict rule
        return plain_job_class(target.__module__, target.__qualname__, target)
    return None


def _declaring(path: str) -> list[type[Job]]:
    """Every imported `Job` class that lists `path` in its `aliases`."""
    found: list[type[Job]] = []
    seen: set[type[Job]] = set()
    stack = list(Job.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        aliases = inspect.getattr_static(cls, "aliases", ())
        if isinstance(aliases, list | tuple) and path in aliases:
            found.append(cls)
    return found


def _jobs_package(prefix: str) -> str | None:
    """The package whose modules may hold job classes for an allowed-modules prefix:
    `app.` → `app.jobs`; `app.jobs.` → `app.jobs`; `""` (anything) → none."""
    package = prefix.rstrip(".")
    if not package:
        return None
    return package if package.rpartition(".")[2] == "jobs" else f"{package}.jobs"


class JobLoader:
    """Turns payloads back into jobs, importing only `Job` subclasses under allowed modules.

    A class path that cannot be imported is looked up among the `aliases` of the job classes
    imported so far; failing that, the modules of each allowed package's `jobs` package (for
    `app.`: `app.jobs.*`) are imported, once, and the aliases looked at again.
    """

    def __init__(self, allowed_modules: Sequence[str]) -> None:
        self._allowed = tuple(allowed_modules)
        self._classes: dict[str, type[Job]] = {}
        self._scanned = False

    def allowed(self, module: str) -> bool:
        return _allowed(module, self._allowed)

    def resolve(self, path: str) -> type[Job]:
        """The class named `module:QualName` (or declaring it as an alias), or
        `UnknownJobError`."""
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
            found = self._alias(path)
            if found is None:
                raise UnknownJobError(
                    f"job class {path!r} cannot be imported, and no job class declares it in "
                    f"its `aliases`: {exc!r}"
                ) from exc
            cls = found
        else:
            if inspect.isfunction(target) or inspect.isroutine(target):
                found = plain_job_class(module_name, qualname, target)
                if found is None:
                    raise UnknownJobError(f"{path!r}: {_function_refusal(target, path)}")
            else:
                found = _job_class(target)
            if found is None:
                raise UnknownJobError(
                    f"{path!r} is not a subclass of core.job.Job, a @job function, nor a plain "
                    "function defined at module level in that module"
                )
            cls = found
        self._classes[path] = cls
        return cls

    def _alias(self, path: str) -> type[Job] | None:
        found = self._allowed_only(_declaring(path))
        if not found and not self._scanned:
            self._scanned = True
            self._import_job_modules()
            found = self._allowed_only(_declaring(path))
        if len(found) > 1:
            names = ", ".join(sorted(class_path(cls) for cls in found))
            raise UnknownJobError(
                f"job class {path!r} is declared as an alias by more than one class ({names}): "
                "keep it in one class's `aliases`"
            )
        return found[0] if found else None

    def _allowed_only(self, classes: list[type[Job]]) -> list[type[Job]]:
        return [cls for cls in classes if self.allowed(cls.__module__)]

    def _import_job_modules(self) -> None:
        """Import every module of the allowed packages' `jobs` packages (once per loader)."""
        for prefix in self._allowed:
            package = _jobs_package(prefix)
            if package is None:
                continue
            try:
                module = importlib.import_module(package)
            except Exception as exc:
                if not isinstance(exc, ModuleNotFoundError) or exc.name not in (
                    package,
                    package.rpartition(".")[0],
                ):
                    logger.warning("job aliases: cannot import %s: %r", package, exc)
                continue
            for info in pkgutil.walk_packages(
                getattr(module, "__path__", []), prefix=f"{package}.", onerror=lambda _: None
            ):
                try:
                    importlib.import_module(info.name)
                except Exception as exc:
                    logger.warning("job aliases: cannot import %s: %r", info.name, exc)

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
        clash = not info.loaded.isdisjoint(data)
        if not clash:
            for key in data:
                if key.startswith("_"):
                    clash = True
                    break
        if clash:
            raise PayloadError(
                f"{path}: payload data may only set data attributes, but "
                + "; ".join(_clashes(cls, info.loaded, data))
            )
        if getattr(cls, "_job_function", None) is not None and not (
            isinstance(data.get("args"), list)
            and isinstance(data.get("kwargs"), dict)
            and len(data) == 2
        ):
            raise PayloadError(
                f"{path}: a @job function's payload data must be exactly "
                '{"args": [...], "kwargs": {...}}, got keys ' + ", ".join(sorted(data)[:5])
            )
        defaults = _CLASS_SETTINGS.get(cls)
        if defaults is None:
            # Checked once per class, as at dispatch (a worker rarely dispatches what it runs).
            try:
                defaults = _CLASS_SETTINGS[cls] = _settings_of(cls)
            except ValueError as exc:
                raise PayloadError(f"{path}: {cls.__qualname__}.{exc}") from None
        try:
            max_tries, timeout, retry_after = _limits(
                envelope.get("max_tries", defaults.max_tries),
                envelope.get("timeout", defaults.timeout),
                envelope.get("retry_after", defaults.retry_after),
            )
            result_ttl = _kept_for(envelope, "result_ttl")
            failure_ttl = _kept_for(envelope, "failure_ttl")
            ttl = _kept_for(envelope, "ttl", MAX_SECONDS)
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
        if ttl is not None and ttl != cls.ttl:
            state["ttl"] = ttl
        if result_ttl is not None and result_ttl != cls.result_ttl:
            state["result_ttl"] = result_ttl
        if failure_ttl is not None and failure_ttl != cls.failure_ttl:
            state["failure_ttl"] = failure_ttl
        state["job_id"] = job_id
        state[ASSIGNED_ID] = job_id  # given, not chosen: dispatching this job again is a new job
        state["attempts"] = attempts
        trace = envelope.get("trace")
        if trace is not None:  # checked by core/tracing.py when the try starts, if it traces
            state["_topiq_trace"] = trace
        if not _EXTRA_FIELDS.isdisjoint(envelope):
            for key, field in _EXTRAS:
                if field in envelope:
                    state[key] = _checked_extra(field, envelope[field], cls, self._allowed)
        return Decoded(
            job=job,
            max_tries=max_tries,
            timeout=float(timeout),
            result_ttl=None if result_ttl is None else float(result_ttl),
            failure_ttl=None if failure_ttl is None else float(failure_ttl),
            since=wait_since(envelope),
        )


#: The envelope's optional fields set by the seed systems' calling conventions: (instance state
#: key, envelope key). Copied by `encode` when the instance holds the key; checked and written
#: back by the loader.
_EXTRAS = (
    ("_topiq_args", "handle_args"),
    ("_topiq_step", "step"),
    ("_topiq_description", "description"),
    ("_topiq_meta", "meta"),
    ("_topiq_callbacks", "callbacks"),
)
_EXTRA_KEYS = frozenset(key for key, _ in _EXTRAS)
_EXTRA_FIELDS = frozenset(field for _, field in _EXTRAS)
#: The longest `description` a payload may carry.
MAX_DESCRIPTION = 1000
CALLBACK_KINDS = ("success", "failure", "stopped")


def _checked_extra(field: str, value: Any, cls: type[Job], allowed: Sequence[str]) -> Any:
    """An optional envelope field's value if it has the shape it must, else `PayloadError`
    naming the field and what is wrong."""
    path = class_path(cls)
    if field == "handle_args":
        if not isinstance(value, list):
            raise PayloadError(
                f"{path}: payload field 'handle_args' must be a list, got {type(value).__name__}"
            )
        if getattr(cls, "_job_function", None) is not None:
            raise PayloadError(
                f"{path}: payload field 'handle_args' is for job classes; a function job's "
                "arguments are in its data"
            )
        return value
    if field == "step":
        problem = step_problem(value, cls)
        if problem is not None:
            raise PayloadError(f"{path}: payload field {problem}")
        return value
    if field == "description":
        if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
            raise PayloadError(
                f"{path}: payload field 'description' must be a string of at most "
                f"{MAX_DESCRIPTION} characters, got {_short(value)}"
            )
        return value
    if field == "meta":
        if not isinstance(value, dict):
            raise PayloadError(
                f"{path}: payload field 'meta' must be an object, got {type(value).__name__}"
            )
        return value
    problem = callbacks_problem(value, allowed)
    if problem is not None:
        raise PayloadError(f"{path}: payload field {problem}")
    return value


def step_problem(value: Any, cls: type[Job]) -> str | None:
    """Why `value` is not a `step` of a job of `cls` (`None` if it is): the index of the next
    of `cls.steps` to run, 0 up to the number of steps (that number: every step has run and
    its checkpoint was saved). A class without steps takes none."""
    if type(value) is not int or value < 0:
        return f"'step' must be a whole number, 0 or more, got {_short(value)}"
    steps = cls.steps
    count = len(steps) if isinstance(steps, Sequence) and not isinstance(steps, str) else 0
    if not count:
        return f"'step' is {value}, but {cls.__qualname__} has no steps"
    if value > count:
        return f"'step' {value} is past the last step ({cls.__qualname__} has {count} steps)"
    return None


def callbacks_problem(value: Any, allowed: Sequence[str]) -> str | None:
    """Why `value` is not a payload's `callbacks` field (`None` if it is): an object of
    `{"success"|"failure"|"stopped": {"path": "pkg.mod.func", "timeout": seconds}}` with paths
    in `allowed` modules and timeouts over 0 and at most `MAX_SECONDS`."""
    if not isinstance(value, dict):
        return f"'callbacks' must be an object, got {type(value).__name__}"
    for kind, spec in value.items():
        if kind not in CALLBACK_KINDS:
            return f"'callbacks' has an unknown kind {_short(kind)}: known are " + ", ".join(
                CALLBACK_KINDS
            )
        where = f"callbacks.{kind}"
        if not isinstance(spec, dict) or set(spec) - {"path", "timeout"}:
            return f"'{where}' must be an object of 'path' and 'timeout', got {_short(spec)}"
        target = spec.get("path")
        if not isinstance(target, str):
            return f"'{where}.path' must be a string, got {_short(target)}"
        try:
            module, _ = split_path(target, f"'{where}.path'")
        except ValueError as exc:
            return str(exc)
        if not _allowed(module, allowed):
            return (
                f"'{where}.path' {target!r} is outside the allowed modules "
                f"({', '.join(allowed) or 'none'}; QUEUE_ALLOWED_MODULES)"
            )
        timeout = spec.get("timeout", 60)
        if not (_is_number(timeout) and 0 < timeout <= MAX_SECONDS):
            return (
                f"'{where}.timeout' must be a number of seconds over 0 and at most {MAX_SECONDS}, "
                f"got {_short(timeout)}"
            )
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _function_refusal(target: Any, path: str) -> str:
    """Why a payload naming `target` (a routine) at `path` is refused."""
    module, _, qualname = path.partition(":")
    if not inspect.isfunction(target):
        return (
            f"it names the builtin {getattr(target, '__qualname__', target)!r}, not a function "
            f"defined in {module}"
        )
    if target.__module__ != module or target.__qualname__ != qualname:
        return (
            f"it names {target.__module__}:{target.__qualname__}, which is not defined in "
            f"{module} under that name; only functions defined at module level in an allowed "
            "module run as jobs"
        )
    return "only plain functions defined at module level run as jobs (not lambdas or methods)"


def _kept_for(envelope: dict[str, Any], name: str, limit: float = MAX_KEEP_SECONDS) -> Any:
    """A seconds field of the payload (`None` if absent); `ValueError` if it is not one."""
    value = envelope.get(name)
    if value is None:
        return None
    if not (_is_number(value) and 0 <= value <= limit):
        raise ValueError(f"{name} must be a number of seconds from 0 to {limit:.0f}, got {value!r}")
    return value
