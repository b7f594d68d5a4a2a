"""The app and jobs of the offline spool tests (tests/test_iot_spool*.py).

`python main.py serve --app tests.iot_spool_apps:router`: each message `{"n": N}` on
`topiq-test/<run>/in` dispatches one `RecordedRun(path, n)`, which appends `n` to `path` when it
runs: a job run twice leaves two lines. SPOOL_TEST_JOB_IDS=1 gives each job the id
`<run>-<n>` (with `on_duplicate="keep"`), so a message the broker sends again after a crash does
not make a second job; otherwise each dispatch gets a new id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.job import Job
from core.mqtt import Router
from core.queue.queue_manager import dispatch


class RecordedRun(Job):
    """Appends its `n` to `path` (one line per run; O_APPEND writes of a line are atomic)."""

    on_duplicate = "keep"

    def __init__(self, path: str, n: int) -> None:
        super().__init__()
        self.path = path
        self.n = n

    async def handle(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.n}\n".encode())
        finally:
            os.close(fd)


def runs(path: Path) -> list[int]:
    """The `n` of every run recorded in `path`, repeats kept."""
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


router = Router()


@router.on("topiq-test/{run}/in", qos=1)
async def reading(run: str, payload: Any) -> None:
    n = int(payload["n"])
    job = RecordedRun(os.environ["SPOOL_TEST_RUNS"], n)
    if os.environ.get("SPOOL_TEST_JOB_IDS") == "1":
        await dispatch(job, job_id=f"{run}-{n}")
    else:
        await dispatch(job)
