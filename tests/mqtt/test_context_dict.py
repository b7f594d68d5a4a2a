"""The seed's dict-style handler context (use case 1, "Email Notifications") on a real broker:
`context["params"]["user_id"]`, `context["payload"]["email"]`, and the other keys."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from core.job import Job
from core.mqtt import MqttApp, Router
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from tests.mqtt.conftest import Broker, MosquittoSub, mosquitto_pub, running, running_worker

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(60)]

SENT: list[dict[str, Any]] = []
SENT_EVENT = asyncio.Event()


class SendEmailJob(Job):
    """The seed's job, with attributes set after construction as the seed does."""

    async def handle(self) -> None:
        SENT.append({"to": self.to, "subject": self.subject, "user_id": self.user_id})
        SENT_EVENT.set()


def signup_router(prefix: str) -> Router:
    router = Router()

    @router.on(f"{prefix}/users/{{user_id}}/signup", qos=1)
    async def handle_user_signup(context):  # type: ignore[no-untyped-def]  # as in the seed
        user_id = context["params"]["user_id"]

        job = SendEmailJob()
        job.to = context["payload"]["email"]
        job.subject = "Welcome!"
        job.user_id = user_id
        await dispatch(job)

        # The other names the context answers to, dict-style.
        assert context["topic"] == f"{prefix}/users/{user_id}/signup"
        assert context["qos"] == 1 and context["retain"] is False
        assert context["raw"] == json.dumps({"email": "ada@example.com"}).encode()
        assert "payload" in context and "nope" not in context
        assert context.get("nope", "default") == "default"
        with pytest.raises(KeyError, match="has no 'nope'; it has client, params, payload"):
            context["nope"]
        await context["client"].publish(f"{prefix}/users/{user_id}/welcomed", {"ok": True})

    return router


async def test_the_seeds_dict_style_context_works_in_a_real_route(
    broker: Broker, prefix: str
) -> None:
    SENT.clear()
    SENT_EVENT.clear()
    settings = broker.settings(queue_default="context-dict")
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            app = MqttApp(signup_router(prefix), settings)
            async with (
                running(app),
                running_worker(manager, "context-dict"),
                MosquittoSub(broker, f"{prefix}/users/+/welcomed") as device,
            ):
                await mosquitto_pub(
                    broker, f"{prefix}/users/u-42/signup", json.dumps({"email": "ada@example.com"})
                )
                [(topic, payload)] = await device.receive(1)
                await asyncio.wait_for(SENT_EVENT.wait(), 20)
        finally:
            set_default_manager(None)
    assert (topic, json.loads(payload)) == (f"{prefix}/users/u-42/welcomed", {"ok": True})
    assert SENT == [{"to": "ada@example.com", "subject": "Welcome!", "user_id": "u-42"}]
    assert app.stats.failed == 0
