"""Edges of the job lifecycle found by trying to break it (issue #12 review), on every driver."""

from __future__ import annotations

import time

import pytest

from core.queue.queue_manager import QueueManager
from core.status import Status
from tests.jobs import RecordJob

pytestmark = pytest.mark.timeout(60)

TEN_YEARS = 10 * 365 * 86400


@pytest.mark.parametrize("delay", [1e300, 1e12, "99999999 days"])
async def test_a_delay_past_the_year_9999_is_refused_at_dispatch(
    manager: QueueManager, delay: float | str
) -> None:
    # Before: SQL raised a bare OverflowError from the driver, Redis stored the job with a due
    # time that `queue:job` could not print.
    with pytest.raises(ValueError, match=r"invalid delay .*9999"):
        await manager.later(delay, RecordJob("log"))
    with pytest.raises(ValueError, match=r"invalid delay .*9999"):
        await manager.bulk([RecordJob("a"), RecordJob("b")], delay=delay)
    assert await manager.size() == 0


async def test_a_long_delay_within_range_is_kept(manager: QueueManager) -> None:
    before = time.time()
    handle = await manager.later(TEN_YEARS, RecordJob("log"))
    record = await handle.status()
    assert record.status == Status.SCHEDULED
    assert record.due_at is not None
    assert before + TEN_YEARS - 5 <= record.due_at <= time.time() + TEN_YEARS + 5
