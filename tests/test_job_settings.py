"""Every job setting is checked at dispatch, naming it; durations may be numbers or strings; the
payload carries numbers only, and the loader distrusts every field (SPEC12 "Payload").
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from core.errors import PayloadError, SerializationError
from core.job import Job
from core.queue.drivers.memory import MemoryDriver
from core.queue.payload import JobLoader, encode, job_settings
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.conftest import make_settings
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(30)

LOADER = JobLoader(["tests."])
PATH = "tests.test_job_settings"


class HourlyJob(Job):
    """Every duration setting as a string."""

    timeout = "1h"
    retry_after = ("30s", "2 minutes", 600)
    ttl = "90s"
    unique_for = "10 minutes"
    result_ttl = "1 day"
    failure_ttl = "2 days"

    def __init__(self, n: int = 0) -> None:
        self.n = n

    async def handle(self) -> int:
        return self.n


class BadClassJob(Job):
    """A class whose own setting is wrong: refused at every dispatch, and at load."""

    timeout = "an hour or so"

    async def handle(self) -> None:
        pass


def envelope_of(job: Job, **kwargs: Any) -> dict[str, Any]:
    raw = encode(job, job_id="a", queue="q", max_bytes=100_000, **kwargs)
    return dict(orjson.loads(raw))


def test_durations_as_strings_are_stored_as_seconds() -> None:
    envelope = envelope_of(HourlyJob(3))
    assert envelope["timeout"] == 3600
    assert envelope["retry_after"] == [30, 120, 600]
    assert envelope["ttl"] == 90
    assert envelope["result_ttl"] == 86400
    assert envelope["failure_ttl"] == 2 * 86400
    settings = job_settings(HourlyJob())
    assert settings.unique_for == 600


def test_plain_numbers_are_stored_as_they_are() -> None:
    envelope = envelope_of(RecordJob("log"))
    # A job with the defaults: the wave-1 fields unchanged (ints stay ints), no ttl field.
    assert (envelope["max_tries"], envelope["timeout"], envelope["retry_after"]) == (3, 60, 0)
    assert type(envelope["timeout"]) is int
    assert "ttl" not in envelope


def test_result_and_failure_ttl_come_from_the_settings_when_the_job_sets_none() -> None:
    envelope = envelope_of(RecordJob("log"), result_ttl=42.0, failure_ttl=7.0)
    assert (envelope["result_ttl"], envelope["failure_ttl"]) == (42.0, 7.0)
    job = RecordJob("log")
    job.result_ttl = 0
    assert envelope_of(job, result_ttl=42.0)["result_ttl"] == 0


async def test_the_manager_writes_its_settings_defaults_and_the_outgoing_fields() -> None:
    settings = make_settings(
        queue_connection="memory", queue_result_ttl="5 minutes", queue_failure_ttl=11
    )
    async with QueueManager(settings) as manager:
        driver = await manager.connection()
        assert isinstance(driver, MemoryDriver)
        pushed: list[Any] = []
        original = driver.push

        async def spy(jobs: Any) -> Any:
            pushed.extend(jobs)
            return await original(jobs)

        driver.push = spy  # type: ignore[method-assign]
        job = HourlyJob(1)
        job.unique_key = "k1"
        job.on_duplicate = "replace"
        await manager.push(job, at_front=True)
        await manager.push(RecordJob("log"))
    first, second = pushed
    assert orjson.loads(first.payload)["result_ttl"] == 86400
    assert (first.job, first.max_tries, first.at_front, first.check_id) == (
        f"{PATH}:HourlyJob",
        3,
        True,
        False,
    )
    assert (first.unique_key, first.unique_for, first.on_duplicate) == ("k1", 600, "replace")
    assert (first.ttl, first.failure_ttl) == (90, 2 * 86400)
    second_envelope = orjson.loads(second.payload)
    assert (second_envelope["result_ttl"], second_envelope["failure_ttl"]) == (300, 11)
    assert second.failure_ttl == 11


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ttl", "soon", "ttl: invalid delay 'soon'"),
        ("ttl", -1, "ttl must be a number of seconds from 0 to 2592000"),
        ("ttl", "31 days", "ttl must be a number of seconds from 0 to 2592000"),
        ("unique_for", [5], "unique_for must be a number of seconds"),
        ("unique_for", True, "unique_for must be a number of seconds"),
        ("result_ttl", "forever", "result_ttl: invalid delay 'forever'"),
        ("result_ttl", float("inf"), "result_ttl must be a number of seconds"),
        ("failure_ttl", -5, "failure_ttl must be a number of seconds"),
        (
            "failure_ttl",
            "20000 weeks",
            "failure_ttl must be a number of seconds from 0 to 315360000",
        ),
        ("timeout", timedelta(days=31), "timeout must be a number of seconds from 0 to 2592000"),
        ("retry_after", ["5s", "1 eon"], "retry_after: invalid delay '1 eon'"),
        ("max_tries", True, "max_tries must be a whole number"),
        ("on_duplicate", "ignore", "on_duplicate must be 'reject', 'keep' or 'replace'"),
        ("on_duplicate", None, "on_duplicate must be 'reject', 'keep' or 'replace'"),
        ("at_front", 1, "at_front must be True or False"),
        ("at_front", "yes", "at_front must be True or False"),
        ("unique_key", 42, "unique_key must be a string"),
        ("unique_key", "a\nb", "unique_key must be at most 190 characters without control"),
        ("unique_key", "k" * 191, "unique_key must be at most 190 characters"),
    ],
)
def test_each_bad_setting_is_refused_at_dispatch_naming_it(
    name: str, value: Any, message: str
) -> None:
    job = RecordJob("log")
    setattr(job, name, value)
    with pytest.raises(SerializationError, match=rf"^RecordJob\.{message}"):
        encode(job, job_id="a", queue="q", max_bytes=10_000)


@pytest.mark.parametrize(
    ("name", "value", "stored"),
    [
        ("timeout", "90s", 90),
        ("timeout", timedelta(minutes=2), 120),
        ("retry_after", "5 minutes", 300),
        ("retry_after", ["1s", 2, "3 seconds"], [1, 2, 3]),
        ("ttl", "1h30m", 5400),
        ("result_ttl", 0, 0),
        ("failure_ttl", "2 weeks", 1209600),
    ],
)
def test_good_durations_of_every_setting(name: str, value: Any, stored: Any) -> None:
    job = RecordJob("log")
    setattr(job, name, value)
    assert envelope_of(job)[name] == stored


async def test_nothing_is_queued_when_a_setting_is_wrong_and_the_error_names_it() -> None:
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        job = RecordJob("log")
        job.timeout = "1 hr and a bit"
        with pytest.raises(SerializationError, match=r"RecordJob\.timeout"):
            await manager.push(job)
        with pytest.raises(SerializationError, match=r"BadClassJob\.timeout"):
            await manager.push(BadClassJob())
        with pytest.raises(SerializationError, match=r"BadClassJob\.timeout"):
            await manager.push(BadClassJob())  # not cached as good after a refusal
        assert await manager.size() == 0


def test_the_class_check_is_cached_but_instance_overrides_are_checked_each_time() -> None:
    good = RecordJob("log")
    assert job_settings(good) is job_settings(RecordJob("other"))  # one check per class
    bad = RecordJob("log")
    bad.max_tries = 0
    with pytest.raises(SerializationError, match="max_tries must be at least 1"):
        job_settings(bad)
    assert job_settings(RecordJob("log")).max_tries == 3  # the class's cache is untouched


# -- the loader ------------------------------------------------------------------------------


def payload(job: str = f"{PATH}:HourlyJob", data: Any = None, **fields: Any) -> bytes:
    return orjson.dumps({"id": "a", "job": job, "data": data or {}, **fields})


def test_decoded_carries_the_keep_times_and_the_job_numbers() -> None:
    raw = encode(HourlyJob(2), job_id="a", queue="q", max_bytes=10_000)
    decoded = LOADER.load(raw, job_id="a", attempts=1)
    assert (decoded.result_ttl, decoded.failure_ttl, decoded.timeout) == (86400, 172800, 3600)
    job = decoded.job
    assert (job.timeout, job.retry_after, job.ttl) == (3600, [30, 120, 600], 90)
    assert job.backoff(2) == 120


def test_a_wave_one_payload_still_loads_with_no_keep_times() -> None:
    # What today's release writes: no result_ttl, failure_ttl or ttl fields.
    raw = payload(
        "tests.jobs:RecordJob",
        {"log": "l", "n": 1, "data_": {}},
        queue="default",
        max_tries=3,
        timeout=60,
        retry_after=0,
        created_at=1700000000000,
    )
    decoded = LOADER.load(raw, job_id="a", attempts=1)
    assert (decoded.result_ttl, decoded.failure_ttl) == (None, None)
    assert (decoded.max_tries, decoded.timeout) == (3, 60.0)


def test_missing_fields_fall_back_to_the_class_settings_in_seconds() -> None:
    decoded = LOADER.load(payload(), job_id="a", attempts=1)
    assert decoded.timeout == 3600.0  # the class says "1h"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"result_ttl": "500"}, "result_ttl must be a number of seconds"),
        ({"result_ttl": -1}, "result_ttl must be a number of seconds"),
        ({"failure_ttl": True}, "failure_ttl must be a number of seconds"),
        ({"failure_ttl": [1]}, "failure_ttl must be a number of seconds"),
        ({"ttl": 1e12}, "ttl must be a number of seconds from 0 to 2592000"),
        ({"ttl": "90s"}, "ttl must be a number of seconds"),
        ({"timeout": "1h"}, "timeout must be a number"),
        ({"retry_after": ["30s"]}, "retry_after must be seconds"),
    ],
)
def test_the_loader_distrusts_every_field(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(PayloadError, match=rf"HourlyJob: payload field {reason}"):
        LOADER.load(payload(**fields), job_id="a", attempts=1)


def test_a_class_whose_own_setting_is_wrong_cannot_be_loaded() -> None:
    with pytest.raises(PayloadError, match=r"BadClassJob\.timeout"):
        LOADER.load(payload(f"{PATH}:BadClassJob"), job_id="a", attempts=1)


def test_the_keep_time_settings_accept_durations() -> None:
    settings = Settings.load(env_file=None, queue_result_ttl="10 minutes", queue_failure_ttl="0")
    assert (settings.queue_result_ttl, settings.queue_failure_ttl) == (600, 0)
    defaults = Settings.load(env_file=None)
    assert (defaults.queue_result_ttl, defaults.queue_failure_ttl) == (500, 604800)
    for bad in ("-1", "a while"):
        with pytest.raises(Exception, match="QUEUE_RESULT_TTL"):
            Settings.load(env_file=None, queue_result_ttl=bad)
