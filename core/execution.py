"""Running one try of a job, for whoever runs it: the worker, and the `sync` connection.

One try, in this order:

1. `hooks.starting(job)` (the application's `before_run` hooks; one that raises fails the try);
2. the job's middleware, outermost first, around
3. the job's body:
   - a plain job: `pre_task_hook(job)` (raising fails the try, `handle()` does not run), then
     `handle()` (`handle(*args)` with the Masonite args), under its timeout (a plain
     `def handle` in a thread), then `post_task_hook(job)` when it returned;
   - a multi-step job (`steps`): from step `_topiq_step`, for each step:
     `pre_task_hook(job)`, the step, the checkpoint (`_topiq_step += 1`, the payload with the
     workspace saved with `Driver.save_payload`), `post_task_hook(job)`; the whole try under
     the job's timeout; the result is the workspace;
4. RQ's success callback `on_success(job, connection, result)`, under its own timeout: if it
   raises or times out, the try fails (retried, or failed for good);
5. then, on success: `job.succeeded(result)` (what it raises is logged: the job still
   succeeded), then `hooks.finished(job, succeeded, result)`;
   on a try that will be retried: `hooks.finished(job, retrying, exc)`, the retry is
   scheduled, then `post_task_hook(job)` if the body raised;
   on the last failure: `job.failed(exc)` (or Masonite's `failed(payload, exc)`),
   `failure_hook(job, exc)`, RQ's `on_failure(job, connection, type, value, traceback)`,
   `hooks.failing(job, exc)`, `hooks.finished(job, failed, exc)`, then `post_task_hook(job)`
   if the body raised;
   on a cancel: RQ's `on_stopped(job, connection)`, `hooks.finished(job, cancelled, exc)`,
   then `post_task_hook(job)` (`failed()` is not called).
   What steps 5's hooks and callbacks raise is logged only.

Every hook and callback runs as `handle()` does: a sync one in one of the worker's job threads
(never on the event loop), given up when its thread still runs `stop_within` past its timeout;
an async one under a timer and a flag (it times out even if it swallows the cancellation).
One that will not stop inside the try (pre-task hook, success callback) gives the try up as a
stuck `handle`; one whose errors are logged only stops the worker (`Site.stuck`) and leaves the
outcome as it is. `SystemExit` and `KeyboardInterrupt` raised by the job's code fail the try
(or are logged), never its worker's task.

The runner decides *when* a job is retried or recorded (leases, the failed-job store); this
module says *what* runs around `handle()` and how the outcome is written (`Outcome`), so the
two runners cannot drift apart. It knows nothing of the worker or of MQTT. The per-class
reading of steps and hooks is `core.steps`: a class that uses none of it, and a job without
Masonite args or RQ options, take the hot path (`call_handle` alone).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from core import tracing
from core.errors import ConfigurationError, JobTimeoutError, TopiqError
from core.events import EventKind, JobEvent, events
from core.hooks import hooks
from core.job import Job, JobMiddleware
from core.queue.drivers.base import FailedJob, Outcome, ReservedJob
from core.status import Status
from core.steps import (
    ARGS,
    CALLBACKS,
    DESCRIPTION,
    EXTRAS,
    META,
    PLANS,
    POST_DUE,
    STEP,
    Call,
    ClassPlan,
    checkpoint_payload,
    failed_payload,
    plan_of,
    resolve_path,
)

__all__ = [
    "JobAbandonedError",
    "JobThreads",
    "LeaseLostError",
    "Site",
    "call_failed",
    "call_handle",
    "call_succeeded",
    "cancelled_outcome",
    "describe",
    "emit",
    "failed_outcome",
    "failed_record",
    "first_wait",
    "job_path",
    "on_cancelled",
    "on_failed",
    "on_retried",
    "on_retrying",
    "on_succeeded",
    "outcome_info",
    "run_try",
    "succeeded_outcome",
    "wants_success_calls",
]

logger = logging.getLogger("topiq.worker")

#: Whether each job class's `handle` function is a coroutine function (asked once per
#: function). Keyed on, and asked of, the class's own function: never an instance attribute,
#: which a payload could otherwise set to poison the answer for every later job of the class.
_ASYNC_HANDLE: dict[Callable[..., Any], bool] = {}


class JobAbandonedError(JobTimeoutError):
    """A try outlived its timeout and would not stop: its worker gave it up and exits.

    An async `handle` that swallows its cancellation, or a sync `handle` whose thread (which
    cannot be killed) is still running a moment past the timeout.
    """


class JobThreads:
    """The threads sync `handle`s run in: one per slot of the worker.

    Kept apart from the event loop's default executor, so `asyncio.to_thread` inside jobs never
    waits behind them. `busy` counts threads still running a `handle`, abandoned ones included.
    """

    def __init__(self, size: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="topiq-job")
        self._lock = threading.Lock()
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    def start(self, function: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `function` in a thread with the caller's context; never `await` the result
        directly (cancelling that would not stop the thread): use `asyncio.wait`."""
        context = contextvars.copy_context()

        def run() -> Any:
            try:
                return context.run(function)
            finally:
                with self._lock:
                    self._busy -= 1

        with self._lock:
            self._busy += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, run)
        # An abandoned thread's error is nobody's to read: take it so asyncio does not log it.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def shutdown(self) -> None:
        """Let the threads go; does not wait for one still running."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def call_handle(
    job: Job,
    timeout: float,
    threads: JobThreads | None = None,
    *,
    stop_within: float = 0.0,
    on_stuck: Callable[[JobAbandonedError], None] | None = None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
    args: Sequence[Any] = (),
) -> Awaitable[Any]:
    """Run `job.handle(*args)`, cancelled after `timeout` seconds (then `JobTimeoutError`).

    A plain `def handle` runs in one of `threads` so it cannot stall the event loop. A thread
    cannot be stopped: if it is still running `stop_within` seconds past the timeout, this
    raises `JobAbandonedError` and the thread is left to itself. An async `handle` that
    swallows its cancellation and is still running `stop_within` seconds later cannot be
    stopped either: `on_stuck` is called (from the event loop) with the error to record, and
    this call keeps waiting for the job, whose result no longer matters. Without `threads`
    (the sync connection), sync handles use the loop's default executor. `on_thread` is
    given the future of a sync handle's thread as it starts (to learn when it really ends).
    """
    function = type(job).handle
    is_async = _ASYNC_HANDLE.get(function)
    if is_async is None:
        is_async = _ASYNC_HANDLE[function] = inspect.iscoroutinefunction(function)
    handle = job.handle  # the method itself: the loader refuses data that would shadow it
    if args:
        handle = functools.partial(handle, *args)
    elif is_async and timeout > 0:  # the hot path: straight to the timed call
        return _call_async(job, handle, timeout, stop_within, on_stuck, timeout)
    return _timed_call(
        job, handle, is_async, timeout, threads, stop_within, on_stuck, on_thread, timeout
    )


def _timed_call(
    job: Job,
    call: Callable[[], Any],
    is_async: bool,
    timeout: float,
    threads: JobThreads | None,
    stop_within: float,
    on_stuck: Callable[[JobAbandonedError], None] | None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None,
    reported: float,
    what: str = "",
) -> Awaitable[Any]:
    """`call()` (a job's `handle`, one of its steps, hooks or callbacks) under `timeout`;
    `reported` is the timeout the errors name (the job's, when `timeout` is what is left of
    it), `what` what they name (default: the job's class)."""
    if not is_async:
        return _call_in_thread(job, call, timeout, threads, stop_within, on_thread, reported, what)
    if timeout <= 0:
        return call()  # type: ignore[no-any-return]
    return _call_async(job, call, timeout, stop_within, on_stuck, reported, what)


async def _call_async(
    job: Job,
    call: Callable[[], Any],
    timeout: float,
    stop_within: float,
    on_stuck: Callable[[JobAbandonedError], None] | None,
    reported: float,
    what: str = "",
) -> Any:
    # A bare timer and a flag: what asyncio.timeout() does, at a third of its cost per job.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    expired = finished = False

    def stuck() -> None:
        if not finished and on_stuck is not None:
            on_stuck(
                JobAbandonedError(
                    f"{what or type(job).__qualname__} timed out after {reported:g}s and did "
                    f"not stop within {stop_within:g}s of being cancelled (try {job.attempts})"
                )
            )

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()
        if on_stuck is not None:
            loop.call_later(stop_within, stuck)

    timer = loop.call_later(timeout, expire)
    try:
        result = await call()
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise _timed_out(job, reported, what) from None
        raise
    finally:
        finished = True
        timer.cancel()
    if expired:  # the job swallowed our cancellation and returned: the try still timed out
        task.uncancel()
        raise _timed_out(job, reported, what)
    return result


def _timed_out(job: Job, timeout: float, what: str = "") -> JobTimeoutError:
    return JobTimeoutError(
        f"{what or type(job).__qualname__} timed out after {timeout:g}s (try {job.attempts})"
    )


async def _call_in_thread(
    job: Job,
    handle: Callable[[], Any],
    timeout: float,
    threads: JobThreads | None,
    stop_within: float,
    on_thread: Callable[[asyncio.Future[Any]], None] | None,
    reported: float,
    what: str = "",
) -> Any:
    if threads is None:
        future = asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, handle
        )
    else:
        future = threads.start(handle)
    if on_thread is not None:
        on_thread(future)
    # asyncio.wait never cancels the future: cancelling this call leaves the thread running.
    await asyncio.wait({future}, timeout=timeout if timeout > 0 else None)
    if future.done():
        return future.result()
    await asyncio.wait({future}, timeout=stop_within)
    if future.done():
        raise _timed_out(job, reported, what)
    raise JobAbandonedError(
        f"{what or type(job).__qualname__} timed out after {reported:g}s and its thread, which "
        f"cannot be stopped, was still running {stop_within:g}s later (try {job.attempts})"
    )


async def _call_quietly(job: Job, call: Callable[[], Any], timeout: float, what: str) -> None:
    """Call one of the job's own callbacks (sync or async) under `timeout`; what it raises is
    logged as `what`, never propagated."""
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            outcome = call()
            if inspect.isawaitable(outcome):
                await outcome
    except asyncio.CancelledError:
        raise
    except BaseException:  # SystemExit, KeyboardInterrupt too: logged, never a lost task
        logger.exception("job %s %s: %s", job.job_id, type(job).__qualname__, what)


async def call_failed(
    job: Job, exception: BaseException, timeout: float, reserved: ReservedJob | None = None
) -> None:
    """Call `job.failed(exception)`, or Masonite's `job.failed(payload, exception)` when the
    class's `failed` takes two arguments; what it raises is logged, never propagated."""
    call: Callable[[], Any]
    if plan_of(type(job)).failed_takes_payload:
        raw = None if reserved is None else reserved.payload
        queue = None if reserved is None else reserved.queue
        payload = failed_payload(job, raw, queue)
        failed: Callable[..., Any] = job.failed
        call = functools.partial(failed, payload, exception)
    else:
        call = functools.partial(job.failed, exception)
    await _call_quietly(job, call, timeout, "failed() raised")


def describe(exc: BaseException) -> str:
    """The exception's type and message, one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def failed_record(connection: str, reserved: ReservedJob, exc: BaseException) -> FailedJob:
    """The failed-store record for a job that failed for good."""
    return FailedJob(
        id=reserved.id,
        connection=connection,
        queue=reserved.queue,
        payload=reserved.payload.decode("utf-8", "replace"),
        exception="".join(traceback.format_exception(exc)),
        failed_at=datetime.now(UTC),
    )


# -- one try: hooks, middleware, handle -------------------------------------------------


class LeaseLostError(TopiqError):
    """A step job's checkpoint found its reservation gone (its lease lapsed and another
    worker may hold the job): the try stops, as a try whose lease was lost does."""


@dataclass(frozen=True, slots=True)
class Site:
    """Who runs a try, for what goes beyond `handle()`: the connection's name (RQ callbacks'
    `connection` argument), the modules a callback's path may name, the payload size limit,
    and `save(reserved, payload) -> bool`, a step job's checkpoint (`Driver.save_payload`;
    False: the reservation is gone).

    Sync hooks and callbacks run as a sync `handle` does: in `threads` (none: the loop's
    default executor), given up `stop_within` seconds past their timeout. `stuck` is told of
    one whose errors are logged only (post-task and failure hooks, RQ's failure and stopped
    callbacks) that would not stop: the runner stops taking jobs and exits, as for a stuck
    `handle`, without changing the job's outcome.
    """

    connection: str
    allowed: tuple[str, ...]
    max_bytes: int
    save: Callable[[ReservedJob, bytes], Awaitable[bool]]
    threads: JobThreads | None = None
    stop_within: float = 0.0
    stuck: Callable[[JobAbandonedError], None] | None = None


def run_try(
    job: Job,
    timeout: float,
    threads: JobThreads | None = None,
    *,
    stop_within: float = 0.0,
    on_stuck: Callable[[JobAbandonedError], None] | None = None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
    site: Site | None = None,
    reserved: ReservedJob | None = None,
) -> Awaitable[Any]:
    """`hooks.starting(job)`, then the job's middleware (outermost first) around its body
    (`handle()` with its pre/post-task hooks, or its steps), then RQ's success callback; await
    it for the result as the middleware passes it on.

    The timeout covers `handle()` itself (a step job: all its steps); what a middleware does
    around `call_next()` is not timed. With no hook, no middleware, no step and none of the
    seed systems' options on the job this is `call_handle` itself (the hot path: the class is
    read once, the job's state with one set test). A step job's checkpoints need `site` and
    `reserved` (without them, steps are not saved). When the process traces
    (core/tracing.py), all of it runs in the try's `run <Class>` span.
    """
    chain: Sequence[JobMiddleware] = job.middleware()
    plan = PLANS.get(type(job))
    if plan is None:
        plan = plan_of(type(job), site.allowed if site is not None else ("",))
    if plan.plain and not chain and not hooks.any_run_hooks and EXTRAS.isdisjoint(job.__dict__):
        return tracing.running(
            job,
            call_handle(
                job,
                timeout,
                threads,
                stop_within=stop_within,
                on_stuck=on_stuck,
                on_thread=on_thread,
            ),
        )
    body = _Body(job, plan, timeout, threads, stop_within, on_stuck, on_thread, site, reserved)
    return tracing.running(job, _wrapped_try(body, chain))


@dataclass(slots=True)
class _Body:
    """What runs inside the middleware: `handle()` or the steps, with the per-class hooks."""

    job: Job
    plan: ClassPlan
    timeout: float
    threads: JobThreads | None
    stop_within: float
    on_stuck: Callable[[JobAbandonedError], None] | None
    on_thread: Callable[[asyncio.Future[Any]], None] | None
    site: Site | None
    reserved: ReservedJob | None

    async def __call__(self) -> Any:
        job, plan = self.job, self.plan
        if plan.steps:
            return await self._steps()
        state = job.__dict__
        try:
            if plan.pre is not None:
                await self._pre_hook(self.timeout)
            result = await call_handle(
                job,
                self.timeout,
                self.threads,
                stop_within=self.stop_within,
                on_stuck=self.on_stuck,
                on_thread=self.on_thread,
                args=state.get(ARGS) or (),
            )
        except BaseException:
            if plan.post is not None:
                state[POST_DUE] = True
            raise
        if plan.post is not None:
            await self._post_hook()
        return result

    async def _pre_hook(self, left: float) -> None:
        """The pre-task hook, inside the try (`left`: seconds left of its timeout): what it
        raises fails the try; run as `handle` is (a sync one in a job thread)."""
        hook = self.plan.pre
        assert hook is not None
        await _run_hook(
            self.job,
            functools.partial(hook.fn, self.job),
            hook.is_async,
            left,
            self.threads,
            self.stop_within,
            self.on_stuck,
            self.on_thread,
            self.timeout,
        )

    async def _post_hook(self) -> None:
        """The post-task hook after a step or `handle()` returned: what it raises is logged;
        one that will not stop stops the worker (`Site.stuck`), the try goes on."""
        hook = self.plan.post
        assert hook is not None
        site = self.site
        await _quiet_hook(
            self.job,
            functools.partial(hook.fn, self.job),
            hook.is_async,
            self.timeout,
            hook.name,
            self.threads,
            self.stop_within,
            site.stuck if site is not None else None,
            self.on_thread,
        )

    async def _steps(self) -> Any:
        job, plan, timeout = self.job, self.plan, self.timeout
        state = job.__dict__
        if not isinstance(state.get("workspace"), dict):
            workspace = getattr(job, "workspace", None)
            if workspace is None:
                state["workspace"] = {}
            elif isinstance(workspace, dict):
                state["workspace"] = dict(workspace)  # the class's default: never shared
            else:
                raise TypeError(
                    f"{type(job).__qualname__}.workspace must be a dict, got "
                    f"{type(workspace).__name__}"
                )
        steps = plan.steps
        index = state.get(STEP, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        while index < len(steps):
            step = steps[index]
            try:
                left = _left(job, deadline, loop, timeout)
                if plan.pre is not None:
                    await self._pre_hook(left)
                    left = _left(job, deadline, loop, timeout)
                await _timed_call(
                    job,
                    functools.partial(step.fn, job),
                    step.is_async,
                    left,
                    self.threads,
                    self.stop_within,
                    self.on_stuck,
                    self.on_thread,
                    timeout,
                )
                index += 1
                state[STEP] = index
                # A checkpoint that fails (not JSON, too large, lease lost) fails the step's
                # try: its post-task hook is owed as for a step that raised.
                await self._checkpoint()
            except BaseException:
                if plan.post is not None:
                    state[POST_DUE] = True
                raise
            if plan.post is not None:
                await self._post_hook()
        return state["workspace"]

    async def _checkpoint(self) -> None:
        site, reserved = self.site, self.reserved
        if site is None or reserved is None:
            return
        payload = checkpoint_payload(self.job, reserved.payload, site.max_bytes)
        if not await site.save(reserved, payload):
            raise LeaseLostError(
                f"job {reserved.id}: its reservation was gone when its progress to step "
                f"{self.job.__dict__.get(STEP, 0)} was to be saved"
            )
        reserved.payload = payload


def _left(
    job: Job, deadline: float | None, loop: asyncio.AbstractEventLoop, timeout: float
) -> float:
    """Seconds left of the try's timeout (0: no timeout); `JobTimeoutError` once spent."""
    if deadline is None:
        return 0.0
    left = deadline - loop.time()
    if left <= 0:
        raise _timed_out(job, timeout)
    return left


async def _run_hook(
    job: Job,
    call: Callable[[], Any],
    is_async: bool,
    timeout: float,
    threads: JobThreads | None,
    stop_within: float,
    on_stuck: Callable[[JobAbandonedError], None] | None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None,
    reported: float,
    what: str = "",
) -> Any:
    """A hook or callback of the job's, run as a `handle` is (`_timed_call`): a sync one in
    one of `threads` (the loop's default executor without them), given up with
    `JobAbandonedError` when its thread still runs `stop_within` seconds past `timeout`; an
    async one under a timer and a flag, so it times out even if it swallows its cancellation
    (`on_stuck` when it will not stop). Raises what the call raises, or `JobTimeoutError`."""
    result = await _timed_call(
        job, call, is_async, timeout, threads, stop_within, on_stuck, on_thread, reported, what
    )
    if not is_async and inspect.isawaitable(result):  # a plain callable handing back a coroutine
        result = await _timed_call(
            job, lambda: result, True, timeout, None, stop_within, on_stuck, None, reported, what
        )
    return result


async def _quiet_hook(
    job: Job,
    call: Callable[[], Any],
    is_async: bool,
    timeout: float,
    what: str,
    threads: JobThreads | None,
    stop_within: float,
    stuck: Callable[[JobAbandonedError], None] | None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
) -> None:
    """`_run_hook` for a hook or callback whose errors are logged only (SystemExit and
    KeyboardInterrupt too). One that will not stop is reported to `stuck` (the worker stops
    and exits, as for a stuck `handle`); the job's outcome does not change."""
    try:
        await _run_hook(
            job, call, is_async, timeout, threads, stop_within, stuck, on_thread, timeout, what
        )
    except JobAbandonedError as exc:
        if stuck is not None:
            stuck(exc)
        else:
            logger.error("job %s %s: %s", job.job_id, type(job).__qualname__, exc)
    except asyncio.CancelledError:
        raise
    except BaseException:
        logger.exception(
            "job %s %s: %s raised (logged only)", job.job_id, type(job).__qualname__, what
        )


async def _site_hook(
    job: Job, hook: Call, args: tuple[Any, ...], timeout: float, site: Site | None
) -> None:
    """A per-class hook run after the try (post-task owed, failure hook): logged only."""
    await _quiet_hook(
        job,
        functools.partial(hook.fn, job, *args),
        hook.is_async,
        timeout,
        hook.name,
        site.threads if site is not None else None,
        site.stop_within if site is not None else 0.0,
        site.stuck if site is not None else None,
    )


async def _owed_post_hook(job: Job, timeout: float, site: Site | None = None) -> None:
    """The post-task hook owed for a body that raised, once the failure is handled."""
    if job.__dict__.pop(POST_DUE, False):
        plan = plan_of(type(job))
        if plan.post is not None:
            await _site_hook(job, plan.post, (), timeout, site)


async def _wrapped_try(body: _Body, chain: Sequence[JobMiddleware]) -> Any:
    job = body.job
    if hooks.any_run_hooks:
        await hooks.starting(job)
    if body.plan.problem is not None:
        raise ConfigurationError(body.plan.problem)

    def link(index: int) -> Callable[[], Awaitable[Any]]:
        if index == len(chain):
            return body
        middleware = chain[index]
        rest = link(index + 1)
        return lambda: middleware(job, rest)

    result = await link(0)()
    callbacks = job.__dict__.get(CALLBACKS)
    if callbacks and "success" in callbacks:
        # Inside the try, as `handle()`: a sync one in a job thread; one that will not stop
        # gives the try up as a stuck `handle` does.
        await _callback(
            job,
            "success",
            callbacks["success"],
            body.site,
            (result,),
            body.threads,
            body.stop_within,
            body.on_stuck,
            body.on_thread,
        )
    return result


# -- RQ's callbacks -------------------------------------------------------------------------

#: Seconds a callback may run when it says nothing (RQ's default).
CALLBACK_TIMEOUT = 60.0
_RESOLVED: dict[tuple[str, tuple[str, ...]], tuple[Callable[..., Any], bool]] = {}


async def _callback(
    job: Job,
    kind: str,
    spec: Any,
    site: Site | None,
    args: tuple[Any, ...],
    threads: JobThreads | None,
    stop_within: float,
    on_stuck: Callable[[JobAbandonedError], None] | None,
    on_thread: Callable[[asyncio.Future[Any]], None] | None = None,
) -> None:
    """Call RQ's `kind` callback `fn(job, connection, *args)` under its own timeout, as a
    `handle` is run (`_run_hook`: a sync one in one of `threads`); raises what it raises,
    `JobTimeoutError`, or `JobAbandonedError` when it would not stop."""
    path = spec.get("path") if isinstance(spec, dict) else spec
    if not isinstance(path, str):
        raise ConfigurationError(f"the {kind} callback has no path: {spec!r}")
    raw_timeout = spec.get("timeout") if isinstance(spec, dict) else None
    limit = CALLBACK_TIMEOUT if raw_timeout is None else float(raw_timeout)
    allowed = site.allowed if site is not None else ("",)
    key = (path, allowed)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        try:
            fn = resolve_path(path, allowed)
        except Exception as exc:
            raise ConfigurationError(f"the {kind} callback {path!r}: {exc}") from exc
        resolved = (fn, inspect.iscoroutinefunction(fn))
        if len(_RESOLVED) < 1024:
            _RESOLVED[key] = resolved
    fn, is_async = resolved
    connection = site.connection if site is not None else ""
    call = functools.partial(fn, job, connection, *args)
    what = f"the {kind} callback {path} of {type(job).__qualname__}"
    try:
        await _run_hook(
            job, call, is_async, limit, threads, stop_within, on_stuck, on_thread, limit, what
        )
    except (SystemExit, KeyboardInterrupt) as exc:
        # RQ code may call sys.exit() in a callback: it fails the callback, not the worker.
        raise CallbackError(f"{what} raised {exc!r}") from exc


class CallbackError(TopiqError):
    """RQ's callback raised `SystemExit` or `KeyboardInterrupt`: a failure of the callback."""


async def _quiet_callback(job: Job, kind: str, site: Site | None, args: tuple[Any, ...]) -> None:
    """RQ's failure or stopped callback, if the job has one: what it raises is logged only;
    one that would not stop stops the worker (`Site.stuck`)."""
    callbacks = job.__dict__.get(CALLBACKS)
    if not callbacks or kind not in callbacks:
        return
    stuck = site.stuck if site is not None else None
    try:
        await _callback(
            job,
            kind,
            callbacks[kind],
            site,
            args,
            site.threads if site is not None else None,
            site.stop_within if site is not None else 0.0,
            stuck,
        )
    except JobAbandonedError as exc:
        if stuck is not None:
            stuck(exc)
        else:
            logger.error("job %s %s: %s", job.job_id, type(job).__qualname__, exc)
    except Exception:
        logger.exception(
            "job %s %s: the %s callback raised (logged only)",
            job.job_id,
            type(job).__qualname__,
            kind,
        )


def wants_success_calls(job: Job) -> bool:
    """Whether `on_succeeded` has anything to call for this job (skipped on the hot path)."""
    return hooks.any_run_hooks or type(job).succeeded is not Job.succeeded


async def call_succeeded(job: Job, result: Any, timeout: float) -> None:
    """Call `job.succeeded(result)`; what it raises is logged, and the job still succeeded."""
    await _call_quietly(
        job,
        lambda: job.succeeded(result),
        timeout,
        "succeeded() raised (the job still succeeded)",
    )


async def on_succeeded(job: Job, result: Any, timeout: float) -> None:
    """After a try succeeded: `job.succeeded(result)`, then the `after_run` hooks."""
    if type(job).succeeded is not Job.succeeded:
        await call_succeeded(job, result, timeout)
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.SUCCEEDED, result)


async def on_retrying(job: Job, exc: BaseException) -> None:
    """After a try that failed (or asked for a retry) and will run again, before the retry
    is scheduled."""
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.RETRYING, exc)


async def on_retried(job: Job, timeout: float, site: Site | None = None) -> None:
    """Once the retry is scheduled: the post-task hook owed for a body that raised."""
    if POST_DUE in job.__dict__:
        await _owed_post_hook(job, timeout, site)


async def on_failed(
    job: Job,
    exc: BaseException,
    timeout: float,
    site: Site | None = None,
    reserved: ReservedJob | None = None,
) -> None:
    """After the last try failed: `job.failed(exc)`, `failure_hook`, RQ's failure callback,
    the `on_failure` hooks, the `after_run` hooks, then the post-task hook owed."""
    await call_failed(job, exc, timeout, reserved)
    failure = plan_of(type(job), site.allowed if site is not None else ("",)).failure
    if failure is not None:
        await _site_hook(job, failure, (exc,), timeout, site)
    await _quiet_callback(job, "failure", site, (type(exc), exc, exc.__traceback__))
    if hooks.any_run_hooks:
        await hooks.failing(job, exc)
        await hooks.finished(job, Status.FAILED, exc)
    await _owed_post_hook(job, timeout, site)


async def on_cancelled(
    job: Job, exc: BaseException, site: Site | None = None, timeout: float = CALLBACK_TIMEOUT
) -> None:
    """After a running try was cancelled on request (`failed()` is not called): RQ's stopped
    callback, the `after_run` hooks, then the post-task hook owed."""
    await _quiet_callback(job, "stopped", site, ())
    if hooks.any_run_hooks:
        await hooks.finished(job, Status.CANCELLED, exc)
    await _owed_post_hook(job, timeout, site)


# -- outcomes: what the acknowledgement writes ------------------------------------------

#: As payloads are written: datetimes and dataclasses are refused rather than guessed at.
_RESULT_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
#: Outcomes of jobs that returned None, per keep time: shared, nothing to encode.
_NO_RESULT: dict[float, Outcome] = {}


def _refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


def outcome_info(job: Job | None) -> bytes | None:
    """The `Outcome.info` of a job with RQ's `description` or `meta` (`None` without)."""
    if job is None:
        return None
    state = job.__dict__
    if DESCRIPTION not in state and META not in state:
        return None
    info: dict[str, Any] = {}
    if DESCRIPTION in state:
        info["description"] = state[DESCRIPTION]
    if META in state:
        info["meta"] = state[META]
    try:
        return orjson.dumps(info, default=_refuse, option=_RESULT_OPTIONS)
    except TypeError as exc:
        logger.warning("job %s: its meta is not JSON (%s); not kept", job.job_id, exc)
        return None


def succeeded_outcome(
    job: Job, result: Any, keep: float, max_bytes: int, _info: bool = True
) -> Outcome:
    """The record of a try that succeeded, with `result` as JSON when it can be kept (and
    RQ's description and meta, when the job has them).

    A result that is not JSON, or larger than `max_bytes`, is not kept: the job still
    succeeded (its work is done), the record says why there is no result, and a warning is
    logged.
    """
    if _info:
        state = job.__dict__
        if DESCRIPTION in state or META in state:
            plain = succeeded_outcome(job, result, keep, max_bytes, False)
            return replace(plain, info=outcome_info(job))
    if result is None:
        outcome = _NO_RESULT.get(keep)
        if outcome is None:
            outcome = Outcome(Status.SUCCEEDED, keep)
            if len(_NO_RESULT) < 64:
                _NO_RESULT[keep] = outcome
        return outcome
    if keep <= 0:
        return Outcome(Status.SUCCEEDED, keep)  # nothing is kept: no need to encode it
    try:
        raw = orjson.dumps(result, default=_refuse, option=_RESULT_OPTIONS)
    except TypeError as exc:
        note = f"result of type {type(result).__name__} is not JSON ({exc}); not kept"
    else:
        if len(raw) <= max_bytes:
            return Outcome(Status.SUCCEEDED, keep, raw)
        note = (
            f"result of {len(raw)} bytes is over the limit of {max_bytes} "
            "(QUEUE_MAX_PAYLOAD_BYTES); not kept"
        )
    logger.warning("job %s %s: %s", job.job_id, type(job).__qualname__, note)
    return Outcome(Status.SUCCEEDED, keep, None, note)


def failed_outcome(exc: BaseException, keep: float, job: Job | None = None) -> Outcome:
    """The record of a job that failed for good."""
    return Outcome(
        Status.FAILED,
        keep,
        None,
        describe(exc),
        "".join(traceback.format_exception(exc)),
        outcome_info(job),
    )


def cancelled_outcome(
    keep: float,
    reason: str = "cancelled while running",
    job: Job | None = None,
    info: bytes | None = None,
) -> Outcome:
    """The record of a running job cancelled on request (`info`: for a job not loaded)."""
    return Outcome(Status.CANCELLED, keep, None, reason, "", info or outcome_info(job))


# -- events -------------------------------------------------------------------------------


def job_path(job: Job | None) -> str:
    """The job's class path, `module:QualName` ("" without a job)."""
    if job is None:
        return ""
    cls = type(job)
    return f"{cls.__module__}:{cls.__qualname__}"


def first_wait(attempts: int, since: float | None, now: float | None = None) -> float | None:
    """Seconds from when a job began to wait (`Decoded.since`: its dispatch, or the time it
    fell due) to `now` (default: the current time), for a first try only; `None` for a later
    try or when the start of the wait is not known. Never negative (clocks of two hosts)."""
    if attempts != 1 or since is None:
        return None
    waited = (time.time() if now is None else now) - since
    return waited if waited > 0 else 0.0


def emit(
    kind: EventKind,
    reserved: ReservedJob,
    connection: str,
    job: Job | None = None,
    *,
    worker: str = "",
    started: float | None = None,
    error: str = "",
    waited: float | None = None,
) -> None:
    """Announce a change of one job's state (callers check `events.active` first: cheap).

    `waited` is for `started` of a first try (`first_wait`)."""
    duration = None if started is None else time.perf_counter() - started
    events.emit(
        JobEvent(
            kind,
            reserved.id,
            reserved.queue,
            connection,
            job=job_path(job),
            attempts=reserved.attempts,
            duration=duration,
            error=error,
            worker=worker,
            waited=waited,
        )
    )
