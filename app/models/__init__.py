"""The application's ORM models (see `core.model.Model`)."""

from app.models.queue_failed_job import QueueFailedJob

__all__ = ["QueueFailedJob"]
