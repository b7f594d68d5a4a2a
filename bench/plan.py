"""What a run measures: the workloads, their sizes, and which libraries each applies to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BUDGET = 10.0  # seconds of work per run before a slow library's run is cut short
#: W9: seconds after the kill a library has to run every job (Topiq's default lease of a
#: running job is its 60 s timeout + the 10 s margin; arq's job timeout is 300 s).
RECOVER = 90.0


@dataclass(frozen=True)
class Task:
    source: str  # the table's name for it (W5 is split by backend)
    workload: str  # the agent's workload
    backend: str
    topiq_only: bool
    params: dict[str, Any]
    peers: tuple[str, ...] = ()  # the libraries it applies to when not all (with Topiq)
    #: Topiq's runs of the tasks marked `paired` alternate run by run (one of each, then
    #: again), so that a change in the machine's load falls on all of them alike.
    paired: bool = False
    #: Run Topiq from this earlier commit (a worktree, see bench/checkout.py), not this checkout.
    checkout: str = ""


FULL: dict[str, dict[str, Any]] = {
    "W1": {"n": 20_000},
    "W2": {"n": 20_000},
    "W3": {"n": 2_000},
    "W4": {"n": 500, "rate": 200},
    "W5": {"n": 2_000},
    "W6": {"n": 5_000, "rate": 1_000},
    # W7 is Topiq alone and 200,000 jobs take longer than BUDGET: a budget of its own.
    "W7": {"n": 200_000, "first": 10_000, "budget": 120.0},
    "W8": {"n": 500},
    "W8p": {"n": 300, "poll": 0.01},
    # W9: kill at the half (or after `budget` s), then wait `recover` s after the kill.
    "W9": {"n": 5_000, "recover": RECOVER},
}
SMOKE: dict[str, dict[str, Any]] = {
    "W1": {"n": 200},
    "W2": {"n": 300},
    "W3": {"n": 100},
    "W4": {"n": 20, "rate": 200},
    "W5": {"n": 100},
    "W6": {"n": 50, "rate": 200},
    "W7": {"n": 2_000, "first": 200},
    "W8": {"n": 5},
    "W8p": {"n": 5, "poll": 0.01},
    # Smoke: Topiq's jobs with a 1 s timeout and lease margin, so a lease lapses in 2 s.
    "W9": {"n": 200, "recover": 20.0, "job_timeout": 1.0},
}


def tasks(only: list[str], smoke: bool, budget: float, before: str = "") -> list[Task]:
    """The runs to make, in order; `only` limits them to some workloads.

    W2 includes W2n (results not kept), W2p (random priorities 0..9), W2g (1,000 device
    groups, round robin), W2x2 (two worker processes: `queue:work --processes 2`) and, with
    `before` (a commit), W2b: W2 of that commit's code. W1, W2 and W4 include W1a, W2a and
    W4a: the same on the amqp connection (RabbitMQ). W5 includes W5mg and W5sg: W2g on
    MariaDB and on SQLite; W6 includes W6b, W6 of `before`; W8 includes W8p, W8 with the
    peers reading the result back every 10 ms (not their 0.5 s). Topiq's runs of the W2 family
    alternate with its W2's, run by run, so that all of them see the same load; the report
    divides them.

    A row of a family in `only` (W2X2, W5SG: upper case, as the harness passes them) runs
    that row and the rows whose names begin its name (W2, W5s): the rows the report divides it
    by, measured in the same run.
    """
    sizes = SMOKE if smoke else FULL
    out: list[Task] = []
    for name in ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"):
        rows = {w for w in only if w.startswith(name) and w != name}
        if only and name not in only and not rows:
            continue
        start = len(out)
        params = {"budget": budget, **sizes[name]}  # W7 has a budget of its own
        if name == "W2":
            out.append(Task("W2n", "W2n", "redis", True, params, paired=True))
            out.append(Task("W2", "W2", "redis", False, params, paired=True))
            if before:
                out.append(Task("W2b", "W2", "redis", True, params, paired=True, checkout=before))
            out.append(Task("W2p", "W2p", "redis", True, params, paired=True))
            out.append(Task("W2g", "W2g", "redis", True, params, paired=True))
            out.append(Task("W2x2", "W2x2", "redis", True, params, paired=True))
            out.append(Task("W2a", "W2", "amqp", True, params))
        elif name == "W6":
            out.append(Task("W6", "W6", "redis", True, params))
            if before:  # the same messages through the earlier commit's app and worker
                out.append(Task("W6b", "W6", "redis", True, params, checkout=before))
        elif name == "W8":
            out.append(Task("W8", "W8", "redis", False, params, peers=("arq", "saq")))
            # W8p: the peers read the result back every 10 ms, not every 0.5 s (their default)
            fast = {**sizes["W8p"], "budget": budget}
            out.append(Task("W8p", "W8", "redis", False, fast, peers=("arq", "saq")))
        elif name == "W9":
            kill = ("arq", "saq", "streaq", "taskiq", "rq")  # RouteMQ: no W9 adapter yet
            # Smoke: Topiq alone (a peer that loses jobs waits out all of `recover`).
            out.append(Task("W9", "W9", "redis", smoke, params, peers=kill))
            everysec = {**params, "fsync": "everysec"}
            out.append(Task("W9r", "W9r", "redis", smoke, everysec, peers=kill))
            if not smoke:  # the same as W9r but for the fsync: not worth the smoke's time
                out.append(Task("W9ra", "W9r", "redis", True, {**params, "fsync": "always"}))
        elif name == "W5":
            out.append(Task("W5m", "W5", "mysql", False, params))
            out.append(Task("W5mg", "W2g", "mysql", True, params))
            out.append(Task("W5s", "W5", "sqlite", True, params))
            out.append(Task("W5sg", "W2g", "sqlite", True, params))
        else:
            out.append(Task(name, name, "redis", name in ("W6", "W7"), params))
            if name in ("W1", "W4"):  # beside Redis: the amqp connection (RabbitMQ)
                out.append(Task(f"{name}a", name, "amqp", True, params))
        if rows and name not in only:  # some rows of the family, with the rows they divide by
            family = out[start:]
            out[start:] = [t for t in family if any(r.startswith(t.source.upper()) for r in rows)]
    return out
