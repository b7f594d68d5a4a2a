"""Schedules: jobs enqueued on cron expressions and at fixed intervals.

Declare them in `app/schedule.py` (the module the `SCHEDULE_MODULE` setting names), which the
scheduler imports once when it starts, as the worker imports `app/hooks.py`:

    from core.schedule import schedule

    schedule.cron("0 3 * * *", NightlyReport(), name="nightly-report", timezone="Europe/Berlin")
    schedule.every("30s", PollGateways(), missed="skip")

`python main.py schedule:run` runs the scheduler alone; `queue:work --with-scheduler` runs it
inside a worker. Any number of schedulers may run: every process computes the same tick times
(cron ticks in the schedule's timezone, interval ticks counted from `start`), and each tick is
pushed with a once key (`schedule:<name>:<tick in epoch ms>`), which the backend takes in the same
atomic step as it stores the job, so a tick is enqueued exactly once. A tick already taken is
another scheduler's work: nothing to do.

The last tick enqueued is kept in a marker (`schedule:<name>:last`, 400 days); a scheduler that
starts after a pause applies the schedule's `missed` policy to the ticks since: "skip" (none),
"once" (one job, for the latest missed tick) or "all" (every missed tick, at most 1000, oldest
first). A schedule never enqueued before starts from now.

Cron expressions are parsed by `cronsim` (5 fields, or 6 with seconds first; `L`, `#`, names of
months and weekdays). Daylight saving time: a fixed local time that does not exist on the day the
clocks go forward (02:30 in Europe/Berlin on the last Sunday of March) is skipped that day, and a
fixed time the clocks pass twice when they go back runs once, at its first occurrence. An
expression with `*` in its minute or hour field follows real time: `*/15 * * * *` runs every
15 minutes through both changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from core.delays import Duration, parse_duration
from core.errors import (
    ConfigurationError,
    ConnectionLostError,
    DuplicateJobError,
    SerializationError,
)
from core.job import Job

if TYPE_CHECKING:
    from core.queue.queue_manager import QueueManager

__all__ = [
    "CLOCK_SLACK_MS",
    "MARKER_TTL",
    "MAX_CATCH_UP",
    "MAX_INTERVAL",
    "MissedPolicy",
    "Schedule",
    "ScheduleError",
    "Scheduler",
    "Schedules",
    "schedule",
    "tick_time",
]

logger = logging.getLogger("topiq.schedule")

#: What a scheduler does with ticks that passed while no scheduler ran.
MissedPolicy = Literal["skip", "once", "all"]
_MISSED = get_args(MissedPolicy)
#: The most missed ticks the "all" policy enqueues (the latest ones).
MAX_CATCH_UP = 1000
#: How long a schedule's last enqueued tick is remembered (seconds).
MARKER_TTL = 400 * 86400.0
#: A tick's once key lives a day, or two periods of its schedule when that is longer.
_DAY_MS = 86_400_000
#: The longest a scheduler sleeps before it reads the clock again (a wall clock that jumps is
#: noticed within this many seconds).
MAX_SLEEP = 60.0
#: A last tick (the marker, or a running scheduler's cursor) more than this many milliseconds
#: later than now means the wall clock went back (it had been stepped forward, then corrected):
#: the schedule restarts from now rather than stay silent until the clock catches up.
CLOCK_SLACK_MS = 5000
#: The longest interval (a schedule's marker must outlive the gap between two ticks).
MAX_INTERVAL = MARKER_TTL
#: The latest `start` an interval schedule may have (its ticks must stay datetimes).
_LATEST_START = datetime(9000, 1, 1, tzinfo=UTC)
#: Errors a scheduler pass does not swallow: the backend cannot be reached now (the pass is
#: retried), or a setting no retry mends.
_PASS_ON: tuple[type[Exception], ...] = (ConnectionLostError, OSError, ConfigurationError)
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,150}\Z")


class ScheduleError(ConfigurationError, ValueError):
    """A schedule cannot be declared as written (its expression, timezone, interval, name...)."""


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Schedule:
    """One declared schedule. Tick times are whole epoch milliseconds."""

    name: str
    job: Job
    kind: Literal["cron", "every"]
    #: The cron expression, or the interval as declared ("30s").
    expression: str
    timezone: str = "UTC"
    missed: MissedPolicy = "once"
    queue: str | None = None
    connection: str | None = None
    interval_ms: int = 0  # every: the period
    start_ms: int = 0  # every: ticks are start + k * period
    _zone: tzinfo = field(default=UTC, repr=False, compare=False)
    _once_for_ms: int = field(default=0, repr=False, compare=False)

    # -- ticks -------------------------------------------------------------------------

    @property
    def period_ms(self) -> int:
        """The interval, or for a cron schedule the shortest gap between its next few ticks
        (what the once key's lifetime is measured against)."""
        if self.kind == "every":
            return self.interval_ms
        ticks = list(self._cron_after(_ms(time.time()), 4))
        return min((b - a for a, b in itertools.pairwise(ticks)), default=_DAY_MS)

    def next_after(self, after_ms: int) -> int | None:
        """The first tick strictly after `after_ms`, or `None` if there is none (a cron
        expression that never matches again)."""
        if self.kind == "every":
            if after_ms < self.start_ms:
                return self.start_ms
            return self.start_ms + ((after_ms - self.start_ms) // self.interval_ms + 1) * (
                self.interval_ms
            )
        return next(self._cron_after(after_ms, 1), None)

    def latest_until(self, until_ms: int) -> int | None:
        """The last tick at or before `until_ms`, or `None` if there is none."""
        if self.kind == "every":
            if until_ms < self.start_ms:
                return None
            return self.start_ms + (until_ms - self.start_ms) // self.interval_ms * (
                self.interval_ms
            )
        return next((tick for tick in self._cron_before(until_ms) if tick <= until_ms), None)

    def ticks_between(self, after_ms: int, until_ms: int, limit: int) -> tuple[list[int], bool]:
        """The ticks in (`after_ms`, `until_ms`], oldest first: the latest `limit` of them, and
        whether there were more."""
        if until_ms <= after_ms or limit <= 0:
            return [], False
        if self.kind == "every":
            first = self.next_after(after_ms)
            assert first is not None
            if first > until_ms:
                return [], False
            count = (until_ms - first) // self.interval_ms + 1
            skip = max(0, count - limit)
            first += skip * self.interval_ms
            return list(range(first, until_ms + 1, self.interval_ms)), skip > 0
        # Cron: walk back from `until` to find where the latest `limit` ticks begin (cheap
        # when the gap is long), then forward from there, which is the authority.
        start = after_ms
        more = False
        back = self._cron_before(until_ms)
        for seen, tick in enumerate(back, 1):
            if tick <= after_ms:
                break
            if seen > limit:
                start, more = tick, True
                break
        ticks: list[int] = []
        for tick in self._cron_after(start, None):
            if tick > until_ms:
                break
            ticks.append(tick)
        return ticks[-limit:], more or len(ticks) > limit

    def once_key(self, tick_ms: int) -> str:
        """The key that makes a tick enqueue once."""
        return f"schedule:{self.name}:{tick_ms}"

    @property
    def marker(self) -> str:
        """The marker keeping the last tick enqueued."""
        return f"schedule:{self.name}:last"

    def once_for(self) -> float:
        """Seconds a tick's once key lives: a day, or two periods when that is longer."""
        if self._once_for_ms == 0:
            object.__setattr__(self, "_once_for_ms", max(_DAY_MS, 2 * self.period_ms))
        return self._once_for_ms / 1000

    def describe(self) -> str:
        """`cron 0 3 * * *` or `every 30s`."""
        return f"{self.kind} {self.expression}"

    # -- cron --------------------------------------------------------------------------

    def _cron_after(self, after_ms: int, count: int | None) -> Iterator[int]:
        moment = datetime.fromtimestamp(after_ms / 1000, UTC).astimezone(self._zone)
        sim = CronSim(self.expression, moment)
        produced = 0
        with contextlib.suppress(StopIteration):
            while count is None or produced < count:
                found = next(sim)
                if not self._exists(sim, found):
                    continue
                produced += 1
                yield _ms(found.timestamp())

    def _cron_before(self, until_ms: int) -> Iterator[int]:
        """Ticks at or before `until_ms`, latest first (used to find where to start)."""
        moment = datetime.fromtimestamp(until_ms // 1000 + 1, UTC).astimezone(self._zone)
        sim = CronSim(self.expression, moment, reverse=True)
        with contextlib.suppress(StopIteration):
            while True:
                found = next(sim)
                if self._exists(sim, found):
                    yield _ms(found.timestamp())

    def _exists(self, sim: CronSim, found: datetime) -> bool:
        """False for a tick cronsim moved out of a local time that does not exist (it runs
        such a fixed-time job when the clocks have gone forward, as Debian's cron does; we
        skip it)."""
        return found.hour in sim.hours and found.minute in sim.minutes


class Schedules:
    """The declared schedules, by name, in declaration order."""

    def __init__(self) -> None:
        self._items: dict[str, Schedule] = {}
        self._loaded: set[str] = set()

    def __iter__(self) -> Iterator[Schedule]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> Schedule | None:
        return self._items.get(name)

    def clear(self) -> None:
        """Forget every schedule (for tests)."""
        self._items.clear()
        self._loaded.clear()

    def load(self, module: str = "app.schedule") -> None:
        """Import the module that declares the schedules, once; a missing `app.schedule` is
        no schedule, a missing module named otherwise is an error."""
        if module in self._loaded:
            return
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if module != "app.schedule" or exc.name not in (module, "app"):
                raise ConfigurationError(
                    f"SCHEDULE_MODULE: cannot import {module!r}: {exc}"
                ) from None
        except SyntaxError as exc:
            where = f"{exc.filename}, line {exc.lineno}" if exc.filename else "unknown place"
            raise ConfigurationError(
                f"SCHEDULE_MODULE: {module!r} has a syntax error: {exc.msg} ({where})"
            ) from None
        self._loaded.add(module)

    def cron(
        self,
        expression: str,
        job: Job,
        *,
        name: str | None = None,
        timezone: str = "UTC",
        missed: MissedPolicy = "once",
        queue: str | None = None,
        connection: str | None = None,
    ) -> Schedule:
        """Enqueue a copy of `job` at every tick of a cron expression, in `timezone` (an IANA
        name such as "Europe/Berlin")."""
        if not isinstance(expression, str) or not expression.strip():
            raise ScheduleError(f"schedule.cron: expected a cron expression, got {expression!r}")
        expression = " ".join(expression.split())
        where = f"schedule {name!r}" if name else f"schedule.cron({expression!r})"
        _check_job(job, where)
        try:
            zone = ZoneInfo(timezone) if timezone != "UTC" else UTC
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ScheduleError(
                f"{where}: unknown timezone {timezone!r} (use an IANA name such as "
                "'Europe/Berlin' or 'UTC')"
            ) from None
        try:
            CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise ScheduleError(f"{where}: invalid cron expression {expression!r}: {exc}") from None
        item = Schedule(
            name=self._name(name, job, expression),
            job=job,
            kind="cron",
            expression=expression,
            timezone=timezone,
            missed=_check_missed(missed, where),
            queue=_check_queue(queue, where),
            connection=connection,
            _zone=zone,
        )
        if item.next_after(_ms(time.time())) is None:
            raise ScheduleError(f"{where}: cron expression {expression!r} never matches")
        _check_dispatchable(item)
        return self._add(item)

    def every(
        self,
        interval: Duration,
        job: Job,
        *,
        name: str | None = None,
        missed: MissedPolicy = "once",
        start: datetime | float | None = None,
        queue: str | None = None,
        connection: str | None = None,
    ) -> Schedule:
        """Enqueue a copy of `job` every `interval` ("30s", "5 minutes", seconds or a
        timedelta), at `start` + k * `interval` (`start`: a datetime, epoch seconds, or the
        Unix epoch by default), so every scheduler process ticks at the same instants."""
        where = f"schedule {name!r}" if name else f"schedule.every({interval!r})"
        _check_job(job, where)
        try:
            seconds = parse_duration(interval, "interval")
        except ValueError as exc:
            raise ScheduleError(f"{where}: {exc}") from None
        period = round(seconds * 1000)
        if period < 1000:
            raise ScheduleError(f"{where}: interval must be at least 1 second, got {interval!r}")
        if seconds > MAX_INTERVAL:
            raise ScheduleError(
                f"{where}: interval must be at most {MAX_INTERVAL / 86400:g} days (how long a "
                f"schedule's last tick is remembered), got {interval!r}"
            )
        if start is None:
            start_ms = 0
        elif isinstance(start, datetime):
            if start.tzinfo is None:
                raise ScheduleError(f"{where}: start must be timezone-aware, got {start!r}")
            start_ms = _ms(start.timestamp())
        elif (
            isinstance(start, int | float) and not isinstance(start, bool) and math.isfinite(start)
        ):
            start_ms = _ms(start)
        else:
            raise ScheduleError(
                f"{where}: start must be a datetime or epoch seconds, got {start!r}"
            )
        if not _MS_MIN < start_ms < _ms(_LATEST_START.timestamp()):
            raise ScheduleError(
                f"{where}: start must be between year 1 and {_LATEST_START:%Y-%m-%d}, got {start!r}"
            )
        shown = interval if isinstance(interval, str) else _duration_text(seconds)
        item = Schedule(
            name=self._name(name, job, f"every {shown}"),
            job=job,
            kind="every",
            expression=shown,
            missed=_check_missed(missed, where),
            queue=_check_queue(queue, where),
            connection=connection,
            interval_ms=period,
            start_ms=start_ms,
        )
        _check_dispatchable(item)
        return self._add(item)

    def _name(self, name: str | None, job: Job, expression: str) -> str:
        from core.queue.payload import class_path

        if name is None:
            name = f"{class_path(type(job))}[{expression}]"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ScheduleError(
                f"schedule name must be 1 to 150 characters without control characters, "
                f"got {name!r}"
            )
        return name

    def _add(self, item: Schedule) -> Schedule:
        if item.name in self._items:
            raise ScheduleError(
                f"two schedules are named {item.name!r}: give one of them another name= "
                "(a name keys its ticks and its last-run marker)"
            )
        self._items[item.name] = item
        return item


def _check_job(job: object, where: str) -> None:
    if isinstance(job, Job):
        return
    from core.functions import JobFunction

    if isinstance(job, JobFunction):
        name = job.function.__qualname__
        raise ScheduleError(f"{where}: pass a call of the @job function: {name}.make(...)")
    raise ScheduleError(f"{where}: the job must be a Job instance, got {type(job).__name__}")


def _check_dispatchable(item: Schedule) -> None:
    """Run the checks a dispatch runs on the job (its settings, limit key, data, queue and
    connection), without I/O: a job the scheduler could never push is refused here."""
    from core.queue.payload import encode, job_settings, limit_of, validate_queue
    from core.settings import QueueConnection

    where = f"schedule {item.name!r}"
    job = item.job
    connection = item.connection or job.connection
    if connection is not None:
        try:
            QueueConnection(connection)
        except ValueError:
            known = ", ".join(c.value for c in QueueConnection)
            raise ScheduleError(
                f"{where}: unknown queue connection {connection!r}: must be one of {known}"
            ) from None
        if connection == QueueConnection.SYNC:
            raise ScheduleError(
                f"{where}: the sync connection runs jobs inside dispatch and keeps no once "
                "keys; a scheduler needs redis, database or memory"
            )
    try:
        if item.queue is None and job.queue != Job.queue:
            validate_queue(job.queue)
        settings = job_settings(job)
        limit_of(job, settings)
        encode(job, job_id="schedule-check", queue="default", max_bytes=2**62, settings=settings)
    except (SerializationError, ValueError, TypeError) as exc:
        raise ScheduleError(f"{where}: its job cannot be dispatched: {exc}") from None


def _check_missed(missed: object, where: str) -> MissedPolicy:
    if missed not in _MISSED:
        raise ScheduleError(f"{where}: missed must be 'skip', 'once' or 'all', got {missed!r}")
    return missed  # type: ignore[return-value]


def _check_queue(queue: str | None, where: str) -> str | None:
    if queue is None:
        return None
    from core.queue.payload import validate_queue

    try:
        return validate_queue(queue)
    except ValueError as exc:
        raise ScheduleError(f"{where}: {exc}") from None


#: The earliest start (epoch ms): year 1, plus a day so that every zone can show it.
_MS_MIN = _ms(datetime(1, 1, 2, tzinfo=UTC).timestamp())


def _duration_text(seconds: float) -> str:
    return f"{seconds:g}s"


#: The process's schedules (`app/schedule.py` declares them).
schedule = Schedules()


# -- the scheduler ------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    cursor: int | None = None  # ticks up to here (epoch ms) are dealt with; None: not started
    last: int | None = None  # the last tick this process knows was enqueued


@dataclass(frozen=True, slots=True)
class Enqueued:
    """One tick a scheduler pass pushed (or found pushed by another scheduler)."""

    schedule: str
    tick_ms: int
    job_id: str
    created: bool  # False: another scheduler had enqueued this tick


class Scheduler:
    """Enqueues the ticks of `schedules` as they come, until `stop()`.

    `await scheduler.run()` loops: it sleeps until the next tick of any schedule (at most
    `MAX_SLEEP`), reads the clock, and enqueues what is due (`run_due`). A push that fails
    (backend down) leaves the tick due: it is tried again, and the schedule's `missed` policy
    decides what is enqueued once it goes through.
    """

    def __init__(
        self,
        manager: QueueManager,
        schedules: Sequence[Schedule] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.manager = manager
        self.schedules = list(schedule if schedules is None else schedules)
        self._clock = clock or time.time
        self._state = {item.name: _State() for item in self.schedules}
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """End `run` (a push under way completes first)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def next_tick(self) -> int | None:
        """The earliest upcoming tick (epoch ms) of any schedule."""
        now = _ms(self._clock())
        upcoming = [
            tick
            for item in self.schedules
            if (tick := item.next_after(max(now, self._state[item.name].cursor or now))) is not None
        ]
        return min(upcoming, default=None)

    async def run(self) -> None:
        """Enqueue ticks until `stop()`."""
        names = ", ".join(item.name for item in self.schedules) or "none"
        logger.info("scheduler starting: %d schedule(s): %s", len(self.schedules), names)
        failures = 0
        ready = False
        while not self._stopping.is_set():
            try:
                await self.run_due()
                failures = 0
            except ConfigurationError as exc:
                logger.error("scheduler stopped: %s", exc)
                raise  # no retry mends a setting
            except Exception as exc:
                failures += 1
                pause = min(30.0, 0.5 * 2 ** min(failures, 6))
                logger.warning("scheduler: could not enqueue (%s); again in %gs", exc, pause)
                await self._sleep(pause)
                continue
            upcoming = self.next_tick()
            if not ready:
                ready = True  # connected, markers read, missed ticks dealt with
                logger.info(
                    "scheduler running; next tick at %s",
                    "never" if upcoming is None else _at(upcoming),
                )
            pause = MAX_SLEEP
            if upcoming is not None:
                pause = min(MAX_SLEEP, max(0.0, upcoming / 1000 - self._clock()))
            await self._sleep(pause)
        logger.info("scheduler stopped")

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def run_due(self) -> list[Enqueued]:
        """Enqueue every schedule's due ticks as of now; what was pushed, in order."""
        done: list[Enqueued] = []
        for item in self.schedules:
            if self._stopping.is_set():
                break
            now = _ms(self._clock())
            try:
                done += await self._run_one(item, now)
            except _PASS_ON:
                raise  # the backend is down (retried), or a setting no retry mends
            except Exception as exc:
                # One schedule's failure is its own: the others still run.
                logger.error("schedule %s: skipped at %s: %s", item.name, _at(now), exc)
                state = self._state[item.name]
                if state.cursor is not None:
                    state.cursor = max(state.cursor, now)
        return done

    async def _run_one(self, item: Schedule, now: int) -> list[Enqueued]:
        state = self._state[item.name]
        driver = await self.manager.connection(item.connection or item.job.connection)
        if driver.kind == "sync":
            raise ConfigurationError(
                f"schedule {item.name}: the sync connection runs jobs inside dispatch and keeps "
                "no once keys; a scheduler needs redis, database or memory (QUEUE_CONNECTION, "
                "or the schedule's connection=)"
            )
        if state.cursor is None:  # first pass: since the last tick any scheduler enqueued
            raw = await driver.get_marker(item.marker)
            last = _marker_value(raw)
            if last is None:
                state.cursor = now  # never ran: nothing was missed
                return []
            if last > now + CLOCK_SLACK_MS:
                _clock_went_back(item, "its last tick enqueued", last, now)
                state.cursor = now
                return []
            state.cursor = state.last = last
            ticks, more = item.ticks_between(last, now, MAX_CATCH_UP)
            ticks = _apply_missed(item, ticks, catching_up=True)
        else:
            if state.cursor > now + CLOCK_SLACK_MS:
                # The latest tick due now is the one this pass woke for: deal with it as a
                # scheduler running along does (its once key makes it a no-op if it was
                # enqueued before the clock stepped).
                _clock_went_back(item, "the last tick dealt with", state.cursor, now)
                latest = item.latest_until(now)
                state.cursor = now if latest is None else latest - 1
                state.last = None  # the next tick enqueued replaces the marker from the future
            ticks, more = item.ticks_between(state.cursor, now, MAX_CATCH_UP)
            ticks = _apply_missed(item, ticks, catching_up=False)
        if more and item.missed == "all":
            logger.warning(
                "schedule %s: more than %d ticks were missed; enqueueing the latest %d",
                item.name,
                MAX_CATCH_UP,
                MAX_CATCH_UP,
            )
        done = []
        for tick in ticks:
            try:
                done.append(await self._enqueue(item, tick))
            except _PASS_ON:
                raise
            except Exception as exc:
                # A push this job can never make (its data, a setting): skip the tick, and
                # neither retry it nor hold back the schedule's later ticks.
                logger.error("schedule %s: tick %s not enqueued: %s", item.name, _at(tick), exc)
        state.cursor = max(state.cursor, now)
        return done

    async def _enqueue(self, item: Schedule, tick: int) -> Enqueued:
        job = copy.deepcopy(item.job)
        state = self._state[item.name]
        try:
            handle = await self.manager.push(
                job,
                item.queue,
                item.connection,
                once_key=item.once_key(tick),
                once_for=item.once_for(),
            )
        except DuplicateJobError as exc:
            if job.unique_key or job.job_id:
                # The job's own id or unique key may be what refused it (its previous run
                # still waits): say so where an operator looks.
                logger.info("schedule %s: tick %s not enqueued: %s", item.name, _at(tick), exc)
            else:
                logger.debug(
                    "schedule %s: tick %s already enqueued by another scheduler (job %s)",
                    item.name,
                    _at(tick),
                    exc.existing,
                )
            return Enqueued(item.name, tick, exc.existing, False)
        logger.info("schedule %s: enqueued tick %s as job %s", item.name, _at(tick), handle.id)
        if state.last is None or tick > state.last:
            state.last = tick
            driver = await self.manager.connection(item.connection or item.job.connection)
            await driver.set_marker(item.marker, str(tick), MARKER_TTL)
        return Enqueued(item.name, tick, handle.id, True)


def _apply_missed(item: Schedule, ticks: list[int], *, catching_up: bool) -> list[int]:
    """Which of the due `ticks` to enqueue. Running along, the latest due tick is the one
    the scheduler woke for and the earlier ones were missed (it fell behind); starting up,
    all of them were missed."""
    if not ticks:
        return ticks
    if item.missed == "all":
        return ticks
    if item.missed == "once" or not catching_up:
        return ticks[-1:]
    return []  # skip, starting up


def _clock_went_back(item: Schedule, what: str, tick: int, now: int) -> None:
    logger.warning(
        "schedule %s: %s (%s) is later than now (%s): the clock went back; starting again from now",
        item.name,
        what,
        _at(tick),
        _at(now),
    )


def _marker_value(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        logger.warning("ignoring an unreadable schedule marker %r", raw)
        return None


def _at(tick_ms: int) -> str:
    return datetime.fromtimestamp(tick_ms / 1000, UTC).isoformat(timespec="milliseconds")


def tick_time(tick_ms: int, zone: str = "UTC") -> datetime:
    """A tick as an aware datetime in `zone`."""
    moment = datetime.fromtimestamp(tick_ms / 1000, UTC)
    return moment if zone == "UTC" else moment.astimezone(ZoneInfo(zone))
