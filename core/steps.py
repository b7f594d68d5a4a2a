"""What a job class asks of a try beyond `handle()`: multi-step jobs and the per-class hooks
(django-db-queue's `steps`, `pre_task_hook`, `post_task_hook`, `failure_hook`), and which form
of `failed()` it implements (Masonite's `failed(self, payload, error)`).

Read once per class (`plan_of`), never per job: the answer for a class that uses none of it
(`ClassPlan.plain`) keeps its tries on the worker's hot path. `core.execution` runs what the
plan says; this module only resolves it, and writes a step job's checkpoint payload.

The state keys below are written on a job instance by the payload's decoder (or by the
dispatch layers before `push`); their names start with `_`, so they never reach `data()`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from core.errors import PayloadTooLargeError, SerializationError

if TYPE_CHECKING:
    from core.job import Job

__all__ = [
    "ARGS",
    "CALLBACKS",
    "DESCRIPTION",
    "EXTRAS",
    "META",
    "PLANS",
    "POST_DUE",
    "STEP",
    "Call",
    "ClassPlan",
    "checkpoint_payload",
    "envelope_info",
    "failed_payload",
    "plan_of",
    "resolve_path",
]

#: Positional arguments of `handle(*args)` (Masonite's `push(JobClass, args=[...])`).
ARGS = "_topiq_args"
#: The index of the next step of a multi-step job (absent: 0).
STEP = "_topiq_step"
#: RQ's `description` and `meta`.
DESCRIPTION = "_topiq_description"
META = "_topiq_meta"
#: RQ's callbacks: `{"success" | "failure" | "stopped": {"path": ..., "timeout": ...}}`.
CALLBACKS = "_topiq_callbacks"
#: Set on the job while its post-task hook is owed for a step that raised (run after the
#: try's failure handling).
POST_DUE = "_topiq_post_due"

#: Any of these on a job takes its try off the hot path.
EXTRAS = frozenset((ARGS, STEP, DESCRIPTION, META, CALLBACKS))

_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


@dataclass(frozen=True, slots=True)
class Call:
    """A step or hook, resolved: `fn(job, ...)`; `name` says which, in errors and logs."""

    fn: Callable[..., Any]
    is_async: bool
    name: str


@dataclass(frozen=True, slots=True)
class ClassPlan:
    """What a job class asks of its tries, read once per class."""

    steps: tuple[Call, ...] = ()
    pre: Call | None = None
    post: Call | None = None
    failure: Call | None = None
    #: `failed(self, payload, error)` (Masonite) rather than `failed(self, exception)`.
    failed_takes_payload: bool = False
    #: A step or hook that cannot be resolved: every try of the class fails with it.
    problem: str | None = None
    #: Nothing of the above that changes a try (the hot path).
    plain: bool = True


#: Each job class's plan, read once (`plan_of`).
PLANS: dict[type, ClassPlan] = {}
_PLAIN = ClassPlan()


def plan_of(cls: type[Job], allowed: Sequence[str] = ("",)) -> ClassPlan:
    """The class's plan (cached per class). `allowed`: the modules a dotted path may name."""
    plan = PLANS.get(cls)
    if plan is None:
        plan = PLANS[cls] = _read_plan(cls, allowed)
    return plan


def _read_plan(cls: type[Job], allowed: Sequence[str]) -> ClassPlan:
    from core.job import Job

    takes_payload = _failed_takes_payload(cls, Job)
    raw_steps = cls.steps
    hooks = (cls.pre_task_hook, cls.post_task_hook, cls.failure_hook)
    if not raw_steps and hooks == (None, None, None):
        return ClassPlan(failed_takes_payload=True) if takes_payload else _PLAIN
    try:
        if isinstance(raw_steps, str) or not isinstance(raw_steps, Sequence):
            raise ValueError(
                f"{cls.__qualname__}.steps must be a list of step names or functions, "
                f"got {type(raw_steps).__name__}"
            )
        steps = tuple(
            _resolve(cls, value, f"steps[{index}]", allowed)
            for index, value in enumerate(raw_steps)
        )
        pre, post, failure = (
            None if value is None else _resolve(cls, value, name, allowed)
            for value, name in zip(
                hooks, ("pre_task_hook", "post_task_hook", "failure_hook"), strict=True
            )
        )
    except ValueError as exc:
        return ClassPlan(failed_takes_payload=takes_payload, problem=str(exc), plain=False)
    plain = not steps and pre is None and post is None
    return ClassPlan(steps, pre, post, failure, takes_payload, None, plain)


def _failed_takes_payload(cls: type[Job], base: type[Job]) -> bool:
    failed = cls.failed
    if failed is base.failed:
        return False
    try:
        parameters = inspect.signature(failed).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 3  # self, payload, error


def _resolve(cls: type[Job], value: Any, name: str, allowed: Sequence[str]) -> Call:
    """A step or hook of `cls`: a method name, a function, or a dotted path."""
    where = f"{cls.__qualname__}.{name}"
    if isinstance(value, str):
        if "." not in value and ":" not in value:
            fn = getattr(cls, value, None)
            if not callable(fn):
                raise ValueError(f"{where}: {value!r} is not a method of {cls.__qualname__}")
            return Call(fn, inspect.iscoroutinefunction(fn), f"{name} {value}")
        try:
            fn = resolve_path(value, allowed)
        except Exception as exc:
            raise ValueError(f"{where}: {exc}") from None
        return Call(fn, inspect.iscoroutinefunction(fn), f"{name} {value}")
    if callable(value):
        label = getattr(value, "__qualname__", repr(value))
        return Call(value, inspect.iscoroutinefunction(value), f"{name} {label}")
    raise ValueError(
        f"{where} must be a method name, a function or a dotted path, got {type(value).__name__}"
    )


def resolve_path(path: str, allowed: Sequence[str]) -> Callable[..., Any]:
    """The module-level function `"pkg.mod.func"` or `"pkg.mod:func"` names, in an allowed
    module (`core.functions.resolve_function`: the rules callbacks given at dispatch follow);
    an error naming what is wrong otherwise."""
    from core.functions import resolve_function

    return resolve_function(path, allowed)


def checkpoint_payload(job: Job, raw: bytes, max_bytes: int) -> bytes:
    """The payload `raw` with the job's data (its workspace included), next step and meta as
    they are now: what a step job saves after each step."""
    envelope = orjson.loads(raw)
    state = job.__dict__
    data = type(job).data(job)
    envelope["data"] = data
    envelope["step"] = state.get(STEP, 0)
    if META in state:
        envelope["meta"] = state[META]
    name = type(job).__qualname__
    try:
        out = orjson.dumps(envelope, default=_refuse, option=_DUMP_OPTIONS)
    except TypeError as exc:
        bad = next((key for key, value in data.items() if not _is_json(value)), None)
        what = f"{name}.{bad}" if bad else name
        raise SerializationError(
            f"{what} cannot be saved as JSON after step {envelope['step']} ({exc}); a step "
            "job's data and workspace must be str, int, float, bool, None, lists and dicts"
        ) from None
    if len(out) > max_bytes:
        raise PayloadTooLargeError(
            f"{name}: its payload after step {envelope['step']} is {len(out)} bytes, over the "
            f"limit of {max_bytes} (QUEUE_MAX_PAYLOAD_BYTES); keep references in the workspace"
        )
    return out


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _is_json(value: Any) -> bool:
    try:
        orjson.dumps(value, default=_refuse, option=_DUMP_OPTIONS)
    except TypeError:
        return False
    return True


def envelope_info(envelope: dict[str, Any]) -> bytes | None:
    """`Outcome.info` read from a payload's envelope (a job cancelled before it was loaded)."""
    info = {key: envelope[key] for key in ("description", "meta") if key in envelope}
    return orjson.dumps(info) if info else None


def failed_payload(job: Job, raw: bytes | None, queue: str | None) -> dict[str, Any]:
    """Masonite's `payload` argument of `failed(self, payload, error)`."""
    created = None
    if raw is not None:
        try:
            at = orjson.loads(raw).get("created_at")
            if isinstance(at, int | float) and not isinstance(at, bool):
                created = datetime.fromtimestamp(at / 1000, UTC).isoformat()
        except (orjson.JSONDecodeError, AttributeError, ValueError, OverflowError):
            created = None
    return {
        "obj": type(job),
        "args": tuple(job.__dict__.get(ARGS) or ()),
        "callback": "handle",
        "created": created,
        "ran": job.attempts,
        "id": job.job_id,
        "queue": queue if queue is not None else job.queue,
        "data": type(job).data(job),
    }
