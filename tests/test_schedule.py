"""Schedules: declaring them, their tick times (cron in a timezone, DST, interval alignment),
and the scheduler's per-tick once keys and missed-tick policy on every backend."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from core.functions import job
from core.queue.queue_manager import QueueManager
from core.schedule import (
    MARKER_TTL,
    MAX_CATCH_UP,
    Schedule,
    ScheduleError,
    Scheduler,
    Schedules,
    tick_time,
)
from tests.conftest import Backend
from tests.jobs import RecordJob

BERLIN = ZoneInfo("Europe/Berlin")


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def local(tick: int) -> str:
    return tick_time(tick, "Europe/Berlin").isoformat()


def ticks(item: Schedule, after: datetime, count: int) -> list[int]:
    out: list[int] = []
    cursor = ms(after)
    for _ in range(count):
        found = item.next_after(cursor)
        assert found is not None
        out.append(found)
        cursor = found
    return out


@pytest.fixture
def schedules() -> Schedules:
    return Schedules()


def record_job() -> RecordJob:
    return RecordJob("/dev/null")


def bad_job(**settings: object) -> RecordJob:
    """A job with instance settings (which may be ones no dispatch accepts)."""
    made = record_job()
    for key, value in settings.items():
        setattr(made, key, value)
    return made


# -- cron ticks ----------------------------------------------------------------------------


def test_cron_ticks_are_computed_in_the_schedule_timezone(schedules: Schedules) -> None:
    item = schedules.cron("0 3 * * *", record_job(), timezone="Europe/Berlin")
    winter, summer = (
        ticks(item, datetime(2026, 1, 10, 12, tzinfo=UTC), 1)[0],
        ticks(item, datetime(2026, 7, 10, 12, tzinfo=UTC), 1)[0],
    )
    assert local(winter) == "2026-01-11T03:00:00+01:00"
    assert tick_time(winter) == datetime(2026, 1, 11, 2, tzinfo=UTC)
    assert local(summer) == "2026-07-11T03:00:00+02:00"
    assert tick_time(summer) == datetime(2026, 7, 11, 1, tzinfo=UTC)
    utc = schedules.cron("0 3 * * *", record_job(), name="utc")
    assert tick_time(ticks(utc, datetime(2026, 1, 10, 12, tzinfo=UTC), 1)[0]) == datetime(
        2026, 1, 11, 3, tzinfo=UTC
    )


def test_a_fixed_time_that_does_not_exist_is_skipped_when_clocks_go_forward(
    schedules: Schedules,
) -> None:
    # Europe/Berlin goes from 02:00 to 03:00 on 2026-03-29: there is no 02:30 that day.
    item = schedules.cron("30 2 * * *", record_job(), timezone="Europe/Berlin")
    got = [local(t) for t in ticks(item, datetime(2026, 3, 27, 12, tzinfo=BERLIN), 3)]
    assert got == [
        "2026-03-28T02:30:00+01:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_a_fixed_time_passed_twice_when_clocks_go_back_runs_once(schedules: Schedules) -> None:
    # On 2026-10-25 Berlin passes 02:30 twice (+02:00, then +01:00): one tick, the first.
    item = schedules.cron("30 2 * * *", record_job(), timezone="Europe/Berlin")
    got = [local(t) for t in ticks(item, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 3)]
    assert got == [
        "2026-10-25T02:30:00+02:00",
        "2026-10-26T02:30:00+01:00",
        "2026-10-27T02:30:00+01:00",
    ]


def test_a_wildcard_expression_follows_real_time_through_the_change(
    schedules: Schedules,
) -> None:
    item = schedules.cron("*/30 * * * *", record_job(), timezone="Europe/Berlin")
    got = [local(t) for t in ticks(item, datetime(2026, 10, 25, 1, 50, tzinfo=BERLIN), 5)]
    assert got == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    day = ticks(item, datetime(2026, 10, 25, tzinfo=BERLIN), 12)
    assert {b - a for a, b in itertools.pairwise(day)} == {30 * 60 * 1000}


def test_cron_ticks_between_returns_the_latest_ones_oldest_first(schedules: Schedules) -> None:
    item = schedules.cron("*/10 * * * *", record_job())
    start = ms(datetime(2026, 5, 1, 0, 0, tzinfo=UTC))
    every = 600_000
    assert item.ticks_between(start, start + 6 * every, 100) == (
        [start + k * every for k in range(1, 7)],
        False,
    )
    assert item.ticks_between(start, start + 6 * every, 2) == (
        [start + 5 * every, start + 6 * every],
        True,
    )
    assert item.ticks_between(start, start + every - 1, 10) == ([], False)


# -- interval ticks ------------------------------------------------------------------------


def test_interval_ticks_are_aligned_to_the_epoch_so_every_process_agrees() -> None:
    one, two = Schedules(), Schedules()
    first = one.every("1 minute", record_job())
    second = two.every(60, record_job())
    moment = ms(datetime(2026, 5, 1, 10, 17, 42, 123000, tzinfo=UTC))
    assert first.next_after(moment) == second.next_after(moment)
    assert first.next_after(moment) == ms(datetime(2026, 5, 1, 10, 18, tzinfo=UTC))
    # A tick exactly now is not "after" now.
    assert first.next_after(ms(datetime(2026, 5, 1, 10, 18, tzinfo=UTC))) == ms(
        datetime(2026, 5, 1, 10, 19, tzinfo=UTC)
    )


def test_interval_ticks_are_aligned_to_start(schedules: Schedules) -> None:
    start = datetime(2026, 5, 1, 10, 0, 7, tzinfo=UTC)
    item = schedules.every("30s", record_job(), start=start)
    assert item.next_after(ms(start) - 10_000_000) == ms(start)  # not before its start
    assert item.next_after(ms(start) + 1) == ms(start) + 30_000
    assert item.next_after(ms(start) + 45_000) == ms(start) + 60_000
    assert item.ticks_between(ms(start), ms(start) + 95_000, 10) == (
        [ms(start) + 30_000, ms(start) + 60_000, ms(start) + 90_000],
        False,
    )
    assert item.ticks_between(ms(start), ms(start) + 95_000, 1) == ([ms(start) + 90_000], True)


def test_once_keys_and_markers_are_named_after_the_schedule_and_the_tick(
    schedules: Schedules,
) -> None:
    item = schedules.every("2 hours", record_job(), name="poll")
    assert item.once_key(1_700_000_000_000) == "schedule:poll:1700000000000"
    assert item.marker == "schedule:poll:last"
    assert item.once_for() == 86400.0  # a day: longer than two periods
    weekly = schedules.every("7 days", record_job(), name="weekly")
    assert weekly.once_for() == 14 * 86400.0  # two periods
    nightly = schedules.cron("0 3 * * *", record_job(), name="nightly")
    assert nightly.once_for() == 2 * 86400.0


# -- declaring -----------------------------------------------------------------------------


def test_default_names_are_the_job_class_and_the_expression(schedules: Schedules) -> None:
    assert schedules.cron("0 3 * * *", record_job()).name == "tests.jobs:RecordJob[0 3 * * *]"
    assert schedules.every("30s", record_job()).name == "tests.jobs:RecordJob[every 30s]"
    assert [item.name for item in schedules] == [
        "tests.jobs:RecordJob[0 3 * * *]",
        "tests.jobs:RecordJob[every 30s]",
    ]


def test_two_schedules_with_one_name_are_refused_at_declaration(schedules: Schedules) -> None:
    schedules.every("30s", record_job(), name="poll")
    with pytest.raises(ScheduleError, match="two schedules are named 'poll'"):
        schedules.cron("0 3 * * *", record_job(), name="poll")
    schedules.every("30s", record_job())
    with pytest.raises(ScheduleError, match=r"RecordJob\[every 30s\]"):
        schedules.every("30s", record_job())  # the same default name
    assert len(schedules) == 2


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (
            lambda s: s.cron("61 * * * *", record_job()),
            "invalid cron expression '61 \\* \\* \\* \\*'",
        ),
        (lambda s: s.cron("* * * *", record_job()), "invalid cron expression '\\* \\* \\* \\*'"),
        (lambda s: s.cron("0 0 30 2 *", record_job()), "invalid cron expression '0 0 30 2 \\*'"),
        (lambda s: s.cron("", record_job()), "expected a cron expression"),
        (
            lambda s: s.cron("0 3 * * *", record_job(), timezone="Europe/Nowhere"),
            "unknown timezone 'Europe/Nowhere'",
        ),
        (lambda s: s.every("soon", record_job()), "interval.*'soon'"),
        (lambda s: s.every("0.5s", record_job()), "at least 1 second, got '0.5s'"),
        (lambda s: s.every(-5, record_job()), "interval.*-5"),
        (
            lambda s: s.every("30s", record_job(), start=datetime(2026, 1, 1)),
            "start must be timezone-aware",
        ),
        (lambda s: s.every("30s", record_job(), missed="never"), "missed must be .*'never'"),
        (lambda s: s.every("30s", record_job(), queue="bad queue"), "invalid queue name"),
        (lambda s: s.every("30s", object()), "must be a Job instance, got object"),
        (lambda s: s.every("30s", record_job(), name=""), "schedule name"),
        # F3: ticks that cannot be datetimes (or outlive the marker) are refused here, not
        # met as a traceback in schedule:list / schedule:run.
        (lambda s: s.every(1e12, record_job()), "interval must be at most 400 days"),
        (lambda s: s.every("401 days", record_job()), "interval must be at most 400 days"),
        (lambda s: s.every(10, record_job(), start=1e15), "start must be between year 1"),
        (
            lambda s: s.every(10, record_job(), start=datetime(9999, 1, 1, tzinfo=UTC)),
            "start must be between year 1",
        ),
        # F2: a job the scheduler could never push is refused when the module loads.
        (
            lambda s: s.every("1s", bad_job(rate_limit="0/second"), name="bad"),
            "schedule 'bad': its job cannot be dispatched: .*rate_limit",
        ),
        (
            lambda s: s.cron("* * * * *", bad_job(limit_key="{device}", concurrency_limit=1)),
            "its job cannot be dispatched: .*limit_key '{device}' names 'device'",
        ),
        (
            lambda s: s.every("1s", bad_job(priority=True), name="prio"),
            "schedule 'prio': its job cannot be dispatched: .*priority",
        ),
        (
            lambda s: s.every("1s", record_job(), name="typo", connection="nope"),
            "schedule 'typo': unknown queue connection 'nope'",
        ),
        (
            lambda s: s.every("1s", bad_job(connection="nope"), name="typo"),
            "schedule 'typo': unknown queue connection 'nope'",
        ),
        (
            lambda s: s.every("1s", record_job(), name="inline", connection="sync"),
            "schedule 'inline': the sync connection",
        ),
    ],
)
def test_bad_declarations_are_refused_with_an_error_naming_the_problem(
    schedules: Schedules, declare: object, message: str
) -> None:
    with pytest.raises(ScheduleError, match=message):
        declare(schedules)  # type: ignore[operator]
    assert len(schedules) == 0


@job
def ping(device: str) -> str:
    return device


def test_a_job_function_is_scheduled_through_a_call_of_it(schedules: Schedules) -> None:
    with pytest.raises(ScheduleError, match=r"ping.make\(\.\.\.\)"):
        schedules.every("30s", ping)  # type: ignore[arg-type]
    item = schedules.every("30s", ping.make("gw-1"), name="ping")
    assert item.job is not None


# -- the scheduler on every backend --------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def name() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start() -> float:
    # A whole second, half a second past a tick of every interval used here.
    return float(int(datetime.now(UTC).timestamp())) + 0.5


async def pending(manager: QueueManager, backend: Backend) -> int:
    driver = await manager.connection()
    stats = await driver.stats(backend.settings().queue_default)
    return stats.pending + stats.delayed


async def test_a_schedule_never_run_before_starts_from_now_then_enqueues_each_tick(
    manager: QueueManager, backend: Backend, name: str, start: float
) -> None:
    item = Schedules().every("10s", record_job(), name=name)
    clock = Clock(start)
    scheduler = Scheduler(manager, [item], clock=clock)
    assert await scheduler.run_due() == []  # nothing was missed before the first run
    clock.now += 10
    done = await scheduler.run_due()
    assert [(d.tick_ms, d.created) for d in done] == [(item.next_after(int(start * 1000)), True)]
    assert await scheduler.run_due() == []  # the same tick is not enqueued again
    assert await pending(manager, backend) == 1
    driver = await manager.connection()
    assert await driver.get_marker(item.marker) == str(done[0].tick_ms)


async def test_two_schedulers_enqueue_each_tick_once(
    manager: QueueManager, backend: Backend, name: str, start: float
) -> None:
    clock = Clock(start)
    item = Schedules().every("1s", record_job(), name=name)
    first = Scheduler(manager, [item], clock=clock)
    second = Scheduler(manager, [item], clock=clock)
    await first.run_due()
    await second.run_due()
    created = 0
    for _ in range(5):
        clock.now += 1
        one, two = await asyncio.gather(first.run_due(), second.run_due())
        assert len(one) == len(two) == 1 and one[0].tick_ms == two[0].tick_ms
        assert one[0].created != two[0].created  # exactly one of them stored the tick
        assert one[0].job_id == two[0].job_id  # the loser names the job that holds it
        created += one[0].created + two[0].created
    assert created == 5
    assert await pending(manager, backend) == 5


@pytest.mark.parametrize(("missed", "expected"), [("skip", 0), ("once", 1), ("all", 10)])
async def test_ticks_missed_while_no_scheduler_ran_follow_the_policy(
    manager: QueueManager,
    backend: Backend,
    name: str,
    start: float,
    missed: str,
    expected: int,
) -> None:
    item = Schedules().every("1 minute", record_job(), name=name, missed=missed)  # type: ignore[arg-type]
    now = int(start * 1000)
    last = item.next_after(now - 11 * 60_000)
    assert last is not None
    driver = await manager.connection()
    await driver.set_marker(item.marker, str(last), MARKER_TTL)
    done = await Scheduler(manager, [item], clock=Clock(start)).run_due()
    missed_ticks = [last + k * 60_000 for k in range(1, 11)]
    assert missed_ticks[-1] <= now < missed_ticks[-1] + 60_000
    assert [d.tick_ms for d in done] == missed_ticks[len(missed_ticks) - expected :]
    assert all(d.created for d in done)
    assert await pending(manager, backend) == expected
    marker = await driver.get_marker(item.marker)
    assert marker == str(missed_ticks[-1] if expected else last)


@pytest.mark.parametrize(("missed", "expected"), [("skip", 1), ("once", 1), ("all", 4)])
async def test_a_scheduler_that_fell_behind_follows_the_policy(
    manager: QueueManager, backend: Backend, name: str, start: float, missed: str, expected: int
) -> None:
    item = Schedules().every("1s", record_job(), name=name, missed=missed)  # type: ignore[arg-type]
    clock = Clock(start)
    scheduler = Scheduler(manager, [item], clock=clock)
    await scheduler.run_due()
    clock.now += 4  # the loop was held up for four ticks
    done = await scheduler.run_due()
    assert len(done) == expected
    assert done[-1].tick_ms == int(start * 1000) + 3500  # the latest due tick, always
    assert await pending(manager, backend) == expected


async def test_a_schedule_that_cannot_push_skips_its_tick_and_the_others_go_on(
    backend: Backend, name: str, start: float, caplog: pytest.LogCaptureFixture
) -> None:
    # The payload limit is a connection setting, so only the push can find the job too big.
    big = Schedules().every("1s", RecordJob("/dev/null", blob="x" * 4096), name=f"{name}-big")
    good = Schedules().every("1s", record_job(), name=f"{name}-good")
    clock = Clock(start)
    async with QueueManager(backend.settings(queue_max_payload_bytes=2048)) as manager:
        scheduler = Scheduler(manager, [big, good], clock=clock)
        await scheduler.run_due()
        with caplog.at_level(logging.ERROR, logger="topiq.schedule"):
            for _ in range(3):
                clock.now += 1
                done = await scheduler.run_due()
                assert [(d.schedule, d.created) for d in done] == [(good.name, True)]
        assert await pending(manager, backend) == 3  # the good schedule's three ticks
    skipped = [r.getMessage() for r in caplog.records if big.name in r.getMessage()]
    assert len(skipped) == 3  # one line per tick, naming the schedule, then on to the next
    assert all("not enqueued" in line and "2048" in line for line in skipped)


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
async def test_a_clock_stepped_forward_then_back_does_not_silence_a_schedule(
    manager: QueueManager,
    backend: Backend,
    name: str,
    start: float,
    restart: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    item = Schedules().every("10s", record_job(), name=name)
    clock = Clock(start)
    scheduler = Scheduler(manager, [item], clock=clock)
    await scheduler.run_due()
    clock.now = start + 30 * 86400  # an RTC a month ahead, until NTP syncs
    [ahead] = await scheduler.run_due()
    driver = await manager.connection()
    assert await driver.get_marker(item.marker) == str(ahead.tick_ms)
    clock.now = start + 10
    if restart:
        scheduler = Scheduler(manager, [item], clock=clock)
    with caplog.at_level(logging.WARNING, logger="topiq.schedule"):
        await scheduler.run_due()
    assert any("the clock went back" in r.getMessage() for r in caplog.records)
    enqueued = []
    for _ in range(3):
        clock.now += 10
        enqueued += [d.tick_ms for d in await scheduler.run_due() if d.created]
    assert len(enqueued) == 3
    # The marker from the future is replaced: the next scheduler to start trusts it again.
    assert await driver.get_marker(item.marker) == str(enqueued[-1])


async def test_a_marker_a_few_seconds_ahead_is_trusted(
    manager: QueueManager, name: str, start: float
) -> None:
    # Another scheduler whose clock runs slightly ahead wrote it: not a clock step.
    item = Schedules().every("10s", record_job(), name=name)
    tick = item.next_after(int(start * 1000))
    assert tick is not None
    driver = await manager.connection()
    await driver.set_marker(item.marker, str(tick), MARKER_TTL)
    clock = Clock(tick / 1000 - 2)
    scheduler = Scheduler(manager, [item], clock=clock)
    assert await scheduler.run_due() == []
    clock.now = tick / 1000 + 0.5
    assert await scheduler.run_due() == []  # that tick was enqueued by the scheduler ahead
    clock.now += 10
    assert [d.tick_ms for d in await scheduler.run_due()] == [tick + 10_000]


async def test_all_enqueues_at_most_the_latest_thousand_missed_ticks(
    name: str, start: float, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import make_settings

    settings = make_settings(queue_connection="memory", queue_default=name)
    async with QueueManager(settings) as manager:
        item = Schedules().every("1s", record_job(), name=name, missed="all")
        now = int(start * 1000)
        driver = await manager.connection()
        await driver.set_marker(item.marker, str(now - 1500 * 1000 - 500), MARKER_TTL)
        with caplog.at_level(logging.WARNING, "topiq.schedule"):
            done = await Scheduler(manager, [item], clock=Clock(start)).run_due()
        assert len(done) == MAX_CATCH_UP
        assert [d.tick_ms for d in done] == [now - 500 - k * 1000 for k in range(999, -1, -1)]
        assert "more than 1000 ticks were missed" in caplog.text
        assert (await driver.stats(name)).pending == MAX_CATCH_UP


async def test_stop_ends_run_at_once(manager: QueueManager, name: str) -> None:
    item = Schedules().every("1 hour", record_job(), name=name)
    scheduler = Scheduler(manager, [item])
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0)  # let it start and go to sleep until the next tick
    scheduler.stop()
    await asyncio.wait_for(task, 5)


@pytest.fixture
def clean_registry() -> Iterator[None]:
    from core.schedule import schedule

    schedule.clear()
    yield
    schedule.clear()


def test_the_example_app_schedule_declares_nothing(clean_registry: None) -> None:
    from core.schedule import schedule

    schedule.load("app.schedule")
    assert len(schedule) == 0


def test_a_schedule_module_with_a_syntax_error_is_a_one_line_configuration_error(
    clean_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.errors import ConfigurationError
    from core.schedule import schedule

    module = f"schedule_syntax_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text("from core.schedule import schedule\nx = (\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigurationError) as caught:
        schedule.load(module)
    message = str(caught.value)
    assert message.startswith(f"SCHEDULE_MODULE: {module!r} has a syntax error: ")
    assert f"{module}.py, line 2" in message and "\n" not in message


def test_a_schedule_module_that_is_not_there_is_a_configuration_error(
    clean_registry: None,
) -> None:
    from core.errors import ConfigurationError
    from core.schedule import schedule

    with pytest.raises(ConfigurationError, match=r"SCHEDULE_MODULE: cannot import 'app\.nowhere'"):
        schedule.load("app.nowhere")


# -- the guide's example -------------------------------------------------------------------


def test_the_guide_shows_the_example_as_it_is() -> None:
    from tests.conftest import ROOT

    guide = (ROOT / "docs" / "workflows.md").read_text()
    body = (ROOT / "docs" / "examples" / "schedule_app.py").read_text().split('"""', 2)[2]
    assert f"```python\n# docs/examples/schedule_app.py\n{body.strip()}\n```" in guide


async def test_the_guide_example_declares_and_enqueues(clean_registry: None, start: float) -> None:
    from core.schedule import schedule
    from tests.conftest import docs_example, make_settings

    docs_example("schedule_app")
    assert [item.name for item in schedule] == ["morning-greeting", "poll-gw-1"]
    morning = schedule.get("morning-greeting")
    assert morning is not None
    tick = morning.next_after(ms(datetime(2026, 7, 1, 12, tzinfo=UTC)))
    assert tick is not None and local(tick) == "2026-07-02T07:30:00+02:00"
    # The default allowed modules (app.): the example's jobs ship with the app.
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        clock = Clock(start)
        scheduler = Scheduler(manager, clock=clock)  # the declared schedules
        assert await scheduler.run_due() == []
        clock.now += 30
        done = await scheduler.run_due()
        assert [(d.schedule, d.created) for d in done] == [("poll-gw-1", True)]
        driver = await manager.connection()
        assert (await driver.stats("polling")).pending == 1


async def test_the_sync_connection_cannot_schedule(name: str) -> None:
    from core.errors import ConfigurationError
    from tests.conftest import make_settings

    item = Schedules().every("1s", record_job(), name=name)
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        with pytest.raises(ConfigurationError, match=f"schedule {name}: the sync connection"):
            await asyncio.wait_for(Scheduler(manager, [item]).run(), 10)
