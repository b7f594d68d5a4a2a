"""Outcomes over MQTT (docs/iot.md, "Outcomes over MQTT")."""

import asyncio
from typing import Any

import orjson

from app.jobs.set_setpoint_job import SetSetpointJob
from core.mqtt import MqttApp, Router
from core.mqtt.requests import request
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker

router = Router()


# A dashboard asks for a new setpoint; the handler answers at once (it returns nothing) and
# the job's outcome goes back on the message's Response Topic when the job ends, and on the
# device's status topic (the job's `status_topic`, or the route's `status_topic=`).
@router.on("devices/{device_id}/setpoint")
async def setpoint(device_id: str, payload: Any) -> None:
    await dispatch(SetSetpointJob(device_id, payload["celsius"]))


# Stands in for the thermostat's firmware (see iot_requests.py).
@router.on("devices/{device_id}/commands")
async def command(device_id: str, payload: Any) -> dict[str, Any]:
    return {"device": device_id, "setpoint": payload["setpoint"], "ok": True}


async def main(host: str = "127.0.0.1", port: int = 1883, device_id: str = "t-1") -> list[str]:
    settings = Settings.load(
        env_file=None,
        queue_connection="memory",
        mqtt_host=host,
        mqtt_port=port,
        # Only Response Topics under this filter get outcomes: a device must not choose
        # where workers publish. (`Job.request`'s own replies come under topiq/replies.)
        mqtt_response_topics="topiq/replies/#",
    )
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        app = MqttApp(router, settings)
        worker = Worker(manager, WorkerOptions(queues=("devices",), handle_signals=False))
        tasks = [asyncio.create_task(app.run()), asyncio.create_task(worker.run())]
        try:
            await app.wait_ready()
            # The dashboard: an MQTT 5 request with a Response Topic and Correlation Data
            # (what `mosquitto_rr -t devices/t-1/setpoint -e <topic> -m '{"celsius": 21.5}'`
            # sends); `request` waits for the one reply.
            outcome = await request(f"devices/{device_id}/setpoint", {"celsius": 21.5}, timeout=30)
        finally:
            app.stop()
            worker.stop()
            await asyncio.gather(*tasks)
            set_default_manager(None)
    assert isinstance(outcome, dict)
    return [
        f"{key}: {orjson.dumps(outcome[key]).decode()}" for key in ("status", "attempts", "result")
    ]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/iot_outcomes.py` (Mosquitto on 1883)
    print("\n".join(asyncio.run(main())))
