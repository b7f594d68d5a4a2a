"""The job docs/queue.md ("Writing a job") shows; its other examples dispatch it."""

import logging

from core.job import Job

logger = logging.getLogger("app.jobs")


class SendNotificationJob(Job):
    """Send a push notification to a user."""

    max_tries = 3  # run at most three times
    timeout = 30  # seconds per try, then cancelled
    retry_after = [5, 30, 120]  # wait 5 s, then 30 s, then 120 s between tries
    queue = "notifications"

    def __init__(self, user_id: int, message: str) -> None:
        # Public attributes are the payload; the worker restores them without calling __init__.
        self.user_id = user_id
        self.message = message

    async def handle(self) -> None:
        logger.info("notify user %s (try %d): %s", self.user_id, self.attempts, self.message)

    async def failed(self, exception: BaseException) -> None:
        logger.error("gave up notifying user %s: %s", self.user_id, exception)
