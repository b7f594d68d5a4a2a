"""`claim_marker`: set-if-absent on the markers, on every driver.

A claim stores its value only where no unexpired value is stored (by a claim or by
`set_marker`), and says whether it did. Of any number of claims of one free name made at the
same time, by one driver or by several (other workers, other connections), exactly one wins.
An expired value is free again, also when many claim it at once (the SQL drivers take over the
old row instead of inserting). A claim touches no other name. Drivers that keep records in a
companion store (the amqp driver) build their id checks and unique keys on this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack

import pytest

from core.queue.drivers import Driver
from tests.conformance.workflow_support import new_id, second_driver
from tests.conftest import Backend

pytestmark = pytest.mark.timeout(60)

CLAIMS = 20


async def until_expired(driver: Driver, name: str, timeout: float = 10.0) -> None:
    """Wait until `name` reads as unset: its ttl is the behaviour under test, so it is polled
    (20 ms steps, bounded) rather than slept past."""
    deadline = time.monotonic() + timeout
    while await driver.get_marker(name) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"marker {name!r} still set after {timeout}s")
        await asyncio.sleep(0.02)


async def claim_all(drivers: Sequence[Driver], name: str) -> list[bool]:
    """`CLAIMS` claims of `name` at the same instant, spread over `drivers`, each with its own
    value (`v<i>`)."""
    calls = [drivers[i % len(drivers)].claim_marker(name, f"v{i}", ttl=60) for i in range(CLAIMS)]
    return list(await asyncio.gather(*calls))


async def open_drivers(stack: AsyncExitStack, backend: Backend, driver: Driver) -> list[Driver]:
    """The driver under test and three more opened separately (one for memory: its store
    lives in the driver)."""
    others = [await stack.enter_async_context(second_driver(backend, driver)) for _ in range(3)]
    return [driver, *others]


async def test_the_first_claim_wins_and_a_second_is_refused(driver: Driver) -> None:
    name = f"claim:{new_id()}"
    assert await driver.claim_marker(name, "first", ttl=60) is True
    assert await driver.get_marker(name) == "first"
    assert await driver.claim_marker(name, "second", ttl=60) is False
    assert await driver.claim_marker(name, "first", ttl=60) is False  # the same value too
    assert await driver.get_marker(name) == "first"


async def test_a_claim_is_refused_where_set_marker_stored_a_value(driver: Driver) -> None:
    name = f"claim:{new_id()}"
    await driver.set_marker(name, "set", ttl=60)
    assert await driver.claim_marker(name, "claimed", ttl=60) is False
    assert await driver.get_marker(name) == "set"


async def test_a_refused_claim_does_not_extend_the_value(driver: Driver) -> None:
    name = f"claim:{new_id()}"
    assert await driver.claim_marker(name, "short", ttl=0.5) is True
    assert await driver.claim_marker(name, "long", ttl=3600) is False
    await until_expired(driver, name)  # would time out had the refused claim set 3600 s


async def test_an_expired_claim_lets_a_new_one_win(driver: Driver) -> None:
    name = f"claim:{new_id()}"
    assert await driver.claim_marker(name, "old", ttl=0.3) is True
    await until_expired(driver, name)
    assert await driver.claim_marker(name, "new", ttl=60) is True
    assert await driver.get_marker(name) == "new"
    assert await driver.claim_marker(name, "newer", ttl=60) is False


async def test_exactly_one_of_many_concurrent_claims_wins(backend: Backend, driver: Driver) -> None:
    name = f"claim:{new_id()}"
    async with AsyncExitStack() as stack:
        drivers = await open_drivers(stack, backend, driver)
        won = await claim_all(drivers, name)
        assert won.count(True) == 1, won
        assert await drivers[-1].get_marker(name) == f"v{won.index(True)}"


async def test_exactly_one_of_many_concurrent_claims_takes_an_expired_value(
    backend: Backend, driver: Driver
) -> None:
    name = f"claim:{new_id()}"
    await driver.set_marker(name, "gone", ttl=0.2)
    async with AsyncExitStack() as stack:
        drivers = await open_drivers(stack, backend, driver)
        await until_expired(driver, name)
        won = await claim_all(drivers, name)
        assert won.count(True) == 1, won
        assert await driver.get_marker(name) == f"v{won.index(True)}"


async def test_a_claim_does_not_disturb_other_names(driver: Driver) -> None:
    base = f"claim:{new_id()}"
    await driver.set_marker(f"{base}:set", "kept", ttl=60)
    assert await driver.claim_marker(f"{base}:a", "a", ttl=60) is True
    assert await driver.claim_marker(f"{base}:b", "b", ttl=60) is True  # a neighbour is free
    assert await driver.claim_marker(f"{base}:a", "again", ttl=60) is False
    assert await driver.get_marker(f"{base}:set") == "kept"
    assert await driver.get_marker(f"{base}:a") == "a"
    assert await driver.get_marker(f"{base}:b") == "b"
    assert await driver.get_marker(base) is None  # a prefix of the names is its own name


async def test_a_claim_keeps_long_names_and_any_text(driver: Driver) -> None:
    name = f"claim:{new_id()}:" + "n" * 140  # 179 characters: within every driver's bound
    value = "x" * 300 + ":ü{}"
    assert await driver.claim_marker(name, value, ttl=60) is True
    assert await driver.get_marker(name) == value
    assert await driver.claim_marker(name, "other", ttl=60) is False


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_a_claim_without_a_positive_ttl_is_refused_with_a_clear_error(
    driver: Driver, ttl: float
) -> None:
    name = f"claim:{new_id()}"
    with pytest.raises(ValueError, match="ttl must be a positive number"):
        await driver.claim_marker(name, "v", ttl=ttl)
    assert await driver.get_marker(name) is None  # nothing stored
