"""What an `app/schedule.py` declares (docs/workflows.md, Schedules); tests/test_schedule.py
loads it and runs its ticks."""

from app.jobs.poll_device_job import PollDeviceJob
from app.jobs.send_notification_job import SendNotificationJob
from core.schedule import schedule

# Every day at 07:30 in Berlin, summer and winter. After a pause of the schedulers, one
# catch-up job for the latest morning missed (missed="once", the default).
schedule.cron(
    "30 7 * * *",
    SendNotificationJob(user_id=1, message="good morning"),
    name="morning-greeting",
    timezone="Europe/Berlin",
)

# Every 30 seconds, counted from the Unix epoch: every scheduler ticks at :00 and :30. Ticks
# missed while no scheduler ran are dropped: only a fresh poll is worth anything.
schedule.every(
    "30s",
    PollDeviceJob(device_id="gw-1"),
    name="poll-gw-1",
    missed="skip",
    queue="polling",
)
