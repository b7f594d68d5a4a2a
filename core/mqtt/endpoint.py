"""Calling a handler with the arguments it asks for, by parameter name.

A handler declares what it needs: path parameters by their names in the pattern, and any of
`payload`, `client`, `context`, `topic`, `params`. The signature is read once, when the route is
made, so a handler asking for something that does not exist fails at start, not per message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from core.mqtt.context import MessageContext
from core.mqtt.errors import RouteError

__all__ = ["Endpoint", "Handler", "bind_handler", "sync_handlers_running"]

#: A route handler: a function (usually async) taking what it needs by name.
Handler = Callable[..., Any]
#: A handler bound to its route: takes the context, returns what the handler returned.
Endpoint = Callable[[MessageContext], Awaitable[Any]]

_INJECTED: dict[str, Callable[[MessageContext], Any]] = {
    "payload": lambda ctx: ctx.payload,
    "client": lambda ctx: ctx.client,
    "context": lambda ctx: ctx,
    "topic": lambda ctx: ctx.topic,
    "params": lambda ctx: ctx.params,
}


def _is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with `async def __call__`
    )


def bind_handler(handler: Handler, pattern: str, path_params: Collection[str]) -> Endpoint:
    """Read `handler`'s signature once and return a function that calls it for a context.

    Raises:
        RouteError: a parameter is neither a path parameter of `pattern` nor injectable, or
            is positional-only.
    """
    name = getattr(handler, "__qualname__", repr(handler))
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError) as exc:
        raise RouteError(f"route {pattern!r}: cannot read the signature of {name}") from exc
    getters: list[tuple[str, Callable[[MessageContext], Any]]] = []
    extra_params = False
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.VAR_KEYWORD:
            extra_params = True
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise RouteError(
                f"route {pattern!r}: {name} has positional-only parameter {param.name!r}; "
                "handlers receive their arguments by name"
            )
        if param.name in path_params:
            key = param.name
            getters.append((key, lambda ctx, key=key: ctx.params[key]))  # type: ignore[misc]
        elif param.name in _INJECTED:
            getters.append((param.name, _INJECTED[param.name]))
        elif param.default is param.empty:
            known = ", ".join([*path_params, *_INJECTED])
            raise RouteError(
                f"route {pattern!r}: {name} needs {param.name!r}, which is neither a path "
                f"parameter nor provided (it can ask for: {known})"
            )
    named = {key for key, _ in getters}
    leftovers = [p for p in path_params if p not in named] if extra_params else []
    is_async = _is_async(handler)

    async def endpoint(ctx: MessageContext) -> Any:
        kwargs = {key: get(ctx) for key, get in getters}
        for key in leftovers:
            kwargs[key] = ctx.params[key]
        if is_async:
            return await handler(**kwargs)
        # A plain `def` handler may block (file or network I/O): keep it off the event loop
        # so the receive loop and other handlers keep running.
        return await asyncio.to_thread(_counted, functools.partial(handler, **kwargs))

    return endpoint


_sync_running = 0  # plain `def` handlers running in threads right now
_sync_lock = threading.Lock()


def _counted(call: Callable[[], Any]) -> Any:
    global _sync_running
    with _sync_lock:
        _sync_running += 1
    try:
        return call()
    finally:
        with _sync_lock:
            _sync_running -= 1


def sync_handlers_running() -> int:
    """How many plain `def` handlers are still running in their threads.

    A thread cannot be cancelled: one still running when the app stops would keep the process
    alive forever (the interpreter waits for its threads), so the app ends the process then.
    """
    return _sync_running
