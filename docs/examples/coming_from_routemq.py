"""RouteMQ's queue calls as its documentation writes them (docs/coming-from.md, "RouteMQ")."""

from core.job import Job
from core.queue.queue_manager import dispatch, queue


# In a project this lives in app/jobs/generate_report_job.py.
class GenerateReportJob(Job):
    max_tries = 3
    timeout = 60
    retry_after = 10
    queue = "reports"

    def __init__(self) -> None:
        super().__init__()
        self.user_id: int | None = None
        self.report_type: str | None = None

    async def handle(self) -> str:
        return f"{self.report_type} report for user {self.user_id}"

    async def failed(self, exception: BaseException) -> None:
        print(f"report for user {self.user_id} failed: {exception}")


async def main() -> list[str]:
    job = GenerateReportJob()
    job.user_id = 456
    job.report_type = "monthly"

    first = await dispatch(job)  # RouteMQ returned nothing; Topiq returns a handle
    second = await queue.push(job, queue="reports")  # the same object again: a new job
    third = await queue.later(0.5, job)  # seconds, as in RouteMQ ("10 minutes" works too)

    jobs = []
    for user_id in (1, 2, 3):
        job = GenerateReportJob()
        job.user_id = user_id
        job.report_type = "daily"
        jobs.append(job)
    many = await queue.bulk(jobs)

    waiting = await queue.size("reports")
    results = [await h.result(timeout=30) for h in (first, second, third, *many)]
    return [f"{waiting} waiting", *results]
