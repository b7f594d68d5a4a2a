"""`python main.py` itself: the embedded-broker demo, an unreachable broker, a taken port
(the broker moves to a free one; tests/test_readme.py does the same with 1883 taken)."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path

import pytest

from tests.mqtt.conftest import AppProcess, Broker, MosquittoProcess, free_port

pytestmark = [pytest.mark.mqtt, pytest.mark.process]


def fresh_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment as on a fresh machine: no broker configured, SQLite under `tmp_path`."""
    env = Broker("127.0.0.1", 0).env(QUEUE_CONNECTION="database")
    del env["MQTT_HOST"], env["MQTT_PORT"], env["MQTT_CLEAN_SESSION"]
    env["DB_SQLITE_PATH"] = str(tmp_path / "topiq.sqlite3")
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_the_demo_runs_the_whole_flow_on_the_embedded_broker(tmp_path: Path) -> None:
    env = fresh_env(tmp_path, MQTT_EMBEDDED_PORT=str(free_port()))
    # cwd is a scratch directory: no .env there, and the jobs write storage/ under it.
    demo = await AppProcess(["--demo", "--duration", "8"], env, cwd=tmp_path).start()
    code = await demo.wait(45)
    assert code == 0, demo.log
    summary = re.search(r"demo summary: (.*)", demo.stdout)
    assert summary, demo.stdout + demo.log
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", summary.group(1))}
    assert counts["received"] > 0 and counts["dispatched"] > 0, summary.group(0)
    assert counts["jobs_done"] > 0, summary.group(0) + "\n" + demo.log[-3000:]
    # The demo's one broken order may have failed for good by now (tests/test_readme.py
    # follows it to the failed store); nothing else fails.
    assert counts["jobs_failed"] <= 1 and counts["handler_errors"] == 0, summary.group(0)
    assert "embedded MQTT broker (amqtt) listening on 127.0.0.1" in demo.log
    # The IoT side (app/routes.py's state route, docs/iot.md "The demo"): state reports
    # coalesced, and the outcomes published on the status topics come in each device's order.
    assert counts["coalesced"] > 0 and counts["status_outcomes"] > 0, summary.group(0)
    assert counts["out_of_order"] == 0, summary.group(0)
    assert re.search(
        r"devices/sim-\d/status: job UpdateDeviceStateJob succeeded, state #\d", demo.log
    )
    stored = list((tmp_path / "storage" / "telemetry").glob("*.jsonl"))
    assert stored and stored[0].read_text().count("\n") > 0
    assert "Traceback" not in demo.log


@pytest.mark.timeout(60)
async def test_an_unreachable_broker_is_named_with_a_fix_and_retried(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there (yet)
    env = fresh_env(tmp_path, MQTT_HOST="127.0.0.1", MQTT_PORT=str(port), QUEUE_CONNECTION="memory")
    app = await AppProcess(["serve", "--app", "tests.mqtt.apps:flow"], env).start()
    try:
        line = await app.wait_for_line("cannot reach the MQTT broker")
        assert f"127.0.0.1:{port}" in line
        assert "set MQTT_HOST/MQTT_PORT in .env, or unset MQTT_HOST" in line
        mosquitto = MosquittoProcess(port, tmp_path / "mosquitto")
        await mosquitto.start()
        try:
            await app.wait_for_line("connected to the MQTT broker", timeout=30)
        finally:
            code = await app.stop(signal.SIGINT)
            await mosquitto.stop()
    finally:
        await app.kill()
    assert code == 0, app.log
    assert app.log.count("cannot reach the MQTT broker") == 1  # one clear line, not a flood


def _hold_default_port() -> socket.socket | None:
    """Hold 1883 (the default embedded port) if it is free; None when something has it."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 1883))
        holder.listen()
    except OSError:
        holder.close()
        return None
    return holder


@pytest.mark.timeout(30)
async def test_a_taken_embedded_port_moves_the_broker_to_a_free_one_and_names_it(
    tmp_path: Path,
) -> None:
    taken = 1883
    holder = _hold_default_port()
    try:
        env = fresh_env(tmp_path, QUEUE_CONNECTION="memory")
        app = await AppProcess(["serve", "--worker"], env, cwd=tmp_path).start()
        try:
            line = await app.wait_for_line("the embedded MQTT broker (amqtt) listens on")
            await app.wait_for_line("connected to the MQTT broker")
            code = await app.stop(signal.SIGINT)
        finally:
            await app.kill()
    finally:
        if holder is not None:
            holder.close()
    moved = re.search(r"listens on 127\.0\.0\.1:(\d+) instead", line)
    assert moved and int(moved.group(1)) != taken, line
    assert f"port {taken} on 127.0.0.1 is taken (another MQTT broker?)" in line
    assert f"MQTT_HOST=127.0.0.1 MQTT_PORT={taken} to use the broker on {taken}" in line
    assert code == 0, app.log


@pytest.mark.timeout(30)
async def test_an_embedded_port_set_on_purpose_is_kept_or_the_start_fails(tmp_path: Path) -> None:
    """Devices are told MQTT_EMBEDDED_PORT: a taken one is an error, never silently moved."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = fresh_env(tmp_path, MQTT_EMBEDDED_PORT=str(taken), QUEUE_CONNECTION="memory")
        app = await AppProcess(["serve"], env, cwd=tmp_path).start()
        try:
            code = await app.wait(20)
        finally:
            await app.kill()
    assert code == 1, app.log
    assert f"port {taken} on 127.0.0.1 is taken" in app.log
    assert f"MQTT_EMBEDDED_PORT={taken} asks the embedded broker for exactly that port" in app.log
