"""A job logging with the standard library: in JSON logs, its lines name the job
(docs/observing.md, "Structured logs")."""

import logging

from core.job import Job

logger = logging.getLogger("app.jobs.resize")


class ResizeImage(Job):
    def __init__(self, path: str) -> None:
        self.path = path

    async def handle(self) -> str:
        logger.info("resizing %s", self.path)  # + job_id, queue, job, attempt, worker
        return self.path.replace(".png", ".small.png")
