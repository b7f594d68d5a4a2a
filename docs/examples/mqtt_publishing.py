"""Publishing from jobs and scripts (docs/mqtt.md, "Publishing")."""

from core.job import Job
from core.mqtt import publish


class InstallFirmwareJob(Job):
    def __init__(self, device_id: str, version: str) -> None:
        super().__init__()
        self.device_id = device_id
        self.version = version

    async def handle(self) -> None:
        ...  # the slow part: download, verify, push to the device
        await self.publish(
            f"devices/{self.device_id}/firmware",
            {"status": "installed", "version": self.version},
        )


async def reboot(device_id: str) -> None:
    # The same from a handler, a script or anywhere else in the project:
    await publish(f"devices/{device_id}/commands", {"command": "reboot"}, qos=1)
