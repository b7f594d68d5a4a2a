"""Every supervisorctl command in docs/operations.md and supervisor/README.md, run as written on
a real supervisord started from the shipped `supervisor/supervisord.conf`, and the app's MQTT
client id under it (`.env`'s `MQTT_CLIENT_ID` plus the per-process suffix).

The supervisord runs in a scratch copy of the project (code and `.venv` linked, `supervisor/`
copied, its own `.env` and `storage/`). Commands written for the checkout's supervisord
(`.venv/bin/supervisorctl -c supervisor/supervisord.conf ...`) run unchanged in the copy.
Commands written for the system's supervisord (`sudo supervisorctl ...`) run with `sudo` and
`supervisorctl` on PATH standing for that supervisord: `sudo` runs its command as is, and
`supervisorctl` is the virtualenv's with the copy's config.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.mqtt.options import ConnectionOptions
from tests.conftest import ROOT, make_settings
from tests.mqtt.conftest import Broker, broker  # noqa: F401  (the fixture, used by name)
from tests.ops.test_supervisor import SUPERVISORCTL, SUPERVISORD, until

DOCS = (ROOT / "docs" / "operations.md", ROOT / "supervisor" / "README.md")
ACTIONS = ("status", "restart", "stop", "start", "reread", "update")
SETTING_PREFIXES = ("MQTT_", "QUEUE_", "DB_", "REDIS_", "WORKER_", "LOG_", "ENABLE_", "APP_")


def documented_commands() -> list[str]:
    """Each supervisorctl command the docs show, in order: code spans, console and indented
    lines; prose that only names the tool (`sudo supervisorctl` instead) is not a command."""
    commands: list[str] = []
    for doc in DOCS:
        text = doc.read_text()
        spans = re.findall(r"`([^`\n]*supervisorctl[^`\n]*)`", text)
        lines = re.findall(r"^(?:\$ |    )(.*supervisorctl.*)$", text, flags=re.M)
        for found in sorted(
            set(spans) | set(lines), key=lambda c: text.index(c) if c in text else 0
        ):
            command = found.split("  #")[0].strip()
            words = command.replace("&&", " ").split()
            if any(word in ACTIONS for word in words):
                commands.append(command)
    return commands


def test_the_docs_show_the_commands_this_test_runs() -> None:
    commands = documented_commands()
    assert ".venv/bin/supervisorctl -c supervisor/supervisord.conf restart topiq-app" in commands
    assert "sudo supervisorctl restart topiq-app" in commands
    assert "sudo supervisorctl reread && sudo supervisorctl update" in commands
    assert "sudo supervisorctl restart 'topiq-worker-default:*'" in commands
    assert all("topiq-app:" not in c or "topiq-app:*" in c for c in commands)


def test_the_client_id_is_the_dotenv_one_plus_the_suffix() -> None:
    settings = make_settings(mqtt_client_id="plant-7", mqtt_client_id_suffix="-03")
    assert ConnectionOptions.from_settings(settings).client_id == "plant-7-03"
    assert ConnectionOptions.from_settings(make_settings(mqtt_client_id="plant-7")).client_id == (
        "plant-7"
    )


@dataclass
class Supervised:
    project: Path
    env: dict[str, str]
    client_id: str

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )

    def ctl(self, *args: str) -> str:
        return self.run(
            " ".join([".venv/bin/supervisorctl", "-c", "supervisor/supervisord.conf", *args])
        ).stdout

    def app_pid(self) -> int | None:
        match = re.search(r"^topiq-app\s+RUNNING\s+pid (\d+)", self.ctl("status"), flags=re.M)
        return int(match.group(1)) if match else None

    def app_log(self) -> str:
        log = self.project / "storage" / "logs" / "topiq-app_00.log"
        return log.read_text() if log.exists() else ""


@pytest.fixture
def supervised(broker: Broker) -> Iterator[Supervised]:  # noqa: F811
    # A short directory: the socket path must stay under ~100 characters.
    where = Path(tempfile.mkdtemp(prefix="tq-sv-"))
    project = where / "project"
    project.mkdir()
    for name in ("core", "app", "main.py", ".venv"):
        (project / name).symlink_to(ROOT / name)
    shutil.copytree(ROOT / "supervisor", project / "supervisor")
    client_id = f"from-dotenv-{uuid.uuid4().hex[:8]}"
    (project / ".env").write_text(
        f"MQTT_HOST={broker.host}\nMQTT_PORT={broker.port}\nMQTT_CLIENT_ID={client_id}\n"
    )
    shims = where / "bin"
    shims.mkdir()
    (shims / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (shims / "supervisorctl").write_text(
        f'#!/bin/sh\nexec {SUPERVISORCTL} -c {project}/supervisor/supervisord.conf "$@"\n'
    )
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
    env.update(PATH=f"{shims}:{env['PATH']}", PYTHONDONTWRITEBYTECODE="1")
    state = Supervised(project, env, client_id)
    try:
        yield state
    finally:
        state.ctl("shutdown")
        pidfile = project / "storage" / "supervisord.pid"
        until(lambda: not pidfile.exists(), 120, "supervisord to shut down")
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.mqtt
@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not SUPERVISORD.exists(), reason="supervisord is not in the virtualenv")
def test_every_documented_supervisorctl_command_works_as_written(
    supervised: Supervised,
) -> None:
    # The setup the docs start with, as written.
    for command in (
        "mkdir -p storage/logs",
        ".venv/bin/supervisord -c supervisor/supervisord.conf",
    ):
        started = supervised.run(command)
        assert started.returncode == 0, started.stdout + started.stderr
    until(lambda: supervised.app_pid() is not None, 60, "topiq-app to be RUNNING")
    expected_id = f"{supervised.client_id}-00"
    until(lambda: "connected to the MQTT broker" in supervised.app_log(), 60, "the app to connect")
    assert f"as {expected_id!r}" in supervised.app_log()

    for command in documented_commands():
        before = supervised.app_pid()
        result = supervised.run(command)
        out = result.stdout + result.stderr
        assert "ERROR" not in out and "error:" not in out, f"{command}:\n{out}"
        words = command.split()
        if words[-1] == "status":
            # supervisorctl status exits 3 while a process is stopped (the pool, just stopped).
            assert result.returncode in (0, 3), f"{command}:\n{out}"
            assert re.search(r"^topiq-app\s+RUNNING", out, flags=re.M), out
        else:
            assert result.returncode == 0, f"{command}:\n{out}"
        if "restart topiq-app" in command:
            assert "topiq-app: stopped" in out and "topiq-app: started" in out, out
            assert supervised.app_pid() not in (None, before)
        if "stop 'topiq-worker-default:*'" in command:
            assert out.count("stopped") == 4, out
            supervised.ctl("start", "'topiq-worker-default:*'")  # back for the next command
        if "restart 'topiq-worker-default:*'" in command:
            assert out.count("started") == 4, out

    # Every restart came back with the same client id, from .env plus the suffix.
    ids = set(re.findall(r"connected to the MQTT broker at \S+ as '([^']+)'", supervised.app_log()))
    assert ids == {expected_id}
