"""RQ's way of calling: `Queue(...).enqueue(function, *args, **kwargs)` and its options.

    from core.queue.enqueue import Callback, Queue, RetryPolicy

    q = Queue("low")
    handle = await q.enqueue(count_words_at_url, "http://nvie.com", job_timeout="3m")
    await q.enqueue("app.jobs.reports.build", 42, retry=RetryPolicy(max=3, interval=[10, 30]))
    await q.enqueue_in(timedelta(minutes=10), send_reminder, user_id=7)
    await q.enqueue_many([Queue.prepare_data(add, 1, 2, job_id="sum-1"), ...])
    waiting = await q.count()

Everything is async in Topiq: RQ's calls are the same calls awaited. A function is a plain
module-level function (no `@job` needed; it runs once unless `retry=` says otherwise), a `@job`
function, or a dotted path `"pkg.module.function"` (which a worker imports: the dispatching
process need not be able to). RQ's options are taken out of the keyword arguments; the rest are
the function's (`args=` and `kwargs=` pass names that clash with an option). Each option is
checked here, and an error names it; nothing is queued then.

| RQ option | Topiq |
|---|---|
| `job_timeout` (seconds, "180", "1h", "3m", "5s"; -1: the longest, 30 days) | the job's `timeout` |
| `result_ttl` (-1: kept as long as Topiq keeps anything, 10 years) | `result_ttl` |
| `ttl` (`None`: none) | `ttl` |
| `failure_ttl` | `failure_ttl` |
| `depends_on` (handle, id, or a list) | `depends_on` |
| `job_id`, `at_front` | the same |
| `description`, `meta` | kept with the job: `queue:job`, `JobStatus.description/.meta` |
| `on_success`, `on_failure`, `on_stopped` | callbacks run by the worker (`Callback(f, timeout)`) |
| `retry=RetryPolicy(max=3, interval=[10, 30])` | `max_tries = max + 1`, `retry_after = interval` |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from core.errors import SerializationError
from core.functions import (
    JobFunction,
    allowed_module,
    function_job,
    function_problem,
    non_finite,
    path_problem,
    split_path,
)
from core.job import Job

if TYPE_CHECKING:
    from core.queue.handle import JobHandle
    from core.queue.queue_manager import QueueManager

__all__ = ["Callback", "PreparedJob", "Queue", "RetryPolicy", "prepare_data"]

#: The keyword arguments `enqueue` takes as its own (RQ's options); every other one goes to
#: the function.
OPTIONS = frozenset(
    {
        "job_timeout",
        "result_ttl",
        "ttl",
        "failure_ttl",
        "depends_on",
        "job_id",
        "at_front",
        "description",
        "meta",
        "on_success",
        "on_failure",
        "on_stopped",
        "retry",
        "args",
        "kwargs",
        "pipeline",
    }
)
#: RQ's default time limit of a callback (seconds).
CALLBACK_TIMEOUT = 60.0
_MAX_SECONDS = 30 * 24 * 3600
_MAX_KEEP = 3650 * 24 * 3600
_MAX_DESCRIPTION = 1000


class RetryPolicy:
    """RQ's `Retry`: at most `max` retries after the first try (`max=3` is 4 tries), waiting
    `interval` seconds before each (a list: one per retry, the last one repeated).

    Named so that it does not clash with `core.errors.Retry`, which a job raises to ask for
    another try.
    """

    def __init__(self, max: int, interval: float | str | Sequence[float | str] = 0) -> None:
        if type(max) is not int or max < 1:
            raise ValueError(f"RetryPolicy(max=...) must be a whole number, 1 or more, got {max!r}")
        if max > 999:
            raise ValueError(f"RetryPolicy(max=...) must be at most 999, got {max!r}")
        intervals = interval if isinstance(interval, list | tuple) else [interval]
        if not intervals:
            raise ValueError("RetryPolicy(interval=...) must not be an empty list")
        seconds = [
            _seconds(value, "RetryPolicy(interval=...)", _MAX_SECONDS) for value in intervals
        ]
        self.max = max
        self.intervals: list[float] = seconds

    @property
    def max_tries(self) -> int:
        """Tries in all: the first and `max` retries."""
        return self.max + 1

    @property
    def retry_after(self) -> float | list[float]:
        """The job's `retry_after`: one number, or the list of them."""
        return self.intervals[0] if len(self.intervals) == 1 else list(self.intervals)

    def __repr__(self) -> str:
        return f"RetryPolicy(max={self.max}, interval={self.retry_after!r})"


class Callback:
    """RQ's `Callback`: a function (or its dotted path) the worker calls, within `timeout`
    seconds (60 by default; "1m" and the like are accepted)."""

    def __init__(self, func: Callable[..., Any] | str, timeout: float | str | None = None) -> None:
        self.func = func
        self.timeout = (
            CALLBACK_TIMEOUT
            if timeout is None
            else _seconds(timeout, "Callback(timeout=...)", _MAX_SECONDS)
        )
        if self.timeout <= 0:
            raise ValueError(f"Callback(timeout=...) must be over 0 seconds, got {timeout!r}")

    def __repr__(self) -> str:
        return f"Callback({self.func!r}, timeout={self.timeout!r})"


#: What marks a `PreparedJob` made by `prepare_data` (its options checked and converted).
_CHECKED = object()


@dataclass(slots=True)
class PreparedJob:
    """One job of `enqueue_many`: make it with `prepare_data(...)`, which checks it. One built
    by hand (`options` as `enqueue` takes them) is checked by `enqueue_many` the same way."""

    function: Any
    args: tuple[Any, ...] | list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    _checked: object = field(default=None, repr=False, compare=False)


def prepare_data(function: Any, *args: Any, **kwargs: Any) -> PreparedJob:
    """One job for `enqueue_many`, in `enqueue`'s calling convention (RQ's
    `Queue.prepare_data`): `prepare_data(count_words, "http://nvie.com", job_id="my_job_id")`.

    `depends_on` is refused, as RQ refuses it there.
    """
    if "depends_on" in kwargs:
        raise TypeError(
            "prepare_data(depends_on=...) is not supported (as in RQ): enqueue a job that "
            "waits for others with enqueue(..., depends_on=...)"
        )
    return _prepare(function, args, kwargs, "prepare_data")


def _prepare(
    function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], where: str
) -> PreparedJob:
    """The call's function arguments and RQ options, each option checked (naming it)."""
    options = {name: kwargs.pop(name) for name in OPTIONS & kwargs.keys()}
    if "pipeline" in options:
        raise TypeError(
            f"{where}(pipeline=...): Topiq has no Redis pipelines to join; enqueue_many([...]) "
            "stores many jobs in one round trip"
        )
    explicit_args = options.pop("args", None)
    explicit_kwargs = options.pop("kwargs", None)
    if explicit_args is not None or explicit_kwargs is not None:
        if args:
            raise TypeError(
                f"{where}(): give the function's positional arguments either after the "
                "function or as args=[...], not both"
            )
        if explicit_args is not None:
            if isinstance(explicit_args, str | bytes | dict) or not isinstance(
                explicit_args, Sequence
            ):
                raise TypeError(
                    f"{where}(args=...) must be a list or tuple of arguments, got "
                    f"{type(explicit_args).__name__}"
                )
            args = tuple(explicit_args)
        if explicit_kwargs is not None:
            if not isinstance(explicit_kwargs, dict) or not all(
                isinstance(k, str) for k in explicit_kwargs
            ):
                raise TypeError(
                    f"{where}(kwargs=...) must be a dict of keyword arguments, got "
                    f"{type(explicit_kwargs).__name__}"
                )
            clash = sorted(kwargs.keys() & explicit_kwargs.keys())
            if clash:
                raise TypeError(f"{where}(): {', '.join(clash)} given twice (and in kwargs=)")
            kwargs = {**kwargs, **explicit_kwargs}
    _check_function(function, where)
    checked: dict[str, Any] = {}
    for name, value in options.items():
        checked[name] = _check_option(name, value, where)
    return PreparedJob(function, args, kwargs, checked, _CHECKED)


def _recheck(item: PreparedJob, index: int) -> PreparedJob:
    """A `PreparedJob` built by hand, checked as `prepare_data` checks its arguments."""
    where = f"enqueue_many(): item {index}"
    options = item.options
    if not isinstance(options, dict):
        raise TypeError(f"{where}: options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(name) for name in set(options) - (OPTIONS - {"args", "kwargs"}))
    if unknown:
        raise TypeError(
            f"{where} has unknown option(s) {', '.join(unknown)}; make it with "
            "Queue.prepare_data(function, *args, **kwargs)"
        )
    if "depends_on" in options:
        raise TypeError(
            f"{where}: depends_on is not supported by enqueue_many (as in RQ): enqueue a job "
            "that waits for others with enqueue(..., depends_on=...)"
        )
    call = {**options, "args": item.args, "kwargs": item.kwargs}
    return _prepare(item.function, (), call, "enqueue_many")


def _check_function(function: Any, where: str) -> None:
    if isinstance(function, str):
        try:
            split_path(function, f"{where}(): the function path")
        except ValueError as exc:
            raise TypeError(str(exc)) from None
        return
    if isinstance(function, Job | JobFunction) or (
        isinstance(function, type) and issubclass(function, Job)
    ):
        return
    problem = function_problem(function)
    if problem is not None:
        raise SerializationError(f"{where}(): {problem}")


def _check_option(name: str, value: Any, where: str) -> Any:
    """`value` in the form the push needs; `ValueError`/`TypeError` naming `where(name=...)`."""
    label = f"{where}({name}=...)"
    if name == "job_timeout":
        if value is None:
            return None
        if value == -1:  # RQ: no limit; Topiq's longest try
            return float(_MAX_SECONDS)
        return _seconds(value, label, _MAX_SECONDS, text=True)
    if name in ("result_ttl", "failure_ttl"):
        if value is None:
            return None
        if value == -1:  # RQ: kept for ever; Topiq keeps records up to 10 years
            return float(_MAX_KEEP)
        return _seconds(value, label, _MAX_KEEP, text=True)
    if name == "ttl":
        if value is None or value == -1:
            return None
        seconds = _seconds(value, label, _MAX_SECONDS, text=True)
        if seconds == 0:
            raise ValueError(f"{label} must be over 0 seconds (None: no ttl), got {value!r}")
        return seconds
    if name == "at_front":
        if type(value) is not bool:
            raise TypeError(f"{label} must be True or False, got {value!r}")
        return value
    if name == "job_id":
        from core.queue.payload import validate_job_id

        return None if value is None else validate_job_id(value, label)
    if name == "description":
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > _MAX_DESCRIPTION:
            raise ValueError(
                f"{label} must be a string of at most {_MAX_DESCRIPTION} characters, got "
                f"{type(value).__name__} of {len(value) if isinstance(value, str) else '-'}"
            )
        return value
    if name == "meta":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TypeError(f"{label} must be a dict, got {type(value).__name__}")
        try:
            orjson.dumps(value, default=_not_json)
        except TypeError as exc:
            raise SerializationError(
                f"{label} cannot be stored as JSON ({exc}); use str, int, float, bool, None, "
                "and lists or dicts of them"
            ) from None
        found = non_finite(value, "meta")
        if found is not None:
            raise SerializationError(
                f"{label}: {found} is NaN or infinite, which JSON cannot hold (it would be "
                "stored as None): use a finite number, None or a string"
            )
        return dict(value)
    if name in ("on_success", "on_failure", "on_stopped"):
        return None if value is None else _callback(value, label)
    if name == "retry":
        if value is None:
            return None
        if not isinstance(value, RetryPolicy):
            raise TypeError(
                f"{label} takes RetryPolicy(max=..., interval=...), got {type(value).__name__}"
            )
        return value
    if name == "depends_on":
        return value  # checked by the push (a handle, an id, or a list of them)
    raise AssertionError(name)


def _callback(value: Any, label: str) -> dict[str, Any]:
    """`{"path", "timeout"}` of a callback option; the allowed modules are checked at push."""
    timeout = CALLBACK_TIMEOUT
    if isinstance(value, Callback):
        timeout = value.timeout
        value = value.func
    if isinstance(value, str):
        try:
            split_path(value, label)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        path = value
    elif isinstance(value, JobFunction):
        function = value.function
        path = f"{function.__module__}.{function.__qualname__}"
    else:
        problem = function_problem(value)
        if problem is not None:
            raise SerializationError(f"{label}: {problem}")
        path = f"{value.__module__}.{value.__qualname__}"
    return {"path": path, "timeout": timeout}


def _seconds(value: Any, label: str, limit: float, *, text: bool = True) -> float:
    """Seconds from a number or a duration text ("180", "1h", "3m", "5s", "10 minutes")."""
    from core.delays import parse_duration

    seconds = -1.0
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and text:
        try:
            seconds = parse_duration(value, label)
        except ValueError:
            seconds = -1.0
    if not (seconds == seconds and 0 <= seconds <= limit):
        raise ValueError(
            f"{label} must be a number of seconds from 0 to {limit:.0f}, or a duration such as "
            f"'180', '1h', '3m' or '5s', got {value!r}"
        )
    return seconds


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


@dataclass(slots=True)
class _Built:
    job: Job
    push: dict[str, Any]


def _build(prepared: PreparedJob, allowed: Sequence[str]) -> _Built:
    """The job `prepared` describes, its options set on it; what goes to the push itself."""
    function, args, kwargs = prepared.function, prepared.args, prepared.kwargs
    if isinstance(function, Job):
        if args or kwargs:
            raise TypeError(
                f"enqueue(): {type(function).__qualname__} is a job instance, which carries its "
                "own data: enqueue it without arguments"
            )
        job = function
    elif isinstance(function, type) and issubclass(function, Job):
        if args or kwargs:
            raise TypeError(
                f"enqueue(): {function.__qualname__} is a job class: enqueue an instance, "
                f"{function.__qualname__}(...), or a function with arguments"
            )
        try:
            inspect.signature(function).bind()
        except TypeError:
            raise TypeError(
                f"{function.__qualname__} cannot be built with no arguments: enqueue an "
                f"instance, {function.__qualname__}(...)"
            ) from None
        job = function()
    else:
        job = function_job(function, list(args), dict(kwargs), allowed_modules=allowed)
    options = prepared.options
    state = job.__dict__
    push: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "job_timeout":
            state["timeout"] = value
        elif name in ("result_ttl", "failure_ttl", "ttl"):
            state[name] = value
        elif name == "description":
            state["_topiq_description"] = value
        elif name == "meta":
            state["_topiq_meta"] = value
        elif name == "retry":
            state["max_tries"] = value.max_tries
            state["retry_after"] = value.retry_after
        elif name.startswith("on_"):
            _allowed_callback(value["path"], allowed, name)
            problem = path_problem(value["path"])
            if problem is not None:
                raise SerializationError(
                    f"enqueue({name}=...): {problem}; a callback is a function defined at "
                    "module level in an allowed module"
                )
            state.setdefault("_topiq_callbacks", {})[name[3:]] = value
        else:  # job_id, at_front, depends_on
            push[name] = value
    return _Built(job, push)


def _allowed_callback(path: str, allowed: Sequence[str], option: str) -> None:
    module, _ = split_path(path)
    if not allowed_module(module, allowed):
        raise SerializationError(
            f"enqueue({option}=...): {path!r} is outside the allowed modules "
            f"({', '.join(allowed) or 'none'}), so no worker would call it: move it under one, "
            f"or add {module + '.'!r} to QUEUE_ALLOWED_MODULES"
        )


class Queue:
    """An RQ-style queue: `Queue("low")`, `Queue()` (the `QUEUE_DEFAULT` queue, or a `@job`
    function's own), `Queue(is_async=False)` (runs each job inline, on the `sync`
    connection, as RQ's `is_async=False` does).

    `connection` is a Topiq connection name ("redis", "database", "memory", "sync"; `None`:
    the default `QUEUE_CONNECTION`), not a client object: Topiq opens its backends from the
    settings. `manager` is the `QueueManager` to use (default: the module's default manager).
    """

    def __init__(
        self,
        name: str | None = None,
        connection: str | None = None,
        *,
        is_async: bool = True,
        manager: QueueManager | None = None,
    ) -> None:
        from core.queue.payload import validate_queue

        if name is not None:
            validate_queue(name)
        if connection is not None and not isinstance(connection, str):
            raise TypeError(
                "Queue(connection=...) takes a Topiq connection name ('redis', 'database', "
                f"'memory', 'sync'), got {type(connection).__name__}: Topiq opens its backends "
                "from the settings (REDIS_URL, DB_URL)"
            )
        if type(is_async) is not bool:
            raise TypeError(f"Queue(is_async=...) must be True or False, got {is_async!r}")
        self._name = name
        self._connection = "sync" if not is_async else connection
        self.is_async = is_async
        self._given = manager

    @property
    def name(self) -> str:
        """The queue's name (the `QUEUE_DEFAULT` setting's when none was given)."""
        if self._name is not None:
            return self._name
        from core.queue.queue_manager import get_default_manager

        manager = self._given if self._given is not None else get_default_manager()
        return manager.settings.queue_default

    @property
    def connection(self) -> str:
        """The connection's name."""
        from core.queue.queue_manager import get_default_manager

        manager = self._given if self._given is not None else get_default_manager()
        return manager.connection_name(self._connection)

    def __repr__(self) -> str:
        return f"Queue({self._name or 'default'!r}, connection={self._connection!r})"

    async def _manager(self) -> QueueManager:
        if self._given is not None:
            return self._given
        from core.queue.queue_manager import queue

        return await queue._manager()

    prepare_data = staticmethod(prepare_data)

    # -- enqueueing ------------------------------------------------------------------------

    async def enqueue(self, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        """Queue a call of `f` (a function, `"pkg.module.function"`, a `@job` function, or a
        job instance or class without arguments); returns its handle. RQ's options are taken
        from `kwargs` (see the module's table); the rest are the function's."""
        return await self._enqueue(_prepare(f, args, kwargs, "enqueue"), None)

    async def enqueue_call(
        self,
        func: Any,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> JobHandle:
        """RQ's `enqueue_call`: the function's arguments only as `args`/`kwargs`; every
        keyword is an option."""
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise TypeError(
                f"enqueue_call() got unknown option(s) {', '.join(unknown)}; known: "
                + ", ".join(sorted(OPTIONS - {"args", "kwargs"}))
            )
        call = {**options, "args": list(args or ()), "kwargs": dict(kwargs or {})}
        return await self._enqueue(_prepare(func, (), call, "enqueue_call"), None)

    async def enqueue_in(
        self, time_delta: timedelta | float, f: Any, *args: Any, **kwargs: Any
    ) -> JobHandle:
        """Queue a call of `f` to run after `time_delta` (a `timedelta` or seconds)."""
        if isinstance(time_delta, timedelta):
            seconds = time_delta.total_seconds()
        elif isinstance(time_delta, int | float) and not isinstance(time_delta, bool):
            seconds = float(time_delta)
        else:
            raise TypeError(
                f"enqueue_in() takes a timedelta or a number of seconds first, got "
                f"{type(time_delta).__name__} {time_delta!r:.80}"
            )
        if not (seconds == seconds and seconds >= 0):
            raise ValueError(
                f"enqueue_in(): the delay must be 0 or more seconds, got {time_delta!r}"
            )
        return await self._enqueue(_prepare(f, args, kwargs, "enqueue_in"), seconds)

    async def enqueue_at(self, datetime_: datetime, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        """Queue a call of `f` to run at `datetime_` (a naive datetime is UTC, as in RQ)."""
        if not isinstance(datetime_, datetime):
            raise TypeError(
                f"enqueue_at() takes a datetime first, got {type(datetime_).__name__} "
                f"{datetime_!r:.80}"
            )
        when = datetime_ if datetime_.tzinfo is not None else datetime_.replace(tzinfo=UTC)
        return await self._enqueue(_prepare(f, args, kwargs, "enqueue_at"), when)

    async def enqueue_many(self, job_datas: Iterable[PreparedJob]) -> list[JobHandle]:
        """Queue every `prepare_data(...)` job in one round trip per connection; returns their
        handles in order. Every job is checked first: one bad job, or a `job_id` given twice
        in the call, queues none. A `job_id` already taken by a waiting or running job does
        not stop the others: they are stored, then `DuplicateJobError` names the refused ones
        and carries the stored ones' handles (`handles`)."""
        prepared = list(job_datas)
        for index, item in enumerate(prepared):
            if not isinstance(item, PreparedJob):
                raise TypeError(
                    f"enqueue_many() takes a list of Queue.prepare_data(...) results; item "
                    f"{index} is {type(item).__name__}"
                )
            if item._checked is not _CHECKED:
                prepared[index] = _recheck(item, index)
        if not prepared:
            return []
        manager = await self._manager()
        allowed = manager.settings.queue_allowed_modules
        jobs: list[Job] = []
        for item in prepared:
            built = _build(item, allowed)
            push = built.push
            if "job_id" in push:
                built.job.job_id = push["job_id"]
            if "at_front" in push:
                built.job.at_front = push["at_front"]
            jobs.append(built.job)
        return await manager.bulk(jobs, self._name, self._connection)

    async def _enqueue(self, prepared: PreparedJob, delay: float | datetime | None) -> JobHandle:
        manager = await self._manager()
        built = _build(prepared, manager.settings.queue_allowed_modules)
        handle: JobHandle = await manager.push(
            built.job,
            queue=self._name,
            connection=self._connection,
            delay=delay,
            **built.push,
        )
        return handle

    # -- inspecting ------------------------------------------------------------------------

    async def count(self) -> int:
        """Jobs of the queue ready to run now (RQ's `len(q)`/`q.count`): not the delayed ones
        (`enqueue_in`/`enqueue_at`, retries waiting), the deferred ones (`depends_on`) nor the
        running ones, which RQ keeps in other registries. `job_ids()` lists the same jobs.
        `empty()` removes more: every job not running."""
        manager = await self._manager()
        driver = await manager.connection(self._connection)
        return (await driver.stats(self.name)).pending

    async def job_ids(self, offset: int = 0, length: int = -1) -> list[str]:
        """Ids of the waiting jobs in the order they will run (`length` -1: all of them)."""
        if type(offset) is not int or offset < 0 or type(length) is not int or length < -1:
            raise ValueError(
                f"job_ids(offset, length): offset 0 or more, length -1 (all) or more; got "
                f"{offset!r}, {length!r}"
            )
        manager = await self._manager()
        driver = await manager.connection(self._connection)
        out: list[str] = []
        page = 500
        while length < 0 or len(out) < length:
            want = page if length < 0 else min(page, length - len(out))
            records = await driver.browse(self.name, "pending", offset, want)
            out.extend(record.id for record in records)
            if len(records) < want:
                break
            offset += len(records)
        return out

    async def fetch_job(self, job_id: str) -> JobHandle | None:
        """The handle of this queue's job `job_id`; `None` when the connection keeps no record
        of it, or when the job is another queue's (as RQ's `fetch_job`)."""
        from core.errors import JobNotFoundError
        from core.queue.queue_manager import queue

        manager = await self._manager()
        name = self.name
        if self._given is None:
            handle = queue.job(job_id, self._connection, queue=name)
        else:
            handle = manager.job(job_id, self._connection, queue=name)
        try:
            status = await handle.status()
        except JobNotFoundError:
            return None
        return handle if status.queue == name else None

    async def empty(self) -> int:
        """Remove every job of the queue that is not running: ready, delayed and deferred
        ones (more than `count()` counts); returns how many."""
        manager = await self._manager()
        driver = await manager.connection(self._connection)
        return await driver.clear(self.name)
