"""Payloads refused on every driver: at dispatch nothing is queued; at load the job goes to the
failed store with the reason, and later jobs of the same class still run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import SerializationError, UnloadableJobError
from core.job import Job
from core.queue.drivers.base import OutgoingJob
from core.queue.payload import new_job_id
from core.queue.queue_manager import QueueManager, dispatch
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.jobs import RecordJob, events, record

pytestmark = pytest.mark.timeout(60)


class ReadOnlyTimeoutJob(Job):
    """Its `timeout` is a read-only property, so no payload can set it."""

    @property
    def timeout(self) -> float:  # type: ignore[override]
        return 5.0

    async def handle(self) -> None:
        pass


class SettingsJob(Job):
    """Chooses its queue and limits per instance, in `__init__`; records what it ran with."""

    def __init__(self, log: str, queue: str) -> None:
        self.log = log
        self.queue = queue
        self.timeout = 7
        self.max_tries = 4
        self.retry_after = [0.5, 1]

    async def handle(self) -> None:
        record(
            self.log,
            event="run",
            queue=self.queue,
            limits=[self.timeout, self.max_tries, self.retry_after],
            data=self.data(),
        )


@pytest.fixture
def log(tmp_path: Path) -> str:
    return str(tmp_path / "events.jsonl")


async def work(manager: QueueManager, max_jobs: int, queue: str | None = None) -> None:
    options = WorkerOptions(
        queues=(queue or manager.settings.queue_default,), sleep=0.05, max_jobs=max_jobs
    )
    await Worker(manager, options).run()


def raw(job: str, data: dict[str, Any], **fields: Any) -> bytes:
    return orjson.dumps({"job": job, "data": data, "max_tries": 3, "timeout": 60, **fields})


async def test_data_named_like_a_method_is_refused_and_nothing_is_queued(
    manager: QueueManager, log: str
) -> None:
    shadowing = RecordJob(log, 1)
    shadowing.failed = "not a method"  # type: ignore[assignment,method-assign]
    with pytest.raises(SerializationError, match=r"'failed' is a method of Job"):
        await manager.push(shadowing)
    with pytest.raises(SerializationError, match=r"'failed' is a method of Job"):
        await dispatch(shadowing)
    with pytest.raises(SerializationError, match=r"'failed' is a method of Job"):
        await manager.bulk([RecordJob(log, 0), shadowing, RecordJob(log, 2)])
    assert await manager.size() == 0


async def test_a_class_no_worker_can_load_is_refused_and_nothing_is_queued(
    manager: QueueManager, log: str
) -> None:
    class LocalJob(Job):
        async def handle(self) -> None:
            record(log, event="run")

    with pytest.raises(UnloadableJobError, match="inside a function"):
        await manager.push(LocalJob())
    stray = type("Stray", (Job,), {"__module__": "__main__"})
    with pytest.raises(UnloadableJobError, match=r"defined in __main__.*app/jobs/stray\.py"):
        await dispatch(stray())
    assert await manager.size() == 0


async def test_settings_set_on_the_instance_travel_as_settings(
    manager: QueueManager, log: str
) -> None:
    queue = f"{manager.settings.queue_default}-urgent"
    await manager.push(SettingsJob(log, queue))
    assert await manager.size(queue) == 1 and await manager.size() == 0
    await work(manager, max_jobs=1, queue=queue)
    [run] = events(log, "run")
    assert run["queue"] == queue
    assert run["limits"] == [7, 4, [0.5, 1]]
    assert run["data"] == {"log": log}


async def test_load_refusals_go_to_the_failed_store_and_the_class_keeps_running(
    manager: QueueManager, log: str
) -> None:
    """The reported defect: a payload setting `handle` poisoned RecordJob for later jobs."""
    driver = await manager.connection()
    name = manager.settings.queue_default
    record_job = "tests.jobs:RecordJob"
    data = {"log": log, "n": 0, "data_": {}}
    bad = {
        "handle": raw(record_job, {**data, "handle": "x"}),
        "private": raw(record_job, {**data, "_log": "x"}),
        "timeout": raw(record_job, data, timeout="abc"),
        "max_tries": raw(record_job, data, max_tries=0),
        "property": raw(f"{__name__}:ReadOnlyTimeoutJob", {}, timeout=5),
    }
    ids = {reason: new_job_id() for reason in bad}
    await driver.push([OutgoingJob(ids[r], name, payload) for r, payload in bad.items()])
    for n in (1, 2):
        await manager.push(RecordJob(log, n))
    await work(manager, max_jobs=len(bad) + 2)

    assert [e["n"] for e in events(log, "run")] == [1, 2]
    store = await manager.failed_store()
    reasons = {}
    for reason, job_id in ids.items():
        failed = await store.get(job_id)
        assert failed is not None, reason
        reasons[reason] = failed.exception
    assert "'handle' is a method of RecordJob" in reasons["handle"]
    assert "'_log' is a private name" in reasons["private"]
    assert "timeout must be a number of seconds" in reasons["timeout"]
    assert "max_tries must be at least 1" in reasons["max_tries"]
    assert "ReadOnlyTimeoutJob.timeout is a property" in reasons["property"]
    assert all("PayloadError" in text for text in reasons.values())
    assert await manager.size() == 0
