"""README.md as a new user meets it: its commands and its code example, run as written.

Each test works in a scratch copy of the project (its own `storage/`, no `.env`) whose `.venv`
is this checkout's, with no Topiq setting in the environment, as on a fresh machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
SETTING_PREFIXES = ("MQTT_", "QUEUE_", "DB_", "REDIS_", "WORKER_", "LOG_", "ENABLE_", "APP_")


def blocks(language: str) -> list[str]:
    """The README's fenced code blocks in `language`, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```\n", README, flags=re.S | re.M)


def command_lines(block: str) -> list[str]:
    """The commands of a bash block, without their trailing comments."""
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def fresh_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return env


def project_copy(where: Path) -> Path:
    """A copy of the project in `where`: code and `.venv` linked, `scripts/` and
    `pyproject.toml` copied. The copy's `pyproject.toml` is dated before the venv's install
    stamp, so `scripts/setup` finds the shared venv installed and only checks it (a reinstall
    from the copy would point the shared venv's editable install at the copy)."""
    project = where / "project"
    project.mkdir()
    for name in ("core", "app", "main.py", ".venv"):
        (project / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "scripts", project / "scripts")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    installed = (ROOT / ".venv" / ".topiq-installed").stat().st_mtime
    os.utime(project / "pyproject.toml", (installed - 60, installed - 60))
    return project


@contextlib.contextmanager
def port_1883_taken() -> Iterator[None]:
    """Port 1883 in use for the block, as on a machine running Mosquitto (it may already be)."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 1883))
        holder.listen()
    except OSError:
        holder.close()  # taken already: the situation this stands for
        yield
        return
    with holder:
        yield


class Demo:
    """The README's first command, run once with `--duration` added."""

    def __init__(self, project: Path, result: subprocess.CompletedProcess[str]) -> None:
        self.project = project
        self.code = result.returncode
        self.out = result.stdout
        summary = re.search(r"demo summary: (.*)", self.out)
        assert summary, self.out[-4000:]
        self.counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", summary.group(1))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    first = command_lines(blocks("bash")[0])[0]
    assert first == "scripts/setup && .venv/bin/python main.py --demo"
    project = project_copy(tmp_path_factory.mktemp("readme-demo"))
    with port_1883_taken():
        result = subprocess.run(
            ["bash", "-c", f"{first} --duration 12"],
            cwd=project,
            env=fresh_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=90,
            check=False,
        )
    return Demo(project, result)


def test_the_readme_opens_with_its_two_commands() -> None:
    assert README.startswith("# Topiq\n\n```bash\nscripts/setup && .venv/bin/python main.py --demo")
    assert command_lines(blocks("bash")[0]) == [
        "scripts/setup && .venv/bin/python main.py --demo",
        "scripts/test",
    ]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_first_command_runs_with_port_1883_taken_and_names_its_port(demo: Demo) -> None:
    assert demo.code == 0, demo.out[-4000:]
    moved = re.search(
        r"port 1883 on 127\.0\.0\.1 is taken \(another MQTT broker\?\): the embedded MQTT broker "
        r"\(amqtt\) listens on 127\.0\.0\.1:(\d+) instead",
        demo.out,
    )
    assert moved, demo.out[:3000]
    assert int(moved.group(1)) != 1883
    assert demo.counts["received"] > 0 and demo.counts["jobs_done"] > 0, demo.counts
    assert demo.counts["handler_errors"] == 0, demo.counts
    assert "Traceback" not in demo.out


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_shows_a_job_retried_then_kept_in_the_failed_store(demo: Demo) -> None:
    assert demo.counts["jobs_failed"] == 1 and demo.counts["jobs_retried"] == 2, demo.counts
    assert "order 1001: item 'gift-card' has no price" in demo.out
    assert (
        "1 job failed for good and is kept in the failed store: "
        "`.venv/bin/python main.py queue:failed` lists failed jobs"
    ) in demo.out
    # The command the demo names, run where the user ran the demo, shows the job.
    listing = subprocess.run(
        [".venv/bin/python", "main.py", "queue:failed", "--json"],
        cwd=demo.project,
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert '"total":1' in listing.stdout.replace(" ", ""), listing.stdout
    assert "ProcessOrderJob" in listing.stdout and "has no price" in listing.stdout


@pytest.mark.process
@pytest.mark.timeout(90)
def test_the_code_example_runs_as_written(tmp_path: Path) -> None:
    job_block, script_block = blocks("python")
    commands = command_lines(blocks("bash")[1])
    # The job the README shows is the file that ships, word for word.
    path, body = job_block.split("\n", 1)
    assert path == "# app/jobs/store_reading_job.py"
    shipped = (ROOT / "app" / "jobs" / "store_reading_job.py").read_text()
    assert shipped.split('"""', 2)[2].lstrip("\n") == body
    # The script, saved where and as the README says.
    assert "save this one as `send_reading.py` in the\nproject directory" in README
    assert script_block.startswith("# send_reading.py\n")
    project = project_copy(tmp_path)
    (project / "send_reading.py").write_text(script_block)
    assert commands == [
        ".venv/bin/python send_reading.py",
        ".venv/bin/python main.py queue:work --stop-when-empty",
    ]
    outputs = []
    for command in commands:
        run = subprocess.run(
            ["bash", "-c", command],
            cwd=project,
            env=fresh_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, f"{command}:\n{run.stdout}"
        outputs.append(run.stdout)
    queued = re.search(r"queued job ([0-9a-f]{32})", outputs[0])
    assert queued, outputs[0]
    assert re.search(rf"job {queued.group(1)} StoreReadingJob try 1/5 done", outputs[1]), outputs[1]
    stored = (project / "storage" / "readings.jsonl").read_text()
    assert stored == '{"device_id":"sensor-7","value":21.5}\n'
