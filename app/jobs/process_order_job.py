"""Process a new order in the background and report its status to MQTT."""

from __future__ import annotations

import logging
from typing import Any

from core.job import Job

logger = logging.getLogger("topiq.app.ProcessOrderJob")


class ProcessOrderJob(Job):
    """Price an order and publish its status on `orders/<order_id>/status`.

    Attributes:
        order_id: The order's id, from the topic.
        order_data: The order as the client sent it: `{"items": [{"sku", "qty", "price"}]}`.
    """

    max_tries = 3
    timeout = 30
    retry_after = [1, 2]  # seconds before the second and the third try

    def __init__(self) -> None:
        super().__init__()
        self.order_id: str | None = None
        self.order_data: Any = None

    async def handle(self) -> None:
        """Total the items and publish the result.

        Raises:
            ValueError: an item has no price. The demo's simulator sends one such order, so
                `python main.py --demo` shows a job retried and then kept in the failed store.
        """
        data = self.order_data if isinstance(self.order_data, dict) else {}
        items = data.get("items") or []
        for item in items:
            if item.get("price") is None:
                raise ValueError(
                    f"order {self.order_id}: item {item.get('sku', '?')!r} has no price"
                )
        total = round(
            sum(float(item.get("qty", 1)) * float(item.get("price", 0)) for item in items), 2
        )
        logger.info("order %s: %d item(s), total %.2f", self.order_id, len(items), total)
        await self.publish(
            f"orders/{self.order_id}/status",
            {"order_id": self.order_id, "status": "processed", "items": len(items), "total": total},
        )
