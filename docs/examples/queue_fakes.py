"""Testing routes and dispatches without servers (docs/queue.md, "Testing support")."""

from app.jobs.send_notification_job import SendNotificationJob
from app.jobs.store_telemetry_job import StoreTelemetryJob
from app.routes import router
from core.mqtt import InvalidPayloadError
from core.queue.queue_manager import dispatch, queue
from core.testing import RouteTestClient


async def test_a_welcome_is_queued() -> None:
    with queue.fake() as fake:  # nothing is stored anywhere, nothing runs
        handle = await dispatch(SendNotificationJob(7, "Welcome!"))
        fake.assert_dispatched(SendNotificationJob, user_id=7, queue="notifications")
        fake.assert_dispatched_times(SendNotificationJob, 1)
        fake.assert_not_dispatched(StoreTelemetryJob)
        assert (await handle.status()).status == "queued"
        [job] = fake.dispatched(SendNotificationJob)
        assert job.message == "Welcome!"


async def test_telemetry_goes_through_the_route_and_its_middleware() -> None:
    client = RouteTestClient(router)  # app.routes' router, middleware and all
    sent = await client.send("devices/d1/telemetry", {"temperature": 21.5})
    assert sent.error is None
    sent.assert_dispatched(StoreTelemetryJob, device_id="d1", reading={"temperature": 21.5})

    refused = await client.send("devices/d1/telemetry", {"temperature": "warm"})
    assert isinstance(refused.error, InvalidPayloadError)  # ValidatePayload said no
    refused.assert_nothing_dispatched()
