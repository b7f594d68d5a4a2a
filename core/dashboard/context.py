"""What every view of the dashboard shares: the settings, the backends, the templates, the token."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from core.dashboard import charts, present
from core.dashboard.security import LoginThrottle, csrf_token
from core.dashboard.source import Source
from core.queue.queue_manager import QueueManager
from core.settings import Settings

__all__ = ["HERE", "Dashboard"]

HERE = Path(__file__).resolve().parent


class Dashboard:
    """What every view shares: the settings, the backends, the templates and the token."""

    def __init__(self, settings: Settings, manager: QueueManager) -> None:
        self.settings = settings
        self.source = Source(manager)
        self.token = settings.dashboard_token.get_secret_value()
        self.throttle = LoginThrottle()
        self.redact = present.Redactor(settings)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(
            when=present.when,
            ago=present.ago,
            duration=present.duration,
            per_minute=present.per_minute,
            redact=self.redact,
        )
        env.globals.update(
            throughput_chart=charts.throughput_chart,
            wait_chart=charts.wait_chart,
            quote=lambda value: quote(str(value), safe=""),
        )
        self.templates = Jinja2Templates(env=env)

    def render(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        """A page: `context` plus what the layout needs (connection, CSRF token, flash)."""
        connection = context.get("connection") or self.source.connections[0]

        def href(path: str, **query: Any) -> str:
            params = {"connection": connection, **{k: v for k, v in query.items() if v}}
            return f"{path}?{urlencode(params)}"

        full = {
            "connections": self.source.connections,
            "connection": connection,
            "csrf": csrf_token(request),
            "flash": request.session.pop("flash", ""),
            "href": href,
            "login": bool(self.token),
            "logged_in": request.session.get("auth") is True,
            **context,
        }
        return self.templates.TemplateResponse(request, name, full, status_code=status)
