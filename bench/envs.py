"""The libraries' environments: one virtual environment each under `bench/.venv/`, all built
from one interpreter, so every library (Topiq included) runs on the same Python.

One environment per library because their pins collide (arq needs redis-py < 6, taskiq-redis
>= 8). Topiq is installed editable from this repository. The interpreter is Python 3.12 when
there is one (RouteMQ requires it: on 3.11 its worker stalls on every job), else the one
running the harness. Peer versions are pinned, for repeatable figures.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE / ".venv"

#: environment -> pip requirements ("-e <repo>" for Topiq)
REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "topiq": ("-e", f"{HERE.parent}[amqp]"),  # with aio-pika: the amqp rows (W1a, W2a, W4a)
    "routemq": ("routemq==0.25.0", "greenlet", "redis[hiredis]>=5.0.1"),
    "arq": ("arq==0.28.0", "hiredis"),
    "saq": ("saq[redis,hiredis]==0.26.4", "typing_extensions"),  # it imports it, undeclared
    "streaq": ("streaq==7.2.0", "redis"),  # redis-py only for bench/marks.py (streaq: coredis)
    "taskiq": ("taskiq==0.13.0", "taskiq-redis==1.2.4", "redis[hiredis]"),
    "rq": ("rq==3.0.0", "hiredis"),
    "tools": ("py-spy==0.4.3", "pyinstrument==5.1.3"),
}


def base_python() -> str:
    """`BENCH_PYTHON`, else a working Python 3.12 (pyenv's, then PATH's), else this one."""
    if os.environ.get("BENCH_PYTHON"):
        return os.environ["BENCH_PYTHON"]
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(f"{pyenv}/versions/3.12.*/bin/python3.12"), reverse=True)
    candidates.append(shutil.which("python3.12") or "")
    for candidate in filter(None, candidates):
        try:
            version_of(candidate)
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    return sys.executable


def python(name: str) -> Path:
    return ROOT / name / "bin" / "python"


def version_of(interpreter: str | Path) -> str:
    done = subprocess.run(
        [str(interpreter), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _stamp(name: str, base: str) -> str:
    # Topiq's dependencies come from pyproject.toml: a change there rebuilds its environment.
    extra = (HERE.parent / "pyproject.toml").read_text() if name == "topiq" else ""
    digest = hashlib.sha256(extra.encode()).hexdigest()[:12]
    return " ".join((version_of(base), *REQUIREMENTS[name], digest))


def ready(name: str) -> bool:
    """Whether the environment exists (built by `build`); never installs anything."""
    return python(name).exists() and (ROOT / name / ".bench-stamp").exists()


def build(name: str, log: Path, base: str) -> str | None:
    """Create the environment, or rebuild it if its pins or interpreter changed.

    Returns None on success, else the reason it failed.
    """
    target, stamp = ROOT / name, _stamp(name, base)
    marker = target / ".bench-stamp"
    ROOT.mkdir(parents=True, exist_ok=True)
    # One build at a time: two harnesses started together (two engineers' runs) would else
    # delete the environment the other one is building.
    with (ROOT / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(name) and marker.read_text() == stamp:
            return None
        return _make(name, target, marker, stamp, log, base)


def _make(name: str, target: Path, marker: Path, stamp: str, log: Path, base: str) -> str | None:
    shutil.rmtree(target, ignore_errors=True)
    with log.open("ab") as out:
        steps = [
            [base, "-m", "venv", str(target)],
            [str(python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *REQUIREMENTS[name]],
        ]  # fmt: skip
        for step in steps:
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                return f"`{' '.join(step[-3:])}` failed (log: {log})"
    marker.write_text(stamp)
    return None
