"""`bench/run` / `python -m bench`: build the environments, start the servers, run every
workload for Topiq and each peer, print the table and write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import checkout, envs, plan, services
from bench.peers import PEERS
from bench.report import Results, render, write
from bench.text import footer, header

REPO = Path(__file__).resolve().parent.parent
PREFIX = "BENCH-RESULT "


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 1 repeat, install nothing (for the test suite)",
    )
    parser.add_argument("--only", default="", help="workloads to run, e.g. W2,W4")
    parser.add_argument(
        "--peers", default=None, help="peers besides Topiq, e.g. arq,saq ('' for Topiq alone)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (3)")
    parser.add_argument(
        "--budget",
        type=float,
        default=plan.BUDGET,
        help="seconds a library's run may take before it is cut short",
    )
    parser.add_argument(
        "--before",
        default=checkout.BEFORE,
        help="an earlier commit whose W2 is measured beside today's (W2b; default "
        f"{checkout.BEFORE}, the code before issue #13; '' for none)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--section",
        default="",
        help="write a section of this name instead of the main table (for a run of some "
        "workloads or peers: the main table keeps its full run's figures)",
    )
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the report (default BENCHMARKS.md; "
                             "--smoke writes none unless given)")  # fmt: skip
    args = parser.parse_args(argv)
    names = list(PEERS) if args.peers is None else [p for p in args.peers.split(",") if p]
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}: choose from {', '.join(PEERS)}")
    args.peer_list = ["topiq", *[p for p in names if p != "topiq"]]
    args.only_list = [w.strip().upper() for w in args.only.split(",") if w.strip()]
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.output is None and not args.smoke:
        args.output = REPO / "BENCHMARKS.md"
    return args


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def interpreters(peers: list[str], smoke: bool, log: Path) -> dict[str, str | None]:
    """Each library's Python (None: no environment), building environments unless `smoke`."""
    base = envs.base_python()
    found: dict[str, str | None] = {}
    for name in peers:
        reason = None
        if not smoke:
            say(f"environment {name}: ready" if envs.ready(name) else f"environment {name}: …")
            reason = envs.build(name, log, base)
        if envs.ready(name) and reason is None:
            found[name] = str(envs.python(name))
        elif name == "topiq" and smoke:
            found[name] = sys.executable  # the project's own environment
        else:
            found[name] = None
            found[f"{name}:why"] = reason or "its environment is not built (run bench/run once)"
    return found


def agent(
    python: str, args: list[str], workdir: Path, timeout: float, source: Path = REPO
) -> dict[str, Any]:
    """Run `bench.agent` in one library's environment and return its JSON answer; `source`:
    the checkout whose `bench` and `core` it runs (an earlier commit's, for W2b)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    with (workdir / "agents.log").open("ab") as log:
        try:
            done = subprocess.run(
                [python, "-m", "bench.agent", *args],
                cwd=workdir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"runs": [], "error": f"no answer within {timeout:.0f}s"}
    for line in reversed(done.stdout.decode(errors="replace").splitlines()):
        if line.startswith(PREFIX):
            answer: dict[str, Any] = json.loads(line[len(PREFIX) :])
            return answer
    return {"runs": [], "error": f"the agent exited {done.returncode} (see {workdir}/agents.log)"}


def run_all(args: argparse.Namespace, workdir: Path) -> tuple[Results, dict[str, Any]]:
    pythons = interpreters([*args.peer_list, *([] if args.smoke else ["tools"])],
                           args.smoke, workdir / "pip.log")  # fmt: skip
    tasks = plan.tasks(args.only_list, args.smoke, args.budget, args.before)
    needs = {t.workload for t in tasks}
    # An earlier commit's checkout is made by a full run; a smoke run uses one already there.
    checkouts = {
        rev: checkout.prepare(rev, create=not args.smoke)
        for rev in sorted({t.checkout for t in tasks if t.checkout})
    }
    for rev, (where, why) in checkouts.items():
        say(f"checkout {rev}: {where}" if where else f"checkout {rev}: n/a ({why})")
    results, facts = Results(), {"started": time.strftime("%Y-%m-%d %H:%M %Z")}
    facts["load"] = os.getloadavg()[0]  # other work on the machine skews every figure
    mysql_version, mysql_why = services.mysql_status() if "W5" in needs else (None, "")
    rabbit = services.Rabbit(workdir) if any(t.backend == "amqp" for t in tasks) else None
    with services.Server.redis(workdir) as redis, rabbit or _nothing():
        if rabbit is not None:
            say(f"rabbitmq: {rabbit.url}" if rabbit.url else f"rabbitmq: n/a ({rabbit.failed})")
            facts["rabbitmq"] = rabbit.version
        facts["redis"] = services.redis_version(redis.url)
        mosquitto = services.Server.mosquitto(workdir) if "W6" in needs else None
        with mosquitto or _nothing():
            if mosquitto is not None and mosquitto.failed:
                pythons["topiq:W6"] = mosquitto.failed
            facts["mysql"], facts["mosquitto"] = mysql_version, services.mosquitto_version()

            def measure(task: plan.Task, peer: str, repeats: int) -> dict[str, Any]:
                python = pythons.get(peer)
                if python is None:
                    return {"runs": [], "error": pythons.get(f"{peer}:why")}
                if task.workload == "W6" and pythons.get("topiq:W6"):
                    return {"runs": [], "error": pythons["topiq:W6"]}
                if task.backend == "mysql" and mysql_version is None:
                    return {"runs": [], "error": mysql_why}
                if task.backend == "amqp" and (rabbit is None or not rabbit.url):
                    return {"runs": [], "error": rabbit.failed if rabbit else "no RabbitMQ"}
                source = REPO
                if task.checkout:
                    where, why = checkouts[task.checkout]
                    if where is None:
                        return {"runs": [], "error": why}
                    source = where
                ctx = {
                    "redis_url": redis.url,
                    "workdir": str(workdir),
                    "backend": task.backend,
                    "db_url": services.mysql_url(f"bench_{peer}")
                    if task.backend == "mysql" else "",
                    "extra": {"mqtt_port": mosquitto.port if mosquitto else 0,
                              "amqp_url": rabbit.url if rabbit else ""},
                }  # fmt: skip
                spec = {"peer": peer, "workload": task.workload, "params": task.params,
                        "repeats": repeats, "ctx": ctx}  # fmt: skip
                # W9 waits `recover` seconds after its kill, besides its budget.
                timeout = repeats * (
                    task.params["budget"] * 4 + task.params.get("recover", 0) * 1.5 + 120
                )
                return agent(python, [json.dumps(spec)], workdir, timeout, source)

            paired = [t for t in tasks if t.paired]
            for task in tasks:
                for peer in args.peer_list if not task.topiq_only else ["topiq"]:
                    if task.backend == "mysql" and peer not in ("topiq", "routemq"):
                        continue
                    if task.peers and peer not in ("topiq", *task.peers):
                        continue
                    if task.paired and peer == "topiq":
                        if task is paired[0]:  # all of them now, alternating run by run
                            for done, answer in alternate(paired, args.repeats, measure):
                                results.data[(done.source, peer)] = answer
                                say(f"{done.source} {peer}: {_brief(answer)}")
                        continue
                    started = time.monotonic()
                    answer = measure(task, peer, args.repeats)
                    results.data[(task.source, peer)] = answer
                    say(f"{task.source} {peer}: {_brief(answer)} "
                        f"({time.monotonic() - started:.0f}s)")  # fmt: skip
    facts["versions"] = {
        peer: agent(py, ["--versions", peer], workdir, 60)
        for peer, py in pythons.items()
        if isinstance(py, str) and ":" not in peer and peer != "tools"
    }
    return results, facts


Measure = Callable[[plan.Task, str, int], dict[str, Any]]


def alternate(
    paired: list[plan.Task], repeats: int, measure: Measure
) -> list[tuple[plan.Task, dict[str, Any]]]:
    """Topiq's runs of `paired`, one run of each in turn, `repeats` times over; each task's
    runs gathered into one answer (its first error kept)."""
    answers: dict[str, dict[str, Any]] = {
        task.source: {"runs": [], "error": None, "paired": True} for task in paired
    }
    for _ in range(repeats):
        for task in paired:
            answer = measure(task, "topiq", 1)
            gathered = answers[task.source]
            gathered["runs"].extend(answer.get("runs", []))
            gathered["error"] = gathered["error"] or answer.get("error")
    return [(task, answers[task.source]) for task in paired]


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _brief(answer: dict[str, Any]) -> str:
    if answer.get("error") and not answer.get("runs"):
        return f"n/a ({answer['error']})"
    keys = ("rate", "one", "efficiency", "p50", "growth", "recovery", "lost")
    shown = [
        f"{key}={run[key]:.4g}"
        for run in answer["runs"]
        for key in keys
        if isinstance(run.get(key), (int, float))
    ]
    return " ".join(shown) + (f" [error: {answer['error']}]" if answer.get("error") else "")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if "SCALING" in args.only_list:  # a table of its own: bench/scaling.py
        if args.only_list != ["SCALING"]:
            raise SystemExit("bench/run: --only scaling runs alone (it is a table of its own)")
        from bench import scaling

        forwarded = ["--smoke"] if args.smoke else []
        forwarded += ["--repeats", str(args.repeats), "--section", args.section or "scaling"]
        forwarded += ["--output", str(args.output)] if args.output is not None else []
        return scaling.main(forwarded)
    workdir = Path(tempfile.mkdtemp(prefix="topiq-bench-"))
    say(f"bench: scratch directory {workdir}")
    begun = time.monotonic()
    results, facts = run_all(args, workdir)
    facts["elapsed"] = time.monotonic() - begun
    facts["machine"] = {"cores": os.cpu_count(), "platform": platform.platform()}
    section = render(results, args.peer_list, header(args, facts), footer(args, facts))
    print(section)
    if args.output is not None:
        write(args.output, section, args.section)
        say(f"bench: wrote {args.output}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
