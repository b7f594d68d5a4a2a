"""Group commit for the pushes the app's handlers make before their acknowledgements.

A message is acknowledged only once what its handler dispatched is stored, so every message
costs one durable write, and at 1,000 messages a second one round trip each is the largest
part of the app's work (about 40 % of its CPU in the W6 profile): each push takes a
connection, writes, and parses its own reply. `GroupCommit`
lets one push at a time go to the backend; pushes made while it is on its way wait and then
go together in the next one (one `Driver.push` of all their jobs, which stores each job as
its own atomic step), and each caller gets back the outcomes of its own jobs. A push made
when none is on its way goes at once, so a quiet app pays nothing; under load the batches
grow by themselves, and the round trips per message fall as the rate rises.

A push still returns only once its jobs are stored: the acknowledgement keeps its meaning.
The app sets one as its manager's batcher of the default connection (`QueueManager.batchers`)
while it runs: every `dispatch` of a handler goes through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from core.errors import ConnectionLostError
from core.queue.drivers.base import OutgoingJob, Pushed

__all__ = ["MAX_BATCH", "GroupCommit"]


#: At most this many jobs in one push: a larger one would hold the backend (a Redis script
#: runs alone) long enough to delay every other client.
MAX_BATCH = 512

PushFunction = Callable[[Sequence[OutgoingJob]], Awaitable[list[Pushed]]]
_Waiting = tuple[Sequence[OutgoingJob], "asyncio.Future[list[Pushed]]"]


class GroupCommit:
    """Pushes through `push`, at most one at a time; those that wait go together.

    Args:
        push: The backend's push (`Driver.push`): one `Pushed` per job, in order.
        max_batch: Jobs at most in one push (a caller's jobs are never split).
    """

    def __init__(self, push: PushFunction, *, max_batch: int = MAX_BATCH) -> None:
        self._push = push
        self.max_batch = max_batch
        self._busy = False  # a push is on its way (a caller's own, or the flusher's)
        self._waiting: list[_Waiting] = []
        self._flusher: asyncio.Task[None] | None = None
        #: Backend pushes made, and jobs they carried (jobs / pushes: the batch size).
        self.pushes = 0
        self.jobs = 0

    async def push(self, jobs: Sequence[OutgoingJob]) -> list[Pushed]:
        """Store `jobs`; their outcomes, in order, once they are stored."""
        if not jobs:
            return []
        if self._busy:
            future: asyncio.Future[list[Pushed]] = asyncio.get_running_loop().create_future()
            self._waiting.append((jobs, future))
            return await future
        self._busy = True
        try:
            self.pushes += 1
            self.jobs += len(jobs)
            return await self._push(jobs)
        finally:
            self._next()

    def _next(self) -> None:
        """The push on its way is done: send what waits for it, or be idle."""
        if self._waiting:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="topiq-mqtt-group-commit"
            )
        else:
            self._busy = False

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = self._take()
                if batch:
                    await self._send(batch)
        finally:
            self._flusher = None
            self._busy = False
            if self._waiting:  # left by a cancelled flusher: never stranded
                self._fail(self._take_all(), ConnectionLostError("the group commit stopped"))

    def _take(self) -> list[_Waiting]:
        """The next batch: waiting pushes in arrival order, up to `max_batch` jobs (at least
        one push); those whose caller stopped waiting are left out (nothing of theirs is
        stored, so the message they came from is not acknowledged: the broker resends it)."""
        batch: list[_Waiting] = []
        size = 0
        while self._waiting:
            jobs, future = self._waiting[0]
            if future.done():
                self._waiting.pop(0)
                continue
            if batch and size + len(jobs) > self.max_batch:
                break
            self._waiting.pop(0)
            batch.append((jobs, future))
            size += len(jobs)
        return batch

    def _take_all(self) -> list[_Waiting]:
        batch, self._waiting = self._waiting, []
        return batch

    async def _send(self, batch: list[_Waiting]) -> None:
        jobs = [job for part, _ in batch for job in part]
        self.pushes += 1
        self.jobs += len(jobs)
        try:
            pushed = await self._push(jobs)
        except asyncio.CancelledError:
            # Not the callers' doing (the loop is closing): as for a backend that cannot be
            # reached, their messages stay unacknowledged and the broker sends them again.
            self._fail(batch, ConnectionLostError("the group commit was cancelled"))
            raise
        except Exception as exc:  # the backend's error is each caller's error
            self._fail(batch, exc)
            return
        if not pushed or len(pushed) != len(jobs):
            # A driver that does not report per job: each caller gets no outcomes, which the
            # manager reads as "created", as it does for that driver's own pushes.
            pushed = []
        start = 0
        for part, future in batch:
            if not future.done():
                future.set_result(pushed[start : start + len(part)] if pushed else [])
            start += len(part)

    @staticmethod
    def _fail(batch: list[_Waiting], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
