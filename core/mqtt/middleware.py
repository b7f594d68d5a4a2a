"""Middleware shipped with Topiq: logging, a per-device rate limit, payload validation.

A middleware is any `async def middleware(context, call_next)`; it may change the context,
skip the handler by raising (`MessageRejected` subclasses are logged and counted, not treated
as failures) and must return what `call_next(context)` returned.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from core.mqtt.context import MessageContext
from core.mqtt.errors import InvalidPayloadError, RateLimitedError
from core.mqtt.routing import CallNext

__all__ = ["LoggingMiddleware", "RateLimit", "ValidatePayload"]

T = TypeVar("T")


class LoggingMiddleware:
    """Logs each handled message: topic, route and how long the handler took.

    Args:
        logger: Where to log (default `topiq.mqtt.messages`).
        level: The level of the per-message line.
    """

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or logging.getLogger("topiq.mqtt.messages")
        self.level = level

    async def __call__(self, context: MessageContext, call_next: CallNext) -> Any:
        """Time the rest of the chain and log one line when it returns."""
        started = time.perf_counter()
        result = await call_next(context)
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "%s -> %s (%d bytes, qos %d) in %.1fms",
                context.topic,
                context.route.name,
                len(context.raw),
                context.qos,
                (time.perf_counter() - started) * 1000,
            )
        return result


class RateLimit:
    """A token bucket per client or device: at most `rate` messages per `per` seconds,
    with bursts up to `burst`. A message over the limit raises `RateLimitedError`.

    Args:
        rate: Messages allowed per `per` seconds, on average.
        per: The period in seconds.
        burst: The bucket size (default: `rate`, at least 1).
        key: The path parameter naming the sender (default `device_id`; the topic is used
            when the route has no such parameter), or a function of the context.
        max_keys: Buckets kept; the least recently seen senders are forgotten beyond this,
            so a flood of distinct ids cannot grow memory without bound.
        clock: The time source (monotonic seconds), replaceable in tests.
    """

    def __init__(
        self,
        rate: float,
        *,
        per: float = 1.0,
        burst: float | None = None,
        key: str | Callable[[MessageContext], str] = "device_id",
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or per <= 0:
            raise ValueError("RateLimit: rate and per must be positive")
        self.refill = rate / per  # tokens per second
        self.capacity = float(burst) if burst is not None else max(1.0, float(rate))
        self.max_keys = max_keys
        self._key = key
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def key_of(self, context: MessageContext) -> str:
        """The sender a message is counted against."""
        if callable(self._key):
            return self._key(context)
        return context.params.get(self._key, context.topic)

    def allow(self, key: str) -> bool:
        """Take one token from `key`'s bucket; `False` when it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.refill)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    async def __call__(self, context: MessageContext, call_next: CallNext) -> Any:
        """Refuse the message if its sender is over the limit, else pass it on."""
        key = self.key_of(context)
        if not self.allow(key):
            raise RateLimitedError(
                f"{key!r} is over its limit of {self.refill:g} messages/s (burst {self.capacity:g})"
            )
        return await call_next(context)


class ValidatePayload(Generic[T]):
    """Parses the payload as JSON into `model` (a pydantic model, dataclass, TypedDict or any
    type pydantic accepts) and puts the result in `context.payload`.

    A payload that is not valid JSON or does not fit raises `InvalidPayloadError`, which the
    app logs with the topic and counts as invalid; the handler does not run.

    Args:
        model: The type the payload must have.
    """

    def __init__(self, model: type[T]) -> None:
        self.model = model
        self._adapter: TypeAdapter[T] = TypeAdapter(model)
        self._name = getattr(model, "__name__", repr(model))

    def validate(self, raw: bytes) -> T:
        """The payload as `model`, or `InvalidPayloadError` saying what is wrong."""
        try:
            return self._adapter.validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'payload'}: {error['msg']}"
                for error in exc.errors(include_url=False, include_input=False)[:3]
            )
            more = exc.error_count() - 3
            if more > 0:
                problems += f" (and {more} more)"
            raise InvalidPayloadError(f"payload is not a valid {self._name}: {problems}") from None

    async def __call__(self, context: MessageContext, call_next: CallNext) -> Any:
        """Validate, replace `context.payload` with the model, call the rest of the chain."""
        context.payload = self.validate(context.raw)
        return await call_next(context)
