"""An earlier commit of Topiq checked out beside this one, to measure it in the same run.

`bench/run` measures W2 of the code before issue #13 (commit `BEFORE`) next to today's: a
`git worktree` of that commit under `bench/.venv/src/` (ignored by git, like the libraries'
environments), made once and reused. Its own `bench` and `core` packages run it: the agent is
started with the worktree first on PYTHONPATH, in Topiq's environment (the dependencies of an
earlier commit are a subset of today's), so the old code is measured exactly as it measured
itself. Nothing is ever committed from it; `git worktree remove bench/.venv/src/topiq-<rev>`
drops it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ROOT = HERE / ".venv" / "src"
#: The last commit before issue #13 (workflows and schedules): W2's baseline.
BEFORE = "5320e4d"


def _git(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def commit_of(rev: str) -> str | None:
    """The full hash `rev` names in this repository, or None."""
    done = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def path(rev: str) -> Path:
    return ROOT / f"topiq-{rev}"


def prepare(rev: str, create: bool) -> tuple[Path | None, str]:
    """The worktree of `rev` (made if missing and `create`): (its path, "") or (None, why not).

    A directory there whose HEAD is not `rev` is not used (the reason says what to do).
    """
    full = commit_of(rev)
    if full is None:
        return None, f"{rev!r} is not a commit of this repository"
    where = path(rev)
    if not where.exists():
        if not create:
            return None, f"no checkout of {rev} at {where} (a full `bench/run` makes it)"
        where.parent.mkdir(parents=True, exist_ok=True)
        done = _git("worktree", "add", "--detach", str(where), full)
        if done.returncode != 0:
            return None, f"`git worktree add` of {rev} failed: {done.stderr.strip()[:200]}"
    head = _git("rev-parse", "HEAD", cwd=where)
    if head.returncode != 0 or head.stdout.strip() != full:
        return None, (
            f"{where} is not a checkout of {rev}; remove it (`git worktree remove --force "
            f"{where}`) and run again"
        )
    if not (where / "bench" / "agent.py").exists():
        return None, f"commit {rev} has no bench/agent.py to measure itself with"
    return where, ""
