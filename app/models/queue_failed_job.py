"""`QueueFailedJob`: the `queue_failed_jobs` table, for queries with the ORM.

session = await Model.get_session()
result = await session.execute(
    select(QueueFailedJob)
    .where(QueueFailedJob.queue == "emails")
    .order_by(QueueFailedJob.failed_at.desc())
)
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Mapped

from core.model import Model
from core.queue.drivers.sql_tables import queue_failed_jobs

__all__ = ["QueueFailedJob"]


class QueueFailedJob(Model):
    """A job that failed for good, as the worker recorded it.

    Attributes:
        id: The row number.
        uuid: The job id (the one `dispatch` returned).
        connection: The queue connection the job ran on (`database`, `redis`).
        queue: The queue name.
        payload: The job as JSON: class path, attributes, options.
        exception: The exception line and its traceback.
        failed_at: When it failed, naive UTC (millisecond precision).
    """

    # The table the queue driver writes, shared rather than declared twice.
    __table__ = queue_failed_jobs

    id: Mapped[int]
    uuid: Mapped[str]
    connection: Mapped[str]
    queue: Mapped[str]
    payload: Mapped[str]
    exception: Mapped[str]
    failed_at: Mapped[datetime]

    def __repr__(self) -> str:
        return f"<QueueFailedJob {self.uuid} queue={self.queue!r} failed_at={self.failed_at}>"
