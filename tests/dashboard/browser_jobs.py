"""Jobs the dashboard's browser tests dispatch to a real worker process. They take their cues
from files in a folder the test owns, so the test decides when a job fails, runs or ends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from core.job import Job


class GatedJob(Job):
    """Fails at once while `<folder>/ok` is missing (so it lands in the failed store: one try).
    Once `ok` exists it runs until `<folder>/go` exists, then returns "done <tag>"."""

    max_tries = 1

    def __init__(self, folder: str, tag: str = "") -> None:
        self.folder = folder
        self.tag = tag

    async def handle(self) -> str:
        folder = Path(self.folder)
        if not (folder / "ok").exists():
            raise RuntimeError(f"no ok flag in {folder.name} for {self.tag}")
        # A file offers no event to await: look every 20 ms, bounded so a lost test never
        # leaves the job running for good.
        deadline = time.monotonic() + 60
        while not (folder / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no go flag within 60 s")
            await asyncio.sleep(0.02)
        return f"done {self.tag}"


class BrokenJob(Job):
    """Always fails, once."""

    max_tries = 1

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    async def handle(self) -> None:
        raise KeyError(f"broken on purpose {self.tag}")
