"""Who may use the dashboard, and which POSTs are actions its own pages asked for.

* Bound to loopback without `DASHBOARD_TOKEN`: no login, but only requests whose `Host` is a
  loopback name are served (a web page cannot reach the dashboard through DNS rebinding).
* With a token: every path but `/login`, `/health` and `/static/` needs the signed session
  cookie `/login` sets, or `Authorization: Bearer <token>`. A browser without either is sent to
  `/login`; anything else gets 401.
* Every action is a POST carrying the session's CSRF token (form field `csrf` or header
  `X-CSRF-Token`) from the same origin (`Origin`, else `Referer`, and `Sec-Fetch-Site`); else
  403. A request authenticated by the Bearer header needs no CSRF token: a browser never adds
  that header to a cross-site request by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict, deque
from typing import Final
from urllib.parse import quote, urlsplit

from starlette.datastructures import FormData
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "LOGIN_FAILURES",
    "LOGIN_WINDOW",
    "MIN_TOKEN_LENGTH",
    "PUBLIC_PATHS",
    "AuthMiddleware",
    "CsrfError",
    "LoginThrottle",
    "bearer_ok",
    "csrf_token",
    "is_loopback",
    "safe_next",
    "session_secret",
    "token_matches",
    "verify_post",
]

#: Paths served without the token (`/static/` as a prefix).
PUBLIC_PATHS: Final = frozenset({"/login", "/health"})
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name from `--host` or a `Host` header) is loopback."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The shortest DASHBOARD_TOKEN a dashboard bound off loopback accepts.
MIN_TOKEN_LENGTH: Final = 16
#: Wrong tokens one client address may send to `/login` per `LOGIN_WINDOW` seconds; more get
#: 429 (the token is not even compared) until the oldest failure leaves the window.
LOGIN_FAILURES: Final = 10
LOGIN_WINDOW: Final = 60.0
#: Client addresses the throttle remembers (the least recently failing are forgotten first).
_THROTTLE_ADDRESSES: Final = 10_000


class LoginThrottle:
    """Failed logins per client address over the last `window` seconds, bounded in memory."""

    def __init__(self, failures: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW) -> None:
        self.failures = failures
        self.window = window
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._seen.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._seen[address]
        return times

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again; 0 when it may now."""
        now = time.monotonic()
        times = self._recent(address, now)
        if len(times) < self.failures:
            return 0.0
        return max(0.0, times[0] + self.window - now)

    def failed(self, address: str) -> None:
        """Count one wrong token from `address`."""
        now = time.monotonic()
        times = self._recent(address, now)
        self._seen[address] = times
        self._seen.move_to_end(address)
        times.append(now)
        while len(self._seen) > _THROTTLE_ADDRESSES:
            self._seen.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """Forget `address`'s failures."""
        self._seen.pop(address, None)


def session_secret(token: str) -> str:
    """The key signing session cookies: derived from the token (so several dashboard
    processes behind one balancer accept each other's sessions), random per process without
    one (sessions then end with the process)."""
    if not token:
        return secrets.token_hex(32)
    return hmac.new(token.encode(), b"topiq dashboard session", hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    """Compare in constant time (an attacker cannot learn the token a byte at a time)."""
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def bearer_ok(conn: HTTPConnection, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>`."""
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and token_matches(value.strip(), token)


def csrf_token(conn: HTTPConnection) -> str:
    """The session's CSRF token, made on first use."""
    value = conn.session.get("csrf")
    if not isinstance(value, str) or len(value) < 32:
        value = secrets.token_urlsafe(32)
        conn.session["csrf"] = value
    return value


def safe_next(value: str | None) -> str:
    """A path to go to after login: local only (`//evil.example` and `https://...` are not)."""
    if (
        not value
        or not value.startswith("/")
        or "\\" in value
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)  # browsers drop tabs, newlines
        or value.startswith("//")
    ):
        return "/"
    return value


class CsrfError(Exception):
    """A POST that is not an action of the dashboard's own pages."""


def _host_of(value: str) -> str:
    return urlsplit(value).netloc.lower()


async def verify_post(request: Request, token: str) -> FormData:
    """The form of an action POST, after the origin and CSRF checks.

    Raises:
        CsrfError: cross-origin, or the CSRF token is missing or wrong.
    """
    form = await request.form()
    if token and bearer_ok(request, token):
        return form
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise CsrfError("the request came from another site")
    source = request.headers.get("origin") or request.headers.get("referer")
    host = request.headers.get("host", "").lower()
    if source is not None and (source == "null" or _host_of(source) != host):
        raise CsrfError("the request came from another origin")
    expected = request.session.get("csrf")
    given = form.get("csrf") or request.headers.get("x-csrf-token") or ""
    if (
        not isinstance(expected, str)
        or not isinstance(given, str)
        or not hmac.compare_digest(given.encode(), expected.encode())
    ):
        raise CsrfError("the form's CSRF token is missing or stale: reload the page")
    return form


class AuthMiddleware:
    """Refuses requests without the token (when one is set) and foreign `Host` headers
    (when none is). Sits inside `SessionMiddleware`, so the session is readable here."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        refusal = self._refusal(conn)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, conn: HTTPConnection) -> Response | None:
        path = conn.url.path
        if not self.token:
            host = conn.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                return PlainTextResponse(
                    "This dashboard has no DASHBOARD_TOKEN, so it answers only requests "
                    "addressed to a loopback name (localhost, 127.0.0.1, [::1]).",
                    status_code=403,
                )
            return None
        if path in PUBLIC_PATHS or path.startswith("/static/"):
            return None
        if conn.session.get("auth") is True or bearer_ok(conn, self.token):
            return None
        if conn.scope["method"] == "GET" and "text/html" in conn.headers.get("accept", ""):
            target = path + (f"?{conn.url.query}" if conn.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return JSONResponse(
            {"error": "authentication required: log in, or send Authorization: Bearer <token>"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="topiq dashboard"'},
        )
