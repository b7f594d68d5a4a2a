"""Helpers shared by the IoT-native conformance tests (tests/conformance/test_iot_*.py).

The tests check SPEC14's driver rules (groups, bounded queues, counting, expired jobs handed
back) over every backend (`backend` fixture, through the `driver` and `queue` fixtures of
conftest.py). The job builders and readers of workflow_support.py are reused; what is here
tells runnable jobs from the expired ones `reserve` now hands back, and builds grouped and
bounded jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.queue.drivers import Driver, OutgoingJob, ReservedJob
from core.queue.drivers.base import Overflow
from tests.conformance.workflow_support import outgoing

#: Slack for clocks read on two sides (the server's and ours) and rounding to milliseconds.
SLACK = 0.05


def grouped(job_id: str, queue: str, group: str, n: int = 0, **fields: Any) -> OutgoingJob:
    """A job of `group` (one at a time per group and queue, in push order)."""
    return outgoing(job_id, queue, n, group=group, **fields)


def bounded(
    job_id: str,
    queue: str,
    max_length: int,
    overflow: Overflow = "reject",
    n: int = 0,
    **fields: Any,
) -> OutgoingJob:
    """A job pushed into a queue bounded to `max_length` waiting jobs."""
    return outgoing(job_id, queue, n, max_length=max_length, overflow=overflow, **fields)


def dropped_error(queue: str, max_length: int) -> str:
    """The error a job dropped by "drop_oldest" ends with (SPEC14 §2)."""
    return f"dropped: queue {queue} is full ({max_length} waiting)"


def split(held: Sequence[ReservedJob]) -> tuple[list[ReservedJob], list[ReservedJob]]:
    """A reserve's answer as (runnable jobs, expired jobs handed back)."""
    return [h for h in held if not h.expired], [h for h in held if h.expired]


async def reserve_runnable(
    driver: Driver, queue: str, limit: int = 100, lease: float = 30
) -> list[ReservedJob]:
    """The runnable jobs `reserve` hands out now; fails if it also hands back expired ones
    (a test that expects expiries reads them with `split`)."""
    runnable, expired = split(await driver.reserve([queue], limit, lease=lease))
    assert not expired, f"unexpected expired jobs handed back: {[h.id for h in expired]}"
    return runnable


async def take_ids(driver: Driver, queue: str, limit: int = 100) -> list[str]:
    """Ids of the runnable jobs `reserve` hands out now, in order (30 s lease)."""
    return [h.id for h in await reserve_runnable(driver, queue, limit)]


async def run_in_turn(driver: Driver, queue: str, count: int) -> list[str]:
    """Reserve with a big limit and acknowledge, `count` times; each reserve must hand out
    exactly one job (one group only is waiting). Returns the ids in the order they ran."""
    order: list[str] = []
    for _ in range(count):
        held = await reserve_runnable(driver, queue, 100)
        assert len(held) == 1, f"after {order}: reserve handed out {[h.id for h in held]}"
        order.append(held[0].id)
        await driver.ack(held)
    return order
