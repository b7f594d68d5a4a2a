"""Dispatching jobs (docs/queue.md, "Dispatching")."""

from datetime import timedelta

from app.jobs.send_notification_job import SendNotificationJob
from core.queue.queue_manager import dispatch, queue


async def main() -> list[str]:
    ids = []
    # On the job's own queue and connection:
    ids.append(await dispatch(SendNotificationJob(123, "Your order has shipped")))
    # To another queue, or after a delay (seconds, "10 minutes", "1h30m", timedelta, datetime):
    ids.append(await queue.push(SendNotificationJob(7, "Welcome!"), queue="emails"))
    ids.append(await queue.later("10 minutes", SendNotificationJob(7, "How was it?")))
    ids.append(await queue.later(timedelta(hours=1), SendNotificationJob(9, "Reminder")))
    # Many at once: one round trip; if one job cannot be stored, none is queued.
    ids += await queue.bulk(SendNotificationJob(u, "Maintenance tonight") for u in range(100))
    # How much is waiting (pending + delayed + reserved):
    backlog = await queue.size("notifications")
    print(f"{backlog} notifications waiting")
    return ids


if __name__ == "__main__":  # `.venv/bin/python docs/examples/queue_dispatch.py`
    import asyncio

    asyncio.run(main())
