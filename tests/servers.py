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
    "PrivateSentinel",
    "PrivateServer",
    "free_port",
    "private_mosquitto",
    "private_redis",
    "private_redis_cluster",
    "start_redis_cluster",
    "start_redis_sentinel",
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


class PrivateSentinel:
    """A real Sentinel setup of the test's own: a primary, its replicas and sentinel processes,
    on free loopback ports, with short down-after/failover timeouts.

    `sentinels` is the REDIS_SENTINELS value, `master_name` the REDIS_SENTINEL_MASTER one.
    `failover()` forces `SENTINEL FAILOVER`, `kill_primary()` kill -9s the primary, and
    `wait_new_primary(old)` waits until every live sentinel names a new primary that says so."""

    def __init__(
        self,
        servers: list[PrivateServer],
        watchers: list[PrivateServer],
        master_name: str,
        workdir: Path,
    ) -> None:
        self.servers = servers
        self.watchers = watchers
        self.master_name = master_name
        self.workdir = workdir

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{w.port}" for w in self.watchers)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        binary = _binary("redis-cli") or "redis-cli"
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def role(self, port: int) -> str:
        try:
            return self.cli(port, "role", timeout=3).split("\n", 1)[0].strip()
        except subprocess.TimeoutExpired:
            return ""

    def server(self, port: int) -> PrivateServer:
        return next(s for s in self.servers if s.port == port)

    def reported(self) -> list[int | None]:
        """The primary's port as each live sentinel reports it (None: no answer)."""
        out: list[int | None] = []
        for watcher in self.watchers:
            if watcher.proc.poll() is not None:
                continue
            try:
                lines = self.cli(
                    watcher.port,
                    "sentinel",
                    "get-master-addr-by-name",
                    self.master_name,
                    timeout=3,
                ).split()
            except subprocess.TimeoutExpired:
                lines = []
            out.append(int(lines[1]) if len(lines) == 2 and lines[1].isdigit() else None)
        return out

    def primary(self) -> int:
        """The primary's port, as the sentinels agree on it."""
        ports = set(self.reported())
        if len(ports) != 1 or None in ports:
            raise RuntimeError(f"the sentinels do not agree on a primary: {ports}")
        port = ports.pop()
        assert port is not None
        return port

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the sentinels agree on a primary that has every live replica online and each
        sentinel knows the others and the replicas (a failover then needs no discovery)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            ports = set(self.reported())
            if len(ports) == 1 and None not in ports:
                port = ports.pop()
                assert port is not None
                live = [s for s in self.servers if s.proc.poll() is None and s.port != port]
                info = self.cli(port, "info", "replication", timeout=3)
                masters = [
                    self.cli(w.port, "sentinel", "master", self.master_name, timeout=3).split()
                    for w in self.watchers
                    if w.proc.poll() is None
                ]
                known = all(
                    _field(m, "num-other-sentinels") == str(len(self.watchers) - 1)
                    and _field(m, "num-slaves") is not None
                    and int(_field(m, "num-slaves") or 0) >= len(live)
                    for m in masters
                )
                if info.count("state=online") >= len(live) and known:
                    return
                last = info
            time.sleep(0.05)
        raise RuntimeError(f"the private Sentinel setup is not ready after {timeout}s:\n{last}")

    def failover(self) -> int:
        """Force `SENTINEL FAILOVER`; returns the old primary's port (see wait_new_primary)."""
        old = self.primary()
        reply = self.cli(self.watchers[0].port, "sentinel", "failover", self.master_name)
        if "OK" not in reply:
            raise RuntimeError(f"SENTINEL FAILOVER refused: {reply.strip()}")
        return old

    def kill_primary(self) -> int:
        """kill -9 the primary; returns its port."""
        old = self.primary()
        server = self.server(old)
        server.proc.kill()
        server.proc.wait(10)
        return old

    def wait_new_primary(self, old: int, timeout: float = 30.0) -> int:
        """Until every live sentinel names the same primary other than `old`, and it answers
        as a primary; returns its port."""
        deadline = time.monotonic() + timeout
        ports: set[int | None] = set()
        while time.monotonic() < deadline:
            ports = set(self.reported())
            if len(ports) == 1 and None not in ports and old not in ports:
                port = ports.pop()
                assert port is not None
                if self.role(port) == "master":
                    return port
            time.sleep(0.02)
        raise RuntimeError(f"no new primary after {timeout}s (the sentinels say {ports})")

    def stop(self) -> None:
        for server in [*self.watchers, *self.servers]:
            server.stop()


def _field(flat: list[str], name: str) -> str | None:
    """A field of a flat name/value reply (`SENTINEL MASTER`)."""
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == name:
            return flat[i + 1]
    return None


def start_redis_sentinel(
    replicas: int = 1,
    sentinels: int = 3,
    master_name: str = "topiq",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    appendonly: bool = False,
) -> PrivateSentinel | None:
    """Start a new private primary + `replicas` replicas + `sentinels` sentinels (quorum: a
    majority); None when redis-server is not installed."""
    binary = _binary("redis-server")
    if binary is None or _binary("redis-cli") is None:
        return None
    workdir = _workdir()
    servers: list[PrivateServer] = []
    watchers: list[PrivateServer] = []
    setup = PrivateSentinel(servers, watchers, master_name, workdir)
    try:
        primary_port = 0
        for n in range(1 + replicas):
            port = free_port()
            node_dir = workdir / f"node-{n}"
            node_dir.mkdir()
            argv = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "yes" if appendonly else "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ]
            if n == 0:
                primary_port = port
            else:
                argv += ["--replicaof", "127.0.0.1", str(primary_port)]
            server = PrivateServer(f"redis-data-{n}", argv, port, node_dir)
            servers.append(server)
            server.wait_listening()
        quorum = sentinels // 2 + 1
        for n in range(sentinels):
            port = free_port()
            node_dir = workdir / f"sentinel-{n}"
            node_dir.mkdir()
            config = node_dir / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {node_dir}\n"
                f"sentinel monitor {master_name} 127.0.0.1 {primary_port} {quorum}\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            watcher = PrivateServer(
                f"redis-sentinel-{n}", [binary, str(config), "--sentinel"], port, node_dir
            )
            watchers.append(watcher)
            watcher.wait_listening()
        setup.wait_ready()
    except BaseException:
        setup.stop()
        raise
    return setup
