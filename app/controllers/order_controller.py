"""Orders arriving on `orders/{order_id}/new` (the seed's controller example)."""

from __future__ import annotations

from typing import Any

from app.jobs.process_order_job import ProcessOrderJob
from core.controller import Controller
from core.mqtt import Publisher
from core.queue.queue_manager import dispatch


class OrderController(Controller):
    """Accept orders at once; the slow processing runs as a `ProcessOrderJob`."""

    @staticmethod
    async def handle_new_order(order_id: str, payload: Any, client: Publisher) -> dict[str, str]:
        """Queue the order and answer at once (the answer goes to an MQTT 5 response topic)."""
        OrderController.logger.info("received new order %s", order_id)

        # Dispatch background job for processing
        job = ProcessOrderJob()
        job.order_id = order_id
        job.order_data = payload
        await dispatch(job)

        # Respond immediately without waiting for processing
        return {"status": "accepted", "order_id": order_id}
