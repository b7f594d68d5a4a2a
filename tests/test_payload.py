"""Payloads, delays and the job loader, without a backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.delays import parse_delay
from core.errors import PayloadError, UnknownJobError
from core.job import Job
from core.queue.payload import JobLoader, encode, validate_queue
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("30s", 30),
        ("10 minutes", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2 days", 172800),
        ("250ms", 0.25),
        ("1 week", 604800),
        (5, 5),
        (timedelta(minutes=2), 120),
    ],
)
def test_delays(text: object, seconds: float) -> None:
    assert parse_delay(text) == pytest.approx(seconds)  # type: ignore[arg-type]


def test_datetime_delay_and_past_is_now() -> None:
    assert parse_delay(datetime.now(UTC) + timedelta(seconds=60)) == pytest.approx(60, abs=1)
    assert parse_delay(datetime.now(UTC) - timedelta(hours=1)) == 0


@pytest.mark.parametrize("bad", ["soon", "10 parsecs", "", "-"])
def test_bad_delays_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid delay"):
        parse_delay(bad)


def test_backoff_list_repeats_its_last_delay() -> None:
    job = Job()
    job.retry_after = [1, 5, 30]
    assert [job.backoff(n) for n in (1, 2, 3, 4, 9)] == [1, 5, 30, 30, 30]
    job.retry_after = 7
    assert job.backoff(3) == 7


def test_instance_settings_travel_with_the_payload() -> None:
    job = RecordJob("log", 3)
    job.max_tries = 7
    job.timeout = 12.5
    raw = encode(job, job_id="abc", queue="q", max_bytes=10_000)
    decoded = JobLoader(["tests."]).load(raw, job_id="abc", attempts=2)
    assert (decoded.max_tries, decoded.timeout) == (7, 12.5)
    assert decoded.job.job_id == "abc" and decoded.job.attempts == 2
    assert "max_tries" not in decoded.job.data()


def test_loader_only_imports_allowed_modules() -> None:
    loader = JobLoader(["app."])
    with pytest.raises(UnknownJobError, match="outside the allowed modules"):
        loader.resolve("tests.jobs:RecordJob")
    with pytest.raises(UnknownJobError, match="module:ClassName"):
        loader.resolve("no-colon")
    with pytest.raises(PayloadError, match="must be a JSON object"):
        loader.load(b"[1, 2]", job_id="x", attempts=1)
    with pytest.raises(PayloadError, match="'data' is missing"):
        loader.load(b'{"job": "app.x:Y"}', job_id="x", attempts=1)


@pytest.mark.parametrize("name", ["", "a b", "x{y}", "q" * 191])
def test_bad_queue_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid queue name"):
        validate_queue(name)
