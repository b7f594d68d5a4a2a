"""RQ's enqueue and its options in Topiq (docs/coming-from.md, "RQ")."""

from datetime import datetime, timedelta

from core.job import job
from core.queue.queue_manager import Queue


# In a project these live in a module under app/ (e.g. app/tasks.py).
def count_words(text: str, description: str = "", ttl: int = 0) -> int:
    return len(text.split())


def generate_report() -> str:
    return "report"


def send_report() -> str:
    return "sent"


@job("low", timeout=5)  # RQ's @job: the queue first
def add(x: int, y: int) -> int:
    return x + y


async def main() -> list[object]:
    q = Queue("low")  # the connection is QUEUE_CONNECTION's unless named: Queue("low", "redis")
    handles = [
        await q.enqueue(count_words, "one two three"),
        await q.enqueue(
            count_words,
            "with every option",
            job_timeout="1h",  # or 3600, "3600", "3m", "5s"
            result_ttl=600,
            ttl=30,  # must start within 30 s of becoming due
            failure_ttl=86400,
            job_id="words-1",
            at_front=True,
            description="counting words",
            meta={"requested_by": "docs"},
        ),
        # A name the function takes itself: explicit args= and kwargs=.
        await q.enqueue(count_words, ttl=30, args=("a b",), kwargs={"ttl": 15}),
        # A dotted path: "app.tasks.count_words" in a project.
        await q.enqueue(f"{__name__}.count_words", "by its path"),
        await add.delay(3, 4),  # RQ's .delay: the same as add.dispatch(3, 4)
    ]
    report = await q.enqueue(generate_report)
    handles.append(await q.enqueue(send_report, depends_on=report))
    handles += await q.enqueue_many(
        [
            Queue.prepare_data(count_words, "first of many", job_id="my_job_id"),
            Queue.prepare_data(count_words, "second", job_id="my_other_job_id"),
        ]
    )
    soon = await q.enqueue_in(timedelta(minutes=10), count_words, "later")
    new_year = await q.enqueue_at(datetime(2099, 1, 1), count_words, "much later")  # naive: UTC
    waiting = [(await h.status()).status for h in (soon, new_year)]
    for h in (soon, new_year):
        await h.cancel()
    results = [await h.result(timeout=30) for h in handles]
    record = await handles[1].status()  # also shown by `queue:job words-1`
    return [*results, *waiting, record.description, record.meta]
