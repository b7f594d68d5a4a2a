"""Device commands with `Job.request` (docs/iot.md, "Device commands: Job.request")."""

import asyncio
from typing import Any

from app.jobs.set_setpoint_job import SetSetpointJob
from core.mqtt import MqttApp, Router
from core.queue.queue_manager import QueueManager, dispatch, set_default_manager
from core.settings import Settings
from core.worker.options import WorkerOptions
from core.worker.worker import Worker

# Stands in for the thermostat's firmware: it answers each command on the command's Response
# Topic, with its Correlation Data (what MqttApp does with a handler's return value).
firmware = Router()


@firmware.on("devices/{device_id}/commands")
async def command(device_id: str, payload: Any) -> dict[str, Any]:
    return {"device": device_id, "setpoint": payload["setpoint"], "ok": True}


async def main(host: str = "127.0.0.1", port: int = 1883, device_id: str = "t-1") -> list[str]:
    # An MQTT 5 broker (Mosquitto): Job.request needs response topics.
    settings = Settings.load(
        env_file=None, queue_connection="memory", mqtt_host=host, mqtt_port=port
    )
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        device = MqttApp(firmware, settings)
        worker = Worker(manager, WorkerOptions(queues=("devices",), handle_signals=False))
        tasks = [asyncio.create_task(device.run()), asyncio.create_task(worker.run())]
        try:
            await device.wait_ready()
            handle = await dispatch(SetSetpointJob(device_id, 21.5))
            reply = await handle.result(timeout=30)
        finally:
            device.stop()
            worker.stop()
            await asyncio.gather(*tasks)
            set_default_manager(None)
    return [f"{device_id} confirmed: {reply}"]


if __name__ == "__main__":  # `.venv/bin/python docs/examples/iot_requests.py` (Mosquitto on 1883)
    print("\n".join(asyncio.run(main())))
