"""django-db-queue's tasks, workspace and hooks in Topiq (docs/coming-from.md)."""

from typing import Any

from core.errors import JobFailedError
from core.job import Job
from core.queue.queue_manager import dispatch

created: list[str] = []


# In a project all of this lives in a module under app/jobs/ (e.g. app/jobs/import_cats.py).
def fetch_cats(job: Any) -> None:  # a task: called with the job
    job.workspace["fetched"] = job.workspace.get("fetched", 0) + 1
    job.workspace["message"] = "Hello, task 2!"


def store_cats(job: Any) -> None:
    if job.attempts == 1:
        raise ConnectionError("database away")  # the retry resumes here, not at fetch_cats
    job.workspace["stored"] = f"task 1 said: {job.workspace['message']}"


def on_creation(job: Any) -> None:  # in the process that dispatched the job
    created.append(f"created {job.job_id}")


def before_task(job: Any) -> None:  # in the worker, before each task
    if job.workspace["cats_import_id"] == 0:
        raise ValueError("no such import")
    print(f"{job.job_id}: a task starts, try {job.attempts}")


def after_task(job: Any) -> None:  # after each task, however it ended
    print(f"{job.job_id}: a task ended, try {job.attempts}")


def on_failure(job: Any, exception: BaseException) -> None:
    print(f"{job.job_id}: failed for good: {exception}")


class ImportCats(Job):  # JOBS = {"import_cats": {...}}
    queue = "cats"
    max_tries = 2  # ddq runs a job once; here a failed task is retried where it stopped
    retry_after = 0.1
    steps = [fetch_cats, store_cats]  # "tasks"
    creation_hook = on_creation
    pre_task_hook = before_task
    post_task_hook = after_task
    failure_hook = on_failure

    def __init__(self, workspace: dict[str, Any]) -> None:
        self.workspace = workspace


async def main() -> list[Any]:
    done = await dispatch(ImportCats({"cats_import_id": 7}))  # Job.objects.create(...)
    broken = await dispatch(ImportCats({"cats_import_id": 0}))
    lines = [len(created), await done.result(timeout=30)]  # the result: the final workspace
    try:
        await broken.result(timeout=30)
    except JobFailedError as exc:
        lines.append(f"{(await broken.status()).status}: {exc.error}")
    return lines
