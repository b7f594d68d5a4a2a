"""W6: MQTT messages into the demo route, through the app and a worker, to the job's start.

The contract measured (DESIGN.md, app/routes.py): `python main.py serve` with `MQTT_HOST` set
subscribes to `devices/{device_id}/telemetry` and dispatches one job per valid reading
(`{"temperature": …, "ts": …}`); a `queue:work` worker runs it. Every message gets its own
device id (`bench-<seq>`), which keeps the route's per-device rate limit out of the way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.peers.base import REPO, Peer, Unsupported
from bench.worker_process import WorkerProcess

Figures = dict[str, Any]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _check_contract() -> None:
    if importlib.util.find_spec("core.mqtt") is None or not (REPO / "app" / "routes.py").exists():
        raise Unsupported("the MQTT app (core/mqtt, app/routes.py) does not exist yet")
    if importlib.util.find_spec("aiomqtt") is None:
        raise Unsupported("aiomqtt (the publisher's client) is not installed")


async def _publish(client: Any, device: str, sent: float) -> None:
    payload = json.dumps({"temperature": 21.5, "ts": sent})
    await client.publish(f"devices/{device}/telemetry", payload, qos=1)


async def w6_mqtt(peer: Peer, n: int, rate: float, budget: float, **_: Any) -> Figures:
    """Publish `n` messages at `rate`/s; p50/p99 publish-to-start, and how many never ran."""
    _check_contract()
    import aiomqtt

    port = int(peer.ctx.extra["mqtt_port"])
    probe = Path(peer.ctx.workdir) / f"probe-{time.time_ns()}.txt"
    env = {
        **peer.worker_env(),
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(port),
        "BENCH_PROBE_FILE": str(probe),
        "BENCH_EXPECT": str(n),
    }
    serve = [peer.python(), str(REPO / "main.py"), "serve"]
    work = [
        peer.python(), "-m", "bench.mqtt_probe", "queue:work", "--connection", "redis",
        "--queue", "default", "--concurrency", "32",
    ]  # fmt: skip
    with (
        WorkerProcess(peer, [], argv=serve, env=env, label="app") as app,
        WorkerProcess(peer, [], argv=work, env=env, label="probe") as worker,
    ):
        async with aiomqtt.Client("127.0.0.1", port) as client:
            # Warm-up: publish until a job of ours starts (the app has subscribed by then).
            for k in range(int(budget / 0.2) + 50):
                await _publish(client, f"warm-{k}", time.time())
                if await asyncio.to_thread(worker.wait, 0, 0.2) is not None:
                    break
            else:
                raise TimeoutError(f"no message reached a job within {budget + 10:.0f}s")
            loop = asyncio.get_running_loop()
            cpu = {"app": cpu_seconds(app.pid), "worker": cpu_seconds(worker.pid)}
            origin = loop.time()
            pending = []
            for i in range(n):
                delay = origin + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(asyncio.create_task(_publish(client, f"bench-{i}", time.time())))
            await asyncio.gather(*pending)
            await asyncio.to_thread(worker.wait, n, budget)
            # CPU per message, to tell a slow path from a busy machine.
            cpu = {k: cpu_seconds(p.pid) - cpu[k] for k, p in (("app", app), ("worker", worker))}
    lines = [line.split() for line in probe.read_text().splitlines() if line.strip()]
    seen = {int(seq) for seq, _, _ in lines}
    samples = sorted(float(start) - float(sent) for _, sent, start in lines)
    if not samples:
        raise TimeoutError("no benchmark message reached a job")
    return {
        "p50": statistics.median(samples) * 1000,
        "p99": samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))] * 1000,
        "lost": n - len(seen),
        "duplicates": len(lines) - len(seen),
        "app_cpu_us": cpu["app"] / n * 1e6,
        "worker_cpu_us": cpu["worker"] / n * 1e6,
    }
