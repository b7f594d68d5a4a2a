"""Routers that the app subprocesses of the tests load with `--app tests.mqtt.apps:<name>`.

Topics start with `topiq-test/<run>/`, so each test picks its own `<run>` and the routes need
no configuration.
"""

from __future__ import annotations

import os
from typing import Any

from core.mqtt import Publisher, Router
from core.queue.queue_manager import dispatch
from tests.mqtt.jobs import EchoJob

#: Two processes loading this router split `.../share/in` between them.
shared = Router()


@shared.on("topiq-test/{run}/share/in", shared="topiq-test-share", qos=1)
async def take_share(run: str, payload: Any, client: Publisher) -> None:
    await client.publish(f"topiq-test/{run}/share/handled", {"n": payload["n"], "pid": os.getpid()})


#: Dispatches a job that a worker process runs and that publishes the result.
flow = Router()


@flow.on("topiq-test/{run}/devices/{device_id}/reading", qos=1)
async def reading(run: str, device_id: str, payload: Any) -> None:
    await dispatch(EchoJob(f"topiq-test/{run}/results/{device_id}", device_id, payload))
