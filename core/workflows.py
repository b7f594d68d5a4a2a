"""Chains and batches: several jobs dispatched together, in one round trip, as one workflow.

    from core.queue.queue_manager import batch, chain

    # Each job runs once the one before it succeeded; a failure stops the chain.
    flow = await chain(Fetch(url), Parse(), Store(), catch=Alert()).dispatch()
    await flow.result(timeout=60)          # None once every member succeeded

    # Members run independently; `then` once all succeeded, `catch` at the first failure,
    # `finally_` once the batch is over, however it ended.
    files = batch([ImportFile(p) for p in paths], then=Report(), finally_=Cleanup())
    imports = await files.dispatch()
    print(await imports.progress())        # Progress(total=..., pending=..., succeeded=...)

A workflow is stored as its members (ordinary jobs, each waiting for what it depends on) plus
a record of kind "chain" or "batch" that never runs: it waits for every member, counts how each
ended (`WorkflowHandle.progress()`), and ends itself when the last member has ended
(`succeeded`, `failed` if a member failed or expired, else `cancelled`). Everything lives in the
queue backend, so a workflow survives any worker's crash. The rules: docs/workflows.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from core.errors import SerializationError
from core.functions import JobFunction
from core.job import Job
from core.queue.drivers.base import Dependency, DependencyRule, JobKind, OutgoingJob
from core.queue.handle import JobHandle
from core.status import Progress

if TYPE_CHECKING:
    from core.queue.queue_manager import QueueManager

__all__ = ["Batch", "Chain", "Workflow", "WorkflowHandle", "batch", "chain"]


class Workflow:
    """What `chain(...)` and `batch(...)` build: jobs to dispatch together. Nothing is stored
    until `await workflow.dispatch()`."""

    kind: ClassVar[JobKind]

    def __init__(
        self,
        members: Iterable[Job | Workflow],
        *,
        then: Job | Workflow | None = None,
        catch: Job | Workflow | None = None,
        finally_: Job | Workflow | None = None,
        name: str = "",
        connection: str | None = None,
    ) -> None:
        what = f"{self.kind}()"
        if isinstance(members, Job | Workflow | JobFunction | str | bytes):
            raise TypeError(f"{what} takes its jobs as a list, got a single {_type(members)}")
        self.members: tuple[Job | Workflow, ...] = tuple(
            _member(m, f"{what} member {i}") for i, m in enumerate(members)
        )
        if not self.members:
            raise ValueError(f"{what} needs at least one job")
        self.then = None if then is None else _member(then, f"{what} then=")
        self.catch = None if catch is None else _member(catch, f"{what} catch=")
        self.finally_ = None if finally_ is None else _member(finally_, f"{what} finally_=")
        from core.queue.payload import _CONTROL

        if not isinstance(name, str) or len(name) > 190 or _CONTROL.search(name):
            shown = repr(name[:200]) if isinstance(name, str) else _type(name)
            raise ValueError(
                f"{what} name= must be a string of at most 190 characters without control "
                f"characters, got {shown}"
            )
        self.name = name
        if connection is not None and not isinstance(connection, str):
            raise TypeError(f"{what} connection= must be a connection name, got {connection!r}")
        self.connection = connection
        seen: set[int] = set()
        for part in self._parts():
            if id(part) in seen:
                raise ValueError(
                    f"{what}: the same {_type(part)} object appears twice in the workflow; "
                    "make one per step (each step is its own job, with its own id)"
                )
            seen.add(id(part))

    def _parts(self) -> Iterable[Job | Workflow]:
        for part in (*self.members, self.then, self.catch, self.finally_):
            if part is None:
                continue
            yield part
            if isinstance(part, Workflow):
                yield from part._parts()

    def __repr__(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"<{type(self).__name__}{named} of {len(self.members)}>"

    async def dispatch(self, manager: QueueManager | None = None) -> WorkflowHandle:
        """Store the whole workflow in one round trip and return its handle.

        `manager` defaults to the default one (what `dispatch` uses).
        """
        if manager is None:
            from core.queue.queue_manager import queue

            return await queue.push_workflow(self)
        return await manager.push_workflow(self)


class Chain(Workflow):
    """Jobs run one after the other: each once the one before it succeeded (a failure cancels
    the rest). `catch` runs at the first failure, `finally_` once the chain is over."""

    kind = "chain"


class Batch(Workflow):
    """Jobs run independently. `then` runs if all succeeded, `catch` at the first failure,
    `finally_` once all have ended; without `allow_failures` the first failure cancels the
    members still waiting."""

    kind = "batch"

    def __init__(
        self,
        members: Iterable[Job | Workflow],
        *,
        then: Job | Workflow | None = None,
        catch: Job | Workflow | None = None,
        finally_: Job | Workflow | None = None,
        allow_failures: bool = False,
        name: str = "",
        connection: str | None = None,
    ) -> None:
        if type(allow_failures) is not bool:
            raise TypeError(
                f"batch() allow_failures= must be True or False, got {allow_failures!r}"
            )
        self.allow_failures = allow_failures
        super().__init__(
            members, then=then, catch=catch, finally_=finally_, name=name, connection=connection
        )


def chain(
    *jobs: Job | Workflow,
    catch: Job | Workflow | None = None,
    finally_: Job | Workflow | None = None,
    name: str = "",
    connection: str | None = None,
) -> Chain:
    """A chain of jobs: each runs once the previous one succeeded; a failure stops the chain
    (the rest end `cancelled`). `catch` runs once, at the first failure; `finally_` once the
    chain is over, however it ended. Members are `Job` instances (`fn.make(...)` for a `@job`
    function) or nested chains and batches. Dispatch it with `await chain(...).dispatch()`."""
    return Chain(jobs, catch=catch, finally_=finally_, name=name, connection=connection)


def batch(
    jobs: Iterable[Job | Workflow],
    *,
    then: Job | Workflow | None = None,
    catch: Job | Workflow | None = None,
    finally_: Job | Workflow | None = None,
    allow_failures: bool = False,
    name: str = "",
    connection: str | None = None,
) -> Batch:
    """A batch of jobs that run independently. `then` runs if every member succeeded,
    `catch` once, at the first failure, `finally_` once every member has ended. The first
    failure cancels the members still waiting unless `allow_failures`. Dispatch it with
    `await batch([...]).dispatch()`."""
    return Batch(
        jobs,
        then=then,
        catch=catch,
        finally_=finally_,
        allow_failures=allow_failures,
        name=name,
        connection=connection,
    )


def _type(value: Any) -> str:
    return type(value).__name__


def _member(value: Any, where: str) -> Job | Workflow:
    if isinstance(value, Job | Workflow):
        return value
    if isinstance(value, JobFunction):
        name = value.function.__qualname__
        raise TypeError(
            f"{where} is the @job function {name} itself: give a call of it, "
            f"`{name}.make(...)` with the arguments"
        )
    raise TypeError(f"{where} must be a Job instance, a chain or a batch, got {_type(value)}")


# -- handles ------------------------------------------------------------------------------


class WorkflowHandle(JobHandle):
    """The handle of a dispatched chain or batch: its id is the workflow record's.

    Attributes:
        kind: "chain" or "batch".
        jobs: The members' handles, in order (a nested workflow's is a `WorkflowHandle`).
        then_job, catch_job, finally_job: The callbacks' handles, or `None`.

    `await status()` gives the record (`kind`, `progress`), `await progress()` the members
    counted by how they ended, `await result()` waits for the workflow to end: `None` when
    every member succeeded, else `JobFailedError` (a member failed or expired) or
    `JobCancelledError`. `await cancel()` cancels every member that has not ended.
    """

    kind: str
    jobs: tuple[JobHandle, ...]
    then_job: JobHandle | None
    catch_job: JobHandle | None
    finally_job: JobHandle | None

    def __new__(
        cls,
        record_id: str,
        queue: str | None = None,
        connection: str = "",
        manager: QueueManager | None = None,
        *,
        kind: str = "chain",
        jobs: Iterable[JobHandle] = (),
        then_job: JobHandle | None = None,
        catch_job: JobHandle | None = None,
        finally_job: JobHandle | None = None,
    ) -> WorkflowHandle:
        handle = super().__new__(cls, record_id, queue, connection, manager)
        handle.kind = kind
        handle.jobs = tuple(jobs)
        handle.then_job = then_job
        handle.catch_job = catch_job
        handle.finally_job = finally_job
        return handle

    def __repr__(self) -> str:
        return (
            f"WorkflowHandle({self.id!r}, kind={self.kind!r}, jobs={len(self.jobs)}, "
            f"queue={self.queue!r}, connection={self.connection!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                self.id,
                self.queue,
                self.connection,
                self.kind,
                self.jobs,
                self.then_job,
                self.catch_job,
                self.finally_job,
            ),
        )

    async def progress(self) -> Progress:
        """The members counted by how they ended (from the workflow's record)."""
        record = await self.status()
        if record.progress is not None:
            return record.progress
        total = len(self.jobs)  # a driver that keeps no count: nothing is known to have ended
        return Progress(total=total, pending=total)


def _rebuild(
    record_id: str,
    queue: str | None,
    connection: str,
    kind: str,
    jobs: tuple[JobHandle, ...],
    then_job: JobHandle | None,
    catch_job: JobHandle | None,
    finally_job: JobHandle | None,
) -> WorkflowHandle:
    return WorkflowHandle(
        record_id,
        queue,
        connection,
        kind=kind,
        jobs=jobs,
        then_job=then_job,
        catch_job=catch_job,
        finally_job=finally_job,
    )


# -- turning a workflow into the jobs one push stores ---------------------------------------


@dataclass(slots=True)
class Step:
    """One entry of the push: a job (`job` set) or a workflow record (`job` None)."""

    job: Job | None
    outgoing: OutgoingJob


@dataclass(slots=True)
class Node:
    """Where a workflow part's handle comes from: its step, and for a workflow its parts."""

    step: int
    kind: str = "job"
    members: list[Node] = field(default_factory=list)
    then: Node | None = None
    catch: Node | None = None
    finally_: Node | None = None


class Planner:
    """Builds the steps of one workflow dispatch: dependencies before their dependents, in
    the order members, record, then, catch, finally_ (nested workflows in place)."""

    def __init__(self, manager: QueueManager, workflow: Workflow) -> None:
        self.manager = manager
        self.steps: list[Step] = []
        self.connection = manager.connection_name(
            workflow.connection or _first_job(workflow).connection
        )
        self.root = self._workflow(workflow, (), "succeeded")

    def dependency(self, node: Node) -> Dependency:
        outgoing = self.steps[node.step].outgoing
        return Dependency(outgoing.id, outgoing.queue)

    def _part(
        self, part: Job | Workflow, entry: tuple[Dependency, ...], rule: DependencyRule
    ) -> Node:
        if isinstance(part, Workflow):
            return self._workflow(part, entry, rule)
        manager = self.manager
        own = part.connection
        if own is not None and manager.connection_name(own) != self.connection:
            raise SerializationError(
                f"{type(part).__qualname__} goes to the {own!r} connection, but its workflow "
                f"to {self.connection!r}: all jobs of a workflow live on one connection"
            )
        _, queue = manager._target(part, None, self.connection)
        outgoing = manager._outgoing(part, queue, 0.0, None, None, None, None, entry, rule)
        self.steps.append(Step(part, outgoing))
        return Node(len(self.steps) - 1)

    def _workflow(
        self, workflow: Workflow, entry: tuple[Dependency, ...], rule: DependencyRule
    ) -> Node:
        if workflow.connection is not None:
            own = self.manager.connection_name(workflow.connection)
            if own != self.connection:
                raise SerializationError(
                    f"a nested {workflow.kind} goes to the {own!r} connection, but its workflow "
                    f"to {self.connection!r}: all jobs of a workflow live on one connection"
                )
        members: list[Node] = []
        if isinstance(workflow, Chain):
            previous, how = entry, rule
            for part in workflow.members:
                node = self._part(part, previous, how)
                members.append(node)
                previous, how = (self.dependency(node),), "succeeded"
        else:
            members = [self._part(part, entry, rule) for part in workflow.members]
        # A job that is two members (one `job_id` kept twice) is waited for once.
        waits = unique_dependencies(self.dependency(node) for node in members)
        first = self.steps[members[0].step].outgoing
        settings = self.manager.settings
        record = OutgoingJob(
            _new_id(),
            first.queue,
            b"",
            job=workflow.name,
            depends_on=waits,
            rule="ended",
            kind=workflow.kind,
            cancel_on_failure=isinstance(workflow, Batch) and not workflow.allow_failures,
            failure_ttl=settings.queue_failure_ttl,
        )
        self.steps.append(Step(None, record))
        node = Node(len(self.steps) - 1, workflow.kind, members)
        done = (Dependency(record.id, record.queue),)
        if workflow.then is not None:
            node.then = self._part(workflow.then, done, "succeeded")
        if workflow.catch is not None:
            node.catch = self._part(workflow.catch, waits, "failed")
        if workflow.finally_ is not None:
            node.finally_ = self._part(workflow.finally_, done, "ended")
        return node


def unique_dependencies(dependencies: Iterable[Dependency]) -> tuple[Dependency, ...]:
    """`dependencies` without repeats of an id (the first of each kept), in order."""
    out: dict[str, Dependency] = {}
    for dependency in dependencies:
        out.setdefault(dependency.id, dependency)
    return tuple(out.values())


def _first_job(workflow: Workflow) -> Job:
    first = workflow.members[0]
    return first if isinstance(first, Job) else _first_job(first)


def _new_id() -> str:
    from core.queue.payload import new_job_id

    return new_job_id()
