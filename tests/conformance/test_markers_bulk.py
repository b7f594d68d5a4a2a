"""`set_markers` / `get_markers`: many markers in one call, on every driver.

A bulk write is `set_marker` for each item in order (a name given twice keeps its last
item) and a bulk read is `get_marker` for each name, in the order asked; both read and write
the same markers as the single calls. The server drivers do either in one round trip (a
pipeline, one transaction), so a companion store can keep the records of a dispatch of
thousands of jobs without a request per job. A ttl that is not a positive number refuses the
whole call before anything is written.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from core.queue.drivers import Driver
from tests.conformance.workflow_support import new_id

pytestmark = pytest.mark.timeout(60)

MANY = 20_000


async def until_unset(driver: Driver, names: list[str], timeout: float = 10.0) -> None:
    """Wait until every one of `names` reads as unset (polled in 20 ms steps, bounded): their
    ttl is the behaviour under test."""
    deadline = time.monotonic() + timeout
    while any(value is not None for value in await driver.get_markers(names)):
        if time.monotonic() > deadline:
            raise AssertionError(f"markers {names!r} still set after {timeout}s")
        await asyncio.sleep(0.02)


async def test_values_written_in_bulk_read_back_in_bulk_and_one_by_one(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    items = [
        (f"{base}:a", "alpha", 60.0),
        (f"{base}:b", "", 60.0),  # an empty value is a value, not an absence
        (f"{base}:" + "n" * 140, "x" * 300 + ':ü{"json": []}', 60.0),
    ]
    await driver.set_markers(items)
    names = [name for name, _, _ in items]
    assert await driver.get_markers(names) == [value for _, value, _ in items]
    for name, value, _ in items:
        assert await driver.get_marker(name) == value
    # Asked again, in another order and with a repeat: one answer per name asked, in order.
    assert await driver.get_markers([names[2], names[0], names[2]]) == [
        items[2][1],
        "alpha",
        items[2][1],
    ]


async def test_names_never_set_read_none_in_their_place(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    await driver.set_markers([(f"{base}:set", "here", 60)])
    found = await driver.get_markers([f"{base}:none", f"{base}:set", f"{base}:other", base])
    assert found == [None, "here", None, None]


async def test_bulk_and_single_calls_share_the_markers(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    await driver.set_marker(f"{base}:single", "one", ttl=60)
    assert await driver.claim_marker(f"{base}:claimed", "mine", ttl=60) is True
    await driver.set_markers([(f"{base}:single", "replaced", 60), (f"{base}:new", "n", 60)])
    assert await driver.get_markers([f"{base}:single", f"{base}:claimed", f"{base}:new"]) == [
        "replaced",
        "mine",
        "n",
    ]
    assert await driver.claim_marker(f"{base}:new", "late", ttl=60) is False  # taken in bulk


async def test_a_later_item_for_the_same_name_wins(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    items = [
        (f"{base}:x", "first", 60.0),
        (f"{base}:y", "only", 60.0),
        (f"{base}:x", "second", 60.0),
        (f"{base}:z", "early", 60.0),
        (f"{base}:x", "third", 60.0),
        (f"{base}:z", "late", 60.0),
    ]
    await driver.set_markers(items)
    assert await driver.get_markers([f"{base}:x", f"{base}:y", f"{base}:z"]) == [
        "third",
        "only",
        "late",
    ]


async def test_a_later_item_also_wins_with_its_ttl(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    long_then_short = [(f"{base}:a", "long", 3600.0), (f"{base}:a", "short", 0.3)]
    short_then_long = [(f"{base}:b", "short", 0.3), (f"{base}:b", "long", 3600.0)]
    await driver.set_markers(long_then_short + short_then_long)
    await until_unset(driver, [f"{base}:a"])  # would time out had the first ttl been kept
    assert await driver.get_markers([f"{base}:b"]) == ["long"]


async def test_expiry_is_honoured_per_item(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    short = [f"{base}:s{i}" for i in range(5)]
    kept = [f"{base}:k{i}" for i in range(5)]
    items = [(name, "v", 0.3) for name in short] + [(name, "v", 60.0) for name in kept]
    await driver.set_markers(items)
    await until_unset(driver, short)
    assert await driver.get_markers(kept) == ["v"] * len(kept)
    for name in short:
        assert await driver.get_marker(name) is None


async def test_empty_input_is_a_no_op(driver: Driver) -> None:
    name = f"bulk:{new_id()}"
    await driver.set_marker(name, "kept", ttl=60)
    await driver.set_markers([])
    assert await driver.get_markers([]) == []
    assert await driver.get_marker(name) == "kept"


@pytest.mark.timeout(180)
async def test_twenty_thousand_items_in_one_call(driver: Driver) -> None:
    base = f"bulk:{new_id()}"
    names = [f"{base}:{i}" for i in range(MANY)]
    await driver.set_markers([(name, f"value {i}", 600.0) for i, name in enumerate(names)])
    found = await driver.get_markers([*names, f"{base}:absent"])
    assert len(found) == MANY + 1
    wrong = [(i, v) for i, v in enumerate(found[:MANY]) if v != f"value {i}"]
    assert not wrong, wrong[:5]
    assert found[MANY] is None
    # Overwritten in bulk too: every row already exists now.
    await driver.set_markers([(name, "again", 600.0) for name in names])
    assert set(await driver.get_markers(names)) == {"again"}


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_a_ttl_that_is_not_positive_refuses_the_whole_call(
    driver: Driver, ttl: float
) -> None:
    base = f"bulk:{new_id()}"
    items = [(f"{base}:good", "v", 60.0), (f"{base}:bad", "v", ttl)]
    with pytest.raises(ValueError, match=r"set_markers item 1 .*ttl must be a positive number"):
        await driver.set_markers(items)
    assert await driver.get_markers([f"{base}:good", f"{base}:bad"]) == [None, None]
