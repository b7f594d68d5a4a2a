"""Testing support for applications: a fake queue with assertions, and a route test client.

    from core.queue.queue_manager import queue
    from core.testing import RouteTestClient

    with queue.fake() as fake:                      # or the `fake_queue` pytest fixture
        await dispatch(SendMail(to="a@example.com"))
        fake.assert_dispatched(SendMail, to="a@example.com")

    client = RouteTestClient(router)                # a Router, or an MqttApp
    sent = await client.send("devices/d1/telemetry", {"temperature": 21.5})
    sent.assert_dispatched(StoreTelemetryJob, device_id="d1")

Behind the fake queue is a real `QueueManager` whose every connection (redis, database,
sync, ...) is an in-memory store: dispatch runs its real checks (the payload is JSON, the class
is one a worker may import, every setting valid, `job_id`/`unique_key` rules), returns real
handles (status `queued` or `scheduled`), and nothing runs. `queue.fake()` makes it the
default manager (what `dispatch`, `queue.push/later/bulk` and `@job` functions use) until the
block ends. A chain or batch dispatched on it is recorded as its jobs (members, then the
callbacks, each a `Dispatch`), and returns a real `WorkflowHandle` whose members wait as they
would (the first of a chain `queued`, the rest `deferred`).

To get the `fake_queue` fixture in a test suite, enable this module as a pytest plugin in
`conftest.py`: `pytest_plugins = ["core.testing"]`.

The route test client runs one message through the router's real code path (the route the app
would pick, its middleware outermost first, the handler's parameters bound as in the app)
without a broker, and reports what the handler returned or raised, what it dispatched (on a
fake queue) and what it published.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from core.job import Job
from core.queue.drivers.base import OutgoingJob, Pushed
from core.queue.drivers.memory import MemoryDriver
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from core.workflows import Workflow, WorkflowHandle

if TYPE_CHECKING:
    from core.mqtt.app import MqttApp
    from core.mqtt.client import MqttClient
    from core.mqtt.message import MessageProperties
    from core.mqtt.routing import Route, Router

__all__ = [
    "Dispatch",
    "FakeQueue",
    "Published",
    "RouteResult",
    "RouteTestClient",
    "fake_queue",
]

#: What an assertion names: a `Job` subclass, an `@job` function, or a class path string.
Target = type[Job] | Callable[..., Any] | str


# -- the fake queue -----------------------------------------------------------------------


@dataclass(slots=True)
class Dispatch:
    """One job the fake queue stored.

    Attributes:
        job: The job as dispatched (for a "replace" duplicate: the newest one, whose data the
            waiting job now carries).
        id: Its job id (what the handle says).
        queue: The queue it went to.
        connection: The connection it went to.
        delay: Seconds until it is due (0: ready now).
        path: The `module:QualName` its payload names (an `@job` function's own path).
        payload: The payload as a worker would receive it.
    """

    job: Job
    id: str
    queue: str
    connection: str
    delay: float
    path: str
    payload: bytes = field(repr=False)

    def get(self, name: str) -> Any:
        """An attribute an assertion may name: `id`/`job_id`, `queue`, `connection`, `delay`,
        or anything on the job (its data, its settings)."""
        if name in ("id", "job_id"):
            return self.id
        if name in ("queue", "connection", "delay"):
            return getattr(self, name)
        return getattr(self.job, name)


class _RecordingDriver(MemoryDriver):
    """The memory store, remembering what each `push` was given and what it did."""

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self.log: list[tuple[OutgoingJob, Pushed]] = []

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        pushed = await super().push(jobs)
        self.log.extend(zip(jobs, pushed, strict=True))
        return pushed


def _path(target: Target) -> str:
    """The `module:QualName` a payload of `target` names."""
    if isinstance(target, str):
        return target
    inner = getattr(target, "__wrapped__", None) or getattr(target, "function", None)
    named = inner if inner is not None and not isinstance(target, type) else target
    return f"{named.__module__}:{named.__qualname__}"


def _label(target: Target) -> str:
    """A short name for messages: the class or function name."""
    path = _path(target)
    return path.rpartition(":")[2] or path


class _FakeManager(QueueManager):
    """A real manager whose every connection is an in-memory store; it tells its `FakeQueue`
    what was stored."""

    def __init__(self, fake: FakeQueue, settings: Settings | None) -> None:
        super().__init__(settings)
        self.fake = fake
        self._recorders: dict[str, _RecordingDriver] = {}
        self._recording = False

    def driver(self, name: str | None = None) -> _RecordingDriver:
        """The in-memory store standing in for connection `name` (kept across event loops)."""
        name = self.connection_name(name)
        recorder = self._recorders.get(name)
        if recorder is None:
            recorder = self._recorders[name] = _RecordingDriver(name, self.settings)
        self._drivers[name] = recorder
        return recorder

    async def push(self, job: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Dispatch as the real manager does, then record what was stored."""
        if args or not isinstance(job, Job) or kwargs.get("args") is not None or "wait" in kwargs:
            # Masonite's ways of calling (a class, a function, several jobs, args=, wait=):
            # the jobs they make are what is recorded.
            jobs = self._styled(job, args, kwargs)
            return await self._recorded(
                jobs,
                kwargs.get("connection"),
                lambda: super(_FakeManager, self).push(*jobs, **kwargs),
            )
        return await self._recorded(
            [job], kwargs.get("connection"), lambda: super(_FakeManager, self).push(job, **kwargs)
        )

    async def bulk(self, jobs: Iterable[Job], *args: Any, **kwargs: Any) -> Any:
        """Dispatch many as the real manager does, then record what was stored."""
        listed = list(jobs)
        connection = kwargs.get("connection", args[1] if len(args) > 1 else None)
        return await self._recorded(
            listed, connection, lambda: super(_FakeManager, self).bulk(listed, *args, **kwargs)
        )

    async def push_workflow(self, workflow: Workflow) -> WorkflowHandle:
        """Dispatch a chain or batch as the real manager does, then record its jobs."""
        plan = self._plan(workflow)
        marks = {name: len(recorder.log) for name, recorder in self._recorders.items()}
        handle = await self._push_plan(plan)  # a workflow refused whole records nothing
        # None: the workflow's record, which is no job.
        self._record([step.job for step in plan.steps], plan.connection, marks)
        return handle

    async def _recorded(
        self,
        jobs: Sequence[Job | None],
        connection: str | None,
        call: Callable[[], Awaitable[Any]],
    ) -> Any:
        if self._recording:  # `later` or `bulk` calling `push`: the outer call records
            return await call()
        self._recording = True
        marks = {name: len(recorder.log) for name, recorder in self._recorders.items()}
        try:
            return await call()
        finally:
            self._recording = False
            self._record(jobs, connection, marks)

    def _record(
        self, jobs: Sequence[Job | None], connection: str | None, marks: Mapping[str, int]
    ) -> None:
        """Pair the jobs with what their connections' stores were given, in order (`None`:
        a workflow's record, which is no job)."""
        for name, recorder in self._recorders.items():
            entries = recorder.log[marks.get(name, 0) :]
            if not entries:
                continue
            mine = [
                job
                for job in jobs
                if self.connection_name(connection or (job.connection if job else None)) == name
            ]
            if len(mine) != len(entries) and len(jobs) == len(entries):
                mine = list(jobs)
            for job, (outgoing, pushed) in zip(mine, entries, strict=False):
                if job is not None and outgoing.kind == "job":
                    self.fake._note(job, name, outgoing, pushed)

    def forget(self) -> None:
        """Empty every store."""
        self._recorders.clear()
        self._drivers.clear()
        self._opened.clear()


class FakeQueue:
    """What a fake queue stored, and assertions about it.

    Made by `queue.fake()` (or `core.testing.fake_queue()`, or the `fake_queue` fixture).
    `manager` is the real `QueueManager` behind it (every connection in memory); it is the
    default manager while the fake is in use.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        #: Every job stored, in dispatch order.
        self.dispatches: list[Dispatch] = []
        self.manager: QueueManager = _FakeManager(self, settings)

    def _note(self, job: Job, connection: str, outgoing: OutgoingJob, pushed: Pushed) -> None:
        from core.queue.payload import decode_envelope

        if pushed.outcome in ("duplicate", "kept", "missing"):
            return  # nothing new was stored
        envelope = decode_envelope(outgoing.payload)
        record = Dispatch(
            job=job,
            id=pushed.id,
            queue=outgoing.queue,
            connection=connection,
            delay=outgoing.delay,
            path=str(envelope.get("job", "")),
            payload=outgoing.payload,
        )
        if pushed.outcome == "replaced":
            for index, earlier in enumerate(self.dispatches):
                if earlier.id == pushed.id and earlier.queue == outgoing.queue:
                    # The waiting job keeps its id, place and due time; it carries new data.
                    record.delay = earlier.delay
                    self.dispatches[index] = record
                    return
        self.dispatches.append(record)

    def clear(self) -> None:
        """Forget every dispatch (the in-memory stores are emptied too)."""
        self.dispatches.clear()
        manager = self.manager
        if isinstance(manager, _FakeManager):
            manager.forget()

    # -- reading and asserting -----------------------------------------------------------

    def dispatched(self, target: Target | None = None, **attrs: Any) -> list[Job]:
        """The jobs stored (of `target`, with these attributes), in dispatch order."""
        return [d.job for d in self.matching(target, **attrs)]

    def matching(self, target: Target | None = None, **attrs: Any) -> list[Dispatch]:
        """The `Dispatch` records of `target` whose attributes equal `attrs` (a callable value
        is a test: `delay=lambda s: s > 60`)."""
        found = []
        for record in self.dispatches:
            if target is not None and not _is(record, target):
                continue
            if all(_attribute_matches(record, name, want) for name, want in attrs.items()):
                found.append(record)
        return found

    def assert_dispatched(self, target: Target, count: int | None = None, **attrs: Any) -> None:
        """At least one job of `target` with these attributes was stored (exactly `count`
        of them, when given)."""
        found = self.matching(target, **attrs)
        if (count is None and found) or len(found) == count:
            return
        wanted = "a" if count is None else f"{count}"
        raise AssertionError(
            f"expected {wanted} {_label(target)} dispatched{_with(attrs)}, found "
            f"{len(found)}; {self._describe(target)}"
        )

    def assert_dispatched_times(self, target: Target, times: int) -> None:
        """Exactly `times` jobs of `target` were stored."""
        self.assert_dispatched(target, times)

    def assert_not_dispatched(self, target: Target, **attrs: Any) -> None:
        """No job of `target` with these attributes was stored."""
        found = self.matching(target, **attrs)
        if found:
            raise AssertionError(
                f"expected no {_label(target)} dispatched{_with(attrs)}, found {len(found)}: "
                + "; ".join(_show(d) for d in found[:5])
            )

    def assert_nothing_dispatched(self) -> None:
        """No job at all was stored."""
        if self.dispatches:
            raise AssertionError(
                f"expected nothing dispatched, found {len(self.dispatches)}: "
                + "; ".join(_show(d) for d in self.dispatches[:5])
            )

    def _describe(self, target: Target) -> str:
        same = [d for d in self.dispatches if _is(d, target)]
        if same:
            return f"the {_label(target)} jobs dispatched: " + "; ".join(_show(d) for d in same[:5])
        if not self.dispatches:
            return "nothing was dispatched"
        kinds = sorted({d.path for d in self.dispatches})
        return "dispatched were: " + ", ".join(kinds)


def _is(record: Dispatch, target: Target) -> bool:
    if isinstance(target, type) and isinstance(record.job, target):
        return True
    return record.path == _path(target)


def _attribute_matches(record: Dispatch, name: str, want: Any) -> bool:
    try:
        value = record.get(name)
    except AttributeError:
        return False
    if callable(want) and not isinstance(want, type):
        return bool(want(value))
    return bool(value == want)


def _with(attrs: Mapping[str, Any]) -> str:
    if not attrs:
        return ""
    return " with " + ", ".join(f"{name}={value!r}" for name, value in attrs.items())


def _show(record: Dispatch) -> str:
    data = ", ".join(f"{k}={v!r}" for k, v in record.job.data().items())
    where = f" on {record.queue}" + (f" in {record.delay:g}s" if record.delay else "")
    return f"{_label(record.path)}({data}) id={record.id}{where}"


@contextlib.contextmanager
def fake_queue(settings: Settings | None = None) -> Iterator[FakeQueue]:
    """Make a `FakeQueue` the default manager within the block (what `queue.fake()` does).

    `settings` default to the current default manager's (QUEUE_ALLOWED_MODULES and the
    queue names still apply); the previous default manager is put back afterwards.
    """
    from core.queue import queue_manager

    previous = queue_manager._default
    if settings is None:
        settings = previous.settings if previous is not None else Settings.load()
    fake = FakeQueue(settings)
    queue_manager.set_default_manager(fake.manager)
    try:
        yield fake
    finally:
        queue_manager.set_default_manager(previous)


def current_fake() -> FakeQueue | None:
    """The fake queue in use as the default manager, if any."""
    from core.queue import queue_manager

    default = queue_manager._default
    return default.fake if isinstance(default, _FakeManager) else None


# -- the route test client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published:
    """One message a handler (or its middleware) published."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    properties: MessageProperties | None = None

    def json(self) -> Any:
        """The payload decoded from JSON."""
        import orjson

        return orjson.loads(self.payload)


class _Recorder:
    """Stands in for the app's MQTT connection and for a handler's `client`: keeps what is
    published instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[Published] = []
        self.closed = False

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        timeout: float | None = None,
    ) -> None:
        from core.mqtt.publisher import encode_payload

        self.sent.append(Published(topic, encode_payload(payload), qos, retain, properties))


@dataclass(slots=True)
class RouteResult:
    """What one message did.

    Attributes:
        route: The route that handled it.
        params: The path parameters its pattern captured.
        value: What the handler (through its middleware) returned.
        error: What it raised (`InvalidPayloadError` from validation, `RateLimitedError`,
            `MessageRejected` or any other exception), else `None`.
        dispatches: The jobs it stored on the fake queue.
        published: The messages it published (with `client.publish` or `core.mqtt.publish`).
    """

    route: Route
    params: dict[str, str]
    value: Any = None
    error: BaseException | None = None
    dispatches: list[Dispatch] = field(default_factory=list)
    published: list[Published] = field(default_factory=list)

    @property
    def dispatched(self) -> list[Job]:
        """The jobs it stored, in order."""
        return [d.job for d in self.dispatches]

    def raise_error(self) -> None:
        """Raise what the handler raised, if it did."""
        if self.error is not None:
            raise self.error

    def assert_dispatched(self, target: Target, count: int | None = None, **attrs: Any) -> None:
        """This message dispatched a `target` job with these attributes (`count` of them)."""
        self._view().assert_dispatched(target, count, **attrs)

    def assert_nothing_dispatched(self) -> None:
        """This message dispatched no job."""
        self._view().assert_nothing_dispatched()

    def assert_not_dispatched(self, target: Target, **attrs: Any) -> None:
        """This message dispatched no `target` job with these attributes."""
        self._view().assert_not_dispatched(target, **attrs)

    def _view(self) -> FakeQueue:
        view = FakeQueue.__new__(FakeQueue)
        view.dispatches = self.dispatches
        return view


class RouteTestClient:
    """Feeds messages to a router's routes without a broker, through their middleware.

    Args:
        app: A `Router`, an `MqttApp`, or anything with a `router` attribute (a module such
            as `app.routes`). The router is frozen (its middleware chains built) as the app
            would.
        settings: Settings for the fake queue the client uses when none is active (default:
            the default manager's).

    Each `send` runs on the active fake queue (`queue.fake()`, the `fake_queue` fixture), or on
    a fake of its own for the duration of the call, so handlers' dispatches are recorded and
    never reach a backend.
    """

    def __init__(self, app: Router | MqttApp | Any, *, settings: Settings | None = None) -> None:
        from core.mqtt.routing import Router

        router = app if isinstance(app, Router) else getattr(app, "router", None)
        if not isinstance(router, Router):
            raise TypeError(
                f"RouteTestClient needs a Router, an MqttApp or a module with a `router`, got "
                f"{type(app).__name__}"
            )
        self.router = router
        self.settings = settings
        router.freeze()

    def resolve(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        """The route the app would run for `topic` and its parameters, or `None`."""
        return self.router.resolve(topic)

    async def send(
        self,
        topic: str,
        payload: Any = b"",
        *,
        qos: int = 1,
        retain: bool = False,
        properties: MessageProperties | None = None,
        **property_values: Any,
    ) -> RouteResult:
        """Run one message through its route: middleware, then the handler.

        Args:
            topic: The topic it arrives on.
            payload: Bytes as they are, a string as UTF-8, anything else as JSON.
            qos: The QoS it is delivered with.
            retain: Whether it arrives as a retained message.
            properties: MQTT 5 properties; or give them by name (`response_topic=...`,
                `correlation_data=...`, `user_properties=[("k", "v")]`, ...).

        Raises:
            LookupError: no route matches `topic` (the app would ignore the message).
        """
        from core.mqtt.context import MessageContext
        from core.mqtt.message import IncomingMessage, MessageProperties
        from core.mqtt.publisher import Publisher, encode_payload, use_connection

        if properties is None:
            if "user_properties" in property_values:
                property_values["user_properties"] = tuple(
                    tuple(pair) for pair in property_values["user_properties"]
                )
            properties = MessageProperties(**property_values)
        elif property_values:
            raise TypeError("give MQTT 5 properties either as `properties=` or by name, not both")
        message = IncomingMessage(topic, encode_payload(payload), qos, retain, properties)
        found = self.router.resolve(topic, properties.subscription_ids)
        if found is None:
            patterns = ", ".join(r.pattern.pattern for r in self.router.routes) or "none"
            raise LookupError(f"no route matches {topic!r} (the routes: {patterns})")
        route, params = found
        recorder = _Recorder()
        active = current_fake()
        with contextlib.ExitStack() as stack:
            fake = active if active is not None else stack.enter_context(fake_queue(self.settings))
            start = len(fake.dispatches)
            stack.enter_context(use_connection(cast("MqttClient", recorder)))
            context = MessageContext(
                message, params, route, Publisher(cast("MqttClient", recorder))
            )
            result = RouteResult(route, params)
            try:
                result.value = await route(context)
            except Exception as exc:  # reported, as the app would log it
                result.error = exc
            result.dispatches = fake.dispatches[start:]
        result.published = recorder.sent
        return result


# -- the pytest plugin ----------------------------------------------------------------------

if importlib.util.find_spec("pytest") is not None:  # only test environments have pytest
    import pytest

    @pytest.fixture(name="fake_queue")
    def fake_queue_fixture() -> Iterator[FakeQueue]:
        """A `FakeQueue` as the default manager for one test (see the module's docstring)."""
        with fake_queue() as fake:
            yield fake
