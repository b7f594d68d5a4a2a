"""The event loop every Topiq command runs on.

uvloop shortens each turn of the loop (its callbacks, sockets and timers are in C), which an
I/O-bound worker feels directly: a job that awaits 10 ms gets back to work sooner, and a job
dispatched to an idle worker starts sooner. It is the default wherever it is installed (it is a
dependency on Linux and macOS). `EVENT_LOOP=asyncio` keeps asyncio's own loop, for a platform
uvloop does not support or a library that needs asyncio's loop; `EVENT_LOOP=uvloop` insists on
uvloop and fails at start when it is missing rather than run slower unnoticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from core.errors import ConfigurationError
from core.settings import EventLoop

T = TypeVar("T")


def loop_factory(choice: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop for `choice`; None means asyncio's own."""
    if choice is EventLoop.ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError:
        if choice is EventLoop.UVLOOP:
            raise ConfigurationError(
                "EVENT_LOOP=uvloop, but uvloop is not installed: `pip install uvloop`, "
                "or set EVENT_LOOP=auto (uvloop when present) or EVENT_LOOP=asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(choice: EventLoop) -> str:
    """`uvloop` or `asyncio`: the loop `choice` gives here (for start lines and reports)."""
    return "asyncio" if loop_factory(choice) is None else "uvloop"


def run(main: Coroutine[Any, Any, T], choice: EventLoop) -> T:
    """Run `main` to its end on a new loop of `choice`, as `asyncio.run` does."""
    try:
        factory = loop_factory(choice)
    except ConfigurationError:
        main.close()  # never awaited: say nothing of it
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
