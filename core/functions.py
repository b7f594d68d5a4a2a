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
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import orjson

from core.errors import SerializationError, UnknownJobError, UnloadableJobError

if TYPE_CHECKING:
    from core.delays import Delay
    from core.job import Job
    from core.queue.handle import JobHandle

__all__ = [
    "JobCall",
    "JobFunction",
    "allowed_module",
    "function_class",
    "function_job",
    "function_problem",
    "job",
    "non_finite",
    "path_problem",
    "resolve_function",
    "split_path",
]

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
        for name, prop in _PROPERTIES.items():
            setattr(base, name, prop)
    return AsyncFunctionJob, SyncFunctionJob


def _id(self: Job) -> str:
    """The job's id (RQ's `job.id`): `job_id`."""
    return self.job_id


def _func_name(self: Job) -> str:
    """The function's dotted path (RQ's `job.func_name`): `"module.function"`."""
    cls = type(self)
    return f"{cls.__module__}.{cls.__qualname__}"


def _description(self: Job) -> str | None:
    """The `description` given at dispatch (RQ's `enqueue(..., description=)`), or `None`."""
    value = self.__dict__.get("_topiq_description")
    return value if isinstance(value, str) else None


def _meta(self: Job) -> dict[str, Any]:
    """The `meta` dict given at dispatch (RQ's `enqueue(..., meta=)`); `{}` if none. Mutable:
    what a job or callback adds is kept with the job (in its outcome's record)."""
    state = self.__dict__
    value = state.get("_topiq_meta")
    if not isinstance(value, dict):
        value = state["_topiq_meta"] = {}
    return value


#: Read-only properties of every function job (plain or `@job`), for RQ's callbacks.
_PROPERTIES: dict[str, property] = {
    "id": property(_id),
    "func_name": property(_func_name),
    "description": property(_description),
    "meta": property(_meta),
}


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
            raw = orjson.dumps((args, kwargs), default=_refuse, option=_DUMP_OPTIONS)
        except TypeError as exc:
            raise _explain(name, bound.arguments, exc) from None
        if b"null" in raw:  # NaN and Infinity are written as null: look for one only then
            _refuse_non_finite(name, bound.arguments)
        job = self.job_class()
        state = job.__dict__
        state["args"] = list(args)
        state["kwargs"] = kwargs
        return job

    async def dispatch(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """Queue a call of the function with these arguments; returns its handle."""
        from core.queue.queue_manager import queue

        return await queue.push(self.make(*args, **kwargs))

    async def delay(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle:
        """RQ's name for `dispatch`: queue a call of the function; returns its handle."""
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


def _refuse_non_finite(name: str, arguments: dict[str, Any]) -> None:
    """`SerializationError` naming the argument holding a NaN or infinite float, if one does."""
    for arg, value in arguments.items():
        found = non_finite(value, f"{name}() argument {arg!r}")
        if found is not None:
            raise SerializationError(
                f"{found} is NaN or infinite, which JSON cannot hold (it would arrive as None): "
                "send a finite number, None or a string"
            )


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
def job(
    queue: str | None = None, /, **options: Any
) -> Callable[[Callable[P, R]], JobFunction[P, R]]: ...


def job(function: Callable[P, R] | str | None = None, /, **options: Any) -> Any:
    """Make a function dispatchable as a job: `@job`, `@job(queue=..., timeout=..., ...)`, or
    RQ's `@job("low", timeout=5)` (a string first argument is the queue).

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
    if isinstance(function, str):
        if "queue" in options:
            raise TypeError(
                f"@job got the queue twice: {function!r} and queue={options['queue']!r}"
            )
        options["queue"] = function
        function = None
    if function is not None:
        return JobFunction(function, options)

    def decorate(fn: Callable[P, R]) -> JobFunction[P, R]:
        return JobFunction(fn, options)

    return decorate


# -- plain functions as jobs (no `@job`) ---------------------------------------------------

#: The `@job`-like wrapper of each plain function dispatched or loaded as a job (one per
#: function, so that dispatch and worker agree on its class); stand-ins by path.
_PLAIN: dict[Callable[..., Any], JobFunction[..., Any]] = {}
_STAND_INS: dict[str, type[Job]] = {}
#: What a plain function's generated class sets: RQ and Masonite run a function once unless
#: told otherwise.
_PLAIN_OPTIONS: dict[str, Any] = {"max_tries": 1}


def allowed_module(module: str, entries: Sequence[str]) -> bool:
    """Whether `module` is under one of `entries` (QUEUE_ALLOWED_MODULES): an entry names a
    package, and allows it and its submodules (`app` and `app.` both allow `app` and
    `app.jobs.mail`, not `apple`); an empty entry allows every module."""
    for entry in entries:
        package = entry.rstrip(".")
        if not package or module == package or module.startswith(package + "."):
            return True
    return False


_allowed = allowed_module


def non_finite(value: Any, where: str) -> str | None:
    """Where in `value` (named from `where`: `meta['ratio']`) a float is NaN or infinite, which
    JSON cannot hold (it would be stored as null); `None` if nowhere."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, float | dict | list | tuple):
                found = non_finite(item, f"{where}[{key!r}]")
                if found is not None:
                    return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            if isinstance(item, float | dict | list | tuple):
                found = non_finite(item, f"{where}[{index}]")
                if found is not None:
                    return found
    return None


def function_problem(target: Any) -> str | None:
    """Why `target` cannot run as a job by its name (`None` if it can): only functions
    (`def`/`async def`) defined at module level, under the name their module gives them."""
    if isinstance(target, JobFunction):
        return None
    if not inspect.isfunction(target):
        if inspect.ismethod(target):
            kind = "a bound method"
        elif inspect.isbuiltin(target) or inspect.ismethoddescriptor(target):
            kind = "a builtin"
        elif isinstance(target, type):
            kind = "a class"
        elif isinstance(target, functools.partial):
            kind = "a functools.partial"
        else:
            kind = f"a {type(target).__name__}"
        return (
            f"{target!r} is {kind}; only functions (def or async def) defined at module level "
            "can run as jobs"
        )
    name = f"{target.__module__}:{target.__qualname__}"
    if target.__name__ == "<lambda>":
        return f"{name} is a lambda; only named module-level functions can run as jobs"
    if "<locals>" in target.__qualname__:
        return (
            f"{name} is defined inside a function, where no worker can find it: define it at "
            "module level"
        )
    if "." in target.__qualname__:
        return f"{name} is a method of a class; only module-level functions can run as jobs"
    module = sys.modules.get(target.__module__)
    found = getattr(module, target.__name__, None)
    if isinstance(found, JobFunction):
        found = found.function
    if module is not None and found is not target:
        return (
            f"{name} is not what its module holds under that name (was it created or replaced "
            "at run time?): define the function once, at module level"
        )
    return None


def function_class(function: Callable[..., Any]) -> type[Job]:
    """The `Job` class a plain module-level function runs as (generated once per function,
    as `@job` does, with `max_tries = 1`); a `@job` function's own class. `SerializationError`
    naming the function if it cannot be a job (lambda, nested, builtin, method)."""
    return _plain(function).job_class


def _plain(function: Any) -> JobFunction[..., Any]:
    if isinstance(function, JobFunction):
        return function
    found = _PLAIN.get(function)
    if found is None:
        problem = function_problem(function)
        if problem is not None:
            raise SerializationError(problem)
        module = sys.modules.get(function.__module__)
        held = getattr(module, function.__name__, None)
        if isinstance(held, JobFunction):  # the function of a `@job`: its settings apply
            return held
        found = _PLAIN.setdefault(function, JobFunction(function, dict(_PLAIN_OPTIONS)))
    return found


def split_path(path: str, what: str = "function path") -> tuple[str, str]:
    """`(module, name)` of `"pkg.mod:func"` (split at the colon) or `"pkg.mod.func"` (at the
    last dot); `ValueError` naming `what` if it is not such a path."""
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a string such as 'app.jobs.tasks.send', got {path!r}")
    if ":" in path:
        module, _, name = path.partition(":")
    else:
        module, _, name = path.rpartition(".")
    if (
        len(path) > 400
        or not module
        or not all(part.isidentifier() for part in module.split("."))
        or not name.isidentifier()
    ):
        raise ValueError(
            f"{what} {path[:200]!r} is not of the form 'package.module.function' or "
            "'package.module:function'"
        )
    return module, name


def resolve_function(path: str, allowed_modules: Sequence[str]) -> Callable[..., Any]:
    """The module-level function `path` names (`"pkg.mod.func"` or `"pkg.mod:func"`), in a
    module under `allowed_modules`; a `@job` function's own function.

    Only a function defined in that module under that name is accepted: a path naming
    something the module imported (`app.jobs.os.system`, `app.jobs:run` after `from
    subprocess import run`), a builtin, a class or a nested function is refused.

    Raises:
        UnknownJobError: naming the path and why it cannot be used.
    """
    try:
        module_name, name = split_path(path)
    except ValueError as exc:
        raise UnknownJobError(str(exc)) from None
    if not _allowed(module_name, allowed_modules):
        raise UnknownJobError(
            f"{path!r} is outside the allowed modules ({', '.join(allowed_modules) or 'none'}; "
            "QUEUE_ALLOWED_MODULES)"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UnknownJobError(
            f"{path!r}: module {module_name!r} cannot be imported: {exc!r}"
        ) from exc
    target = getattr(module, name, None)
    if target is None:
        raise UnknownJobError(f"{path!r}: module {module_name!r} has no function {name!r}")
    if isinstance(target, JobFunction):
        target = target.function
    problem = _strict_problem(target, module_name, name)
    if problem is not None:
        raise UnknownJobError(f"{path!r}: {problem}")
    return target


def path_problem(path: str) -> str | None:
    """Why the function `path` names could not be called by a worker, found from here (`None`
    if it can, or if its module cannot be imported in this process: another code base's, for
    workers that can import it). Check the allowed modules first: this imports the module."""
    module_name, name = split_path(path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            return None  # not importable here: the worker's code base
        return f"{path!r}: module {module_name!r} cannot be imported: {exc!r}"
    except Exception as exc:
        return f"{path!r}: module {module_name!r} cannot be imported: {exc!r}"
    target = getattr(module, name, None)
    if target is None:
        return f"{path!r}: module {module_name!r} has no function {name!r}"
    if isinstance(target, JobFunction):
        target = target.function
    problem = _strict_problem(target, module_name, name)
    return None if problem is None else f"{path!r}: {problem}"


def _strict_problem(target: Any, module: str, qualname: str) -> str | None:
    """Why `target`, found as `module:qualname`, is not a plain function defined there."""
    if not (inspect.isfunction(target) or inspect.iscoroutinefunction(target)):
        return (
            f"it names {_describe(target)}, not a function (def or async def) defined in {module}"
        )
    if target.__module__ != module or target.__qualname__ != qualname:
        return (
            f"it names {target.__module__}:{target.__qualname__}, which is not defined in "
            f"{module} under that name; only functions defined at module level in an allowed "
            "module run"
        )
    if target.__name__ == "<lambda>":
        return "it names a lambda; only named functions run"
    return None


def _describe(target: Any) -> str:
    if inspect.isbuiltin(target) or inspect.ismethoddescriptor(target):
        return f"the builtin {getattr(target, '__qualname__', target)!r}"
    if inspect.ismodule(target):
        return f"the module {target.__name__}"
    if isinstance(target, type):
        return f"the class {target.__qualname__}"
    return f"a {type(target).__name__}"


def plain_job_class(module_name: str, qualname: str, target: Any) -> type[Job] | None:
    """The job class of `target` found as `module_name:qualname` when it is a plain function
    defined there under that name (the loader's strict rule), else `None`."""
    if _strict_problem(target, module_name, qualname) is not None or "." in qualname:
        return None
    return _plain(target).job_class


def function_job(
    fn_or_path: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    allowed_modules: Sequence[str] | None = None,
) -> Job:
    """One job calling `fn_or_path(*args, **kwargs)`.

    `fn_or_path`: a `@job` function (its settings apply), a plain module-level function
    (sync or async; runs once: `max_tries = 1`), or a path `"pkg.mod.func"` /
    `"pkg.mod:func"`. A path that imports here is that function; one whose module cannot be
    imported in this process (code another code base runs) becomes a stand-in with that name,
    for workers that can import it. `allowed_modules`, when given, is checked before a path
    is imported. Arguments must be JSON (checked, naming the argument).

    Raises:
        SerializationError: what cannot be a job (lambda, nested function, builtin, method,
            a path naming something else), or arguments that are not JSON.
        UnloadableJobError: a path outside `allowed_modules`.
        TypeError: arguments that do not fit the function's signature.
    """
    kwargs = {} if kwargs is None else kwargs
    if isinstance(fn_or_path, str):
        return _from_path(fn_or_path, args, kwargs, allowed_modules)
    return _plain(fn_or_path).make(*args, **kwargs)


def _from_path(
    path: str, args: Sequence[Any], kwargs: dict[str, Any], allowed: Sequence[str] | None
) -> Job:
    from core.job import Job

    try:
        module_name, name = split_path(path)
    except ValueError as exc:
        raise SerializationError(str(exc)) from None
    if allowed is not None and not _allowed(module_name, allowed):
        raise UnloadableJobError(
            f"{path!r} is outside the allowed modules ({', '.join(allowed) or 'none'}), so no "
            f"worker would run it: move the function under one, or add {module_name + '.'!r} "
            "to QUEUE_ALLOWED_MODULES"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise  # the module exists but an import inside it failed: that is a bug to show
        return _stand_in(module_name, name, args, kwargs)
    target = getattr(module, name, None)
    if isinstance(target, type) and issubclass(target, Job):
        if args or kwargs:
            raise TypeError(
                f"{path!r} is a job class: its instances carry their data; pass an instance "
                "instead of arguments"
            )
        return target()
    if target is None:
        raise SerializationError(f"{path!r}: module {module_name!r} has no function {name!r}")
    if not isinstance(target, JobFunction):
        problem = _strict_problem(target, module_name, name)
        if problem is not None:
            raise SerializationError(f"{path!r}: {problem}")
    return _plain(target).make(*args, **kwargs)


def _stand_in(module: str, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Job:
    """A job naming `module:name`, a function this process cannot import (workers can)."""
    path = f"{module}:{name}"
    cls = _STAND_INS.get(path)
    if cls is None:

        def absent(*_: Any, **__: Any) -> Any:
            raise UnknownJobError(
                f"{path} cannot be imported in this process; a worker that can import it runs it"
            )

        _, sync_base = _bases()
        namespace: dict[str, Any] = {
            "__module__": module,
            "__qualname__": name,
            "_job_function": staticmethod(absent),
            **_PLAIN_OPTIONS,
        }
        cls = _STAND_INS.setdefault(path, type(name, (sync_base,), namespace))
    try:
        raw = orjson.dumps((args, kwargs), default=_refuse, option=_DUMP_OPTIONS)
    except TypeError as exc:
        named = {f"args[{i}]": value for i, value in enumerate(args)} | kwargs
        raise _explain(name, named, exc) from None
    if b"null" in raw:
        _refuse_non_finite(name, {f"args[{i}]": value for i, value in enumerate(args)} | kwargs)
    job = cls()
    state = job.__dict__
    state["args"] = list(args)
    state["kwargs"] = dict(kwargs)
    return job
