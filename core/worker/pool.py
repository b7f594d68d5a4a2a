"""`queue:work --processes N`: one parent process that runs N worker processes and keeps them up.

Each child is a plain `queue:work` (the same flags, without `--processes`), started with
`python main.py`, so every worker guarantee holds per child: a SIGKILL of a child loses nothing,
its jobs come back after their lease. The parent does what supervisord's `autorestart` does:

* a child that exits is started again: after `--max-jobs` or `--max-time` (limits per process),
  after `queue:restart` (the fresh child runs the code deployed now), after a crash or a kill;
* a child that keeps failing soon after it starts (bad settings, a port in use) is started again
  with a doubling delay (0.5 s up to 30 s), and the parent logs each one: never a hot loop;
* SIGTERM and SIGINT are forwarded to every child; a second one is forwarded too, and each child
  then cancels its running jobs and hands them back, as a single worker does on a second signal;
* the parent exits once every child has: 0 when they all stopped cleanly (a slot still waiting
  to restart a child that failed at start reports that failure's code);
* with `--stop-when-empty`, a child that found its queues empty is not replaced: the pool drains.

Children run in a process group of their own, so a Ctrl-C in a terminal reaches only the parent
(which forwards it once). A child asks the kernel for a signal when its parent dies
(`PR_SET_PDEATHSIG`, Linux; elsewhere it checks its parent every second): a SIGKILL of the parent
leaves no orphan, each child stops as it does on SIGTERM, within its grace (`ParentLink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DRAINED",
    "MAX_PROCESSES",
    "PARENT_ENV",
    "SLOT_ENV",
    "ParentLink",
    "Pool",
    "pool_child",
]

logger = logging.getLogger("topiq.pool")

#: The most processes one parent runs: past this, use supervisord or more machines (each child
#: holds its own backend connections, and a typo such as 1000 must not fork a thousand Pythons).
MAX_PROCESSES = 64
#: A child that fails sooner than this after it starts counts as failing at start.
START_SECONDS = 30.0
#: The first delay before starting such a child again; it doubles up to `BACKOFF_MAX`.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: Between the parent and its children only: a child run with `--stop-when-empty` exits with
#: this code when it found its queues empty (it is not replaced; the parent still exits 0).
DRAINED = 10
#: Environment of a child: the parent's pid and the child's slot (0 … N-1).
PARENT_ENV = "TOPIQ_POOL_PARENT"
SLOT_ENV = "TOPIQ_POOL_SLOT"

_PR_SET_PDEATHSIG = 1
#: A child whose parent died ends itself if still alive this long after its grace.
ORPHAN_MARGIN = 30.0
_LINUX = sys.platform.startswith("linux")
#: What the kernel sends a child when its parent dies (a signal nothing else uses here; the
#: child acts on it only if its parent is really gone).
DEATH_SIGNAL = signal.SIGUSR1


def pool_child() -> int | None:
    """The parent's pid when this process is a child of a pool, else None."""
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


class ParentLink:
    """In a child of a pool: stop the worker, once, when the parent dies.

    On Linux the kernel sends `DEATH_SIGNAL` when the parent dies (`PR_SET_PDEATHSIG`); it may
    send it more than once (once per thread of the parent that goes away), so the handler
    checks that the parent is really gone and acts once. Elsewhere the child looks every second.
    A parent's death counts as one SIGTERM from it: a child that was already stopping gracefully
    (the parent had forwarded a signal, then was killed) then cancels its jobs and hands them back.
    """

    def __init__(self, parent: int) -> None:
        self.parent = parent
        self._stop: Callable[[], None] | None = None
        self._grace = 0.0
        self._gone = False
        self._poll: asyncio.Task[None] | None = None

    def bind(self) -> bool:
        """Ask for the death signal; False if the parent already died (while this started)."""
        if _LINUX:
            import ctypes

            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0)
        return os.getppid() == self.parent

    def attach(self, stop: Callable[[], None], grace: float) -> None:
        """From now on the parent's death calls `stop()` (once), in the running loop; a worker
        still alive `grace` + `ORPHAN_MARGIN` seconds later (its backend gone, say) ends itself,
        as supervisord's SIGKILL after `stopwaitsecs` would: its jobs come back after their
        lease."""
        loop = asyncio.get_running_loop()
        self._stop = stop
        self._grace = grace
        if _LINUX:
            loop.add_signal_handler(DEATH_SIGNAL, self._check)
        else:
            self._poll = loop.create_task(self._watch(), name="topiq-pool-parent")
        self._check()  # it may have died before the handler was there

    async def detach(self) -> None:
        if _LINUX:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(DEATH_SIGNAL)
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)

    async def _watch(self, every: float = 1.0) -> None:
        # Nothing announces a parent's death without PR_SET_PDEATHSIG: look every second.
        while not self._gone:
            self._check()
            await asyncio.sleep(every)

    def _check(self) -> None:
        if self._gone or os.getppid() == self.parent or self._stop is None:
            return
        self._gone = True
        logger.warning(
            "worker pool process %d is gone; this worker stops as on SIGTERM", self.parent
        )
        timer = threading.Timer(self._grace + ORPHAN_MARGIN, self._end)
        timer.daemon = True
        timer.start()
        self._stop()

    def _end(self) -> None:
        logger.critical(
            "worker pool process %d is gone and this worker has not stopped within %gs; "
            "exiting (its jobs come back after their lease)",
            self.parent,
            self._grace + ORPHAN_MARGIN,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)


def _own_group(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    """How to start a child in a process group of its own on `loop`.

    asyncio's loop takes `process_group` (set up in C, before the child runs any Python);
    uvloop does not know it and takes `preexec_fn`, run in the child between fork and exec.
    """
    if isinstance(loop, asyncio.BaseEventLoop):
        return {"process_group": 0}
    return {"preexec_fn": _new_group}


def _new_group() -> None:
    os.setpgid(0, 0)


@dataclass
class _Slot:
    """One of the N places a child runs in."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    waiter: asyncio.Task[int] | None = None
    started: float = 0.0
    failures: int = 0  # failed at start, in a row
    due: float = 0.0  # loop time of the next start
    drained: bool = False  # found its queues empty (--stop-when-empty): not replaced
    last: int | None = None  # exit code of its last child during the stop
    failing: int | None = None  # code of its last failure at start, while waiting to restart
    starts: int = 0


def describe_exit(code: int) -> str:
    """`exited with code 3` or `was killed by SIGKILL`."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Pool:
    """Runs `processes` children, `argv(slot)` each, until a stop signal; see the module doc."""

    def __init__(
        self,
        processes: int,
        argv: Callable[[int], Sequence[str]],
        grace: float,
        env: dict[str, str] | None = None,
    ) -> None:
        self.processes = processes
        self._argv = argv
        self._grace = grace
        self._env = dict(os.environ if env is None else env)
        self._slots = [_Slot(i) for i in range(processes)]
        self._signals: list[int] = []
        self._wake: asyncio.Event | None = None

    @property
    def stopping(self) -> bool:
        return bool(self._signals)

    async def run(self) -> int:
        """Run the children until a stop signal (or, draining, until all found nothing to do);
        returns the parent's exit code: 0 when every child stopped cleanly."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._signalled, sig)
        try:
            await self._supervise(loop)
        finally:
            for sig in signals:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self._end_children()
        return self._exit_code()

    async def _supervise(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._wake is not None
        while True:
            if not self.stopping:
                for slot in self._slots:
                    if slot.proc is None and not slot.drained and slot.due <= loop.time():
                        await self._start(slot, loop)
            waiters = {s.waiter for s in self._slots if s.waiter is not None}
            if not waiters and (self.stopping or all(s.drained for s in self._slots)):
                return
            pending = [
                s.due for s in self._slots if s.proc is None and not s.drained and not self.stopping
            ]
            timeout = max(0.0, min(pending) - loop.time()) if pending else None
            wake = asyncio.create_task(self._wake.wait())
            try:
                await asyncio.wait(
                    {*waiters, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                wake.cancel()
                await asyncio.gather(wake, return_exceptions=True)
            self._wake.clear()
            for slot in self._slots:
                if slot.waiter is not None and slot.waiter.done():
                    self._exited(slot, loop)

    async def _start(self, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        argv = list(self._argv(slot.index))
        env = {**self._env, PARENT_ENV: str(os.getpid()), SLOT_ENV: str(slot.index)}
        slot.started = loop.time()
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the parent only, which
            # forwards it once (the child would otherwise see it twice: a forced stop).
            proc = await asyncio.create_subprocess_exec(*argv, env=env, **_own_group(loop))
        except OSError as exc:
            self._failed(slot, loop, f"could not be started ({exc})", 1)
            return
        slot.proc = proc
        slot.failing = None
        slot.starts += 1
        slot.waiter = asyncio.create_task(proc.wait(), name=f"topiq-pool-{slot.index}")
        logger.info(
            "worker process %d started (pid %d)%s",
            slot.index,
            proc.pid,
            "" if slot.starts == 1 else f", start number {slot.starts} of this slot",
        )
        for sig in self._signals:  # a stop signal came while it was being started
            self._send(slot, sig)

    def _exited(self, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        assert slot.proc is not None and slot.waiter is not None
        pid, code = slot.proc.pid, slot.waiter.result()
        lived = loop.time() - slot.started
        slot.proc, slot.waiter = None, None
        if self.stopping:
            slot.last = code
            logger.info("worker process %d (pid %d) %s", slot.index, pid, describe_exit(code))
        elif code == DRAINED:
            slot.drained = True
            logger.info(
                "worker process %d (pid %d) found its queues empty (--stop-when-empty); "
                "not replaced",
                slot.index,
                pid,
            )
        elif code == 0:
            slot.failures, slot.due = 0, loop.time()
            logger.info(
                "worker process %d (pid %d) stopped after %.1fs (--max-jobs, --max-time or "
                "queue:restart); starting a fresh one",
                slot.index,
                pid,
                lived,
            )
        elif lived >= START_SECONDS:
            slot.failures, slot.due = 0, loop.time()
            logger.warning(
                "worker process %d (pid %d) %s after %.1fs; starting a fresh one "
                "(its jobs come back after their lease)",
                slot.index,
                pid,
                describe_exit(code),
                lived,
            )
        else:
            self._failed(
                slot, loop, f"(pid {pid}) {describe_exit(code)} {lived:.1f}s after start", code
            )

    def _failed(self, slot: _Slot, loop: asyncio.AbstractEventLoop, what: str, code: int) -> None:
        """A child that failed at start: start it again after a doubling delay."""
        slot.failing = code
        slot.failures += 1
        delay = min(BACKOFF_FIRST * 2 ** (slot.failures - 1), BACKOFF_MAX)
        slot.due = loop.time() + delay
        logger.error(
            "worker process %d %s (%d time(s) in a row soon after starting); starting it again "
            "in %gs",
            slot.index,
            what,
            slot.failures,
            delay,
        )

    def _signalled(self, sig: int) -> None:
        self._signals.append(sig)
        name = signal.Signals(sig).name
        running = [s for s in self._slots if s.proc is not None]
        for slot in running:
            self._send(slot, sig)
        if len(self._signals) == 1:
            logger.info(
                "worker pool stopping (%s): sent to %d worker process(es); each finishes its "
                "running jobs within its grace (%gs), a second signal cancels them",
                name,
                len(running),
                self._grace,
            )
        else:
            logger.warning(
                "worker pool: second stop signal (%s) sent to %d worker process(es): they "
                "cancel their running jobs and hand them back",
                name,
                len(running),
            )
        assert self._wake is not None
        self._wake.set()

    def _send(self, slot: _Slot, sig: int) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(sig)

    async def _end_children(self) -> None:
        """Only when the parent itself fails (or is cancelled): no child outlives it."""
        left = [s for s in self._slots if s.waiter is not None]
        if not left:
            return
        for slot in left:
            self._send(slot, signal.SIGTERM)
        waiters: list[Any] = [s.waiter for s in left]
        await asyncio.wait(waiters, timeout=self._grace + 10)
        for slot in left:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.kill()
        await asyncio.gather(*waiters, return_exceptions=True)

    def _exit_code(self) -> int:
        """0 when every child stopped cleanly (a child killed by the very signal forwarded to
        it, before it could handle it, held no job); else the highest child code, or 1.

        A slot with no child during the stop because its last one failed at start (waiting out
        its backoff) reports that failure's code: a pool that never ran a worker is no clean
        run."""
        clean = {0, DRAINED, *(-sig for sig in self._signals)}
        ends = [s.last if s.last is not None else s.failing for s in self._slots]
        codes = [c for c in ends if c is not None and c not in clean]
        if not codes:
            return 0
        return max((c for c in codes if c > 0), default=1)
