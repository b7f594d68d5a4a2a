"""Simulated devices for `python main.py --simulate N` and the demo.

Each device has its own connection and client id and publishes a telemetry reading
(`devices/sim-<n>/telemetry`, JSON) about once per interval; the temperature wanders and now and
then spikes past the alert threshold of the example app. Device 1 also places an order on
`orders/<id>/new` every few readings, and every so often a device sends a malformed reading,
so the demo shows validation at work too. Its first order has an item without a price: the
example app's `ProcessOrderJob` fails on it, is retried, and ends in the failed store. Every few
readings a device also reports its state (`devices/sim-<n>/state`, `{"seq": n, ...}` numbered
per device) several times in quick succession, of which only the latest matters: the example
app coalesces them, runs them in order per device and publishes each outcome on
`devices/sim-<n>/status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from typing import Any

from core.mqtt.client import PublishConnection
from core.mqtt.errors import PublishError
from core.mqtt.options import ConnectionOptions
from core.mqtt.publisher import encode_payload

__all__ = ["DeviceSimulator"]

logger = logging.getLogger("topiq.mqtt.simulator")

#: Seconds between the state reports of one burst: far quicker than the example app's job
#: for them, so the later reports of a burst find an earlier one still waiting.
STATE_GAP = 0.02


class DeviceSimulator:
    """`count` devices publishing until `stop()`.

    Args:
        options: The broker to publish to (each device gets its own client id).
        count: How many devices.
        interval: Seconds between one device's readings, on average.
        order_every: Device 1 places an order every this many readings, the first one on its
            second reading (0: never).
        broken_first_order: The first order has an item without a price (its job fails).
        malformed_every: One reading in this many is malformed (0: never).
        state_every: Each device reports its state every this many readings, the first time
            on its second reading (0: never).
        state_burst: State reports sent in a row each time (`STATE_GAP` seconds apart).
        seed: Seeds the random readings, for repeatable runs.
    """

    def __init__(
        self,
        options: ConnectionOptions,
        count: int,
        *,
        interval: float = 1.0,
        order_every: int = 5,
        malformed_every: int = 40,
        broken_first_order: bool = True,
        state_every: int = 3,
        state_burst: int = 5,
        seed: int | None = None,
    ) -> None:
        self.options = options
        self.count = count
        self.interval = interval
        self.order_every = order_every
        self.malformed_every = malformed_every
        self.broken_first_order = broken_first_order
        self.state_every = state_every
        self.state_burst = state_burst
        self.sent = 0
        self._random = random.Random(seed)
        self._orders = itertools.count(1001)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Make `run()` return after the readings in flight."""
        self._stop.set()

    async def run(self) -> None:
        """Run every device until `stop()`."""
        async with asyncio.TaskGroup() as group:
            for number in range(1, self.count + 1):
                group.create_task(self._device(number), name=f"topiq-sim-device-{number}")

    async def _device(self, number: int) -> None:
        device_id = f"sim-{number}"
        connection = PublishConnection(
            self.options.replace(client_id=f"{self.options.client_id}-{device_id}")
        )
        temperature = self._random.uniform(18.0, 24.0)
        state = 0  # the last state report's number
        try:
            for reading in itertools.count(1):
                # Spread the devices out so they do not all publish on the same tick.
                pause = self.interval * self._random.uniform(0.5, 1.5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause)
                if self._stop.is_set():
                    return
                temperature += self._random.uniform(-0.8, 0.8)
                spike = self._random.random() < 0.08
                payload: Any = {
                    "temperature": round(temperature + (14.0 if spike else 0.0), 2),
                    "humidity": round(self._random.uniform(30.0, 60.0), 1),
                    "ts": round(time.time(), 3),
                }
                if self.malformed_every and self._random.randrange(self.malformed_every) == 0:
                    # Cut-off JSON, as from a flaky device: validation refuses it.
                    payload = b'{"temperature": "warm"'
                await self._send(connection, f"devices/{device_id}/telemetry", payload)
                # Early (the second reading), so a short demo shows the first order's fate.
                if number == 1 and self.order_every and (reading - 2) % self.order_every == 0:
                    await self._place_order(connection)
                if self.state_every and (reading - 2) % self.state_every == 0:
                    state = await self._report_state(connection, device_id, state)
        finally:
            await connection.close()

    async def _report_state(self, connection: PublishConnection, device_id: str, seq: int) -> int:
        """Send `state_burst` state reports in a row; returns the last one's number."""
        for _ in range(self.state_burst):
            seq += 1
            setpoint = round(self._random.uniform(19.0, 23.0), 1)
            await self._send(
                connection, f"devices/{device_id}/state", {"seq": seq, "setpoint": setpoint}
            )
            await asyncio.sleep(STATE_GAP)
        return seq

    async def _place_order(self, connection: PublishConnection) -> None:
        order_id = next(self._orders)
        items: list[dict[str, Any]] = [
            {"sku": "sensor-kit", "qty": self._random.randrange(1, 4), "price": 49.5}
        ]
        if self.broken_first_order and order_id == 1001:
            items.append({"sku": "gift-card", "qty": 1})  # no price: its job fails for good
        order = {"customer": f"customer-{self._random.randrange(1, 50)}", "items": items}
        await self._send(connection, f"orders/{order_id}/new", order)

    async def _send(self, connection: PublishConnection, topic: str, payload: Any) -> None:
        try:
            await connection.publish(topic, encode_payload(payload), qos=1)
            self.sent += 1
        except PublishError as exc:
            logger.warning("simulated device could not publish: %s", exc)
