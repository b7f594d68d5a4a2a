"""Functions as jobs: `@job(...)` on a plain or coroutine function.

    from core.job import job

    @job(queue="mail", max_tries=5, timeout="2 minutes")
    async def send_mail(to: str, subject: str) -> str:
        ...
        return message_id

    handle = await send_mail.dispatch("a@example.com", subject="Hi")
    await send_mail.later("10 minutes", "b@example.com", subject="Later")
    await send_mail.options(job_id="welcome-42", at_front=True).dispatch("c@example.com", "Hi")
    message_id = await send_mail("d@example.com", "Now")  # still an ordinary call

The decorator builds a `Job` subclass named after the function (same module and qualified name,
so payloads name `module:function`, and workers find it by that name); its data is the call's
arguments, which must be JSON (checked at dispatch, naming the argument); its result is the
function's return value. A plain `def` runs in the worker's threads, as a sync `handle` does.
The same allow-list rules as for classes apply: the function must live at module level, in a
module under `QUEUE_ALLOWED_MODULES`.

This module imports nothing of `core.job` at import time (`core.job` re-exports `job` from
here), so either can be imported first.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import orjson

from core.errors import SerializationError

if TYPE_CHECKING:
    from core.delays import Delay
    from core.job import Job
    from core.queue.handle import JobHandle

__all__ = ["JobCall", "JobFunction", "job"]

P = ParamSpec("P")
R = TypeVar("R")

#: The `Job` settings `@job(...)` accepts (set on the generated class).
OPTIONS = frozenset(
    {
        "queue",
        "max_tries",
        "timeout",
        "retry_after",
        "connection",
        "unique_key",
        "unique_for",
        "on_duplicate",
        "at_front",
        "ttl",
        "result_ttl",
        "failure_ttl",
        "aliases",
        "priority",
        "rate_limit",
        "burst",
        "concurrency_limit",
        "limit_key",
    }
)
#: What `.options(...)` passes to the push itself rather than setting on the job.
_PUSH_OPTIONS = ("job_id", "delay", "depends_on", "allow_dependency_failure")
#: What `.options(...)` accepts besides the settings (`aliases` is a class matter).
_CALL_OPTIONS = frozenset(_PUSH_OPTIONS) | (OPTIONS - {"aliases", "queue", "connection"})
_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


@functools.cache
def _bases() -> tuple[type[Job], type[Job]]:
    """The classes every generated job class derives from: (for coroutine functions, for
    plain functions). Built on first use, so that this module needs `core.job` only then."""
    from core.job import Job

    class AsyncFunctionJob(Job):
        """A job that calls a coroutine function with the arguments it was dispatched with."""

        args: list[Any]
        kwargs: dict[str, Any]
        _job_function: Callable[..., Any]

        async def handle(self) -> Any:
            return await type(self)._job_function(*self.args, **self.kwargs)

    class SyncFunctionJob(Job):
        """A job that calls a plain function (in a worker thread) with its arguments."""

        args: list[Any]
        kwargs: dict[str, Any]
        _job_function: Callable[..., Any]

        def handle(self) -> Any:
            return type(self)._job_function(*self.args, **self.kwargs)

    for base in (AsyncFunctionJob, SyncFunctionJob):
        base.__module__ = __name__
    return AsyncFunctionJob, SyncFunctionJob


class JobFunction(Generic[P, R]):
    """A function decorated with `@job`: callable as before, and dispatchable as a job.

    `job_class` is the generated `Job` subclass; `make(*args, **kwargs)` builds one job of it.
    """

    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(self, function: Callable[P, R], options: dict[str, Any]) -> None:
        if not inspect.isfunction(function):
            raise TypeError(
                f"@job decorates functions (def or async def), got {type(function).__name__}"
            )
        self.function = function
        self._signature = inspect.signature(function)
        async_base, sync_base = _bases()
        base = async_base if inspect.iscoroutinefunction(function) else sync_base
        namespace: dict[str, Any] = {
            "__module__": function.__module__,
            "__qualname__": function.__qualname__,
            "__doc__": function.__doc__,
            "_job_function": staticmethod(function),
        }
        namespace.update(options)
        if "aliases" in namespace:
            namespace["aliases"] = tuple(namespace["aliases"])
        self.job_class: type[Job] = type(function.__name__, (base,), namespace)
        functools.update_wrapper(self, function)
        _check_class(self.job_class)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function itself, here and now (no queue involved)."""
        function: Callable[P, R] = self.function
        return function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<job function {self.function.__module__}:{self.function.__qualname__}>"

    def make(self, *args: Any, **kwargs: Any) -> Job:
        """One job of this function, for these arguments (checked against its signature and
        for JSON, naming the argument)."""
        name = self.function.__qualname__
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{name}() cannot be dispatched with these arguments: {exc}") from None
        try:
            orjson.dumps((args, kwargs), default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as exc:
            raise _explain(name, bound.arguments, exc) from None
        job = self.job_class()
        state = job.__dict__
        state["args"] = list(args)
        state["kwargs"] = kwargs
        return job

    async def dispatch(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Queue a call of the function with these arguments; returns its handle."""
        from core.queue.queue_manager import queue

        return await queue.push(self.make(*args, **kwargs))

    async def later(self, delay: Delay, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Queue a call of the function to run after `delay` (seconds, "10 minutes", ...)."""
        from core.queue.queue_manager import queue

        return await queue.later(delay, self.make(*args, **kwargs))

    def options(self, **options: Any) -> JobCall[P]:
        """Per-dispatch choices: `job_id`, `delay`, `depends_on`, `allow_dependency_failure`,
        and any job setting but `queue`, `connection` and `aliases` (`timeout=`,
        `unique_key=`, `at_front=`, `priority=`, ...)."""
        unknown = sorted(set(options) - _CALL_OPTIONS)
        if unknown:
            raise TypeError(
                f"{self.function.__qualname__}.options() got unknown option(s) "
                f"{', '.join(unknown)}; known: {', '.join(sorted(_CALL_OPTIONS))}"
            )
        return JobCall(self, options)


class JobCall(Generic[P]):
    """A `JobFunction` with per-dispatch options (`fn.options(job_id=...)`)."""

    def __init__(self, function: JobFunction[P, Any], options: dict[str, Any]) -> None:
        self._function = function
        self._push: dict[str, Any] = {k: options[k] for k in _PUSH_OPTIONS if k in options}
        self._settings = {k: v for k, v in options.items() if k not in _PUSH_OPTIONS}

    def make(self, *args: Any, **kwargs: Any) -> Job:
        job = self._function.make(*args, **kwargs)
        job.__dict__.update(self._settings)  # instance settings, checked at dispatch
        return job

    async def dispatch(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        from core.queue.queue_manager import queue

        return await queue.push(self.make(*args, **kwargs), **self._push)

    async def later(self, delay: Delay, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        from core.queue.queue_manager import queue

        push: dict[str, Any] = {**self._push, "delay": delay}
        return await queue.push(self.make(*args, **kwargs), **push)


def _explain(name: str, arguments: dict[str, Any], exc: TypeError) -> SerializationError:
    """Which argument cannot be stored as JSON."""
    for arg, value in arguments.items():
        try:
            orjson.dumps(value, default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as inner:
            return SerializationError(
                f"{name}() argument {arg!r} cannot be stored as JSON ({inner}); job arguments "
                "must be str, int, float, bool, None, and lists or dicts of them"
            )
    return SerializationError(f"{name}() arguments cannot be stored as JSON ({exc})")


def _check_class(cls: type[Job]) -> None:
    """Refuse settings no dispatch could use, when the function is decorated."""
    from core.queue.payload import _class_info, job_settings, validate_queue

    problem = _class_info(cls).problem
    if problem is not None:
        raise SerializationError(problem)
    job_settings(cls())
    queue = cls.queue
    try:
        validate_queue(queue)
    except ValueError as exc:
        raise SerializationError(f"{cls.__qualname__}.queue: {exc}") from None
    if cls.connection is not None and not isinstance(cls.connection, str):
        raise SerializationError(
            f"{cls.__qualname__}.connection must be a connection name, got {cls.connection!r}"
        )


@overload
def job(function: Callable[P, R], /) -> JobFunction[P, R]: ...


@overload
def job(**options: Any) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(function: Callable[P, R] | None = None, /, **options: Any) -> Any:
    """Make a function dispatchable as a job: `@job` or `@job(queue=..., timeout=..., ...)`.

    Options are `Job` settings: queue, max_tries, timeout, retry_after, connection, unique_key,
    unique_for, on_duplicate, at_front, ttl, result_ttl, failure_ttl, aliases, priority,
    rate_limit, burst, concurrency_limit, limit_key. They are checked here, naming the one that
    is wrong (a `limit_key` naming data is checked at dispatch: `{args[0]}`, `{kwargs[name]}`).
    """
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise TypeError(
            f"@job got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}"
        )
    if function is not None:
        return JobFunction(function, options)

    def decorate(fn: Callable[P, R]) -> JobFunction[P, R]:
        return JobFunction(fn, options)

    return decorate
