"""Application lifecycle hooks: code of the application's own that runs around every job.

Register them in `app/hooks.py` (loaded by the worker, the MQTT app and the manager on start):

    from core.hooks import hooks

    @hooks.on_dispatch
    async def audit(job, job_id): ...

    @hooks.before_run
    def start_timer(job): ...

    @hooks.after_run
    async def report(job, status, value): ...     # value: the result, or the exception

    @hooks.on_failure
    async def page_someone(job, exception): ...

A hook may be a plain or a coroutine function. `before_run` runs before the job's middleware;
if it raises, the try fails with that exception. The others run after the fact: what they raise
is logged and changes nothing (the job is stored, or has ended, already).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from core.job import Job
    from core.status import Status

__all__ = ["AppHooks", "hooks"]

logger = logging.getLogger("topiq.hooks")

F = TypeVar("F", bound=Callable[..., Any])


class AppHooks:
    """The registered hooks, per moment, in registration order."""

    def __init__(self) -> None:
        self._dispatch: list[Callable[..., Any]] = []
        self._before: list[Callable[..., Any]] = []
        self._after: list[Callable[..., Any]] = []
        self._failure: list[Callable[..., Any]] = []
        self._loaded: set[str] = set()

    def on_dispatch(self, fn: F) -> F:
        """`fn(job, job_id)` after a job is stored (not for a rejected or kept duplicate)."""
        self._dispatch.append(fn)
        return fn

    def before_run(self, fn: F) -> F:
        """`fn(job)` before each try, outside the job's middleware."""
        self._before.append(fn)
        return fn

    def after_run(self, fn: F) -> F:
        """`fn(job, status, value)` after each try: `status` is `succeeded`, `retrying`,
        `failed` or `cancelled`; `value` the result or the exception."""
        self._after.append(fn)
        return fn

    def on_failure(self, fn: F) -> F:
        """`fn(job, exception)` once the job has failed for good, after its `failed()`."""
        self._failure.append(fn)
        return fn

    def clear(self) -> None:
        """Forget every hook (for tests)."""
        for registered in (self._dispatch, self._before, self._after, self._failure):
            registered.clear()
        self._loaded.clear()

    def load(self, module: str = "app.hooks") -> None:
        """Import the application's hooks module once, if it exists."""
        if module in self._loaded:
            return
        self._loaded.add(module)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.rpartition(".")[0]):
                raise

    @property
    def any_run_hooks(self) -> bool:
        return bool(self._before or self._after or self._failure)

    async def dispatched(self, job: Job, job_id: str) -> None:
        await _each(self._dispatch, "on_dispatch", job, job_id)

    async def starting(self, job: Job) -> None:
        for fn in tuple(self._before):
            outcome = fn(job)
            if inspect.isawaitable(outcome):
                await outcome

    async def finished(self, job: Job, status: Status, value: Any) -> None:
        await _each(self._after, "after_run", job, status, value)

    async def failing(self, job: Job, exception: BaseException) -> None:
        await _each(self._failure, "on_failure", job, exception)


async def _each(registered: list[Callable[..., Any]], moment: str, *args: Any) -> None:
    for fn in tuple(registered):
        try:
            outcome = fn(*args)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            logger.exception("%s hook %r failed", moment, fn)


#: The process's hooks.
hooks = AppHooks()
