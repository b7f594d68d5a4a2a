"""OpenTelemetry traces from an MQTT message, through dispatch, to each try of the job it started.

Optional (`pip install -e '.[otel]'`). Tracing is on in a process once the application has set
a tracer provider (`opentelemetry.trace.set_tracer_provider`, e.g. in `app/hooks.py`, which the
worker, the MQTT app and the manager import on start); until then each hook below is a
dictionary lookup and a return. Nothing here imports OpenTelemetry: a process that never
configured it never loads it.

Spans (names as in docs/observing.md, section "tracing"):

* `mqtt receive <topic filter>` (consumer): one run of a route's handler for a message; its
  parent is the W3C context in the message's MQTT 5 user properties `traceparent` /
  `tracestate`, when a device sent one;
* `dispatch <Class>` (producer): one `push` (`bulk`, `push_workflow`: one span for the call);
* `run <Class>` (consumer): one try, child of the dispatch span, so the tries of a retried job
  share its trace.

The context travels in the job's payload under `"trace"`: `{"traceparent": ..., "tracestate":
...}` (W3C Trace Context), written only when the dispatch span is recorded. A `"trace"` value
that is not such a carrier (another type, too long, unparsable) is ignored: the try runs in a
trace of its own, and nothing about the job changes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from core.job import Job

__all__ = [
    "TRACE_ATTR",
    "TRACE_KEY",
    "carrier",
    "handler_failed",
    "parent_context",
    "receiving",
    "running",
    "traced_dispatch",
    "tracer",
]

logger = logging.getLogger("topiq.tracing")

#: The payload key the W3C carrier is written under.
TRACE_KEY = "trace"
#: The (private) instance attribute the loader keeps a payload's `"trace"` value in, for the run.
TRACE_ATTR = "_topiq_trace"

#: Longest values accepted from a payload or a message: a version-00 `traceparent` is 55
#: characters (later versions may append fields); W3C asks carriers to keep 512 of `tracestate`.
MAX_TRACEPARENT = 256
MAX_TRACESTATE = 512

_SCOPE = "topiq"
_tracer: Tracer | None = None
_ignored_logged = False

P = ParamSpec("P")
S = TypeVar("S")
R = TypeVar("R")


def tracer() -> Tracer | None:
    """The tracer to use, or `None` when tracing is off in this process (OpenTelemetry not
    imported, or no tracer provider set): then every hook here returns at once."""
    global _tracer
    if _tracer is not None:
        return _tracer
    api = sys.modules.get("opentelemetry.trace")
    if api is None:  # nobody configured OpenTelemetry here (or it is not installed)
        return None
    provider = api.get_tracer_provider()
    if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider):
        return None
    # The global provider is set once per process: from here on it is this one.
    _tracer = provider.get_tracer(_SCOPE)
    return _tracer


# -- the W3C carrier ----------------------------------------------------------------------


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _checked(raw: Any) -> dict[str, str] | None:
    """`raw` as a W3C carrier, or `None` if it is not one (any type, any size)."""
    if not isinstance(raw, dict) or len(raw) > 8:  # other keys (a later release's) are skipped
        return None
    parent = raw.get("traceparent")
    state = raw.get("tracestate", "")
    if not isinstance(parent, str) or not isinstance(state, str):
        return None
    if not 0 < len(parent) <= MAX_TRACEPARENT or len(state) > MAX_TRACESTATE:
        return None
    return {"traceparent": parent, "tracestate": state} if state else {"traceparent": parent}


def parent_context(raw: Any) -> Context | None:
    """The remote span context a carrier names, or `None` when `raw` is not a valid carrier."""
    global _ignored_logged
    carrier = _checked(raw)
    if carrier is not None:
        from opentelemetry import trace

        try:
            context = _propagator().extract(carrier)
        except Exception:  # a propagator must not fail on input; if it does, ignore it
            context = None
        if context is not None and trace.get_current_span(context).get_span_context().is_valid:
            found: Context = context
            return found
    if not _ignored_logged:
        _ignored_logged = True
        logger.debug("ignored a trace context that is not W3C Trace Context (logged once)")
    return None


def _user_properties(pairs: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    found = {k: v for k, v in pairs if k in ("traceparent", "tracestate")}
    return found or None


# -- dispatch -----------------------------------------------------------------------------


class _Dispatch:
    """What one dispatch span has seen of the jobs encoded under it."""

    __slots__ = ("count", "first", "job_class", "queues", "span")

    def __init__(self, span: Span, named: bool) -> None:
        self.span = span
        self.count = 0
        self.first: dict[str, str] = {}  # the first job's attributes
        self.queues: set[str] = set()
        #: The class of the jobs seen so far, while the span's name is still to follow them
        #: (`bulk`: one class, `dispatch <Class>`; several, `dispatch jobs`); `None` once fixed.
        self.job_class: type | None = None if named else type(None)


_dispatching: ContextVar[_Dispatch | None] = ContextVar("topiq_dispatching", default=None)


def _label(first: Any) -> str | None:
    """`Class` for a job, the kind of a workflow; `None` for jobs not known yet (`bulk`)."""
    from core.job import Job

    if isinstance(first, Job):
        return type(first).__qualname__
    kind = getattr(first, "kind", None)  # a chain(...) or batch(...)
    return kind if isinstance(kind, str) else None


def traced_dispatch(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Wrap a `QueueManager` dispatch method in a `dispatch <Class>` span (producer)."""

    async def traced(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        found = tracer()
        if found is None:
            return await method(self, *args, **kwargs)
        from opentelemetry import trace

        label = _label(args[0] if args else next(iter(kwargs.values()), None))
        span = found.start_span(
            f"dispatch {label or 'jobs'}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "topiq",
                "messaging.operation.type": "send",
                "messaging.operation.name": "dispatch",
            },
        )
        state = _Dispatch(span, label is not None)
        with trace.use_span(span, end_on_exit=True):  # a refused dispatch marks it failed
            token = _dispatching.set(state)
            try:
                return await method(self, *args, **kwargs)
            finally:
                _dispatching.reset(token)
                _name_jobs(state)

    functools.update_wrapper(traced, method)
    return traced


def carrier(job: Job, queue: str, job_id: str) -> dict[str, str] | None:
    """The payload's `"trace"` value for a job being encoded: the current span's W3C context
    when that span is recorded, else `None` (no key). Names the job on its dispatch span."""
    if tracer() is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return None
    state = _dispatching.get()
    if state is not None and state.span is span:
        state.count += 1
        if state.job_class is not None and state.job_class is not type(job):
            first = state.job_class is type(None)
            state.job_class = type(job) if first else None
            span.update_name(f"dispatch {type(job).__qualname__}" if first else "dispatch jobs")
        if state.count == 1:
            state.first = {"id": job_id, "class": _class_path(job)}
        if len(state.queues) < 2:
            state.queues.add(queue)
    out: dict[str, str] = {}
    _propagator().inject(out)
    return out or None


def _name_jobs(state: _Dispatch) -> None:
    """What the dispatch span says of its jobs: the job (one), or their count (a batch); the
    queue when they all went to one."""
    attributes: dict[str, str | int] = {}
    if len(state.queues) == 1:
        [queue] = state.queues
        attributes["messaging.destination.name"] = attributes["topiq.queue"] = queue
    if state.count == 1:
        job_id = state.first["id"]
        attributes["messaging.message.id"] = attributes["topiq.job.id"] = job_id
        attributes["topiq.job.class"] = state.first["class"]
    elif state.count > 1:
        attributes["messaging.batch.message_count"] = state.count
    if attributes:
        state.span.set_attributes(attributes)


def _class_path(job: Job) -> str:
    cls = type(job)
    return f"{cls.__module__}:{cls.__qualname__}"


# -- run ----------------------------------------------------------------------------------


def running(job: Job, run: Awaitable[R]) -> Awaitable[R]:
    """`run` (one try of `job`) inside a `run <Class>` span whose parent is the context the
    payload carried; `run` itself when tracing is off."""
    found = tracer()
    if found is None:
        return run
    return _run(found, job, run)


async def _run(found: Tracer, job: Job, run: Awaitable[R]) -> R:
    from opentelemetry import trace
    from opentelemetry.context import Context

    from core.errors import Retry

    raw = job.__dict__.get(TRACE_ATTR)
    parent = None if raw is None else parent_context(raw)
    queue = str(job.queue)
    span = found.start_span(
        f"run {type(job).__qualname__}",
        context=parent if parent is not None else Context(),  # never the caller's span
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "topiq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "run",
            "messaging.destination.name": queue,
            "messaging.message.id": job.job_id,
            "topiq.queue": queue,
            "topiq.job.id": job.job_id,
            "topiq.job.class": _class_path(job),
            "topiq.attempt": job.attempts,
        },
    )
    with trace.use_span(span, True, record_exception=False, set_status_on_exception=False):
        try:
            return await run
        except Retry as exc:  # asked for another try: not a failure
            span.set_attribute("topiq.retry_requested", True)
            if exc.delay is not None:
                span.set_attribute("topiq.retry_delay", float(exc.delay))
            raise
        except asyncio.CancelledError:  # cancelled on request, or the worker is stopping
            span.add_event("cancelled")
            raise
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:256])
            span.set_attribute("error.type", type(exc).__qualname__)
            raise


# -- MQTT ---------------------------------------------------------------------------------


def receiving(
    run: Awaitable[R],
    topic_filter: str,
    topic: str,
    payload_size: int,
    qos: int,
    user_properties: Iterable[tuple[str, str]] = (),
) -> Awaitable[R]:
    """`run` (a route's handler for one message) inside a `mqtt receive <topic filter>` span;
    `run` itself when tracing is off."""
    found = tracer()
    if found is None:
        return run
    return _receive(found, run, topic_filter, topic, payload_size, qos, user_properties)


async def _receive(
    found: Tracer,
    run: Awaitable[R],
    topic_filter: str,
    topic: str,
    payload_size: int,
    qos: int,
    user_properties: Iterable[tuple[str, str]],
) -> R:
    from opentelemetry import trace

    sent = _user_properties(user_properties)
    span = found.start_span(
        f"mqtt receive {topic_filter}",
        context=None if sent is None else parent_context(sent),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "mqtt",
            "messaging.operation.type": "process",
            "messaging.operation.name": "receive",
            "messaging.destination.name": topic,
            "messaging.destination.template": topic_filter,
            "messaging.message.body.size": payload_size,
            "topiq.mqtt.qos": qos,
        },
    )
    with trace.use_span(span, end_on_exit=True):
        return await run


def handler_failed(exc: BaseException) -> None:
    """Mark the current `mqtt receive` span failed: its handler failed for good."""
    if tracer() is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:256])
        span.set_attribute("error.type", type(exc).__qualname__)
