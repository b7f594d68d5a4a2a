"""W2 with 1, 2 and 4 worker processes, on one Redis and on a local Redis Cluster (issue #17).

    bench/run --only scaling                      # the table, into BENCHMARKS.md (section scaling)
    .venv/bin/python -m bench.scaling             # the same, printed only
    .venv/bin/python -m bench.scaling --smoke     # tiny sizes (tests/test_bench_smoke.py)

Every run is W2: 20,000 queued no-op jobs (bench/jobs.py `Noop`) drained by worker processes
(`python main.py queue:work --concurrency 32`, W2's worker). The queues are paused
(`queue:pause`) while the workers start, so that every process is up before the first job
runs: once all of them are registered the queues are filled and resumed (each worker sees the
resume within its 0.5 s pause check). Rows:

* single Redis: a private redis-server (no persistence), queue `bench`.
* cluster, 1 queue: a private Redis Cluster of 3 primaries and 3 replicas (tests/servers.py
  `start_redis_cluster`), queue `bench`. A queue's keys share one hash slot, so one queue
  lives on one primary: this row shows what a cluster gives a single queue.
* cluster, 3 queues: the same jobs spread evenly over 3 queues whose slots are on the 3
  different primaries; every process works all three, each in its own order (process i
  starts with queue i mod 3), so that N processes keep min(N, 3) primaries busy.

Processes: with one queue, `queue:work --processes N` (one parent, N worker processes); with
3 queues, N separate `queue:work` processes, since each starts with another queue (the
children of one `--processes` parent share their flags, queue order included).

Figures: *jobs/s* is W2's, from the first job's end to the last job's end over all the
processes; *while all processes worked* counts only the window in which every process was
taking jobs (the latest first job to the earliest last job), without the start and the tail.
The jobs count in their own process and a thread in each adds the count to the harness's
Redis every 10 ms (`BENCH_FLUSH_MS`, bench/marks.py), so counting costs a job no Redis call.
Each round runs every configuration once (the table's order, reversed every other round);
`--repeats` rounds; each figure is the median of its rounds, and the ratio column the median
of the ratios to the same round's 1 process on single Redis, so that a change in the
machine's load weighs on both sides alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import jobs
from bench.report import write
from bench.services import Server, redis_version
from bench.text import _cpu, _memory
from bench.worker_process import WorkerDied, WorkerProcess

REPO = Path(__file__).resolve().parent.parent
PREFIX = "topiq"  # the settings' default REDIS_PREFIX
FLUSH_MS = 10
CONCURRENCY = 32  # W2's


@dataclass(frozen=True)
class Config:
    topology: str  # "single" or "cluster"
    queues: tuple[str, ...]
    processes: int

    @property
    def label(self) -> str:
        where = "single Redis" if self.topology == "single" else "cluster"
        spread = "" if len(self.queues) == 1 else f", {len(self.queues)} queues"
        if self.topology == "cluster" and len(self.queues) == 1:
            spread = ", 1 queue"
        return f"{where}{spread}"


@dataclass
class Outcome:
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class _Args:
    """What a Peer-shaped WorkerProcess needs: a name, a context, a command and its env."""

    name = "topiq"
    shared_marks = False

    def __init__(self, marks_url: str, workdir: str, argv: list[str], env: dict[str, str]):
        self.ctx = argparse.Namespace(redis_url=marks_url, workdir=workdir)
        self.argv, self.env = argv, env

    def worker_command(self) -> list[str]:
        return self.argv

    def worker_env(self) -> dict[str, str]:
        return self.env

    @staticmethod
    def pythonpath() -> str:
        return os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def settings_env(redis_url: str, cluster_nodes: str) -> dict[str, str]:
    env = {
        "QUEUE_CONNECTION": "redis",
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": PREFIX,
        "QUEUE_ALLOWED_MODULES": "bench.,app.",
        "LOG_LEVEL": "WARNING",
    }
    if cluster_nodes:
        env["REDIS_CLUSTER_NODES"] = cluster_nodes
    return env


def spread_queues(cluster_nodes: str, count: int = 3) -> tuple[str, ...]:
    """`count` queue names (bench-<n>) whose hash slots are served by different primaries."""
    host, port = cluster_nodes.split(",")[0].rsplit(":", 1)
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        chosen: dict[str, str] = {}  # primary -> queue
        primaries = {node.name for node in client.get_primaries()}  # type: ignore[no-untyped-call]
        for n in range(1, 1000):
            name = f"bench-{n}"
            # every key of a queue is under the tag {<prefix>:<queue>} (redis.py)
            node = client.get_node_from_key(f"{PREFIX}:{{{PREFIX}:{name}}}:jobs")  # type: ignore[no-untyped-call]
            chosen.setdefault(node.name, name)
            if len(chosen) == min(count, len(primaries)):
                return tuple(sorted(chosen.values(), key=lambda q: int(q.split("-")[1])))
        raise RuntimeError(f"no {count} queue names on {count} different primaries")
    finally:
        client.close()


def _settings(env: dict[str, str]) -> Any:
    from core.settings import Settings

    return Settings.load(env_file=None, **{k.lower(): v for k, v in env.items()})


async def fill(env: dict[str, str], queues: tuple[str, ...], n: int) -> None:
    """Queue `n` no-op jobs spread evenly over `queues`, in bulk calls of at most 10,000."""
    from core.queue.queue_manager import QueueManager

    async with QueueManager(_settings(env)) as manager:
        for i, queue in enumerate(queues):
            share = n // len(queues) + (1 if i < n % len(queues) else 0)
            for start in range(0, share, 10_000):
                batch = [jobs.Noop() for _ in range(min(10_000, share - start))]
                await manager.bulk(batch, queue)


async def switch(env: dict[str, str], queues: tuple[str, ...], pause: bool) -> None:
    """Pause or resume `queues` (what `queue:pause` / `queue:resume` do)."""
    from core.queue.queue_manager import QueueManager

    async with QueueManager(_settings(env)) as manager:
        driver = await manager.connection()
        for queue in queues:
            await (driver.pause(queue) if pause else driver.resume(queue))


async def live_workers(env: dict[str, str]) -> int:
    """The worker processes registered (alive)."""
    from core.queue.queue_manager import QueueManager

    async with QueueManager(_settings(env)) as manager:
        return len(await (await manager.connection()).workers())


@dataclass
class Drained:
    rate: float  # W2's: jobs / (last job's end - first job's end), over every process
    steady: float | None  # jobs/s while every process was working (None: too short a window)


def _steady(samples: dict[int, list[tuple[float, int]]]) -> float | None:
    """Jobs per second over the window in which every process was working: from the latest
    first report to the earliest last one (each process's count a step function of time)."""
    start = max(s[0][0] for s in samples.values())
    end = min(s[-1][0] for s in samples.values())
    if end - start < 0.2:
        return None

    def done_by(when: float) -> int:
        return sum(max((c for t, c in s if t <= when), default=0) for s in samples.values())

    return (done_by(end) - done_by(start)) / (end - start)


def drain(
    config: Config, env: dict[str, str], marks_url: str, workdir: Path, n: int, budget: float
) -> Drained:
    """Start `config.processes` workers on the paused queues, wait until each is up, fill the
    queues, resume them; jobs/s over all the processes."""
    key = f"bench:marks:{uuid.uuid4().hex[:8]}"
    marks = redis.Redis.from_url(marks_url)
    workers = []
    # One queue: one `queue:work --processes N` (its children alike). Several queues: N
    # separate `queue:work` processes, process i starting with queue i mod len(queues).
    pooled = len(config.queues) == 1
    try:
        asyncio.run(switch(env, config.queues, pause=True))
        for i in range(1 if pooled else config.processes):
            order = (
                config.queues[i % len(config.queues) :] + config.queues[: i % len(config.queues)]
            )
            argv = [
                sys.executable, str(REPO / "main.py"), "queue:work", "--connection", "redis",
                "--queue", ",".join(order), "--concurrency", str(CONCURRENCY),
            ]  # fmt: skip
            if pooled and config.processes > 1:
                argv += ["--processes", str(config.processes)]
            peer = _Args(marks_url, str(workdir), argv, env)
            worker = WorkerProcess(
                peer,  # type: ignore[arg-type]
                marks=[],
                env={"BENCH_KEY": key, "BENCH_FLUSH_MS": str(FLUSH_MS)},
                label=f"scaling-{config.topology}-{len(config.queues)}q-{i}",
            )
            workers.append(worker.__enter__())
        deadline = time.monotonic() + budget
        # Worker processes register as they start: wait for all of them (another process's
        # start-up is no event here: look every 0.1 s).
        while asyncio.run(live_workers(env)) < config.processes:
            _alive(workers)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{config.processes} workers did not all start")
            time.sleep(0.1)
        asyncio.run(fill(env, config.queues, n))
        asyncio.run(switch(env, config.queues, pause=False))  # each sees it within 0.5 s
        # Each report carries its process's own count so far and its last job's end: the
        # drain is over once the latest counts of the processes add up to `n` (a report
        # holding the cluster-wide total `n` may arrive before another process's last one).
        first, last = float("inf"), 0.0
        samples: dict[int, list[tuple[float, int]]] = {}
        deadline = time.monotonic() + budget
        while sum(s[-1][1] for s in samples.values()) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                done = sum(s[-1][1] for s in samples.values())
                raise TimeoutError(f"{done} of {n} jobs done after {budget:.0f}s")
            item = marks.blpop([key], timeout=min(1.0, left))
            if item is None:
                _alive(workers)
                continue
            report: dict[str, Any] = json.loads(item[1])
            first, last = min(first, report["first"]), max(last, report["t"])
            samples.setdefault(report["pid"], []).append((report["t"], report["mine"]))
        rate = n / (last - first) if last > first else 0.0
        return Drained(rate, _steady(samples) if len(samples) > 1 else rate)
    finally:
        for worker in workers:
            worker.__exit__(None, None, None)
        marks.close()


def _alive(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        if worker.proc is not None and worker.proc.poll() is not None:
            raise WorkerDied(f"a worker exited: {worker.tail()}")


def configs(processes: list[int], spread: tuple[str, ...] | None) -> list[Config]:
    out = [Config("single", ("bench",), p) for p in processes]
    out += [Config("cluster", ("bench",), p) for p in processes]
    if spread:
        out += [Config("cluster", spread, p) for p in processes]
    return out


def run(args: argparse.Namespace, workdir: Path) -> tuple[dict[Config, Outcome], dict[str, Any]]:
    from tests.servers import start_redis_cluster

    facts: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M %Z"),
                             "load": os.getloadavg()[0]}  # fmt: skip
    outcomes: dict[Config, Outcome] = {}
    with Server.redis(workdir) as single:
        facts["redis"] = redis_version(single.url)
        cluster = None
        try:
            try:
                cluster = start_redis_cluster()
            except Exception as exc:  # the single rows are still worth having
                facts["cluster_error"] = f"{type(exc).__name__}: {exc}"[:300]
            spread = spread_queues(cluster.nodes) if cluster else None
            facts["spread"] = spread
            plan = configs(args.process_list, spread)
            if cluster is None:
                plan = [c for c in plan if c.topology == "single"]
            for config in plan:
                outcomes[config] = Outcome()  # the table's order
            for round_ in range(args.repeats):
                # Every other round in the reverse order: a load that grows (or falls) during
                # a round weighs on the first and the last configurations alike.
                rates: dict[Config, float] = {}
                for config in plan if round_ % 2 == 0 else plan[::-1]:
                    outcome = outcomes[config]
                    flush = redis.Redis.from_url(single.url)
                    flush.flushall()
                    flush.close()
                    if config.topology == "cluster":
                        assert cluster is not None
                        cluster.flush()
                        env = settings_env(single.url, cluster.nodes)
                    else:
                        env = settings_env(single.url, "")
                    try:
                        got = drain(config, env, single.url, workdir, args.jobs, args.budget)
                    except Exception as exc:
                        outcome.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                        say(f"round {round_ + 1} {config.label} x{config.processes}: {exc}")
                        continue
                    rate = got.rate
                    outcome.rates.append(rate)
                    if got.steady is not None:
                        outcome.steady.append(got.steady)
                    rates[config] = rate
                    say(f"round {round_ + 1} {config.label} x{config.processes}: {rate:,.0f}/s")
                base = rates.get(plan[0])
                for config, rate in rates.items():
                    if base:
                        outcomes[config].ratios.append(rate / base)
        finally:
            if cluster is not None:
                cluster.stop()
    facts["load_end"] = os.getloadavg()[0]
    return outcomes, facts


def table(outcomes: dict[Config, Outcome]) -> str:
    lines = [
        "| Redis | worker processes | jobs/s ↑ | / 1 process on single Redis | jobs/s while "
        "all processes worked ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, outcome in outcomes.items():
        if outcome.rates:
            rate = f"{statistics.median(outcome.rates):,.0f}"
            ratio = f"{statistics.median(outcome.ratios):.2f} x" if outcome.ratios else "n/a"
        else:
            rate, ratio = "n/a", "n/a"
        if outcome.errors:
            rate += f" ({len(outcome.errors)} run(s) failed: {outcome.errors[0]})"
        steady = f"{statistics.median(outcome.steady):,.0f}" if outcome.steady else "n/a"
        queues = ", ".join(f"`{q}`" for q in config.queues)
        lines.append(
            f"| {config.label} ({queues}) | {config.processes} | {rate} | {ratio} | {steady} |"
        )
    return "\n".join(lines)


def render(args: argparse.Namespace, outcomes: dict[Config, Outcome], facts: dict[str, Any]) -> str:
    mode = "smoke (tiny sizes, not figures)" if args.smoke else "full sizes"
    cores = os.cpu_count()
    head = (
        f"Generated by `bench/run --only scaling{' --smoke' if args.smoke else ''}` on "
        f"{facts['started']} ({mode}; {args.jobs:,} jobs per run; {args.repeats} round(s), "
        f"the median shown; {facts['elapsed'] / 60:.1f} min in all). **Machine: {cores} "
        f"cores** ({_cpu()}), {_memory()} RAM, {platform.platform()}; load average "
        f"{facts['load']:.1f} at the start, {facts.get('load_end', 0):.1f} at the end. Redis "
        f"{facts.get('redis', '?')}: every server of the run and every worker process share "
        f"these {cores} cores."
    )
    notes = []
    if facts.get("cluster_error"):
        notes.append(f"The cluster could not start: {facts['cluster_error']}")
    spread = facts.get("spread")
    if spread:
        notes.append(
            f"Cluster, 3 queues: {', '.join(spread)} hash to slots on the 3 different primaries; "
            "the jobs are spread evenly over them and each process works all three, starting "
            "with a different one."
        )
    body = "\n".join(f"- {note}" for note in notes)
    return f"{head}\n\n{table(outcomes)}\n\n{body}\n".replace("\n\n\n", "\n\n")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run --only scaling", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run (20,000)")
    parser.add_argument("--processes", default="1,2,4", help="worker process counts (1,2,4)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (3)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds a run may take")
    parser.add_argument("--output", type=Path, default=None,
                        help="write the table into this file's `scaling` section")  # fmt: skip
    parser.add_argument("--section", default="scaling", help="the section's name (scaling)")
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (300 if args.smoke else 20_000)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    try:
        args.process_list = [int(p) for p in args.processes.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--processes: comma-separated numbers, e.g. 1,2,4 (got {args.processes!r})")
    if not args.process_list or min(args.process_list) < 1:
        parser.error(f"--processes: each count at least 1 (got {args.processes!r})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    workdir = Path(tempfile.mkdtemp(prefix="topiq-bench-scaling-"))
    say(f"bench scaling: scratch directory {workdir}")
    begun = time.monotonic()
    try:
        outcomes, facts = run(args, workdir)
        facts["elapsed"] = time.monotonic() - begun
        section = render(args, outcomes, facts)
        print(section)
        if args.output is not None:
            write(args.output, section, args.section)
            say(f"bench scaling: wrote {args.output}")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    return 0 if all(o.rates for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
