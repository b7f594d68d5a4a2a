"""The application's schedules: jobs enqueued on cron expressions and at intervals.

Loaded by `python main.py schedule:run` and by workers started with `--with-scheduler` (the
`SCHEDULE_MODULE` setting names another module). Nothing is scheduled until you declare it here;
docs/workflows.md, Schedules, explains each option. For example:

    from app.jobs.poll_device_job import PollDeviceJob
    from core.schedule import schedule

    # Every day at 03:00 Berlin time (NightlyReport: a job of your own); after a pause, one
    # catch-up run for the latest tick missed (missed="once", the default).
    schedule.cron("0 3 * * *", NightlyReport(), name="nightly-report", timezone="Europe/Berlin")
    # Every 30 seconds; ticks missed while no scheduler ran are dropped.
    schedule.every("30s", PollDeviceJob(device_id="gw-1"), missed="skip")
"""

from core.schedule import schedule

__all__ = ["schedule"]
