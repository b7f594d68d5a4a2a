"""The code in docs/scaling.md does what the page says: its example (docs/examples/
scaling_queues.py) spreads work over queues on three different primaries of a real Redis
Cluster, the page's `queue:work` lines drain them there, its configuration blocks load and
choose the topology they are shown for, and its command lines parse."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import redis

from core.cli import build_parser
from core.queue.drivers.redis import RedisDriver
from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import Settings, queue_location
from tests.conftest import ROOT, docs_example, make_settings
from tests.processes import WorkerProcess
from tests.servers import PrivateCluster

pytestmark = [pytest.mark.timeout(90)]

GUIDE = ROOT / "docs" / "scaling.md"
EXAMPLE = "docs/examples/scaling_queues.py"


def blocks(language: str) -> list[str]:
    """The page's fenced code blocks of `language`, in order."""
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def command_lines() -> list[list[str]]:
    """The `python main.py ...` lines of the page's console blocks, as argv (after main.py)."""
    lines = []
    for block in blocks("console"):
        for line in block.splitlines():
            if line.startswith("$ python main.py "):
                lines.append(shlex.split(line[len("$ python main.py ") :].rstrip(" &")))
    return lines


def test_the_guide_shows_the_example_verbatim() -> None:
    body = (ROOT / EXAMPLE).read_text().split('"""', 2)[2].strip()
    assert f"```python\n# {EXAMPLE}\n{body}\n```" in GUIDE.read_text()


def test_the_example_queues_land_on_three_primaries(redis_cluster: PrivateCluster) -> None:
    example = docs_example("scaling_queues")
    host, port = redis_cluster.nodes.split(",")[0].rsplit(":", 1)
    client = redis.RedisCluster(host=host, port=int(port))
    try:
        primaries = set()
        for name in example.TELEMETRY_QUEUES:
            key = f"topiq:{{topiq:{name}}}:ready"  # a key as the driver writes it
            assert example.slot(name) == client.keyslot(key)  # type: ignore[no-untyped-call]
            assert example.slot(name) == int(
                redis_cluster.cli(int(port), "cluster", "keyslot", key)
            )
            primaries.add(client.get_node_from_key(key).name)  # type: ignore[no-untyped-call]
        assert len(primaries) == 3, primaries
    finally:
        client.close()
    devices = [f"sensor-{i}" for i in range(60)]
    assert {example.telemetry_queue(d) for d in devices} == set(example.TELEMETRY_QUEUES)
    assert all(example.telemetry_queue(d) == example.telemetry_queue(d) for d in devices)


@pytest.mark.process
def test_the_example_dispatches_and_the_guide_workers_drain_it_on_a_cluster(
    redis_cluster: PrivateCluster, tmp_path: Path
) -> None:
    """`store()` on a real cluster puts each device's readings in its queue, each queue's keys
    on its own primary; the page's first `queue:work --processes` line (plus
    --stop-when-empty) runs every one of them."""
    redis_cluster.flush()
    example = docs_example("scaling_queues")
    overrides = {
        "redis_url": "redis://127.0.0.1:6379/0",
        "redis_cluster_nodes": redis_cluster.nodes,
    }
    devices = [f"sensor-{i}" for i in range(30)]

    async def dispatch() -> dict[str, int]:
        settings = make_settings(queue_connection="redis", **overrides)
        async with QueueManager(settings) as manager:
            set_default_manager(manager)
            try:
                for i, device in enumerate(devices):
                    handle = await example.store(device, 20.0 + i % 5)
                    assert re.fullmatch(r"[0-9a-f]{32}", str(handle))
                return {q: await manager.size(q) for q in example.TELEMETRY_QUEUES}
            finally:
                set_default_manager(None)

    sizes = asyncio.run(dispatch())
    expected = {q: 0 for q in example.TELEMETRY_QUEUES}
    for device in devices:
        expected[example.telemetry_queue(device)] += 1
    assert sizes == expected
    for name in example.TELEMETRY_QUEUES:  # each queue's keys on the primary of its slot
        slot = str(example.slot(name))
        counts = [
            int(redis_cluster.cli(p, "cluster", "countkeysinslot", slot))
            for p in redis_cluster.primaries()
        ]
        assert sorted(c > 0 for c in counts) == [False, False, True], (name, counts)

    argv = next(a for a in command_lines() if "--processes" in a)
    assert argv[0] == "queue:work"
    env = {f"{k.upper()}": str(v) for k, v in overrides.items()}
    env |= {"QUEUE_CONNECTION": "redis", "WORKER_SLEEP": "0.05", "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess([*argv[1:], "--stop-when-empty"], env, tmp_path / "w.log", tmp_path)
    try:
        assert worker.wait(60) == 0, worker.output
    finally:
        worker.stop()
    stored = list((tmp_path / "storage" / "telemetry").glob("*.jsonl"))
    lines = [line for path in stored for line in path.read_text().splitlines()]
    assert sorted(re.findall(r'"device_id":"(sensor-\d+)"', "\n".join(lines))) == sorted(devices)
    assert asyncio.run(_sizes(overrides, example.TELEMETRY_QUEUES)) == [0, 0, 0]


async def _sizes(overrides: dict[str, str], queues: tuple[str, ...]) -> list[int]:
    async with QueueManager(make_settings(queue_connection="redis", **overrides)) as manager:
        return [await manager.size(q) for q in queues]


def test_the_configuration_blocks_choose_their_topology(tmp_path: Path) -> None:
    shown = blocks("dotenv")
    assert len(shown) == 3
    topologies = []
    for i, block in enumerate(shown):
        env_file = tmp_path / f"{i}.env"
        env_file.write_text(block)
        settings = Settings.load(env_file=env_file)
        assert settings.queue_connection == "redis"
        topologies.append(RedisDriver("redis", settings).topology)
        if settings.redis_cluster_nodes:
            # the worker's first line on the page names what this block configures
            assert queue_location(settings, "redis") in GUIDE.read_text()
    assert topologies == ["single", "sentinel", "cluster"]
    sentinel = Settings.load(env_file=tmp_path / "1.env")
    assert sentinel.redis_sentinel_master == "topiq"
    assert sentinel.redis_wait_replicas == 1
    assert sentinel.redis_wait_timeout == 0.5


def test_the_command_lines_parse() -> None:
    lines = command_lines()
    assert len(lines) >= 4
    for argv in lines:
        args = build_parser(argv[0]).parse_args(argv)
        if "--processes" in argv:
            assert args.processes == int(argv[argv.index("--processes") + 1])


def test_the_guides_link_the_page() -> None:
    assert "(docs/scaling.md)" in (ROOT / "README.md").read_text()
    assert "(scaling.md)" in (ROOT / "docs" / "configuration.md").read_text()
    assert "docs/scaling.md" in (ROOT / ".env.example").read_text()


def test_the_services_lines_name_what_the_script_starts() -> None:
    """`scripts/services cluster|sentinel status` (which starts nothing) lists the nodes the
    page says `up` starts, on the ports it names."""
    shown = [
        line.split()[2:]
        for block in blocks("console")
        for line in block.splitlines()
        if line.startswith("$ scripts/services ")
    ]
    assert shown == [["cluster", "up"], ["sentinel", "up"]]
    ports = {
        "cluster": [f"127.0.0.1:{p}" for p in range(7000, 7006)],
        "sentinel": ["127.0.0.1:6380", "127.0.0.1:6381"]
        + [f"127.0.0.1:{p}" for p in (26379, 26380, 26381)],
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOPIQ_")}
    for kind, expected in ports.items():
        done = subprocess.run(
            [str(ROOT / "scripts" / "services"), kind, "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean,
            check=False,
        )
        # the first address of each line (a running node's line may name others too)
        listed = re.findall(r"^[^\n]*?(127\.0\.0\.1:\d+)", done.stdout, re.M)
        assert listed == expected, done.stdout + done.stderr
    guide = " ".join(GUIDE.read_text().split())
    assert "3 primaries and 3 replicas on `127.0.0.1:7000` to `7005`" in guide
    assert (
        "a primary on 6380, its replica on 6381 (append-only), and 3 sentinels on 26379 to 26381"
        in guide
    )
