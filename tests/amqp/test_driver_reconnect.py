"""The amqp driver across a broker restart (a private node of this test's own): the
connection comes back by itself, consumers are started again, a job held when the broker went
away is given out again with its try counted, and nothing is lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from core.errors import ConnectionLostError
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import OutgoingJob, ReservedJob
from tests.amqp.support import amqp_settings, new_queue
from tests.servers import PrivateRabbit


async def reserve_until(
    driver: AmqpDriver, queue: str, want: int, seconds: float
) -> list[ReservedJob]:
    got: list[ReservedJob] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        try:
            got += await driver.reserve([queue], want - len(got), 30.0)
            if len(got) < want:
                await driver.wait([queue], 0.5)
        except ConnectionLostError:
            await asyncio.sleep(0.5)
    return got


@pytest.mark.timeout(240)
async def test_a_restart_loses_nothing_and_reserve_works_again(tmp_path: Path) -> None:
    try:
        rabbit = await asyncio.to_thread(PrivateRabbit)
    except Exception as exc:  # not installed here
        pytest.skip(f"no private RabbitMQ node: {exc}")
    try:
        queue = new_queue()
        settings = amqp_settings(tmp_path, amqp_url=rabbit.url)
        async with AmqpDriver("amqp", settings) as driver:
            await driver.push([OutgoingJob(f"r{n}", queue, b"x") for n in range(3)])
            await driver.push([OutgoingJob("later", queue, b"x", delay=2.0)])
            [held] = await driver.reserve([queue], 1, 30.0)
            await asyncio.to_thread(rabbit.restart)
            # Until the connection is back, a push fails and says so (never lost quietly).
            with pytest.raises(ConnectionLostError):
                await driver.push([OutgoingJob("during", queue, b"x")])
            jobs = await reserve_until(driver, queue, 4, 60.0)
            await driver.ack([held])  # its delivery died with the connection: ignored
            got = {j.id: j.attempts for j in jobs}
            # The held job's try counts, once, whatever the broker counted (a consumer
            # restored while the node boots may be handed it and lose it once more); jobs
            # only prefetched never started: no try counted.
            assert got == {"later": 1, "r0": 2, "r1": 1, "r2": 1}, got
            await driver.ack(jobs)
    finally:
        await asyncio.to_thread(rabbit.stop)
