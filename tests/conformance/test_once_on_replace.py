"""A once key is taken by a push a holder answers, on every driver.

Driver-level: a push with a `once_key` takes the key not only when it stores its job but also
when the holder of its unique key or id answers it ("replaced", "kept", "duplicate"); the key
then names that holder. A second push with the key stores nothing, changes nothing and answers
"duplicate" with the holder's id, even once the holder has started (its unique key is free
again: without the once key, the second push would be stored as its successor). This is what
makes the offline spool's replay of a coalesced job safe to repeat (docs/iot.md, spool). A push
refused for a full queue takes no key.
"""

from __future__ import annotations

import orjson
import pytest

from core.queue.drivers import Driver, Pushed
from core.queue.drivers.base import OutgoingJob
from tests.conformance.workflow_support import new_id, outgoing, run, take

pytestmark = pytest.mark.timeout(60)


async def values(driver: Driver, queue: str) -> list[tuple[str, int]]:
    """(id, n) of the jobs `reserve` hands out now, in order (held under a 30 s lease)."""
    held = await driver.reserve([queue], 100, lease=30)
    return [(h.id, int(orjson.loads(h.payload)["n"])) for h in held if not h.expired]


def coalescing(queue: str, n: int, **fields: object) -> OutgoingJob:
    return outgoing(new_id(), queue, n, unique_key="device-1", **fields)


async def test_a_once_key_push_that_replaces_takes_the_key(driver: Driver, queue: str) -> None:
    holder = coalescing(queue, 1, on_duplicate="replace")
    assert await driver.push([holder]) == [Pushed(holder.id, "created")]
    first = coalescing(queue, 2, on_duplicate="replace", once_key="spool:a", once_for=60)
    assert await driver.push([first]) == [Pushed(holder.id, "replaced")]
    again = coalescing(queue, 3, on_duplicate="replace", once_key="spool:a", once_for=60)
    assert await driver.push([again]) == [Pushed(holder.id, "duplicate")]
    assert await driver.size(queue) == 1
    assert await values(driver, queue) == [(holder.id, 2)]  # the repeat changed nothing
    # The holder has started: its unique key is free, a push would be its successor. With
    # the key taken, a repeat of the push stores nothing.
    late = coalescing(queue, 4, on_duplicate="replace", once_key="spool:a", once_for=60)
    assert await driver.push([late]) == [Pushed(holder.id, "duplicate")]
    assert await take(driver, queue) == []  # nothing waits to run the value again
    for job in (first, again, late):
        assert await driver.job_status(job.id, queue) is None


async def test_a_once_key_push_that_keeps_the_holder_takes_the_key(
    driver: Driver, queue: str
) -> None:
    holder = coalescing(queue, 1, on_duplicate="keep")
    assert await driver.push([holder]) == [Pushed(holder.id, "created")]
    first = coalescing(queue, 2, on_duplicate="keep", once_key="spool:b", once_for=60)
    assert await driver.push([first]) == [Pushed(holder.id, "kept")]
    again = coalescing(queue, 3, on_duplicate="keep", once_key="spool:b", once_for=60)
    assert await driver.push([again]) == [Pushed(holder.id, "duplicate")]
    await run(driver, queue, holder.id)  # it ran and ended: the unique key is free
    late = coalescing(queue, 4, on_duplicate="keep", once_key="spool:b", once_for=60)
    assert await driver.push([late]) == [Pushed(holder.id, "duplicate")]
    assert await driver.size(queue) == 0
    # Another once key is not taken: its push is stored as the key's new holder.
    other = coalescing(queue, 5, on_duplicate="keep", once_key="spool:c", once_for=60)
    assert await driver.push([other]) == [Pushed(other.id, "created")]
    assert await values(driver, queue) == [(other.id, 5)]


async def test_a_once_key_push_in_one_call_with_its_repeat_stores_one_value(
    driver: Driver, queue: str
) -> None:
    holder = coalescing(queue, 1, on_duplicate="replace")
    first = coalescing(queue, 2, on_duplicate="replace", once_key="spool:d", once_for=60)
    again = coalescing(queue, 3, on_duplicate="replace", once_key="spool:d", once_for=60)
    assert await driver.push([holder, first, again]) == [
        Pushed(holder.id, "created"),
        Pushed(holder.id, "replaced"),
        Pushed(holder.id, "duplicate"),
    ]
    assert await values(driver, queue) == [(holder.id, 2)]


async def test_a_duplicate_of_its_id_takes_the_key(driver: Driver, queue: str) -> None:
    job = outgoing(new_id(), queue, 1)
    await driver.push([job])
    repeat = OutgoingJob(
        job.id, queue, job.payload, job=job.job, check_id=True, once_key="spool:e", once_for=60
    )
    assert await driver.push([repeat]) == [Pushed(job.id, "duplicate")]
    await run(driver, queue, job.id)  # ended: the id check alone would store it again
    assert await driver.push([repeat]) == [Pushed(job.id, "duplicate")]
    assert await take(driver, queue) == []


async def test_a_push_refused_for_a_full_queue_takes_no_key(driver: Driver, queue: str) -> None:
    waiting = outgoing(new_id(), queue, 1, max_length=1)
    assert await driver.push([waiting]) == [Pushed(waiting.id, "created")]
    refused = outgoing(new_id(), queue, 2, max_length=1, once_key="spool:f", once_for=60)
    assert await driver.push([refused]) == [Pushed(refused.id, "full")]
    await run(driver, queue, waiting.id)
    later = outgoing(new_id(), queue, 3, max_length=1, once_key="spool:f", once_for=60)
    assert await driver.push([later]) == [Pushed(later.id, "created")]
    assert await take(driver, queue) == [later.id]
