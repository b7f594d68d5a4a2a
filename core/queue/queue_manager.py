"""Dispatching jobs: `QueueManager`, and the module-level `queue` and `dispatch` facade.

    from core.queue.queue_manager import dispatch, queue

    await dispatch(SendMail(to="a@example.com"))
    await queue.later("10 minutes", Report(kind="daily"))

The facade forwards to a default manager that configures itself from the settings on first use
(or takes the one the app or worker installs with `set_default_manager`) and closes its
connections when the event loop that opened them shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, Self, get_args, overload

import orjson

from core import tracing
from core.delays import LATEST_DUE, Delay, parse_delay
from core.errors import (
    ConfigurationError,
    ConnectionLostError,
    DuplicateJobError,
    JobNotFoundError,
    QueueFullError,
    SerializationError,
    UnloadableJobError,
)
from core.events import EventKind, JobEvent, events
from core.functions import function_job, resolve_function
from core.hooks import hooks
from core.job import Job, JobFunction
from core.origin import Origin, current_origin, origin
from core.queue.drivers import (
    Driver,
    FailedStore,
    OutgoingJob,
    Pushed,
    QueueStats,
    create_driver,
)
from core.queue.drivers.base import Dependency, DependencyRule, OnDuplicate, Overflow
from core.queue.handle import JobHandle
from core.queue.payload import (
    ASSIGNED_ID,
    check_priority,
    class_path,
    encode,
    job_group,
    job_settings,
    job_status_topic,
    limit_of,
    new_job_id,
    reply_info,
    unloadable_reason,
    validate_job_id,
    validate_queue,
)
from core.settings import QueueConnection, Settings
from core.workflows import (
    Batch,
    Chain,
    Node,
    Planner,
    Step,
    Workflow,
    WorkflowHandle,
    batch,
    chain,
    unique_dependencies,
)

__all__ = [
    "Batch",
    "Callback",
    "Chain",
    "JobHandle",
    "Queue",
    "QueueManager",
    "RetryPolicy",
    "WorkflowHandle",
    "batch",
    "chain",
    "dispatch",
    "get_default_manager",
    "prepare_data",
    "queue",
    "set_default_manager",
]


logger = logging.getLogger("topiq.queue")

#: What `push` takes as a job: an instance, a `Job` subclass (built with no arguments), a
#: `@job` function or a plain module-level function (called with `args=`).
Pushable = Job | type[Job] | JobFunction[..., Any] | Callable[..., Any]


_LATEST_DUE = LATEST_DUE  # core/delays.py says why


def _delay_seconds(delay: Delay | None) -> float:
    """Seconds from now for a dispatch `delay` (`parse_delay`); `ValueError` naming the delay
    if it ends after 9999-01-01."""
    if delay is None:
        return 0.0
    seconds = parse_delay(delay)
    if seconds > _LATEST_DUE - time.time():
        raise ValueError(f"invalid delay {delay!r}: it ends after 9999-01-01")
    return seconds


class PushBatcher(Protocol):
    """Stores pushes of one connection in batches (the MQTT app's group commit,
    core/mqtt/commit.py): each caller's `push` returns its own jobs' outcomes, once stored."""

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]: ...


class JobSpool(Protocol):
    """Where jobs wait while their backend cannot be reached (the MQTT app's offline spool).

    Once a spool holds jobs of a connection, every later push to that connection goes to the
    spool too (behind them: dispatch order holds) until it has been replayed.
    """

    def holds(self, connection: str) -> bool:
        """Whether jobs of `connection` are waiting in the spool."""
        ...

    async def add(self, connection: str, jobs: Sequence[OutgoingJob]) -> None:
        """Store `jobs` (one push: replayed together, in order), durably before returning;
        `SpoolFullError` when the spool is at its bound (nothing stored)."""
        ...


class QueueManager:
    """Sends jobs to queues and answers questions about them, on any configured connection.

    Use as `async with QueueManager(settings) as manager:`; connections open on first use and
    close on exit.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else Settings.load()
        self._drivers: dict[str, Driver] = {}
        self._opened: set[str] = set()
        self._open_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Jobs queued through this manager (read by the MQTT app's counters).
        self.dispatched = 0
        #: Job classes a worker can import (checked once per class).
        self._loadable: set[type[Job]] = set()
        self._hooks_loaded = False
        #: Where pushes go while their backend cannot be reached (set by the MQTT app);
        #: `None`: such a push raises `ConnectionLostError`.
        self.spool: JobSpool | None = None
        #: Per connection name, what its pushes go through instead of the driver's own push,
        #: batched (set by the MQTT app while it runs; see `PushBatcher`).
        self.batchers: dict[str, PushBatcher] = {}
        #: `QUEUE_MAX_LENGTHS` read per queue (the settings are frozen).
        self._bounds: dict[str, tuple[int, Overflow]] = {}
        #: Each job class's `creation_hook`, resolved once.
        self._creation_hooks: dict[type[Job], Callable[..., Any]] = {}

    # -- connections -------------------------------------------------------------------

    def connection_name(self, name: str | None = None) -> str:
        """The connection `name` names, or the default one; `ConfigurationError` if unknown."""
        known = _CONNECTION_NAMES.get(name) if isinstance(name, str) else None
        if known is not None:  # the usual case, asked several times per dispatch
            return known
        if name is None:
            return self.settings.queue_connection.value
        try:
            return QueueConnection(name).value
        except ValueError:
            known = ", ".join(c.value for c in QueueConnection)
            raise ConfigurationError(
                f"unknown queue connection {name!r}: must be one of {known}"
            ) from None

    def driver(self, name: str | None = None) -> Driver:
        """The driver of a connection (created on first use, not necessarily open)."""
        name = self.connection_name(name)
        driver = self._drivers.get(name)
        if driver is None:
            driver = self._drivers[name] = self._create(name)
        return driver

    def _create(self, name: str) -> Driver:
        if name == QueueConnection.SYNC:
            from core.queue.drivers.sync import SyncDriver

            return SyncDriver(name, self.settings, manager=self)
        return create_driver(name, self.settings, name)

    async def connection(self, name: str | None = None) -> Driver:
        """The open driver of a connection."""
        self._check_loop()
        name = self.connection_name(name)
        driver = self.driver(name)
        if name not in self._opened:
            if self._open_lock is None:
                self._open_lock = asyncio.Lock()
            async with self._open_lock:
                if name not in self._opened:
                    await driver.open()
                    self._opened.add(name)
        return driver

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            # The loop that opened our connections is gone (a second `asyncio.run`): its
            # connections cannot be used or closed from here, so start afresh.
            self._drivers.clear()
            self._opened.clear()
            self._open_lock = None
            self._loop = loop

    async def failed_store(self, connection: str | None = None) -> FailedStore:
        """The store where jobs failing on `connection` are recorded."""
        name = QueueConnection(self.connection_name(connection))
        target = self.settings.failed_connection_for[name]
        return (await self.connection(target.value)).failed_store()

    async def close(self) -> None:
        """Close every open connection."""
        drivers = [self._drivers[name] for name in self._opened if name in self._drivers]
        self._opened.clear()
        for driver in drivers:
            await driver.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- dispatching -------------------------------------------------------------------

    def _target(self, job: Job, queue: str | None, connection: str | None) -> tuple[str, str]:
        if not isinstance(job, Job):
            raise _not_a_job(job)
        if queue is None:
            queue = job.queue if job.queue != Job.queue else self.settings.queue_default
        conn = self.connection_name(connection or job.connection)
        cls = type(job)
        if cls not in self._loadable and conn != QueueConnection.SYNC:
            # Refused here rather than failed on the worker: nothing is queued that no worker
            # can import. `sync` runs the job inline, in this process, so any class goes.
            reason = unloadable_reason(cls, self.settings.queue_allowed_modules)
            if reason is not None:
                raise UnloadableJobError(reason)
            self._loadable.add(cls)
        return conn, validate_queue(queue)

    def _outgoing(
        self,
        job: Job,
        queue: str,
        delay: float,
        job_id: str | None = None,
        at_front: bool | None = None,
        on_duplicate: str | None = None,
        priority: int | None = None,
        depends_on: tuple[Dependency, ...] = (),
        rule: DependencyRule = "succeeded",
    ) -> OutgoingJob:
        settings = job_settings(job)
        state = job.__dict__
        chosen = job_id
        if chosen is None:
            chosen = job.job_id
            if chosen and chosen == state.get(ASSIGNED_ID):
                chosen = ""  # the id an earlier dispatch (or the worker) gave this instance
            elif chosen:
                chosen = _checked_id(chosen, f"{type(job).__qualname__}.job_id")
        else:
            chosen = _checked_id(chosen, "push(job_id=...)")
        if at_front is None:
            at_front = settings.at_front
        elif type(at_front) is not bool:
            raise SerializationError(f"push(at_front=...) must be True or False, got {at_front!r}")
        on_duplicate_given = on_duplicate
        if on_duplicate is None:
            on_duplicate = settings.on_duplicate
        elif on_duplicate not in _ON_DUPLICATE:
            raise SerializationError(
                "push(on_duplicate=...) must be 'reject', 'keep' or 'replace', "
                f"got {on_duplicate!r}"
            )
        if priority is None:
            priority = settings.priority
        else:
            try:
                priority = check_priority(priority, "push(priority=...)")
            except ValueError as exc:
                raise SerializationError(str(exc)) from None
        new_id = chosen or new_job_id()
        failure_ttl = settings.failure_ttl
        if failure_ttl is None:
            failure_ttl = self.settings.queue_failure_ttl
        group = settings.group if settings.group_fixed else job_group(job, settings)
        unique_key = settings.unique_key
        status_topic = settings.status_topic
        if not settings.status_fixed:
            status_topic = job_status_topic(job, settings)
        reply = reply_info(status_topic=status_topic) if status_topic else None
        source = current_origin.get()
        if source is not None:  # dispatched from an MQTT route's handler
            if not group and source.group:
                group = _origin_value(source.group, "group", source)
            if source.coalesce and not unique_key and not chosen:
                unique_key = _origin_value(
                    f"{class_path(type(job))}:{source.coalesce}", "coalesce", source
                )
                if on_duplicate_given is None:
                    on_duplicate = "replace"
                if not group:  # the successor waits while the device's job runs (docs/iot.md)
                    group = unique_key
            if source.response_topic or source.status_topic:  # the job's status topic wins
                reply = reply_info(
                    source.response_topic,
                    source.correlation_data,
                    status_topic or source.status_topic,
                )
        max_length, overflow = settings.max_queue_length, settings.overflow
        if not max_length and self.settings.queue_max_lengths:
            max_length, bound_overflow = self._bound(queue)
            overflow = overflow or bound_overflow
        payload = encode(
            job,
            job_id=new_id,
            queue=queue,
            max_bytes=self.settings.queue_max_payload_bytes,
            settings=settings,
            result_ttl=self.settings.queue_result_ttl,
            failure_ttl=failure_ttl,
            reply=reply,
            delay=delay,
            deferred=bool(depends_on),
            trace=tracing.carrier(job, queue, new_id),
        )
        return OutgoingJob(
            new_id,
            queue,
            payload,
            delay,
            job=class_path(type(job)),
            max_tries=settings.max_tries,
            at_front=at_front,
            check_id=bool(chosen),
            unique_key=unique_key,
            unique_for=settings.unique_for,
            on_duplicate=on_duplicate,  # type: ignore[arg-type]
            ttl=settings.ttl,
            failure_ttl=failure_ttl,
            priority=priority,
            depends_on=depends_on if len(depends_on) < 2 else unique_dependencies(depends_on),
            rule=rule,
            limit=None if settings.limit is None else limit_of(job, settings),
            group=group,
            max_length=max_length,
            overflow=overflow or "reject",
        )

    def _bound(self, queue: str) -> tuple[int, Overflow]:
        """The `QUEUE_MAX_LENGTHS` entry of `queue`: (max length, overflow); 0 for none."""
        known = self._bounds.get(queue)
        if known is not None:
            return known
        length, policy = self.settings.queue_bound(queue)
        bound: tuple[int, Overflow] = (
            length,
            "drop_oldest" if policy == "drop_oldest" else "reject",
        )
        if len(self._bounds) < 10_000:  # queue names may come from devices
            self._bounds[queue] = bound
        return bound

    async def _settle(
        self, job: Job, outgoing: OutgoingJob, pushed: Pushed | None, connection: str
    ) -> JobHandle | DuplicateJobError | JobNotFoundError | QueueFullError:
        """The handle for what `push` did with one job (or the error of a rejected duplicate,
        or of a full queue); runs the dispatch hooks and event for a stored job."""
        if pushed is None:  # a driver that predates `Pushed`
            job_id, outcome = outgoing.id, "created"
        else:
            job_id, outcome = pushed.id, pushed.outcome
        if outcome == "duplicate":
            return _duplicate(outgoing, job_id)
        if outcome == "missing":
            return _missing(outgoing, job_id)
        if outcome == "full":
            return _full(outgoing)
        job.job_id = job_id
        if job_id != outgoing.id or not outgoing.check_id:
            # Not an id the caller chose: dispatching this instance again is a new job.
            job.__dict__[ASSIGNED_ID] = job_id
        if outcome == "created" or outcome == "replaced" or outcome == "spooled":
            if outcome != "replaced":
                self.dispatched += 1
            if hooks._dispatch:  # dispatch is a hot path: no coroutine when no hook listens
                await hooks.dispatched(job, job_id)
            if outcome != "replaced" and type(job).creation_hook is not None:
                await self._creation_hook(job)
            if events.active:
                events.emit(
                    JobEvent(
                        EventKind.DISPATCHED,
                        job_id,
                        outgoing.queue,
                        connection,
                        job=outgoing.job,
                    )
                )
        # Handles of the default manager go through the facade, which closes its connections.
        return JobHandle(job_id, outgoing.queue, connection, None if self is _default else self)

    async def _creation_hook(self, job: Job) -> None:
        """Run the job class's `creation_hook(job)` (the job is stored: what it raises is
        logged, and changes nothing)."""
        cls = type(job)
        hook = self._creation_hooks.get(cls)
        try:
            if hook is None:
                hook = self._creation_hooks[cls] = self._hook_of(cls)
            outcome = hook(job)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("creation_hook of %s failed for job %s", cls.__qualname__, job.job_id)

    def _hook_of(self, cls: type[Job]) -> Callable[..., Any]:
        value = cls.creation_hook
        if isinstance(value, str):
            return resolve_function(value, self.settings.queue_allowed_modules)
        if not callable(value):
            raise TypeError(
                f"{cls.__qualname__}.creation_hook must be a function or a dotted path, got "
                f"{value!r}"
            )
        return value

    async def _store(self, conn: str, jobs: Sequence[OutgoingJob]) -> Sequence[Pushed | None]:
        """Push `jobs` (one driver call), or spool them: when the spool already holds jobs of
        this connection, or the backend cannot be reached."""
        spool = self.spool
        if spool is not None and spool.holds(conn):
            await spool.add(conn, jobs)
            return [Pushed(job.id, "spooled") for job in jobs]
        try:
            batcher = self.batchers.get(conn)
            pushed: Sequence[Pushed | None] | None
            if batcher is None:
                pushed = await (await self.connection(conn)).push(jobs)
            else:
                pushed = await batcher.push(jobs)
        except ConnectionLostError:
            if spool is None:
                raise
            await spool.add(conn, jobs)  # SpoolFullError (a ConnectionLostError) when full
            return [Pushed(job.id, "spooled") for job in jobs]
        return pushed if pushed else [None] * len(jobs)

    def _load_hooks(self) -> None:
        self._hooks_loaded = True
        hooks.load()

    @overload
    async def push(
        self,
        job: Pushable,
        queue: str | None = None,
        connection: str | None = None,
        /,
        *,
        args: Sequence[Any] | None = None,
        wait: Delay | None = None,
        delay: Delay | None = None,
        job_id: str | None = None,
        at_front: bool | None = None,
        on_duplicate: OnDuplicate | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
        once_key: str = "",
        once_for: float = 0.0,
    ) -> JobHandle: ...

    @overload
    async def push(
        self,
        job: Pushable,
        /,
        *,
        queue: str | None = None,
        connection: str | None = None,
        args: Sequence[Any] | None = None,
        wait: Delay | None = None,
        delay: Delay | None = None,
        job_id: str | None = None,
        at_front: bool | None = None,
        on_duplicate: OnDuplicate | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
        once_key: str = "",
        once_for: float = 0.0,
    ) -> JobHandle: ...

    @overload
    async def push(
        self,
        job: Pushable,
        second: Pushable,
        /,
        *more: Pushable,
        queue: str | None = None,
        connection: str | None = None,
        args: Sequence[Any] | None = None,
        wait: Delay | None = None,
        delay: Delay | None = None,
        at_front: bool | None = None,
        on_duplicate: OnDuplicate | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
    ) -> list[JobHandle]: ...

    @tracing.traced_dispatch
    async def push(
        self,
        job: Any,
        /,
        *more: Any,
        queue: str | None = None,
        connection: str | None = None,
        args: Sequence[Any] | None = None,
        wait: Delay | None = None,
        delay: Delay | None = None,
        job_id: str | None = None,
        at_front: bool | None = None,
        on_duplicate: OnDuplicate | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
        once_key: str = "",
        once_for: float = 0.0,
    ) -> Any:
        """Queue `job` and return its handle. Nothing is queued if the job cannot be stored.

        Masonite's ways of calling: `job` may be a `Job` subclass (built with no arguments),
        a `@job` function or a plain module-level function (called with `args=`); `args=`
        given with a job class or instance is what its `handle(*args)` receives. Positional
        arguments after the job are the queue and connection (`push(job, "mail")`), or, when
        the first of them is a job, a job class or a function, more jobs: `push(job_a,
        job_b)` stores them in one round trip (as `bulk`) and returns their handles in order.
        `wait` is another name for `delay` ("10 minutes").

        `job_id` (or the job's own `job_id`, set before dispatch) names the job: if a job with
        that id is waiting or running on the queue, `on_duplicate` decides, as for a
        `unique_key`: "reject" raises `DuplicateJobError`, "keep" returns the existing job's
        handle, "replace" gives a waiting one this job's data. `at_front`, `on_duplicate` and
        `priority` override the job's settings for this dispatch.

        `depends_on` (a handle, a job id, or an iterable of them, on the same connection)
        makes the job wait (status `deferred`) until those jobs have succeeded; one that
        fails, expires or is cancelled cancels it, unless `allow_dependency_failure` (then it
        runs once they have all ended, however). An unknown dependency raises
        `JobNotFoundError` and nothing is queued.

        `once_key` (for schedulers) stores the job only if no push took that key in the last
        `once_for` seconds; otherwise nothing is stored and `DuplicateJobError` is raised.
        """
        if more or args is not None or wait is not None or not isinstance(job, Job):
            options: dict[str, Any] = {
                "queue": queue,
                "connection": connection,
                "args": args,
                "wait": wait,
                "delay": delay,
                "job_id": job_id,
                "at_front": at_front,
                "on_duplicate": on_duplicate,
                "depends_on": depends_on,
                "allow_dependency_failure": allow_dependency_failure,
                "priority": priority,
                "once_key": once_key,
                "once_for": once_for,
            }
            jobs = self._styled(job, more, options)
            if len(jobs) > 1:
                for key in ("job_id", "at_front", "on_duplicate", "once_key", "once_for"):
                    options.pop(key)
                return await self._bulk(jobs, **options)
            job = jobs[0]  # one job: on as a plain push, with what the call's style chose
            queue, connection, delay = options["queue"], options["connection"], options["delay"]
        if not self._hooks_loaded:
            self._load_hooks()
        conn, name = self._target(job, queue, connection)
        outgoing = self._outgoing(
            job,
            name,
            _delay_seconds(delay),
            job_id,
            at_front,
            on_duplicate,
            priority,
            () if depends_on is None else _dependencies(depends_on, conn),
            "succeeded" if allow_dependency_failure is False else _rule(allow_dependency_failure),
        )
        if once_key:
            outgoing = dataclasses.replace(outgoing, once_key=once_key, once_for=once_for)
        pushed = await self._store(conn, [outgoing])
        result = await self._settle(job, outgoing, pushed[0], conn)
        if isinstance(result, Exception):
            raise result
        return result

    def _styled(self, job: Any, more: tuple[Any, ...], options: dict[str, Any]) -> list[Job]:
        """The jobs a Masonite-style `push` call names; `options` is left with `queue`,
        `connection` and `delay` resolved (`args` and `wait` consumed). Several jobs: their
        `at_front` and `on_duplicate` (if given) are set on each one."""
        wait = options.pop("wait", None)
        if wait is not None:
            if options.get("delay") is not None:
                raise TypeError("push() got both wait= and delay=: wait is another name for delay")
            options["delay"] = wait
        args = options.pop("args", None)
        if args is not None and (
            isinstance(args, str | bytes | dict) or not isinstance(args, Sequence)
        ):
            raise TypeError(
                f"push(args=...) must be a list or tuple of arguments, got "
                f"{type(args).__name__} {args!r:.80}; for one argument write args=[value]"
            )
        items = [job]
        if more and (more[0] is None or isinstance(more[0], str)):
            if len(more) > 2 or not all(m is None or isinstance(m, str) for m in more):
                raise TypeError(
                    "push(job, queue, connection) takes at most a queue and a connection "
                    f"after the job, got {len(more)} more arguments: {more!r:.200}"
                )
            for name, value in zip(("queue", "connection"), more, strict=False):
                if value is not None:
                    if options.get(name) is not None:
                        raise TypeError(f"push() got the {name} twice: {value!r} and {name}=")
                    options[name] = value
        elif more:
            for index, item in enumerate(more, 2):
                if isinstance(item, str) or item is None:
                    raise TypeError(
                        f"push(): argument {index} is {item!r} after another job: several jobs "
                        "go to one call as push(job_a, job_b, ...), and their queue as "
                        f"queue={item!r}"
                    )
            if options.get("job_id") is not None:
                raise TypeError(
                    "push(job_id=...) names one job; with several jobs, set each job's own "
                    "job_id before pushing them"
                )
            if options.get("once_key"):
                raise TypeError("push(once_key=...) is for one job, not several")
            items.extend(more)
        jobs = [self._as_job(item, args) for item in items]
        if len(jobs) > 1:
            for key in ("at_front", "on_duplicate"):
                value = options.get(key)
                if value is not None:
                    for one in jobs:
                        setattr(one, key, value)  # instance settings, checked as they are
        return jobs

    def _as_job(self, item: Any, args: Sequence[Any] | None) -> Job:
        """One job from what `push` was given: an instance (with `handle(*args)`), a `Job`
        subclass built with no arguments, or a function called with `args`."""
        if isinstance(item, Job):
            job = item
        elif isinstance(item, type) and issubclass(item, Job):
            try:
                inspect.signature(item).bind()
            except TypeError:
                raise TypeError(
                    f"{item.__qualname__} cannot be built with no arguments "
                    f"{inspect.signature(item)}: pass an instance, push({item.__qualname__}(...))"
                ) from None
            except ValueError:
                pass  # no signature to read: try it
            job = item()
        elif isinstance(item, JobFunction) or inspect.isroutine(item):
            try:
                return function_job(item, () if args is None else list(args), {})
            except TypeError as exc:
                if args is not None or isinstance(exc, SerializationError):
                    raise
                name = getattr(item, "__qualname__", repr(item))
                raise TypeError(f"{exc}; give its arguments as push({name}, args=[...])") from None
        elif isinstance(item, str):
            raise TypeError(
                f"push() takes a job, not the path {item!r}; for a function by its path use "
                "Queue().enqueue(path, ...)"
            )
        else:
            raise SerializationError(
                f"only core.job.Job instances, Job classes and functions can be pushed, got "
                f"{type(item).__name__}"
            )
        if args is not None:
            try:
                _check_json(list(args))
            except TypeError as exc:
                raise SerializationError(
                    f"push(args=...) for {type(job).__qualname__} cannot be stored as JSON "
                    f"({exc}); use str, int, float, bool, None, and lists or dicts of them"
                ) from None
            job.__dict__["_topiq_args"] = list(args)
        return job

    async def later(
        self,
        delay: Delay,
        job: Job,
        queue: str | None = None,
        connection: str | None = None,
        **options: Any,
    ) -> JobHandle:
        """Queue `job` to run after `delay` (seconds, "10 minutes", timedelta or datetime);
        `options` as for `push` (`job_id`, `at_front`, `on_duplicate`, `depends_on`,
        `allow_dependency_failure`, `priority`). With dependencies, the delay counts from now
        and the job runs once both have passed."""
        if queue is not None:
            options["queue"] = queue
        if connection is not None:
            options["connection"] = connection
        handle: JobHandle = await self.push(job, delay=delay, **options)
        return handle

    @tracing.traced_dispatch
    async def bulk(
        self,
        jobs: Iterable[Job],
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
    ) -> list[JobHandle]:
        """Queue many jobs with one round trip per connection; returns their handles in order.

        Every job is encoded before anything is sent, so one bad job queues none of them. A job
        rejected as a duplicate (`on_duplicate="reject"`) does not stop the others: they are
        stored (each job's `job_id` says where), then `DuplicateJobError` is raised naming the
        rejected ones (`existing`: the first one's holder). Likewise, jobs refused by a full
        queue (`max_queue_length`, overflow "reject") do not stop the others: they are stored,
        then `QueueFullError` says how many were refused. `depends_on`,
        `allow_dependency_failure` and `priority` apply to each job, as for `push`; with an
        unknown dependency nothing is stored and `JobNotFoundError` is raised.
        """
        return await self._bulk(
            jobs,
            queue,
            connection,
            delay=delay,
            depends_on=depends_on,
            allow_dependency_failure=allow_dependency_failure,
            priority=priority,
        )

    async def _bulk(
        self,
        jobs: Iterable[Job],
        queue: str | None = None,
        connection: str | None = None,
        *,
        delay: Delay | None = None,
        depends_on: DependsOn = None,
        allow_dependency_failure: bool = False,
        priority: int | None = None,
    ) -> list[JobHandle]:
        if not self._hooks_loaded:
            self._load_hooks()
        seconds = _delay_seconds(delay)
        rule = _rule(allow_dependency_failure)
        groups: dict[str, list[tuple[int, Job, OutgoingJob]]] = defaultdict(list)
        count = 0
        needs: dict[str, tuple[Dependency, ...]] = {}
        for job in jobs:
            conn, name = self._target(job, queue, connection)
            if depends_on is not None and conn not in needs:
                needs[conn] = _dependencies(depends_on, conn)
            outgoing = self._outgoing(
                job, name, seconds, None, None, None, priority, needs.get(conn, ()), rule
            )
            groups[conn].append((count, job, outgoing))
            count += 1
        _refuse_repeated_ids(groups)
        handles: list[JobHandle | None] = [None] * count
        rejected: list[DuplicateJobError] = []
        full: list[QueueFullError] = []
        for conn, group in groups.items():
            pushed = await self._store(conn, [o for _, _, o in group])
            for (index, job, outgoing), done in zip(group, pushed, strict=True):
                result = await self._settle(job, outgoing, done, conn)
                if isinstance(result, JobNotFoundError):
                    raise result  # the dependency is unknown: no job of the call was stored
                if isinstance(result, DuplicateJobError):
                    rejected.append(result)
                elif isinstance(result, QueueFullError):
                    full.append(result)
                else:
                    handles[index] = result
        stored = [handle for handle in handles if handle is not None]
        queued = "no other job was queued"
        if stored:
            queued = "the others were queued (their handles: the error's `handles`)"
        if full:
            queues = ", ".join(dict.fromkeys(f"{e.queue} ({e.max_length} waiting)" for e in full))
            also = f"; {len(rejected)} more were duplicates" if rejected else ""
            raise QueueFullError(
                f"{len(full)} of {count} jobs not queued: their queue is full ({queues}){also}; "
                f"{queued}",
                queue=full[0].queue,
                max_length=full[0].max_length,
                handles=stored,
            )
        if rejected:
            listed = "; ".join(
                str(error).removesuffix("; nothing was queued") for error in rejected[:5]
            )
            more = f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            raise DuplicateJobError(
                f"{len(rejected)} of {count} jobs not queued as duplicates: {listed}{more}; "
                f"{queued}",
                existing=rejected[0].existing,
                handles=stored,
            )
        return stored

    # -- workflows ---------------------------------------------------------------------

    @tracing.traced_dispatch
    async def push_workflow(self, workflow: Workflow) -> WorkflowHandle:
        """Store a chain or batch (`chain(...)`, `batch(...)`) in one round trip; returns its
        handle. Every job is encoded before anything is sent, so one bad job stores nothing.

        A member rejected as a duplicate (`job_id` or `unique_key` taken, `on_duplicate`
        "reject"; or a `unique_key` held by another job, which it cannot stand in for) raises
        `DuplicateJobError`: the workflow's jobs that were stored are cancelled, so none of
        them runs (but a first member a worker had already started, which is asked to stop).
        """
        if not isinstance(workflow, Workflow):
            raise TypeError(
                f"push_workflow takes a chain(...) or batch(...), got {type(workflow).__name__}"
            )
        return await self._push_plan(self._plan(workflow))

    def _plan(self, workflow: Workflow) -> Planner:
        if not self._hooks_loaded:
            self._load_hooks()
        # Members take a route's group, but never coalesce (each member is a job of its own)
        # and are never refused by a queue's bound (a workflow is stored whole or not at all).
        source = current_origin.get()
        if source is not None and source.coalesce:
            with origin(dataclasses.replace(source, coalesce="")):
                plan = Planner(self, workflow)
        else:
            plan = Planner(self, workflow)
        for step in plan.steps:
            if step.outgoing.max_length:
                step.outgoing = dataclasses.replace(step.outgoing, max_length=0)
        return plan

    async def _push_plan(self, plan: Planner) -> WorkflowHandle:
        conn = plan.connection
        steps = plan.steps
        outgoing = [step.outgoing for step in steps]
        pushed: Sequence[Pushed] = [
            done or Pushed(o.id)
            for o, done in zip(outgoing, await self._store(conn, outgoing), strict=True)
        ]
        problem = _workflow_problem(plan.root.kind, steps, pushed)
        if problem is not None:
            # Its jobs, dependents first so that nothing is released. Not its records: one
            # waiting for the job that holds a member's id would cancel that job too; a record
            # ends by itself once its members have.
            stored = [
                (step.outgoing, done)
                for step, done in zip(steps, pushed, strict=True)
                if done.outcome == "created" and step.job is not None
            ]
            driver = await self.connection(conn)
            for out, done in reversed(stored):
                await driver.cancel(done.id, out.queue)
            raise problem
        handles: list[JobHandle | None] = []
        for step, done in zip(steps, pushed, strict=True):
            if step.job is None:
                handles.append(None)
                continue
            result = await self._settle(step.job, step.outgoing, done, conn)
            if isinstance(result, Exception):  # not reached: `_workflow_problem` saw it
                raise result
            handles.append(result)
        manager = None if self is _default else self

        def build(node: Node) -> JobHandle:
            if node.kind == "job":
                handle = handles[node.step]
                assert handle is not None
                return handle
            record = steps[node.step].outgoing
            return WorkflowHandle(
                record.id,
                record.queue,
                conn,
                manager,
                kind=node.kind,
                jobs=[build(member) for member in node.members],
                then_job=None if node.then is None else build(node.then),
                catch_job=None if node.catch is None else build(node.catch),
                finally_job=None if node.finally_ is None else build(node.finally_),
            )

        root = build(plan.root)
        assert isinstance(root, WorkflowHandle)
        return root

    # -- RQ's way of calling (core/queue/enqueue.py) --------------------------------------

    async def enqueue(self, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        """RQ's `enqueue` on the default queue (or a `@job` function's own); see `Queue`."""
        return await Queue(manager=self).enqueue(f, *args, **kwargs)

    async def enqueue_in(
        self, time_delta: timedelta | float, f: Any, *args: Any, **kwargs: Any
    ) -> JobHandle:
        """RQ's `enqueue_in` on the default queue; see `Queue.enqueue_in`."""
        return await Queue(manager=self).enqueue_in(time_delta, f, *args, **kwargs)

    async def enqueue_at(self, when: datetime, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        """RQ's `enqueue_at` on the default queue (naive datetimes are UTC)."""
        return await Queue(manager=self).enqueue_at(when, f, *args, **kwargs)

    async def enqueue_many(self, job_datas: Iterable[PreparedJob]) -> list[JobHandle]:
        """RQ's `enqueue_many` on the default queue: one round trip per connection."""
        return await Queue(manager=self).enqueue_many(job_datas)

    # -- single jobs -------------------------------------------------------------------

    def job(
        self, job_id: str, connection: str | None = None, *, queue: str | None = None
    ) -> JobHandle:
        """The handle of the job with this id (no I/O: ask it with `status()`, `result()`).

        `queue`, when known, spares the driver a search.
        """
        try:
            validate_job_id(job_id)
        except ValueError:
            raise ValueError(
                f"invalid job id {job_id!r}: job ids are 1 to 190 letters, digits and "
                "_ . : @ / + = -"
            ) from None
        return JobHandle(
            str(job_id),
            validate_queue(queue) if queue is not None else None,
            self.connection_name(connection),
            self,
        )

    async def cancel(
        self, job_id: str, connection: str | None = None, *, queue: str | None = None
    ) -> bool:
        """Cancel a job: a waiting one is removed, a running one is cancelled in its worker.
        `False` if it has ended already or is unknown."""
        return await self.job(job_id, connection, queue=queue).cancel()

    async def prune_records(self, connection: str | None = None) -> int:
        """Delete ended jobs' records past their keep time; returns how many (Redis: 0, its
        records expire by themselves)."""
        return await (await self.connection(connection)).prune_records()

    # -- inspecting --------------------------------------------------------------------

    async def size(self, queue: str | None = None, connection: str | None = None) -> int:
        """Jobs of `queue` not yet finished: pending, delayed and reserved."""
        driver = await self.connection(connection)
        return await driver.size(validate_queue(queue or self.settings.queue_default))

    async def stats(
        self, queue: str | None = None, connection: str | None = None
    ) -> list[QueueStats]:
        """Counts per queue (every queue the connection has seen, or just `queue`), with how
        many jobs ended each way over the last hour."""
        driver = await self.connection(connection)
        store = await self.failed_store(connection)
        names: Sequence[str] = [queue] if queue else await driver.queues()
        out = []
        for name in names:
            stats = await driver.stats(name)
            failed = await store.count(name)
            recent = await driver.recent(name, RECENT_WINDOW)
            out.append(
                QueueStats(
                    driver.name,
                    name,
                    stats.pending,
                    stats.delayed,
                    stats.reserved,
                    failed,
                    succeeded=recent.succeeded,
                    failed_recent=recent.failed,
                    cancelled=recent.cancelled,
                    expired=recent.expired,
                    deferred=stats.deferred,
                    coalesced=recent.coalesced,
                    dropped=recent.dropped,
                    rejected=recent.rejected,
                )
            )
        return out


#: Seconds `stats()` counts how jobs ended over (the last hour).
RECENT_WINDOW = 3600
_ON_DUPLICATE = get_args(OnDuplicate)
_CONNECTION_NAMES: dict[str, str] = {c.value: c.value for c in QueueConnection}


def _origin_value(value: str, what: str, source: Origin) -> str:
    """A route's rendered `group` or coalescing key, if a driver can store it; else
    `SerializationError` naming the route option and the message's topic."""
    if len(value) > 190 or _CONTROL.search(value):
        raise SerializationError(
            f"the route's {what}= made {value[:200]!r} from the message on {source.topic!r}: "
            "it must be at most 190 characters without control characters (the job class path "
            "included, for coalesce); nothing was queued"
        )
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _not_a_job(job: Any) -> SerializationError:
    if isinstance(job, JobFunction):
        name = job.function.__qualname__
        return SerializationError(
            f"{name} is a @job function: dispatch a call of it with `await {name}.dispatch(...)`"
            f" (or `await queue.push({name}, args=[...])`)"
        )
    return SerializationError(
        f"only core.job.Job instances can be dispatched, got {type(job).__name__}"
    )


def _check_json(value: Any) -> None:
    """`TypeError` saying what in `value` JSON cannot carry."""
    orjson.dumps(value, default=_not_json, option=orjson.OPT_PASSTHROUGH_DATETIME)


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _checked_id(value: Any, where: str) -> str:
    try:
        return validate_job_id(value, where)
    except ValueError as exc:
        raise SerializationError(str(exc)) from None


#: What `depends_on=` takes: a handle or job id, or an iterable of them (`None`: none).
DependsOn = str | Iterable[str] | None


def _rule(allow_dependency_failure: bool) -> DependencyRule:
    if allow_dependency_failure is True:
        return "ended"
    if allow_dependency_failure is False:
        return "succeeded"
    raise SerializationError(
        f"allow_dependency_failure must be True or False, got {allow_dependency_failure!r}"
    )


def _dependencies(depends_on: DependsOn, connection: str) -> tuple[Dependency, ...]:
    """`depends_on=` as the driver takes it: handles keep their queue; ids are checked."""
    items: Iterable[Any] = (depends_on,) if isinstance(depends_on, str) else depends_on or ()
    if isinstance(items, bytes | dict) or not isinstance(items, Iterable):
        raise SerializationError(
            f"depends_on takes a job handle, a job id, or a list of them, got {depends_on!r}"
        )
    out: list[Dependency] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise SerializationError(
                f"depends_on takes job handles or job ids, got {type(item).__name__} {item!r}"
            )
        job_id = _checked_id(str.__str__(item), "depends_on")
        if job_id in seen:
            continue
        seen.add(job_id)
        queue = None
        if isinstance(item, JobHandle):
            queue = item.queue
            if item.connection and item.connection != connection:
                raise SerializationError(
                    f"depends_on: job {job_id!r} is on the {item.connection!r} connection and "
                    f"this job goes to {connection!r}; a job can only wait for jobs of its own "
                    "connection"
                )
        out.append(Dependency(job_id, queue))
    return tuple(out)


def _workflow_problem(
    kind: str, steps: Sequence[Step], pushed: Sequence[Pushed]
) -> DuplicateJobError | JobNotFoundError | None:
    """Why the workflow could not be stored whole (the first part that was not), or `None`.

    Dependencies come before their dependents, so the first problem is the cause: a member
    not stored makes every part waiting for it "missing".
    """
    stored = sum(
        1
        for step, done in zip(steps, pushed, strict=True)
        if step.job and done.outcome == "created"
    )
    after = f"; its {stored} other jobs were stored and are cancelled" if stored else ""
    for step, done in zip(steps, pushed, strict=True):
        out = step.outgoing
        if done.outcome == "duplicate":
            error = str(_duplicate(out, done.id)).removesuffix("; nothing was queued")
            return DuplicateJobError(f"{kind} not dispatched: {error}{after}", existing=done.id)
        if done.outcome in ("kept", "replaced") and done.id != out.id:
            verb = "took its data" if done.outcome == "replaced" else "was kept"
            return DuplicateJobError(
                f"{kind} not dispatched: unique_key {out.unique_key!r} of {out.job} is held by "
                f"job {done.id!r} on queue {out.queue!r} (which {verb}); a workflow member "
                f"must be a job of its own{after}",
                existing=done.id,
            )
        if done.outcome == "missing":
            error = str(_missing(out, done.id)).removesuffix("; nothing was queued")
            return JobNotFoundError(f"{kind} not dispatched: {error}{after}")
    return None


def _refuse_repeated_ids(groups: dict[str, list[tuple[int, Job, OutgoingJob]]]) -> None:
    """`DuplicateJobError` (nothing sent) when one call names the same `job_id` twice on a
    connection: the second would only be refused, or replace the first."""
    for group in groups.values():
        if len(group) < 2:
            continue
        seen: set[str] = set()
        for index, _, outgoing in group:
            if not outgoing.check_id:
                continue
            if outgoing.id in seen:
                raise DuplicateJobError(
                    f"job id {outgoing.id!r} is given to more than one job of this call (job "
                    f"{index + 1} is {outgoing.job}); give each job its own id; nothing was "
                    "queued",
                )
            seen.add(outgoing.id)


def _full(outgoing: OutgoingJob) -> QueueFullError:
    return QueueFullError(
        f"queue {outgoing.queue} is full ({outgoing.max_length} waiting); nothing was queued",
        queue=outgoing.queue,
        max_length=outgoing.max_length,
    )


def _missing(outgoing: OutgoingJob, dependency: str) -> JobNotFoundError:
    return JobNotFoundError(
        f"job {outgoing.id} ({outgoing.job}) depends on unknown job {dependency} (never "
        "dispatched on this connection, or its record is no longer kept); nothing was queued"
    )


def _duplicate(outgoing: OutgoingJob, holder: str) -> DuplicateJobError:
    if outgoing.check_id and holder == outgoing.id:
        what = f"job id {outgoing.id!r} is taken by a waiting or running job"
    elif outgoing.once_key and not outgoing.unique_key:
        what = f"once_key {outgoing.once_key!r} was taken by job {holder!r}"
    else:
        what = f"unique_key {outgoing.unique_key!r} is held by job {holder!r}"
    return DuplicateJobError(
        f"{what} on queue {outgoing.queue!r} ({outgoing.job}, on_duplicate='reject'); "
        "nothing was queued",
        existing=holder,
    )


# -- the default manager and the facade ---------------------------------------------------

_default: QueueManager | None = None


def set_default_manager(manager: QueueManager | None) -> None:
    """Make `manager` the one `dispatch` and `queue` use (the app and worker call this)."""
    global _default
    _default = manager


def get_default_manager() -> QueueManager:
    """The default manager, configured from the settings on first use."""
    global _default
    if _default is None:
        _default = QueueManager()
    return _default


async def _close_with_loop(manager: QueueManager) -> AsyncIterator[None]:
    # asyncio.run() finalises async generators before closing its loop, which runs this
    # `finally` there: connections opened by the facade close with the loop that owns them.
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await manager.close()


class _Facade:
    """`queue`: the default manager's methods, reachable before any manager exists."""

    _closers: dict[int, AsyncIterator[None]] = {}

    async def _manager(self) -> QueueManager:
        manager = get_default_manager()
        loop = asyncio.get_running_loop()
        if id(loop) not in self._closers:
            closer = _close_with_loop(manager)
            await anext(closer)
            self._closers.clear()
            self._closers[id(loop)] = closer
        return manager

    @overload
    async def push(
        self,
        job: Pushable,
        queue: str | None = None,
        connection: str | None = None,
        /,
        **kwargs: Any,
    ) -> JobHandle: ...

    @overload
    async def push(
        self, job: Pushable, second: Pushable, /, *more: Pushable, **kwargs: Any
    ) -> list[JobHandle]: ...

    async def push(self, job: Any, /, *args: Any, **kwargs: Any) -> Any:
        """`QueueManager.push` on the default manager (one job: its handle; several: a list)."""
        return await (await self._manager()).push(job, *args, **kwargs)

    async def later(self, delay: Delay, job: Job, *args: Any, **kwargs: Any) -> JobHandle:
        return await (await self._manager()).later(delay, job, *args, **kwargs)

    async def bulk(self, jobs: Iterable[Job], *args: Any, **kwargs: Any) -> list[JobHandle]:
        return await (await self._manager()).bulk(jobs, *args, **kwargs)

    async def push_workflow(self, workflow: Workflow) -> WorkflowHandle:
        return await (await self._manager()).push_workflow(workflow)

    async def enqueue(self, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        """RQ's `enqueue` on the default manager's default queue; see `Queue.enqueue`."""
        return await Queue().enqueue(f, *args, **kwargs)

    async def enqueue_in(
        self, time_delta: timedelta | float, f: Any, *args: Any, **kwargs: Any
    ) -> JobHandle:
        return await Queue().enqueue_in(time_delta, f, *args, **kwargs)

    async def enqueue_at(self, when: datetime, f: Any, *args: Any, **kwargs: Any) -> JobHandle:
        return await Queue().enqueue_at(when, f, *args, **kwargs)

    async def enqueue_many(self, job_datas: Iterable[PreparedJob]) -> list[JobHandle]:
        return await Queue().enqueue_many(job_datas)

    def job(
        self, job_id: str, connection: str | None = None, *, queue: str | None = None
    ) -> JobHandle:
        """The handle of the job with this id, on the default manager (no I/O)."""
        handle = get_default_manager().job(job_id, connection, queue=queue)
        handle._manager = None  # its calls go through this facade (connections closed with it)
        return handle

    async def cancel(
        self, job_id: str, connection: str | None = None, *, queue: str | None = None
    ) -> bool:
        return await self.job(job_id, connection, queue=queue).cancel()

    async def prune_records(self, connection: str | None = None) -> int:
        return await (await self._manager()).prune_records(connection)

    def fake(self, settings: Settings | None = None) -> contextlib.AbstractContextManager[Any]:
        """`with queue.fake() as fake:` records dispatches instead of storing them (for tests;
        see `core.testing.fake_queue`)."""
        from core.testing import fake_queue

        return fake_queue(settings)

    async def size(self, queue: str | None = None, connection: str | None = None) -> int:
        return await (await self._manager()).size(queue, connection)

    async def stats(
        self, queue: str | None = None, connection: str | None = None
    ) -> list[QueueStats]:
        return await (await self._manager()).stats(queue, connection)


queue = _Facade()


async def dispatch(
    job: Job,
    *,
    delay: Delay | None = None,
    job_id: str | None = None,
    at_front: bool | None = None,
    on_duplicate: OnDuplicate | None = None,
    depends_on: DependsOn = None,
    allow_dependency_failure: bool = False,
    priority: int | None = None,
) -> JobHandle:
    """Queue `job` on its own queue and connection; returns its handle (a `str` subclass equal
    to the job id). Options as for `QueueManager.push`."""
    if not isinstance(job, Job):
        raise _not_a_job(job)
    return await queue.push(
        job,
        delay=delay,
        job_id=job_id,
        at_front=at_front,
        on_duplicate=on_duplicate,
        depends_on=depends_on,
        allow_dependency_failure=allow_dependency_failure,
        priority=priority,
    )


# RQ's way of calling; imported last: core.queue.enqueue reaches this module only at call time.
from core.queue.enqueue import (  # noqa: E402
    Callback,
    PreparedJob,
    Queue,
    RetryPolicy,
    prepare_data,
)
