"""Once keys and markers on every driver (SPEC13 "Once keys and markers", point 4's tick key).

Driver-level: a push with a taken `once_key` (per queue) stores nothing and names the job that
took it ("duplicate"), whatever happened to that job, until `once_for` runs out; two
dispatchers pushing one key at once store one job. `set_marker`/`get_marker` keep a small
named value per connection until its ttl ends.
"""

from __future__ import annotations

import asyncio

import pytest

from core.queue.drivers import Driver, Pushed
from core.status import Status
from tests.conformance.workflow_support import (
    both,
    new_id,
    outgoing,
    run,
    second_driver,
    status_of,
    take,
)
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)


async def test_rule_a_taken_once_key_is_a_duplicate_naming_the_first_job(
    driver: Driver, queue: str
) -> None:
    first = outgoing(new_id(), queue, 1, once_key="tick:1", once_for=60)
    assert await driver.push([first]) == [Pushed(first.id, "created")]
    again = outgoing(new_id(), queue, 2, once_key="tick:1", once_for=60)
    assert await driver.push([again]) == [Pushed(first.id, "duplicate")]
    assert await driver.job_status(again.id, queue) is None
    assert await driver.size(queue) == 1
    other = outgoing(new_id(), queue, 3, once_key="tick:2", once_for=60)
    assert await driver.push([other]) == [Pushed(other.id, "created")]


async def test_rule_the_key_holds_whatever_happens_to_the_job(driver: Driver, queue: str) -> None:
    first = outgoing(new_id(), queue, once_key="tick", once_for=60)
    await driver.push([first])
    await run(driver, queue, first.id)  # it ran and ended
    late = outgoing(new_id(), queue, once_key="tick", once_for=60)
    assert await driver.push([late]) == [Pushed(first.id, "duplicate")]
    cancelled = outgoing(new_id(), queue, once_key="other", once_for=60)
    await driver.push([cancelled])
    assert await driver.cancel(cancelled.id, queue) is True
    again = outgoing(new_id(), queue, once_key="other", once_for=60)
    assert await driver.push([again]) == [Pushed(cancelled.id, "duplicate")]
    assert await take(driver, queue) == []


async def test_rule_once_keys_are_per_queue(driver: Driver, queue: str) -> None:
    here = outgoing(new_id(), queue, once_key="tick", once_for=60)
    there = outgoing(new_id(), f"{queue}-other", once_key="tick", once_for=60)
    assert await driver.push([here]) == [Pushed(here.id, "created")]
    assert await driver.push([there]) == [Pushed(there.id, "created")]
    assert await take(driver, f"{queue}-other") == [there.id]


async def test_rule_a_once_key_expires_after_once_for(driver: Driver, queue: str) -> None:
    first = outgoing(new_id(), queue, once_key="tick", once_for=0.6)
    await driver.push([first])
    [dup] = await driver.push([outgoing(new_id(), queue, once_key="tick", once_for=0.6)])
    assert dup == Pushed(first.id, "duplicate")
    await asyncio.sleep(0.7)  # the key's life is the behaviour
    later = outgoing(new_id(), queue, once_key="tick", once_for=0.6)
    assert await driver.push([later]) == [Pushed(later.id, "created")]
    assert await take(driver, queue) == [first.id, later.id]


async def test_rule_one_push_with_a_once_key_twice_stores_one_job(
    driver: Driver, queue: str
) -> None:
    a = outgoing(new_id(), queue, 1, once_key="tick", once_for=60)
    b = outgoing(new_id(), queue, 2, once_key="tick", once_for=60)
    assert await driver.push([a, b]) == [Pushed(a.id, "created"), Pushed(a.id, "duplicate")]
    assert await take(driver, queue) == [a.id]


async def test_rule_a_delayed_job_takes_its_key_at_push(driver: Driver, queue: str) -> None:
    first = outgoing(new_id(), queue, once_key="tick", once_for=60, delay=60)
    await driver.push([first])
    assert (await status_of(driver, first.id, queue)).status is Status.SCHEDULED
    again = outgoing(new_id(), queue, once_key="tick", once_for=60)
    assert await driver.push([again]) == [Pushed(first.id, "duplicate")]


async def test_rule_a_job_not_stored_does_not_take_its_key(driver: Driver, queue: str) -> None:
    unknown = new_id()
    orphan = outgoing(new_id(), queue, once_key="tick", once_for=60, depends_on=[unknown])
    assert await driver.push([orphan]) == [Pushed(unknown, "missing")]
    fresh = outgoing(new_id(), queue, once_key="tick", once_for=60)
    assert await driver.push([fresh]) == [Pushed(fresh.id, "created")]
    # A push rejected by its once key leaves the key's holder as it was.
    dup = outgoing(new_id(), queue, once_key="tick", once_for=60)
    assert await driver.push([dup]) == [Pushed(fresh.id, "duplicate")]
    assert await take(driver, queue) == [fresh.id]


async def test_rule_two_dispatchers_pushing_one_key_at_once_store_one_job(
    backend: Backend, driver: Driver, queue: str
) -> None:
    async with second_driver(backend, driver) as other:
        for round_ in range(20):
            key = f"schedule:poll:{round_}"
            a = outgoing(new_id(), queue, 1, once_key=key, once_for=60)
            b = outgoing(new_id(), queue, 2, once_key=key, once_for=60)
            [[pa], [pb]] = await both(driver.push([a]), other.push([b]))
            outcomes = sorted([pa.outcome, pb.outcome])
            assert outcomes == ["created", "duplicate"], f"round {round_}"
            winner = a.id if pa.outcome == "created" else b.id
            assert (pa.id, pb.id) == (winner, winner), f"round {round_}"
        assert await driver.size(queue) == 20


# -- markers -------------------------------------------------------------------------------


async def test_rule_a_marker_is_read_back_and_replaced(driver: Driver) -> None:
    name = f"schedule:{new_id()}:last"
    assert await driver.get_marker(name) is None
    await driver.set_marker(name, "1764730800000", ttl=60)
    assert await driver.get_marker(name) == "1764730800000"
    await driver.set_marker(name, "1764730860000", ttl=60)
    assert await driver.get_marker(name) == "1764730860000"
    assert await driver.get_marker(f"{name}-other") is None


async def test_rule_a_marker_expires_after_its_ttl(driver: Driver) -> None:
    name = f"m-{new_id()}"
    await driver.set_marker(name, "v", ttl=0.6)
    assert await driver.get_marker(name) == "v"
    await asyncio.sleep(0.7)  # the ttl is the behaviour
    assert await driver.get_marker(name) is None
    await driver.set_marker(name, "w", ttl=60)  # set again after it expired
    assert await driver.get_marker(name) == "w"


async def test_rule_a_marker_is_per_connection(backend: Backend, driver: Driver) -> None:
    name = f"m-{new_id()}"
    value = "x" * 200 + ":ü"
    await driver.set_marker(name, value, ttl=60)
    async with second_driver(backend, driver) as other:
        assert await other.get_marker(name) == value
