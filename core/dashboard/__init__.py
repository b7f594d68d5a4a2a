"""The web dashboard: queues, jobs, workers, failed jobs and schedules, live (`dashboard`).

from core.dashboard import create_app
app = create_app(settings)          # a Starlette app; `python main.py dashboard` serves it
"""

from core.dashboard.app import create_app
from core.dashboard.security import is_loopback

__all__ = ["create_app", "is_loopback"]
