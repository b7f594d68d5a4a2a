"""The user-facing side of workflows (issue #13): job settings for priorities and limits,
`depends_on`, chains and batches with their handles, `queue:job` on them, the `sync`
connection and `queue.fake()`.

Most tests run on every driver (the `manager` fixture over `backend`); jobs run in an in-process
`Worker` where the test is about what running them does, and the driver plays the worker
(`reserve`/`ack`) where the test needs one exact step. The drivers' own rules (release, cascade,
GCRA, order) are the conformance suite's (tests/conformance/test_workflow_*.py); processes are
in tests/test_workflow_processes.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pickle
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import orjson
import pytest

from core.cli import build_parser
from core.commands import jobs as job_commands
from core.commands._common import Connection, guarded
from core.errors import (
    DuplicateJobError,
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    SerializationError,
)
from core.hooks import hooks
from core.job import Job, job
from core.queue.drivers.base import MAX_PRIORITY, Dependency, Limit, OutgoingJob, Pushed
from core.queue.handle import JobHandle
from core.queue.payload import JobLoader
from core.queue.queue_manager import (
    QueueManager,
    WorkflowHandle,
    batch,
    chain,
    dispatch,
    queue,
    set_default_manager,
)
from core.status import Progress, Status
from core.testing import fake_queue
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from core.workflows import Batch, Chain, Planner
from tests.conftest import make_settings

pytestmark = pytest.mark.timeout(60)

#: What the jobs below did, in order (jobs run in this process).
RUNS: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_runs() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


class Step(Job):
    """Records its name; fails when told to."""

    max_tries = 1

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail

    async def handle(self) -> str:
        RUNS.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return self.name


class Limited(Job):
    rate_limit = "100/minute"
    burst = 5
    concurrency_limit = 2
    limit_key = "api:{customer_id}"

    def __init__(self, customer_id: int) -> None:
        self.customer_id = customer_id

    async def handle(self) -> None:
        RUNS.append(f"limited {self.customer_id}")


class QueueLimited(Job):
    rate_limit = "10/30s"

    async def handle(self) -> None:
        RUNS.append("queue limited")


class Urgent(Step):
    priority = 7


@job(priority=3, rate_limit="5/second", limit_key="fn:{args[0]}")
async def limited_fn(device: str) -> str:
    RUNS.append(f"fn {device}")
    return device


async def work(manager: QueueManager, until: JobHandle, *queues: str) -> None:
    """Run an in-process worker until `until` has ended (however)."""
    names = queues or (manager.settings.queue_default,)
    worker = Worker(
        manager,
        WorkerOptions(queues=names, sleep=0.05, handle_signals=False, grace=5),
    )
    task = asyncio.create_task(worker.run())
    try:
        with contextlib.suppress(JobFailedError):
            await until.result(timeout=30)
    finally:
        worker.stop()
        await task


def outgoing(manager: QueueManager, job: Job, **options: Any) -> OutgoingJob:
    """What a dispatch of `job` would hand the driver."""
    return manager._outgoing(job, "q", 0.0, **options)


# -- job settings -----------------------------------------------------------------------------


BAD_SETTINGS = [
    ("priority", True, "priority must be a whole number"),
    ("priority", 1.5, "priority must be a whole number"),
    ("priority", MAX_PRIORITY + 1, "priority must be a whole number"),
    ("rate_limit", "100/fortnight", "rate_limit must be starts per period"),
    ("rate_limit", "0/second", "rate_limit must be starts per period"),
    ("rate_limit", 100, "rate_limit must be starts per period"),
    ("rate_limit", "5/0s", "rate_limit must be starts per period"),
    ("burst", 0, "burst must be a whole number of at least 1"),
    ("burst", True, "burst must be a whole number of at least 1"),
    ("concurrency_limit", -1, "concurrency_limit must be None or a whole number"),
    ("concurrency_limit", "2", "concurrency_limit must be None or a whole number"),
    ("limit_key", 5, "limit_key must be a string template"),
    ("limit_key", "api:{", "limit_key 'api:{' is not a template"),
    ("limit_key", "api:{}", "each {...} must name a data attribute"),
    ("limit_key", "x" * 191, "limit_key must be at most 190 characters"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
async def test_a_bad_setting_is_refused_at_dispatch_naming_it(
    name: str, value: Any, message: str
) -> None:
    with fake_queue(make_settings()) as fake:
        job = Step("x")
        setattr(job, name, value)
        if name in ("limit_key", "burst"):
            job.concurrency_limit = 1  # a key or burst counts only with a limit
        with pytest.raises(SerializationError, match=rf"Step\.{name}") as caught:
            await dispatch(job)
        assert message in str(caught.value)
        fake.assert_nothing_dispatched()


@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS[:4])
def test_job_decorator_refuses_a_bad_setting_naming_it(name: str, value: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=name) as caught:

        @job(**{name: value})
        async def broken() -> None: ...

    assert message in str(caught.value)


async def test_options_take_the_new_settings_and_check_them() -> None:
    with fake_queue(make_settings()) as fake:
        await limited_fn.options(priority=9, concurrency_limit=1).dispatch("d1")
        [sent] = fake.matching(limited_fn)
        assert sent.job.priority == 9
        with pytest.raises(SerializationError, match=r"limited_fn\.priority"):
            await limited_fn.options(priority="high").dispatch("d1")
    with pytest.raises(TypeError, match="unknown option"):
        limited_fn.options(prio=1)


async def test_options_pass_dependencies_to_the_push(manager: QueueManager) -> None:
    first = await manager.push(Step("first"))
    handle = await limited_fn.options(depends_on=first, allow_dependency_failure=True).dispatch("d")
    assert (await handle.status()).waiting_for == (first.id,)


def test_settings_reach_the_driver_as_priority_and_limit() -> None:
    manager = QueueManager(make_settings())
    plain = outgoing(manager, Step("a"))
    assert plain.priority == 0 and plain.limit is None and plain.depends_on == ()
    assert outgoing(manager, Urgent("b")).priority == 7
    assert outgoing(manager, Urgent("b"), priority=-2).priority == -2
    assert outgoing(manager, Limited(42)).limit == Limit("api:42", 100, 60.0, 5, 2)
    assert outgoing(manager, Limited(43)).limit == Limit("api:43", 100, 60.0, 5, 2)
    # No key: the queue's one limit; "N/<duration>" periods.
    assert outgoing(manager, QueueLimited()).limit == Limit("", 10, 30.0, 1, 0)
    fn = outgoing(manager, limited_fn.make("dev-7"))
    assert fn.priority == 3 and fn.limit == Limit("fn:dev-7", 5, 1.0, 1, 0)
    job = Step("c")
    job.rate_limit = "3/2 minutes"
    assert outgoing(manager, job).limit == Limit("", 3, 120.0, 1, 0)
    job.concurrency_limit = 0
    job.rate_limit = None
    job.limit_key = "ignored:{name}"  # no limit: the key is not used
    assert outgoing(manager, job).limit is None


@pytest.mark.parametrize(
    ("text", "rate", "period"),
    [
        ("100/minute", 100, 60.0),
        ("5/second", 5, 1.0),
        ("5/s", 5, 1.0),
        ("7/sec", 7, 1.0),
        ("2/hours", 2, 3600.0),
        ("1/d", 1, 86400.0),
        ("10/30s", 10, 30.0),
        ("3/2 minutes", 3, 120.0),
        (" 4 / min ", 4, 60.0),
    ],
)
def test_rate_limit_forms(text: str, rate: int, period: float) -> None:
    job = QueueLimited()
    job.rate_limit = text
    limit = outgoing(QueueManager(make_settings()), job).limit
    assert limit is not None and (limit.rate, limit.period) == (rate, period)


def test_a_limit_key_naming_missing_data_is_refused_naming_the_name() -> None:
    manager = QueueManager(make_settings())
    job = Limited(1)
    job.limit_key = "api:{tenant}"
    with pytest.raises(SerializationError, match=r"Limited\.limit_key 'api:\{tenant\}' names "):
        outgoing(manager, job)
    job.limit_key = "api:{customer_id}"
    job.customer_id = "x" * 200  # type: ignore[assignment]
    with pytest.raises(SerializationError, match=r"Limited\.limit_key must be at most 190"):
        outgoing(manager, job)


def test_push_priority_is_checked_naming_push() -> None:
    manager = QueueManager(make_settings())
    for bad in (True, "1", 2**31):
        with pytest.raises(SerializationError, match=r"push\(priority=\.\.\.\)"):
            outgoing(manager, Step("a"), priority=bad)


class Alarm(Job):
    """A job of an earlier release whose data used names that are settings now."""

    max_tries = 1

    def __init__(self, device: str) -> None:
        self.device = device

    async def handle(self) -> str:
        level = self.__dict__.get("priority")
        RUNS.append(f"alarm {self.device} {level} {self.__dict__.get('burst')}")
        return f"{self.device}:{level}"


async def test_a_stored_payload_whose_data_uses_a_new_setting_name_still_runs(
    manager: QueueManager,
) -> None:
    """Upgrading: a job queued by a release before these settings existed, whose data has
    `priority: "high"` (and `burst`, a list of readings), loads and runs on a new worker; only
    dispatching it anew refuses the value, naming the setting."""
    out = outgoing(manager, Alarm("pump"))
    envelope = orjson.loads(out.payload)
    envelope["data"].update(priority="high", burst=[1, 2, 3])
    old = dataclasses.replace(
        out, queue=manager.settings.queue_default, payload=orjson.dumps(envelope)
    )
    driver = await manager.connection()
    await driver.push([old])
    handle = manager.job(old.id, queue=old.queue)
    await work(manager, handle)
    assert RUNS == ["alarm pump high [1, 2, 3]"]
    assert await handle.result(timeout=5) == "pump:high"
    loaded = JobLoader(["tests."]).load(old.payload, job_id=old.id, attempts=1).job
    with pytest.raises(SerializationError, match=r"Alarm\.priority must be a whole number"):
        await manager.push(loaded)


# -- priority and depends_on through the manager ------------------------------------------------


async def test_priority_is_the_jobs_and_push_overrides_it(manager: QueueManager) -> None:
    lower = await manager.push(Urgent("l"), priority=-5)
    urgent = await manager.push(Urgent("u"))
    assert (await urgent.status()).priority == 7
    assert (await lower.status()).priority == -5
    driver = await manager.connection()
    held = await driver.reserve([manager.settings.queue_default], 2, 30)
    assert [h.id for h in held] == [urgent, lower]


async def test_a_dependent_is_deferred_then_runs_after_its_dependency(
    manager: QueueManager,
) -> None:
    first = await manager.push(Step("first"))
    second = await manager.push(Step("second"), depends_on=first)
    record = await second.status()
    assert record.status is Status.DEFERRED and record.waiting_for == (first.id,)
    assert record.due_at is None
    stats = (await manager.stats(manager.settings.queue_default))[0]
    assert stats.deferred == 1 and stats.pending == 1
    await work(manager, second)
    assert RUNS == ["first", "second"]
    assert (await second.status()).status is Status.SUCCEEDED


async def test_depends_on_takes_ids_handles_and_lists(manager: QueueManager) -> None:
    a = await manager.push(Step("a"))
    b = await manager.push(Step("b"))
    by_id = await manager.push(Step("c"), depends_on=a.id)
    by_list = await manager.push(Step("d"), depends_on=[a, b.id, a])  # repeats count once
    empty = await manager.push(Step("e"), depends_on=[])
    assert (await by_id.status()).waiting_for == (a.id,)
    assert (await by_list.status()).waiting_for == (a.id, b.id)
    assert (await empty.status()).status is Status.QUEUED


async def test_a_failed_dependency_cancels_unless_failure_is_allowed(
    manager: QueueManager,
) -> None:
    broken = await manager.push(Step("broken", fail=True))
    strict = await manager.push(Step("strict"), depends_on=broken)
    lenient = await manager.push(Step("lenient"), depends_on=broken, allow_dependency_failure=True)
    await work(manager, lenient)
    assert RUNS == ["broken", "lenient"]
    record = await strict.status()
    assert record.status is Status.CANCELLED
    assert record.error == f"dependency {broken.id} failed"
    with pytest.raises(JobCancelledError, match=f"dependency {broken.id} failed"):
        await strict.result(timeout=1)


async def test_an_unknown_dependency_raises_and_stores_nothing(manager: QueueManager) -> None:
    with pytest.raises(JobNotFoundError, match="depends on unknown job no-such-job"):
        await manager.push(Step("orphan"), depends_on=["no-such-job"])
    with pytest.raises(JobNotFoundError, match="depends on unknown job no-such-job"):
        await manager.bulk([Step("a"), Step("b")], depends_on="no-such-job")
    assert await manager.size() == 0
    assert RUNS == []


async def test_bulk_and_later_pass_dependencies_on(manager: QueueManager) -> None:
    root = await manager.push(Step("root"))
    handles = await manager.bulk([Step("x"), Step("y")], depends_on=root, priority=4)
    later = await manager.later(0.01, Step("z"), depends_on=[root])
    for handle in (*handles, later):
        record = await handle.status()
        assert record.status is Status.DEFERRED and record.waiting_for == (root.id,)
    assert (await handles[0].status()).priority == 4
    await work(manager, later)
    assert RUNS[0] == "root" and sorted(RUNS[1:]) == ["x", "y", "z"]


async def test_bad_depends_on_values_are_refused(manager: QueueManager) -> None:
    for bad, message in (
        (42, "depends_on takes a job handle, a job id, or a list"),
        ([42], "depends_on takes job handles or job ids, got int"),
        (["has space"], "depends_on must be 1 to 190"),
    ):
        with pytest.raises(SerializationError, match=message):
            await manager.push(Step("a"), depends_on=bad)  # type: ignore[arg-type]
    other = JobHandle("abc", "q", "sync")
    with pytest.raises(SerializationError, match="only wait for jobs of its own connection"):
        await manager.push(Step("a"), depends_on=other)
    with pytest.raises(SerializationError, match="allow_dependency_failure must be True or"):
        await manager.push(Step("a"), allow_dependency_failure="yes")  # type: ignore[arg-type]
    assert await manager.size() == 0


async def test_a_handle_passes_its_queue_to_the_driver(manager: QueueManager) -> None:
    driver = await manager.connection()
    seen: list[OutgoingJob] = []
    original = driver.push

    async def spy(jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        seen.extend(jobs)
        return await original(jobs)

    driver.push = spy  # type: ignore[method-assign]
    first = await manager.push(Step("a"), queue="elsewhere")
    await manager.push(Step("b"), depends_on=[first, first.id + ""])
    assert seen[-1].depends_on == (Dependency(first.id, "elsewhere"),)
    assert seen[-1].rule == "succeeded"


async def test_a_released_job_is_not_dispatched_twice(manager: QueueManager) -> None:
    dispatched: list[str] = []
    hooks.on_dispatch(lambda job, job_id: dispatched.append(job_id))
    try:
        first = await manager.push(Step("a"))
        second = await manager.push(Step("b"), depends_on=first)
        await work(manager, second)
    finally:
        hooks.clear()
    assert dispatched == [first, second]


async def test_a_jobs_limit_reaches_the_driver_per_key(manager: QueueManager) -> None:
    """Two jobs of one key with `concurrency_limit=1` and one of another key: the second of
    the first key is held back (still queued, no try spent) until the first ends."""
    first, second, other = Limited(1), Limited(1), Limited(2)
    for limited in (first, second, other):
        limited.concurrency_limit = 1
    handles = [await manager.push(limited) for limited in (first, second, other)]
    driver = await manager.connection()
    held = await driver.reserve([manager.settings.queue_default], 10, 30, worker="w")
    assert sorted(h.id for h in held) == sorted([handles[0], handles[2]])
    waiting = await handles[1].status()
    assert waiting.status is Status.QUEUED and waiting.attempts == 0
    held_first = next(h for h in held if h.id == handles[0])
    again = await driver.reserve([manager.settings.queue_default], 10, 30, [held_first])
    assert [h.id for h in again] == [handles[1]]


async def test_a_job_can_wait_for_a_whole_workflow(manager: QueueManager) -> None:
    flow = await batch([Step("1"), Step("2")]).dispatch()
    after = await manager.push(Step("after"), depends_on=flow)
    assert (await after.status()).waiting_for == (flow.id,)
    await work(manager, after)
    assert sorted(RUNS[:2]) == ["1", "2"] and RUNS[2] == "after"


# -- chains and batches ------------------------------------------------------------------------


async def test_a_chain_is_one_push_and_runs_in_order(manager: QueueManager) -> None:
    driver = await manager.connection()
    calls: list[list[OutgoingJob]] = []
    original = driver.push

    async def spy(jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        calls.append(list(jobs))
        return await original(jobs)

    driver.push = spy  # type: ignore[method-assign]
    flow = await chain(Step("a"), Step("b"), Step("c"), finally_=Step("done")).dispatch()
    assert len(calls) == 1
    [sent] = calls
    assert [o.kind for o in sent] == ["job", "job", "job", "chain", "job"]
    assert sent[1].depends_on == (Dependency(sent[0].id, sent[0].queue),)
    assert sent[3].depends_on == tuple(Dependency(o.id, o.queue) for o in sent[:3])
    assert (sent[3].rule, sent[4].rule) == ("ended", "ended")
    assert isinstance(flow, WorkflowHandle) and flow.kind == "chain" and flow.id == sent[3].id
    assert [h.id for h in flow.jobs] == [o.id for o in sent[:3]]
    assert flow.finally_job == sent[4].id and flow.catch_job is None
    record = await flow.status()
    assert record.kind == "chain" and record.status is Status.DEFERRED
    assert record.progress == Progress(total=3, pending=3)
    assert [str(await h.status()) for h in flow.jobs] == ["queued", "deferred", "deferred"]
    await work(manager, flow.finally_job)
    assert RUNS == ["a", "b", "c", "done"]
    assert await flow.result(timeout=5) is None
    assert await flow.progress() == Progress(total=3, pending=0, succeeded=3)
    assert [await h.result() for h in flow.jobs] == ["a", "b", "c"]


async def test_a_failure_stops_the_chain_and_runs_catch_and_finally(
    manager: QueueManager,
) -> None:
    flow = await chain(
        Step("a"), Step("b", fail=True), Step("c"), catch=Step("catch"), finally_=Step("fin")
    ).dispatch()
    assert flow.finally_job is not None
    await work(manager, flow.finally_job)
    assert RUNS == ["a", "b", "catch", "fin"]
    c = await flow.jobs[2].status()
    assert c.status is Status.CANCELLED and c.error == f"dependency {flow.jobs[1].id} failed"
    assert await flow.progress() == Progress(total=3, pending=0, succeeded=1, failed=1, cancelled=1)
    with pytest.raises(JobFailedError, match="1 of 3 members failed") as caught:
        await flow.result(timeout=5)
    assert not isinstance(caught.value, JobCancelledError)
    assert f"chain {flow.id!r}" in str(caught.value)


async def test_a_batch_runs_then_catch_finally_by_how_it_ended(manager: QueueManager) -> None:
    good = await batch(
        [Step("1"), Step("2")],
        then=Step("then"),
        catch=Step("catch"),
        finally_=Step("fin"),
        name="nightly import",
    ).dispatch()
    assert good.finally_job is not None and good.then_job is not None
    assert good.catch_job is not None
    await work(manager, good.finally_job)
    assert sorted(RUNS) == ["1", "2", "fin", "then"]
    record = await good.status()
    assert record.kind == "batch" and record.job == "nightly import"
    assert record.status is Status.SUCCEEDED
    assert (await good.catch_job.status()).error == "no dependency failed"

    RUNS.clear()
    tolerant = await batch(
        [Step("x", fail=True), Step("y")],
        then=Step("then"),
        catch=Step("catch"),
        finally_=Step("fin"),
        allow_failures=True,
    ).dispatch()
    assert tolerant.finally_job is not None and tolerant.then_job is not None
    await work(manager, tolerant.finally_job)
    assert sorted(RUNS) == ["catch", "fin", "x", "y"]
    assert await tolerant.progress() == Progress(total=2, pending=0, succeeded=1, failed=1)
    assert (await tolerant.then_job.status()).status is Status.CANCELLED
    with pytest.raises(JobFailedError, match="1 of 2 members failed"):
        await tolerant.result(timeout=5)


async def test_cancelling_a_batch_cancels_its_waiting_members(manager: QueueManager) -> None:
    flow = await batch([Step("1"), Step("2"), Step("3")], finally_=Step("fin")).dispatch()
    assert await flow.cancel() is True
    assert flow.finally_job is not None
    await work(manager, flow.finally_job)
    assert RUNS == ["fin"]
    assert await flow.progress() == Progress(total=3, pending=0, cancelled=3)
    with pytest.raises(JobCancelledError, match="3 of 3 members cancelled"):
        await flow.result(timeout=5)
    assert await flow.cancel() is False


async def test_nested_workflows(manager: QueueManager) -> None:
    flow = await chain(Step("a"), batch([Step("b1"), Step("b2")]), Step("c")).dispatch()
    inner = flow.jobs[1]
    assert isinstance(inner, WorkflowHandle) and inner.kind == "batch" and len(inner.jobs) == 2
    await work(manager, flow)
    assert RUNS[0] == "a" and sorted(RUNS[1:3]) == ["b1", "b2"] and RUNS[3] == "c"
    assert await flow.progress() == Progress(total=3, pending=0, succeeded=3)


async def test_callbacks_may_be_workflows_too(manager: QueueManager) -> None:
    flow = await batch(
        [Step("1")], then=chain(Step("t1"), Step("t2")), finally_=batch([Step("f")])
    ).dispatch()
    assert isinstance(flow.then_job, WorkflowHandle) and flow.then_job.kind == "chain"
    assert isinstance(flow.finally_job, WorkflowHandle)
    await work(manager, flow.finally_job)
    await work(manager, flow.then_job)
    assert RUNS[0] == "1" and sorted(RUNS[1:]) == ["f", "t1", "t2"]
    assert RUNS.index("t1") < RUNS.index("t2")


async def test_members_keep_their_own_queues_and_priorities(manager: QueueManager) -> None:
    flow = await chain(Urgent("a"), Step("b"), connection=manager.connection_name()).dispatch()
    moved = Step("c")
    moved.queue = "other"
    second = await batch([moved, Step("d")]).dispatch()
    assert (await flow.jobs[0].status()).priority == 7
    assert flow.queue == (await flow.jobs[0].status()).queue
    assert (await second.jobs[0].status()).queue == "other"
    assert second.queue == "other"  # the record lives with the first member


async def test_a_duplicate_member_stores_nothing_that_runs(manager: QueueManager) -> None:
    await manager.push(Step("holder"), job_id="taken")
    clash = Step("b")
    clash.job_id = "taken"
    with pytest.raises(DuplicateJobError, match="chain not dispatched: job id 'taken'") as caught:
        await chain(Step("a"), clash, Step("c")).dispatch()
    assert caught.value.existing == "taken"
    assert str(caught.value).endswith("its 2 other jobs were stored and are cancelled")
    stats = (await manager.stats(manager.settings.queue_default))[0]
    assert (stats.pending, stats.deferred) == (1, 0)  # the holder alone waits
    holder = manager.job("taken")
    await work(manager, holder)
    assert RUNS == ["holder"]


async def test_a_job_kept_twice_in_a_workflow_counts_once(manager: QueueManager) -> None:
    """Two members that keep one waiting job (`job_id`, `on_duplicate="keep"`) are that one
    job: the record waits for it once and ends succeeded 1/1 (not 1 of 2, one pending)."""
    holder = await manager.push(Step("holder"), job_id="kept")
    members = [Step("a"), Step("b")]
    for member in members:
        member.job_id = "kept"
        member.on_duplicate = "keep"
    record = Planner(manager, batch(members)).steps[-1].outgoing  # what the driver gets
    assert record.kind == "batch" and [d.id for d in record.depends_on] == ["kept"]
    twice = (Dependency("x"), Dependency("x", "q"))
    assert outgoing(manager, Step("c"), depends_on=twice).depends_on == (Dependency("x"),)
    flow = await batch(members).dispatch()
    assert (await flow.progress()).total == 1
    await work(manager, flow)
    assert RUNS == ["holder"]
    assert (await holder.status()).status is Status.SUCCEEDED
    assert (await flow.status()).status is Status.SUCCEEDED
    assert await flow.progress() == Progress(total=1, pending=0, succeeded=1)


async def test_workflow_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="chain\\(\\) needs at least one job"):
        chain()
    with pytest.raises(TypeError, match="batch\\(\\) takes its jobs as a list"):
        batch(Step("a"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"give a call of it, `limited_fn\.make"):
        chain(limited_fn)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a Job instance, a chain or a batch, got str"):
        batch(["a"])  # type: ignore[list-item]
    same = Step("a")
    with pytest.raises(ValueError, match="the same Step object appears twice"):
        chain(same, Step("b"), catch=same)
    with pytest.raises(TypeError, match="allow_failures= must be True or False"):
        batch([Step("a")], allow_failures=1)  # type: ignore[arg-type]
    assert isinstance(chain(Step("a")), Chain) and isinstance(batch([Step("a")]), Batch)
    for bad in ("x\x1b[31mRED\x1b[0m", "line\nfake row", "a\x00b", "x" * 191):
        with pytest.raises(ValueError, match=r"batch\(\) name= must be a string of at most 190 "):
            batch([Step("a")], name=bad)
    with pytest.raises(ValueError, match=r"chain\(\) name= .* without control characters"):
        chain(Step("a"), name="tab\there")
    assert batch([Step("a")], name="ünï " + "x" * 185).name.endswith("x")
    elsewhere = Step("b")
    elsewhere.connection = "sync"
    async with QueueManager(make_settings(queue_connection="memory")) as manager:
        with pytest.raises(SerializationError, match="all jobs of a workflow live on one"):
            await chain(Step("a"), elsewhere).dispatch(manager)
        assert await manager.size() == 0


async def test_a_workflow_handle_survives_pickling_and_queue_job(manager: QueueManager) -> None:
    flow = await batch([Step("1")], then=Step("t")).dispatch()
    copy = pickle.loads(pickle.dumps(flow))
    assert isinstance(copy, WorkflowHandle) and copy == flow and copy.kind == "batch"
    assert copy.jobs == flow.jobs and copy.then_job == flow.then_job
    rebuilt = manager.job(flow.id)
    assert (await rebuilt.status()).kind == "batch"
    assert (await copy.progress()).total == 1


# -- queue:job --------------------------------------------------------------------------------


async def run_command(
    capsys: pytest.CaptureFixture[str], manager: QueueManager, *argv: str
) -> tuple[int, str]:
    name = argv[0]
    args: argparse.Namespace = build_parser(name).parse_args(list(argv))
    conn = Connection(manager, manager.connection_name(), await manager.connection())
    handler = job_commands.show_job if name == "queue:job" else job_commands.cancel_job
    capsys.readouterr()
    code = await guarded(handler(args, conn))
    return code, capsys.readouterr().out


async def test_queue_job_shows_a_workflows_progress_and_what_a_job_waits_for(
    manager: QueueManager, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = await chain(Step("a", fail=True), Step("b"), Step("c")).dispatch()
    code, out = await run_command(capsys, manager, "queue:job", flow.jobs[1].id)
    assert code == 0 and "waiting for" in out and flow.jobs[0].id in out
    code, out = await run_command(capsys, manager, "queue:job", flow.id, "--json")
    data = json.loads(out)
    assert data["kind"] == "chain" and data["status"] == "deferred"
    assert data["progress"] == {
        "total": 3,
        "pending": 3,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert data["waiting_for"] == [] and data["priority"] == 0
    await work(manager, flow)
    code, out = await run_command(capsys, manager, "queue:job", flow.id)
    assert code == 0
    assert "chain" in out.lower() and "0/3 done" not in out
    assert "3/3 done: 0 succeeded, 1 failed, 2 cancelled, 0 pending" in out
    code, out = await run_command(capsys, manager, "queue:job", flow.jobs[2].id, "--json")
    assert json.loads(out)["waiting_for"] == []


async def test_queue_cancel_of_a_workflow_cancels_its_members(
    manager: QueueManager, capsys: pytest.CaptureFixture[str]
) -> None:
    flow = await batch([Step("1"), Step("2")]).dispatch()
    code, out = await run_command(capsys, manager, "queue:cancel", flow.id)
    assert code == 0 and f"Cancelled batch {flow.id}: its members that had not ended" in out
    for member in flow.jobs:
        assert (await member.status()).status is Status.CANCELLED
    with pytest.raises(JobCancelledError, match="2 of 2 members cancelled"):
        await flow.result(timeout=10)


# -- sync and fake ----------------------------------------------------------------------------


@pytest.fixture
async def sync_manager() -> AsyncIterator[QueueManager]:
    async with QueueManager(make_settings(queue_connection="sync")) as manager:
        set_default_manager(manager)
        try:
            yield manager
        finally:
            set_default_manager(None)


async def test_sync_runs_a_chain_member_by_member_and_stops_at_a_failure(
    sync_manager: QueueManager,
) -> None:
    flow = await chain(
        Step("a"), Step("b", fail=True), Step("c"), catch=Step("catch"), finally_=Step("fin")
    ).dispatch()  # a member's failure does not raise: the handle reports it
    assert RUNS == ["a", "b", "catch", "fin"]
    with pytest.raises(JobFailedError, match="1 of 3 members failed"):
        await flow.result()
    assert (await flow.jobs[2].status()).status is Status.CANCELLED


async def test_sync_runs_every_batch_member_then_the_callbacks(
    sync_manager: QueueManager,
) -> None:
    flow = await batch(
        [Step("1", fail=True), Step("2")], then=Step("then"), catch=Step("catch")
    ).dispatch()
    assert RUNS == ["1", "2", "catch"]
    assert await flow.progress() == Progress(total=2, pending=0, succeeded=1, failed=1)
    assert flow.then_job is not None
    assert (await flow.then_job.status()).status is Status.CANCELLED


async def test_sync_depends_on_follows_the_dependencies_records(
    sync_manager: QueueManager,
) -> None:
    ok = await dispatch(Step("ok"))
    with pytest.raises(RuntimeError, match="bad broke"):
        await dispatch(Step("bad", fail=True), job_id="bad")
    after_ok = await dispatch(Step("after ok"), depends_on=ok)
    after_bad = await dispatch(Step("after bad"), depends_on=[ok, "bad"])
    either = await dispatch(Step("either"), depends_on=[ok, "bad"], allow_dependency_failure=True)
    assert RUNS == ["ok", "bad", "after ok", "either"]
    assert str(await after_ok.status()) == str(await either.status()) == "succeeded"
    record = await after_bad.status()
    assert record.status is Status.CANCELLED and record.error == "dependency bad failed"


async def test_sync_ignores_limits(sync_manager: QueueManager) -> None:
    for _ in range(3):
        await dispatch(Limited(1))
    await limited_fn.dispatch("d")
    assert RUNS == ["limited 1"] * 3 + ["fn d"]


async def test_the_fake_records_a_workflows_members() -> None:
    with queue.fake(make_settings()) as fake:
        flow = await chain(Step("a"), Step("b"), catch=Step("oops")).dispatch()
        assert isinstance(flow, WorkflowHandle)
        fake.assert_dispatched(Step, 3)
        assert [d.job.name for d in fake.dispatches] == ["a", "b", "oops"]
        assert [d.id for d in fake.dispatches] == [*flow.jobs, flow.catch_job]
        assert str(await flow.jobs[1].status()) == "deferred"
        assert (await flow.status()).kind == "chain"
        assert RUNS == []
