"""Dispatching on RabbitMQ (docs/rabbitmq.md, "Dispatch"): the call returns once the broker
has confirmed the job, or raises when it cannot."""

import logging

from app.jobs.send_notification_job import SendNotificationJob
from core.errors import ConnectionLostError
from core.queue.queue_manager import JobHandle, queue

logger = logging.getLogger(__name__)


async def remind(user_id: int, text: str) -> JobHandle | None:
    """Queue a reminder for in 30 seconds; None when RabbitMQ cannot be reached."""
    try:
        # Returns once the broker has confirmed the job to its quorum queue.
        return await queue.later("30s", SendNotificationJob(user_id, text))
    except ConnectionLostError as exc:
        # Not queued: nothing was confirmed, and nothing is sent later behind your back.
        logger.warning("reminder for user %s not queued: %s", user_id, exc)
        return None
