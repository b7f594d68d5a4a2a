"""Controllers (docs/mqtt.md, "Controllers"): the seed's example, as written."""

from app.jobs.process_order_job import ProcessOrderJob
from core.controller import Controller
from core.mqtt import Router
from core.queue.queue_manager import dispatch


class OrderController(Controller):
    @staticmethod
    async def handle_new_order(order_id: str, payload, client):
        print(f"Received new order {order_id}")

        # Dispatch background job for processing
        job = ProcessOrderJob()
        job.order_id = order_id
        job.order_data = payload
        await dispatch(job)

        # Respond immediately without waiting for processing
        return {"status": "accepted", "order_id": order_id}


router = Router()
router.on("orders/{order_id}/new", OrderController.handle_new_order, qos=1)
