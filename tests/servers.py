"""Private Redis and Mosquitto servers for one test session.

The suite never touches a server it did not start: each pytest session starts its own
`redis-server` and `mosquitto` on free loopback ports, in a temporary folder, and ends them when
it ends (or when it dies: the children get SIGTERM with their parent). A developer's own Redis on
6379 or Mosquitto on 1883 is never flushed, and two test runs on one machine cannot disturb each
other. MariaDB is the exception (too slow to start per session): tests use a database of their
own on the server `scripts/services up` started, see `mysql_url` in `tests/conftest.py`.

`TOPIQ_TEST_REDIS_URL` / `TOPIQ_TEST_MQTT_HOST` + `TOPIQ_TEST_MQTT_PORT` point the suite at a
server of your choice instead; the Redis database named there is flushed between tests.
"""

from __future__ import annotations

import atexit
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "PrivateCluster",
    "PrivateServer",
    "free_port",
    "private_mosquitto",
    "private_redis",
    "private_redis_cluster",
    "start_redis_cluster",
]

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_us() -> None:
    """In a child before exec: SIGTERM when the test process dies, even if it crashes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


class PrivateServer:
    """One server process of the session's own, on a free port."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: Path) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_us,
            )
        atexit.register(self.stop)

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the private {self.name} did not start on {self.port}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_started: dict[str, PrivateServer] = {}


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="topiq-test-servers-"))


def private_redis() -> PrivateServer | None:
    """The session's own redis-server (None when it is not installed)."""
    if "redis" in _started:
        return _started["redis"]
    binary = _binary("redis-server")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    server = PrivateServer(
        "redis-server",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "16",
        ],
        port,
        workdir,
    )
    server.wait_listening()
    _started["redis"] = server
    return server


def private_mosquitto() -> PrivateServer | None:
    """The session's own Mosquitto (None when it is not installed)."""
    if "mosquitto" in _started:
        return _started["mosquitto"]
    binary = _binary("mosquitto")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # The tests hold many unacknowledged messages on purpose; keep them all.
        "max_queued_messages 100000\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\n"
        # As root, Mosquitto would switch to its own user.
        f"user {getpass.getuser()}\n"
    )
    server = PrivateServer("mosquitto", [binary, "-c", str(config)], port, workdir)
    server.wait_listening()
    _started["mosquitto"] = server
    return server


class PrivateCluster:
    """A real Redis Cluster of the session's own: `masters` primaries, each with `replicas`
    replicas, on free loopback ports (cluster bus ports chosen free too, not port + 10000).

    `nodes` is the REDIS_CLUSTER_NODES value naming every node. Failover tests kill a primary
    (`kill_node`) and wait for its replica to be promoted (`wait_ok`)."""

    def __init__(self, servers: list[PrivateServer], workdir: Path) -> None:
        self.servers = servers
        self.workdir = workdir

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        binary = _binary("redis-cli") or "redis-cli"
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def alive(self) -> list[PrivateServer]:
        return [s for s in self.servers if s.proc.poll() is None]

    def primaries(self) -> list[int]:
        """The ports of the live nodes that are primaries now."""
        out = []
        for server in self.alive():
            role = self.cli(server.port, "role").split("\n", 1)[0].strip()
            if role == "master":
                out.append(server.port)
        return out

    def flush(self) -> None:
        for port in self.primaries():
            self.cli(port, "flushall")

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and agrees all 16384 slots are served."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            states = []
            for server in self.alive():
                try:
                    states.append(self.cli(server.port, "cluster", "info", timeout=3))
                except subprocess.TimeoutExpired:
                    states.append("")
            if states and all(
                "cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states
            ):
                return
            last = "\n---\n".join(states)
            time.sleep(0.1)
        raise RuntimeError(f"the private Redis Cluster is not ok after {timeout}s:\n{last}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_redis_cluster(
    masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000, appendonly: bool = False
) -> PrivateCluster | None:
    """Start a new private Redis Cluster (None when redis-server is not installed)."""
    binary = _binary("redis-server")
    cli = _binary("redis-cli")
    if binary is None or cli is None:
        return None
    workdir = _workdir()
    servers = []
    for n in range(masters * (1 + replicas)):
        port, bus = free_port(), free_port()
        while bus == port:
            bus = free_port()
        node_dir = workdir / f"node-{n}"
        node_dir.mkdir()
        servers.append(
            PrivateServer(
                f"redis-cluster-{n}",
                [
                    binary,
                    "--port",
                    str(port),
                    "--cluster-port",
                    str(bus),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(node_dir),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if appendonly else "no",
                ],
                port,
                node_dir,
            )
        )
    cluster = PrivateCluster(servers, workdir)
    try:
        for server in servers:
            server.wait_listening()
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}"
            )
        cluster.wait_ok()
        # Replicas attach asynchronously: wait until every primary has its replicas online.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = [
                cluster.cli(port, "info", "replication").count("state=online")
                for port in cluster.primaries()
            ]
            if len(counts) == masters and all(c >= replicas for c in counts):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the private Redis Cluster's replicas did not come online")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def private_redis_cluster() -> PrivateCluster | None:
    """The session's shared private Redis Cluster (3 primaries, 3 replicas), started once.

    Tests that kill nodes start a cluster of their own with `start_redis_cluster`."""
    if "cluster" in _clusters:
        return _clusters["cluster"]
    cluster = start_redis_cluster()
    if cluster is not None:
        _clusters["cluster"] = cluster
    return cluster


_clusters: dict[str, PrivateCluster] = {}
