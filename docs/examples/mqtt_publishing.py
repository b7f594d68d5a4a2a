"""Publishing from scripts and handlers (docs/mqtt.md, "Publishing"); the job it goes with is
app/jobs/install_firmware_job.py."""

from core.mqtt import publish


async def reboot(device_id: str) -> None:
    # The same from a handler, a script or anywhere else in the project:
    await publish(f"devices/{device_id}/commands", {"command": "reboot"}, qos=1)
