"""The job docs/mqtt.md ("Publishing") shows: a job that reports to MQTT."""

from core.job import Job


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
