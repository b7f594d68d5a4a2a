"""`python -m bench.profile W3 [--n 2000] [--process worker]`: where Topiq's time goes.

Runs one Topiq workload with py-spy (from bench/.venv/tools, built by `bench/run`) sampling
the agent and each process it starts (worker, app, probe), then prints, for the chosen ones,
the functions with the largest share of on-CPU samples: inclusive (the function or anything
it calls) and self (the function's own code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import envs, plan, services

REPO = Path(__file__).resolve().parent.parent


def summarize(raw: Path, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = imports = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any("<frozen importlib" in f for f in frames):
            imports += int(count)
            continue  # start-up: importing modules, not running jobs
        n = int(count)
        total += n
        names = [f for f in frames if not f.startswith(("process ", "thread "))]
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
    if not total:
        return "no samples"
    out = [f"{total} on-CPU samples ({imports} more while importing, left out)", "", "inclusive:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("workload", choices=["W1", "W2", "W3", "W4", "W5", "W6", "W7"])
    parser.add_argument("--n", type=int, default=None, help="jobs (default: the full size)")
    parser.add_argument("--rate", type=float, default=None, help="W4/W6 dispatch rate per s")
    parser.add_argument("--backend", default="redis", choices=["redis", "mysql", "sqlite"])
    parser.add_argument(
        "--process", default="worker", help="worker, app, probe, agent or all: whose profile"
    )
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    spy = envs.ROOT / "tools" / "bin" / "py-spy"
    python = envs.python("topiq") if envs.ready("topiq") else Path(sys.executable)
    params = {**plan.FULL[args.workload], "budget": 60.0}
    if args.n:
        params["n"] = args.n
    if args.rate:
        params["rate"] = args.rate
    workdir = Path(tempfile.mkdtemp(prefix="topiq-profile-"))
    os.symlink(spy, workdir / "py-spy")
    with services.Server.redis(workdir) as redis, services.Server.mosquitto(workdir) as mqtt:
        ctx = {"redis_url": redis.url, "workdir": str(workdir), "backend": args.backend,
               "db_url": services.mysql_url("bench_topiq") if args.backend == "mysql" else "",
               "extra": {"mqtt_port": mqtt.port}}  # fmt: skip
        spec = {"peer": "topiq", "workload": args.workload, "params": params, "repeats": 1,
                "ctx": ctx}  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_PROFILE_DIR": str(workdir)}
        subprocess.run(
            [str(spy), "record", "-r", "500", "--format", "raw", "-o", str(workdir / "agent.raw"),
             "--", str(python), "-m", "bench.agent", json.dumps(spec)],
            cwd=workdir, env=env, check=True,
        )  # fmt: skip
    for raw in sorted(workdir.glob("*.raw")):
        if raw.name.startswith(args.process) or args.process == "all":
            print(f"== {raw.name}\n{summarize(raw, args.top)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
