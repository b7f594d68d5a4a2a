"""A dispatcher process for the failover tests: pushes `RecordJob`s round-robin over queues,
continuously, until a stop file appears, with one `QueueManager` for its whole life (so a later
dispatch that succeeds shows that it reconnected by itself).

    python -m tests.failover_dispatch OUT_DIR QUEUE[,QUEUE...] [INTERVAL]

Settings come from the environment. Each outcome is one JSON line in OUT_DIR/dispatch.jsonl:
`acked` (the push returned: the job counts as dispatched), `unconfirmed` (NotReplicatedError:
stored on the primary, replicas did not confirm), `failed` (another ConnectionLostError: the
caller knows it is not stored), `error` (any other DriverError). The jobs record their runs in
OUT_DIR/runs.jsonl (tests.jobs.RecordJob). OUT_DIR/stop ends the loop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from core.errors import ConnectionLostError, DriverError, NotReplicatedError
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.jobs import RecordJob, record


async def dispatch(out: Path, queues: list[str], interval: float) -> None:
    log = str(out / "dispatch.jsonl")
    runs = str(out / "runs.jsonl")
    stop = out / "stop"
    n = 0
    async with QueueManager(Settings.load(env_file=None)) as manager:
        while not stop.exists():
            n += 1
            queue = queues[n % len(queues)]
            job = RecordJob(runs, n)
            try:
                handle = await manager.push(job, queue)
            except NotReplicatedError as exc:
                record(log, event="unconfirmed", n=n, queue=queue, error=str(exc)[:200])
            except ConnectionLostError as exc:
                record(log, event="failed", n=n, queue=queue, error=str(exc)[:200])
                await asyncio.sleep(0.05)
            except DriverError as exc:
                record(log, event="error", n=n, queue=queue, error=str(exc)[:200])
                await asyncio.sleep(0.05)
            else:
                record(log, event="acked", n=n, queue=queue, id=handle.id)
            await asyncio.sleep(interval)
    record(log, event="stopped", n=n, t=time.time())


if __name__ == "__main__":
    asyncio.run(
        dispatch(
            Path(sys.argv[1]),
            sys.argv[2].split(","),
            float(sys.argv[3]) if len(sys.argv) > 3 else 0.005,
        )
    )


# -- the harness the failover tests share ----------------------------------------------------


class Load:
    """A dispatcher process and one worker process per queue, on the settings in `env`; the
    outcomes are read back from the files they append to."""

    def __init__(self, out: Path, env: dict[str, str], queues: list[str]) -> None:
        import os
        import subprocess

        from tests.processes import ROOT, WorkerProcess

        self.out = out
        self.env = env
        self.queues = queues
        self.workers = [
            WorkerProcess(
                ["--queue", queue, "--concurrency", "4", "--timeout", "5"],
                env,
                out / f"worker-{queue}.log",
            )
            for queue in queues
        ]
        self._dispatch_log = (out / "dispatcher.log").open("ab")
        self.dispatcher = subprocess.Popen(
            [sys.executable, "-m", "tests.failover_dispatch", str(out), ",".join(queues)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self._dispatch_log,
            stderr=subprocess.STDOUT,
        )

    def events(self, kind: str | None = None) -> list[dict[str, object]]:
        from tests.jobs import events

        return events(self.out / "dispatch.jsonl", kind)

    def runs(self) -> list[dict[str, object]]:
        from tests.jobs import events

        return events(self.out / "runs.jsonl", "run")

    def acked_since(self, t: float, queue: str) -> int:
        return sum(
            1
            for e in self.events("acked")
            if e["queue"] == queue and float(e["t"]) > t  # type: ignore[arg-type]
        )

    def stop_dispatching(self) -> None:
        (self.out / "stop").touch()
        self.dispatcher.wait(30)

    def stop(self) -> None:
        (self.out / "stop").touch()
        if self.dispatcher.poll() is None:
            try:
                self.dispatcher.wait(30)
            except Exception:
                self.dispatcher.kill()
                self.dispatcher.wait(10)
        self._dispatch_log.close()
        for worker in self.workers:
            worker.stop()

    def output(self) -> str:
        parts = [(self.out / "dispatcher.log").read_text(errors="replace")[-3000:]]
        parts += [w.output[-3000:] for w in self.workers]
        return "\n-----\n".join(parts)


def queue_empty(settings: Settings, queues: list[str]) -> bool:
    """Whether nothing of `queues` waits, is delayed or is reserved."""

    async def go() -> bool:
        async with QueueManager(settings) as manager:
            driver = await manager.connection()
            for queue in queues:
                stats = await driver.stats(queue)
                if stats.pending or stats.reserved or stats.delayed:
                    return False
        return True

    try:
        return asyncio.run(go())
    except ConnectionLostError:
        return False


def tally(load: Load) -> dict[str, object]:
    """Acknowledged dispatches never run (lost), and runs past the first (repeated)."""
    from collections import Counter

    acked = {int(e["n"]): float(e["t"]) for e in load.events("acked")}  # type: ignore[call-overload,arg-type]
    runs = Counter(int(e["n"]) for e in load.runs())  # type: ignore[call-overload]
    lost = sorted(set(acked) - set(runs))
    return {
        "acked": len(acked),
        "unconfirmed": len(load.events("unconfirmed")),
        "failed": len(load.events("failed")),
        "errors": len(load.events("error")),
        "error_samples": [e["error"] for e in load.events("error")[:3]],
        "ran": len(runs),
        "lost": lost,
        # When each lost job's dispatch was acknowledged (wall clock).
        "lost_acked_at": [acked[n] for n in lost],
        "repeated": sorted(n for n, c in runs.items() if c > 1),
    }


def report(name: str, figures: dict[str, object]) -> None:
    """Append the figures to $TOPIQ_FAILOVER_REPORT (a JSON line) when it is set."""
    import json
    import os

    path = os.environ.get("TOPIQ_FAILOVER_REPORT")
    print(name, figures)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, **figures}) + "\n")
