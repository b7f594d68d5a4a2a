"""Routes: topic patterns compiled once into a subscription filter and a matcher.

    router = Router()

    @router.on("devices/{device_id}/telemetry", qos=1)
    async def telemetry(device_id: str, payload: dict) -> None: ...

A pattern is MQTT topic levels separated by `/`; a level may be `{name}` (one level, captured
by name), `+` (one level, not captured) or, as the last level, `#` (any number of levels,
including none). `{name}` and `+` subscribe as `+`. The first route whose pattern matches the
whole topic handles the message; a topic no route matches is ignored.

A route may also say what the jobs its handler dispatches get (docs/iot.md), as templates of
its `{params}`: `group="{device_id}"` (one job per device at a time, in order),
`coalesce="{device_id}"` (a waiting job is replaced by the newest) and
`status_topic="devices/{device_id}/status"` (the job's outcome is published there).
"""

from __future__ import annotations

import abc
import re
import string
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from core.mqtt.context import MessageContext
from core.mqtt.endpoint import Endpoint, Handler, bind_handler
from core.mqtt.errors import RouteError

__all__ = [
    "CallNext",
    "JobOptions",
    "Middleware",
    "Route",
    "RouteGroup",
    "Router",
    "Subscription",
    "TopicPattern",
    "filters_overlap",
    "topic_matches",
]

#: Calls the rest of the chain (further middleware, then the handler).
CallNext = Callable[[MessageContext], Awaitable[Any]]
#: `async def middleware(context, call_next)`: runs around the handler; returns its result.
Middleware = Callable[[MessageContext, CallNext], Awaitable[Any]]

H = TypeVar("H", bound=Handler)

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SHARE_PREFIX = "$share/"


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled pattern: the MQTT filter to subscribe with and a full-topic matcher.

    Attributes:
        pattern: The pattern as written (`devices/{device_id}/telemetry`).
        filter: The subscription filter (`devices/+/telemetry`).
        params: The names of the captured levels, in order.
    """

    pattern: str
    filter: str
    params: tuple[str, ...]
    _regex: re.Pattern[str]
    _wild_first: bool  # the first level is a wildcard: it must not match `$SYS/...` topics

    @classmethod
    def compile(cls, pattern: str) -> TopicPattern:
        """Check and compile `pattern`; `RouteError` says what is wrong with it."""
        if not pattern:
            raise RouteError("a route pattern cannot be empty")
        if pattern.startswith(_SHARE_PREFIX):
            raise RouteError(
                f"route {pattern!r}: write the plain topic and pass shared='group' instead "
                "of a $share/ prefix"
            )
        if "\0" in pattern:
            raise RouteError(f"route {pattern!r}: a topic cannot contain a NUL character")
        levels = pattern.split("/")
        names: list[str] = []
        filter_levels: list[str] = []
        regex: list[str] = []
        for index, level in enumerate(levels):
            if level == "#":
                if index != len(levels) - 1:
                    raise RouteError(f"route {pattern!r}: '#' is only allowed as the last level")
                filter_levels.append("#")
                continue
            if level == "+":
                filter_levels.append("+")
                regex.append("[^/]*")
                continue
            param = _PARAM.fullmatch(level)
            if param is not None:
                name = param.group(1)
                if name in names:
                    raise RouteError(f"route {pattern!r}: parameter {{{name}}} appears twice")
                names.append(name)
                filter_levels.append("+")
                regex.append(f"(?P<{name}>[^/]+)")  # a named value is never empty
                continue
            if any(char in level for char in "+#{}"):
                raise RouteError(
                    f"route {pattern!r}: level {level!r} mixes text with a wildcard or "
                    "parameter; '+', '#' and '{name}' must fill a whole level"
                )
            filter_levels.append(level)
            regex.append(re.escape(level))
        body = "/".join(regex)
        if filter_levels[-1] == "#":
            # `a/#` also matches the parent level `a` (MQTT 3.1.1 section 4.7.1.2).
            body = f"{body}(?:/.*)?" if regex else ".*"
        return cls(
            pattern=pattern,
            filter="/".join(filter_levels),
            params=tuple(names),
            _regex=re.compile(body, re.DOTALL),
            _wild_first=filter_levels[0] in ("+", "#"),
        )

    def match(self, topic: str) -> dict[str, str] | None:
        """The captured parameters if `topic` matches the whole pattern, else `None`."""
        if self._wild_first and topic.startswith("$"):
            return None
        found = self._regex.fullmatch(topic)
        return None if found is None else found.groupdict()


def filters_overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters (`a/+` and `a/#` do; `a/+` and `b/+` not)."""
    left, right = a.split("/"), b.split("/")
    if left[0].startswith("$") != right[0].startswith("$") and (
        left[0] in ("+", "#") or right[0] in ("+", "#")
    ):
        return False  # wildcards in the first level never match `$` topics
    for x, y in zip(left, right, strict=False):
        if "#" in (x, y):
            return True
        if x != y and "+" not in (x, y):
            return False
    if len(left) == len(right):
        return True
    longer = left if len(left) > len(right) else right
    return len(longer) == min(len(left), len(right)) + 1 and longer[-1] == "#"


def topic_matches(filter: str, topic: str) -> bool:
    """Whether `topic` (a topic name, no wildcards) matches the MQTT `filter`: `+` is one
    level, a final `#` any number of levels (the parent too); a first-level wildcard does not
    match topics starting with `$`."""
    levels = filter.split("/")
    parts = topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(parts) or (level != "+" and level != parts[index]):
            return False
    return len(parts) == len(levels)


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What a route asks of the jobs its handler dispatches: templates of its `{params}`.

    `None` takes the value of the enclosing group or `include` (if any); `""` asks for none.
    """

    group: str | None = None
    coalesce: str | None = None
    status_topic: str | None = None

    def over(self, defaults: JobOptions) -> JobOptions:
        """These options, with `defaults` where these say nothing (`None`)."""
        return JobOptions(
            defaults.group if self.group is None else self.group,
            defaults.coalesce if self.coalesce is None else self.coalesce,
            defaults.status_topic if self.status_topic is None else self.status_topic,
        )


_NO_OPTIONS = JobOptions()


def _checked_template(pattern: TopicPattern, option: str, template: Any) -> str:
    """A route option's template, if it uses only the route's `{params}`; else `RouteError`."""
    where = f"route {pattern.pattern!r}: {option}={template!r}"
    if not isinstance(template, str):
        raise RouteError(f"{where} must be a string template such as '{{device_id}}'")
    known = ", ".join(f"{{{name}}}" for name in pattern.params) or "none"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RouteError(
            f"{where} is not a template ({exc}); double a literal brace ('{{{{')"
        ) from None
    literal = ""
    for text, field, spec, conversion in parsed:
        literal += text
        if field is None:
            continue
        if field not in pattern.params or spec or conversion:
            raise RouteError(
                f"{where}: a template may only use the route's parameters as they are "
                f"(this route's: {known}), got {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}"
            )
    if option == "status_topic" and template:
        if any(char in literal for char in "+#\0") or template.startswith("$"):
            raise RouteError(
                f"{where} is not a topic to publish to: no '+', '#' or NUL, and no leading '$'"
            )
    elif re.search(r"[\x00-\x1f\x7f]", literal):
        raise RouteError(f"{where} holds a control character")
    return template


@dataclass(frozen=True, slots=True)
class Subscription:
    """One SUBSCRIBE the app sends (and re-sends after every reconnect).

    Attributes:
        filter: The filter as sent, `$share/<group>/` prefix included.
        qos: The maximum QoS asked for.
        id: An MQTT 5 subscription identifier, set when this filter overlaps another one so
            the app can tell which subscription a copy of a message was sent for.
    """

    filter: str
    qos: int
    id: int | None = None


class Route:
    """A pattern, its handler and how to subscribe to it.

    Attributes:
        pattern: The compiled pattern.
        handler: The function called for matching messages.
        qos: The QoS to subscribe with.
        shared: The shared-subscription group, or `None`.
        middleware: The route's own middleware (groups' first), outermost first.
        name: A label for logs (the handler's name unless given).
        subscription_id: Set by the router when the filter overlaps another route's.
        options: The `group`, `coalesce` and `status_topic` templates as given (`None`: not
            given); `group`, `coalesce` and `status_topic` are those in effect ("" none).
    """

    def __init__(
        self,
        pattern: str,
        handler: Handler,
        *,
        qos: int = 1,
        shared: str | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        options: JobOptions = _NO_OPTIONS,
    ) -> None:
        if qos not in (0, 1, 2):
            raise RouteError(f"route {pattern!r}: qos must be 0, 1 or 2, got {qos!r}")
        if shared is not None and (not shared or any(c in shared for c in "/+#")):
            raise RouteError(
                f"route {pattern!r}: shared group {shared!r} must be a non-empty name "
                "without '/', '+' or '#'"
            )
        self.pattern = TopicPattern.compile(pattern)
        self.handler = handler
        self.qos = qos
        self.shared = shared
        self.middleware: tuple[Middleware, ...] = tuple(middleware)
        self.name = name or getattr(handler, "__qualname__", repr(handler))
        self.subscription_id: int | None = None
        self._endpoint: Endpoint = bind_handler(handler, pattern, self.pattern.params)
        self._chain: Endpoint = self._endpoint
        self.options = options
        self.group = _checked_template(self.pattern, "group", options.group or "")
        self.coalesce = _checked_template(self.pattern, "coalesce", options.coalesce or "")
        self.status_topic = _checked_template(
            self.pattern, "status_topic", options.status_topic or ""
        )
        #: Whether the route asks anything of its jobs (else a message costs nothing more).
        self.has_job_options = bool(self.group or self.coalesce or self.status_topic)

    @property
    def filter(self) -> str:
        """The subscription filter, with the `$share/<group>/` prefix for shared routes."""
        if self.shared is None:
            return self.pattern.filter
        return f"{_SHARE_PREFIX}{self.shared}/{self.pattern.filter}"

    def matches(self, topic: str) -> dict[str, str] | None:
        """The path parameters if `topic` matches this route, else `None`."""
        return self.pattern.match(topic)

    def job_options(self, params: dict[str, str]) -> tuple[str, str, str]:
        """`group`, `coalesce` and `status_topic` rendered with a message's parameters."""
        return (
            self.group and self.group.format_map(params),
            self.coalesce and self.coalesce.format_map(params),
            self.status_topic and self.status_topic.format_map(params),
        )

    def build(self, outer: Sequence[Middleware] = ()) -> None:
        """Compose `outer` (the router's middleware), the route's middleware and the handler
        into one callable, once, so a message costs no list walking."""
        chain = self._endpoint
        for middleware in reversed((*outer, *self.middleware)):
            chain = _wrap(middleware, chain)
        self._chain = chain

    async def __call__(self, context: MessageContext) -> Any:
        """Run the middleware chain and the handler for one message."""
        return await self._chain(context)

    def __repr__(self) -> str:
        return f"<Route {self.pattern.pattern!r} -> {self.name} qos={self.qos}>"


def _wrap(middleware: Middleware, call_next: CallNext) -> Endpoint:
    async def step(context: MessageContext) -> Any:
        return await middleware(context, call_next)

    return step


def _join(prefix: str, pattern: str) -> str:
    prefix, pattern = prefix.rstrip("/"), pattern.lstrip("/")
    if not prefix:
        return pattern
    return f"{prefix}/{pattern}" if pattern else prefix


class _Registrar(abc.ABC):
    """What routers and groups share: `on` and `group`."""

    @abc.abstractmethod
    def _add(
        self,
        pattern: str,
        handler: Handler,
        qos: int | None,
        shared: str | None,
        middleware: Sequence[Middleware],
        name: str | None,
        options: JobOptions = _NO_OPTIONS,
    ) -> Route:
        """Register one route (the router) or pass it up with the prefix added (a group)."""

    @overload
    def on(
        self,
        pattern: str,
        handler: None = None,
        *,
        qos: int | None = None,
        shared: str | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        group: str | None = None,
        coalesce: str | None = None,
        status_topic: str | None = None,
    ) -> Callable[[H], H]: ...

    @overload
    def on(
        self,
        pattern: str,
        handler: H,
        *,
        qos: int | None = None,
        shared: str | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        group: str | None = None,
        coalesce: str | None = None,
        status_topic: str | None = None,
    ) -> H: ...

    def on(
        self,
        pattern: str,
        handler: H | None = None,
        *,
        qos: int | None = None,
        shared: str | None = None,
        middleware: Sequence[Middleware] = (),
        name: str | None = None,
        group: str | None = None,
        coalesce: str | None = None,
        status_topic: str | None = None,
    ) -> H | Callable[[H], H]:
        """Route messages matching `pattern` to `handler`; without a handler, a decorator.

        Args:
            pattern: Topic levels with `{param}`, `+` and a final `#`.
            handler: `async def handler(<path params>, payload, client, context, ...)`.
            qos: The QoS to subscribe with (default 1, or the group's).
            shared: Subscribe as `$share/<shared>/<filter>`, so the app processes using the
                same group split the messages; matching still uses the plain topic.
            middleware: Middleware for this route only, outermost first.
            name: A label for logs (default: the handler's qualified name).
            group: The jobs the handler dispatches run one at a time per group, in order: a
                template of the route's parameters (`"{device_id}"`). A job's own `group`
                wins. `None`: the enclosing group's; `""`: none.
            coalesce: A dispatched job replaces a waiting job of its class with the same key
                (a template: `"{device_id}"`), unless it has a `unique_key` or an id of its
                own.
            status_topic: The dispatched jobs' outcomes are published there when they end
                (a template: `"devices/{device_id}/status"`); a job's own wins.

        Returns:
            The handler, unchanged (so the decorator form leaves the function usable).
        """
        options = JobOptions(group, coalesce, status_topic)
        if handler is None:

            def decorator(function: H) -> H:
                self._add(pattern, function, qos, shared, middleware, name, options)
                return function

            return decorator
        self._add(pattern, handler, qos, shared, middleware, name, options)
        return handler

    def group(
        self,
        prefix: str,
        *,
        middleware: Sequence[Middleware] = (),
        qos: int | None = None,
        shared: str | None = None,
        group: str | None = None,
        coalesce: str | None = None,
        status_topic: str | None = None,
    ) -> RouteGroup:
        """Routes under a common prefix (`devices/{device_id}`), sharing middleware and options.

        The prefix may hold parameters and `+`, but not `#`. `group`, `coalesce` and
        `status_topic` are defaults for its routes (see `on`); each route's templates are
        checked against its own parameters.
        """
        if "#" in prefix.split("/"):
            raise RouteError(f"group prefix {prefix!r}: '#' can only end a route pattern")
        return RouteGroup(
            self, prefix, middleware, qos, shared, JobOptions(group, coalesce, status_topic)
        )


class RouteGroup(_Registrar):
    """Routes sharing a prefix, middleware, QoS and shared group; made by `Router.group`."""

    def __init__(
        self,
        parent: _Registrar,
        prefix: str,
        middleware: Sequence[Middleware],
        qos: int | None,
        shared: str | None,
        options: JobOptions = _NO_OPTIONS,
    ) -> None:
        self._parent = parent
        self.prefix = prefix
        self.middleware = tuple(middleware)
        self.qos = qos
        self.shared = shared
        self.options = options

    def _add(
        self,
        pattern: str,
        handler: Handler,
        qos: int | None,
        shared: str | None,
        middleware: Sequence[Middleware],
        name: str | None,
        options: JobOptions = _NO_OPTIONS,
    ) -> Route:
        return self._parent._add(
            _join(self.prefix, pattern),
            handler,
            self.qos if qos is None else qos,
            self.shared if shared is None else shared,
            (*self.middleware, *middleware),
            name,
            options.over(self.options),
        )


class Router(_Registrar):
    """An ordered list of routes; the first whose pattern matches a topic handles it.

    Args:
        middleware: Middleware around every route, outermost first.
    """

    def __init__(self, *, middleware: Sequence[Middleware] = ()) -> None:
        self._middleware: list[Middleware] = list(middleware)
        self._routes: list[Route] = []
        self._frozen = False

    @property
    def routes(self) -> tuple[Route, ...]:
        """The routes in the order they are tried."""
        return tuple(self._routes)

    def add_middleware(self, middleware: Middleware) -> None:
        """Add middleware around every route (inside the ones given so far)."""
        self._check_open()
        self._middleware.append(middleware)

    def include(
        self,
        other: Router,
        prefix: str = "",
        *,
        group: str | None = None,
        coalesce: str | None = None,
        status_topic: str | None = None,
    ) -> None:
        """Add `other`'s routes (with its middleware) after this router's, under `prefix`.

        `group`, `coalesce` and `status_topic` are defaults for the routes that set none
        (see `on`); templates may use the prefix's parameters.
        """
        self._check_open()
        defaults = JobOptions(group, coalesce, status_topic)
        for route in other.routes:
            self._add(
                _join(prefix, route.pattern.pattern),
                route.handler,
                route.qos,
                route.shared,
                (*other._middleware, *route.middleware),
                route.name,
                route.options.over(defaults),
            )

    def _add(
        self,
        pattern: str,
        handler: Handler,
        qos: int | None,
        shared: str | None,
        middleware: Sequence[Middleware],
        name: str | None,
        options: JobOptions = _NO_OPTIONS,
    ) -> Route:
        self._check_open()
        route = Route(
            pattern,
            handler,
            qos=1 if qos is None else qos,
            shared=shared,
            middleware=middleware,
            name=name,
            options=options,
        )
        self._routes.append(route)
        return route

    def _check_open(self) -> None:
        if self._frozen:
            raise RouteError(
                "the router is in use: add routes and middleware before the app starts"
            )

    def freeze(self) -> None:
        """Build every route's middleware chain and pick subscription ids; no changes after.

        The app calls this when it starts; calling it again does nothing.
        """
        if self._frozen:
            return
        self._frozen = True
        for route in self._routes:
            route.build(self._middleware)
        # Brokers may send one copy of a message per matching subscription (Mosquitto does
        # under MQTT 5). Filters that overlap get identifiers so a copy sent for another
        # route's subscription can be recognised and skipped: each message runs once.
        filters = list(dict.fromkeys(route.filter for route in self._routes))
        ids: dict[str, int] = {}
        for i, first in enumerate(filters):
            for second in filters[i + 1 :]:
                if filters_overlap(_plain(first), _plain(second)):
                    for name in (first, second):
                        ids.setdefault(name, len(ids) + 1)
        for route in self._routes:
            route.subscription_id = ids.get(route.filter)

    def subscriptions(self) -> list[Subscription]:
        """One subscription per distinct filter, with the highest QoS any of its routes asks."""
        self.freeze()
        found: dict[str, Subscription] = {}
        for route in self._routes:
            known = found.get(route.filter)
            qos = route.qos if known is None else max(known.qos, route.qos)
            found[route.filter] = Subscription(route.filter, qos, route.subscription_id)
        return list(found.values())

    def resolve(
        self, topic: str, subscription_ids: Iterable[int] = ()
    ) -> tuple[Route, dict[str, str]] | None:
        """The first route matching `topic` and its parameters, or `None`.

        When the message says which subscriptions it was sent for and the first matching
        route's subscription is not among them, this copy is another route's duplicate and
        `None` is returned (the copy for that route arrives on its own).
        """
        for route in self._routes:
            params = route.matches(topic)
            if params is None:
                continue
            ids = tuple(subscription_ids)
            if ids and route.subscription_id is not None and route.subscription_id not in ids:
                return None
            return route, params
        return None


def _plain(filter: str) -> str:
    if filter.startswith(_SHARE_PREFIX):
        return filter.split("/", 2)[2]
    return filter
